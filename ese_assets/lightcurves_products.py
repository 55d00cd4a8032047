"""The ESE template detection of :func:`ese_assets.lightcurves.detect_in_lightcurves` on the
pipeline's own products database, read-only.

The rows are the ones the pipeline's statistics read: usable photometry only (no
``exclude_flags`` quality bit and a flux, filtered in SQL by
:func:`ese_assets.storage.photometry.source_photometry`), fluxes as ``flux_scale`` says
(``normalized``: the stored gain-normalized flux, raw where a row is not calibrated yet;
``raw``: ``peak_jyb``; the same choice as the statistics, ``pipeline.statistics._flux_table``),
each row's night from its image, the image path as the image id and the catalog flux as the
baseline prior. The database's own calibration is already in the normalized fluxes (and images
with a bad gain carry the excluded bad-gain bit), so the table's calibration is not applied a
second time. Nothing is written: candidates, statistics and the schema are untouched.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from sqlalchemy import Engine

from ese_assets.core import ese_template
from ese_assets.core.calibration import DEFAULT_FLUX_SCALE
from ese_assets.core.quality import DEFAULT_EXCLUDED_FLAGS
from ese_assets.core.variability import DEFAULT_FLUX_SCALE_ERROR
from ese_assets.lightcurves import DetectionRun, detect_in_lightcurves
from ese_assets.pipeline.statistics import _flux_table
from ese_assets.storage import photometry as photometry_db
from ese_assets.storage.engine import open_existing

#: Columns of :func:`products_measurements`: the measurement table of detect_in_lightcurves.
MEASUREMENT_COLUMNS = ("source_id", "mjd", "flux_mjy", "flux_err_mjy", "night", "image_id")


def products_measurements(
    bind: Engine,
    source_ids: Iterable[str] | None = None,
    *,
    exclude_flags: int = DEFAULT_EXCLUDED_FLAGS,
    flux_scale: str = DEFAULT_FLUX_SCALE,
) -> tuple[pd.DataFrame, pd.Series]:
    """``(measurements, catalog_flux_mjy)`` of the given sources (all measured ones when None).

    ``measurements``: :data:`MEASUREMENT_COLUMNS` (mJy; image_id = image path), usable rows only,
    ordered by source_id, night, mjd, image path. ``catalog_flux_mjy``: each source's catalog
    flux (its latest row's), indexed by source_id.
    """
    ids = photometry_db.measured_source_ids(bind) if source_ids is None else list(source_ids)
    rows = photometry_db.source_photometry(bind, ids, exclude_flags=exclude_flags)
    table = _flux_table(rows, flux_scale)
    table["image_id"] = rows["image_path"].to_numpy()
    latest = rows.sort_values("measured_at", kind="mergesort").groupby("source_id").tail(1)
    catalog = pd.Series(
        latest["nvss_flux_mjy"].to_numpy(dtype=float, na_value=float("nan")),
        index=latest["source_id"].astype(str).to_numpy(),
        name="catalog_flux_mjy",
    ).sort_index()
    return table[list(MEASUREMENT_COLUMNS)], catalog


def detect_in_products(
    products_db: str | Path | Engine,
    source_ids: Iterable[str] | None = None,
    *,
    exclude_flags: int = DEFAULT_EXCLUDED_FLAGS,
    flux_scale: str = DEFAULT_FLUX_SCALE,
    flux_scale_error: float = DEFAULT_FLUX_SCALE_ERROR,
    n_simulations: int = ese_template.DEFAULT_N_SIMULATIONS,
    fap_per_source: float = ese_template.DEFAULT_FAP_PER_SOURCE,
    calibration: ese_template.FalseAlarmCalibration | None = None,
    seed: int = 0,
    return_run: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, DetectionRun]:
    """One row per source of the products database (or of ``source_ids``): the columns of
    :func:`~ese_assets.lightcurves.detect_in_lightcurves`, on the rows of
    :func:`products_measurements`. A missing database raises FileNotFoundError naming it.

    The false-alarm thresholds are calibrated on the nights and errors of the sources read, so
    a single source's run has thresholds for its own cadence (pass ``calibration`` to reuse a
    survey-wide one).
    """
    engine = products_db if isinstance(products_db, Engine) else open_existing(str(products_db))
    table, catalog = products_measurements(
        engine, source_ids, exclude_flags=exclude_flags, flux_scale=flux_scale
    )
    return detect_in_lightcurves(
        table,
        catalog_flux_mjy=catalog,
        flux_scale_error=flux_scale_error,
        calibrate=False,
        n_simulations=n_simulations,
        fap_per_source=fap_per_source,
        calibration=calibration,
        seed=seed,
        return_run=return_run,
    )
