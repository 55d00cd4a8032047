"""Photometry of a run's images by worker processes (ESE_PHOTOMETRY_WORKERS): the same tables as
one process, on SQLite and PostgreSQL, the per-image error boundary kept, no worker left behind."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from ese_assets import pipeline
from ese_assets.core.catalog import load_catalog
from ese_assets.definitions import build_definitions
from ese_assets.pipeline import parallel
from ese_assets.settings import Settings, usable_cores
from ese_assets.storage import images as images_db
from ese_assets.storage.engine import dispose_engine, ensure_schema, make_engine
from ese_assets_tests import snapshots
from ese_assets_tests.survey import NIGHTS, make_workspace

TABLES = (
    "images",
    "photometry",
    "variability_stats",
    "ese_candidates",
    "source_night_sums",
    "source_sums",
)
# Processing times and run bookkeeping differ between two runs by design; nothing else may.
VOLATILE = (*snapshots.SNAPSHOT_EXCLUDE, "last_measured_at", *snapshots.IMAGE_BOOKKEEPING)


def snapshot(engine) -> dict[str, pd.DataFrame]:
    return {t: snapshots.table_snapshot(engine, t, exclude=VOLATILE) for t in TABLES}


def assert_same_tables(a: dict, b: dict) -> None:
    for table in TABLES:
        assert len(a[table]) > 0, f"{table} is empty: nothing was compared"
        pd.testing.assert_frame_equal(a[table], b[table], check_exact=False, rtol=1e-12, obj=table)


# -------------------------------------------------------------------------- the process pool


def pid_of(item):
    """Module-level (importable by the workers): the worker's pid, slowly enough that both
    workers get items."""
    if item == "bad":
        raise ValueError(f"cannot handle {item!r}")
    if item == "die":
        os._exit(3)  # a worker killed mid-item (as by the OOM killer)
    if item == "hang":
        time.sleep(600)
    time.sleep(0.2)
    return item, os.getpid()


def test_ordered_map_keeps_order_returns_errors_and_uses_several_processes():
    items = [0, 1, 2, "bad", 4, 5, 6, 7]
    with parallel.ordered_map(pid_of, items, workers=2) as results:
        out = list(results)
    assert [item for item, _ in out] == items
    error = dict(out)["bad"]
    assert isinstance(error, ValueError) and "cannot handle 'bad'" in str(error)
    pids = {res[1] for item, res in out if item != "bad"}
    assert [res[0] for item, res in out if item != "bad"] == [i for i in items if i != "bad"]
    assert len(pids) == 2 and os.getpid() not in pids


def test_a_dead_worker_fails_only_the_items_in_hand():
    items = ["die", *range(12)]
    with parallel.ordered_map(pid_of, items, workers=2) as results:
        out = dict(results)
    assert isinstance(out["die"], BrokenProcessPool)
    lost = [i for i in range(12) if isinstance(out[i], BrokenProcessPool)]
    # the pool broke with at most AHEAD_PER_WORKER items per worker in hand; the rest went on
    assert len(lost) < 2 * parallel.AHEAD_PER_WORKER
    assert all(out[i] == (i, out[i][1]) for i in range(12) if i not in lost)
    assert [i for i in range(12) if i not in lost][-4:] == [8, 9, 10, 11]


def test_workers_exit_when_the_calling_process_is_killed(tmp_path):
    script = tmp_path / "caller.py"
    script.write_text(
        textwrap.dedent(
            """
            from ese_assets.pipeline import parallel
            from ese_assets_tests.test_parallel_photometry import pid_of

            def main():
                items = [0, 1, 2, 3, "hang", "hang", "hang"]
                with parallel.ordered_map(pid_of, items, workers=2) as results:
                    pids = {next(results)[1][1] for _ in range(4)}
                    print(" ".join(map(str, sorted(pids))), flush=True)
                    list(results)

            if __name__ == "__main__":
                main()
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    caller = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        line = caller.stdout.readline()
        children = [int(p) for p in line.split()]
        assert children, f"no worker processes reported: {line!r}"
        caller.kill()  # SIGKILL: no cleanup code of the caller runs
        caller.wait(timeout=10)
        deadline = time.time() + 10 * parallel.PARENT_POLL_S
        alive = children
        while alive and time.time() < deadline:
            time.sleep(0.2)
            alive = [pid for pid in alive if _alive(pid)]
        assert not alive, f"workers {alive} outlived their killed caller"
    finally:
        caller.kill()
        for pid in children if "children" in locals() else []:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) is not running
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -------------------------------------------------------------------------- settings


def test_photometry_workers_setting(monkeypatch):
    monkeypatch.delenv("ESE_PHOTOMETRY_WORKERS", raising=False)
    assert Settings.from_env().photometry_workers == usable_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("ESE_PHOTOMETRY_WORKERS", "3")
    assert Settings.from_env().photometry_workers == 3
    for bad, fragment in (("0", "must be >= 1"), ("two", "is not a number"), ("1.5", "whole")):
        monkeypatch.setenv("ESE_PHOTOMETRY_WORKERS", bad)
        with pytest.raises(ValueError, match="ESE_PHOTOMETRY_WORKERS") as exc:
            Settings.from_env()
        assert fragment in str(exc.value) and "\n" not in str(exc.value)


# -------------------------------------------------------------------------- the pipeline


def _run_nights(settings: Settings) -> None:
    job = build_definitions(settings, bind_env=False).resolve_job_def("ese_pipeline")
    with dg.instance_for_test() as instance:
        for night in NIGHTS:
            assert job.execute_in_process(partition_key=night, instance=instance).success


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_one_and_two_workers_give_the_same_tables(backend, tmp_path, small_survey, request):
    """Every table, floats to 1e-12 relative, after the same three nights through the job."""
    pools = []
    real_ordered_map = parallel.ordered_map

    def counting_ordered_map(*args, **kwargs):
        pools.append(kwargs["workers"])
        return real_ordered_map(*args, **kwargs)

    request.getfixturevalue("monkeypatch").setattr(parallel, "ordered_map", counting_ordered_map)
    frames = {}
    for workers in (1, 2):
        if backend == "sqlite":
            db = str(tmp_path / f"w{workers}" / "products.sqlite3")
        else:
            db = request.getfixturevalue("postgres_url")  # one private schema per test...
            db = _second_schema(db, workers)  # ...so the second run gets its own
        root = tmp_path / f"w{workers}"
        root.mkdir(exist_ok=True)
        settings = dataclasses.replace(
            make_workspace(root, small_survey, products_db=db), photometry_workers=workers
        )
        _run_nights(settings)
        engine = make_engine(db)
        # the two workspaces differ only by their directory
        frames[workers] = {t: _names_only(df) for t, df in snapshot(engine).items()}
        dispose_engine(db)
    assert pools == [2] * len(NIGHTS), "the 2-worker runs did not use the process pool"
    assert (frames[1]["images"]["status"] == "measured").all()
    assert_same_tables(frames[1], frames[2])


def _names_only(df: pd.DataFrame) -> pd.DataFrame:
    for col in ("path", "image_path"):
        if col in df:
            df[col] = df[col].map(lambda p: Path(p).name)
    return df


def _second_schema(postgres_url: str, workers: int) -> str:
    """A second private schema next to the fixture's (dropped with the session's database)."""
    if workers == 1:
        return postgres_url
    import uuid

    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    url = sa.make_url(postgres_url)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url.set(query={}), poolclass=NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    admin.dispose()
    return url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False
    )


def test_bad_images_are_recorded_the_same_way_by_workers(tmp_path, small_survey):
    """A file corrupted after registration and a vanished file are rejected with the same reasons
    by the workers as in the run's process, the other images measured; the same tables."""
    catalog = load_catalog(small_survey / "catalog.csv")
    frames, results = {}, {}
    for workers in (1, 2):
        incoming = tmp_path / f"w{workers}" / "incoming"
        incoming.mkdir(parents=True)
        for fits in sorted((small_survey / "incoming").glob("*.fits"))[:6]:
            shutil.copy2(fits, incoming / fits.name)
        engine = make_engine(str(tmp_path / f"w{workers}" / "products.sqlite3"))
        ensure_schema(engine)
        paths = sorted(str(p) for p in incoming.glob("*.fits"))
        pipeline.inspect_files(engine, paths, timezone="UTC", first_night="2020-01-01")
        Path(paths[1]).write_bytes(b"SIMPLE  =                    T" + b"\x00" * 2850)
        os.remove(paths[4])
        results[workers] = pipeline.measure_images(engine, catalog, paths, workers=workers)
        frames[workers] = {
            t: _names_only(snapshots.table_snapshot(engine, t, exclude=VOLATILE))
            for t in ("images", "photometry")
        }
        statuses = images_db.image_counts_by_status(engine)
        assert {k: v for k, v in statuses.items() if v} == {"measured": 4, "rejected": 2}
    for a, b in zip(results[1], results[2], strict=True):
        assert (Path(a.path).name, a.status, a.reason, a.n_sources) == (
            Path(b.path).name,
            b.status,
            b.reason,
            b.n_sources,
        )
    assert "file not found" in results[2][4].reason and "FITS" in results[2][1].reason
    for table in ("images", "photometry"):
        pd.testing.assert_frame_equal(
            frames[1][table], frames[2][table], check_exact=False, rtol=1e-12
        )


def test_the_run_process_measures_alone_where_workers_cannot_start(
    tmp_path, small_survey, monkeypatch
):
    """A process whose user may not run its interpreter again (as ``ese ingest`` run as another
    user from a venv under a private home) measures every image itself, saying why."""
    import multiprocessing.spawn

    monkeypatch.setattr(multiprocessing.spawn, "get_executable", lambda: str(tmp_path / "nope"))
    catalog = load_catalog(small_survey / "catalog.csv")
    engine = make_engine(str(tmp_path / "products.sqlite3"))
    ensure_schema(engine)
    paths = sorted(str(p) for p in (small_survey / "incoming").glob("*.fits"))[:4]
    pipeline.inspect_files(engine, paths, timezone="UTC", first_night="2020-01-01")
    lines = []
    results = pipeline.measure_images(engine, catalog, paths, workers=2, progress=lines.append)
    assert [r.status for r in results] == ["measured"] * 4
    assert "cannot run the interpreter" in lines[0] and "in this process" in lines[0]
    assert len(lines) == 5  # the reason, then one line per image
