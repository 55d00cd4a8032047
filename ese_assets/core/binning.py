"""Nightly bins: one inverse-variance weighted mean flux per (source, night), from additive sums.

Why: a night (hours) is far shorter than an ESE (14-180 days), so the robust baseline and the dip
statistic lose nothing that matters by seeing one point per night, and they then read at most one
row per source and night of the trailing window (<= 365 for a year) whatever the cadence: at
DSA-110's ~300 images a night the unbinned window holds ~10^5 epochs per source.

A bin is computed from the night's partial sums (:func:`ese_assets.core.sums.night_partial_sums`,
stored in ``source_night_sums``), so it costs nothing beyond the sums the whole-history moments
already need. With c the source's constant shift, d = f - c,
``sigma_i^2 = e_i^2 + (k f_i)^2`` (the flux-scale floor k per epoch, as in the moments) and
``w_i = 1/sigma_i^2``:

* ``flux_mjy = c + sum_wd / sum_w`` (weighted mean); when an epoch of the night has an unusable
  error (``n_bad_err > 0``, or ``sum_w = 0``) the unweighted mean ``c + sum_d / N`` instead;
* ``flux_err_mjy = 1 / sqrt(sum_w)``, NaN when an epoch's error is unusable (then the dip
  statistic of the source is NaN, as it is unbinned);
* ``mjd = (first_mjd + last_mjd) / 2`` (the bin's time; ``first_mjd``, ``last_mjd`` are kept, and
  the dip window reports the first epoch of its first night and the last epoch of its last night);
* ``n_epochs = N``;
* within-night scatter, so that a night with excess scatter is visible:
  ``night_chi2_nu = (sum_wd2 - sum_wd^2 / sum_w) / (N - 1)`` (reduced chi^2 about the night's
  weighted mean; ~1 when the errors describe the scatter) and
  ``night_std_mjy = sqrt((sum_d2 - sum_d^2 / N) / (N - 1))`` (sample std); NaN for N = 1.

The bin error assumes the epochs of a night independent (calibration included). Scatter of the
bins beyond their errors (calibration correlated within a night, intrinsic variability) is what
the dip statistic's ``s_excess`` absorbs: it compares the robust scatter of the bins with their
median error (:mod:`ese_assets.core.variability`).

What binning loses:

* time resolution below a night: an event shorter than a night is averaged into one bin, and one
  bin cannot fire the dip statistic (windows of >= 3 rows, each |z| clipped at 5), so single-night
  events are not found by the dip rule (the bin's ``night_chi2_nu`` shows them). Events longer
  than a few nights -- every ESE -- keep their significance: for independent epochs the sum of z
  over a window of bins divided by sqrt(bins) equals the unbinned sum over the same epochs divided
  by sqrt(epochs) (before clipping);
* the per-row clip then applies to nights: a window's S is at most ``5 sqrt(nights)`` instead of
  ``5 sqrt(epochs)``, so for very deep events S measures the duration in nights (still far above
  the threshold 6 for any ESE of >= 3 nights and depth well above the night-to-night scatter);
* ``median_flux_mjy`` and ``robust_std_mjy`` are of the nightly means: the robust std is the
  night-to-night scatter, ~sqrt(N per night) below the epoch scatter for white noise.

Binning mode (``ESE_BIN_NIGHTS``, :data:`BIN_NIGHTS_MODES`): ``on`` bins every source, ``off``
none (raw epochs of the window, the cost grows with the cadence), ``auto`` (default) follows
:func:`sources_to_bin`: a source is binned when its window holds more than
:data:`AUTO_BIN_ABOVE_EPOCHS` (365) epochs and more epochs than nights. So the window read never
exceeds ~365 rows per source (one a night binned, at most 365 epochs unbinned), sparse and daily
surveys (one epoch a night) are never binned, and short or slow histories keep their exact epochs
until the cadence makes them expensive. With one epoch per night binned and unbinned statistics
agree to rounding.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ese_assets.core.sums import night_partial_sums
from ese_assets.core.variability import WINDOW_COLUMNS, variability_metrics

#: Values of the binning setting (``ESE_BIN_NIGHTS``): see :func:`sources_to_bin`.
BIN_NIGHTS_MODES = ("auto", "on", "off")

#: Default binning mode: bin the sources whose window is expensive and binnable
#: (:func:`sources_to_bin`).
DEFAULT_BIN_NIGHTS = "auto"

#: ``auto`` bins a source whose trailing window holds more epochs than this (and more epochs than
#: nights): the most rows a window read costs per source either way, i.e. one row a night of a
#: 365-day window.
AUTO_BIN_ABOVE_EPOCHS = 365

#: Columns of :func:`night_bins`, in order.
BIN_COLUMNS = (
    "source_id",
    "night",
    "mjd",
    "flux_mjy",
    "flux_err_mjy",
    "n_epochs",
    "first_mjd",
    "last_mjd",
    "night_chi2_nu",
    "night_std_mjy",
)

#: Columns of a night-sums row that a bin's flux, error, epochs and time need (what the
#: statistics stage reads: fewer columns, a cheaper read).
BIN_SUMS_COLUMNS = (
    "source_id",
    "shift_mjy",
    "n_obs",
    "n_bad_err",
    "sum_d",
    "sum_w",
    "sum_wd",
    "first_mjd",
    "last_mjd",
)
#: Further columns :func:`night_bins` uses when present: the night's label and, for the
#: within-night scatter, the sums of squares.
_OPTIONAL_SUMS_COLUMNS = ("night", "sum_d2", "sum_wd2")


def validate_bin_nights(mode: str) -> str:
    """The binning mode, lower-cased; ValueError naming the valid values otherwise."""
    value = str(mode).strip().lower()
    if value not in BIN_NIGHTS_MODES:
        raise ValueError(f"bin_nights={mode!r} is not one of {', '.join(BIN_NIGHTS_MODES)}")
    return value


def night_bins(sums: pd.DataFrame) -> pd.DataFrame:
    """One bin per partial-sums row (one source in one night): :data:`BIN_COLUMNS`.

    ``sums``: rows of ``source_night_sums`` (or :func:`~ese_assets.core.sums.night_partial_sums`),
    any order, with at least :data:`BIN_SUMS_COLUMNS`; without ``night`` the bins' night is None,
    without ``sum_d2``/``sum_wd2`` their within-night scatter NaN. Formulas in the module
    docstring. Output sorted by ``source_id, mjd``.
    """
    missing = [c for c in BIN_SUMS_COLUMNS if c not in sums.columns]
    if missing:
        raise ValueError(f"night_bins: sums lack column(s) {missing}")
    n = sums["n_obs"].to_numpy(dtype=np.float64)
    c = sums["shift_mjy"].to_numpy(dtype=np.float64)
    s_d, s_d2, s_w, s_wd, s_wd2 = (
        sums[k].to_numpy(dtype=np.float64) if k in sums.columns else np.full(len(sums), np.nan)
        for k in ("sum_d", "sum_d2", "sum_w", "sum_wd", "sum_wd2")
    )
    first = sums["first_mjd"].to_numpy(dtype=np.float64)
    last = sums["last_mjd"].to_numpy(dtype=np.float64)
    weighted_ok = (sums["n_bad_err"].to_numpy() == 0) & (s_w > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_nm1 = np.where(n > 1, 1.0 / (n - 1.0), np.nan)
        wmean_d = s_wd / s_w
        flux = c + np.where(weighted_ok, wmean_d, s_d / n)
        err = np.where(weighted_ok, 1.0 / np.sqrt(s_w), np.nan)
        chi2 = np.where(weighted_ok, np.maximum(s_wd2 - s_wd * wmean_d, 0.0) * inv_nm1, np.nan)
        std = np.sqrt(np.maximum(s_d2 - s_d * (s_d / n), 0.0) * inv_nm1)
    out = pd.DataFrame(
        {
            "source_id": sums["source_id"].to_numpy(),
            "night": sums["night"].to_numpy() if "night" in sums.columns else None,
            "mjd": 0.5 * (first + last),
            "flux_mjy": flux,
            "flux_err_mjy": err,
            "n_epochs": sums["n_obs"].to_numpy(dtype=np.int64),
            "first_mjd": first,
            "last_mjd": last,
            "night_chi2_nu": chi2,
            "night_std_mjy": std,
        }
    )
    return out.sort_values(["source_id", "mjd"], kind="mergesort").reset_index(drop=True)


def bin_measurements(measurements: pd.DataFrame, *, flux_scale_error: float) -> pd.DataFrame:
    """Nightly bins (:data:`BIN_COLUMNS`) of a long measurement table from any pipeline.

    ``measurements``: ``source_id, night, mjd, flux_mjy, flux_err_mjy`` (any order; the night is
    whatever groups epochs, e.g. an observing date). The same bins as the stored sums give: each
    source's sums are taken about its median flux (any constant shift gives the same bins up to
    rounding; one near the data keeps the within-night scatter precise).
    """
    table = measurements[["source_id", "night", "mjd", "flux_mjy", "flux_err_mjy"]].copy()
    median = table.groupby("source_id")["flux_mjy"].transform("median")
    table["shift_mjy"] = median.where(np.isfinite(median), 0.0)
    return night_partial_sums(table, flux_scale_error=flux_scale_error).pipe(night_bins)


def sources_to_bin(bins: pd.DataFrame, mode: str = DEFAULT_BIN_NIGHTS) -> np.ndarray:
    """Sorted source_ids of ``bins`` (a window's bins) whose window statistics use the bins.

    The rule, named here once: ``on`` all, ``off`` none, ``auto`` the sources whose bins hold more
    than :data:`AUTO_BIN_ABOVE_EPOCHS` epochs in all and more epochs than bins (some night holds
    more than one epoch). The others keep their raw epochs, which then cost at most as many rows
    as the bins would: ~365 (a source whose nights each hold one epoch gains nothing from bins,
    they would be its epochs; so sparse surveys get exactly the unbinned statistics).
    """
    mode = validate_bin_nights(mode)
    ids = bins["source_id"].to_numpy()
    if mode == "off" or len(ids) == 0:
        return np.array([], dtype=object)
    if mode == "on":
        return np.unique(ids)
    per_source = bins.groupby("source_id", sort=True)["n_epochs"].agg(["sum", "size"])
    wanted = (per_source["sum"] > AUTO_BIN_ABOVE_EPOCHS) & (per_source["sum"] > per_source["size"])
    return per_source.index[wanted].to_numpy(dtype=object)


def binned_window_metrics(
    bins: pd.DataFrame, *, min_window_epochs: int = 3, dip_z_clip: float | None = 5.0
) -> pd.DataFrame:
    """Median, robust std and dip statistic (:data:`WINDOW_COLUMNS`) of nightly bins.

    :func:`~ese_assets.core.variability.variability_metrics` with one row per night: the bins'
    errors already hold the flux-scale floor (so none is added again), windows are counted in
    nights (``min_window_epochs`` nights at least, |z| clipped per night), ``dip_start_mjd`` and
    ``dip_end_mjd`` are the first and last epochs of the window's nights, ``dip_n_epochs`` the
    epochs in them. One row per source, sorted by ``source_id``.
    """
    metrics = variability_metrics(
        bins, flux_scale_error=0.0, min_window_epochs=min_window_epochs, dip_z_clip=dip_z_clip
    )
    return metrics[list(WINDOW_COLUMNS)]
