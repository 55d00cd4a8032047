"""Real Dagster runs of the pipeline: sensor, job, schedule, re-runs, a killed run, backfills."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from ese_assets.definitions import build_definitions
from ese_assets.orchestration.resources import resources_from_settings
from ese_assets.storage import candidates as candidates_db
from ese_assets.storage import images as images_db
from ese_assets.storage import statistics as statistics_db
from ese_assets.storage.engine import ensure_schema, make_engine
from ese_assets_tests import snapshots
from ese_assets_tests.survey import NIGHTS, make_workspace

TABLES = (
    "images",
    "photometry",
    "variability_stats",
    "ese_candidates",
    "source_night_sums",
    "source_sums",
    "image_gains",
    "calibration_references",
)
# Processing timestamps differ between runs by design; everything else must be identical.
VOLATILE = (
    "id",
    "measured_at",
    "computed_at",
    "updated_at",
    "flagged_at",
    "registered_at",
    "last_measured_at",
    *snapshots.IMAGE_BOOKKEEPING,
)


def snapshot(engine) -> dict[str, pd.DataFrame]:
    return {
        t: snapshots.table_snapshot(engine, t, exclude=VOLATILE).reset_index(drop=True)
        for t in TABLES
    }


def assert_same_tables(a: dict, b: dict) -> None:
    for table in TABLES:
        pd.testing.assert_frame_equal(a[table], b[table], check_exact=False, rtol=1e-12, obj=table)


def run_night(settings, night: str, instance, run_config=None, tags=None):
    job = build_definitions(settings, bind_env=False).resolve_job_def("ese_pipeline")
    result = job.execute_in_process(
        partition_key=night, instance=instance, run_config=run_config or {}, tags=tags or {}
    )
    assert result.success
    return result


def relocate_paths(frames: dict, old: str, new: str) -> dict:
    """Snapshots of two workspaces differ only by their directory; make paths comparable."""
    out = {}
    for name, df in frames.items():
        df = df.copy()
        for col in ("path", "image_path"):
            if col in df:
                df[col] = df[col].str.replace(old, new, regex=False)
        out[name] = df
    return out


def test_definitions_load_and_automation_is_on():
    defs = build_definitions()
    dg.Definitions.validate_loadable(defs)
    assert {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()} == {
        "photometry",
        "image_calibration",
        "variability_stats",
        "ese_candidates",
    }
    assert (
        defs.resolve_sensor_def("incoming_images_sensor").default_status
        == dg.DefaultSensorStatus.RUNNING
    )
    assert (
        defs.resolve_schedule_def("nightly_reconciliation").default_status
        == dg.DefaultScheduleStatus.RUNNING
    )


def test_sensor_registers_files_and_requests_one_run_per_night(tmp_path, small_survey):
    settings = make_workspace(tmp_path, small_survey)
    incoming = Path(settings.incoming_dir)
    (incoming / "corrupt.fits").write_bytes(b"SIMPLE  =                    T" + b"\x00" * 500)
    (incoming / "observing_log.txt").write_text("not an image\n")
    (incoming / "copy.part").write_text("a transfer in progress is ignored")
    defs = build_definitions(settings, bind_env=False)
    sensor = defs.resolve_sensor_def("incoming_images_sensor")
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(
            instance=instance, resources=resources_from_settings(settings, bind_env=False)
        )
        result = sensor(ctx)
        requests = result.run_requests
        assert sorted(r.partition_key for r in requests) == list(NIGHTS)
        for r in requests:
            paths = r.run_config["ops"]["photometry"]["config"]["image_paths"]
            assert len(paths) == 4 and all(
                r.partition_key.replace("-", "") in Path(p).name for p in paths
            )
        engine = make_engine(settings.products_db)
        rejected = images_db.rejected_images(engine).set_index("path")["reason"]
        # the corrupt FITS file is rejected; a text file is not an image at all: ignored
        assert set(Path(p).name for p in rejected.index) == {"corrupt.fits"}
        assert not images_db.known_image_paths(engine, [str(incoming / "observing_log.txt")])
        assert images_db.image_counts_by_status(engine)["queued"] == 12

        # Nothing new: the next tick skips, and does not request the same work again.
        again = sensor(
            dg.build_sensor_context(
                instance=instance, resources=resources_from_settings(settings, bind_env=False)
            )
        )
        assert isinstance(again, dg.SkipReason) or not again.run_requests


def test_sensor_waits_for_files_still_being_written(tmp_path, small_survey):
    settings = make_workspace(tmp_path, small_survey, copy_images=False, settle_seconds=60)
    src = sorted((small_survey / "incoming").glob("*.fits"))[0]
    dst = Path(settings.incoming_dir) / src.name
    shutil.copy(src, dst)  # fresh mtime: still being written as far as anyone can tell
    defs = build_definitions(settings, bind_env=False)
    sensor = defs.resolve_sensor_def("incoming_images_sensor")
    resources = resources_from_settings(settings, bind_env=False)
    with dg.instance_for_test() as instance:
        first = sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert isinstance(first, dg.SkipReason) and "still being written" in first.skip_message
        old = time.time() - 120
        os.utime(dst, (old, old))
        second = sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert len(second.run_requests) == 1


def test_truncated_file_is_rejected_once_settled(tmp_path, small_survey):
    settings = make_workspace(tmp_path, small_survey, copy_images=False)
    src = sorted((small_survey / "incoming").glob("*.fits"))[0]
    data = src.read_bytes()
    (Path(settings.incoming_dir) / "half.fits").write_bytes(data[: len(data) // 2])
    engine = make_engine(settings.products_db)
    ensure_schema(engine)
    from ese_assets import pipeline

    scan = pipeline.scan_directory(
        engine, settings.incoming_dir, timezone="UTC", first_night="2020-01-01"
    )
    assert len(scan.rejected) == 1 and "truncated" in scan.rejected[0][1]


def test_same_night_twice_leaves_identical_tables(tmp_path, small_survey):
    settings = make_workspace(tmp_path, small_survey)
    engine = make_engine(settings.products_db)
    with dg.instance_for_test() as instance:
        for night in NIGHTS:
            run_night(settings, night, instance)
        first = snapshot(engine)
        assert len(first["photometry"]) > 300 and len(first["variability_stats"]) > 30
        run_night(settings, NIGHTS[1], instance)
        run_night(settings, NIGHTS[2], instance)
        assert_same_tables(first, snapshot(engine))
    # No duplicate (image, source) rows and every usable image measured once.
    phot = first["photometry"]
    assert not phot.duplicated(["image_path", "source_id"]).any()
    assert (first["images"]["status"] == "measured").sum() == 12


def test_injected_ese_is_flagged_and_materializations_have_metadata(tmp_path, small_survey):
    settings = make_workspace(tmp_path, small_survey)
    with dg.instance_for_test() as instance:
        for night in NIGHTS:
            result = run_night(settings, night, instance)
        mats = {m.asset_key.to_user_string(): m for m in result.get_asset_materialization_events()}
        phot_meta = mats["photometry"].materialization.metadata
        assert phot_meta["images_measured"].value == 4
        assert phot_meta["median_rms_mjy"].value == pytest.approx(0.5, rel=0.3)
        cand_meta = mats["ese_candidates"].materialization.metadata
        assert cand_meta["open_candidates"].value >= 1
        assert "top_candidates" in cand_meta
        checks = result.get_asset_check_evaluations()
        assert checks and all(c.passed for c in checks)
    truth = pd.read_csv(small_survey / "truth_sources.csv")
    ese_names = set(truth.loc[truth["kind"] == "ese", "name"])
    flagged = set(candidates_db.candidates(make_engine(settings.products_db))["source_id"])
    assert ese_names <= flagged
    stable = set(truth.loc[truth["kind"] == "stable", "name"])
    assert len(flagged & stable) <= 1


def test_ranged_backfill_run_processes_every_night(tmp_path, small_survey):
    settings = make_workspace(tmp_path, small_survey)
    job = build_definitions(settings, bind_env=False).resolve_job_def("ese_pipeline")
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            instance=instance,
            tags={
                "dagster/asset_partition_range_start": NIGHTS[0],
                "dagster/asset_partition_range_end": NIGHTS[-1],
            },
        )
        assert result.success
        mats = [
            m
            for m in result.get_asset_materialization_events()
            if m.asset_key.to_user_string() == "photometry"
        ]
        assert sorted(m.partition for m in mats) == list(NIGHTS)
    engine = make_engine(settings.products_db)
    assert images_db.image_counts_by_status(engine)["measured"] == 12
    stats = statistics_db.variability_stats(engine)
    assert stats["n_obs"].max() == 12


def test_nightly_schedule_runs_the_night_that_just_ended(tmp_path, small_survey):
    settings = make_workspace(tmp_path, small_survey, copy_images=False)
    defs = build_definitions(settings, bind_env=False)
    schedule = defs.resolve_schedule_def("nightly_reconciliation")
    with dg.instance_for_test() as instance:
        ctx = dg.build_schedule_context(
            instance=instance,
            repository_def=defs.get_repository_def(),
            scheduled_execution_time=dt.datetime(2025, 1, 3, 12, 0, tzinfo=dt.UTC),
        )
        data = schedule.evaluate_tick(ctx)
        assert [r.partition_key for r in data.run_requests] == ["2025-01-02"]
        # No image list: the run measures every usable image of the night.
        assert not data.run_requests[0].run_config
        before = schedule.evaluate_tick(
            dg.build_schedule_context(
                instance=instance,
                repository_def=defs.get_repository_def(),
                scheduled_execution_time=dt.datetime(2020, 1, 1, 12, 0, tzinfo=dt.UTC),
            )
        )
        assert not before.run_requests and "precedes the first partition" in before.skip_message


KILLABLE_RUN = textwrap.dedent("""
    import dataclasses, json, sys, time
    import dagster as dg
    from ese_assets.definitions import build_definitions
    from ese_assets.pipeline import measurement
    from ese_assets.settings import Settings

    # Every image is written by record_measurement in the run's process, whatever the number of
    # photometry workers: slow it down enough for the parent to kill us half-way.
    record = measurement.record_measurement
    def slow_record(*args, **kwargs):
        result = record(*args, **kwargs)
        time.sleep(1.0)
        return result
    measurement.record_measurement = slow_record

    settings = dataclasses.replace(Settings.from_env(), **json.loads(sys.argv[1]))
    job = build_definitions(settings, bind_env=False).resolve_job_def("ese_pipeline")
    with dg.instance_for_test() as instance:
        job.execute_in_process(partition_key=sys.argv[2], instance=instance)
""")


def test_killed_run_then_rerun_equals_one_clean_run(tmp_path, small_survey):
    for name in ("clean", "killed"):
        (tmp_path / name).mkdir()
    clean = make_workspace(tmp_path / "clean", small_survey)
    killed = make_workspace(tmp_path / "killed", small_survey)
    night = NIGHTS[1]
    with dg.instance_for_test() as instance:
        for n in NIGHTS[:1]:
            run_night(clean, n, instance)
            run_night(killed, n, instance)
        run_night(clean, night, instance)

    engine = make_engine(killed.products_db)
    overrides = {
        "products_db": killed.products_db,
        "catalog_path": killed.catalog_path,
        "incoming_dir": killed.incoming_dir,
        "data_dir": killed.data_dir,
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_RUN, json.dumps(overrides), night], start_new_session=True
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            counts = images_db.image_counts_by_status(engine)
            if counts.get("measured", 0) >= 5:  # night 1 (4) + at least one of night 2
                break
            assert proc.poll() is None, "the run finished before it could be killed"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    half = images_db.image_counts_by_status(engine)
    assert 5 <= half["measured"] < 8, half  # killed half-way through the night

    with dg.instance_for_test() as instance:
        run_night(killed, night, instance)
    assert_same_tables(
        relocate_paths(snapshot(make_engine(clean.products_db)), str(tmp_path / "clean"), "WS"),
        relocate_paths(snapshot(engine), str(tmp_path / "killed"), "WS"),
    )


def test_postgresql_gives_the_same_tables_as_sqlite(tmp_path, small_survey, postgres_url):
    for name in ("sqlite", "pg"):
        (tmp_path / name).mkdir()
    lite = make_workspace(tmp_path / "sqlite", small_survey)
    pg = make_workspace(tmp_path / "pg", small_survey, products_db=postgres_url)
    with dg.instance_for_test() as instance:
        for night in NIGHTS:
            run_night(lite, night, instance)
            run_night(pg, night, instance)
        pg_engine = make_engine(postgres_url)
        first = snapshot(pg_engine)
        run_night(pg, NIGHTS[1], instance)  # idempotent on PostgreSQL too
        assert_same_tables(first, snapshot(pg_engine))
    assert len(first["ese_candidates"]) >= 1
    assert_same_tables(
        relocate_paths(snapshot(make_engine(lite.products_db)), str(tmp_path / "sqlite"), "WS"),
        relocate_paths(first, str(tmp_path / "pg"), "WS"),
    )


def test_a_rejected_file_is_examined_again_once_it_changes(tmp_path, small_survey):
    settings = make_workspace(tmp_path, small_survey, copy_images=False)
    src = sorted((small_survey / "incoming").glob("*.fits"))[0]
    dst = Path(settings.incoming_dir) / src.name
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 3])  # a transfer that stalled past the settle time
    engine = make_engine(settings.products_db)
    ensure_schema(engine)
    from ese_assets import pipeline

    def scan():
        return pipeline.scan_directory(
            engine, settings.incoming_dir, timezone="UTC", first_night="2020-01-01"
        )

    assert len(scan().rejected) == 1
    assert scan().already_known == 1  # unchanged: stays rejected, not re-read every tick
    dst.write_bytes(data)  # the transfer completed
    again = scan()
    assert again.registered == [str(dst)] and not again.rejected
    assert images_db.image_counts_by_status(engine)["rejected"] == 0


def test_a_backlog_is_registered_over_several_limited_passes(tmp_path, small_survey):
    settings = make_workspace(tmp_path, small_survey)
    engine = make_engine(settings.products_db)
    ensure_schema(engine)
    from ese_assets import pipeline

    def scan():
        return pipeline.scan_directory(
            engine, settings.incoming_dir, timezone="UTC", first_night="2020-01-01", limit=5
        )

    first, second, third = scan(), scan(), scan()
    assert (len(first.registered), first.deferred) == (5, 7)
    assert (len(second.registered), second.deferred) == (5, 2)
    assert (len(third.registered), third.deferred) == (2, 0)
    assert images_db.image_counts_by_status(engine)["pending"] == 12
