"""Per-source variability metrics and the windowed dip statistic, computed for many sources at once.

Input is a long table of measurements (``source_id, mjd, flux_mjy, flux_err_mjy``; rows in any
order, many sources). The table is sorted once by ``(source_id, mjd)`` and every metric is a segment
reduction over that order (``np.add.reduceat`` and friends); there is no Python loop over sources.

Notation for one source with N measurements f_i +- e_i:

* effective error ``sigma_i = sqrt(e_i^2 + (k * |f_i|)^2)`` with ``k = flux_scale_error``: a
  fractional flux-scale (calibration) error added in quadrature, the same floor forced
  photometry can apply. With ``k = 0`` (default) ``sigma_i = e_i``.
* weights ``w_i = 1 / sigma_i^2``, weighted mean ``fbar_w = sum(w f) / sum(w)``.
* ``chi2_nu = sum((f_i - fbar_w)^2 / sigma_i^2) / (N - 1)``. The seed system used the *unweighted*
  mean here; we use the weighted mean, which is the value that minimises chi2 (and so the
  constant-source null hypothesis with N - 1 degrees of freedom).
* ``eta_metric = N/(N-1) * (mean(q f^2) - mean(q f)^2 / mean(q))`` with ``q_i = 1 / e_i^2``, the
  QUOTED errors only (VAST pipeline, LOFAR TraP; Swinbank et al. 2015), so published eta
  thresholds apply. It equals ``sum q (f - fbar_q)^2 / (N - 1)``, i.e. ``chi2_nu`` WITHOUT the
  flux-scale floor; for a bright source whose scatter is the ~2 % calibration error it is up to
  (k f / e)^2 times larger than ``chi2_nu``. It is evaluated from residuals about the q-weighted
  mean (no cancelling raw sums). NaN when an epoch's quoted error is not finite and > 0.
  ``chi2_nu`` (floor included) is what says whether a source varies beyond its calibration.
* ``v_index = s / mean`` (modulation index) with ``s`` the sample standard deviation (ddof=1).
* ``sigma_deviation = max(|max f - mean|, |min f - mean|) / s`` (the seed's primary metric, kept for
  compatibility). With the sample std it is bounded by ``(N - 1) / sqrt(N)`` (Samuelson's
  inequality; reached by N - 1 equal values and one outlier), so 5 is impossible below 27 epochs,
  3.5 below 15 and 3 below 11 -- and an outlier inflates its own std. See
  :func:`ese_assets.core.detection.max_sigma_deviation`.
* ``median_flux_mjy`` and ``robust_std_mjy = 1.4826 * median(|f - median|)`` (MAD scaled to a
  Gaussian sigma).

Numerical stability: no raw sums of squares. Every second moment is accumulated about a per-source
shift (the unweighted mean, which is within the data range), so fluxes such as 1e6 +- 1e-3 mJy keep
their full relative precision (two-pass algorithm; Chan, Golub & LeVeque 1983).

Dip statistic (why: the seed's sigma_deviation misses most ESEs -- a dip covering a fraction p of
the epochs can reach at most about sqrt((1 - p)/p) standard deviations, ~1.7 for p = 0.25):

* baseline ``m = median(f)``; per-epoch noise ``sigma_tot_i = sqrt(sigma_i^2 + s_excess^2)`` with
  ``s_excess^2 = max(0, robust_std^2 - median(sigma_i)^2)``: the quoted errors, plus whatever extra
  scatter the robust (MAD) spread shows beyond them. Sources whose errors are underestimated, or
  that flicker intrinsically, are thus not flagged for ordinary scatter, while the MAD is barely
  moved by a dip that covers a minority of the epochs.
* ``z_i = (f_i - m) / sigma_tot_i``, clipped to ``[-dip_z_clip, +dip_z_clip]`` (default 5) so that
  a single bad image cannot produce a detection on its own (see below).
* for windows of L consecutive epochs (time order) with L on a geometric (Fibonacci) ladder
  ``3, 5, 8, 13, 21, 34, 55, 89, ...`` up to N, ``S = sum_{window} z_i / sqrt(L)`` from per-source
  cumulative sums; ``dip_significance`` is the S of largest |S| over all windows and lengths
  (negative: a dip, positive: a spike/brightening), reported with the window's first and last MJD,
  ``dip_n_epochs = L`` and ``dip_depth_frac = mean(f in window) / m - 1`` (NaN when m <= 0).
  A box of length L matched against a dip of K epochs loses a factor sqrt(min(L,K)/max(L,K)) in S;
  consecutive ladder steps differ by <= 5/3, so the loss is at most ~12 %.
* single-image outliers: windows have at least ``min_window_epochs`` (default 3) epochs and each z
  is clipped at 5, so one epoch contributes at most 5/sqrt(3) = 2.9 to S; reaching S = 6 needs
  several deviant epochs in a row. The clip caps a window's S at ``5 * sqrt(L)``, so for very deep
  dips S measures duration more than depth (use ``dip_depth_frac`` for depth).
* look-elsewhere effect: the scan tests about N x (ladder length) correlated windows, so max |S|
  of a
  constant source is not N(0, 1): it grows slowly with N (like sqrt(2 ln N_eff)). Measured on pure
  Gaussian noise with heteroscedastic, correctly quoted errors (seeded; 2e5 sources at N = 20 down
  to 2e4 at N = 2000, 6e3 at N = 5000, 3e3 at N = 10000): the median of max |S| is 1.9, 2.8, 3.2,
  3.6, 3.8, 4.1, 4.3 for N = 20, 100, 300, 1000, 2000, 5000, 10000; P(|S| >= 5) = 2e-5, 1.4e-4,
  6e-4, 2.2e-3, 4.7e-3, 1.0e-2, 2.5e-2; P(|S| >= 5.5) = 5e-6, 0, 7e-5, 5e-5, 3.5e-4, 1.0e-3, 1.3e-3;
  no source reached |S| >= 6. The default detection threshold
  ``DetectionSettings.min_dip_sigma = 6.0`` therefore keeps the false-alarm rate per constant
  source below ~1e-4 up to ~1e4 epochs (Gaussian-tail extrapolation), with margin for non-Gaussian
  tails of real data. With errors underestimated by 1.5x (heteroscedastic), the additive s_excess
  absorbs most but not all of the excess: P(|S| >= 6) ~ 3e-4 for N = 50 to 2000.
  Sensitivity: a 30 % dip over 15 of 300 epochs gives S ~ 17.6 at per-epoch S/N 20 (always
  detected) and S ~ 8.2 at S/N 8 (99 % detected at 6).
  If the majority of epochs lie in a dip (p > 0.5) the median follows the dip and the statistic
  reports the unaffected part as a positive excursion instead.
* the pipeline runs the robust baseline and the scan on nightly bins of dense lightcurves (one
  weighted mean per night; :mod:`ese_assets.core.binning`, which says what that loses: nothing
  for events longer than a few nights, a single-night event is averaged); the figures above then
  apply with N = nights.

Two-epoch metrics (Mooley et al. 2016, ApJ 818, 105), over the same rows as the dip statistic
(the trailing window, raw epochs or nightly bins): for epochs a before b,
``Vs = (f_b - f_a) / sqrt(sigma_a^2 + sigma_b^2)`` and ``m = 2 (f_b - f_a) / (f_b + f_a)``. Of the
pairs with ``|Vs| >= vs_min`` (default 4.3, Mooley's threshold) and ``f_a + f_b > 0`` (m is
undefined otherwise), the one of largest |m| is reported as ``two_epoch_m`` and its
``two_epoch_vs`` (signed, later minus earlier: negative = fading); NaN when no pair qualifies.
sigma is the error the dip scan uses (quoted error with the flux-scale floor, or a nightly bin's
error): with ``flux_scale_error = 0`` on raw epochs these are exactly Mooley's/VAST's values.
No O(N^2) pairs are stored, and most sources cost O(N): when even
``(max f - min f) / (sqrt(2) min sigma) < vs_min`` no pair can qualify; when all fluxes are > 0
and the (max, min) pair qualifies it is the answer (|m| = 2|f_b - f_a|/(f_a + f_b) grows with the
larger flux and falls with the smaller). Only the remaining sources are scanned pair by pair, one
time lag at a time over all of them at once, and only over rows that can be in a qualifying pair
(see :func:`two_epoch_extremes`). Measured on 10^4 sources x 365 rows: 0.05 s with equal errors
(nearly all settled by the bounds), ~10 s in the worst case tried (errors varying 10x within
each source, so many rows pass the bounds).

Sources with N = 1 get NaN for every metric that needs two points (std, chi2_nu, eta, v_index,
sigma_deviation) rather than an error; sources with fewer than ``min_window_epochs`` epochs get NaN
dip columns. Rows with a non-finite ``mjd`` or ``flux_mjy`` are ignored (a source with none left is
absent from the output). A source with any non-finite or non-positive effective error gets NaN for
the weighted metrics and the dip statistic.

References: Swinbank et al. 2015 (TraP, A&C 11, 25); Murphy et al. 2021 (VAST, PASA 38, e054);
Mooley et al. 2016 (ApJ 818, 105); Fiedler et al. 1987/1994 (ESEs).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# The additive sums moved to core.sums; their names stay importable from here.
from ese_assets.core.sums import COUNT_COLUMNS as COUNT_COLUMNS
from ese_assets.core.sums import EXTREME_COLUMNS as EXTREME_COLUMNS
from ese_assets.core.sums import EXTREME_MAX_COLUMNS as EXTREME_MAX_COLUMNS
from ese_assets.core.sums import EXTREME_MIN_COLUMNS as EXTREME_MIN_COLUMNS
from ese_assets.core.sums import MOMENT_COLUMNS as MOMENT_COLUMNS
from ese_assets.core.sums import SUM_COLUMNS as SUM_COLUMNS
from ese_assets.core.sums import _sort_order
from ese_assets.core.sums import combine_partial_sums as combine_partial_sums
from ese_assets.core.sums import metrics_from_sums as metrics_from_sums
from ese_assets.core.sums import night_partial_sums as night_partial_sums

#: Scale from the median absolute deviation to a Gaussian standard deviation (1 / Phi^-1(3/4)).
MAD_TO_SIGMA = 1.4826


#: Columns of :func:`variability_metrics` that need the epochs themselves (order statistics, the
#: time-ordered dip scan, the two-epoch pairs), so they cannot come from sums.
WINDOW_COLUMNS = (
    "source_id",
    "median_flux_mjy",
    "robust_std_mjy",
    "dip_significance",
    "dip_start_mjd",
    "dip_end_mjd",
    "dip_n_epochs",
    "dip_depth_frac",
    "two_epoch_vs",
    "two_epoch_m",
)

#: Output columns of :func:`variability_metrics`, in order: the moments (which also come from the
#: additive sums) then the window columns.
METRIC_COLUMNS = (*MOMENT_COLUMNS, *WINDOW_COLUMNS[1:])

#: |Vs| a pair of epochs needs to count as a significant two-epoch change (Mooley et al. 2016).
DEFAULT_VS_MIN = 4.3

#: Default length (days) of the trailing window of the robust baseline and the dip scan. ESEs last
#: 14-180 days (30-90 typical; Fiedler et al. 1994), so a year holds a whole event and its baseline.
DEFAULT_DIP_WINDOW_DAYS = 365.0

#: Default fractional flux-scale (calibration) error k added in quadrature to each epoch's error,
#: sigma_i^2 = e_i^2 + (k f_i)^2: the ~2 % image-to-image calibration scatter of radio surveys.
DEFAULT_FLUX_SCALE_ERROR = 0.02

_INPUT_COLUMNS = ("source_id", "mjd", "flux_mjy", "flux_err_mjy")
#: Optional input columns of rows that stand for several epochs (nightly bins).
_BIN_SPAN_COLUMNS = ("first_mjd", "last_mjd", "n_epochs")


def window_ladder(max_len: int, min_len: int = 3) -> np.ndarray:
    """Window lengths scanned by the dip statistic: Fibonacci numbers >= ``min_len`` and
    <= ``max_len``.

    Consecutive lengths differ by a factor <= 5/3 (-> golden ratio), so any dip length is matched to
    within ~12 % in S by some ladder step, at O(log N) passes over the data.
    """
    min_len = max(int(min_len), 1)
    lengths = [min_len]
    a, b = 1, 2
    while b <= max_len:
        if b > min_len:
            lengths.append(b)
        a, b = b, a + b
    return np.array([n for n in lengths if n <= max_len], dtype=np.int64)


def _segment_median(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Median of ``values`` per source code (0..n_src-1, every code present), in code order.

    pandas' grouped median (a per-group selection in Cython) is ~5x faster than a lexsort by
    (code, value); for an even count it is the mean of the two middle values.
    """
    return pd.Series(values, copy=False).groupby(codes, sort=True).median().to_numpy()


def two_epoch_extremes(
    flux: np.ndarray,
    sigma: np.ndarray,
    starts: np.ndarray,
    counts: np.ndarray,
    *,
    vs_min: float = DEFAULT_VS_MIN,
) -> tuple[np.ndarray, np.ndarray]:
    """Per segment (source), ``(Vs, m)`` of the pair of largest |m| among pairs with
    ``|Vs| >= vs_min`` and ``f_a + f_b > 0`` (NaN, NaN when none); see the module docstring.

    ``flux``/``sigma``: rows sorted by segment then time; segment i is rows
    ``starts[i] : starts[i] + counts[i]`` (counts >= 1). A segment with a non-finite or
    non-positive sigma gets NaN. Ties in |m| go to the earliest first epoch, then the shortest lag.
    """
    n_src = len(starts)
    best_vs = np.full(n_src, np.nan)
    best_m = np.full(n_src, np.nan)
    if n_src == 0:
        return best_vs, best_m
    sig_ok = np.isfinite(sigma) & (sigma > 0)
    seg_ok = np.minimum.reduceat(sig_ok.astype(np.int8), starts).astype(bool) & (counts >= 2)
    fmax = np.maximum.reduceat(flux, starts)
    fmin = np.minimum.reduceat(flux, starts)
    rows = np.arange(len(flux), dtype=np.int64)
    seg_of = np.repeat(np.arange(n_src), counts)
    # Bounds: in a qualifying pair the brighter epoch u has (f_u - min f)/sqrt(s_u^2 + min s^2)
    # >= |Vs| >= vs_min and the fainter one l (max f - f_l)/sqrt(s_l^2 + min s^2) >= vs_min, so
    # only such rows can be in a pair and a source with none has no pair.
    with np.errstate(invalid="ignore", divide="ignore"):
        sig_min = np.minimum.reduceat(np.where(sig_ok, sigma, np.inf), starts)[seg_of]
        scale = np.sqrt(sigma * sigma + sig_min * sig_min)
        can_be_upper = (flux - fmin[seg_of]) / scale >= vs_min
        can_be_lower = (fmax[seg_of] - flux) / scale >= vs_min
    possible = seg_ok & (np.add.reduceat(can_be_upper.astype(np.int64), starts) > 0)
    # Positive fluxes: the (max, min) pair has the largest |m| of all; if it qualifies, done.
    i_max = np.minimum.reduceat(np.where(flux == fmax[seg_of], rows, len(flux)), starts)
    i_min = np.minimum.reduceat(np.where(flux == fmin[seg_of], rows, len(flux)), starts)
    ia = np.minimum(i_max, i_min)[possible]
    ib = np.maximum(i_max, i_min)[possible]
    with np.errstate(invalid="ignore", divide="ignore"):
        vs_ext = (flux[ib] - flux[ia]) / np.hypot(sigma[ia], sigma[ib])
        m_ext = 2.0 * (flux[ib] - flux[ia]) / (flux[ib] + flux[ia])
    direct = (fmin[possible] > 0) & (np.abs(vs_ext) >= vs_min)
    idx = np.flatnonzero(possible)
    best_vs[idx[direct]] = vs_ext[direct]
    best_m[idx[direct]] = m_ext[direct]

    # The others: every pair of their rows that can be in one (time order kept), one lag at a
    # time over all of them together.
    scan = idx[~direct]
    if len(scan) == 0:
        return best_vs, best_m
    in_scan = np.zeros(n_src, dtype=bool)
    in_scan[scan] = True
    sel = rows[in_scan[seg_of] & (can_be_upper | can_be_lower)]
    f, s = flux[sel], sigma[sel]
    sub_counts = np.bincount(seg_of[sel], minlength=n_src)[scan]
    sub_starts = np.zeros(len(scan), dtype=np.int64)
    np.cumsum(sub_counts[:-1], out=sub_starts[1:])
    seg_end = np.repeat(sub_starts + sub_counts, sub_counts)
    pos = np.arange(len(f), dtype=np.int64)
    row_abs_m = np.full(len(f), -1.0)  # best |m| of pairs starting at each row
    row_vs = np.full(len(f), np.nan)
    row_m = np.full(len(f), np.nan)
    active = pos  # rows whose segment still has an epoch `lag` later: the set shrinks, so the
    # total cost is the number of pairs of kept rows, not (longest segment) x (all rows)
    for lag in range(1, int(sub_counts.max())):
        active = active[seg_end[active] - active > lag]
        fa, sa, fb, sb = f[active], s[active], f[active + lag], s[active + lag]
        with np.errstate(invalid="ignore", divide="ignore"):
            total = fa + fb
            vs = (fb - fa) / np.hypot(sa, sb)
            m = 2.0 * (fb - fa) / total
            abs_m = np.where((np.abs(vs) >= vs_min) & (total > 0), np.abs(m), -1.0)
        better = abs_m > row_abs_m[active]
        upd = active[better]
        row_abs_m[upd] = abs_m[better]
        row_vs[upd] = vs[better]
        row_m[upd] = m[better]
    seg_max = np.maximum.reduceat(row_abs_m, sub_starts)
    seg_of_sub = np.repeat(np.arange(len(scan)), sub_counts)
    first = np.minimum.reduceat(np.where(row_abs_m == seg_max[seg_of_sub], pos, len(f)), sub_starts)
    found = seg_max >= 0
    best_vs[scan[found]] = row_vs[first[found]]
    best_m[scan[found]] = row_m[first[found]]
    return best_vs, best_m


def _empty_result(source_dtype) -> pd.DataFrame:
    out = pd.DataFrame({c: pd.Series([], dtype="float64") for c in METRIC_COLUMNS})
    out["source_id"] = pd.Series([], dtype=source_dtype)
    out["n_obs"] = pd.Series([], dtype="int64")
    out["dip_n_epochs"] = pd.Series([], dtype="Int64")
    return out


def variability_metrics(
    lightcurves: pd.DataFrame,
    *,
    flux_scale_error: float = 0.0,
    min_window_epochs: int = 3,
    dip_z_clip: float | None = 5.0,
) -> pd.DataFrame:
    """Variability metrics and the dip statistic for every source in a long measurement table.

    Parameters
    ----------
    lightcurves
        Columns ``source_id, mjd, flux_mjy, flux_err_mjy`` (rows in any order, any number of
        sources). Extra columns are ignored.
    flux_scale_error
        Fractional calibration error k >= 0 added in quadrature:
        ``sigma_i = sqrt(e_i^2 + (k f_i)^2)``.
    min_window_epochs
        Shortest window of the dip scan (default 3; resists single-image outliers).
    dip_z_clip
        Per-epoch |z| clip of the dip scan (default 5; ``None`` disables clipping).

    A row may stand for several epochs (a nightly bin of :mod:`ese_assets.core.binning`: its
    weighted mean and error) when ``lightcurves`` also has ``n_epochs``, ``first_mjd`` and
    ``last_mjd``: every metric then treats a row as one measurement (``n_obs`` counts rows), but
    ``first_mjd``/``last_mjd`` and the dip window's ``dip_start_mjd``/``dip_end_mjd`` are the times
    of the rows' first and last epochs, and ``dip_n_epochs`` counts the epochs in the window.

    Returns
    -------
    DataFrame with one row per source, sorted by ``source_id``, columns :data:`METRIC_COLUMNS`
    (``source_id`` is a column). ``n_obs`` is int64, ``dip_n_epochs`` nullable Int64 (``<NA>`` when
    the source has fewer than ``min_window_epochs`` epochs), everything else float64.
    See the module docstring for the formulas.
    """
    missing = [c for c in _INPUT_COLUMNS if c not in lightcurves.columns]
    if missing:
        raise ValueError(f"lightcurves is missing column(s) {missing}; need {list(_INPUT_COLUMNS)}")
    if not np.isfinite(flux_scale_error) or flux_scale_error < 0:
        raise ValueError(f"flux_scale_error must be a finite number >= 0, got {flux_scale_error!r}")
    if int(min_window_epochs) < 1:
        raise ValueError(f"min_window_epochs must be >= 1, got {min_window_epochs!r}")
    if dip_z_clip is not None and not dip_z_clip > 0:
        raise ValueError(f"dip_z_clip must be > 0 or None, got {dip_z_clip!r}")

    mjd_all = lightcurves["mjd"].to_numpy(dtype=np.float64)
    flux_all = lightcurves["flux_mjy"].to_numpy(dtype=np.float64)
    keep = np.isfinite(mjd_all) & np.isfinite(flux_all)
    sid = lightcurves["source_id"]
    if not keep.all():
        sid = sid[keep]
    if len(sid) == 0:
        return _empty_result(lightcurves["source_id"].dtype)

    # Sort once by (source_id, mjd). factorize(sort=True) numbers the sources in sorted order, so
    # the output comes out sorted by source_id.
    codes_in, uniques = pd.factorize(sid, sort=True)
    order = _sort_order(codes_in, mjd_all[keep])
    codes = codes_in[order]
    mjd = mjd_all[keep][order]
    f = flux_all[keep][order]
    err = lightcurves["flux_err_mjy"].to_numpy(dtype=np.float64)[keep][order]
    binned = all(c in lightcurves.columns for c in _BIN_SPAN_COLUMNS)
    t_first, t_last, n_epochs = (
        (lightcurves[c].to_numpy(dtype=np.float64)[keep][order] for c in _BIN_SPAN_COLUMNS)
        if binned
        else (mjd, mjd, np.ones(len(mjd)))
    )

    n_src = len(uniques)
    n_rows = len(f)
    counts = np.bincount(codes, minlength=n_src)
    starts = np.zeros(n_src, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    n = counts.astype(np.float64)
    nm1 = n - 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_nm1 = np.where(n > 1, 1.0 / nm1, np.nan)

    def seg_sum(x: np.ndarray) -> np.ndarray:
        return np.add.reduceat(x, starts)

    # Effective per-epoch error with the calibration floor.
    sigma = np.sqrt(err * err + (flux_scale_error * f) ** 2)
    sigma_ok = np.isfinite(sigma) & (sigma > 0)
    src_ok = np.minimum.reduceat(sigma_ok.astype(np.int8), starts).astype(bool)

    # --- unweighted moments (two-pass: shift by the mean before squaring) ---
    mean = seg_sum(f) / n
    d = f - mean[codes]
    # Second pass corrects the first-pass mean for rounding (sum(d) is ~0 in exact arithmetic).
    corr = seg_sum(d) / n
    mean = mean + corr
    d = d - corr[codes]
    var = seg_sum(d * d) * inv_nm1
    std = np.sqrt(var)
    fmin = np.minimum.reduceat(f, starts)
    fmax = np.maximum.reduceat(f, starts)

    # --- weighted moments, also about the unweighted mean ---
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(sigma_ok, 1.0 / (sigma * sigma), np.nan)
        sw = seg_sum(w)
        swd = seg_sum(w * d)
        wmean_shift = swd / sw  # fbar_w - mean
        wmean = mean + wmean_shift
        # chi2 about the weighted mean: residuals taken directly, no expansion.
        r = d - wmean_shift[codes]
        chi2_nu = seg_sum(w * r * r) * inv_nm1
        # eta (VAST/TraP): the same sum with the quoted-error weights q = 1/e^2 (no floor),
        # again from residuals about its own weighted mean.
        q_ok = np.isfinite(err) & (err > 0)
        q_src_ok = np.minimum.reduceat(q_ok.astype(np.int8), starts).astype(bool)
        q = np.where(q_ok, 1.0 / (err * err), np.nan)
        rq = d - (seg_sum(q * d) / seg_sum(q))[codes]
        eta = np.where(q_src_ok, seg_sum(q * rq * rq) * inv_nm1, np.nan)
        v_index = std / mean
        sigma_dev = np.maximum(np.abs(fmax - mean), np.abs(fmin - mean)) / std

    # --- robust location and scale ---
    median = _segment_median(f, codes)
    mad = _segment_median(np.abs(f - median[codes]), codes)
    robust_std = MAD_TO_SIGMA * mad

    # --- dip statistic ---
    dip_sig = np.full(n_src, np.nan)
    dip_start = np.full(n_src, np.nan)
    dip_end = np.full(n_src, np.nan)
    dip_len = np.zeros(n_src, dtype=np.int64)
    dip_depth = np.full(n_src, np.nan)

    min_len = int(min_window_epochs)
    ladder = window_ladder(int(counts.max()), min_len)
    if len(ladder):
        sigma_med = _segment_median(np.where(sigma_ok, sigma, np.inf), codes)
        s_excess2 = np.maximum(0.0, robust_std * robust_std - sigma_med * sigma_med)
        with np.errstate(invalid="ignore"):
            sigma_tot = np.sqrt(sigma * sigma + s_excess2[codes])
            z = (f - median[codes]) / sigma_tot
        # Sources with a bad error or zero total noise: z set to 0 so the global cumulative sum
        # stays finite for the others; their dip columns are masked to NaN below.
        z_bad = ~np.isfinite(z)
        z[z_bad] = 0.0
        if dip_z_clip is not None:
            np.clip(z, -dip_z_clip, dip_z_clip, out=z)
        dip_ok = src_ok & (np.add.reduceat(z_bad.astype(np.int64), starts) == 0)

        # One global cumulative sum; a window never crosses a segment boundary, so
        # C[j+L] - C[j] is the sum of z over the window. Precision: absolute error ~ eps * |C|,
        # negligible against window sums of order 1 (|z| <= dip_z_clip; even unclipped, z ~ 1e8
        # would only cost ~1e-6 absolute).
        cz = np.concatenate(([0.0], np.cumsum(z)))
        pos = np.arange(n_rows, dtype=np.int64)
        seg_end = (starts + counts)[codes]
        best_abs = np.full(n_src, -1.0)
        best_pos = np.zeros(n_src, dtype=np.int64)
        for length in ladder:  # O(log N) passes over all rows; no loop over sources
            stop = pos + length
            valid = stop <= seg_end
            s = (cz[np.minimum(stop, n_rows)] - cz[pos]) / np.sqrt(length)
            abs_s = np.where(valid, np.abs(s), -1.0)
            seg_max = np.maximum.reduceat(abs_s, starts)
            better = seg_max > best_abs
            if not better.any():
                continue
            # Segment argmax: first position attaining the segment maximum.
            first = np.minimum.reduceat(np.where(abs_s == seg_max[codes], pos, n_rows), starts)
            best_abs = np.where(better, seg_max, best_abs)
            best_pos = np.where(better, first, best_pos)
            dip_len = np.where(better, length, dip_len)

        found = (dip_len > 0) & dip_ok
        p0 = best_pos[found]
        p1 = p0 + dip_len[found]
        dip_sig[found] = (cz[p1] - cz[p0]) / np.sqrt(dip_len[found])
        dip_start[found] = t_first[p0]
        dip_end[found] = t_last[p1 - 1]
        # Depth from sums of (f - median), again shifted for precision.
        cf = np.concatenate(([0.0], np.cumsum(f - median[codes])))
        with np.errstate(divide="ignore", invalid="ignore"):
            med_f = median[found]
            depth = (cf[p1] - cf[p0]) / dip_len[found] / med_f
        dip_depth[found] = np.where(med_f > 0, depth, np.nan)
        dip_len = np.where(found, dip_len, 0)
        if binned:  # epochs in the window, not rows
            cn = np.concatenate(([0.0], np.cumsum(n_epochs)))
            dip_len[found] = np.rint(cn[p1] - cn[p0]).astype(np.int64)

    two_vs, two_m = two_epoch_extremes(f, sigma, starts, counts)

    weighted_nan = ~src_ok
    for arr in (wmean, chi2_nu, eta):
        arr[weighted_nan] = np.nan

    out = pd.DataFrame(
        {
            "source_id": pd.Series(uniques),
            "n_obs": counts.astype(np.int64),
            "mean_flux_mjy": mean,
            "std_flux_mjy": std,
            "min_flux_mjy": fmin,
            "max_flux_mjy": fmax,
            "weighted_mean_flux_mjy": wmean,
            "chi2_nu": chi2_nu,
            "eta_metric": eta,
            "v_index": v_index,
            "sigma_deviation": sigma_dev,
            "first_mjd": t_first[starts],
            "last_mjd": t_last[starts + counts - 1],
            "median_flux_mjy": median,
            "robust_std_mjy": robust_std,
            "dip_significance": dip_sig,
            "dip_start_mjd": dip_start,
            "dip_end_mjd": dip_end,
            "dip_n_epochs": pd.arrays.IntegerArray(dip_len, dip_len == 0),
            "dip_depth_frac": dip_depth,
            "two_epoch_vs": two_vs,
            "two_epoch_m": two_m,
        }
    )
    return out
