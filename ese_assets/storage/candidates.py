"""The ``ese_candidates`` table: reads for people, writes of the planned workflow changes.

The workflow rule itself (statuses, when a candidate is opened, updated or re-opened) is
:mod:`ese_assets.core.candidates`; this module only applies its decisions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from ese_assets.core.candidates import (
    AUTO_FLAGGER,
    CANDIDATE_STATUSES,
    NEW_STATUS,
    OPEN_STATUSES,
    review_update,
)
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
)

_INSERT_DEFAULTS = {"flagged_by": AUTO_FLAGGER, "status": NEW_STATUS, "notes": None}


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


def existing_candidates(bind: Bind, source_ids: Iterable[str]) -> pd.DataFrame:
    """Every candidate row (open or dismissed) of the given sources, ordered by source_id, id.

    Columns: :data:`EXISTING_COLUMNS`.
    """

    def make_stmt(chunk: list[str]) -> sa.Select[Any]:
        return (
            sa.select(*(ese_candidates.c[c] for c in EXISTING_COLUMNS))
            .where(ese_candidates.c.source_id.in_(chunk))
            .order_by(ese_candidates.c.source_id, ese_candidates.c.id)
        )

    with reading(bind) as conn:
        return read_chunked(conn, make_stmt, unique_str(source_ids)).reset_index(drop=True)


def apply_candidate_changes(
    bind: Bind, inserts: Sequence[Mapping[str, Any]], updates: Sequence[Mapping[str, Any]]
) -> None:
    """Apply a planned set of candidate changes (:func:`core.candidates.plan_candidate_changes`)
    in ONE transaction.

    ``updates``: dicts with ``id`` plus the columns to set (applied first, in id order, so that a
    candidate can be closed and a new one opened for the same source in the same call).
    ``inserts``: new rows; ``flagged_at`` defaults to now, ``flagged_by`` to "auto", ``status`` to
    "active". The partial unique index uq_ese_candidates_open_source rejects a second open candidate
    for a source (IntegrityError, nothing applied). Unknown columns raise ValueError.
    """
    flagged_at = now()
    insert_rows: list[dict[str, Any]] = []
    for row in inserts:
        check_columns(ese_candidates, row.keys(), "apply_candidate_changes insert")
        if "id" in row:
            raise ValueError("apply_candidate_changes: inserts cannot set 'id'")
        clean = {**_INSERT_DEFAULTS, **clean_mapping(row)}
        if clean.get("flagged_at") is None:
            clean["flagged_at"] = flagged_at
        check_statuses(clean["status"], CANDIDATE_STATUSES, "candidate status")
        insert_rows.append(clean)
    keys = sorted(set().union(*(r.keys() for r in insert_rows))) if insert_rows else []
    insert_rows = sorted(
        ({k: r.get(k) for k in keys} for r in insert_rows), key=lambda r: str(r.get("source_id"))
    )

    # Group updates by the set of columns they change: one executemany per shape.
    update_groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in updates:
        check_columns(ese_candidates, row.keys(), "apply_candidate_changes update")
        if "id" not in row or row["id"] is None:
            raise ValueError(f"apply_candidate_changes: update without id: {dict(row)!r}")
        clean = clean_mapping(row)
        if "status" in clean:
            check_statuses(clean["status"], CANDIDATE_STATUSES, "candidate status")
        columns = tuple(sorted(k for k in clean if k != "id"))
        if not columns:
            continue
        params = {f"v_{k}": clean[k] for k in columns}
        params["b_id"] = int(clean["id"])
        update_groups.setdefault(columns, []).append(params)

    with writing(bind) as conn:
        for columns, params in update_groups.items():
            stmt = (
                ese_candidates.update()
                .where(ese_candidates.c.id == sa.bindparam("b_id"))
                .values({c: sa.bindparam(f"v_{c}") for c in columns})
            )
            conn.execute(stmt, sorted(params, key=lambda p: p["b_id"]))
        if insert_rows:
            conn.execute(ese_candidates.insert(), insert_rows)


def set_candidate_status(
    bind: Bind, source_id: str, status: str, *, notes: str | None = None, by: str = "user"
) -> int:
    """Move the open candidate of ``source_id`` to ``investigated`` or ``dismissed``; return its id.

    The values written (time stamp, audit line appended to ``notes``) are
    :func:`core.candidates.review_update`'s. Raises ValueError for another status or when the
    source has no open candidate.
    """
    review_update(status, old_notes=None, notes=notes, by=by, now=0.0)  # validate before locking
    with writing(bind) as conn:
        row = conn.execute(
            sa.select(ese_candidates.c.id, ese_candidates.c.notes)
            .where(
                ese_candidates.c.source_id == str(source_id),
                ese_candidates.c.status.in_(OPEN_STATUSES),
            )
            .with_for_update()
        ).first()
        if row is None:
            raise ValueError(
                f"source {source_id!r} has no open ({' or '.join(OPEN_STATUSES)}) ESE candidate"
            )
        values = review_update(status, old_notes=row.notes, notes=notes, by=by, now=now())
        conn.execute(ese_candidates.update().where(ese_candidates.c.id == row.id).values(**values))
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
