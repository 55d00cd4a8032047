"""Run the pipeline for a directory of images through a persistent Dagster instance.

``ese ingest`` and ``ese demo`` use this: files are registered exactly as the sensor registers
them, then every image that still needs a run (new ones, and those an interrupted or failed
earlier run left: :mod:`ese_assets.pipeline.recovery`) is measured by runs of the pipeline job,
executed in this process against the instance in ``$DAGSTER_HOME``, so the runs, their logs and
materializations appear in the Dagster UI next to the sensor's and the schedule's runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from ese_assets import pipeline
from ese_assets.core.catalog import CatalogError, check_catalog
from ese_assets.definitions import build_definitions
from ese_assets.orchestration.jobs import JOB_NAME
from ese_assets.orchestration.partitions import build_partitions
from ese_assets.orchestration.runs import (
    batch_run_config,
    batch_tags,
    plan_unfinished,
    process_tags,
)
from ese_assets.orchestration.sensors import rejection_observation
from ese_assets.pipeline.recovery import Plan, claim_batch
from ese_assets.pipeline.registration import fits_in_subdirectories
from ese_assets.settings import Settings
from ese_assets.storage.engine import ensure_schema, make_engine

#: The project's instance configuration (source checkout); copied into a new DAGSTER_HOME.
PROJECT_DAGSTER_YAML = Path(__file__).resolve().parents[1] / "dagster.yaml"
#: A batch queued by another process less than this long ago, with no run yet, is left to it.
INGEST_GRACE_S = 10.0


@contextlib.contextmanager
def _home_lock(home: Path):
    """An exclusive lock on the Dagster home while its storage is created: two processes starting
    on a new home at once (``ese ingest`` twice, or beside ``dagster dev``) would otherwise both
    create its SQLite databases."""
    with open(home / ".ese-instance.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def dagster_instance(settings: Settings) -> dg.DagsterInstance:
    """The persistent instance of ``$DAGSTER_HOME`` (default: ``<data dir>/dagster_home``).

    A new home gets the project's ``dagster.yaml`` (as ``make demo``/``make ui`` do), so the CLI
    and the UI see the same configuration; the copy is atomic, so a concurrent reader never sees
    half a file.
    """
    home = Path(os.environ.get("DAGSTER_HOME") or Path(settings.data_dir) / "dagster_home")
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    with _home_lock(home):
        if not (home / "dagster.yaml").exists() and PROJECT_DAGSTER_YAML.exists():
            fd, tmp = tempfile.mkstemp(dir=home, prefix=".dagster.yaml.")
            os.close(fd)
            shutil.copy(PROJECT_DAGSTER_YAML, tmp)
            os.replace(tmp, home / "dagster.yaml")
        instance = dg.DagsterInstance.get()
        instance.get_runs(limit=1)  # creates the run storage while the lock is held
    return instance


@dataclass
class NightRun:
    night: str
    run_id: str
    success: bool
    n_images: int
    seconds: float
    error: str | None = None


@dataclass
class IngestReport:
    scan: pipeline.ScanResult
    plan: Plan
    runs: list[NightRun] = field(default_factory=list)

    @property
    def failed(self) -> list[NightRun]:
        return [r for r in self.runs if not r.success]


def _run_error(result: dg.ExecuteInProcessResult) -> str | None:
    """The first step failure of a run, in one line."""
    for event in result.all_events:
        if event.is_step_failure:
            data = event.step_failure_data
            user = data.user_failure_data
            text = user.description if user and user.description else data.error.message
            return text.strip().splitlines()[0] if text else event.message
    return None


def _check_catalog(settings: Settings) -> str:
    if not settings.catalog_path:
        raise CatalogError(
            "(no catalog)",
            "no source catalog configured: pass --catalog or set ESE_CATALOG / MASTER_SOURCES_DB",
        )
    return check_catalog(settings.catalog_path)


def ingest_directory(
    settings: Settings,
    directory: str | Path,
    *,
    settle_seconds: float = 0.0,
    progress=print,
    verbose: bool = False,
    recursive: bool = False,
) -> IngestReport:
    """Register the FITS files of ``directory`` (and of its sub-directories when ``recursive``)
    and run every image that still needs a run.

    The catalog is validated first (a bad one raises :class:`CatalogError` before anything is
    registered). Then new and changed files are registered (other files are ignored; a directory
    whose images are all in sub-directories gets a hint to use ``recursive``), runs left
    unfinished by an earlier process are recognised, and every unfinished image is requested at
    once, whatever its backoff (a person is waiting). Rejected files are also reported to the
    instance as an observation of ``photometry`` (the UI shows them, night or not). Each run's
    full log is in the Dagster instance (UI); the console shows one line per run unless
    ``verbose`` also echoes Dagster's own step logs.
    """
    progress(_check_catalog(settings))
    engine = make_engine(settings.products_db)
    ensure_schema(engine)
    scan = pipeline.scan_directory(
        engine,
        directory,
        settle_seconds=settle_seconds,
        timezone=settings.timezone,
        first_night=settings.partition_start,
        progress=progress,
        recursive=recursive,
    )
    changed = f", {len(scan.changed)} changed since" if scan.changed else ""
    ignored = f", {scan.ignored} other files ignored (not FITS)" if scan.ignored else ""
    progress(
        f"{directory}: {len(scan.registered)} new images, {len(scan.rejected)} rejected, "
        f"{scan.already_known} already known{changed}, {len(scan.waiting)} still being "
        f"written{ignored}"
    )
    seen = len(scan.registered) + len(scan.rejected) + scan.already_known + len(scan.waiting)
    if not recursive and seen == 0:
        n_below, first = fits_in_subdirectories(directory)
        if n_below:
            more = "+" if n_below >= 1000 else ""
            progress(
                f"hint: {directory} holds no FITS files itself, but its sub-directories hold "
                f"{n_below}{more} (e.g. {first}): use --recursive"
            )
    instance = dagster_instance(settings)
    observation = rejection_observation(scan.rejected, "cli")
    if observation is not None:
        instance.report_runless_asset_event(observation)
    plan = plan_unfinished(
        engine,
        instance,
        settings,
        last_night=build_partitions(settings).get_last_partition_key(),
        patient=False,
        grace_s=INGEST_GRACE_S,
        claim=False,  # each batch is claimed just before it runs (see recovery.claim_batch)
    )
    progress(f"to measure: {plan.summary()}")
    report = IngestReport(scan, plan)
    if not plan.batches:
        return report
    job = build_definitions(settings, bind_env=False).resolve_job_def(JOB_NAME)
    log_level = "DEBUG" if verbose else "CRITICAL"  # failures are summarised below instead
    for i, planned in enumerate(plan.batches, start=1):
        batch = claim_batch(engine, planned)
        if batch is None:  # another process (the sensor, a second `ese ingest`) took them
            progress(f"[{i}/{len(plan.batches)}] night {planned.night}: taken by another process")
            continue
        started = time.monotonic()
        result = job.execute_in_process(
            partition_key=batch.night,
            run_config={
                **batch_run_config(batch),
                "loggers": {"console": {"config": {"log_level": log_level}}},
            },
            instance=instance,
            tags={**batch_tags(batch, "cli", settings.products_db), **process_tags()},
            raise_on_error=False,
        )
        run = NightRun(
            batch.night,
            result.run_id,
            result.success,
            len(batch.paths),
            time.monotonic() - started,
            error=None if result.success else _run_error(result),
        )
        report.runs.append(run)
        outcome = "succeeded" if run.success else f"FAILED: {run.error}"
        progress(
            f"[{i}/{len(plan.batches)}] night {run.night}: {run.n_images} images, "
            f"{outcome} ({run.seconds:.1f} s, run {run.run_id[:8]})"
        )
    return report
