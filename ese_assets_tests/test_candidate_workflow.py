"""The candidate workflow with history: every status change recorded in ``ese_candidate_history``
in the transaction of the change, candidates that no longer qualify expire, dry runs write
nothing, detection runs can be undone (SQLite and PostgreSQL); the ``ese candidates`` commands
on a database filled by real Dagster runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from ese_assets import cli, pipeline
from ese_assets.core.candidates import CANDIDATE_STATUSES, plan_detection, plan_undo
from ese_assets.core.detection import DetectionSettings
from ese_assets.pipeline.candidates import undo_detection
from ese_assets.storage import candidate_history as history_db
from ese_assets.storage import candidates as candidates_db
from ese_assets.storage import statistics as statistics_db
from ese_assets.storage.engine import dispose_engine, ensure_schema, make_engine
from ese_assets.storage.schema import ese_candidates, metadata
from ese_assets_tests import snapshots
from ese_assets_tests.survey import NIGHTS, make_workspace
from ese_assets_tests.test_orchestration import run_night

#: The seed's presets (their sigma_deviation rule on): sigma_deviation >= 5, |dip| >= 6, n_obs >= 10
CONSERVATIVE = DetectionSettings.from_preset("conservative")
SENSITIVE = DetectionSettings.from_preset("sensitive", min_dip_sigma=3.0)
#: The seed guide's queries (section 6) that involve candidates.
SEED_ACTIVE_SQL = "SELECT * FROM ese_candidates WHERE status = 'active'"
SEED_JOIN_SQL = """
SELECT e.source_id, e.significance, v.chi2_nu, v.eta_metric, v.n_obs
FROM ese_candidates e
JOIN variability_stats v ON e.source_id = v.source_id
WHERE e.status = 'active'
ORDER BY e.significance DESC
"""


def _set_stats(engine, rows: dict[str, tuple[int, float, float]]) -> None:
    """variability_stats rows ``{source_id: (n_obs, sigma_deviation, dip_significance)}``."""
    ids = sorted(rows)
    statistics_db.upsert_variability_stats(
        engine,
        pd.DataFrame(
            {
                "source_id": ids,
                "ra_deg": 150.0,
                "dec_deg": 30.0,
                "n_obs": [rows[i][0] for i in ids],
                "sigma_deviation": [rows[i][1] for i in ids],
                "dip_significance": [rows[i][2] for i in ids],
                "chi2_nu": 2.0,
                "eta_metric": 2.0,
            }
        ),
    )


def _history(engine) -> pd.DataFrame:
    return history_db.candidate_history(engine)


def _state(engine) -> dict[str, pd.DataFrame]:
    """Every column of the candidate tables (nothing left out): for 'nothing changed' checks."""
    return {
        t: snapshots.table_snapshot(engine, t, exclude=())
        for t in ("ese_candidates", "ese_candidate_history", "variability_stats")
    }


def _assert_same(a: dict, b: dict) -> None:
    for table in a:
        pd.testing.assert_frame_equal(a[table], b[table], check_exact=True, obj=table)


# ------------------------------------------------------------------------------- pure planning


def test_plan_expires_reopens_and_notes_why():
    existing = pd.DataFrame(
        {
            "id": [1, 2, 3, 4],
            "source_id": ["A", "B", "C", "D"],
            "status": ["active", "investigated", "expired", "active"],
            "significance": [7.0, 8.0, 6.5, 9.0],
            "flag_type": ["dip", "dip", "dip", "dip"],
            "last_night": ["2025-01-02"] * 4,
        }
    )
    examined = pd.DataFrame(
        {
            "source_id": ["A", "B", "C"],
            "n_obs": [30, 30, 30],
            "sigma_deviation": [2.0, 2.5, 5.5],
            "dip_significance": [-4.2, -3.0, -7.5],
        }
    )
    flagged = pd.DataFrame(
        {
            "source_id": ["C"],
            "significance": [7.5],
            "flag_type": ["sigma_deviation+dip"],
            "sigma_deviation": [5.5],
            "dip_significance": [-7.5],
        }
    )
    plan = plan_detection(
        flagged, existing, night="2025-01-05", now=1.0, examined=examined, settings=CONSERVATIVE
    )
    assert plan.inserts == []
    by_id = {u["id"]: u for u in plan.updates}
    assert by_id[1] == {"id": 1, "status": "expired"}  # A: no longer qualifies
    assert 2 not in by_id  # B: a person's investigated candidate does not expire
    assert by_id[3]["status"] == "active" and by_id[3]["significance"] == 7.5  # C: again
    assert 4 not in by_id  # D: not examined this run
    changes = {c.candidate_id: c for c in plan.changes}
    assert (changes[1].old_status, changes[1].new_status) == ("active", "expired")
    assert "sigma_deviation 2.00 < 5" in changes[1].note
    assert "|dip_significance| 4.20 < 6" in changes[1].note
    assert changes[1].previous["status"] == "active" and changes[1].previous["significance"] == 7.0
    assert (changes[3].old_status, changes[3].new_status) == ("expired", "active")
    assert changes[3].previous["flag_type"] == "dip"
    # Applied, planning again changes nothing: no history entries, same values.
    applied = existing.set_index("id")
    for u in plan.updates:
        for k, v in u.items():
            if k != "id":
                applied.loc[u["id"], k] = v
    again = plan_detection(
        flagged,
        applied.reset_index(),
        night="2025-01-05",
        now=2.0,
        examined=examined,
        settings=CONSERVATIVE,
    )
    assert again.changes == [] and [u["id"] for u in again.updates] == [3]


def test_plan_undo_skips_what_changed_since():
    def entry(i, run, old, new, undoes=None, previous=None, by="auto"):
        return {
            "id": i,
            "candidate_id": 7,
            "source_id": "S",
            "run_id": run,
            "undoes": undoes,
            "old_status": old,
            "new_status": new,
            "previous": previous,
            "changed_by": by,
            "changed_at": 0.0,
        }

    created = entry(1, "r1", None, "active")
    expired = entry(2, "r2", "active", "expired", previous={"status": "active"})
    [a] = plan_undo("r1", {7: [created, expired]})
    assert a.kind == "skip" and "run r2" in a.note  # undo r2 first
    [a] = plan_undo("r2", {7: [created, expired]})
    assert a.kind == "restore" and a.values == {"status": "active"}
    undone = entry(3, "u2", "expired", "active", undoes="r2", previous={"status": "expired"})
    [a] = plan_undo("r1", {7: [created, expired, undone]})
    assert a.kind == "remove"  # r2 and its undo cancel out
    [a] = plan_undo("r2", {7: [created, expired, undone]})
    assert a.kind == "skip" and a.note == "already undone"
    [a] = plan_undo("u2", {7: [created, expired, undone]})
    assert a.kind == "restore" and a.values == {"status": "expired"}  # undo of the undo
    person = entry(3, None, "active", "dismissed", by="ann")
    [a] = plan_undo("r1", {7: [created, person]})
    assert a.kind == "skip" and "ann" in a.note


# ------------------------------------------------------------------------- on both databases


def test_every_status_change_has_its_history_entry(engine):
    _set_stats(engine, {"A": (30, 2.0, -8.0), "B": (30, 6.0, -2.0), "C": (5, 9.0, -9.0)})
    first = pipeline.detect_candidates(engine, CONSERVATIVE, night=NIGHTS[0], run_id="r1")
    assert first.inserted == 2 and first.run_id == "r1"  # C has too few epochs
    h = _history(engine)
    assert h["source_id"].tolist() == ["A", "B"]
    assert h["old_status"].isna().all() and (h["new_status"] == "active").all()
    assert (h["run_id"] == "r1").all() and (h["changed_by"] == "auto").all()
    assert "flagged: dip, significance 8.00" in h["note"].iloc[0]

    candidates_db.set_candidate_status(engine, "A", "investigated", notes="looks real", by="ann")
    candidates_db.set_candidate_status(engine, "B", "dismissed", notes="RFI", by="bob")
    candidates_db.reopen_candidate(engine, "B", notes="not RFI after all", by="cy")
    h = _history(engine).iloc[2:]
    assert list(zip(h["old_status"], h["new_status"], h["changed_by"], h["note"], strict=True)) == [
        ("active", "investigated", "ann", "looks real"),
        ("active", "dismissed", "bob", "RFI"),
        ("dismissed", "active", "cy", "not RFI after all"),
    ]
    assert h["run_id"].isna().all() and (h["changed_at"] > 1e9).all()

    # B no longer qualifies: it expires (A is investigated: a person's, left alone).
    _set_stats(engine, {"A": (31, 2.0, -3.0), "B": (31, 2.0, -1.0)})
    second = pipeline.detect_candidates(engine, CONSERVATIVE, night=NIGHTS[1], run_id="r2")
    assert second.expired == 1
    rows = candidates_db.candidates(engine).set_index("source_id")
    assert rows.loc["B", "status"] == "expired" and rows.loc["B", "significance"] == 6.0
    assert rows.loc["A", "status"] == "investigated"
    last = _history(engine).iloc[-1]
    assert (last["old_status"], last["new_status"], last["run_id"]) == ("active", "expired", "r2")
    assert "no longer qualifies: sigma_deviation 2.00 < 5" in last["note"]
    assert json.loads(last["previous"])["status"] == "active"

    # Qualifies again: the same row is active again (no second candidate for B).
    _set_stats(engine, {"B": (32, 7.0, -1.0)})
    third = pipeline.detect_candidates(engine, CONSERVATIVE, night=NIGHTS[2], run_id="r3")
    assert third.reopened == 1 and third.inserted == 0
    b = candidates_db.candidates(engine, source_ids=["B"])
    assert len(b) == 1 and b["status"].iloc[0] == "active" and b["significance"].iloc[0] == 7.0
    assert b["last_night"].iloc[0] == NIGHTS[2]
    assert (
        _history(engine).iloc[-1]["note"].startswith("qualifies again: outlier, significance 7.00")
    )
    assert candidates_db.candidate_problems(engine) == []


def test_expired_candidates_are_not_in_the_seed_queries(engine):
    _set_stats(engine, {"A": (30, 2.0, -8.0), "B": (30, 2.0, -9.0)})
    pipeline.detect_candidates(engine, CONSERVATIVE, run_id="r1")
    _set_stats(engine, {"A": (31, 2.0, -2.0)})
    pipeline.detect_candidates(engine, CONSERVATIVE, run_id="r2")
    with engine.connect() as conn:
        active = conn.execute(sa.text(SEED_ACTIVE_SQL)).mappings().all()
        joined = conn.execute(sa.text(SEED_JOIN_SQL)).all()
    assert [r["source_id"] for r in active] == ["B"]
    assert [tuple(r) for r in joined] == [("B", 9.0, 2.0, 2.0, 30)]
    assert candidates_db.candidates(engine, status="expired")["source_id"].tolist() == ["A"]


def test_dry_run_writes_nothing(engine):
    _set_stats(engine, {"A": (30, 2.0, -8.0), "B": (30, 6.0, -2.0), "C": (30, 1.0, 4.0)})
    pipeline.detect_candidates(engine, CONSERVATIVE, run_id="r1")
    _set_stats(engine, {"A": (31, 2.0, -2.0), "C": (31, 1.0, 7.0)})
    before = _state(engine)
    dry = pipeline.detect_candidates(engine, CONSERVATIVE, run_id="dry", dry_run=True)
    _assert_same(before, _state(engine))
    assert dry.dry_run and dry.inserted == 1 and dry.expired == 1  # C new, A expired
    assert {(c.source_id, c.old_status, c.new_status) for c in dry.changes} == {
        ("C", None, "active"),
        ("A", "active", "expired"),
    }
    real = pipeline.detect_candidates(engine, CONSERVATIVE, run_id="r2")
    assert sorted((c.source_id, c.new_status) for c in real.changes) == sorted(
        (c.source_id, c.new_status) for c in dry.changes
    )


def test_undo_restores_the_tables_exactly(engine):
    ids = [f"S{i:02d}" for i in range(12)]
    rng = np.random.default_rng(3)
    _set_stats(engine, {s: (40, float(rng.uniform(3.2, 4.5)), -2.0) for s in ids[:10]})
    _set_stats(engine, {"E1": (40, 2.0, -9.0), "E2": (40, 2.5, -8.0)})
    pipeline.detect_candidates(engine, CONSERVATIVE, night=NIGHTS[0], run_id="nightly")
    candidates_db.set_candidate_status(engine, "E2", "investigated", by="ann")
    clean = _state(engine)

    noisy = pipeline.detect_candidates(engine, SENSITIVE, run_id="sensitive")
    assert noisy.inserted == 10  # the 'noise' candidates of a low threshold
    again = pipeline.detect_candidates(engine, CONSERVATIVE, run_id="conservative")
    assert again.expired == 10
    id_before = clean["ese_candidates"]["id"].max()

    _, actions = undo_detection(engine, "conservative", by="ann")
    assert {a.kind for a in actions} == {"restore"}
    _, actions = undo_detection(engine, "sensitive", by="ann")
    assert [a.kind for a in actions] == ["remove"] * 10
    after = _state(engine)
    pd.testing.assert_frame_equal(after["ese_candidates"], clean["ese_candidates"])
    assert after["ese_candidates"]["id"].max() == id_before

    # Undoing again does nothing; undoing the undo brings the noise back, same ids.
    _, actions = undo_detection(engine, "sensitive")
    assert {a.kind for a in actions} == {"skip"}
    runs = history_db.detection_runs(engine)
    undo_of_sensitive = runs.loc[runs["undoes"] == "sensitive", "run_id"].item()
    redo, actions = undo_detection(engine, undo_of_sensitive)
    assert [a.kind for a in actions] == ["recreate"] * 10
    back = candidates_db.candidates(engine, status="active")
    assert sorted(back["source_id"]) == sorted([*ids[:10], "E1"])
    assert set(back["id"]) >= {int(a.candidate_id) for a in actions}

    # A person's decision after a run is never overwritten by its undo.
    candidates_db.set_candidate_status(engine, "S00", "dismissed", notes="noise", by="bob")
    _, actions = undo_detection(engine, redo)
    kept = [a for a in actions if a.kind == "skip"]
    assert [a.source_id for a in kept] == ["S00"] and "bob" in kept[0].note
    assert sum(a.kind == "remove" for a in actions) == 9
    assert candidates_db.candidates(engine, source_ids=["S00"])["status"].item() == "dismissed"
    with pytest.raises(ValueError, match="no candidate changes recorded for run 'nope'"):
        undo_detection(engine, "nope")


def test_person_change_between_plan_and_write_is_kept(engine):
    _set_stats(engine, {"A": (30, 2.0, -8.0)})
    pipeline.detect_candidates(engine, CONSERVATIVE, run_id="r1")
    _set_stats(engine, {"A": (31, 2.0, -2.0)})
    existing = candidates_db.existing_candidates(engine, ["A"])
    stats = statistics_db.variability_stats(engine)
    plan = plan_detection(None, existing, night=None, now=1.0, examined=stats)
    assert [c.new_status for c in plan.changes] == ["expired"]
    candidates_db.set_candidate_status(engine, "A", "investigated", by="ann")  # meanwhile
    with candidates_db.candidates_writing(engine) as conn:
        applied = candidates_db.apply_plan(conn, plan, run_id="r2")
    assert applied.skipped == [int(existing["id"].item())] and applied.changes == []
    assert candidates_db.candidates(engine)["status"].item() == "investigated"
    history = _history(engine)
    assert history["run_id"].iloc[0] == "r1" and pd.isna(history["run_id"].iloc[1])
    assert history["new_status"].tolist() == ["active", "investigated"]


def test_a_database_made_before_expired_existed_is_upgraded(db_url):
    """The status CHECK constraint of an older ese_candidates table did not allow 'expired'."""
    old_meta = sa.MetaData()
    for table in metadata.sorted_tables:
        if table.name != "ese_candidate_history":
            table.to_metadata(old_meta)
    check = next(
        c
        for c in old_meta.tables["ese_candidates"].constraints
        if c.name == "ck_ese_candidates_status"
    )
    check.sqltext = sa.column("status").in_(["active", "investigated", "dismissed"])
    raw = sa.create_engine(make_engine(db_url).url)
    old_meta.create_all(raw)
    raw.dispose()
    dispose_engine(db_url)
    engine = make_engine(db_url)
    ensure_schema(engine)  # adds the history table, not the status
    _set_stats(engine, {"A": (30, 2.0, -8.0), "B": (30, 2.0, -9.0)})
    with engine.begin() as conn:  # rows written by the older version
        conn.execute(
            sa.text(
                "INSERT INTO ese_candidates (source_id, flagged_at, flagged_by, significance, "
                "flag_type, status, notes) VALUES "
                "('A', 1.0, 'auto', 8.0, 'dip', 'active', 'old row'), "
                "('B', 1.0, 'auto', 9.0, 'dip', 'dismissed', NULL)"
            )
        )
    _set_stats(engine, {"A": (31, 2.0, -2.0)})
    summary = pipeline.detect_candidates(engine, CONSERVATIVE, run_id="r1")
    assert summary.expired == 1
    rows = candidates_db.candidates(engine, status=list(CANDIDATE_STATUSES)).set_index("source_id")
    assert rows.loc["A", "status"] == "expired" and rows.loc["A", "notes"] == "old row"
    # New databases of this process still get the constraint in their CREATE TABLE.
    ddl = str(sa.schema.CreateTable(ese_candidates).compile(dialect=engine.dialect))
    assert "ck_ese_candidates_status" in ddl and "'expired'" in ddl
    assert rows.loc["B", "status"] == "dismissed"
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(sa.text("UPDATE ese_candidates SET status = 'bogus'"))
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:  # index rebuilt too
        conn.execute(
            sa.text(
                "INSERT INTO ese_candidates (source_id, flagged_at, significance, flag_type, "
                "status) VALUES ('B', 2.0, 9.0, 'dip', 'active'), ('B', 2.0, 9.0, 'dip', 'active')"
            )
        )


# ------------------------------------------------------------- the CLI on real pipeline runs


@pytest.fixture
def processed(tmp_path, small_survey):
    settings = make_workspace(tmp_path, small_survey)
    with dg.instance_for_test() as instance:
        for night in NIGHTS:
            result = run_night(settings, night, instance)
        run_id = result.run_id
    truth = pd.read_csv(small_survey / "truth_sources.csv")
    return settings, truth, run_id


def _ese(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_candidates_commands(processed, capsys):
    settings, truth, _ = processed
    db = ["--products-db", settings.products_db]
    ese = truth.loc[truth["kind"] == "ese", "name"].iloc[0]

    code, out, _ = _ese(["candidates", "--format", "json", *db], capsys)  # the old form
    assert code == 0 and ese in {c["source_id"] for c in json.loads(out)}
    code, out, _ = _ese(["candidates", "list", "--flag-type", "dip", *db], capsys)
    assert code == 0 and ese in out and "status" in out.splitlines()[0]

    code, out, _ = _ese(
        ["candidates", "investigate", ese, "--note", "deep dip", "--by", "ann", *db], capsys
    )
    assert code == 0 and "investigated (by ann)" in out
    code, out, _ = _ese(
        ["mark", ese, "dismissed", "--notes", "scintillation", "--by", "bob", *db], capsys
    )
    assert code == 0
    code, out, _ = _ese(["candidates", "list", *db], capsys)
    assert ese not in out  # dismissed is not open
    code, out, _ = _ese(["candidates", "reopen", ese, "--by", "cy", *db], capsys)
    assert code == 0 and "active (by cy)" in out

    code, out, _ = _ese(["candidates", "show", ese, *db], capsys)
    assert code == 0
    assert f"source {ese}" in out and "statistics:" in out and "dip_significance" in out
    lines = out[out.index("history:") :].splitlines()[1:]
    assert [line.split("  ")[3] for line in lines] == [
        "(new) -> active",
        "active -> investigated",
        "investigated -> dismissed",
        "dismissed -> active",
    ]
    assert "by ann: deep dip" in lines[1] and "by bob: scintillation" in lines[2]
    code, out, _ = _ese(["candidates", "show", ese, "--format", "json", *db], capsys)
    shown = json.loads(out)
    assert [h["changed_by"] for h in shown["history"]][1:] == ["ann", "bob", "cy"]
    assert shown["statistics"]["n_obs"] == 12 and shown["candidates"][0]["status"] == "active"

    code, _, err = _ese(["candidates", "dismiss", "J000000+000000", *db], capsys)
    assert code == 2 and "no open" in err and len(err.strip().splitlines()) == 1


def test_detect_dry_run_and_undo_through_the_cli(processed, capsys):
    settings, _, _ = processed
    db = ["--products-db", settings.products_db]
    engine = make_engine(settings.products_db)
    # The pipeline's own detection recorded its Dagster run id... or a generated one.
    assert len(history_db.detection_runs(engine)) >= 1
    before = _state(engine)
    noisy = ["detect", "--preset", "sensitive", "--min-dip-sigma", "2.5", "--min-obs", "5", *db]

    code, out, err = _ese([*noisy, "--dry-run"], capsys)
    assert code == 0 and "dry run" in err and "nothing written" in err
    report = json.loads(out)
    assert report["dry_run"] is True and report["candidates_found"] > 1
    created = [c for c in report["changes"] if c["old_status"] is None]
    assert len(created) >= 1 and all(c["new_status"] == "active" for c in created)
    _assert_same(before, _state(engine))

    code, out, err = _ese(noisy, capsys)
    report = json.loads(out)
    run_id = report["run_id"]
    assert code == 0 and run_id.startswith("cli-") and f"ese candidates undo {run_id}" in err
    assert len(candidates_db.candidates(engine)) == len(before["ese_candidates"]) + len(created)

    code, out, _ = _ese(["candidates", "runs", "--format", "json", *db], capsys)
    assert json.loads(out)[0]["run_id"] == run_id
    code, out, _ = _ese(["candidates", "undo", run_id, "--dry-run", *db], capsys)
    assert code == 0 and out.count("would remove") == len(created)
    code, out, _ = _ese(["candidates", "undo", run_id, *db], capsys)
    assert code == 0 and f"undo of run {run_id}: {len(created)} candidates changed" in out
    after = _state(engine)
    pd.testing.assert_frame_equal(after["ese_candidates"], before["ese_candidates"])
    code, out, _ = _ese(["candidates", "undo", run_id, *db], capsys)
    assert code == 0 and f"nothing to undo for run {run_id}" in out


def test_ese_candidates_as_a_subprocess(processed):
    settings, _, _ = processed
    ese_bin = Path(sys.executable).with_name("ese")
    env = {**os.environ, "PIPELINE_PRODUCTS_DB": settings.products_db}
    proc = subprocess.run(
        [str(ese_bin), "candidates", "list", "--status", "all", "--format", "csv"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    listed = pd.read_csv(pd.io.common.StringIO(proc.stdout))
    assert len(listed) >= 1 and set(listed["status"]) <= set(CANDIDATE_STATUSES)
