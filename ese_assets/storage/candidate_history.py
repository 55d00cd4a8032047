"""The history of candidate changes (``ese_candidate_history``): reads, the runs that changed
candidates, and undo of a run.

The entries themselves are written by :mod:`ese_assets.storage.candidates`, in the transaction of
each change; the undo rule is :func:`ese_assets.core.candidates.plan_undo`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ese_assets.core.candidates import (
    DETECTION_COLUMNS,
    EXPIRED_STATUS,
    NEW_STATUS,
    Change,
    UndoAction,
    plan_undo,
)
from ese_assets.storage.access import Bind, now, read_chunked, read_frame, reading, unique_str
from ese_assets.storage.candidates import candidates_writing, history_row
from ese_assets.storage.schema import ese_candidate_history as history_table
from ese_assets.storage.schema import ese_candidates


def candidate_history(
    bind: Bind,
    *,
    source_ids: Iterable[str] | None = None,
    candidate_ids: Iterable[int] | None = None,
    run_id: str | None = None,
) -> pd.DataFrame:
    """History entries (all ``ese_candidate_history`` columns), oldest first, of the given
    sources and/or candidates and/or one run (no filter: all)."""
    stmt = sa.select(history_table).order_by(history_table.c.id)
    if source_ids is not None:
        stmt = stmt.where(history_table.c.source_id.in_(unique_str(source_ids)))
    if candidate_ids is not None:
        stmt = stmt.where(history_table.c.candidate_id.in_(sorted({int(i) for i in candidate_ids})))
    if run_id is not None:
        stmt = stmt.where(history_table.c.run_id == str(run_id))
    with reading(bind) as conn:
        return read_frame(conn, stmt)


def detection_runs(bind: Bind, limit: int = 20) -> pd.DataFrame:
    """The most recent runs that changed candidates, newest first: ``run_id, changed_by, undoes
    (the run an undo undid), first_change_at, last_change_at, changes, created, expired,
    reopened, removed``."""
    h = history_table.c

    def n_where(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
        return sa.func.sum(sa.case((condition, 1), else_=0))

    stmt = (
        sa.select(
            h.run_id,
            sa.func.min(h.changed_by).label("changed_by"),
            sa.func.max(h.undoes).label("undoes"),
            sa.func.min(h.changed_at).label("first_change_at"),
            sa.func.max(h.changed_at).label("last_change_at"),
            sa.func.count().label("changes"),
            n_where(h.old_status.is_(None)).label("created"),
            n_where(h.new_status == EXPIRED_STATUS).label("expired"),
            n_where((h.old_status == EXPIRED_STATUS) & (h.new_status == NEW_STATUS)).label(
                "reopened"
            ),
            n_where(h.new_status.is_(None)).label("removed"),
        )
        .where(h.run_id.is_not(None))
        .group_by(h.run_id)
        .order_by(sa.func.max(h.id).desc())
        .limit(int(limit))
    )
    with reading(bind) as conn:
        return read_frame(conn, stmt)


def undo_run(
    bind: Bind, run_id: str, *, undo_id: str, by: str = "user", dry_run: bool = False
) -> list[UndoAction]:
    """Undo the candidate changes of detection run ``run_id`` (:func:`core.candidates.plan_undo`):
    candidates it created are removed, candidates it changed get their previous values back, and
    candidates changed since by someone else are skipped. The undo is itself a run (``undo_id``)
    in the history, so it can be undone too. ``dry_run``: plan only, write nothing.

    Raises ValueError when the history has no change by ``run_id``.
    """
    context = reading(bind) if dry_run else candidates_writing(bind)
    with context as conn:
        entries = read_frame(
            conn,
            sa.select(history_table)
            .where(history_table.c.run_id == str(run_id))
            .order_by(history_table.c.id),
        )
        if entries.empty:
            raise ValueError(
                f"no candidate changes recorded for run {run_id!r} "
                "(`ese candidates runs` lists the runs that changed candidates)"
            )
        ids = sorted({int(i) for i in entries["candidate_id"]})
        rows = read_chunked(
            conn,
            lambda chunk: sa.select(history_table).where(history_table.c.candidate_id.in_(chunk)),
            ids,
        ).sort_values("id", kind="mergesort")
        histories: dict[int, list[dict]] = {}
        for rec in rows.to_dict("records"):
            prev = rec["previous"]
            rec["previous"] = json.loads(prev) if isinstance(prev, str) else None
            histories.setdefault(int(rec["candidate_id"]), []).append(rec)
        actions = plan_undo(run_id, histories)
        if not dry_run:
            _apply_undo(conn, actions, run_id=run_id, undo_id=undo_id, by=by)
    return actions


def _apply_undo(
    conn: Connection, actions: list[UndoAction], *, run_id: str, undo_id: str, by: str
) -> None:
    at = now()
    rows = {
        int(r.id): r
        for r in conn.execute(
            sa.select(ese_candidates).where(
                ese_candidates.c.id.in_([a.candidate_id for a in actions])
            )
        )
    }
    history = []
    for action in actions:
        row = rows.get(action.candidate_id)
        if action.kind == "remove" and row is not None:
            conn.execute(ese_candidates.delete().where(ese_candidates.c.id == row.id))
            whole = {c.name: getattr(row, c.name) for c in ese_candidates.columns}
            change = Change(row.source_id, row.status, None, action.note, previous=whole)
        elif action.kind == "restore" and row is not None:
            conn.execute(
                ese_candidates.update().where(ese_candidates.c.id == row.id).values(**action.values)
            )
            change = Change(
                row.source_id,
                row.status,
                action.values.get("status", row.status),
                action.note,
                previous={c: getattr(row, c) for c in DETECTION_COLUMNS},
                significance=action.values.get("significance", row.significance),
            )
        elif action.kind == "recreate" and row is None:
            conn.execute(ese_candidates.insert(), [action.values])
            change = Change(
                action.source_id,
                None,
                action.values.get("status"),
                action.note,
                significance=action.values.get("significance"),
            )
        else:
            continue
        entry = history_row(change, action.candidate_id, by=by, run_id=undo_id, at=at)
        history.append({**entry, "undoes": run_id})
    if history:
        conn.execute(history_table.insert(), history)
