"""The ``photometry`` table: one row per (image, source) measurement, and lightcurve reads.

The reads that feed statistics (:func:`night_photometry`, :func:`source_photometry`,
:func:`window_photometry`, :func:`photometry_counts_by_source`) return usable measurements only:
rows whose ``quality_flag`` has none of the ``exclude_flags`` bits (default
:data:`~ese_assets.core.quality.DEFAULT_EXCLUDED_FLAGS`: blank and edge) and that have a flux,
filtered in SQL (:func:`usable_rows`) so excluded rows are never read. Lightcurve reads for people
(:func:`lightcurves`) return every row with its flag.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
import sqlalchemy as sa

from ese_assets.core.quality import DEFAULT_EXCLUDED_FLAGS, validate_exclude_flags
from ese_assets.storage.access import (
    CHUNK_SIZE,
    Bind,
    check_columns,
    chunks,
    clean_mapping,
    frame_records,
    now,
    read_chunked,
    read_frame,
    reading,
    unique_str,
    writing,
)
from ese_assets.storage.schema import images, photometry, source_sums

#: Columns of :func:`lightcurves` / :func:`lightcurves_for_nights`, in order.
LIGHTCURVE_COLUMNS = (
    "source_id",
    "mjd",
    "peak_jyb",
    "peak_err_jyb",
    "ra_deg",
    "dec_deg",
    "nvss_flux_mjy",
    "image_path",
    "measured_at",
    "quality_flag",
    "normalized_flux_jy",
    "normalized_flux_err_jy",
)

#: Columns of :func:`night_photometry` / :func:`source_photometry`, in order.
NIGHT_PHOTOMETRY_COLUMNS = (
    "source_id",
    "night",
    "mjd",
    "peak_jyb",
    "peak_err_jyb",
    "nvss_flux_mjy",
    "ra_deg",
    "dec_deg",
    "measured_at",
    "image_path",
    "normalized_flux_jy",
    "normalized_flux_err_jy",
)

_WRITE_COLUMNS = tuple(c.key for c in photometry.c if c.key != "id")
_ORDER = (photometry.c.source_id, photometry.c.mjd, photometry.c.image_path)
_WITH_IMAGES = photometry.join(images, images.c.path == photometry.c.image_path)


def usable_rows(exclude_flags: int = DEFAULT_EXCLUDED_FLAGS) -> sa.ColumnElement[bool]:
    """SQL condition of a usable measurement: ``quality_flag & exclude_flags = 0`` and a flux.

    The SQL form of :func:`ese_assets.core.quality.usable_measurement` (bitwise AND works on SQLite
    and PostgreSQL). A row without a flux (``peak_jyb`` NULL) is never usable, whatever the mask.
    """
    mask = validate_exclude_flags(exclude_flags)
    return sa.and_(
        photometry.c.quality_flag.bitwise_and(mask) == 0, photometry.c.peak_jyb.is_not(None)
    )


def replace_image_photometry(
    bind: Bind, image_path: str, rows: pd.DataFrame, image_update: Mapping[str, Any] | None = None
) -> int:
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
    update = clean_mapping(dict(image_update or {}))
    check_columns(images, update.keys(), "replace_image_photometry image_update")
    for forbidden in ("id", "path"):
        if forbidden in update:
            raise ValueError(f"replace_image_photometry: image_update cannot set {forbidden!r}")
    check_columns(photometry, rows.columns, "replace_image_photometry rows")
    if "id" in rows.columns:
        raise ValueError("replace_image_photometry: 'id' is assigned by the database")

    measured_at = now()
    frame = rows.copy()
    if "image_path" in frame.columns:
        other = set(frame["image_path"].dropna().astype(str)) - {image_path}
        if other:
            raise ValueError(
                f"replace_image_photometry({image_path!r}): rows name other images "
                f"{sorted(other)[:3]}"
            )
    frame["image_path"] = image_path
    if "measured_at" not in frame.columns:
        frame["measured_at"] = measured_at
    if "quality_flag" not in frame.columns:
        frame["quality_flag"] = 0
    records = frame_records(frame, [c for c in _WRITE_COLUMNS if c in frame.columns])

    update.update(status="measured", reason=None, measured_at=measured_at)
    with writing(bind) as conn:
        result = conn.execute(images.update().where(images.c.path == image_path).values(**update))
        if result.rowcount == 0:
            raise ValueError(f"replace_image_photometry: image {image_path!r} is not registered")
        conn.execute(photometry.delete().where(photometry.c.image_path == image_path))
        if records:
            conn.execute(photometry.insert(), records)
    return len(records)


def delete_image_photometry(bind: Bind, image_paths: Iterable[str]) -> int:
    """Delete every photometry row of the given images (files whose content is no longer a usable
    image: the old rows do not describe any file any more). Returns the rows deleted."""
    deleted = 0
    with writing(bind) as conn:
        for chunk in chunks(unique_str(image_paths)):
            deleted += conn.execute(
                photometry.delete().where(photometry.c.image_path.in_(chunk))
            ).rowcount
    return deleted


def _lightcurve_select() -> sa.Select[Any]:
    return sa.select(*(photometry.c[c] for c in LIGHTCURVE_COLUMNS))


def lightcurves(bind: Bind, source_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Photometry of the given sources (all when None), ordered by source_id, mjd.

    Columns: :data:`LIGHTCURVE_COLUMNS` (peak fluxes in Jy/beam, as measured).
    """
    with reading(bind) as conn:
        if source_ids is None:
            return read_frame(conn, _lightcurve_select().order_by(*_ORDER))
        frame = read_chunked(
            conn,
            lambda chunk: (
                _lightcurve_select().where(photometry.c.source_id.in_(chunk)).order_by(*_ORDER)
            ),
            unique_str(source_ids),
        )
    # Chunks are sorted source lists, so concatenating them keeps (source_id, mjd) order.
    return frame.reset_index(drop=True)


def _night_sources(nights: list[str]) -> sa.Select[Any]:
    return (
        sa.select(photometry.c.source_id)
        .select_from(_WITH_IMAGES)
        .where(images.c.night.in_(nights))
        .distinct()
    )


def sources_measured_in_nights(bind: Bind, nights: Iterable[str]) -> list[str]:
    """Sorted distinct source_ids with photometry from an image of one of ``nights``."""
    found: set[str] = set()
    with reading(bind) as conn:
        for chunk in chunks(unique_str(nights)):
            found.update(conn.execute(_night_sources(chunk)).scalars())
    return sorted(found)


def lightcurves_for_nights(bind: Bind, nights: Iterable[str]) -> pd.DataFrame:
    """Full history (all nights) of every source measured in ``nights``, ordered by source_id, mjd.

    One query: ``... WHERE source_id IN (SELECT DISTINCT source_id FROM photometry JOIN images ...
    WHERE night IN (:nights))``; the database uses ix_photometry_source_mjd for the outer lookup.
    More than :data:`CHUNK_SIZE` nights are split into several such queries and de-duplicated.
    """
    wanted = unique_str(nights)

    def make_stmt(chunk: list[str]) -> sa.Select[Any]:
        return (
            _lightcurve_select()
            .where(photometry.c.source_id.in_(_night_sources(chunk)))
            .order_by(*_ORDER)
        )

    with reading(bind) as conn:
        if len(wanted) <= CHUNK_SIZE:
            return read_frame(conn, make_stmt(wanted))
        frame = read_chunked(conn, make_stmt, wanted)
    frame = frame.drop_duplicates(subset=["image_path", "source_id"])
    frame = frame.sort_values(["source_id", "mjd", "image_path"], kind="mergesort")
    return frame.reset_index(drop=True)


def photometry_counts(bind: Bind, night: str | None = None) -> int:
    """Number of photometry rows, in total or from images of one night."""
    stmt = sa.select(sa.func.count()).select_from(photometry)
    if night is not None:
        stmt = (
            sa.select(sa.func.count()).select_from(_WITH_IMAGES).where(images.c.night == str(night))
        )
    with reading(bind) as conn:
        return int(conn.execute(stmt).scalar_one())


def photometry_counts_by_source(
    bind: Bind, source_ids: Iterable[str], *, exclude_flags: int = DEFAULT_EXCLUDED_FLAGS
) -> dict[str, int]:
    """``{source_id: number of usable photometry rows}`` (sources without any are absent)."""
    counts: dict[str, int] = {}
    usable = usable_rows(exclude_flags)
    with reading(bind) as conn:
        for chunk in chunks(unique_str(source_ids)):
            counts.update(
                (str(s), int(n))
                for s, n in conn.execute(
                    sa.select(photometry.c.source_id, sa.func.count())
                    .where(photometry.c.source_id.in_(chunk), usable)
                    .group_by(photometry.c.source_id)
                )
            )
    return counts


def measured_source_ids(bind: Bind) -> list[str]:
    """Sorted distinct source_ids that have at least one photometry row."""
    with reading(bind) as conn:
        return list(
            conn.execute(
                sa.select(photometry.c.source_id).distinct().order_by(photometry.c.source_id)
            ).scalars()
        )


def _night_photometry_select() -> sa.Select[Any]:
    return (
        sa.select(
            *(images.c.night if c == "night" else photometry.c[c] for c in NIGHT_PHOTOMETRY_COLUMNS)
        )
        .select_from(_WITH_IMAGES)
        .order_by(photometry.c.source_id, images.c.night, photometry.c.mjd, photometry.c.image_path)
    )


def _photometry_with_night_where(
    bind: Bind, column: sa.ColumnElement[Any], values: Iterable[str], exclude_flags: int
) -> pd.DataFrame:
    """Usable photometry rows (with their night) whose ``column`` is one of ``values``."""
    usable = usable_rows(exclude_flags)
    with reading(bind) as conn:
        frame = read_chunked(
            conn,
            lambda chunk: _night_photometry_select().where(column.in_(chunk), usable),
            unique_str(values),
        )
    return frame.sort_values(
        ["source_id", "night", "mjd", "image_path"], kind="mergesort"
    ).reset_index(drop=True)


def night_photometry(
    bind: Bind, nights: Iterable[str], *, exclude_flags: int = DEFAULT_EXCLUDED_FLAGS
) -> pd.DataFrame:
    """Usable photometry rows of the images of ``nights`` only, with their night (one join).

    Columns :data:`NIGHT_PHOTOMETRY_COLUMNS`, ordered by source_id, night, mjd, image_path (a
    deterministic order, so sums over these rows are bit-reproducible). Rows with a flag in
    ``exclude_flags`` are not read (:func:`usable_rows`).
    """
    return _photometry_with_night_where(bind, images.c.night, nights, exclude_flags)


def source_photometry(
    bind: Bind, source_ids: Iterable[str], *, exclude_flags: int = DEFAULT_EXCLUDED_FLAGS
) -> pd.DataFrame:
    """The whole usable photometry history of ``source_ids`` with each row's night (the rebuild
    path). Columns and order as :func:`night_photometry`.
    """
    return _photometry_with_night_where(bind, photometry.c.source_id, source_ids, exclude_flags)


def window_photometry(
    bind: Bind,
    source_ids: Iterable[str],
    window_days: float,
    *,
    exclude_flags: int = DEFAULT_EXCLUDED_FLAGS,
) -> pd.DataFrame:
    """Each source's usable epochs within ``window_days`` of its latest epoch
    (``source_sums.last_mjd``, itself the latest usable epoch).

    ``WHERE photometry.mjd >= source_sums.last_mjd - :window``: a range scan of
    ix_photometry_source_mjd per source, so the rows read are bounded by the window, not by the
    history. Columns source_id, mjd, peak_jyb, peak_err_jyb, normalized_flux_jy,
    normalized_flux_err_jy; ordered by source_id, mjd, image_path.
    """
    window = float(window_days)
    usable = usable_rows(exclude_flags)

    def make_stmt(chunk: list[str]) -> sa.Select[Any]:
        return (
            sa.select(
                photometry.c.source_id,
                photometry.c.mjd,
                photometry.c.peak_jyb,
                photometry.c.peak_err_jyb,
                photometry.c.normalized_flux_jy,
                photometry.c.normalized_flux_err_jy,
            )
            .select_from(
                photometry.join(source_sums, source_sums.c.source_id == photometry.c.source_id)
            )
            .where(
                photometry.c.source_id.in_(chunk),
                photometry.c.mjd >= source_sums.c.last_mjd - window,
                usable,
            )
            .order_by(*_ORDER)
        )

    with reading(bind) as conn:
        frame = read_chunked(conn, make_stmt, unique_str(source_ids))
    return frame.reset_index(drop=True)


def night_photometry_summary(bind: Bind, nights: Iterable[str]) -> dict[str, int]:
    """Counts over the photometry of images of ``nights`` (for asset metadata and checks).

    Keys: ``n_images`` (images with rows), ``n_sources`` (distinct sources), ``n_rows``,
    ``n_bad_errors`` (rows whose ``peak_err_jyb`` is NULL or <= 0: unusable in chi2/eta),
    ``n_flagged`` (rows with a non-zero ``quality_flag``).
    """
    summary = {"n_images": 0, "n_sources": 0, "n_rows": 0, "n_bad_errors": 0, "n_flagged": 0}
    bad = sa.or_(photometry.c.peak_err_jyb.is_(None), photometry.c.peak_err_jyb <= 0)
    sources: set[str] = set()
    with reading(bind) as conn:
        for chunk in chunks(unique_str(nights)):
            row = conn.execute(
                sa.select(
                    sa.func.count(sa.distinct(photometry.c.image_path)),
                    sa.func.count(),
                    sa.func.coalesce(sa.func.sum(sa.case((bad, 1), else_=0)), 0),
                    sa.func.coalesce(
                        sa.func.sum(sa.case((photometry.c.quality_flag != 0, 1), else_=0)), 0
                    ),
                )
                .select_from(_WITH_IMAGES)
                .where(images.c.night.in_(chunk))
            ).one()
            summary["n_images"] += int(row[0])
            summary["n_rows"] += int(row[1])
            summary["n_bad_errors"] += int(row[2])
            summary["n_flagged"] += int(row[3])
            sources.update(conn.execute(_night_sources(chunk)).scalars())
    summary["n_sources"] = len(sources)
    return summary
