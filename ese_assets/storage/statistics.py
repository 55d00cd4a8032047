"""The statistics tables: ``variability_stats``, the additive sums ``source_night_sums`` and
``source_sums``, the lock that serialises writers of the sums, and their consistency checks.

The statistics stage (``ese_assets.pipeline.statistics``) reads stored sums, computes the
difference a night makes and writes it back, all inside one :func:`sums_transaction`. The sums
writers below take ``bind`` like every storage function; pass that transaction's connection so the
night rows, the source rows and the statistics change together under the lock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ese_assets.core.quality import DEFAULT_EXCLUDED_FLAGS
from ese_assets.core.sums import EXTREME_MAX_COLUMNS, EXTREME_MIN_COLUMNS, SUM_COLUMNS
from ese_assets.storage.access import (
    WRITE_BATCH,
    Bind,
    chunks,
    dialect_insert,
    frame_records,
    now,
    read_all_or_chunked,
    read_chunked,
    read_frame,
    reading,
    sorted_records,
    unique_str,
    writing,
)
from ese_assets.storage.engine import begin_write
from ese_assets.storage.photometry import usable_rows
from ese_assets.storage.schema import images, photometry, source_night_sums
from ese_assets.storage.schema import source_sums as sums_table
from ese_assets.storage.schema import variability_stats as stats_table

#: Arbitrary constant key of the PostgreSQL advisory lock that serialises writers of the sums.
SUMS_LOCK_KEY = 0x45534556  # "ESEV"

#: Catalog columns of ``source_sums``, taken from the newest epochs.
_CATALOG_COLUMNS = ("ra_deg", "dec_deg", "nvss_flux_mjy")


@contextlib.contextmanager
def sums_transaction(engine: Engine) -> Iterator[Connection]:
    """The write transaction of one statistics update: read photometry and sums, write sums and
    statistics.

    The update is read-compute-write (new night sums minus the stored ones), so two concurrent
    updates touching the same source could both apply their difference to the same old state.
    SQLite's ``BEGIN IMMEDIATE`` already serialises writers; on PostgreSQL a transaction-scoped
    advisory lock does, and every read inside the transaction then sees the previous holder's
    commit (READ COMMITTED). Released at commit or rollback, so a killed run leaves the old sums.
    """
    with begin_write(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SUMS_LOCK_KEY})
        yield conn


# --------------------------------------------------------------------------------------------------
# variability_stats
# --------------------------------------------------------------------------------------------------


def upsert_variability_stats(bind: Bind, stats: pd.DataFrame) -> int:
    """Insert or update one ``variability_stats`` row per source; returns the rows written.

    ``INSERT ... ON CONFLICT (source_id) DO UPDATE SET`` every given column (columns of ``stats``
    that are not table columns are ignored; ``updated_at`` defaults to now). Rows are written in
    source_id order so concurrent transactions lock rows in the same order and cannot deadlock
    (PostgreSQL). Duplicate source_ids raise ValueError. NaN becomes NULL.
    """
    if "source_id" not in stats.columns:
        raise ValueError("upsert_variability_stats: stats has no source_id column")
    if len(stats) == 0:
        return 0
    frame = stats[[c for c in stats.columns if c in stats_table.c]].copy()
    frame["source_id"] = frame["source_id"].astype(str)
    duplicated = frame["source_id"].duplicated()
    if duplicated.any():
        raise ValueError(
            "upsert_variability_stats: duplicate source_id "
            f"{sorted(frame.loc[duplicated, 'source_id'].unique())[:5]}"
        )
    if "updated_at" not in frame.columns:
        frame["updated_at"] = now()
    frame = frame.sort_values("source_id", kind="mergesort")
    columns = [c.key for c in stats_table.c if c.key in frame.columns]
    records = frame_records(frame, columns)
    with writing(bind) as conn:
        insert = dialect_insert(conn, stats_table)
        stmt = insert.on_conflict_do_update(
            index_elements=[stats_table.c.source_id],
            set_={c: insert.excluded[c] for c in columns if c != "source_id"},
        )
        for chunk in chunks(records, WRITE_BATCH):
            conn.execute(stmt, chunk)
    return len(records)


def variability_stats(
    bind: Bind, source_ids: Iterable[str] | None = None, min_n_obs: int | None = None
) -> pd.DataFrame:
    """``variability_stats`` rows (all columns), optionally of some sources / n_obs >= min_n_obs."""

    def make_stmt(chunk: list[str] | None) -> sa.Select[Any]:
        stmt = sa.select(stats_table)
        if chunk is not None:
            stmt = stmt.where(stats_table.c.source_id.in_(chunk))
        if min_n_obs is not None:
            stmt = stmt.where(stats_table.c.n_obs >= int(min_n_obs))
        return stmt.order_by(stats_table.c.source_id)

    return read_all_or_chunked(bind, make_stmt, source_ids).reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# source_night_sums / source_sums
# --------------------------------------------------------------------------------------------------


def _sums_key(
    nights: Iterable[str] | None, source_ids: Iterable[str] | None, what: str
) -> tuple[sa.ColumnElement[Any], list[str]]:
    if (nights is None) == (source_ids is None):
        raise ValueError(f"{what}: give either nights or source_ids")
    if nights is not None:
        return source_night_sums.c.night, unique_str(nights)
    return source_night_sums.c.source_id, unique_str(source_ids)


def night_sums(
    bind: Bind, nights: Iterable[str] | None = None, source_ids: Iterable[str] | None = None
) -> pd.DataFrame:
    """``source_night_sums`` rows of ``nights`` or of ``source_ids`` (exactly one of them given),
    ordered by source_id, night."""
    column, wanted = _sums_key(nights, source_ids, "night_sums")
    with reading(bind) as conn:
        frame = read_chunked(
            conn, lambda chunk: sa.select(source_night_sums).where(column.in_(chunk)), wanted
        )
    return frame.sort_values(["source_id", "night"], kind="mergesort").reset_index(drop=True)


#: Days between a night's calendar date and the UTC date of its epochs, at most: a night is a date
#: in a time zone within +-14 h of UTC; one more day of margin.
_NIGHT_DATE_MARGIN_DAYS = 2
_MJD_EPOCH = dt.date(1858, 11, 17)


def _night_floor(mjd: float | None) -> str | None:
    """A night (``YYYY-MM-DD``) on or before the night of every epoch at or after ``mjd``."""
    if mjd is None or not math.isfinite(mjd):
        return None
    try:
        day = _MJD_EPOCH + dt.timedelta(days=math.floor(mjd) - _NIGHT_DATE_MARGIN_DAYS)
    except OverflowError:  # before year 1: no floor
        return None
    return day.isoformat()


def window_night_sums(
    bind: Bind,
    source_ids: Iterable[str],
    window_days: float,
    columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The ``source_night_sums`` rows (all columns, or ``columns``: fewer columns read faster) of
    each source's trailing window: its nights whose mid-time
    ``(first_mjd + last_mjd) / 2`` is at least ``source_sums.last_mjd - window_days`` (its latest
    usable epoch minus the window). For a night of one epoch this is that epoch's own test, as in
    :func:`ese_assets.storage.photometry.window_photometry`.

    At most one row per source and night of the window, whatever the cadence. The rows scanned are
    bounded by the window too, not by the history: each chunk also asks ``night >= floor`` (the
    date of the chunk's earliest bound minus :data:`_NIGHT_DATE_MARGIN_DAYS`), a range of the
    primary key (source_id, night). Ordered by source_id, night.
    """
    night = source_night_sums
    bound = sums_table.c.last_mjd - float(window_days)
    selected = [night] if columns is None else [night.c[c] for c in columns]

    def make_stmt(chunk: list[str], floor: str | None) -> sa.Select[Any]:
        stmt = (
            sa.select(*selected)
            .join(sums_table, sums_table.c.source_id == night.c.source_id)
            .where(night.c.source_id.in_(chunk), night.c.first_mjd + night.c.last_mjd >= 2 * bound)
        )
        if floor is not None:
            stmt = stmt.where(night.c.night >= floor)
        return stmt.order_by(night.c.source_id, night.c.night)

    wanted = unique_str(source_ids)
    with reading(bind) as conn:
        if not wanted:
            return read_frame(conn, make_stmt([], None))
        frames = []
        for chunk in chunks(wanted):
            earliest = conn.execute(
                sa.select(sa.func.min(bound)).where(sums_table.c.source_id.in_(chunk))
            ).scalar()
            frames.append(read_frame(conn, make_stmt(chunk, _night_floor(earliest))))
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def source_sums(bind: Bind, source_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """``source_sums`` rows of ``source_ids`` (all when None), ordered by source_id."""

    def make_stmt(chunk: list[str] | None) -> sa.Select[Any]:
        stmt = sa.select(sums_table)
        if chunk is not None:
            stmt = stmt.where(sums_table.c.source_id.in_(chunk))
        return stmt.order_by(sums_table.c.source_id)

    return read_all_or_chunked(bind, make_stmt, source_ids).reset_index(drop=True)


def replace_night_sums(
    bind: Bind,
    rows: pd.DataFrame,
    *,
    nights: Iterable[str] | None = None,
    source_ids: Iterable[str] | None = None,
) -> int:
    """Delete the ``source_night_sums`` rows of ``nights`` or of ``source_ids`` and insert ``rows``.

    Run it in the :func:`sums_transaction` connection, so the night rows change together with the
    ``source_sums`` they were added to. Returns the rows inserted.
    """
    column, wanted = _sums_key(nights, source_ids, "replace_night_sums")
    records = sorted_records(source_night_sums, rows, ("source_id", "night"))
    with writing(bind) as conn:
        for chunk in chunks(wanted):
            conn.execute(source_night_sums.delete().where(column.in_(chunk)))
        for chunk in chunks(records, WRITE_BATCH):
            conn.execute(source_night_sums.insert(), chunk)
    return len(records)


def _keep_smaller(column: str, excluded: Any) -> sa.ColumnElement[Any]:
    """``min(stored, new)`` with a missing new value keeping the stored one (portable CASE)."""
    old, new = sums_table.c[column], excluded[column]
    return sa.case((sa.or_(new < old, old.is_(None)), new), else_=old)


def _keep_larger(column: str, excluded: Any) -> sa.ColumnElement[Any]:
    old, new = sums_table.c[column], excluded[column]
    return sa.case((sa.or_(new > old, old.is_(None)), new), else_=old)


def add_source_sums(bind: Bind, deltas: pd.DataFrame) -> int:
    """Add per-source changes to ``source_sums`` (in the :func:`sums_transaction`); returns rows.

    ``deltas``: one row per source with ``source_id, ra_deg, dec_deg, nvss_flux_mjy, shift_mjy,
    flux_scale_error``, the additive columns (amounts to ADD), ``min_flux_mjy, max_flux_mjy,
    first_mjd, last_mjd, last_measured_at`` of the new epochs (NaN when none). A new source is
    inserted as given. An existing one gets ``col = col + delta`` for the additive columns (in SQL,
    so the stored value is never read back and re-rounded in Python), its extremes widened
    (min/first can only fall, max/last/last_measured_at only rise; shrinking is
    :func:`refresh_source_extremes`), and its catalog columns taken from the newer epochs. Its
    ``shift_mjy`` and ``flux_scale_error`` are never changed here (the caller checks they match).
    """
    records = sorted_records(sums_table, deltas, ("source_id",))
    if not records:
        return 0
    with writing(bind) as conn:
        insert = dialect_insert(conn, sums_table)
        ex = insert.excluded
        newer = ex.last_mjd >= sums_table.c.last_mjd
        set_: dict[str, Any] = {c: sums_table.c[c] + ex[c] for c in SUM_COLUMNS}
        set_.update({c: _keep_smaller(c, ex) for c in EXTREME_MIN_COLUMNS})
        set_.update({c: _keep_larger(c, ex) for c in (*EXTREME_MAX_COLUMNS, "last_measured_at")})
        # SET expressions see the stored row, so `newer` compares against the old last_mjd.
        set_.update({c: sa.case((newer, ex[c]), else_=sums_table.c[c]) for c in _CATALOG_COLUMNS})
        stmt = insert.on_conflict_do_update(index_elements=[sums_table.c.source_id], set_=set_)
        for chunk in chunks(records, WRITE_BATCH):
            conn.execute(stmt, chunk)
    return len(records)


def put_source_sums(bind: Bind, rows: pd.DataFrame) -> int:
    """Insert or overwrite whole ``source_sums`` rows (the rebuild path); returns rows written."""
    records = sorted_records(sums_table, rows, ("source_id",))
    if not records:
        return 0
    with writing(bind) as conn:
        insert = dialect_insert(conn, sums_table)
        stmt = insert.on_conflict_do_update(
            index_elements=[sums_table.c.source_id],
            set_={c: insert.excluded[c] for c in records[0] if c != "source_id"},
        )
        for chunk in chunks(records, WRITE_BATCH):
            conn.execute(stmt, chunk)
    return len(records)


def refresh_source_extremes(bind: Bind, source_ids: Iterable[str]) -> None:
    """Recompute min/max flux, first/last mjd and last_measured_at of ``source_ids`` in
    ``source_sums`` from their ``source_night_sums`` rows (one aggregate per source: O(nights)).

    Needed only when a night's extremes changed (re-measured photometry), since a stored minimum
    cannot be un-taken by arithmetic; the additive columns never need it.
    """
    night = source_night_sums.alias("n")

    def agg(func: Any, column: str) -> sa.ScalarSelect[Any]:
        return (
            sa.select(func(night.c[column]))
            .where(night.c.source_id == sums_table.c.source_id)
            .scalar_subquery()
        )

    values = {
        "min_flux_mjy": agg(sa.func.min, "min_flux_mjy"),
        "max_flux_mjy": agg(sa.func.max, "max_flux_mjy"),
        "first_mjd": agg(sa.func.min, "first_mjd"),
        "last_mjd": agg(sa.func.max, "last_mjd"),
        "last_measured_at": agg(sa.func.max, "last_measured_at"),
    }
    with writing(bind) as conn:
        for chunk in chunks(unique_str(source_ids)):
            conn.execute(
                sums_table.update().where(sums_table.c.source_id.in_(chunk)).values(**values)
            )


def delete_source_sums(bind: Bind, source_ids: Iterable[str], *, only_empty: bool = False) -> int:
    """Delete the ``source_sums`` rows of ``source_ids`` (only those with n_obs <= 0 when
    ``only_empty``: every epoch of the source was removed); returns rows deleted."""
    deleted = 0
    with writing(bind) as conn:
        for chunk in chunks(unique_str(source_ids)):
            stmt = sums_table.delete().where(sums_table.c.source_id.in_(chunk))
            if only_empty:
                stmt = stmt.where(sums_table.c.n_obs <= 0)
            deleted += conn.execute(stmt).rowcount
    return deleted


# --------------------------------------------------------------------------------------------------
# Consistency checks
# --------------------------------------------------------------------------------------------------


def stats_photometry_mismatches(
    bind: Bind, source_ids: Iterable[str], *, exclude_flags: int = DEFAULT_EXCLUDED_FLAGS
) -> int:
    """Number of ``source_ids`` whose ``variability_stats.n_obs`` differs from their count of
    usable photometry rows (none of the ``exclude_flags`` bits; the rows statistics use).

    A source without a statistics row counts as n_obs = 0, one without photometry as 0 rows, so a
    missing row on either side is a mismatch (unless both are absent).
    """
    mismatched = 0
    usable = usable_rows(exclude_flags)
    with reading(bind) as conn:
        for chunk in chunks(unique_str(source_ids)):
            n_rows = dict(
                conn.execute(
                    sa.select(photometry.c.source_id, sa.func.count())
                    .where(photometry.c.source_id.in_(chunk), usable)
                    .group_by(photometry.c.source_id)
                ).all()
            )
            n_obs = dict(
                conn.execute(
                    sa.select(stats_table.c.source_id, stats_table.c.n_obs).where(
                        stats_table.c.source_id.in_(chunk)
                    )
                ).all()
            )
            mismatched += sum(int(n_rows.get(s, 0)) != int(n_obs.get(s) or 0) for s in chunk)
    return mismatched


def night_stats_mismatches(
    bind: Bind, nights: Iterable[str], *, exclude_flags: int = DEFAULT_EXCLUDED_FLAGS
) -> int:
    """Inconsistencies the statistics stage of ``nights`` could have introduced, found at a cost
    bounded by those nights (the full-history check is :func:`stats_photometry_mismatches`).

    Counts (source, night) pairs of ``nights`` whose ``source_night_sums.n_obs`` differs from
    that night's usable photometry rows (none of the ``exclude_flags`` bits; a row missing on
    either side counts), plus sources of those nights whose ``variability_stats.n_obs`` differs
    from their ``source_sums.n_obs``.
    """
    mismatched = 0
    usable = usable_rows(exclude_flags)
    with reading(bind) as conn:
        for chunk in chunks(unique_str(nights)):
            rows = {
                (r.source_id, r.night): r.n
                for r in conn.execute(
                    sa.select(photometry.c.source_id, images.c.night, sa.func.count().label("n"))
                    .join(images, images.c.path == photometry.c.image_path)
                    .where(images.c.night.in_(chunk), usable)
                    .group_by(photometry.c.source_id, images.c.night)
                )
            }
            sums = {
                (r.source_id, r.night): r.n_obs
                for r in conn.execute(
                    sa.select(
                        source_night_sums.c.source_id,
                        source_night_sums.c.night,
                        source_night_sums.c.n_obs,
                    ).where(source_night_sums.c.night.in_(chunk))
                )
            }
            mismatched += sum(rows.get(k, 0) != sums.get(k, 0) for k in rows.keys() | sums.keys())
            night_sources = sa.select(source_night_sums.c.source_id).where(
                source_night_sums.c.night.in_(chunk)
            )
            mismatched += conn.execute(
                sa.select(sa.func.count())
                .select_from(
                    stats_table.join(
                        sums_table, sums_table.c.source_id == stats_table.c.source_id, isouter=True
                    )
                )
                .where(
                    stats_table.c.source_id.in_(night_sources),
                    sa.or_(sums_table.c.n_obs.is_(None), sums_table.c.n_obs != stats_table.c.n_obs),
                )
            ).scalar_one()
    return mismatched
