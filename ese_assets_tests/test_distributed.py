"""The pipeline on Dagster's distributed engine: Celery workers (dagster-celery, two worker
processes started with the documented ``dagster-celery worker start`` command against the real
RabbitMQ broker) and the Dagster instance on PostgreSQL (dagster-postgres, the repository's
``dagster-postgres.yaml`` on a fresh database). Three nights run through the Celery executor
(``ESE_EXECUTOR=celery``) with ``dagster job execute`` must leave every products table as a run in
one process does, and both workers must have executed steps.

Needs ``ESE_TEST_POSTGRES_URL`` and ``ESE_TEST_CELERY_BROKER`` (``.ci/run`` sets both); without
them the test is skipped with the reason, unless ``ESE_REQUIRE_POSTGRES=1`` (CI), then it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from ese_assets.definitions import build_definitions
from ese_assets.storage.engine import dispose_engine, make_engine
from ese_assets_tests.conftest import REQUIRE_POSTGRES_ENV
from ese_assets_tests.survey import NIGHTS, make_workspace
from ese_assets_tests.test_parallel_photometry import (
    _second_schema,
    assert_same_tables,
    snapshot,
)

BROKER_ENV = "ESE_TEST_CELERY_BROKER"
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKERS = ("w1", "w2")
#: Seconds for a worker to connect to the broker, and for one night's run.
WORKER_START_S = 120
RUN_TIMEOUT_S = 600


def _unavailable(message: str) -> None:
    if os.environ.get(REQUIRE_POSTGRES_ENV, "").strip() in ("1", "true", "yes"):
        pytest.fail(f"the distributed test is required ({REQUIRE_POSTGRES_ENV}=1) but {message}")
    pytest.skip(f"distributed test skipped: {message}")


@pytest.fixture
def broker_url() -> str:
    url = os.environ.get(BROKER_ENV, "").strip()
    if not url:
        _unavailable(f"{BROKER_ENV} is not set (e.g. amqp://guest:guest@127.0.0.1:5672//)")
    try:
        import dagster_celery  # noqa: F401
        import dagster_postgres  # noqa: F401
        import kombu
    except ImportError as exc:
        _unavailable(f"{exc.name} is not installed (pip install -e '.[distributed]')")
    try:
        with kombu.Connection(url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        _unavailable(f"the broker at {url} is not reachable: {exc}")
    return url


@pytest.fixture
def dagster_pg_url(_postgres_test_database) -> str:
    """A fresh database for the Dagster instance's storage (dropped at the end), psycopg2 URL."""
    server = _postgres_test_database
    name = f"ese_dagster_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(
            drivername="postgresql+psycopg2", database=name, query={}
        ).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def worker_argv(queue: str, name: str) -> list[str]:
    """The README's worker command ("Past one machine"; test_readme_examples compares them)."""
    return [
        str(BIN / "dagster-celery"),
        "worker",
        "start",
        "-A",
        "dagster_celery.app",
        "-y",
        str(REPO / "dagster-celery.yaml"),
        "-q",
        queue,
        "-n",
        name,
        "--",
        "--pool=solo",
    ]


def execute_argv(night: str) -> list[str]:
    """The README's ``dagster job execute`` of one night (compared by test_readme_examples)."""
    return [
        str(BIN / "dagster"),
        "job",
        "execute",
        "-m",
        "ese_assets.definitions",
        "-j",
        "ese_pipeline",
        "--tags",
        json.dumps({"dagster/partition": night}),
    ]


def _start_worker(name: str, env: dict, log: Path) -> subprocess.Popen:
    """``dagster-celery worker start`` (which runs ``celery worker``) in its own process group."""
    return subprocess.Popen(
        worker_argv(env["ESE_CELERY_QUEUE"], name),
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the worker's whole process group (celery and its photometry processes), then
    SIGKILL to whatever is left after 20 s."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait_s
        while time.time() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                process.wait(timeout=5)
                return
            process.poll()  # reap the group leader, or the group never looks empty
            time.sleep(0.2)


def _delete_queue(broker_url: str, queue: str) -> None:
    """The test's broker queue is removed with it (Celery declares queues durable)."""
    import kombu

    with kombu.Connection(broker_url, connect_timeout=5) as conn:
        conn.default_channel.queue_delete(queue)


def _wait_ready(logs: list[Path], processes: list[subprocess.Popen]) -> None:
    deadline = time.time() + WORKER_START_S
    while time.time() < deadline:
        for proc, log in zip(processes, logs, strict=True):
            if proc.poll() is not None:
                pytest.fail(f"celery worker exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if all(" ready." in log.read_text() for log in logs):
            return
        time.sleep(0.5)
    pytest.fail("celery workers not ready:\n" + "\n".join(p.read_text()[-2000:] for p in logs))


def test_nights_through_celery_workers_match_one_process(
    tmp_path, small_survey, broker_url, dagster_pg_url, postgres_url, monkeypatch
):
    # One workspace (images, catalog) for both runs; each run its own products database.
    reference = make_workspace(tmp_path, small_survey, products_db=postgres_url)
    distributed_db = _second_schema(postgres_url, workers=2)

    # The reference: every step in the test's process, on a temporary instance.
    job = build_definitions(reference, bind_env=False).resolve_job_def("ese_pipeline")
    assert job.executor_def.name == "in_process"
    with dg.instance_for_test() as instance:
        for night in NIGHTS:
            assert job.execute_in_process(partition_key=night, instance=instance).success

    # The distributed instance: the repository's PostgreSQL configuration, a fresh database.
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster-postgres.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_URL": dagster_pg_url,
        "PIPELINE_PRODUCTS_DB": distributed_db,
        "ESE_CATALOG": reference.catalog_path,
        "ESE_INCOMING_DIR": reference.incoming_dir,
        "ESE_SETTLE_SECONDS": "0",
        "ESE_PARTITION_START": reference.partition_start,
        "ESE_EXECUTOR": "celery",
        "ESE_CELERY_BROKER": broker_url,
        # a queue of this test only: no other worker on the broker can take its steps
        "ESE_CELERY_QUEUE": f"ese_test_{uuid.uuid4().hex[:12]}",
        "ESE_PHOTOMETRY_WORKERS": "2",  # each Celery worker measures with its own pool
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("MASTER_SOURCES_DB", None)
    logs = [tmp_path / f"{name}.log" for name in WORKERS]
    workers: list[subprocess.Popen] = []
    try:
        for name, log in zip(WORKERS, logs, strict=True):
            workers.append(_start_worker(name, env, log))
        _wait_ready(logs, workers)
        for night in NIGHTS:
            run = subprocess.run(
                execute_argv(night),
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT_S,
            )
            assert run.returncode == 0 and "RUN_SUCCESS" in run.stderr + run.stdout, (
                f"night {night}: exit {run.returncode}\n{(run.stdout + run.stderr)[-4000:]}"
            )
    finally:
        for proc in workers:
            _stop(proc)
        _delete_queue(broker_url, env["ESE_CELERY_QUEUE"])
    for proc in workers:
        assert proc.poll() is not None

    # The runs are in the PostgreSQL instance, and their steps ran on both Celery workers.
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)  # read by the instance's dagster.yaml
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        runs = instance.get_runs()
        assert sorted(r.tags["dagster/partition"] for r in runs) == sorted(NIGHTS)
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        step_workers = {}
        for run in runs:
            for record in instance.all_logs(run.run_id):
                event = record.dagster_event
                if event is None or not event.is_engine_event:
                    continue
                metadata = event.engine_event_data.metadata
                if "Celery worker" in metadata:  # "Executing steps ... in celery worker"
                    step_workers[(run.run_id, record.step_key)] = metadata["Celery worker"].value
        assert len(step_workers) == len(runs) * len(job.graph.nodes), step_workers
        names = {w.split("@")[0] for w in step_workers.values()}
        assert names == set(WORKERS), f"steps ran on {names} only"

    engine_ref, engine_dist = make_engine(reference.products_db), make_engine(distributed_db)
    try:
        expected, actual = snapshot(engine_ref), snapshot(engine_dist)
    finally:
        dispose_engine(reference.products_db)
        dispose_engine(distributed_db)
    assert (expected["images"]["status"] == "measured").all()
    assert_same_tables(expected, actual)


def test_executor_follows_the_setting(monkeypatch):
    """ESE_EXECUTOR picks the job's executor; a wrong value is one line naming the variable."""
    pytest.importorskip("dagster_celery", reason="the distributed extra is not installed")
    from ese_assets.settings import Settings

    for value, name in (("celery", "celery"), ("in_process", "in_process")):
        monkeypatch.setenv("ESE_EXECUTOR", value)
        job = build_definitions(Settings.from_env(), bind_env=False).resolve_job_def("ese_pipeline")
        assert job.executor_def.name == name
    monkeypatch.setenv("ESE_EXECUTOR", "dask")
    with pytest.raises(ValueError, match="ESE_EXECUTOR='dask' must be one of in_process, celery"):
        Settings.from_env()
