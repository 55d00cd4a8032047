"""The ``ese_candidates`` table and its history ``ese_candidate_history``: reads for people,
writes of the planned workflow changes, undo of a detection run.

The workflow rule itself (statuses, when a candidate is opened, updated, expired or re-opened) is
:mod:`ese_assets.core.candidates`; this module only applies its decisions. Every status change is
written with its history entry in one transaction.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ese_assets.core.candidates import (
    AUTO_FLAGGER,
    CANDIDATE_STATUSES,
    DETECTION_COLUMNS,
    NEW_STATUS,
    OPEN_STATUSES,
    CandidatePlan,
    Change,
    reopen_update,
    review_update,
)
from ese_assets.core.values import py_scalar
from ese_assets.storage.access import (
    Bind,
    check_columns,
    check_statuses,
    clean_mapping,
    now,
    read_all_or_chunked,
    read_chunked,
    read_frame,
    reading,
    unique_str,
    writing,
)
from ese_assets.storage.schema import ese_candidate_history as history_table
from ese_assets.storage.schema import ese_candidates
from ese_assets.storage.schema import variability_stats as stats_table

#: variability_stats columns joined onto :func:`candidates` for display.
CANDIDATE_STATS_COLUMNS = (
    "ra_deg",
    "dec_deg",
    "nvss_flux_mjy",
    "mean_flux_mjy",
    "std_flux_mjy",
    "chi2_nu",
    "n_obs",
    "last_mjd",
    "eta_metric",
)

#: Columns of :func:`existing_candidates`.
EXISTING_COLUMNS = (
    "id",
    "source_id",
    "status",
    "significance",
    "dismissed_at",
    "flagged_at",
    "last_night",
    "flag_type",
    "sigma_deviation",
    "dip_significance",
)

_INSERT_DEFAULTS = {"flagged_by": AUTO_FLAGGER, "status": NEW_STATUS, "notes": None}
# Arbitrary constant key of the PostgreSQL advisory lock that serialises detection runs ("ESEC").
_DETECTION_LOCK_KEY = 0x45534543
# Engines whose ese_candidates CHECK constraint is known to allow every current status.
_status_check_ok: weakref.WeakSet[Engine] = weakref.WeakSet()


# ------------------------------------------------------------------------------------------ reads


def candidates(
    bind: Bind, status: str | Iterable[str] | None = None, source_ids: Iterable[str] | None = None
) -> pd.DataFrame:
    """Candidates (all ``ese_candidates`` columns) joined with display columns of their statistics.

    Added columns: :data:`CANDIDATE_STATS_COLUMNS` from ``variability_stats``. ``status`` is one
    status or several; ordered by significance (descending), then id.
    """
    wanted_status = check_statuses(status, CANDIDATE_STATUSES, "candidate status")
    join = ese_candidates.outerjoin(
        stats_table, stats_table.c.source_id == ese_candidates.c.source_id
    )

    def make_stmt(chunk: list[str] | None) -> sa.Select[Any]:
        stmt = sa.select(
            ese_candidates, *(stats_table.c[c] for c in CANDIDATE_STATS_COLUMNS)
        ).select_from(join)
        if wanted_status is not None:
            stmt = stmt.where(ese_candidates.c.status.in_(wanted_status))
        if chunk is not None:
            stmt = stmt.where(ese_candidates.c.source_id.in_(chunk))
        return stmt.order_by(ese_candidates.c.significance.desc(), ese_candidates.c.id)

    frame = read_all_or_chunked(bind, make_stmt, source_ids)
    return frame.sort_values(
        ["significance", "id"], ascending=[False, True], kind="mergesort"
    ).reset_index(drop=True)


def existing_candidates(bind: Bind, source_ids: Iterable[str] | None) -> pd.DataFrame:
    """Every candidate row (any status) of the given sources (None: of every source), ordered
    by source_id, id. Columns: :data:`EXISTING_COLUMNS`."""

    def make_stmt(chunk: list[str] | None) -> sa.Select[Any]:
        stmt = sa.select(*(ese_candidates.c[c] for c in EXISTING_COLUMNS))
        if chunk is not None:
            stmt = stmt.where(ese_candidates.c.source_id.in_(chunk))
        return stmt.order_by(ese_candidates.c.source_id, ese_candidates.c.id)

    with reading(bind) as conn:
        if source_ids is None:
            return read_frame(conn, make_stmt(None))
        return read_chunked(conn, make_stmt, unique_str(source_ids)).reset_index(drop=True)


# ------------------------------------------------------------------------------ write machinery


def _current_status_check(conn: Connection) -> None:
    """Let the status CHECK constraint of an ``ese_candidates`` table created by an older version
    allow every status of :data:`CANDIDATE_STATUSES` (``expired`` was added); once per engine.

    PostgreSQL: the constraint is dropped and added again. SQLite cannot alter a constraint: the
    table is rebuilt in this transaction (rename, create, copy, drop: the documented procedure of
    https://sqlite.org/lang_altertable.html#otheralter; nothing refers to ``ese_candidates``).
    """
    engine = conn.engine
    if engine in _status_check_ok:
        return
    check = next(c for c in ese_candidates.constraints if c.name == "ck_ese_candidates_status")
    if conn.dialect.name == "sqlite":
        ddl = conn.execute(
            sa.text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :t"),
            {"t": ese_candidates.name},
        ).scalar()
        if ddl is not None and not all(f"'{s}'" in ddl for s in CANDIDATE_STATUSES):
            old = "ese_candidates_before_upgrade"
            conn.exec_driver_sql(f"ALTER TABLE ese_candidates RENAME TO {old}")
            for index in ese_candidates.indexes:
                conn.exec_driver_sql(f"DROP INDEX IF EXISTS {index.name}")
            ese_candidates.create(conn)
            columns = ", ".join(c.name for c in ese_candidates.columns)
            conn.exec_driver_sql(
                f"INSERT INTO ese_candidates ({columns}) SELECT {columns} FROM {old}"
            )
            conn.exec_driver_sql(f"DROP TABLE {old}")
    elif conn.dialect.name == "postgresql":
        definition = conn.execute(
            sa.text(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conname = :name AND conrelid = to_regclass(:table)"
            ),
            {"name": check.name, "table": ese_candidates.name},
        ).scalar()
        if definition is not None and not all(f"'{s}'" in definition for s in CANDIDATE_STATUSES):
            # isolate_from_table=False: by default SQLAlchemy would leave the constraint out of
            # every CREATE TABLE of this process afterwards (it assumes an ALTER adds it).
            conn.execute(sa.schema.DropConstraint(check, isolate_from_table=False))
            conn.execute(sa.schema.AddConstraint(check, isolate_from_table=False))
    _status_check_ok.add(engine)


@contextlib.contextmanager
def candidates_writing(bind: Bind) -> Iterator[Connection]:
    """A write transaction for candidate changes (the caller's, or a new one).

    Detection reads the candidates, plans and writes in this one transaction; concurrent runs are
    serialised (SQLite's write lock; on PostgreSQL a transaction-scoped advisory lock), so two
    runs never both open a candidate for the same source.
    """
    with writing(bind) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _DETECTION_LOCK_KEY}
            )
        _current_status_check(conn)
        yield conn


def _json(values: Mapping[str, Any] | None) -> str | None:
    return None if values is None else json.dumps(clean_mapping(values), sort_keys=True)


def history_row(
    change: Change, candidate_id: int, *, by: str, run_id: str | None, at: float
) -> dict[str, Any]:
    return {
        "candidate_id": int(candidate_id),
        "source_id": str(change.source_id),
        "changed_at": at,
        "changed_by": by,
        "old_status": change.old_status,
        "new_status": change.new_status,
        "note": change.note,
        "run_id": run_id,
        "undoes": None,
        "significance": py_scalar(change.significance),
        "previous": _json(change.previous),
    }


def _insert_candidate(conn: Connection, row: Mapping[str, Any]) -> int:
    return int(conn.execute(ese_candidates.insert(), dict(row)).inserted_primary_key[0])


@dataclass
class AppliedPlan:
    """What :func:`apply_plan` wrote: the ids of the created candidates (in insert order), the
    history entries written, and the updates skipped because a person changed the candidate
    between planning and writing."""

    inserted_ids: list[int] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


def apply_plan(
    conn: Connection,
    plan: CandidatePlan,
    *,
    run_id: str | None,
    by: str = AUTO_FLAGGER,
    at: float | None = None,
) -> AppliedPlan:
    """Apply a :class:`CandidatePlan` with its history entries inside the caller's transaction
    (:func:`candidates_writing`).

    Updates first, in id order (a candidate can be closed and a new one opened for its source in
    one plan), each only if the row still has one of the statuses the plan expected
    (``plan.allowed``); then inserts, in source_id order. A history entry is written for each
    change that was applied.
    """
    at = now() if at is None else at
    applied = AppliedPlan()
    changed_ids = {c.candidate_id: c for c in plan.changes if c.candidate_id is not None}
    plain: dict[tuple[tuple[str, ...], tuple[str, ...]], list[dict[str, Any]]] = {}
    history: list[dict[str, Any]] = []
    for update in sorted(plan.updates, key=lambda u: int(u["id"])):
        cid = int(update["id"])
        values = clean_mapping({k: v for k, v in update.items() if k != "id"})
        allowed = plan.allowed.get(cid, OPEN_STATUSES)
        if cid not in changed_ids:  # same status, same rule: batched below
            plain.setdefault((tuple(sorted(values)), tuple(allowed)), []).append(
                {"b_id": cid, **{f"v_{k}": v for k, v in values.items()}}
            )
            continue
        done = conn.execute(
            ese_candidates.update()
            .where(ese_candidates.c.id == cid, ese_candidates.c.status.in_(allowed))
            .values(**values)
        ).rowcount
        if done:
            change = changed_ids[cid]
            applied.changes.append(change)
            history.append(history_row(change, cid, by=by, run_id=run_id, at=at))
        else:
            applied.skipped.append(cid)
    for (columns, allowed), params in plain.items():
        conn.execute(
            ese_candidates.update()
            .where(  # no IN list: an expanding parameter cannot be used with executemany
                ese_candidates.c.id == sa.bindparam("b_id"),
                sa.or_(*(ese_candidates.c.status == s for s in allowed)),
            )
            .values({c: sa.bindparam(f"v_{c}") for c in columns}),
            params,
        )
    inserts = [(i, {**_INSERT_DEFAULTS, **clean_mapping(r)}) for i, r in enumerate(plan.inserts)]
    ids: dict[int, int] = {}
    for index, row in sorted(inserts, key=lambda item: str(item[1]["source_id"])):
        if row.get("flagged_at") is None:
            row["flagged_at"] = at
        ids[index] = _insert_candidate(conn, row)
    applied.inserted_ids = [ids[i] for i in range(len(inserts))]
    for change in plan.changes:
        if change.insert_index is not None:
            applied.changes.append(change)
            history.append(
                history_row(change, ids[change.insert_index], by=by, run_id=run_id, at=at)
            )
    if history:
        conn.execute(history_table.insert(), sorted(history, key=lambda h: h["candidate_id"]))
    return applied


# ------------------------------------------------------------------------------------ workflow


def apply_candidate_changes(
    bind: Bind, inserts: Sequence[Mapping[str, Any]], updates: Sequence[Mapping[str, Any]]
) -> None:
    """Apply planned candidate inserts and updates (:func:`core.candidates.plan_candidate_changes`)
    in ONE transaction, with a history entry for every insert and status change.

    ``updates``: dicts with ``id`` plus the columns to set (applied first, in id order, so that a
    candidate can be closed and a new one opened for the same source in the same call).
    ``inserts``: new rows; ``flagged_at`` defaults to now, ``flagged_by`` to "auto", ``status`` to
    "active". The partial unique index uq_ese_candidates_open_source rejects a second open candidate
    for a source (IntegrityError, nothing applied). Unknown columns raise ValueError.
    """
    plan = CandidatePlan()
    for row in inserts:
        check_columns(ese_candidates, row.keys(), "apply_candidate_changes insert")
        if "id" in row:
            raise ValueError("apply_candidate_changes: inserts cannot set 'id'")
        clean = {**_INSERT_DEFAULTS, **clean_mapping(row)}
        check_statuses(clean["status"], CANDIDATE_STATUSES, "candidate status")
        plan.changes.append(
            Change(
                str(clean["source_id"]),
                None,
                clean["status"],
                clean.get("notes"),
                insert_index=len(plan.inserts),
                significance=clean.get("significance"),
            )
        )
        plan.inserts.append(clean)
    for row in updates:
        check_columns(ese_candidates, row.keys(), "apply_candidate_changes update")
        if "id" not in row or row["id"] is None:
            raise ValueError(f"apply_candidate_changes: update without id: {dict(row)!r}")
        if "status" in row:
            check_statuses(row["status"], CANDIDATE_STATUSES, "candidate status")
        if len(row) > 1:
            plan.updates.append(clean_mapping(row))
    with candidates_writing(bind) as conn:
        ids = [int(u["id"]) for u in plan.updates if "status" in u]
        current = {
            int(r.id): r
            for r in conn.execute(
                sa.select(
                    *(ese_candidates.c[c] for c in ("id", "source_id", *DETECTION_COLUMNS))
                ).where(ese_candidates.c.id.in_(ids))
            )
        }
        for update in plan.updates:
            cid = int(update["id"])
            row = current.get(cid)
            plan.allowed[cid] = CANDIDATE_STATUSES
            if row is not None and "status" in update and update["status"] != row.status:
                plan.changes.append(
                    Change(
                        row.source_id,
                        row.status,
                        update["status"],
                        candidate_id=cid,
                        previous={c: getattr(row, c) for c in DETECTION_COLUMNS},
                        significance=update.get("significance", row.significance),
                    )
                )
        apply_plan(conn, plan, run_id=None)


def _open_candidate(conn: Connection, source_id: str) -> Any:
    return conn.execute(
        sa.select(ese_candidates)
        .where(
            ese_candidates.c.source_id == str(source_id),
            ese_candidates.c.status.in_(OPEN_STATUSES),
        )
        .order_by(ese_candidates.c.id.desc())
        .with_for_update()
    ).first()


def _person_change(
    conn: Connection, row: Any, values: Mapping[str, Any], *, by: str, notes: str | None, at: float
) -> None:
    """Write a person's change of candidate ``row`` and its history entry."""
    conn.execute(ese_candidates.update().where(ese_candidates.c.id == row.id).values(**values))
    change = Change(
        row.source_id,
        row.status,
        values["status"],
        notes,
        candidate_id=row.id,
        previous={c: getattr(row, c) for c in DETECTION_COLUMNS},
        significance=row.significance,
    )
    conn.execute(history_table.insert(), [history_row(change, row.id, by=by, run_id=None, at=at)])


def set_candidate_status(
    bind: Bind, source_id: str, status: str, *, notes: str | None = None, by: str = "user"
) -> int:
    """Move the open candidate of ``source_id`` to ``investigated`` or ``dismissed``; return its id.

    The values written (time stamp, audit line appended to ``notes``) are
    :func:`core.candidates.review_update`'s; the change goes to the history table in the same
    transaction. Raises ValueError for another status or when the source has no open candidate.
    """
    review_update(status, old_notes=None, notes=notes, by=by, now=0.0)  # validate before locking
    with candidates_writing(bind) as conn:
        row = _open_candidate(conn, source_id)
        if row is None:
            raise ValueError(
                f"source {source_id!r} has no open ({' or '.join(OPEN_STATUSES)}) ESE candidate"
            )
        at = now()
        values = review_update(status, old_notes=row.notes, notes=notes, by=by, now=at)
        _person_change(conn, row, values, by=by, notes=notes, at=at)
    return int(row.id)


def reopen_candidate(
    bind: Bind, source_id: str, *, notes: str | None = None, by: str = "user"
) -> int:
    """Make the candidate of ``source_id`` ``active`` again; return its id.

    The candidate is the source's ``investigated`` one if it has one, otherwise its most recent
    dismissed or expired one. Raises ValueError when the source has no candidate or an
    ``active`` one already.
    """
    with candidates_writing(bind) as conn:
        row = _open_candidate(conn, source_id)
        if row is None:
            row = conn.execute(
                sa.select(ese_candidates)
                .where(ese_candidates.c.source_id == str(source_id))
                .order_by(ese_candidates.c.id.desc())
                .limit(1)
                .with_for_update()
            ).first()
        if row is None:
            raise ValueError(f"source {source_id!r} has no ESE candidate")
        if row.status == NEW_STATUS:
            raise ValueError(f"source {source_id!r}: candidate {row.id} is already {NEW_STATUS!r}")
        at = now()
        values = reopen_update(row.status, old_notes=row.notes, notes=notes, by=by, now=at)
        _person_change(conn, row, values, by=by, notes=notes, at=at)
    return int(row.id)


def candidate_problems(bind: Bind, limit: int = 20) -> list[str]:
    """Human-readable problems in ``ese_candidates`` (empty list: all sane), at most ``limit``.

    Checks: at most one open candidate per source (also enforced by the partial unique index;
    checked here in case the index is missing from an old database), every candidate has a
    statistics row, significance is finite and > 0.
    """
    problems: list[str] = []
    is_open = ese_candidates.c.status.in_(OPEN_STATUSES)
    with reading(bind) as conn:
        for source_id, n in conn.execute(
            sa.select(ese_candidates.c.source_id, sa.func.count())
            .where(is_open)
            .group_by(ese_candidates.c.source_id)
            .having(sa.func.count() > 1)
            .order_by(ese_candidates.c.source_id)
            .limit(limit)
        ):
            problems.append(f"{source_id}: {n} open candidates")
        for cid, source_id in conn.execute(
            sa.select(ese_candidates.c.id, ese_candidates.c.source_id)
            .select_from(
                ese_candidates.outerjoin(
                    stats_table, stats_table.c.source_id == ese_candidates.c.source_id
                )
            )
            .where(stats_table.c.source_id.is_(None))
            .order_by(ese_candidates.c.id)
            .limit(limit)
        ):
            problems.append(f"{source_id}: candidate {cid} has no variability_stats row")
        frame = read_frame(
            conn,
            sa.select(
                ese_candidates.c.id, ese_candidates.c.source_id, ese_candidates.c.significance
            ),
        )
    significance = frame["significance"].to_numpy(dtype=float)
    bad = ~(np.isfinite(significance) & (significance > 0))
    for cid, source_id, value in frame.loc[bad].head(limit).itertuples(index=False):
        problems.append(f"{source_id}: candidate {cid} has significance {value}")
    return problems[:limit]
