"""Recovery bookkeeping on real databases: which unfinished images are requested, when, and how
transient database errors are recognised (the fault matrix runs the same rules end to end)."""

from __future__ import annotations

import sqlite3
import threading

import pytest
import sqlalchemy as sa

from ese_assets.pipeline.recovery import future_night_reason, plan_runs, retry_delay
from ese_assets.settings import Settings
from ese_assets.storage import images as images_db
from ese_assets.storage.engine import dispose_engine, ensure_schema, make_engine
from ese_assets.storage.errors import DatabaseUnavailable
from ese_assets.storage.schema import images

NOW = 1_800_000_000.0
DELAY_S = 10.0


def _register(engine, names_nights: list[tuple[str, str]]) -> None:
    images_db.register_images(
        engine,
        [
            {"path": f"/in/{name}.fits", "night": night, "mjd": 60000.0 + i, "status": "pending"}
            for i, (name, night) in enumerate(names_nights)
        ],
    )


def _plan(engine, *, now=NOW, tokens=(), nights=(), launched=None, patient=True, **kwargs):
    return plan_runs(
        engine,
        last_night="2025-01-03",
        in_flight_tokens=set(tokens),
        in_flight_nights=nights,
        tokens_with_runs=lambda wanted: set(wanted) & set(launched or ()),
        retry_delay_s=DELAY_S,
        max_attempts=3,
        patient=patient,
        now=now,
        **kwargs,
    )


def _row(engine, name: str) -> dict:
    with engine.connect() as conn:
        return dict(
            conn.execute(sa.select(images).where(images.c.path == f"/in/{name}.fits"))
            .mappings()
            .one()
        )


def test_pending_images_are_batched_per_night_and_claimed_once(engine):
    _register(engine, [("a", "2025-01-01"), ("b", "2025-01-01"), ("c", "2025-01-02")])
    plan = _plan(engine, max_images_per_run=1)
    assert [(b.night, b.paths) for b in plan.batches] == [
        ("2025-01-01", ("/in/a.fits",)),
        ("2025-01-01", ("/in/b.fits",)),
        ("2025-01-02", ("/in/c.fits",)),
    ]
    assert plan.new == 3 and len({b.token for b in plan.batches}) == 3
    row = _row(engine, "a")
    assert (row["status"], row["batch_token"], row["attempts"]) == (
        "queued",
        plan.batches[0].token,
        1,
    )
    assert row["next_attempt_at"] == NOW + DELAY_S
    # The same tick again (runs now in flight): nothing is requested twice.
    again = _plan(engine, tokens=[b.token for b in plan.batches])
    assert not again.batches and again.in_flight == 3


def test_a_batch_whose_run_is_gone_is_requested_again_after_its_backoff(engine):
    _register(engine, [("a", "2025-01-01")])
    first = _plan(engine).batches[0]
    # The run failed (it exists, not in flight): wait for the backoff, then request again.
    early = _plan(engine, now=NOW + DELAY_S / 2, launched=[first.token])
    assert not early.batches and early.backing_off == 1
    later = _plan(engine, now=NOW + DELAY_S, launched=[first.token])
    assert later.resumed == 1 and later.batches[0].token != first.token
    assert _row(engine, "a")["attempts"] == 2
    assert _row(engine, "a")["next_attempt_at"] == NOW + DELAY_S + retry_delay(2, DELAY_S)


def test_a_batch_never_launched_waits_for_the_grace_period(engine):
    _register(engine, [("a", "2025-01-01")])
    _plan(engine)
    assert not _plan(engine, now=NOW + 30, grace_s=120).batches  # its run may be on its way
    assert _plan(engine, now=NOW + 121, grace_s=120).resumed == 1


def test_the_sensor_gives_up_after_max_attempts_but_ingest_does_not(engine):
    _register(engine, [("a", "2025-01-01")])
    now = NOW
    tokens = []
    for _ in range(3):
        plan = _plan(engine, now=now, launched=tokens)
        assert len(plan.batches) == 1
        tokens.append(plan.batches[0].token)
        now += 10_000
    final = _plan(engine, now=now, launched=tokens)
    assert final.gave_up == ["/in/a.fits"] and not final.batches
    row = _row(engine, "a")
    assert row["status"] == "failed" and "requested 3 times" in row["reason"]
    assert not _plan(engine, now=now + 10_000, launched=tokens).batches  # stays given up
    impatient = _plan(engine, now=now, launched=tokens, patient=False)
    assert impatient.retried == 1  # a person running `ese ingest` retries it


def test_failed_images_are_retried_after_their_backoff(engine):
    _register(engine, [("a", "2025-01-01")])
    _plan(engine)
    images_db.mark_image_failed(engine, "/in/a.fits", "cannot read file (Input/output error)")
    assert _plan(engine, now=NOW + 1).backing_off == 1
    retry = _plan(engine, now=NOW + DELAY_S)
    assert retry.retried == 1 and _row(engine, "a")["reason"].startswith("cannot read file")


def test_images_of_a_night_that_does_not_exist_yet_wait_with_a_reason(engine):
    _register(engine, [("future", "2099-01-01"), ("now", "2025-01-02")])
    plan = _plan(engine)
    assert plan.future == ["/in/future.fits"] and plan.new == 1
    row = _row(engine, "future")
    assert row["status"] == "pending"
    assert row["reason"] == future_night_reason("2099-01-01", "2025-01-03")


def test_nights_being_processed_in_full_are_left_alone(engine):
    _register(engine, [("a", "2025-01-01"), ("b", "2025-01-02")])
    plan = _plan(engine, nights=[("2025-01-01", "2025-01-01")])
    assert [b.night for b in plan.batches] == ["2025-01-02"] and plan.in_flight == 1


def test_a_sqlite_lock_past_the_busy_timeout_is_database_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("ESE_DB_BUSY_TIMEOUT_S", "0.2")
    path = str(tmp_path / "p.sqlite3")
    engine = make_engine(path)
    ensure_schema(engine)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(DatabaseUnavailable, match="database is locked"):
            _register(engine, [("a", "2025-01-01")])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    _register(engine, [("a", "2025-01-01")])  # the same call succeeds once the lock is gone
    assert images_db.image_counts_by_status(engine)["pending"] == 1
    dispose_engine(path)


def test_a_terminated_postgresql_connection_is_database_unavailable(postgres_url):
    engine = make_engine(postgres_url)
    ensure_schema(engine)
    with engine.connect() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        killer = threading.Thread(target=_terminate, args=(postgres_url, pid))
        killer.start()
        killer.join()
        with pytest.raises(DatabaseUnavailable, match="terminating connection"):
            conn.execute(sa.text("SELECT 1"))
    _register(engine, [("a", "2025-01-01")])  # the pool replaced the dead connection
    assert images_db.image_counts_by_status(engine)["pending"] == 1


def _terminate(url: str, pid: int) -> None:
    admin = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    admin.dispose()


def test_an_older_database_gets_the_columns_added_since(tmp_path):
    path = str(tmp_path / "old.sqlite3")
    with sqlite3.connect(path) as old:  # the images table as the first release wrote it
        old.execute(
            "CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, "
            "night VARCHAR(10), mjd FLOAT, status VARCHAR(16) NOT NULL, reason TEXT, "
            "registered_at FLOAT NOT NULL)"
        )
        old.execute(
            "INSERT INTO images (path, night, status, registered_at) "
            "VALUES ('/in/old.fits', '2025-01-01', 'measured', 1.0)"
        )
    engine = make_engine(path)
    ensure_schema(engine)
    columns = {c["name"] for c in sa.inspect(engine).get_columns("images")}
    assert {"batch_token", "attempts", "next_attempt_at", "file_ctime"} <= columns
    assert _row(engine, "old")["attempts"] == 0 and _row(engine, "old")["status"] == "measured"
    dispose_engine(path)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ESE_TIMEZONE", "Mars/Olympus", "not an IANA time zone"),
        ("ESE_PARTITION_START", "2025-13-01", "not a date"),
        ("ESE_NIGHTLY_HOUR", "25", "0-23"),
        ("ESE_MAX_ATTEMPTS", "0", ">= 1"),
        ("ESE_RETRY_DELAY_S", "soon", "not a number"),
        ("ESE_MIN_OBS", "2.5", "whole number"),
    ],
)
def test_bad_settings_are_refused_naming_the_variable(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name) as err:
        Settings.from_env()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_only_future_images_waiting_is_not_an_error(engine):
    _register(engine, [("future", "2099-01-01")])
    plan = _plan(engine)
    assert plan.future == ["/in/future.fits"] and not plan.batches and plan.in_flight == 0
