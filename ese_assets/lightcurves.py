"""ESE detection on anyone's lightcurves: a measurement table in, one row per source out.

:func:`detect_in_lightcurves` applies the pipeline's science to a long table of measurements
from any pipeline (``source_id, mjd, flux, flux_err[, image_id]``):

1. column names are recognised (:data:`COLUMN_ALIASES`; the VAST pipeline's measurements, e.g.
   ``source, time, flux_peak, flux_peak_err, image_id`` as vast-tools loads them, work as they
   are); a ``time`` that is a date-time becomes an MJD (UTC);
2. with an ``image_id`` column, the per-image flux-scale calibration
   (:func:`ese_assets.core.calibration.calibrate_measurements`): fluxes divided by their image's
   gain, its error in quadrature, measurements of bad images left out;
3. nightly bins (``night``: the UTC date of the epoch unless the table has a ``night`` column;
   :func:`ese_assets.core.binning.bin_measurements`, flux-scale floor ``flux_scale_error`` per
   epoch);
4. the whole-history moments (:func:`ese_assets.core.sums.metrics_from_sums`) and the window
   statistics of the pipeline (median, robust std, dip statistic; on the nightly bins when
   :func:`ese_assets.core.binning.sources_to_bin` says so, else on the epochs) over the whole
   table, so that the seed's rules can be applied to the same rows;
5. the ESE template fit with its false-alarm calibration on this table's own nights and errors
   (:mod:`ese_assets.core.ese_template`): ``flag``, ``flag_type``, ``significance``,
   ``false_alarm_prob`` and the best event's parameters.

File reading (:func:`read_measurements`): CSV, Parquet, FITS binary tables and VOTable, by
suffix. Core science lives in ``ese_assets.core``; this module only chooses columns and chains
the steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ese_assets.core import ese_template
from ese_assets.core.binning import (
    DEFAULT_BIN_NIGHTS,
    binned_window_metrics,
    night_bins,
    sources_to_bin,
)
from ese_assets.core.calibration import calibrate_measurements
from ese_assets.core.sums import combine_partial_sums, metrics_from_sums, night_partial_sums
from ese_assets.core.variability import (
    DEFAULT_FLUX_SCALE_ERROR,
    WINDOW_COLUMNS,
    variability_metrics,
)

#: Recognised input column names, first match wins (case-insensitive). ``source`` and
#: ``time``/``flux_peak``/``flux_peak_err``/``image_id`` are the VAST pipeline's (measurements
#: joined to their source, as vast-tools returns them); peak fluxes are preferred to integrated
#: ones, as forced photometry of point sources measures the peak.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "source_id": ("source_id", "source", "src_id", "sourceid"),
    "mjd": ("mjd", "mjd_utc", "time", "datetime", "date_obs", "date-obs"),
    "flux_mjy": ("flux_mjy", "flux", "flux_peak", "peak_flux", "flux_int", "int_flux"),
    "flux_err_mjy": (
        "flux_err_mjy",
        "flux_err",
        "flux_peak_err",
        "peak_flux_err",
        "flux_int_err",
        "int_flux_err",
        "err_flux",
    ),
    "image_id": ("image_id", "image", "image_name", "image_path"),
    "night": ("night",),
}
_REQUIRED = ("source_id", "mjd", "flux_mjy", "flux_err_mjy")
#: File suffixes :func:`read_measurements` reads, by format.
FORMATS = {
    "csv": (".csv", ".csv.gz", ".txt", ".tsv"),
    "parquet": (".parquet", ".pq"),
    "fits": (".fits", ".fit", ".fits.gz", ".fts"),
    "votable": (".xml", ".vot", ".votable"),
}
#: Output columns of :func:`detect_in_lightcurves`, in order (then the moments and window
#: statistics of the pipeline, then the template fit's diagnostics).
RESULT_COLUMNS = (
    "source_id",
    "flag",
    "flag_type",
    "significance",
    "false_alarm_prob",
    "event_t0_mjd",
    "event_duration_days",
    "event_depth_frac",
    "event_caustic",
    "event_shape",
    "baseline_flux_mjy",
    "n_nights",
    "n_event_nights",
)


@dataclass(frozen=True)
class DetectionRun:
    """What one :func:`detect_in_lightcurves` call decided besides the rows: the calibration,
    the expected number of false candidates, the per-image gains (None without image ids) and
    the measurements left out (bad images, unusable rows)."""

    calibration: ese_template.FalseAlarmCalibration
    expected_false_candidates: float
    image_gains: pd.DataFrame | None
    n_measurements: int
    n_excluded: int


def _pick(columns: list[str], wanted: str) -> str | None:
    lower = {c.lower(): c for c in columns}
    for alias in COLUMN_ALIASES[wanted]:
        if alias in lower:
            return lower[alias]
    return None


def _to_mjd(values: pd.Series, name: str) -> np.ndarray:
    """MJD (UTC) of a numeric MJD column or of date-times / ISO strings."""
    if pd.api.types.is_numeric_dtype(values):
        return values.to_numpy(dtype=np.float64)
    stamps = pd.to_datetime(values, utc=True, errors="coerce")
    if stamps.isna().all() and len(values):
        raise ValueError(f"column {name!r} is neither an MJD nor a date-time")
    epoch = pd.Timestamp("1858-11-17", tz="UTC")
    return ((stamps - epoch) / pd.Timedelta(days=1)).to_numpy(dtype=np.float64, na_value=np.nan)


def standard_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The table with the recognised columns renamed (:data:`COLUMN_ALIASES`), ``mjd`` numeric.

    Raises ValueError naming the missing quantities and the names tried.
    """
    cols = list(table.columns)
    chosen = {k: _pick(cols, k) for k in COLUMN_ALIASES}
    missing = [k for k in _REQUIRED if chosen[k] is None]
    if missing:
        tried = "; ".join(f"{k}: {', '.join(COLUMN_ALIASES[k])}" for k in missing)
        raise ValueError(f"measurement table lacks column(s) for {missing} (names tried: {tried})")
    out = pd.DataFrame(
        {k: table[c].to_numpy() for k, c in chosen.items() if c is not None and k != "mjd"}
    )
    out["mjd"] = _to_mjd(table[chosen["mjd"]], chosen["mjd"])
    for k in ("flux_mjy", "flux_err_mjy"):
        out[k] = pd.to_numeric(out[k], errors="coerce").astype(np.float64)
    out["source_id"] = out["source_id"].astype(str)
    return out


def read_measurements(path: str | Path) -> pd.DataFrame:
    """A measurement table from CSV, Parquet, FITS (first table HDU) or VOTable, by suffix.

    Raises ValueError naming the file for an unknown suffix, and the reader's error otherwise.
    """
    path = Path(path)
    name = path.name.lower()
    fmt = next((f for f, sufs in FORMATS.items() if name.endswith(sufs)), None)
    if fmt is None:
        known = ", ".join(s for sufs in FORMATS.values() for s in sufs)
        raise ValueError(f"{path}: unknown table format (known suffixes: {known})")
    if fmt == "csv":
        return pd.read_csv(path, sep="\t" if name.endswith(".tsv") else ",")
    if fmt == "parquet":
        return pd.read_parquet(path)
    from astropy.table import Table  # astropy only for the formats that need it

    table = Table.read(path, format="fits" if fmt == "fits" else "votable")
    frame = table.to_pandas()
    for col in frame.columns:  # FITS strings come back as bytes
        if frame[col].dtype == object and len(frame) and isinstance(frame[col].iloc[0], bytes):
            frame[col] = frame[col].str.decode("utf-8").str.strip()
    return frame


def _night_labels(mjd: np.ndarray) -> np.ndarray:
    """UTC calendar date of each MJD (YYYY-MM-DD), the project's default night."""
    day = np.floor(mjd)
    uniq, inverse = np.unique(day, return_inverse=True)
    labels = (pd.Timestamp("1858-11-17") + pd.to_timedelta(uniq, unit="D")).strftime("%Y-%m-%d")
    return np.asarray(labels, dtype=object)[inverse]


def detect_in_lightcurves(
    table: pd.DataFrame,
    *,
    catalog_flux_mjy: pd.Series | dict | None = None,
    flux_scale_error: float = DEFAULT_FLUX_SCALE_ERROR,
    calibrate: bool = True,
    bin_nights: str = DEFAULT_BIN_NIGHTS,
    n_simulations: int = ese_template.DEFAULT_N_SIMULATIONS,
    fap_per_source: float = ese_template.DEFAULT_FAP_PER_SOURCE,
    calibration: ese_template.FalseAlarmCalibration | None = None,
    seed: int = 0,
    return_run: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, DetectionRun]:
    """One row per source: :data:`RESULT_COLUMNS`, the pipeline's statistics, the template fit.

    ``table``: measurements with the columns of :data:`COLUMN_ALIASES` (fluxes in mJy).
    ``catalog_flux_mjy``: catalog flux per source_id (index or keys), the baseline prior of the
    template fit and of the calibration. ``calibrate``: apply the per-image calibration when an
    image id column is present. ``calibration``: false-alarm thresholds of an earlier run on the
    same cadence (else calibrated on this table: ``n_simulations`` null lightcurves, ``seed``).
    With ``return_run`` also a :class:`DetectionRun`. Steps in the module docstring.
    """
    rows = standard_columns(table)
    n_in = len(rows)
    usable = (
        np.isfinite(rows["mjd"].to_numpy())
        & np.isfinite(rows["flux_mjy"].to_numpy())
        & np.isfinite(rows["flux_err_mjy"].to_numpy())
        & (rows["flux_err_mjy"].to_numpy() > 0)
    )
    rows = rows[usable].reset_index(drop=True)
    catalog = None
    if catalog_flux_mjy is not None:
        catalog = pd.Series(catalog_flux_mjy, dtype=float)
        catalog.index = catalog.index.astype(str)
    gains = None
    if calibrate and "image_id" in rows.columns:
        calibrated, gains = calibrate_measurements(rows, catalog_flux_mjy=catalog)
        good = ~calibrated["bad_image"].to_numpy(dtype=bool)
        rows = calibrated.loc[good].reset_index(drop=True)
        rows["flux_mjy"] = rows["normalized_flux_mjy"]
        rows["flux_err_mjy"] = rows["normalized_flux_err_mjy"]
    if "night" not in rows.columns:
        rows["night"] = _night_labels(rows["mjd"].to_numpy(dtype=float))
    rows["night"] = rows["night"].astype(str)

    # Sums about the catalog flux when known (else the median): the pipeline's shift.
    median = rows.groupby("source_id")["flux_mjy"].transform("median")
    shift = median
    if catalog is not None:
        shift = rows["source_id"].map(catalog).where(lambda s: np.isfinite(s), median)
    rows["shift_mjy"] = shift.where(np.isfinite(shift), 0.0).to_numpy(dtype=float)
    sums = night_partial_sums(rows, flux_scale_error=flux_scale_error)
    moments = metrics_from_sums(combine_partial_sums(sums))
    bins = night_bins(sums)
    binned = sources_to_bin(bins, bin_nights)
    parts = []
    if len(binned):
        parts.append(binned_window_metrics(bins[bins["source_id"].isin(binned)]))
    raw = rows[~rows["source_id"].isin(set(binned))]
    if len(raw):
        parts.append(
            variability_metrics(raw, flux_scale_error=flux_scale_error)[list(WINDOW_COLUMNS)]
        )
    window = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=WINDOW_COLUMNS)
    stats = moments.merge(window, on="source_id", how="left")

    matrix = ese_template.lightcurve_matrix(bins, catalog)
    scores = ese_template.score_lightcurves(matrix)
    if calibration is None:
        calibration = ese_template.calibrate_false_alarms(
            matrix, scores, n_simulations=n_simulations, fap_per_source=fap_per_source, seed=seed
        )
    fit = ese_template.classify(scores, calibration)
    fit["source_id"] = fit["source_id"].astype(str)
    out = fit[list(RESULT_COLUMNS)].merge(stats, on="source_id", how="left")
    extra = [c for c in fit.columns if c not in out.columns]
    out = out.merge(fit[["source_id", *extra]], on="source_id", how="left")
    out = out.sort_values("source_id", kind="mergesort").reset_index(drop=True)
    if not return_run:
        return out
    run = DetectionRun(
        calibration=calibration,
        # Only scored sources (enough nights) can be flagged.
        expected_false_candidates=calibration.expected_false(
            int(np.isfinite(out["dchi2_const"].to_numpy(dtype=float)).sum())
        ),
        image_gains=gains,
        n_measurements=n_in,
        n_excluded=n_in - len(rows),
    )
    return out, run
