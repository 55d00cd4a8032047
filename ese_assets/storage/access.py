"""The small DataFrame <-> SQL layer under the table modules (images, photometry, statistics,
candidates).

Conventions every table module follows:

* Public functions take ``bind: Engine | Connection`` first. An Engine means "open my own
  connection" (reads) or "my own write transaction" (writes, :func:`writing`); a Connection means
  "inside the caller's transaction" (its uncommitted writes are seen and rolled back together).
* Names: reads are nouns for what they return (``pending_images``, ``lightcurves``); writes are
  verbs (``register_images``, ``replace_image_photometry``, ``add_source_sums``).
* Bound parameters only: values never enter SQL text, so paths or source IDs containing quotes or
  semicolons are data, not syntax.
* One transaction per unit of work: each write runs in one :func:`writing` transaction, so a crash
  leaves the state before or after the call, never a mix.
* ``IN`` lists are chunked to at most :data:`CHUNK_SIZE` values (SQLite's historical limit of 999
  bound parameters per statement; PostgreSQL plans long IN lists badly).
* Reads return pandas DataFrames whose dtypes follow the table columns (``float64`` for Float,
  ``int64`` for NOT NULL integers, nullable ``Int64`` otherwise, ``str`` for text), also when empty.
* Processing times (``registered_at``, ``measured_at``, ``updated_at``, ``flagged_at``...) are Unix
  seconds (``time.time()``); ``mjd`` columns are observation times from the FITS headers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine

from ese_assets.core.values import py_scalar
from ese_assets.storage.engine import begin_write

#: Maximum number of values in one ``IN (...)`` list.
CHUNK_SIZE = 500

#: Rows per ``executemany`` batch of the bulk upserts.
WRITE_BATCH = 1000

Bind = Engine | Connection


def now() -> float:
    """Processing time: Unix seconds."""
    return time.time()


def chunks(values: Sequence[Any], size: int = CHUNK_SIZE) -> Iterator[list[Any]]:
    """Consecutive slices of ``values`` of at most ``size`` items."""
    for start in range(0, len(values), size):
        yield list(values[start : start + size])


def unique_str(values: Iterable[Any] | str | None) -> list[str]:
    """Distinct values as Python ``str``, sorted (deterministic chunks and lock order)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return sorted({str(v) for v in values})


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
    values = series.to_numpy(dtype=object)
    if pd.api.types.is_bool_dtype(dtype):
        return [None if m else bool(v) for v, m in zip(values, missing, strict=True)]
    if pd.api.types.is_integer_dtype(dtype):
        return [None if m else int(v) for v, m in zip(values, missing, strict=True)]
    return [None if m else py_scalar(v) for v, m in zip(values, missing, strict=True)]


def frame_records(df: pd.DataFrame, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of ``df[columns]`` as a list of dicts of Python scalars (for ``executemany``)."""
    if len(df) == 0:
        return []
    converted = [_column_values(df[c]) for c in columns]
    return [dict(zip(columns, row, strict=True)) for row in zip(*converted, strict=True)]


def clean_mapping(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with every value a plain Python scalar (NaN -> None)."""
    return {k: py_scalar(v) for k, v in values.items()}


def check_columns(table: sa.Table, keys: Iterable[str], what: str) -> None:
    """ValueError naming the keys that are not columns of ``table`` (a typo must not drop data)."""
    unknown = sorted(set(keys) - set(table.c.keys()))
    if unknown:
        raise ValueError(
            f"{what}: unknown {table.name} column(s) {unknown}; "
            f"known columns: {list(table.c.keys())}"
        )


def check_statuses(
    status: str | Iterable[str] | None, allowed: Sequence[str], what: str
) -> list[str] | None:
    """``status`` (one or several) as a list after checking each is in ``allowed``; None stays."""
    if status is None:
        return None
    values = [status] if isinstance(status, str) else list(status)
    bad = sorted(set(values) - set(allowed))
    if bad:
        raise ValueError(f"invalid {what} {bad}; expected one of {list(allowed)}")
    return values


def _dtype_for(column: sa.ColumnElement[Any]) -> Any:
    type_ = column.type
    if isinstance(type_, sa.Float):
        return "float64"
    if isinstance(type_, sa.Integer):  # includes BigInteger
        nullable = getattr(column, "nullable", True)
        if isinstance(column, sa.Column) and not nullable:
            return "int64"
        return "Int64"
    if isinstance(type_, sa.String | sa.Text):
        return "str"
    return None


def read_frame(conn: Connection, stmt: sa.Select[Any]) -> pd.DataFrame:
    """Run a SELECT and return a DataFrame typed after the selected columns (also when empty)."""
    result = conn.execute(stmt)
    names = list(result.keys())
    # Plain tuples: building a DataFrame from Row objects probes each row's attributes and took
    # twice as long (benchmarks/bench_variability.py).
    rows = [tuple(row) for row in result.fetchall()]
    frame = (
        pd.DataFrame(rows, columns=names) if rows else pd.DataFrame({name: [] for name in names})
    )
    dtypes: dict[str, Any] = {}
    for name, column in zip(names, stmt.selected_columns, strict=True):
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


def read_chunked(
    conn: Connection, make_stmt: Callable[[list[Any]], sa.Select[Any]], values: Sequence[Any]
) -> pd.DataFrame:
    """Concatenate ``make_stmt(chunk)`` over chunks of ``values`` (caller sorts the result).

    With no values, ``make_stmt([])`` is read once so the result still has typed columns.
    """
    if not values:
        return read_frame(conn, make_stmt([]))
    frames = [read_frame(conn, make_stmt(chunk)) for chunk in chunks(values)]
    if len(frames) == 1:
        return frames[0]
    return pd.concat(frames, ignore_index=True)


@contextlib.contextmanager
def writing(bind: Bind) -> Iterator[Connection]:
    """A connection to write with: the caller's (inside its transaction) or a new write unit."""
    if isinstance(bind, Connection):
        yield bind
    else:
        with begin_write(bind) as conn:
            yield conn


@contextlib.contextmanager
def reading(bind: Bind) -> Iterator[Connection]:
    """A connection to read with: the caller's (sees its uncommitted writes) or a new one."""
    if isinstance(bind, Connection):
        yield bind
    else:
        with bind.connect() as conn:
            yield conn


def read_all_or_chunked(
    bind: Bind,
    make_stmt: Callable[[list[Any] | None], sa.Select[Any]],
    values: Iterable[Any] | None,
) -> pd.DataFrame:
    """``make_stmt(None)`` (no filter) when ``values`` is None, else chunked ``make_stmt(chunk)``
    over the distinct values."""
    with reading(bind) as conn:
        if values is None:
            return read_frame(conn, make_stmt(None))
        return read_chunked(conn, make_stmt, unique_str(values))


def dialect_insert(conn: Connection, table: sa.Table) -> Any:
    """The dialect's INSERT (with ``on_conflict_do_*``) for ``table`` on ``conn``."""
    name = conn.dialect.name
    if name == "sqlite":
        return sqlite_dialect.insert(table)
    if name == "postgresql":
        return pg_dialect.insert(table)
    raise NotImplementedError(f"unsupported database dialect {name!r} (use SQLite or PostgreSQL)")


def sorted_records(
    table: sa.Table, rows: pd.DataFrame, keys: Sequence[str]
) -> list[dict[str, Any]]:
    """Rows of ``rows`` as insert parameters for ``table`` (its columns only), sorted by ``keys``
    so concurrent writers lock rows in the same order (no deadlocks on PostgreSQL)."""
    frame = rows[[c.key for c in table.c if c.key in rows.columns]].copy()
    frame["source_id"] = frame["source_id"].astype(str)
    frame = frame.sort_values(list(keys), kind="mergesort")
    return frame_records(frame, list(frame.columns))
