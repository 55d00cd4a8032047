"""The functions that read and write the products tables (SQLAlchemy Core, SQLite and PostgreSQL).

Rules every function follows:

* Bound parameters only: values never enter SQL text, so paths or source IDs containing quotes or
  semicolons are data, not syntax.
* One transaction per unit of work: each write function runs in a single :func:`begin_write`
  transaction, so a crash leaves the state before or after the call, never a mix.
* ``IN`` lists are chunked to at most :data:`CHUNK_SIZE` values (SQLite's historical limit of 999
  bound parameters per statement; PostgreSQL plans long IN lists badly).
* Reads return pandas DataFrames whose dtypes follow the table columns (``float64`` for Float,
  ``int64`` for NOT NULL integers, nullable ``Int64`` otherwise, ``str`` for text), also when empty.
* Processing times (``registered_at``, ``measured_at``, ``updated_at``, ``flagged_at``...) are Unix
  seconds (``time.time()``); ``mjd`` columns are observation times from the FITS headers.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine

from ese_assets.storage.engine import begin_write
from ese_assets.storage.schema import (
    CANDIDATE_STATUSES,
    IMAGE_STATUSES,
    ese_candidates,
    images,
    metadata,
    photometry,
    source_night_sums,
    source_sums,
)
from ese_assets.storage.schema import variability_stats as stats_table

#: Maximum number of values in one ``IN (...)`` list.
CHUNK_SIZE = 500

#: Candidate statuses that count as "open" (at most one open candidate per source).
OPEN_CANDIDATE_STATUSES = ("active", "investigated")

#: Columns of :func:`lightcurves` / :func:`lightcurves_for_nights`, in order.
LIGHTCURVE_COLUMNS = ("source_id", "mjd", "peak_jyb", "peak_err_jyb", "ra_deg", "dec_deg",
                      "nvss_flux_mjy", "image_path", "measured_at", "quality_flag")

#: variability_stats columns joined onto :func:`candidates` for display.
CANDIDATE_STATS_COLUMNS = ("ra_deg", "dec_deg", "nvss_flux_mjy", "mean_flux_mjy", "std_flux_mjy",
                           "chi2_nu", "n_obs", "last_mjd", "eta_metric")

#: Columns :func:`table_snapshot` leaves out by default: surrogate keys and processing times, which
#: differ between two otherwise identical runs.
SNAPSHOT_EXCLUDE = ("id", "measured_at", "updated_at", "flagged_at", "registered_at")

_DEFAULT_NIGHT_STATUSES = ("pending", "queued", "measured", "failed")


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

def _now() -> float:
    return time.time()


def _chunks(values: Sequence[Any], size: int = CHUNK_SIZE) -> Iterator[list[Any]]:
    for start in range(0, len(values), size):
        yield list(values[start:start + size])


def _unique_str(values: Iterable[Any] | str | None) -> list[str]:
    """Distinct values as Python ``str``, sorted (deterministic chunks and lock order)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return sorted({str(v) for v in values})


def _py_scalar(value: Any) -> Any:
    """A numpy/pandas scalar as the plain Python value a DBAPI driver accepts; NaN/NA -> None."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    elif value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _column_values(series: pd.Series) -> list[Any]:
    """One column as Python values for the DBAPI driver (float/int/bool/str), missing -> None.

    Floats are converted in one numpy operation (``astype(object)`` yields Python floats); the
    other dtypes are few and short columns.
    """
    missing = pd.isna(series).to_numpy()
    dtype = series.dtype
    if pd.api.types.is_float_dtype(dtype):
        out = series.to_numpy(dtype=np.float64, na_value=np.nan).astype(object)
        out[missing] = None
        return out.tolist()
    if pd.api.types.is_bool_dtype(dtype):
        return [None if m else bool(v) for v, m in zip(series.to_numpy(dtype=object), missing)]
    if pd.api.types.is_integer_dtype(dtype):
        return [None if m else int(v) for v, m in zip(series.to_numpy(dtype=object), missing)]
    return [None if m else _py_scalar(v) for v, m in zip(series.to_numpy(dtype=object), missing)]


def _frame_records(df: pd.DataFrame, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of ``df[columns]`` as a list of dicts of Python scalars (for ``executemany``)."""
    if len(df) == 0:
        return []
    converted = [_column_values(df[c]) for c in columns]
    return [dict(zip(columns, row)) for row in zip(*converted)]


def _clean_mapping(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _py_scalar(v) for k, v in values.items()}


def _check_columns(table: sa.Table, keys: Iterable[str], what: str) -> None:
    unknown = sorted(set(keys) - set(table.c.keys()))
    if unknown:
        raise ValueError(f"{what}: unknown {table.name} column(s) {unknown}; "
                         f"known columns: {list(table.c.keys())}")


def _dtype_for(column: sa.ColumnElement[Any]) -> Any:
    type_ = column.type
    if isinstance(type_, sa.Float):
        return "float64"
    if isinstance(type_, sa.Integer):  # includes BigInteger
        nullable = getattr(column, "nullable", True)
        if isinstance(column, sa.Column) and not nullable:
            return "int64"
        return "Int64"
    if isinstance(type_, (sa.String, sa.Text)):
        return "str"
    return None


def _read(conn: Connection, stmt: sa.Select[Any]) -> pd.DataFrame:
    """Run a SELECT and return a DataFrame typed after the selected columns (also when empty)."""
    result = conn.execute(stmt)
    names = list(result.keys())
    # Plain tuples: building a DataFrame from Row objects probes each row's attributes and took
    # twice as long (benchmarks/bench_variability.py).
    rows = [tuple(row) for row in result.fetchall()]
    frame = pd.DataFrame(rows, columns=names) if rows else pd.DataFrame(
        {name: [] for name in names})
    dtypes: dict[str, Any] = {}
    for name, column in zip(names, stmt.selected_columns):
        base = column
        # A labelled table column keeps the table column's nullability for the dtype decision.
        if isinstance(column, sa.sql.elements.Label):
            base = column.element
        dtype = _dtype_for(base)
        if dtype is not None:
            dtypes[name] = dtype
    for name, dtype in dtypes.items():
        if dtype == "int64" and frame[name].isna().any():
            dtype = "Int64"  # an outer join produced NULLs in a NOT NULL column
        frame[name] = frame[name].astype(dtype)
    return frame


def _read_chunked(conn: Connection, make_stmt: Callable[[list[Any]], sa.Select[Any]],
                  values: Sequence[Any]) -> pd.DataFrame:
    """Concatenate ``make_stmt(chunk)`` over chunks of ``values`` (caller sorts the result)."""
    frames = [_read(conn, make_stmt(chunk)) for chunk in _chunks(values)]
    if len(frames) == 1:
        return frames[0]
    return pd.concat(frames, ignore_index=True)


@contextlib.contextmanager
def _writing(bind: Engine | Connection) -> Iterator[Connection]:
    """A connection to write with: the caller's (inside its transaction) or a new write unit."""
    if isinstance(bind, Connection):
        yield bind
    else:
        with begin_write(bind) as conn:
            yield conn


@contextlib.contextmanager
def _reading(bind: Engine | Connection) -> Iterator[Connection]:
    """A connection to read with: the caller's (sees its uncommitted writes) or a new one."""
    if isinstance(bind, Connection):
        yield bind
    else:
        with bind.connect() as conn:
            yield conn


def _read_all_or_chunked(engine: Engine, make_stmt: Callable[[list[Any] | None], sa.Select[Any]],
                         values: Iterable[str] | None) -> pd.DataFrame:
    """``make_stmt(None)`` (no filter) when ``values`` is None, else chunked ``make_stmt(chunk)``."""
    with engine.connect() as conn:
        if values is None:
            return _read(conn, make_stmt(None))
        wanted = _unique_str(values)
        if not wanted:
            return _read(conn, make_stmt([]))
        return _read_chunked(conn, make_stmt, wanted)


def _dialect_insert(conn: Connection, table: sa.Table):  # noqa: ANN202
    name = conn.dialect.name
    if name == "sqlite":
        return sqlite_dialect.insert(table)
    if name == "postgresql":
        return pg_dialect.insert(table)
    raise NotImplementedError(f"unsupported database dialect {name!r} (use SQLite or PostgreSQL)")


def _status_list(status: str | Iterable[str] | None, allowed: Sequence[str],
                 what: str) -> list[str] | None:
    if status is None:
        return None
    values = [status] if isinstance(status, str) else list(status)
    bad = sorted(set(values) - set(allowed))
    if bad:
        raise ValueError(f"invalid {what} {bad}; expected one of {list(allowed)}")
    return values


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------

def known_image_paths(engine: Engine, paths: Iterable[str]) -> set[str]:
    """The subset of ``paths`` already registered in ``images`` (any status)."""
    wanted = _unique_str(paths)
    found: set[str] = set()
    if not wanted:
        return found
    with engine.connect() as conn:
        for chunk in _chunks(wanted):
            found.update(conn.execute(
                sa.select(images.c.path).where(images.c.path.in_(chunk))).scalars())
    return found


def rejected_file_states(engine: Engine, paths: Iterable[str]) -> dict[str, tuple[Any, Any]]:
    """``{path: (file_size, file_mtime)}`` recorded for the rejected images among ``paths``."""
    wanted = _unique_str(paths)
    states: dict[str, tuple[Any, Any]] = {}
    with engine.connect() as conn:
        for chunk in _chunks(wanted):
            rows = conn.execute(
                sa.select(images.c.path, images.c.file_size, images.c.file_mtime)
                .where(images.c.path.in_(chunk), images.c.status == "rejected"))
            states.update({r.path: (r.file_size, r.file_mtime) for r in rows})
    return states


def forget_rejected_images(engine: Engine, paths: Iterable[str]) -> int:
    """Delete the ``rejected`` rows of ``paths`` (so the files are examined again); returns count.

    Only rejected rows are touched: a measured image keeps its row and its photometry.
    """
    wanted = _unique_str(paths)
    deleted = 0
    with begin_write(engine) as conn:
        for chunk in _chunks(wanted):
            deleted += conn.execute(
                sa.delete(images).where(images.c.path.in_(chunk),
                                        images.c.status == "rejected")).rowcount
    return deleted


def register_images(engine: Engine, records: list[dict[str, Any]]) -> int:
    """Insert ``images`` rows; a path already present is left untouched. Returns rows inserted.

    Each record needs ``path``; ``status`` defaults to ``"pending"`` and ``registered_at`` to now.
    Other keys must be ``images`` columns (a typo raises ValueError rather than silently dropping
    data). Uses ``INSERT ... ON CONFLICT (path) DO NOTHING`` so concurrent sensors cannot race.
    """
    if not records:
        return 0
    now = _now()
    by_path: dict[str, dict[str, Any]] = {}
    keys: set[str] = {"path", "status", "registered_at"}
    for record in records:
        if "path" not in record or record["path"] is None:
            raise ValueError(f"register_images: record without path: {record!r}")
        _check_columns(images, record.keys(), "register_images")
        if "id" in record:
            raise ValueError("register_images: 'id' is assigned by the database")
        row = _clean_mapping(record)
        row["path"] = str(row["path"])
        row.setdefault("status", "pending")
        if row.get("registered_at") is None:
            row["registered_at"] = now
        if row["status"] not in IMAGE_STATUSES:
            raise ValueError(f"register_images: invalid status {row['status']!r} for {row['path']}")
        by_path.setdefault(row["path"], row)  # first record of a duplicated path wins
        keys.update(row.keys())
    # executemany needs the same keys in every parameter set.
    rows = [{k: row.get(k) for k in sorted(keys)} for _, row in sorted(by_path.items())]
    with begin_write(engine) as conn:
        stmt = (_dialect_insert(conn, images)
                .on_conflict_do_nothing(index_elements=[images.c.path])
                .returning(images.c.path))
        inserted = 0
        for chunk in _chunks(rows):
            inserted += len(conn.execute(stmt, chunk).all())
    return inserted


def set_image_status(engine: Engine, paths: Iterable[str], status: str,
                     reason: str | None = None) -> int:
    """Set ``status`` and ``reason`` (cleared when None) of the given images; returns rows updated."""
    if status not in IMAGE_STATUSES:
        raise ValueError(f"invalid image status {status!r}; expected one of {list(IMAGE_STATUSES)}")
    wanted = _unique_str(paths)
    updated = 0
    if not wanted:
        return 0
    with begin_write(engine) as conn:
        for chunk in _chunks(wanted):
            result = conn.execute(images.update().where(images.c.path.in_(chunk))
                                  .values(status=status, reason=reason))
            updated += result.rowcount
    return updated


def mark_image_failed(engine: Engine, path: str, reason: str) -> int:
    """Set an image to ``failed`` with the reason (its previous photometry rows, if any, stay)."""
    return set_image_status(engine, [path], "failed", reason=reason)


def pending_images(engine: Engine) -> pd.DataFrame:
    """Images registered but not yet queued: DataFrame[path, night], ordered by night, path."""
    stmt = (sa.select(images.c.path, images.c.night)
            .where(images.c.status == "pending")
            .order_by(images.c.night, images.c.path))
    with engine.connect() as conn:
        return _read(conn, stmt)


def night_images(engine: Engine, night: str,
                 statuses: Sequence[str] | str | None = _DEFAULT_NIGHT_STATUSES) -> pd.DataFrame:
    """All ``images`` columns of a night's images with one of ``statuses`` (None: any), by mjd."""
    wanted = _status_list(statuses, IMAGE_STATUSES, "image status")
    stmt = sa.select(images).where(images.c.night == str(night))
    if wanted is not None:
        stmt = stmt.where(images.c.status.in_(wanted))
    stmt = stmt.order_by(images.c.mjd, images.c.path)
    with engine.connect() as conn:
        return _read(conn, stmt)


def rejected_images(engine: Engine, night: str | None = None,
                    since: float | None = None) -> pd.DataFrame:
    """Rejected files: DataFrame[path, night, reason, registered_at], newest first.

    ``night`` filters on the partition, ``since`` on ``registered_at >= since`` (Unix seconds).
    """
    stmt = (sa.select(images.c.path, images.c.night, images.c.reason, images.c.registered_at)
            .where(images.c.status == "rejected"))
    if night is not None:
        stmt = stmt.where(images.c.night == str(night))
    if since is not None:
        stmt = stmt.where(images.c.registered_at >= float(since))
    stmt = stmt.order_by(images.c.registered_at.desc(), images.c.path)
    with engine.connect() as conn:
        return _read(conn, stmt)


def image_counts_by_status(engine: Engine, night: str | None = None, *,
                           nights: Iterable[str] | None = None) -> dict[str, int]:
    """Images per status (every status present, zeros included).

    ``night`` (one partition) and/or ``nights`` (several) restrict the count; neither: all images.
    """
    wanted = _unique_str(nights) if nights is not None else None
    if night is not None:
        wanted = sorted(set(wanted or []) | {str(night)}) if nights is not None else [str(night)]
    counts = {status: 0 for status in IMAGE_STATUSES}
    with engine.connect() as conn:
        chunks = [None] if wanted is None else list(_chunks(wanted))
        for chunk in chunks:
            stmt = sa.select(images.c.status, sa.func.count()).group_by(images.c.status)
            if chunk is not None:
                stmt = stmt.where(images.c.night.in_(chunk))
            for status, count in conn.execute(stmt):
                counts[status] = counts.get(status, 0) + int(count)
    return counts


def images_near_mjd(engine: Engine, mjd_min: float, mjd_max: float) -> pd.DataFrame:
    """Usable (not rejected) images with ``mjd_min <= mjd <= mjd_max``, for duplicate detection.

    Columns: path, night, mjd, ra_center_deg, dec_center_deg, status; ordered by mjd, path.
    """
    stmt = (sa.select(images.c.path, images.c.night, images.c.mjd, images.c.ra_center_deg,
                      images.c.dec_center_deg, images.c.status)
            .where(images.c.mjd >= float(mjd_min), images.c.mjd <= float(mjd_max),
                   images.c.status != "rejected")
            .order_by(images.c.mjd, images.c.path))
    with engine.connect() as conn:
        return _read(conn, stmt)


# --------------------------------------------------------------------------------------------------
# photometry
# --------------------------------------------------------------------------------------------------

_PHOTOMETRY_WRITE_COLUMNS = tuple(c for c in photometry.c.keys() if c != "id")


def replace_image_photometry(engine: Engine, image_path: str, rows: pd.DataFrame,
                             image_update: Mapping[str, Any] | None = None) -> int:
    """Replace all photometry of one image and mark it measured, in ONE transaction.

    Steps: update the ``images`` row with ``image_update`` plus ``status='measured'``,
    ``measured_at=now``, ``reason=NULL`` (this also locks the row on PostgreSQL, so two runs
    measuring the same image serialise instead of colliding); delete the image's photometry rows;
    bulk-insert ``rows`` (``executemany``). Any error rolls everything back: the database keeps
    either the old rows or the new ones, never a mix. Re-measuring an image therefore replaces its
    rows (idempotent).

    ``rows`` columns: photometry columns without ``id``. ``image_path`` defaults to ``image_path``
    (must match when given), ``measured_at`` to now, ``quality_flag`` to 0. NaN becomes NULL, so a
    NaN ``peak_jyb`` (NOT NULL) makes the whole call fail; callers drop unmeasurable sources first.
    Returns the number of rows inserted. Raises ValueError if the image is not registered.
    """
    image_path = str(image_path)
    update = _clean_mapping(dict(image_update or {}))
    _check_columns(images, update.keys(), "replace_image_photometry image_update")
    for forbidden in ("id", "path"):
        if forbidden in update:
            raise ValueError(f"replace_image_photometry: image_update cannot set {forbidden!r}")
    _check_columns(photometry, rows.columns, "replace_image_photometry rows")
    if "id" in rows.columns:
        raise ValueError("replace_image_photometry: 'id' is assigned by the database")

    now = _now()
    frame = rows.copy()
    if "image_path" in frame.columns:
        other = set(frame["image_path"].dropna().astype(str)) - {image_path}
        if other:
            raise ValueError(f"replace_image_photometry({image_path!r}): rows name other images "
                             f"{sorted(other)[:3]}")
    frame["image_path"] = image_path
    if "measured_at" not in frame.columns:
        frame["measured_at"] = now
    if "quality_flag" not in frame.columns:
        frame["quality_flag"] = 0
    columns = [c for c in _PHOTOMETRY_WRITE_COLUMNS if c in frame.columns]
    records = _frame_records(frame, columns)

    update.update(status="measured", reason=None, measured_at=now)
    with begin_write(engine) as conn:
        result = conn.execute(images.update().where(images.c.path == image_path).values(**update))
        if result.rowcount == 0:
            raise ValueError(f"replace_image_photometry: image {image_path!r} is not registered")
        conn.execute(photometry.delete().where(photometry.c.image_path == image_path))
        if records:
            conn.execute(photometry.insert(), records)
    return len(records)


def _lightcurve_select() -> sa.Select[Any]:
    return sa.select(*(photometry.c[c] for c in LIGHTCURVE_COLUMNS))


def lightcurves(engine: Engine, source_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Photometry of the given sources (all when None), ordered by source_id, mjd.

    Columns: :data:`LIGHTCURVE_COLUMNS` (peak fluxes in Jy/beam, as measured).
    """
    order = (photometry.c.source_id, photometry.c.mjd, photometry.c.image_path)
    with engine.connect() as conn:
        if source_ids is None:
            return _read(conn, _lightcurve_select().order_by(*order))
        wanted = _unique_str(source_ids)
        if not wanted:
            return _read(conn, _lightcurve_select().where(sa.false()))
        frame = _read_chunked(
            conn, lambda chunk: _lightcurve_select().where(photometry.c.source_id.in_(chunk))
            .order_by(*order), wanted)
    # Chunks are sorted source lists, so concatenating them keeps (source_id, mjd) order.
    return frame.reset_index(drop=True)


def _night_sources_subquery(nights: list[str]) -> sa.Select[Any]:
    return (sa.select(photometry.c.source_id)
            .join(images, images.c.path == photometry.c.image_path)
            .where(images.c.night.in_(nights))
            .distinct())


def sources_measured_in_nights(engine: Engine, nights: Iterable[str]) -> list[str]:
    """Sorted distinct source_ids with photometry from an image of one of ``nights``."""
    wanted = _unique_str(nights)
    found: set[str] = set()
    with engine.connect() as conn:
        for chunk in _chunks(wanted):
            found.update(conn.execute(_night_sources_subquery(chunk)).scalars())
    return sorted(found)


def lightcurves_for_nights(engine: Engine, nights: Iterable[str]) -> pd.DataFrame:
    """Full history (all nights) of every source measured in ``nights``, ordered by source_id, mjd.

    One query: ``... WHERE source_id IN (SELECT DISTINCT source_id FROM photometry JOIN images ...
    WHERE night IN (:nights))``; the database uses ix_photometry_source_mjd for the outer lookup.
    More than :data:`CHUNK_SIZE` nights are split into several such queries and de-duplicated.
    """
    wanted = _unique_str(nights)
    order = (photometry.c.source_id, photometry.c.mjd, photometry.c.image_path)

    def make_stmt(chunk: list[str]) -> sa.Select[Any]:
        return (_lightcurve_select()
                .where(photometry.c.source_id.in_(_night_sources_subquery(chunk)))
                .order_by(*order))

    with engine.connect() as conn:
        if len(wanted) <= CHUNK_SIZE:
            return _read(conn, make_stmt(wanted))
        frame = _read_chunked(conn, make_stmt, wanted)
    frame = frame.drop_duplicates(subset=["image_path", "source_id"])
    frame = frame.sort_values(["source_id", "mjd", "image_path"], kind="mergesort")
    return frame.reset_index(drop=True)


def photometry_counts(engine: Engine, night: str | None = None) -> int:
    """Number of photometry rows, in total or from images of one night."""
    stmt = sa.select(sa.func.count()).select_from(photometry)
    if night is not None:
        stmt = (sa.select(sa.func.count())
                .select_from(photometry.join(images, images.c.path == photometry.c.image_path))
                .where(images.c.night == str(night)))
    with engine.connect() as conn:
        return int(conn.execute(stmt).scalar_one())


def measured_source_ids(engine: Engine) -> list[str]:
    """Sorted distinct source_ids that have at least one photometry row."""
    with engine.connect() as conn:
        return list(conn.execute(sa.select(photometry.c.source_id).distinct()
                                 .order_by(photometry.c.source_id)).scalars())


def night_photometry_summary(engine: Engine, nights: Iterable[str]) -> dict[str, int]:
    """Counts over the photometry of images of ``nights`` (for asset metadata and checks).

    Keys: ``n_images`` (images with rows), ``n_sources`` (distinct sources), ``n_rows``,
    ``n_bad_errors`` (rows whose ``peak_err_jyb`` is NULL or <= 0: unusable in chi2/eta),
    ``n_flagged`` (rows with a non-zero ``quality_flag``).
    """
    wanted = _unique_str(nights)
    summary = {"n_images": 0, "n_sources": 0, "n_rows": 0, "n_bad_errors": 0, "n_flagged": 0}
    if not wanted:
        return summary
    joined = photometry.join(images, images.c.path == photometry.c.image_path)
    bad = sa.or_(photometry.c.peak_err_jyb.is_(None), photometry.c.peak_err_jyb <= 0)
    sources: set[str] = set()
    with engine.connect() as conn:
        for chunk in _chunks(wanted):
            in_nights = images.c.night.in_(chunk)
            row = conn.execute(
                sa.select(sa.func.count(sa.distinct(photometry.c.image_path)),
                          sa.func.count(),
                          sa.func.coalesce(sa.func.sum(sa.case((bad, 1), else_=0)), 0),
                          sa.func.coalesce(sa.func.sum(
                              sa.case((photometry.c.quality_flag != 0, 1), else_=0)), 0))
                .select_from(joined).where(in_nights)).one()
            summary["n_images"] += int(row[0])
            summary["n_rows"] += int(row[1])
            summary["n_bad_errors"] += int(row[2])
            summary["n_flagged"] += int(row[3])
            sources.update(conn.execute(_night_sources_subquery(chunk)).scalars())
    summary["n_sources"] = len(sources)
    return summary


# --------------------------------------------------------------------------------------------------
# variability_stats
# --------------------------------------------------------------------------------------------------

def upsert_variability_stats(engine: Engine | Connection, stats: pd.DataFrame) -> int:
    """Insert or update one ``variability_stats`` row per source; returns the rows written.

    ``INSERT ... ON CONFLICT (source_id) DO UPDATE SET`` every given column (columns of ``stats``
    that are not table columns are ignored; ``updated_at`` defaults to now). Rows are written in
    source_id order so concurrent transactions lock rows in the same order and cannot deadlock
    (PostgreSQL). Duplicate source_ids raise ValueError. NaN becomes NULL. ``engine`` may be a
    Connection, to write inside the caller's transaction.
    """
    if "source_id" not in stats.columns:
        raise ValueError("upsert_variability_stats: stats has no source_id column")
    if len(stats) == 0:
        return 0
    frame = stats[[c for c in stats.columns if c in stats_table.c]].copy()
    frame["source_id"] = frame["source_id"].astype(str)
    duplicated = frame["source_id"].duplicated()
    if duplicated.any():
        raise ValueError("upsert_variability_stats: duplicate source_id "
                         f"{sorted(frame.loc[duplicated, 'source_id'].unique())[:5]}")
    if "updated_at" not in frame.columns:
        frame["updated_at"] = _now()
    frame = frame.sort_values("source_id", kind="mergesort")
    columns = [c for c in stats_table.c.keys() if c in frame.columns]
    records = _frame_records(frame, columns)
    with _writing(engine) as conn:
        insert = _dialect_insert(conn, stats_table)
        stmt = insert.on_conflict_do_update(
            index_elements=[stats_table.c.source_id],
            set_={c: insert.excluded[c] for c in columns if c != "source_id"})
        for chunk in _chunks(records, 1000):
            conn.execute(stmt, chunk)
    return len(records)


def variability_stats(engine: Engine, source_ids: Iterable[str] | None = None,
                      min_n_obs: int | None = None) -> pd.DataFrame:
    """``variability_stats`` rows (all columns), optionally of some sources / n_obs >= min_n_obs."""
    table = stats_table

    def make_stmt(chunk: list[str] | None) -> sa.Select[Any]:
        stmt = sa.select(table)
        if chunk is not None:
            stmt = stmt.where(table.c.source_id.in_(chunk))
        if min_n_obs is not None:
            stmt = stmt.where(table.c.n_obs >= int(min_n_obs))
        return stmt.order_by(table.c.source_id)

    return _read_all_or_chunked(engine, make_stmt, source_ids).reset_index(drop=True)


def stats_photometry_mismatches(engine: Engine, source_ids: Iterable[str]) -> int:
    """Number of ``source_ids`` whose ``variability_stats.n_obs`` differs from their photometry rows.

    A source without a statistics row counts as n_obs = 0, one without photometry as 0 rows, so a
    missing row on either side is a mismatch (unless both are absent).
    """
    wanted = _unique_str(source_ids)
    mismatched = 0
    with engine.connect() as conn:
        for chunk in _chunks(wanted):
            n_rows = dict(conn.execute(
                sa.select(photometry.c.source_id, sa.func.count())
                .where(photometry.c.source_id.in_(chunk))
                .group_by(photometry.c.source_id)).all())
            n_obs = dict(conn.execute(
                sa.select(stats_table.c.source_id, stats_table.c.n_obs)
                .where(stats_table.c.source_id.in_(chunk))).all())
            mismatched += sum(int(n_rows.get(s, 0)) != int(n_obs.get(s) or 0) for s in chunk)
    return mismatched


def night_stats_mismatches(engine: Engine, nights: Iterable[str]) -> int:
    """Inconsistencies the statistics stage of ``nights`` could have introduced, found at a cost
    bounded by those nights (the full-history check is :func:`stats_photometry_mismatches`).

    Counts (source, night) pairs of ``nights`` whose ``source_night_sums.n_obs`` differs from
    that night's photometry rows (a row missing on either side counts), plus sources of those
    nights whose ``variability_stats.n_obs`` differs from their ``source_sums.n_obs``.
    """
    wanted = _unique_str(nights)
    mismatched = 0
    with engine.connect() as conn:
        for chunk in _chunks(wanted):
            rows = dict(((r.source_id, r.night), r.n) for r in conn.execute(
                sa.select(photometry.c.source_id, images.c.night, sa.func.count().label("n"))
                .join(images, images.c.path == photometry.c.image_path)
                .where(images.c.night.in_(chunk))
                .group_by(photometry.c.source_id, images.c.night)))
            sums = dict(((r.source_id, r.night), r.n_obs) for r in conn.execute(
                sa.select(source_night_sums.c.source_id, source_night_sums.c.night,
                          source_night_sums.c.n_obs)
                .where(source_night_sums.c.night.in_(chunk))))
            mismatched += sum(rows.get(k, 0) != sums.get(k, 0) for k in rows.keys() | sums.keys())
            night_sources = sa.select(source_night_sums.c.source_id).where(
                source_night_sums.c.night.in_(chunk))
            mismatched += conn.execute(
                sa.select(sa.func.count()).select_from(
                    stats_table.join(source_sums,
                                     source_sums.c.source_id == stats_table.c.source_id,
                                     isouter=True))
                .where(stats_table.c.source_id.in_(night_sources),
                       sa.or_(source_sums.c.n_obs.is_(None),
                              source_sums.c.n_obs != stats_table.c.n_obs))).scalar_one()
    return mismatched


# --------------------------------------------------------------------------------------------------
# source_night_sums / source_sums (incremental statistics; see pipeline.update_variability)
# --------------------------------------------------------------------------------------------------

#: Columns of :func:`night_photometry` / :func:`source_photometry`, in order.
NIGHT_PHOTOMETRY_COLUMNS = ("source_id", "night", "mjd", "peak_jyb", "peak_err_jyb",
                            "nvss_flux_mjy", "ra_deg", "dec_deg", "measured_at", "image_path")

#: Additive columns of the sums tables (core.variability.SUM_COLUMNS).
_ADDITIVE = ("n_obs", "n_bad_err", "sum_d", "sum_d2", "sum_w", "sum_wd", "sum_wd2")

# Arbitrary constant key of the PostgreSQL advisory lock that serialises writers of the sums.
_SUMS_LOCK_KEY = 0x45534556  # "ESEV"


@contextlib.contextmanager
def sums_transaction(engine: Engine) -> Iterator[Connection]:
    """The write transaction of one statistics update: read photometry and sums, write sums and stats.

    The update is read-compute-write (new night sums minus the stored ones), so two concurrent
    updates touching the same source could both apply their difference to the same old state.
    SQLite's ``BEGIN IMMEDIATE`` already serialises writers; on PostgreSQL a transaction-scoped
    advisory lock does, and every read inside the transaction then sees the previous holder's
    commit (READ COMMITTED). Released at commit or rollback, so a killed run leaves the old sums.
    """
    with begin_write(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SUMS_LOCK_KEY})
        yield conn


def _night_photometry_select() -> sa.Select[Any]:
    return (sa.select(*(images.c.night if c == "night" else photometry.c[c]
                        for c in NIGHT_PHOTOMETRY_COLUMNS))
            .select_from(photometry.join(images, images.c.path == photometry.c.image_path))
            .order_by(photometry.c.source_id, images.c.night, photometry.c.mjd,
                      photometry.c.image_path))


def _sorted_photometry(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["source_id", "night", "mjd", "image_path"],
                             kind="mergesort").reset_index(drop=True)


def _photometry_with_night_where(bind: Engine | Connection, column: sa.ColumnElement[Any],
                                 values: Iterable[str]) -> pd.DataFrame:
    """Photometry rows (with their night) whose ``column`` is one of ``values``, chunked IN."""
    wanted = _unique_str(values)
    with _reading(bind) as conn:
        if not wanted:
            return _read(conn, _night_photometry_select().where(sa.false()))
        frame = _read_chunked(conn, lambda chunk: _night_photometry_select()
                              .where(column.in_(chunk)), wanted)
    return _sorted_photometry(frame)


def night_photometry(bind: Engine | Connection, nights: Iterable[str]) -> pd.DataFrame:
    """Photometry rows of the images of ``nights`` only, with their night (one join, O(rows)).

    Columns :data:`NIGHT_PHOTOMETRY_COLUMNS`, ordered by source_id, night, mjd, image_path (a
    deterministic order, so sums over these rows are bit-reproducible).
    """
    return _photometry_with_night_where(bind, images.c.night, nights)


def source_photometry(bind: Engine | Connection, source_ids: Iterable[str]) -> pd.DataFrame:
    """The whole photometry history of ``source_ids`` with each row's night (the rebuild path).

    Columns and order as :func:`night_photometry`.
    """
    return _photometry_with_night_where(bind, photometry.c.source_id, source_ids)


def photometry_counts_by_source(bind: Engine | Connection,
                                source_ids: Iterable[str]) -> dict[str, int]:
    """``{source_id: number of photometry rows}`` (sources without rows are absent)."""
    counts: dict[str, int] = {}
    with _reading(bind) as conn:
        for chunk in _chunks(_unique_str(source_ids)):
            counts.update((str(s), int(n)) for s, n in conn.execute(
                sa.select(photometry.c.source_id, sa.func.count())
                .where(photometry.c.source_id.in_(chunk)).group_by(photometry.c.source_id)))
    return counts


def night_sums(bind: Engine | Connection, nights: Iterable[str] | None = None,
               source_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """``source_night_sums`` rows of ``nights`` or of ``source_ids`` (exactly one of them given),
    ordered by source_id, night."""
    if (nights is None) == (source_ids is None):
        raise ValueError("night_sums: give either nights or source_ids")
    column = source_night_sums.c.night if nights is not None else source_night_sums.c.source_id
    wanted = _unique_str(nights if nights is not None else source_ids)

    def make_stmt(chunk: list[str]) -> sa.Select[Any]:
        return sa.select(source_night_sums).where(column.in_(chunk))

    with _reading(bind) as conn:
        frame = _read_chunked(conn, make_stmt, wanted) if wanted else _read(conn, make_stmt([]))
    return frame.sort_values(["source_id", "night"], kind="mergesort").reset_index(drop=True)


def read_source_sums(bind: Engine | Connection,
                     source_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """``source_sums`` rows of ``source_ids`` (all when None), ordered by source_id."""
    def make_stmt(chunk: list[str] | None) -> sa.Select[Any]:
        stmt = sa.select(source_sums)
        if chunk is not None:
            stmt = stmt.where(source_sums.c.source_id.in_(chunk))
        return stmt.order_by(source_sums.c.source_id)

    with _reading(bind) as conn:
        if source_ids is None:
            return _read(conn, make_stmt(None))
        wanted = _unique_str(source_ids)
        frame = _read_chunked(conn, make_stmt, wanted) if wanted else _read(conn, make_stmt([]))
    return frame.reset_index(drop=True)


def _insert_rows(conn: Connection, table: sa.Table, rows: pd.DataFrame,
                 keys: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of ``rows`` as insert parameters for ``table`` (its columns only), sorted by ``keys``
    so concurrent writers lock rows in the same order (no deadlocks on PostgreSQL)."""
    frame = rows[[c for c in table.c.keys() if c in rows.columns]].copy()
    frame["source_id"] = frame["source_id"].astype(str)
    frame = frame.sort_values(list(keys), kind="mergesort")
    return _frame_records(frame, list(frame.columns))


def replace_night_sums(conn: Connection, rows: pd.DataFrame, *,
                       nights: Iterable[str] | None = None,
                       source_ids: Iterable[str] | None = None) -> int:
    """Delete the ``source_night_sums`` rows of ``nights`` or of ``source_ids`` and insert ``rows``.

    Runs in the caller's transaction (``conn``), so the night rows change together with the
    ``source_sums`` they were added to. Returns the rows inserted.
    """
    if (nights is None) == (source_ids is None):
        raise ValueError("replace_night_sums: give either nights or source_ids")
    column = source_night_sums.c.night if nights is not None else source_night_sums.c.source_id
    for chunk in _chunks(_unique_str(nights if nights is not None else source_ids)):
        conn.execute(source_night_sums.delete().where(column.in_(chunk)))
    records = _insert_rows(conn, source_night_sums, rows, ("source_id", "night"))
    for chunk in _chunks(records, 1000):
        conn.execute(source_night_sums.insert(), chunk)
    return len(records)


def _keep_smaller(column: str, excluded: Any) -> sa.ColumnElement[Any]:
    """``min(stored, new)`` with a missing new value keeping the stored one (portable CASE)."""
    old, new = source_sums.c[column], excluded[column]
    return sa.case((sa.or_(new < old, old.is_(None)), new), else_=old)


def _keep_larger(column: str, excluded: Any) -> sa.ColumnElement[Any]:
    old, new = source_sums.c[column], excluded[column]
    return sa.case((sa.or_(new > old, old.is_(None)), new), else_=old)


def add_source_sums(conn: Connection, deltas: pd.DataFrame) -> int:
    """Add per-source changes to ``source_sums`` in the caller's transaction; returns rows written.

    ``deltas``: one row per source with ``source_id, ra_deg, dec_deg, nvss_flux_mjy, shift_mjy,
    flux_scale_error``, the additive columns (amounts to ADD), ``min_flux_mjy, max_flux_mjy,
    first_mjd, last_mjd, last_measured_at`` of the new epochs (NaN when none). A new source is
    inserted as given. An existing one gets ``col = col + delta`` for the additive columns (in SQL,
    so the stored value is never read back and re-rounded in Python), its extremes widened
    (min/first can only fall, max/last/last_measured_at only rise; shrinking is
    :func:`refresh_source_extremes`), and its catalog columns taken from the newer epochs. Its
    ``shift_mjy`` and ``flux_scale_error`` are never changed here (the caller checks they match).
    """
    records = _insert_rows(conn, source_sums, deltas, ("source_id",))
    if not records:
        return 0
    insert = _dialect_insert(conn, source_sums)
    ex = insert.excluded
    newer = ex.last_mjd >= source_sums.c.last_mjd
    set_: dict[str, Any] = {c: source_sums.c[c] + ex[c] for c in _ADDITIVE}
    set_.update({c: _keep_smaller(c, ex) for c in ("min_flux_mjy", "first_mjd")})
    set_.update({c: _keep_larger(c, ex) for c in ("max_flux_mjy", "last_mjd", "last_measured_at")})
    # SET expressions see the stored row, so `newer` compares against the old last_mjd.
    set_.update({c: sa.case((newer, ex[c]), else_=source_sums.c[c])
                 for c in ("ra_deg", "dec_deg", "nvss_flux_mjy")})
    stmt = insert.on_conflict_do_update(index_elements=[source_sums.c.source_id], set_=set_)
    for chunk in _chunks(records, 1000):
        conn.execute(stmt, chunk)
    return len(records)


def put_source_sums(conn: Connection, rows: pd.DataFrame) -> int:
    """Insert or overwrite whole ``source_sums`` rows (the rebuild path), in the caller's transaction."""
    records = _insert_rows(conn, source_sums, rows, ("source_id",))
    if not records:
        return 0
    insert = _dialect_insert(conn, source_sums)
    stmt = insert.on_conflict_do_update(
        index_elements=[source_sums.c.source_id],
        set_={c: insert.excluded[c] for c in records[0] if c != "source_id"})
    for chunk in _chunks(records, 1000):
        conn.execute(stmt, chunk)
    return len(records)


def refresh_source_extremes(conn: Connection, source_ids: Iterable[str]) -> None:
    """Recompute min/max flux, first/last mjd and last_measured_at of ``source_ids`` in
    ``source_sums`` from their ``source_night_sums`` rows (one aggregate per source: O(nights)).

    Needed only when a night's extremes changed (re-measured photometry), since a stored minimum
    cannot be un-taken by arithmetic; the additive columns never need it.
    """
    night = source_night_sums.alias("n")

    def agg(func: Any, column: str) -> sa.ScalarSelect[Any]:
        return (sa.select(func(night.c[column])).where(night.c.source_id == source_sums.c.source_id)
                .scalar_subquery())

    values = {"min_flux_mjy": agg(sa.func.min, "min_flux_mjy"),
              "max_flux_mjy": agg(sa.func.max, "max_flux_mjy"),
              "first_mjd": agg(sa.func.min, "first_mjd"), "last_mjd": agg(sa.func.max, "last_mjd"),
              "last_measured_at": agg(sa.func.max, "last_measured_at")}
    for chunk in _chunks(_unique_str(source_ids)):
        conn.execute(source_sums.update().where(source_sums.c.source_id.in_(chunk))
                     .values(**values))


def delete_source_sums(conn: Connection, source_ids: Iterable[str], *,
                       only_empty: bool = False) -> int:
    """Delete the ``source_sums`` rows of ``source_ids`` (only those with n_obs <= 0 when
    ``only_empty``: every epoch of the source was removed); returns rows deleted."""
    deleted = 0
    for chunk in _chunks(_unique_str(source_ids)):
        stmt = source_sums.delete().where(source_sums.c.source_id.in_(chunk))
        if only_empty:
            stmt = stmt.where(source_sums.c.n_obs <= 0)
        deleted += conn.execute(stmt).rowcount
    return deleted


def window_photometry(bind: Engine | Connection, source_ids: Iterable[str],
                      window_days: float) -> pd.DataFrame:
    """Each source's epochs within ``window_days`` of its latest epoch (``source_sums.last_mjd``).

    ``WHERE photometry.mjd >= source_sums.last_mjd - :window``: a range scan of
    ix_photometry_source_mjd per source, so the rows read are bounded by the window, not by the
    history. Columns source_id, mjd, peak_jyb, peak_err_jyb; ordered by source_id, mjd, image_path.
    """
    window = float(window_days)
    order = (photometry.c.source_id, photometry.c.mjd, photometry.c.image_path)

    def make_stmt(chunk: list[str]) -> sa.Select[Any]:
        return (sa.select(photometry.c.source_id, photometry.c.mjd, photometry.c.peak_jyb,
                          photometry.c.peak_err_jyb)
                .select_from(photometry.join(source_sums,
                                             source_sums.c.source_id == photometry.c.source_id))
                .where(photometry.c.source_id.in_(chunk),
                       photometry.c.mjd >= source_sums.c.last_mjd - window)
                .order_by(*order))

    wanted = _unique_str(source_ids)
    with _reading(bind) as conn:
        frame = _read_chunked(conn, make_stmt, wanted) if wanted else _read(conn, make_stmt([]))
    return frame.reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# ese_candidates
# --------------------------------------------------------------------------------------------------

def candidates(engine: Engine, status: str | Iterable[str] | None = None,
               source_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Candidates (all ``ese_candidates`` columns) joined with display columns of their statistics.

    Added columns: :data:`CANDIDATE_STATS_COLUMNS` from ``variability_stats``. ``status`` is one
    status or several; ordered by significance (descending), then id.
    """
    wanted_status = _status_list(status, CANDIDATE_STATUSES, "candidate status")
    table = stats_table
    join = ese_candidates.outerjoin(table, table.c.source_id == ese_candidates.c.source_id)

    def make_stmt(chunk: list[str] | None) -> sa.Select[Any]:
        stmt = (sa.select(ese_candidates, *(table.c[c] for c in CANDIDATE_STATS_COLUMNS))
                .select_from(join))
        if wanted_status is not None:
            stmt = stmt.where(ese_candidates.c.status.in_(wanted_status))
        if chunk is not None:
            stmt = stmt.where(ese_candidates.c.source_id.in_(chunk))
        return stmt.order_by(ese_candidates.c.significance.desc(), ese_candidates.c.id)

    frame = _read_all_or_chunked(engine, make_stmt, source_ids)
    return frame.sort_values(["significance", "id"], ascending=[False, True],
                             kind="mergesort").reset_index(drop=True)


_EXISTING_COLUMNS = ("id", "source_id", "status", "significance", "dismissed_at", "flagged_at",
                     "last_night")


def existing_candidates(engine: Engine, source_ids: Iterable[str]) -> pd.DataFrame:
    """Every candidate row (open or dismissed) of the given sources, ordered by source_id, id.

    Columns: id, source_id, status, significance, dismissed_at, flagged_at, last_night.
    """
    wanted = _unique_str(source_ids)

    def make_stmt(chunk: list[str]) -> sa.Select[Any]:
        return (sa.select(*(ese_candidates.c[c] for c in _EXISTING_COLUMNS))
                .where(ese_candidates.c.source_id.in_(chunk))
                .order_by(ese_candidates.c.source_id, ese_candidates.c.id))

    with engine.connect() as conn:
        if not wanted:
            return _read(conn, make_stmt([]))
        return _read_chunked(conn, make_stmt, wanted).reset_index(drop=True)


_CANDIDATE_INSERT_DEFAULTS = {"flagged_by": "auto", "status": "active", "notes": None}


def apply_candidate_changes(engine: Engine, inserts: Sequence[Mapping[str, Any]],
                            updates: Sequence[Mapping[str, Any]]) -> None:
    """Apply a planned set of candidate changes in ONE transaction.

    ``updates``: dicts with ``id`` plus the columns to set (applied first, in id order, so that a
    candidate can be closed and a new one opened for the same source in the same call).
    ``inserts``: new rows; ``flagged_at`` defaults to now, ``flagged_by`` to "auto", ``status`` to
    "active". The partial unique index uq_ese_candidates_open_source rejects a second open candidate
    for a source (IntegrityError, nothing applied). Unknown columns raise ValueError.
    """
    now = _now()
    insert_rows: list[dict[str, Any]] = []
    for row in inserts:
        _check_columns(ese_candidates, row.keys(), "apply_candidate_changes insert")
        if "id" in row:
            raise ValueError("apply_candidate_changes: inserts cannot set 'id'")
        clean = {**_CANDIDATE_INSERT_DEFAULTS, **_clean_mapping(row)}
        if clean.get("flagged_at") is None:
            clean["flagged_at"] = now
        _status_list(clean["status"], CANDIDATE_STATUSES, "candidate status")
        insert_rows.append(clean)
    keys = sorted(set().union(*(r.keys() for r in insert_rows))) if insert_rows else []
    insert_rows = sorted(({k: r.get(k) for k in keys} for r in insert_rows),
                         key=lambda r: str(r.get("source_id")))

    # Group updates by the set of columns they change: one executemany per shape.
    update_groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in updates:
        _check_columns(ese_candidates, row.keys(), "apply_candidate_changes update")
        if "id" not in row or row["id"] is None:
            raise ValueError(f"apply_candidate_changes: update without id: {dict(row)!r}")
        clean = _clean_mapping(row)
        if "status" in clean:
            _status_list(clean["status"], CANDIDATE_STATUSES, "candidate status")
        columns = tuple(sorted(k for k in clean if k != "id"))
        if not columns:
            continue
        params = {f"v_{k}": clean[k] for k in columns}
        params["b_id"] = int(clean["id"])
        update_groups.setdefault(columns, []).append(params)

    with begin_write(engine) as conn:
        for columns, params in update_groups.items():
            stmt = (ese_candidates.update()
                    .where(ese_candidates.c.id == sa.bindparam("b_id"))
                    .values({c: sa.bindparam(f"v_{c}") for c in columns}))
            conn.execute(stmt, sorted(params, key=lambda p: p["b_id"]))
        if insert_rows:
            conn.execute(ese_candidates.insert(), insert_rows)


def set_candidate_status(engine: Engine, source_id: str, status: str, *,
                         notes: str | None = None, by: str = "user") -> int:
    """Move the open candidate of ``source_id`` to ``investigated`` or ``dismissed``; return its id.

    Sets ``investigated_at`` or ``dismissed_at`` to now and appends a line
    ``"<UTC time> <by>: <status>[: <notes>]"`` to ``notes`` (an audit trail of who changed what).
    Raises ValueError for another status or when the source has no open (active/investigated)
    candidate.
    """
    if status not in ("investigated", "dismissed"):
        raise ValueError(f"invalid candidate status {status!r}: a candidate can be set to "
                         "'investigated' or 'dismissed' (new candidates are 'active')")
    now = _now()
    stamp = _dt.datetime.fromtimestamp(now, tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    line = f"{stamp} {by}: {status}" + (f": {notes}" if notes else "")
    with begin_write(engine) as conn:
        row = conn.execute(
            sa.select(ese_candidates.c.id, ese_candidates.c.notes)
            .where(ese_candidates.c.source_id == str(source_id),
                   ese_candidates.c.status.in_(OPEN_CANDIDATE_STATUSES))
            .with_for_update()).first()
        if row is None:
            raise ValueError(f"source {source_id!r} has no open (active or investigated) ESE "
                             "candidate")
        values: dict[str, Any] = {"status": status,
                                  "notes": f"{row.notes}\n{line}" if row.notes else line}
        values["investigated_at" if status == "investigated" else "dismissed_at"] = now
        conn.execute(ese_candidates.update().where(ese_candidates.c.id == row.id).values(**values))
    return int(row.id)


def candidate_problems(engine: Engine, limit: int = 20) -> list[str]:
    """Human-readable problems in ``ese_candidates`` (empty list: all sane), at most ``limit``.

    Checks: at most one open candidate per source (also enforced by the partial unique index;
    checked here in case the index is missing from an old database), every candidate has a
    statistics row, significance is finite and > 0.
    """
    problems: list[str] = []
    open_ = ese_candidates.c.status.in_(OPEN_CANDIDATE_STATUSES)
    with engine.connect() as conn:
        for source_id, n in conn.execute(
                sa.select(ese_candidates.c.source_id, sa.func.count())
                .where(open_).group_by(ese_candidates.c.source_id)
                .having(sa.func.count() > 1).order_by(ese_candidates.c.source_id).limit(limit)):
            problems.append(f"{source_id}: {n} open candidates")
        for cid, source_id in conn.execute(
                sa.select(ese_candidates.c.id, ese_candidates.c.source_id)
                .select_from(ese_candidates.outerjoin(
                    stats_table, stats_table.c.source_id == ese_candidates.c.source_id))
                .where(stats_table.c.source_id.is_(None))
                .order_by(ese_candidates.c.id).limit(limit)):
            problems.append(f"{source_id}: candidate {cid} has no variability_stats row")
        frame = _read(conn, sa.select(ese_candidates.c.id, ese_candidates.c.source_id,
                                      ese_candidates.c.significance))
    significance = frame["significance"].to_numpy(dtype=float)
    bad = ~(np.isfinite(significance) & (significance > 0))
    for cid, source_id, value in frame.loc[bad].head(limit).itertuples(index=False):
        problems.append(f"{source_id}: candidate {cid} has significance {value}")
    return problems[:limit]


# --------------------------------------------------------------------------------------------------
# Snapshots (tests: "run twice" / "killed and re-run" give the same state)
# --------------------------------------------------------------------------------------------------

#: Natural keys that :func:`table_snapshot` sorts by first (readable diffs), then all other columns.
_SNAPSHOT_SORT_KEYS = {"images": ("path",), "photometry": ("image_path", "source_id"),
                       "variability_stats": ("source_id",), "ese_candidates": ("source_id",),
                       "source_night_sums": ("source_id", "night"), "source_sums": ("source_id",)}


def table_snapshot(engine: Engine, table_name: str,
                   exclude: Sequence[str] = SNAPSHOT_EXCLUDE) -> pd.DataFrame:
    """Whole table without the ``exclude`` columns, sorted deterministically, index 0..n-1.

    Sort order: the table's natural key (images.path; photometry image_path, source_id;
    source_id otherwise), then every remaining column in table order, so rows that differ only in an
    excluded column still sort the same way. Two snapshots compare with
    ``pandas.testing.assert_frame_equal``; the sort happens in pandas, so NULLs sort last on both
    backends.
    """
    if table_name not in metadata.tables:
        raise ValueError(f"unknown table {table_name!r}; tables: {sorted(metadata.tables)}")
    table = metadata.tables[table_name]
    excluded = set(exclude)
    columns = [c for c in table.c if c.key not in excluded]
    with engine.connect() as conn:
        frame = _read(conn, sa.select(*columns))
    keys = [k for k in _SNAPSHOT_SORT_KEYS.get(table_name, ()) if k in frame.columns]
    order = keys + [c for c in frame.columns if c not in keys]
    if not order or len(frame) == 0:
        return frame.reset_index(drop=True)
    return frame.sort_values(order, kind="mergesort", na_position="last").reset_index(drop=True)
