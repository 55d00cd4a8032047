"""The CLI and the Python API against a products database filled by real Dagster runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from ese_assets import cli
from ese_assets.api import Source, detect_ese_candidates
from ese_assets.storage import candidates as candidates_db
from ese_assets.storage import images as images_db
from ese_assets.storage.engine import make_engine
from ese_assets_tests.survey import NIGHTS, make_workspace
from ese_assets_tests.test_orchestration import run_night

SEED_FIELDS = {
    "source_id",
    "ra_deg",
    "dec_deg",
    "significance",
    "nvss_flux_mjy",
    "mean_flux_mjy",
    "std_flux_mjy",
    "chi2_nu",
    "n_obs",
    "last_mjd",
    "flag_type",
}


@pytest.fixture
def processed(tmp_path, small_survey):
    settings = make_workspace(tmp_path, small_survey)
    with dg.instance_for_test() as instance:
        for night in NIGHTS:
            run_night(settings, night, instance)
    truth = pd.read_csv(small_survey / "truth_sources.csv")
    return settings, truth


def test_detect_prints_the_seed_json(processed, capsys):
    settings, truth = processed
    assert (
        cli.main(
            [
                "detect",
                "--preset",
                "sensitive",
                "--recompute",
                "--products-db",
                settings.products_db,
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert {
        "products_db",
        "preset",
        "min_sigma",
        "source_id",
        "recompute",
        "candidates_found",
        "candidates",
    } <= set(out)
    assert out["min_sigma"] == 3.0 and out["candidates_found"] == len(out["candidates"]) >= 1
    assert set(out["candidates"][0]) >= SEED_FIELDS
    ese = truth.loc[truth["kind"] == "ese", "name"].iloc[0]
    assert ese in {c["source_id"] for c in out["candidates"]}


def test_detect_is_idempotent_and_dismissal_sticks(processed):
    settings, truth = processed
    ese = truth.loc[truth["kind"] == "ese", "name"].iloc[0]
    first = detect_ese_candidates(settings.products_db, preset="conservative")
    engine = make_engine(settings.products_db)
    n_rows = len(candidates_db.candidates(engine))
    Source(ese, settings.products_db).mark("dismissed", notes="instrumental")
    again = detect_ese_candidates(settings.products_db, preset="conservative")
    assert [c["source_id"] for c in again] == [c["source_id"] for c in first]
    rows = candidates_db.candidates(engine)
    assert len(rows) == n_rows  # no new row for the dismissed source
    assert rows.set_index("source_id").loc[ese, "status"] == "dismissed"


def test_export_and_candidates_commands(processed, tmp_path, capsys):
    settings, truth = processed
    ese = truth.loc[truth["kind"] == "ese", "name"].iloc[0]
    out_csv = tmp_path / "lc.csv"
    assert (
        cli.main(
            [
                "export",
                "--source-id",
                ese,
                "--format",
                "csv",
                "--output",
                str(out_csv),
                "--products-db",
                settings.products_db,
            ]
        )
        == 0
    )
    lc = pd.read_csv(out_csv)
    assert len(lc) == 12 and lc["mjd"].is_monotonic_increasing
    assert (
        cli.main(
            [
                "export",
                "--source-id",
                ese,
                "--format",
                "json",
                "--products-db",
                settings.products_db,
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli.main(["candidates", "--format", "json", "--products-db", settings.products_db]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert ese in {c["source_id"] for c in listed}
    assert (
        cli.main(["export", "--source-id", "J000000+000000", "--products-db", settings.products_db])
        == 1
    )


def test_ingest_records_runs_in_the_persistent_instance(tmp_path, small_survey, monkeypatch):
    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    settings = make_workspace(tmp_path, small_survey)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ese_assets.cli",
            "ingest",
            settings.incoming_dir,
            "--catalog",
            settings.catalog_path,
            "--products-db",
            settings.products_db,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DAGSTER_HOME": str(home)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "night 2025-01-03" in proc.stdout and "3 runs, 0 failed" in proc.stdout
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert len(runs) == 3 and all(r.is_success for r in runs)
        assert {r.tags["dagster/partition"] for r in runs} == set(NIGHTS)
    assert images_db.image_counts_by_status(make_engine(settings.products_db))["measured"] == 12


def test_definitions_validate_command(tmp_path):
    dagster = Path(sys.executable).with_name("dagster")
    proc = subprocess.run(
        [str(dagster), "definitions", "validate", "-m", "ese_assets.definitions"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "DAGSTER_HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
