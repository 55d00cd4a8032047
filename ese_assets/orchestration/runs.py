"""What the Dagster instance says about the runs that were asked to measure images.

Every run request for a batch of images carries the batch's token (tag :data:`TOKEN_TAG`), which is
also written on the batch's ``images`` rows when they are queued. A queued image is *in flight*
while a run with its token is queued or running; otherwise the run failed, was canceled, died with
its process, or was never launched, and the image is requested again (see
:mod:`ese_assets.pipeline.recovery`).

Every run records the process id and host name of the process that executes it (``ese ingest``
tags its runs; the ``photometry`` step adds the tags to runs launched by the daemon), so a run left
``STARTED`` by a process that was killed is recognised as dead and marked failed in the instance
(the UI then shows it failed rather than running for ever). Dagster's own run monitoring
(``dagster.yaml``) fails runs that never get past ``STARTING``; its worker health check is not
available for local processes, hence the process tags.
"""

from __future__ import annotations

import os
import socket

import dagster as dg
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES
from sqlalchemy import Engine

from ese_assets.orchestration.jobs import JOB_NAME
from ese_assets.pipeline.recovery import ORPHAN_GRACE_S, Batch, Plan, plan_runs
from ese_assets.settings import Settings
from ese_assets.storage.engine import describe_url

#: Tag naming the image batch a run measures (the token stored on the batch's ``images`` rows).
TOKEN_TAG = "ese/batch"
#: Tags of runs executed in the process of ``ese ingest`` (pid, host), to recognise dead ones.
PID_TAG = "ese/pid"
HOST_TAG = "ese/host"
#: Tag naming the products database a run writes to (password hidden): runs of several databases
#: in one Dagster instance can be told apart (and filtered by it in the UI's run list).
PRODUCTS_DB_TAG = "ese/products_db"
#: Tag saying what started a run: ``sensor``, ``cli`` (``ese ingest``), ``schedule``.
TRIGGER_TAG = "ese/trigger"


def products_db_tags(products_db: str) -> dict[str, str]:
    """``{ese/products_db: <absolute path of an SQLite file, or URL with the password hidden>}``
    for runs that use ``products_db``."""
    if "://" not in str(products_db):
        return {PRODUCTS_DB_TAG: os.path.abspath(os.path.expanduser(products_db))}
    return {PRODUCTS_DB_TAG: describe_url(products_db)}


def process_tags() -> dict[str, str]:
    """Tags that identify the current process, for runs executed in it."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_dead_run(run: dg.DagsterRun) -> bool:
    pid, host = run.tags.get(PID_TAG), run.tags.get(HOST_TAG)
    if not pid or host != socket.gethostname() or not pid.isdigit():
        return False
    return int(pid) != os.getpid() and not _process_alive(int(pid))


def in_flight_runs(instance: dg.DagsterInstance, job_name: str) -> list[dg.DagsterRun]:
    """Runs of ``job_name`` that are queued or running, after failing those whose process died."""
    runs = instance.get_runs(
        filters=dg.RunsFilter(job_name=job_name, statuses=IN_PROGRESS_RUN_STATUSES)
    )
    alive = []
    for run in runs:
        if _is_dead_run(run):
            instance.report_run_failed(
                run,
                message=f"the process that executed this run (pid {run.tags[PID_TAG]}) "
                "is gone; its images are requested again",
            )
        else:
            alive.append(run)
    return alive


def in_flight_work(
    instance: dg.DagsterInstance, job_name: str
) -> tuple[set[str], list[tuple[str, str]]]:
    """(image batch tokens, night ranges ``(first, last)``) being processed by live runs.

    A run without a token (schedule, backfill, a run launched from the UI) measures its whole
    nights, so its partition key (or key range) is returned as nights in flight.
    """
    tokens: set[str] = set()
    nights: list[tuple[str, str]] = []
    for run in in_flight_runs(instance, job_name):
        token = run.tags.get(TOKEN_TAG)
        if token:
            tokens.add(token)
            continue
        key = run.tags.get("dagster/partition")
        start = run.tags.get("dagster/asset_partition_range_start")
        end = run.tags.get("dagster/asset_partition_range_end")
        if key:
            nights.append((key, key))
        elif start and end:
            nights.append((start, end))
    return tokens, nights


def tokens_with_runs(instance: dg.DagsterInstance, tokens: set[str]) -> set[str]:
    """The tokens among ``tokens`` for which a run exists in the instance (in any status)."""
    return {
        t for t in tokens if instance.get_runs(filters=dg.RunsFilter(tags={TOKEN_TAG: t}), limit=1)
    }


def batch_run_config(batch: Batch) -> dict:
    """Run config that makes ``photometry`` measure exactly the batch's images."""
    return {"ops": {"photometry": {"config": {"image_paths": list(batch.paths)}}}}


def batch_tags(batch: Batch, trigger: str, products_db: str | None = None) -> dict[str, str]:
    """Tags of a run that measures ``batch``: its token, the trigger, the number of images and,
    when given, the products database."""
    tags = {TOKEN_TAG: batch.token, TRIGGER_TAG: trigger, "ese/images": str(len(batch.paths))}
    return {**tags, **(products_db_tags(products_db) if products_db else {})}


def plan_unfinished(
    engine: Engine,
    instance: dg.DagsterInstance,
    settings: Settings,
    *,
    last_night: str,
    patient: bool,
    grace_s: float = ORPHAN_GRACE_S,
    claim: bool = True,
) -> Plan:
    """:func:`ese_assets.pipeline.recovery.plan_runs` with the live runs of ``instance``."""
    tokens, nights = in_flight_work(instance, JOB_NAME)
    return plan_runs(
        engine,
        last_night=last_night,
        in_flight_tokens=tokens,
        in_flight_nights=nights,
        tokens_with_runs=lambda wanted: tokens_with_runs(instance, wanted),
        retry_delay_s=settings.retry_delay_s,
        max_attempts=settings.max_attempts,
        patient=patient,
        grace_s=grace_s,
        claim=claim,
    )
