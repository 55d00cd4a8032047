"""Flux-scale calibration of a night's images: gains, normalized fluxes, bad images.

Per night, in ONE transaction (:func:`ese_assets.storage.statistics.sums_transaction`, which also
serialises it with the statistics writers): read the night's usable photometry; read the
reference history of the trailing ``window_days`` of nights BEFORE it (``calibration_references``)
and turn it into baselines (:func:`ese_assets.core.calibration.prior_baselines`); calibrate
(:func:`ese_assets.core.calibration.calibrate_measurements`; sources without enough history use
the night's own images, then the catalog flux); write ``image_gains`` and the night's reference
values, each row's ``normalized_flux_jy``/``normalized_flux_err_jy``, and the ``FLAG_BAD_GAIN``
quality bit on every row of a bad image (so the statistics, which leave that bit out by default,
never read them).

A night depends only on its own photometry and on the reference values of earlier nights, so
re-running it on unchanged inputs leaves identical rows, and several nights run in date order
(each sees the history its predecessors just wrote). Re-running an earlier night changes the
history later nights were calibrated with; their own re-run (the nightly reconciliation, a
backfill) brings them up to date.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sqlalchemy import Engine

from ese_assets.core.calibration import (
    DEFAULT_BASELINE_WINDOW_DAYS,
    CalibrationOptions,
    calibrate_measurements,
    nightly_reference_values,
    prior_baselines,
)
from ese_assets.core.quality import DEFAULT_EXCLUDED_FLAGS, FLAG_BLENDED
from ese_assets.storage import calibration as calibration_db
from ese_assets.storage.statistics import sums_transaction

log = logging.getLogger(__name__)


def _window_start(night: str, window_days: float) -> str:
    """The first night of the reference window that ends before ``night``."""
    day = dt.date.fromisoformat(night) - dt.timedelta(days=int(np.ceil(window_days)))
    return day.isoformat()


def calibrate_night(
    conn,
    night: str,
    *,
    options: CalibrationOptions,
    exclude_flags: int,
    window_days: float,
    now: float,
) -> pd.DataFrame:
    """Calibrate one night inside the caller's transaction; returns its ``image_gains`` rows."""
    rows = calibration_db.night_calibration_rows(conn, night, exclude_flags=exclude_flags)
    all_images = calibration_db.night_image_paths(conn, night)
    if rows.empty:
        calibration_db.replace_night_calibration(conn, night, pd.DataFrame(), pd.DataFrame())
        calibration_db.apply_photometry_calibration(
            conn, dict.fromkeys(all_images, False), pd.DataFrame(columns=["id"])
        )
        return pd.DataFrame()
    table = pd.DataFrame(
        {
            "source_id": rows["source_id"].to_numpy(),
            "image_id": rows["image_path"].to_numpy(),
            "mjd": rows["mjd"].to_numpy(float),
            "flux_mjy": rows["peak_jyb"].to_numpy(float) * 1e3,
            "flux_err_mjy": rows["peak_err_jyb"].to_numpy(float) * 1e3,
            # a joint fit of a close pair is unbiased but shares noise with its neighbour
            "isolated": (rows["quality_flag"].to_numpy(np.int64) & FLAG_BLENDED) == 0,
        }
    )
    catalog = rows.groupby("source_id", sort=True)["nvss_flux_mjy"].last()
    history = calibration_db.reference_history(
        conn,
        catalog.index,
        first_night=_window_start(night, window_days),
        before_night=night,
    )
    calibrated, gains = calibrate_measurements(
        table,
        catalog_flux_mjy=catalog,
        prior_baselines=prior_baselines(history, options),
        options=options,
    )
    night_of_image = pd.Series(night, index=gains["image_id"].to_numpy())
    references = nightly_reference_values(calibrated, night_of_image)
    gains = gains.rename(columns={"image_id": "image_path"}).assign(night=night, computed_at=now)
    calibration_db.replace_night_calibration(conn, night, gains, references)
    bad = dict.fromkeys(all_images, False)
    bad.update(zip(gains["image_path"], gains["bad"].astype(bool), strict=True))
    calibration_db.apply_photometry_calibration(
        conn,
        bad,
        pd.DataFrame(
            {
                "id": rows["id"].to_numpy(),
                "normalized_flux_jy": calibrated["normalized_flux_mjy"].to_numpy(float) / 1e3,
                "normalized_flux_err_jy": calibrated["normalized_flux_err_mjy"].to_numpy(float)
                / 1e3,
            }
        ),
    )
    return gains


def calibrate_nights(
    engine: Engine,
    nights: Sequence[str],
    *,
    options: CalibrationOptions | None = None,
    exclude_flags: int = DEFAULT_EXCLUDED_FLAGS,
    window_days: float = DEFAULT_BASELINE_WINDOW_DAYS,
    now: float | None = None,
) -> pd.DataFrame:
    """Calibrate every image of ``nights``, one transaction per night, in date order.

    ``exclude_flags``: the statistics' mask; rows with those bits (other than the bad-gain bit,
    which this step decides) neither serve as references nor get a normalized flux. Returns the
    ``image_gains`` rows written, all nights together.
    """
    options = options or CalibrationOptions()
    now = time.time() if now is None else now
    out = []
    for night in sorted({str(n) for n in nights}):
        with sums_transaction(engine) as conn:
            gains = calibrate_night(
                conn,
                night,
                options=options,
                exclude_flags=exclude_flags,
                window_days=window_days,
                now=now,
            )
        if len(gains):
            log.info(
                "night %s: %d images calibrated, %d bad",
                night,
                int(gains["calibrated"].sum()),
                int(gains["bad"].sum()),
            )
            out.append(gains)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()
