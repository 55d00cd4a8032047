"""Measurement: forced photometry of images, one transaction per image.

Each image's photometry rows are replaced and its ``images`` row marked ``measured`` together, so a
run killed half-way leaves whole images only.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import Engine

from ese_assets.core.catalog import Catalog, unit_vectors
from ese_assets.core.fits_image import FitsImage, ImageError, load_image
from ese_assets.core.noise_correlation import DEFAULT_NOISE_CORRELATION, NoiseCorrelation
from ese_assets.core.photometry import forced_photometry
from ese_assets.pipeline import parallel
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
    noise_correlation: str = DEFAULT_NOISE_CORRELATION,
) -> pd.DataFrame:
    """Forced photometry of the catalog sources inside one image: ``photometry`` table rows.

    Sources are those of ``catalog`` inside the image footprint, at least ``min_flux_mjy`` bright
    and, when ``radius_deg`` is given, within that angle of the image centre (ICRS). Sources that
    cannot be measured (off the data, blank: no finite flux or error) are left out, as the
    ``photometry`` table never holds them. The pipeline (:func:`measure_image`), ``ese photometry``
    and ``PhotometryManager`` all measure through this function (:func:`image_photometry`).
    """
    return image_photometry(
        image,
        catalog,
        min_flux_mjy=min_flux_mjy,
        radius_deg=radius_deg,
        now=now,
        noise_correlation=noise_correlation,
    )[0]


def image_photometry(
    image: FitsImage,
    catalog: Catalog,
    *,
    min_flux_mjy: float = 0.0,
    radius_deg: float | None = None,
    now: float,
    noise_correlation: str = DEFAULT_NOISE_CORRELATION,
) -> tuple[pd.DataFrame, NoiseCorrelation | None]:
    """:func:`photometry_rows` and the image's error model: ``noise_correlation`` "measure"
    (``ESE_NOISE_CORRELATION``'s default) scales the errors by the noise-correlation factor
    measured on the image (:mod:`ese_assets.core.noise_correlation`), "beam" assumes the beam."""
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
    phot = forced_photometry(
        image.data, info.wcs, info.beam, lon_deg, lat_deg, noise_correlation=noise_correlation
    )
    good = np.isfinite(phot.peak_jyb) & np.isfinite(phot.peak_err_jyb) & (phot.peak_err_jyb > 0)
    rows = pd.DataFrame(
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
    return rows, phot.noise


def noise_columns(noise: NoiseCorrelation | None) -> dict:
    """The ``images`` columns of an image's error model: the factor its errors were multiplied
    by (1: beam assumption), its uncertainty and positions (NULL unless measured), the reason."""
    if noise is None:
        return {}
    return {
        "noise_corr_factor": noise.factor,
        "noise_corr_err": noise.factor_err if noise.measured else None,
        "noise_corr_positions": noise.n_positions if noise.measured else None,
        "noise_corr_reason": noise.reason,
    }


@dataclass
class ImageResult:
    path: str
    status: str  # measured | rejected | failed
    n_sources: int = 0
    median_rms_jyb: float | None = None
    reason: str | None = None
    n_flagged: int = 0
    noise: NoiseCorrelation | None = None  # the image's error model (measured images)


@dataclass
class Measurement:
    """One image read and measured, nothing stored yet (what a photometry worker returns).

    ``status`` is ``measured`` (``rows`` and ``mjd`` set), ``rejected`` (unusable data) or
    ``failed`` (the file could not be read), with the ``reason``.
    """

    path: str
    status: str
    rows: pd.DataFrame | None = None
    mjd: float | None = None
    reason: str | None = None
    noise: NoiseCorrelation | None = None


def read_and_measure(
    catalog: Catalog,
    path: str,
    *,
    min_flux_mjy: float = 0.0,
    radius_deg: float | None = None,
    now: float | None = None,
    noise_correlation: str = DEFAULT_NOISE_CORRELATION,
) -> Measurement:
    """Read one image and measure every catalog source in it; no database involved.

    The file is read once. Unusable data (e.g. an all-NaN image, a file that became corrupt after
    registration) gives ``rejected``; a file that cannot be read gives ``failed``.
    ``noise_correlation``: the error model (:func:`image_photometry`).
    """
    now = time.time() if now is None else now
    try:
        image = load_image(path)
    except ImageError as exc:
        return Measurement(path, "rejected", reason=exc.reason)
    except OSError as exc:
        return Measurement(path, "failed", reason=f"cannot read file ({exc.strerror or exc})")
    rows, noise = image_photometry(
        image,
        catalog,
        min_flux_mjy=min_flux_mjy,
        radius_deg=radius_deg,
        now=now,
        noise_correlation=noise_correlation,
    )
    return Measurement(path, "measured", rows=rows, mjd=image.info.mjd, noise=noise)


def record_measurement(engine: Engine, measurement: Measurement) -> ImageResult:
    """Store one :class:`Measurement` in one transaction: the image's photometry rows replaced
    and its ``images`` row marked ``measured``; or the image marked ``rejected``/``failed`` with
    the reason (a failed image is retried later, see :mod:`ese_assets.pipeline.recovery`). A
    database that is busy or unreachable raises :class:`DatabaseUnavailable`: nothing is
    recorded, the caller retries."""
    path, reason = measurement.path, measurement.reason
    if measurement.status == "rejected":
        images_db.set_image_status(engine, [path], "rejected", reason=reason)
        return ImageResult(path, "rejected", reason=reason)
    if measurement.status == "failed":
        images_db.mark_image_failed(engine, path, reason)
        return ImageResult(path, "failed", reason=reason)
    rows = measurement.rows
    rms = rows["local_rms_jyb"].to_numpy()
    median_rms = float(np.median(rms)) if rms.size else None
    photometry_db.replace_image_photometry(
        engine,
        path,
        rows,
        {
            "mjd": measurement.mjd,
            "median_rms_jyb": median_rms,
            "n_sources": len(rows),
            **noise_columns(measurement.noise),
        },
    )
    return ImageResult(
        path,
        "measured",
        n_sources=len(rows),
        median_rms_jyb=median_rms,
        n_flagged=int((rows["quality_flag"] != 0).sum()),
        noise=measurement.noise,
    )


def measure_image(
    engine: Engine,
    catalog: Catalog,
    path: str,
    *,
    min_flux_mjy: float = 0.0,
    radius_deg: float | None = None,
    now: float | None = None,
    noise_correlation: str = DEFAULT_NOISE_CORRELATION,
) -> ImageResult:
    """Forced photometry of every catalog source in one image, stored in one transaction
    (:func:`read_and_measure`, then :func:`record_measurement`)."""
    measurement = read_and_measure(
        catalog,
        path,
        min_flux_mjy=min_flux_mjy,
        radius_deg=radius_deg,
        now=now,
        noise_correlation=noise_correlation,
    )
    return record_measurement(engine, measurement)


# A photometry worker process keeps the catalog it was started with (sent once, not per image).
_worker_state: dict = {}


def _start_photometry_worker(
    catalog: Catalog, min_flux_mjy: float, noise_correlation: str = DEFAULT_NOISE_CORRELATION
) -> None:
    _worker_state.update(
        catalog=catalog, min_flux_mjy=min_flux_mjy, noise_correlation=noise_correlation
    )


def _measure_in_worker(path: str) -> Measurement:
    return read_and_measure(
        _worker_state["catalog"],
        path,
        min_flux_mjy=_worker_state["min_flux_mjy"],
        noise_correlation=_worker_state["noise_correlation"],
    )


def _measure_here(
    catalog: Catalog,
    paths: Sequence[str],
    min_flux_mjy: float,
    noise_correlation: str = DEFAULT_NOISE_CORRELATION,
) -> Iterator[tuple[str, Measurement | Exception]]:
    """The serial path: each image is measured only when the previous one has been stored."""
    for path in paths:
        try:
            yield (
                path,
                read_and_measure(
                    catalog, path, min_flux_mjy=min_flux_mjy, noise_correlation=noise_correlation
                ),
            )
        except Exception as exc:  # handled by the caller's per-image error boundary
            yield path, exc


def measure_images(
    engine: Engine,
    catalog: Catalog,
    paths: Sequence[str],
    *,
    min_flux_mjy: float = 0.0,
    workers: int = 1,
    noise_correlation: str = DEFAULT_NOISE_CORRELATION,
    progress: Progress = silent,
) -> list[ImageResult]:
    """:func:`measure_image` for each path; one bad image never stops the others.

    ``workers`` > 1 reads and measures up to that many images at once in worker processes
    (:mod:`ese_assets.pipeline.parallel`) while this process stores them, one transaction per
    image in the order of ``paths``, so the tables are those of the serial path. The error
    boundary is per image, except for :class:`DatabaseUnavailable`: a busy or lost database is
    not the image's fault, so it propagates (the Dagster step retries with backoff; the images
    not yet measured stay queued and are requested again if the retries run out).
    ``noise_correlation``: the error model (``ESE_NOISE_CORRELATION``, :func:`image_photometry`);
    each image's is stored with it (``images.noise_corr_*``) and returned in its result.
    """
    workers = min(workers, len(paths))
    with contextlib.ExitStack() as stack:
        outcomes = None
        if workers > 1:
            try:
                outcomes = stack.enter_context(
                    parallel.ordered_map(
                        _measure_in_worker,
                        paths,
                        workers=workers,
                        initializer=_start_photometry_worker,
                        initargs=(catalog, min_flux_mjy, noise_correlation),
                    )
                )
            except parallel.PoolUnavailable as exc:  # then this process measures them all
                log.warning("%s; measuring the images in this process", exc)
                progress(f"{exc}; measuring the images in this process")
        if outcomes is None:
            outcomes = _measure_here(catalog, paths, min_flux_mjy, noise_correlation)
        return _record_all(engine, paths, outcomes, progress)


def _record_all(
    engine: Engine,
    paths: Sequence[str],
    outcomes: Iterator[tuple[str, Measurement | Exception]],
    progress: Progress,
) -> list[ImageResult]:
    """Store each outcome in its own transaction, with the per-image error boundary."""
    results = []
    for i, (path, outcome) in enumerate(outcomes, start=1):
        try:
            if isinstance(outcome, Exception):
                raise outcome
            res = record_measurement(engine, outcome)
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
