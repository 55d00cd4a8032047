"""Detection runs launched over HTTP: Dagster runs of the ``ese_detect`` job, and their status.

A launch returns at once with the run id; the run executes in this server process on one worker
thread (``execute_in_process`` against the ``$DAGSTER_HOME`` instance, so it is recorded there
and the Dagster UI shows it, with its logs and output metadata, like any other run). One worker:
detection runs are short and write the same table, so they queue behind each other instead of
waiting on the database lock. ``GET /api/jobs/{id}`` reads the run's status and result back from
the instance, so it also answers for runs launched before a restart of the server.

Why not the webserver's GraphQL ``launchRun``: it needs ``dagster dev`` running and reachable from
this server, and a second place where the code location is loaded; the in-process run needs only
the instance directory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
from dagster._core.utils import make_new_run_id

from ese_assets.orchestration.detection_job import DETECT_JOB_NAME, DETECT_OP_NAME, RESULT_KEYS
from ese_assets.orchestration.runs import TRIGGER_TAG, process_tags, products_db_tags

#: Run tag: which API request launched the run (the seed's job type).
JOB_TYPE_TAG = "ese/job_type"
#: ``type`` of a single-source job and of a batch job (the seed's names).
SINGLE_TYPE = "ese-detect"
BATCH_TYPE = "batch_ese-detect"


class JobsUnavailable(RuntimeError):
    """No Dagster instance to record runs in (``DAGSTER_HOME`` unset or unusable)."""


@dataclass
class _Launch:
    """What this process knows about a run before the instance has a record of it."""

    job_type: str
    params: dict[str, Any]
    created_at: float
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


def _metadata_value(value: Any) -> Any:
    return getattr(value, "value", value)


class JobLauncher:
    """Launches ``ese_detect`` runs and reports them (see module docstring)."""

    def __init__(
        self, job: dg.JobDefinition, *, dagster_home: str | None, products_db: str
    ) -> None:
        self._job = job
        self._home = dagster_home
        self._products_db = products_db
        self._instance: dg.DagsterInstance | None = None
        self._launches: dict[str, _Launch] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ese-detect")

    def instance(self) -> dg.DagsterInstance:
        with self._lock:
            if self._instance is None:
                if not self._home:
                    raise JobsUnavailable(
                        "DAGSTER_HOME is not set: detection runs are recorded in a Dagster "
                        "instance; start the server with `make ui` or set DAGSTER_HOME"
                    )
                try:
                    self._instance = dg.DagsterInstance.from_config(self._home)
                except Exception as exc:
                    raise JobsUnavailable(
                        f"Dagster instance {self._home} is not usable: {exc}"
                    ) from exc
            return self._instance

    def launch(self, job_type: str, params: Mapping[str, Any]) -> str:
        """Start a run of ``ese_detect`` with ``params`` (the op's config); its run id."""
        instance = self.instance()
        run_id = make_new_run_id()
        launch = _Launch(job_type=job_type, params=dict(params), created_at=time.time())
        with self._lock:
            self._launches[run_id] = launch
        tags = {
            JOB_TYPE_TAG: job_type,
            TRIGGER_TAG: "rest-api",
            **products_db_tags(self._products_db),
            **process_tags(),
        }
        run_config = {"ops": {DETECT_OP_NAME: {"config": dict(params)}}}

        def execute() -> None:
            try:
                self._job.execute_in_process(
                    run_config=run_config,
                    instance=instance,
                    run_id=run_id,
                    tags=tags,
                    raise_on_error=False,
                )
            except Exception as exc:  # config or instance errors before the run exists
                launch.error = f"{type(exc).__name__}: {exc}"
            finally:
                launch.done.set()

        self._executor.submit(execute)
        return run_id

    def wait(self, run_id: str, timeout: float | None = None) -> bool:
        """Block until a run launched by this process finished (tests, shutdown)."""
        launch = self._launches.get(run_id)
        return launch.done.wait(timeout) if launch is not None else True

    def status(self, run_id: str) -> dict[str, Any] | None:
        """The seed's Job fields for ``run_id`` (None when no such detection run exists)."""
        instance = self.instance()
        record = instance.get_run_record_by_id(run_id)
        launch = self._launches.get(run_id)
        if record is None:
            if launch is None:
                return None
            failed = launch.error is not None
            return self._job_dict(
                run_id,
                launch.job_type,
                launch.params,
                status="FAILURE" if failed else "QUEUED",
                created_at=launch.created_at,
                error=launch.error,
            )
        run = record.dagster_run
        if run.job_name != DETECT_JOB_NAME:
            return None
        params = dict(run.run_config.get("ops", {}).get(DETECT_OP_NAME, {}).get("config", {}))
        status = run.status.value
        result = error = None
        if run.status == dg.DagsterRunStatus.SUCCESS:
            result = self._result(instance, run_id)
        elif run.status == dg.DagsterRunStatus.FAILURE:
            error = self._error(instance, run_id)
        return self._job_dict(
            run_id,
            run.tags.get(JOB_TYPE_TAG, SINGLE_TYPE),
            params,
            status=status,
            created_at=record.create_timestamp.timestamp(),
            started_at=record.start_time,
            finished_at=record.end_time,
            result=result,
            error=error,
        )

    @staticmethod
    def _job_dict(
        run_id: str,
        job_type: str,
        params: Mapping[str, Any],
        *,
        status: str,
        created_at: float | None,
        started_at: float | None = None,
        finished_at: float | None = None,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        shown = dict(params)
        if job_type == SINGLE_TYPE:  # the seed's single-job params name one source_id
            ids = shown.pop("source_ids", None) or []
            shown["source_id"] = ids[0] if ids else None
        job = {
            "id": run_id,
            "type": job_type,
            "status": status,
            "params": shown,
            "created_at": created_at,
            "started_at": started_at,
            "finished_at": finished_at,
            "dagster_job": DETECT_JOB_NAME,
            "result": result,
            "error": error,
        }
        if job_type == BATCH_TYPE:
            total = len(params.get("source_ids") or []) or 1  # all sources: one item (the seed's)
            job["total_items"] = total
            job["completed_items"] = total if status == "SUCCESS" else 0
            job["failed_items"] = total if status == "FAILURE" else 0
        return job

    @staticmethod
    def _result(instance: dg.DagsterInstance, run_id: str) -> dict[str, Any] | None:
        for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_OUTPUT):
            event = entry.dagster_event
            if event is None or event.step_key != DETECT_OP_NAME:
                continue
            metadata = event.step_output_data.metadata
            out = {k: _metadata_value(metadata[k]) for k in RESULT_KEYS if k in metadata}
            out["candidates"] = _metadata_value(metadata.get("candidates", []))
            return out
        return None

    @staticmethod
    def _error(instance: dg.DagsterInstance, run_id: str) -> str | None:
        for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
            event = entry.dagster_event
            if event is not None and event.step_failure_data.error is not None:
                return event.step_failure_data.error.message.strip()
        return "run failed (see the run's logs in the Dagster UI)"

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
        with self._lock:
            if self._instance is not None:
                self._instance.dispose()
                self._instance = None
