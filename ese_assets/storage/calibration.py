"""The calibration tables: ``image_gains`` (one row per measured image), ``calibration_references``
(the reference history), and the calibration's writes to ``photometry`` (normalized fluxes and the
bad-image quality bit).

The calibration step (``ese_assets.pipeline.calibration``) rewrites everything of one night in one
transaction, so a re-run of a night on unchanged photometry leaves the same rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
import sqlalchemy as sa

from ese_assets.core.quality import FLAG_BAD_GAIN
from ese_assets.storage.access import (
    WRITE_BATCH,
    Bind,
    chunks,
    frame_records,
    read_chunked,
    read_frame,
    reading,
    unique_str,
    writing,
)
from ese_assets.storage.photometry import usable_rows
from ese_assets.storage.schema import calibration_references, image_gains, images, photometry

#: Columns of :func:`night_calibration_rows`, in order.
CALIBRATION_ROW_COLUMNS = (
    "id",
    "image_path",
    "source_id",
    "mjd",
    "peak_jyb",
    "peak_err_jyb",
    "nvss_flux_mjy",
    "quality_flag",
)


def night_calibration_rows(bind: Bind, night: str, *, exclude_flags: int) -> pd.DataFrame:
    """Photometry rows of one night's images that the calibration may use: usable under
    ``exclude_flags`` with the bad-gain bit ignored (that bit is the calibration's own output).
    Columns :data:`CALIBRATION_ROW_COLUMNS`, ordered by image_path, source_id."""
    usable = usable_rows(int(exclude_flags) & ~FLAG_BAD_GAIN)
    stmt = (
        sa.select(*(photometry.c[c] for c in CALIBRATION_ROW_COLUMNS))
        .select_from(photometry.join(images, images.c.path == photometry.c.image_path))
        .where(images.c.night == str(night), usable)
        .order_by(photometry.c.image_path, photometry.c.source_id)
    )
    with reading(bind) as conn:
        return read_frame(conn, stmt)


def night_image_paths(bind: Bind, night: str) -> list[str]:
    """Paths of the night's images that have photometry rows, sorted."""
    stmt = (
        sa.select(photometry.c.image_path)
        .select_from(photometry.join(images, images.c.path == photometry.c.image_path))
        .where(images.c.night == str(night))
        .distinct()
    )
    with reading(bind) as conn:
        return sorted(conn.execute(stmt).scalars())


def reference_history(
    bind: Bind, source_ids: Iterable[str], *, first_night: str, before_night: str
) -> pd.DataFrame:
    """``calibration_references`` rows of ``source_ids`` with ``first_night <= night <
    before_night`` (the trailing window of nights before the one being calibrated), ordered by
    source_id, night."""
    ref = calibration_references
    with reading(bind) as conn:
        frame = read_chunked(
            conn,
            lambda chunk: sa.select(ref).where(
                ref.c.source_id.in_(chunk),
                ref.c.night >= str(first_night),
                ref.c.night < str(before_night),
            ),
            unique_str(source_ids),
        )
    return frame.sort_values(["source_id", "night"], kind="mergesort").reset_index(drop=True)


def replace_night_calibration(
    bind: Bind, night: str, gains: pd.DataFrame, references: pd.DataFrame
) -> None:
    """Replace the night's ``image_gains`` rows by ``gains`` (columns of the table) and its
    ``calibration_references`` rows by ``references``; in the caller's transaction."""
    gain_cols = [c.key for c in image_gains.c if c.key in gains.columns]
    ref_cols = [c.key for c in calibration_references.c if c.key in references.columns]
    gain_records = frame_records(gains.sort_values("image_path", kind="mergesort"), gain_cols)
    ref_records = frame_records(
        references.sort_values(["source_id", "night"], kind="mergesort"), ref_cols
    )
    with writing(bind) as conn:
        conn.execute(image_gains.delete().where(image_gains.c.night == str(night)))
        conn.execute(
            calibration_references.delete().where(calibration_references.c.night == str(night))
        )
        for chunk in chunks(gain_records, WRITE_BATCH):
            conn.execute(image_gains.insert(), chunk)
        for chunk in chunks(ref_records, WRITE_BATCH):
            conn.execute(calibration_references.insert(), chunk)


def apply_photometry_calibration(
    bind: Bind, bad_by_image: Mapping[str, bool], normalized: pd.DataFrame
) -> int:
    """Write the calibration into ``photometry``: the :data:`FLAG_BAD_GAIN` bit set on every row
    of the images ``bad_by_image`` marks bad and cleared on the others', and
    ``normalized_flux_jy``/``normalized_flux_err_jy`` of the rows ``normalized`` names by ``id``.
    Returns the rows given normalized values."""
    flag = photometry.c.quality_flag
    bad = unique_str(p for p, b in bad_by_image.items() if b)
    good = unique_str(p for p, b in bad_by_image.items() if not b)
    records = frame_records(
        normalized.rename(
            columns={
                "id": "row_id",
                "normalized_flux_jy": "value",
                "normalized_flux_err_jy": "error",
            }
        ).sort_values("row_id", kind="mergesort"),
        ["row_id", "value", "error"],
    )
    update_rows = (
        photometry.update()
        .where(photometry.c.id == sa.bindparam("row_id"))
        .values(
            normalized_flux_jy=sa.bindparam("value"), normalized_flux_err_jy=sa.bindparam("error")
        )
    )
    with writing(bind) as conn:
        for chunk in chunks(bad):
            conn.execute(
                photometry.update()
                .where(photometry.c.image_path.in_(chunk))
                .values(quality_flag=flag.bitwise_or(FLAG_BAD_GAIN))
            )
        for chunk in chunks(good):
            conn.execute(
                photometry.update()
                .where(photometry.c.image_path.in_(chunk), flag.bitwise_and(FLAG_BAD_GAIN) != 0)
                .values(quality_flag=flag.bitwise_and(~FLAG_BAD_GAIN))
            )
        for chunk in chunks(records, WRITE_BATCH * 10):
            conn.execute(update_rows, chunk)
    return len(records)


def gains(bind: Bind, nights: Iterable[str] | None = None) -> pd.DataFrame:
    """``image_gains`` rows of ``nights`` (all when None), ordered by night, mjd, image_path."""

    def make_stmt(chunk: list[str] | None) -> sa.Select[Any]:
        stmt = sa.select(image_gains)
        if chunk is not None:
            stmt = stmt.where(image_gains.c.night.in_(chunk))
        return stmt

    with reading(bind) as conn:
        if nights is None:
            frame = read_frame(conn, make_stmt(None))
        else:
            frame = read_chunked(conn, make_stmt, unique_str(nights))
    return frame.sort_values(["night", "mjd", "image_path"], kind="mergesort").reset_index(
        drop=True
    )
