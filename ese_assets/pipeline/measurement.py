"""Measurement: forced photometry of images, one transaction per image.

Each image's photometry rows are replaced and its ``images`` row marked ``measured`` together, so a
run killed half-way leaves whole images only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import Engine

from ese_assets.core.catalog import Catalog, unit_vectors
from ese_assets.core.fits_image import FitsImage, ImageError, load_image
from ese_assets.core.photometry import forced_photometry
from ese_assets.pipeline.progress import Progress, silent
from ese_assets.storage import images as images_db
from ese_assets.storage import photometry as photometry_db
from ese_assets.storage.errors import DatabaseUnavailable

log = logging.getLogger(__name__)


def photometry_rows(
    image: FitsImage,
    catalog: Catalog,
    *,
    min_flux_mjy: float = 0.0,
    radius_deg: float | None = None,
    now: float,
) -> pd.DataFrame:
    """Forced photometry of the catalog sources inside one image: ``photometry`` table rows.

    Sources are those of ``catalog`` inside the image footprint, at least ``min_flux_mjy`` bright
    and, when ``radius_deg`` is given, within that angle of the image centre (ICRS). Sources that
    cannot be measured (off the data, blank: no finite flux or error) are left out, as the
    ``photometry`` table never holds them. The pipeline (:func:`measure_image`), ``ese photometry``
    and ``PhotometryManager`` all measure through this function.
    """
    info = image.info
    # Catalog positions are ICRS; the image's WCS may be FK4, Galactic...: measure in its frame.
    idx, lon_deg, lat_deg = catalog.footprint_positions(
        info.wcs, info.shape, min_flux_mjy=min_flux_mjy
    )
    if radius_deg is not None:
        centre = unit_vectors(np.array([info.center_ra_deg]), np.array([info.center_dec_deg]))[0]
        near = unit_vectors(catalog.ra_deg[idx], catalog.dec_deg[idx]) @ centre >= np.cos(
            np.radians(radius_deg)
        )
        idx, lon_deg, lat_deg = idx[near], lon_deg[near], lat_deg[near]
    phot = forced_photometry(image.data, info.wcs, info.beam, lon_deg, lat_deg)
    good = np.isfinite(phot.peak_jyb) & np.isfinite(phot.peak_err_jyb) & (phot.peak_err_jyb > 0)
    return pd.DataFrame(
        {
            "image_path": info.path,
            "ra_deg": catalog.ra_deg[idx][good],
            "dec_deg": catalog.dec_deg[idx][good],
            "nvss_flux_mjy": catalog.flux_mjy[idx][good],
            "peak_jyb": phot.peak_jyb[good],
            "peak_err_jyb": phot.peak_err_jyb[good],
            "measured_at": now,
            "source_id": catalog.source_id[idx][good],
            "mjd": info.mjd,
            "local_rms_jyb": phot.local_rms_jyb[good],
            "background_jyb": phot.background_jyb[good],
            "quality_flag": phot.quality_flag[good].astype(int),
        }
    )


@dataclass
class ImageResult:
    path: str
    status: str  # measured | rejected | failed
    n_sources: int = 0
    median_rms_jyb: float | None = None
    reason: str | None = None
    n_flagged: int = 0


def measure_image(
    engine: Engine,
    catalog: Catalog,
    path: str,
    *,
    min_flux_mjy: float = 0.0,
    radius_deg: float | None = None,
    now: float | None = None,
) -> ImageResult:
    """Forced photometry of every catalog source in one image, stored in one transaction.

    The file is read once. Unusable data (e.g. an all-NaN image, a file that became corrupt after
    registration) marks the image ``rejected``; a file that cannot be read marks it ``failed``
    (retried later, see :mod:`ese_assets.pipeline.recovery`). A database that is busy or
    unreachable raises :class:`DatabaseUnavailable`: nothing is recorded, the caller retries.
    """
    now = time.time() if now is None else now
    try:
        image = load_image(path)
    except ImageError as exc:
        images_db.set_image_status(engine, [path], "rejected", reason=exc.reason)
        return ImageResult(path, "rejected", reason=exc.reason)
    except OSError as exc:
        reason = f"cannot read file ({exc.strerror or exc})"
        images_db.mark_image_failed(engine, path, reason)
        return ImageResult(path, "failed", reason=reason)

    rows = photometry_rows(
        image, catalog, min_flux_mjy=min_flux_mjy, radius_deg=radius_deg, now=now
    )
    rms = rows["local_rms_jyb"].to_numpy()
    median_rms = float(np.median(rms)) if rms.size else None
    photometry_db.replace_image_photometry(
        engine,
        path,
        rows,
        {
            "mjd": image.info.mjd,
            "median_rms_jyb": median_rms,
            "n_sources": len(rows),
        },
    )
    return ImageResult(
        path,
        "measured",
        n_sources=len(rows),
        median_rms_jyb=median_rms,
        n_flagged=int((rows["quality_flag"] != 0).sum()),
    )


def measure_images(
    engine: Engine,
    catalog: Catalog,
    paths: Sequence[str],
    *,
    min_flux_mjy: float = 0.0,
    progress: Progress = silent,
) -> list[ImageResult]:
    """:func:`measure_image` for each path; one bad image never stops the others.

    The error boundary is per image, except for :class:`DatabaseUnavailable`: a busy or lost
    database is not the image's fault, so it propagates (the Dagster step retries with backoff;
    the images not yet measured stay queued and are requested again if the retries run out).
    """
    results = []
    for i, path in enumerate(paths, start=1):
        try:
            res = measure_image(engine, catalog, path, min_flux_mjy=min_flux_mjy)
        except DatabaseUnavailable:
            raise
        except Exception as exc:  # recorded, and the night goes on
            log.exception("measuring %s failed", path)
            reason = f"{type(exc).__name__}: {exc}"
            images_db.mark_image_failed(engine, path, reason)
            res = ImageResult(path, "failed", reason=reason)
        results.append(res)
        detail = f"{res.n_sources} sources" if res.status == "measured" else res.reason
        progress(f"[{i}/{len(paths)}] {Path(path).name}: {res.status} ({detail})")
    return results
