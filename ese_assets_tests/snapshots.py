"""Whole-table snapshots for tests that compare database states ("run twice", "killed and re-run",
SQLite versus PostgreSQL give the same tables)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ese_assets.storage.access import read_frame
from ese_assets.storage.schema import metadata

#: Columns :func:`table_snapshot` leaves out by default: surrogate keys and processing times, which
#: differ between two otherwise identical runs.
SNAPSHOT_EXCLUDE = (
    "id",
    "measured_at",
    "updated_at",
    "flagged_at",
    "registered_at",
    "computed_at",
)
#: Columns of ``images`` that record how the work went (file versions, run requests), not what
#: was measured: two runs that reach the same result may differ in them.
IMAGE_BOOKKEEPING = (
    "file_mtime",
    "file_ctime",
    "batch_token",
    "attempts",
    "queued_at",
    "next_attempt_at",
)

#: Natural keys that :func:`table_snapshot` sorts by first (readable diffs), then all other columns.
SNAPSHOT_SORT_KEYS = {
    "images": ("path",),
    "photometry": ("image_path", "source_id"),
    "variability_stats": ("source_id",),
    "ese_candidates": ("source_id",),
    "source_night_sums": ("source_id", "night"),
    "source_sums": ("source_id",),
    "image_gains": ("image_path",),
    "calibration_references": ("source_id", "night"),
}


def table_snapshot(
    engine: Engine, table_name: str, exclude: Sequence[str] = SNAPSHOT_EXCLUDE
) -> pd.DataFrame:
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
        frame = read_frame(conn, sa.select(*columns))
    keys = [k for k in SNAPSHOT_SORT_KEYS.get(table_name, ()) if k in frame.columns]
    order = keys + [c for c in frame.columns if c not in keys]
    if not order or len(frame) == 0:
        return frame.reset_index(drop=True)
    return frame.sort_values(order, kind="mergesort", na_position="last").reset_index(drop=True)
