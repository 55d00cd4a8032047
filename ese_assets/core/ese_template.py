"""ESE template detection on nightly-binned lightcurves, with false-alarm rates by simulation.

Why: an Extreme Scattering Event (Fiedler et al. 1987, Nature 326, 675; Fiedler et al. 1994, ApJ
430, 581) is a weeks-to-months dip, often bracketed by brief enhancements (caustics), that a
plasma lens drifting across the line of sight makes in an otherwise steady source. Metrics of the
most extreme epoch (the seed's ``sigma_deviation``) fire on one bad image; metrics of scatter
(eta, V, chi2) fire on every ordinary variable. This module asks the question that is about
ESEs: is the lightcurve better explained by a lens event on a steady source than by (a) a
constant source and (b) an ordinary stochastic variable?

Input: nightly bins (one inverse-variance weighted mean per source and night,
:func:`ese_assets.core.binning.bin_measurements`) arranged as a source x night matrix
(:func:`lightcurve_matrix`; missing nights have weight 0).

**Noise.** Each source's quoted bin errors e_j are scaled by
``r = max(NOISE_SCALE_MIN, 1.4826 median |z|)`` with ``z = (f_{j-1} - 2 f_j + f_{j+1}) /
sqrt(e_{j-1}^2 + 4 e_j^2 + e_{j+1}^2)`` over consecutive nights (the robust scatter of second
differences: a slow event, slow variability or the steep wall of a deep dip barely change it,
night-to-night noise the errors miss raises it, and errors that hold a flux-scale floor the
calibration has already removed shrink to the scatter the data show). ``sigma_j = r e_j``,
``w_j = 1 / sigma_j^2``. The null simulations of the calibration draw their noise with the same
r and re-estimate it, so its own scatter is in the thresholds.

**Template.** The 1-D Gaussian plasma lens (Clegg, Fey & Lazio 1998, ApJ 496, 253;
:mod:`ese_assets.core.lens`): gain ``G(u')`` with ``u' = (t - t0) / (D / 4)`` (an event of
duration D spans |u'| < 2). For a lens class k (on-axis point-source depth ``d_k``, source size
0.05 lens widths) the unit-depth shape is ``h_k(u') = (G_k(u') - 1) / (1 - G_k(0))``
(``h_k(0) = -1``; flux-conserving side enhancements, caustic peaks for ``d_k > 0.69``,
alpha > 1.4966). A plain Gaussian dip ``h(u') = -exp(-u'^2)`` (no enhancements) is scanned too, to
tell lens-shaped events from other dips. The model of source i is linear in two numbers,

    f_j = F0 + A h_k((t_j - t0) / (D / 4)),        depth = A / F0

(``event_depth_frac`` is A max_j(-h_j) / F0 over the sampled nights: A / F0 when a night is near
the centre, less when sparse nights miss it), so for each template (k, D, t0) the best (F0, A)
and the chi^2 improvement over the constant source are closed-form weighted least squares (a
matched filter):

    Sw = sum w + w_c, Swf = sum w f + w_c c, Swh = sum w h, Swhh = sum w h^2, Swfh = sum w f h,
    A = (Swfh - Swf Swh / Sw) / (Swhh - Swh^2 / Sw),
    F0 = (Swf - A Swh) / Sw,
    dchi2 = (Swfh - Swf Swh / Sw)^2 / (Swhh - Swh^2 / Sw).

``c`` is the catalog flux (when given) with weight ``w_c = 1 / (catalog_frac_err c)^2``: a prior
on the baseline F0 (a pseudo-epoch outside the event), as in the constant model. The baseline F0
is thus set by the catalog and by the epochs outside the fitted event (h ~ 0 there), never by a
global median, so it holds when the event covers most of the data. The sums over nights for all
sources and one block of templates are three matrix products (W @ H.T, (W f) @ H.T,
W @ (H^2).T), so the whole bank runs in BLAS. Bank: durations 7-365 d on a sqrt(2) ladder,
centres every D/6, over the data span +- D/4.

**One night never makes a candidate.** For every source whose best dchi2 reaches a pre-threshold
(:data:`PRE_THRESHOLD`), the night contributing most to the improvement,
``delta_j = w_j [(f_j - Fc)^2 - (f_j - F0 - A h_j)^2]``, is given weight 0 and the bank is
scanned again: ``dchi2_const`` is the significance *without its most influential night*. A
single outlying night therefore contributes nothing; a source that passes only with it is
named ``outlier`` and not flagged.

**Stochastic-variable null.** A damped random walk (Ornstein-Uhlenbeck process; Kelly, Bechtold
& Siemiginowski 2009, ApJ 698, 895) of rms s and timescale tau about an unknown mean mu, plus the
white noise sigma_j: its exact Gaussian likelihood is computed by a Kalman filter over the nights
(O(N) per source, vectorized over sources and a grid of (s / F, tau): :data:`DRW_FRAC_RMS`,
:data:`DRW_TAU_DAYS`), with mu profiled out by filtering the data and the constant regressor
together (innovations e_y, e_1, variances S_j):
``chi2(mu) = sum (e_y - mu e_1)^2 / S``, ``-2 ln L = min_mu chi2 + sum ln S_j``. With
``dchi2_drw = 2 (ln L_drw - ln L_const)`` maximised over the grid, and the same for the DRW
about the mean plus the fitted template (``dchi2_drw_template``; the template as a third
regressor), the ESE statistic against the better of the two nulls is

    ese_stat = max(dchi2_const, dchi2_drw_template) - max(0, dchi2_drw)

(2 ln of the likelihood ratio of template + (white or DRW) noise against the better of constant
and DRW). The DRW under the template counts only when ``dchi2_const >= STEADY_FRACTION x
dchi2_drw_template`` (0.9): it keeps a real event whose shape departs a little from the Gaussian
lens at high S/N from being handed to the stochastic null, but an ESE happens to a steady
source, so a variable whose excursion one template improves on top of its DRW stays `variable`.

**Coarse to fine.** The bank above is the coarse grid (a weak lens, a caustic lens of wide
source, the Gaussian dip; first pass in float32). For the sources that reach the pre-threshold
the best template of each bank shape is refined locally (:func:`_refine`: ten lens strengths,
smooth then sharp caustics, a caustic lens tried at the duration that keeps its spikes in place
when its strength changes, the Gaussian dip's centre as a further start; duration steps down to
2^(1/128) and centre steps to D/400), so depth, centre and duration are estimated well beyond
the bank's resolution and the fit's residuals do not masquerade as variability. At high S/N the
fit surface is rough (a deep lens's caustic spikes are a few nights wide) and the bank's seeds
are coarse (the Gaussian dip finds the centre at ~2.5 times a deep event's duration, the
wide-source caustic lens can sit durations away), so a refinement can end in a wrong optimum
that the DRW null then beats. A *poor* refined fit, residual ``chi2_const - dchi2`` above the
number of fitted values n by more than :data:`RESTART_EXCESS_SIGMA` sqrt(2 n) while the
template explains at least :data:`RESTART_MIN_EXPLAINED` of ``chi2_const - n``, is therefore
restarted (:func:`_restart_poor_fits`) from every lens shape at the bank's duration-ladder steps
around the refined Gaussian dip and the caustic seed, and keeps the better fit. Nights the
refined template misses by more than :data:`CLIP_PULL` sigma (at most :data:`MAX_CLIPPED`:
unresolved caustic spikes, bad nights) leave every model of the source and the fit is refined
(and, if poor, restarted) again.

**Classes** (thresholds x_c, x_e from the calibration below):

* ``ese``: ``ese_stat >= x_e``, a dip (A > 0) and the lens shape at least as good as the plain
  Gaussian dip (within ``DIP_SHAPE_MARGIN`` in chi^2); ``dip``: the same but the plain dip fits
  better by more than that; ``spike``: ``ese_stat >= x_e`` with A < 0 (a brightening);
* ``variable``: ``dchi2_const >= x_c`` but ``ese_stat < x_e`` (the stochastic model explains it);
* ``outlier``: the first scan reaches x_c but not without its most influential night (not
  flagged); empty: nothing significant.

``flag`` is True for ese, dip, spike and variable.

**False-alarm calibration.** Thresholds depend on the cadence (the number of effectively
independent templates grows with the span and the number of nights), so they are calibrated on
the survey itself (:func:`calibrate_false_alarms`): null lightcurves are simulated on the epochs
(weights pattern) and errors (times each source's noise scale r) of randomly chosen sources of the
input, at their own baseline flux, and run through the same detector. The constant null gives the
distribution of ``dchi2_const``; the population null adds, for the fraction of the population
that prefers a DRW (``dchi2_drw >= DRW_VARIABLE_DCHI2``), DRW variability with the (s, tau) of
randomly chosen such sources, and gives the distribution of ``ese_stat``. The false-alarm
probability of a value x is the simulated exceedance fraction where at least
:data:`TAIL_ANCHOR_COUNT` simulations exceed it, and beyond that anchor (x_a, p_a) the
exponential tail of a chi^2 with two degrees of freedom, ``p_a exp(-(x - x_a) / 2)`` (the
asymptotic tail of the maximum of a smooth chi^2 field over many correlated templates decays at
least this fast for one free amplitude). The thresholds are the values of false-alarm probability
``fap_per_source`` (default 1e-5 per source and run) and at least :data:`MIN_THRESHOLD`; each run
reports the expected number of false candidates ``n_sources x (FAP(x_c) + FAP(x_e))``.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ese_assets.core.lens import ALPHA2_CAUSTIC, gaussian_lens_gain

#: Event durations scanned (days): 7 to 365 on a sqrt(2) ladder (ESEs last weeks to months,
#: Fiedler et al. 1994).
DURATIONS_DAYS = (*tuple(float(7.0 * 2 ** (k / 2)) for k in range(12)), 365.0)
#: Source size (lens widths) of the lens templates: caps the caustic spikes.
LENS_SOURCE_SIZE = 0.05
#: Source size of the smooth variants of deep lenses (``lens<depth>s``): caustic spikes that the
#: nights sample unevenly make a rough fit surface; the smooth variant finds the event and stays
#: a candidate model when the spikes are not resolved.
SMOOTH_SOURCE_SIZE = 0.15
#: Source size of the bank's caustic lens (``lens<depth>w``): on the bank's coarse grid of
#: centres (D/6) even smoothed spikes would be misplaced; a wide source keeps the dip and broad
#: shoulders, which find the event, and the refinement sharpens from there.
WIDE_SOURCE_SIZE = 0.5
#: Shapes of the bank: a weak lens, a deep lens with caustics (alpha^2 = 4 > 2.24; wide source),
#: and the plain Gaussian dip.
SHAPES = ("lens0.15", "lens0.8w", "gauss")
#: Depths of the refinement's lenses with caustics (the caustics' place in time depends on both
#: depth and duration, so the depth steps are fine).
CAUSTIC_DEPTHS = (0.72, 0.76, 0.8, 0.85, 0.9)
#: Shapes of the local refinement's first pass (finer lens strengths: the shape changes with
#: depth). Lenses with caustics enter it only smooth (a smooth fit surface); their sharp twins
#: (:data:`TWIN_SHAPES`) are tried from the second pass on, next to the smooth best.
REFINE_SHAPES = (
    *tuple(f"lens{d:g}" for d in (0.05, 0.15, 0.3, 0.45, 0.6)),
    *tuple(f"lens{d:g}s" for d in CAUSTIC_DEPTHS),
    "gauss",
)
#: Sharp (source size 0.05) twins of the smooth caustic lenses.
TWIN_SHAPES = tuple(f"lens{d:g}" for d in CAUSTIC_DEPTHS)
#: Coarse-to-fine passes of the local refinement; the sharp twins join from SHARPEN_FROM_PASS.
REFINE_PASSES = 6
SHARPEN_FROM_PASS = 2
#: Duration of a caustic lens whose dip matches a Gaussian dip of duration 1 (seed of the
#: caustic group from the Gaussian's best fit).
CAUSTIC_FROM_GAUSS = 0.45
#: Passes of the shapes without caustics (a smooth fit surface converges sooner).
SMOOTH_REFINE_PASSES = 4
#: Centre step of the bank as a fraction of the duration.
CENTRE_STEP_FRAC = 1.0 / 6.0
#: chi^2 by which the plain Gaussian dip must beat the lens for a dip to be called ``dip``.
DIP_SHAPE_MARGIN = 9.0
#: Best first-scan dchi2 from which the most influential night is removed and the bank rescanned,
#: and the DRW null evaluated (below it no threshold can be reached: MIN_THRESHOLD > it).
PRE_THRESHOLD = 12.0
#: Nights the refined template misses by more than this many sigma are left out of every model
#: of the source (unresolved caustic spikes, bad nights), at most MAX_CLIPPED of them.
CLIP_PULL = 15.0
MAX_CLIPPED = 3
#: Thresholds are never below this dchi2 (a margin for non-Gaussian tails the simulation lacks).
MIN_THRESHOLD = 30.0
#: Default false-alarm probability per source and run of each threshold.
DEFAULT_FAP_PER_SOURCE = 1e-5
#: Default number of null simulations of the calibration.
DEFAULT_N_SIMULATIONS = 20_000
#: Exceedances needed for the empirical FAP; beyond, the exponential tail from there, its decay
#: measured between TAIL_SLOPE_COUNT and TAIL_ANCHOR_COUNT exceedances.
TAIL_ANCHOR_COUNT = 20
TAIL_SLOPE_COUNT = 200
#: Grid of the DRW null: rms as a fraction of the baseline flux, and timescale (days).
DRW_FRAC_RMS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
DRW_TAU_DAYS = (10.0, 30.0, 100.0, 300.0, 1000.0)
#: dchi2_drw above which a source counts as a population variable (its DRW enters the null).
DRW_VARIABLE_DCHI2 = 25.0
#: Default fractional uncertainty of a catalog flux used as the baseline prior (different
#: survey, frequency and epoch: loose).
DEFAULT_CATALOG_FRAC_ERR = 0.1
#: Smallest noise scale: errors are never shrunk below 0.3 of the quoted ones (a few nights'
#: median can be small by chance).
NOISE_SCALE_MIN = 0.3
#: The template on white noise must reach this fraction of the improvement of template + DRW
#: for the DRW under the template to count (an ESE happens to a steady source).
STEADY_FRACTION = 0.9
#: A refined fit whose residual chi^2 exceeds the number of fitted values n by more than this
#: many sqrt(2 n) is restarted from more seeds (:func:`_restart_poor_fits`).
RESTART_EXCESS_SIGMA = 5.0
#: ... and the template explains at least this fraction of the variance beyond the noise,
#: dchi2 / (chi2_const - n) (a dip fitted in a wrong local optimum still explains most of it; a
#: stochastic variable that one template explains less than half of is left as it is).
RESTART_MIN_EXPLAINED = 0.5
#: Durations of the restart's seeds, as multiples of their anchors' (the refined Gaussian dip's,
#: the bank's caustic seed's): the bank's ladder steps (sqrt(2)) around them, mostly shorter
#: (both anchors favour long durations: the Gaussian spans the enhancements too).
RESTART_DURATION_FACTORS = (0.5, 2**-0.5, 1.0, 2**0.5)
#: Nights a source needs before it is scored.
MIN_NIGHTS = 5
#: |h| above which a night counts as inside the fitted event (``n_event_nights``).
EVENT_CORE_H = 0.5
#: flag_type names.
FLAG_ESE, FLAG_DIP, FLAG_SPIKE, FLAG_VARIABLE, FLAG_OUTLIER = (
    "ese",
    "dip",
    "spike",
    "variable",
    "outlier",
)
FLAGGED_TYPES = (FLAG_ESE, FLAG_DIP, FLAG_SPIKE, FLAG_VARIABLE)
#: Columns of :func:`score_lightcurves`, in order.
SCORE_COLUMNS = (
    "source_id",
    "n_nights",
    "noise_scale",
    "baseline_flux_mjy",
    "dchi2_first",
    "dchi2_const",
    "dchi2_drw",
    "dchi2_drw_template",
    "ese_stat",
    "event_t0_mjd",
    "event_duration_days",
    "event_depth_frac",
    "event_amplitude_mjy",
    "event_shape",
    "event_caustic",
    "n_event_nights",
    "dropped_night_mjd",
    "n_clipped_nights",
    "lens_minus_gauss",
)

_REFINE_CHUNK = 16  # sources per refinement array (16 x 9 x 25 x nights floats)
_BLOCK = 256  # templates per matrix product (memory: n_sources x _BLOCK floats per array)
_U_MAX = 6.0  # templates are zero beyond |u'| = 6 (G - 1 < 1e-13 there for these lenses)
_U_STEP = 0.01
_LOOKUP_STEP = 0.0025  # grid of the template lookup (linear interpolation of the 0.01 table)


@functools.cache
def _shape_table(shape: str) -> tuple[np.ndarray, np.ndarray]:
    """(u grid, unit-depth shape h on it) for one shape name (module docstring)."""
    u = np.arange(-_U_MAX, _U_MAX + _U_STEP / 2, _U_STEP)
    if shape == "gauss":
        return u, -np.exp(-u * u)
    depth, size = _lens_parameters(shape)
    alpha = math.sqrt(depth / (1.0 - depth))
    g = gaussian_lens_gain(u, alpha, size)
    g0 = float(gaussian_lens_gain(np.array([0.0]), alpha, size)[0])
    return u, (g - 1.0) / (1.0 - g0)


def _lens_parameters(shape: str) -> tuple[float, float]:
    """(point-source depth, source size) of a lens shape name: ``lens<depth>`` has the source
    size :data:`LENS_SOURCE_SIZE`, ``lens<depth>s`` the smoother :data:`SMOOTH_SOURCE_SIZE`,
    ``lens<depth>w`` the bank's :data:`WIDE_SOURCE_SIZE`."""
    body = shape.removeprefix("lens")
    if body.endswith("w"):
        return float(body[:-1]), WIDE_SOURCE_SIZE
    if body.endswith("s"):
        return float(body[:-1]), SMOOTH_SOURCE_SIZE
    return float(body), LENS_SOURCE_SIZE


#: Every shape the module evaluates, in the row order of :func:`_shape_matrix`.
ALL_SHAPES = tuple(dict.fromkeys((*SHAPES, *REFINE_SHAPES, *TWIN_SHAPES)))


@functools.cache
def _shape_matrix() -> np.ndarray:
    """Rows: :data:`ALL_SHAPES` on a grid :data:`_LOOKUP_REFINE` times finer than
    :func:`_shape_table`'s (linear interpolation, once), 0 at the ends, float32."""
    u = np.arange(-_U_MAX, _U_MAX + _U_STEP / 2, _U_STEP)
    fine = np.arange(-_U_MAX, _U_MAX + _LOOKUP_STEP / 2, _LOOKUP_STEP)
    table = np.stack([np.interp(fine, u, _shape_table(name)[1]) for name in ALL_SHAPES])
    table[:, 0] = table[:, -1] = 0.0
    return table.astype(np.float32)


def _lookup(shape_rows, u_prime) -> np.ndarray:
    """Tabulated shapes, row ``shape_rows`` (broadcast with u') at ``u_prime``, nearest node of
    a 0.0025-step grid (one gather instead of np.interp's binary search; the error, <= 0.00125
    in u', is far below the spikes' width 0.05); 0 beyond |u'| = 6. float32."""
    table = _shape_matrix()
    n = table.shape[1]
    k = (np.asarray(u_prime, dtype=np.float32) + np.float32(_U_MAX)) * np.float32(
        1.0 / _LOOKUP_STEP
    ) + np.float32(0.5)
    np.clip(k, 0, n - 1, out=k)
    flat = np.asarray(shape_rows, dtype=np.int64) * n + k.astype(np.int64)
    return table.ravel()[flat]


@functools.cache
def _spike_positions() -> np.ndarray:
    """Per row of :data:`ALL_SHAPES`: |u'| of the highest point of a caustic lens's template
    (where its spikes are), 1 for the other shapes."""
    table = _shape_matrix()
    u = np.arange(table.shape[1]) * _LOOKUP_STEP - _U_MAX
    out = np.ones(len(ALL_SHAPES))
    for i, name in enumerate(ALL_SHAPES):
        if shape_has_caustics(name):
            out[i] = abs(u[np.argmax(table[i])])
    return out


@functools.cache
def _neighbour_rows() -> np.ndarray:
    """(shapes x 4) rows of :data:`ALL_SHAPES` tried next to each shape in the refinement's later
    passes: itself, the next shallower and deeper lens of the same spike width, and its twin of
    the other spike width (``lens<d>s`` <-> ``lens<d>``); the shape itself where none exists."""
    names = list(ALL_SHAPES)
    out = np.tile(np.arange(len(names))[:, None], (1, 4))
    lens = [n for n in names if n.startswith("lens")]
    for i, name in enumerate(names):
        if not name.startswith("lens"):
            continue
        size = _lens_parameters(name)[1]
        family = sorted(
            (n for n in lens if _lens_parameters(n)[1] == size),
            key=lambda n: _lens_parameters(n)[0],
        )
        k = family.index(name)
        if k > 0:
            out[i, 1] = names.index(family[k - 1])
        if k + 1 < len(family):
            out[i, 2] = names.index(family[k + 1])
        twin = name.removesuffix("s") if name.endswith("s") else name + "s"
        if twin in names:
            out[i, 3] = names.index(twin)
    return out


def template_shape(shape: str, u_prime) -> np.ndarray:
    """Unit-depth template ``h(u')`` (``h(0) = -1``) of a shape name, 0 beyond |u'| = 6."""
    return _lookup(ALL_SHAPES.index(shape), u_prime).astype(np.float64)


def shape_has_caustics(shape: str) -> bool:
    """Whether a lens shape's alpha^2 = d / (1 - d) exceeds e^{3/2}/2 (caustic peaks)."""
    if not shape.startswith("lens"):
        return False
    d, _ = _lens_parameters(shape)
    return d / (1.0 - d) > ALPHA2_CAUSTIC


# --------------------------------------------------------------------------------------------
# Lightcurve matrix
# --------------------------------------------------------------------------------------------


@dataclass
class LightcurveMatrix:
    """Nightly bins as arrays: ``flux``/``err`` are (sources x nights), NaN where a source has no
    bin; ``t_mjd`` the nights' times (median bin time of the column); ``catalog_flux_mjy`` per
    source (NaN: none)."""

    source_ids: np.ndarray
    t_mjd: np.ndarray
    flux: np.ndarray
    err: np.ndarray
    catalog_flux_mjy: np.ndarray

    @property
    def present(self) -> np.ndarray:
        return np.isfinite(self.flux) & np.isfinite(self.err) & (self.err > 0)


def lightcurve_matrix(
    bins: pd.DataFrame, catalog_flux_mjy: pd.Series | dict | None = None
) -> LightcurveMatrix:
    """Arrange nightly bins (``source_id, mjd, flux_mjy, flux_err_mjy[, night]``) as a matrix.

    Columns are the distinct nights (``night`` labels when given, else ``floor(mjd)``), sorted by
    time. ``catalog_flux_mjy``: a mapping source_id -> catalog flux (mJy), optional.
    """
    table = bins[["source_id", "mjd", "flux_mjy", "flux_err_mjy"]].copy()
    if "night" in bins.columns and bins["night"].notna().all():
        key = bins["night"].astype(str).to_numpy()
    else:
        key = np.floor(table["mjd"].to_numpy(dtype=float)).astype(np.int64).astype(str)
    table["key"] = key
    col_t = table.groupby("key")["mjd"].median().sort_values()
    col_index = pd.Series(np.arange(len(col_t)), index=col_t.index)
    src, src_codes = np.unique(table["source_id"].to_numpy(dtype=object), return_inverse=True)
    cols = col_index.loc[table["key"]].to_numpy()
    flux = np.full((len(src), len(col_t)), np.nan)
    err = np.full((len(src), len(col_t)), np.nan)
    flux[src_codes, cols] = table["flux_mjy"].to_numpy(dtype=float)
    err[src_codes, cols] = table["flux_err_mjy"].to_numpy(dtype=float)
    cat = np.full(len(src), np.nan)
    if catalog_flux_mjy is not None:
        mapping = pd.Series(catalog_flux_mjy, dtype=float)
        cat = mapping.reindex(src).to_numpy(dtype=float)
    return LightcurveMatrix(src, col_t.to_numpy(dtype=float), flux, err, cat)


# --------------------------------------------------------------------------------------------
# Scan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateBank:
    """Templates (shape, duration, centre) for a set of night times; ``h`` rows are built per
    block on demand."""

    shape_index: np.ndarray
    duration_days: np.ndarray
    t0_mjd: np.ndarray

    @classmethod
    def for_times(cls, t_mjd: np.ndarray) -> TemplateBank:
        t_lo, t_hi = float(np.min(t_mjd)), float(np.max(t_mjd))
        span = max(t_hi - t_lo, 1.0)
        shapes, durations, centres = [], [], []
        for k in range(len(SHAPES)):  # shape-major: every block holds one shape
            for d in DURATIONS_DAYS:
                if d > 2.0 * span + 7.0:
                    continue  # an event twice the span is a trend, not a dip in this data
                step = max(d * CENTRE_STEP_FRAC, 0.5)
                t0 = np.arange(t_lo - d / 4.0, t_hi + d / 4.0 + step / 2, step)
                shapes.append(np.full(t0.size, k))
                durations.append(np.full(t0.size, d))
                centres.append(t0)
        return cls(np.concatenate(shapes), np.concatenate(durations), np.concatenate(centres))

    def __len__(self) -> int:
        return int(self.t0_mjd.size)

    def blocks(self):
        """(start, stop) of consecutive runs of at most ``_BLOCK`` templates of one shape."""
        edges = np.flatnonzero(np.diff(self.shape_index)) + 1
        bounds = np.r_[0, edges, len(self)]
        for lo, hi in itertools.pairwise(bounds):
            for start in range(int(lo), int(hi), _BLOCK):
                yield start, min(start + _BLOCK, int(hi))

    def rows(self, t_mjd: np.ndarray, sel) -> np.ndarray:
        """Template values h (len(sel) x nights) of templates ``sel`` at times ``t_mjd``."""
        sel = np.atleast_1d(np.arange(len(self))[sel])
        u = (t_mjd[None, :] - self.t0_mjd[sel, None]) / (self.duration_days[sel, None] / 4.0)
        out = np.empty_like(u)
        kinds = self.shape_index[sel]
        for k in np.unique(kinds):
            rows = kinds == k
            out[rows] = template_shape(SHAPES[k], u[rows])
        return out


def _scan(
    fc: np.ndarray,
    w: np.ndarray,
    w_c: np.ndarray,
    c_c: np.ndarray,
    bank: TemplateBank,
    t_mjd: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best dchi2 per source over the bank, its template index, and the index of the best
    template of each bank shape (sources x len(SHAPES), the refinement's seeds).

    ``fc``: centred fluxes (0 where missing), ``w``: weights (0 where missing), ``w_c``/``c_c``:
    the catalog prior's weight and centred value per source. Works in float32 on fluxes in units
    of each source's smallest error (dchi2 is unit-free; ~1e-5 relative precision is plenty to
    rank templates, and the refinement recomputes the best ones in float64).
    """
    n = fc.shape[0]
    dtype = np.float32
    wmax = w.max(axis=1) if w.shape[1] else np.zeros(n)
    unit = np.where(wmax > 0, 1.0 / np.sqrt(np.where(wmax > 0, wmax, 1.0)), 1.0)
    # In units u of the error: f' = f / u, w' = w u^2 (dchi2 unchanged).
    fs = (fc / unit[:, None]).astype(dtype)
    ws = (w * unit[:, None] ** 2).astype(dtype)
    wcs = w_c * unit**2
    ccs = c_c / unit
    sw = ws.sum(axis=1, dtype=np.float64) + wcs
    swf = (ws * fs).sum(axis=1, dtype=np.float64) + wcs * ccs
    wf = ws * fs
    best = np.zeros(n)
    index = np.zeros(n, dtype=np.int64)
    shape_best = np.full((n, len(SHAPES)), -1.0)
    shape_index = np.zeros((n, len(SHAPES)), dtype=np.int64)
    rows = np.arange(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(sw > 0, swf / sw, 0.0)[:, None].astype(dtype)
        inv_sw = np.where(sw > 0, 1.0 / sw, 0.0)[:, None].astype(dtype)
        for start, stop in bank.blocks():
            h = bank.rows(t_mjd, slice(start, stop)).astype(dtype)
            swh = ws @ h.T
            swfh = wf @ h.T
            swhh = ws @ (h * h).T
            num = swfh - ratio * swh
            den = swhh - swh * swh * inv_sw
            # A template no night sees has den = 0 = num; rounding can leave den ~ -eps.
            np.maximum(den, 1e-6 * swhh + np.finfo(dtype).tiny, out=den)
            dchi = num * num / den
            j = np.argmax(dchi, axis=1)
            top = dchi[rows, j].astype(np.float64)
            better = top > best
            best[better] = top[better]
            index[better] = j[better] + start
            k = bank.shape_index[start]
            better = top > shape_best[:, k]
            shape_best[better, k] = top[better]
            shape_index[better, k] = j[better] + start
    return best, index, shape_index


def _template_rows(shape_names, duration_days, t0_mjd, t_mjd) -> np.ndarray:
    """h (sources x nights) of one template per source (shape name, duration, centre)."""
    u = (t_mjd[None, :] - np.asarray(t0_mjd, float)[:, None]) / (
        np.asarray(duration_days, float)[:, None] / 4.0
    )
    out = np.empty_like(u)
    names = np.asarray(shape_names, dtype=object)
    for name in set(names.tolist()):
        rows = names == name
        out[rows] = template_shape(name, u[rows])
    return out


def fitted_model_flux(fit: Mapping[str, Any], t_mjd) -> np.ndarray:
    """The best-fit model of one source (a row of :func:`score_lightcurves`) at ``t_mjd``, in mJy.

    ``F(t) = baseline_flux_mjy + event_amplitude_mjy * h((t - event_t0_mjd) /
    (event_duration_days / 4))``, ``h`` the unit-depth template of ``event_shape``
    (:func:`template_shape`): the same template rows the fit used. All NaN when the source was not
    scored (fewer than :data:`MIN_NIGHTS` nights).
    """
    t = np.atleast_1d(np.asarray(t_mjd, dtype=np.float64))
    shape = fit.get("event_shape")
    params = [
        float(fit.get(k, np.nan))
        for k in ("baseline_flux_mjy", "event_amplitude_mjy", "event_t0_mjd", "event_duration_days")
    ]
    if not isinstance(shape, str) or not np.all(np.isfinite(params)):
        return np.full(t.shape, np.nan)
    base, amplitude, t0, duration = params
    h = _template_rows([shape], [duration], [t0], t)[0]
    return base + amplitude * h


def _fit_one_template(fc, w, w_c, c_c, h):
    """(F0, A, Fc) per source for one template row each (``h``: sources x nights), centred."""
    sw = w.sum(axis=1) + w_c
    swf = (w * fc).sum(axis=1) + w_c * c_c
    swh = (w * h).sum(axis=1)
    swhh = (w * h * h).sum(axis=1)
    swfh = (w * fc * h).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        den = swhh - swh * swh / sw
        a = np.where(den > 0, (swfh - swf * swh / sw) / den, 0.0)
        f0 = (swf - a * swh) / sw
        fconst = swf / sw
    return f0, a, fconst


def noise_scale(matrix_flux: np.ndarray, matrix_err: np.ndarray) -> np.ndarray:
    """r = max(NOISE_SCALE_MIN, 1.4826 median |z|) per source, z the pulls of second differences
    of consecutive nights, ``(f_{j-1} - 2 f_j + f_{j+1}) / sqrt(e_{j-1}^2 + 4 e_j^2 +
    e_{j+1}^2)`` (unit variance for white noise; a linear trend, such as the wall of a deep dip,
    cancels); 1 where a source has fewer than three nights."""
    n = matrix_flux.shape[0]
    present = np.isfinite(matrix_flux) & np.isfinite(matrix_err) & (matrix_err > 0)
    # Compress each row's present nights to the left, keeping time order.
    order = np.argsort(~present, axis=1, kind="stable")
    f = np.take_along_axis(matrix_flux, order, axis=1)
    e = np.take_along_axis(matrix_err, order, axis=1)
    count = present.sum(axis=1)
    with np.errstate(invalid="ignore"):
        second = f[:, :-2] - 2.0 * f[:, 1:-1] + f[:, 2:]
        z = np.abs(second) / np.sqrt(e[:, :-2] ** 2 + 4.0 * e[:, 1:-1] ** 2 + e[:, 2:] ** 2)
    valid = np.arange(z.shape[1])[None, :] < (count - 2)[:, None]
    z = np.where(valid, z, np.nan)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: no triples
        med = np.nanmedian(z, axis=1) if z.shape[1] else np.full(n, np.nan)
    r = 1.4826 * med
    return np.where(np.isfinite(r), np.maximum(r, NOISE_SCALE_MIN), 1.0)


def _shape_group(name: str) -> int:
    """Refinement group of a shape: 0 lenses without caustics, 1 with, 2 the Gaussian dip."""
    if name == "gauss":
        return 2
    return 1 if shape_has_caustics(name) else 0


def _refine(
    fc, w, w_c, c_c, t_mjd, seeds, *, all_shapes: bool = True, sharpen_from: int = SHARPEN_FROM_PASS
):
    """Coarse-to-fine local fit around seed templates (module docstring).

    ``seeds``: list of ``(shape_names, duration_days, t0_mjd)`` arrays (one template per source
    each, e.g. the bank's best of each shape). Shapes fall in three groups (lenses without
    caustics, with caustics, the Gaussian dip: the fit surface of caustic spikes is rough, so one
    group's optimum must not hide another's). Pass 0 fits, around every seed, each shape of
    :data:`REFINE_SHAPES` in the seed's group (only the seed's shape unless ``all_shapes``) at
    duration x 2^(k/4) and centre + j D/12 (k, j = -2..2) in closed form, and keeps the best of
    each group. Later passes continue from each group's best with its shape and the neighbouring
    lens strengths, from pass ``sharpen_from`` (default :data:`SHARPEN_FROM_PASS`) on also its
    twin of the other spike width (``lens<d>`` / ``lens<d>s``), both steps halved each pass:
    :data:`REFINE_PASSES` passes for caustic lenses (the centre ends within D/400: the spikes
    are narrow),
    :data:`SMOOTH_REFINE_PASSES` for the others. Returns ``(dchi2, shape_name, duration, t0,
    lens_minus_gauss)`` of the best over the groups, the last the refined lens's dchi2 minus the
    refined Gaussian dip's.
    """
    n = fc.shape[0]
    ref_rows = np.array([ALL_SHAPES.index(s) for s in REFINE_SHAPES])
    spike_u = _spike_positions()
    group_of_row = np.array([_shape_group(s) for s in ALL_SHAPES])
    n_groups = 3
    best = np.full((n, n_groups), -np.inf)
    row = np.zeros((n, n_groups), dtype=np.int64)
    dur = np.ones((n, n_groups))
    t0 = np.zeros((n, n_groups))
    steps = np.arange(-2, 3)
    sw = w.sum(axis=1) + w_c
    swf = (w * fc).sum(axis=1) + w_c * c_c
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(sw > 0, swf / sw, 0.0)
        inv_sw = np.where(sw > 0, 1.0 / sw, 0.0)

    def one_pass(p, rows_of, dur_c, t0_c, subset, from_rows):
        """Fit the (shape, duration, centre) grid of pass ``p`` around (dur_c, t0_c) for the
        sources ``subset``; keep each group's best. A caustic shape other than the current one
        (``from_rows``) is tried at the duration that keeps the spikes where the current shape
        has them (the fit surface has a ridge along depth and duration together)."""
        d_grid = dur_c[:, None] * 2.0 ** (steps[None, :] / (4.0 * 2**p))
        t_grid = t0_c[:, None] + steps[None, :] / (12.0 * 2**p) * dur_c[:, None]
        dd = np.repeat(d_grid, 5, axis=1)  # (n, 25)
        tt = np.tile(t_grid, (1, 5))
        # Sources in centre order, so that a chunk's templates cover a short span of nights:
        # only the nights within |u'| < 6 of some template of the chunk are summed over.
        order = subset[np.argsort(t0_c[subset], kind="stable")]
        for lo in range(0, order.size, _REFINE_CHUNK):
            idx = order[lo : lo + _REFINE_CHUNK]
            rows_idx = np.asarray(rows_of(idx))  # (c, S)
            spike = spike_u[from_rows[idx]][:, None] / spike_u[rows_idx]  # (c, S)
            # Durations stay within the bank's range (7-365 d): a shorter template slips between
            # sparse nights and its amplitude means nothing.
            dd_s = np.clip(
                dd[idx][:, None, :] * spike[:, :, None], DURATIONS_DAYS[0], DURATIONS_DAYS[-1]
            )  # (c, S, 25)
            reach = 1.5 * dd_s.max()  # |u'| = 6 is 1.5 durations from the centre
            a, b = np.searchsorted(t_mjd, [tt[idx].min() - reach, tt[idx].max() + reach])
            tw = t_mjd[a:b]
            u = (tw[None, None, None, :] - tt[idx][:, None, :, None]) / (dd_s[..., None] / 4.0)
            h = _lookup(rows_idx[:, :, None, None], u)  # (c, S, 25, m)
            wh = w[idx, a:b][:, None, None, :].astype(np.float32) * h
            swh = wh.sum(axis=-1, dtype=np.float64)
            swhh = (wh * h).sum(axis=-1, dtype=np.float64)
            swfh = np.einsum("csgm,cm->csg", wh, fc[idx, a:b].astype(np.float32)).astype(np.float64)
            num = swfh - ratio[idx][:, None, None] * swh
            den = swhh - swh * swh * inv_sw[idx][:, None, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                dchi = np.where(den > 1e-12 * swhh, num * num / den, 0.0)
            top_pt = np.argmax(dchi, axis=2)  # (c, S): best grid point of each shape
            top = np.take_along_axis(dchi, top_pt[:, :, None], axis=2)[:, :, 0]
            groups = group_of_row[rows_idx]
            for g in range(n_groups):
                cand = np.where(groups == g, top, -np.inf)
                k = np.argmax(cand, axis=1)
                val = cand[np.arange(k.size), k]
                better = val > best[idx, g]
                upd = idx[better]
                pt = top_pt[better, k[better]]
                best[upd, g] = val[better]
                row[upd, g] = rows_idx[better, k[better]]
                dur[upd, g] = dd_s[better, k[better], pt]
                t0[upd, g] = tt[upd, pt]

    if all_shapes:
        # The Gaussian dip finds a deep event's dip wherever the spikes fall: its centre, and its
        # duration scaled to the caustics' spacing (a lens0.8 dip between its caustics is ~0.45 of
        # the Gaussian's D), seed the caustic lenses too.
        extra = [
            (np.full(len(sh), "lens0.8s", dtype=object), CAUSTIC_FROM_GAUSS * np.asarray(d), t)
            for sh, d, t in seeds
            if len(sh) and (np.asarray(sh) == "gauss").all()
        ]
        seeds = [*seeds, *extra]
    for shape0, dur0, t00 in seeds:
        seed_row = np.array([ALL_SHAPES.index(s) for s in shape0], dtype=np.int64)
        for g in range(n_groups):
            in_group = group_of_row[seed_row] == g
            if not in_group.any():
                continue
            # Around a seed, the refinement shapes of the seed's group (or the seed's shape).
            group_rows = ref_rows[group_of_row[ref_rows] == g]
            rows = (
                np.broadcast_to(group_rows, (n, group_rows.size))
                if all_shapes
                else seed_row[:, None]
            )
            sel = np.flatnonzero(in_group)
            one_pass(
                0,
                lambda ix, rows=rows: rows[ix],
                np.asarray(dur0, float),
                np.asarray(t00, float),
                subset=sel,
                from_rows=seed_row,
            )
    neighbours = _neighbour_rows()
    caustic_smooth = np.array([ALL_SHAPES.index(f"lens{d:g}s") for d in CAUSTIC_DEPTHS])
    caustic_all = np.concatenate(
        [caustic_smooth, [ALL_SHAPES.index(f"lens{d:g}") for d in CAUSTIC_DEPTHS]]
    )
    for g in range(n_groups):
        live = np.flatnonzero(np.isfinite(best[:, g]))
        if not live.size:
            continue
        # Caustic lenses need the finest steps (narrow spikes), the others converge sooner.
        for p in range(1, REFINE_PASSES if g == 1 else SMOOTH_REFINE_PASSES):
            if g == 1:
                # Every caustic lens, smooth first (a smooth fit surface), then sharp ones too:
                # where the spikes fall depends on depth and duration together.
                pair = np.broadcast_to(
                    caustic_smooth if p < sharpen_from else caustic_all,
                    (n, caustic_all.size if p >= sharpen_from else caustic_smooth.size),
                )
            else:
                pair = neighbours[row[:, g]][:, :3]
            one_pass(
                p,
                lambda ix, pair=pair: pair[ix],
                dur[:, g].copy(),
                t0[:, g].copy(),
                subset=live,
                from_rows=row[:, g].copy(),
            )
    g_best = np.argmax(best, axis=1)
    pick = np.arange(n)
    names = np.array(ALL_SHAPES, dtype=object)[row[pick, g_best]]
    # Refined lens against refined Gaussian dip (a group never seeded counts as 0).
    fitted = np.where(np.isfinite(best), best, 0.0)
    return (
        np.maximum(best[pick, g_best], 0.0),
        names,
        dur[pick, g_best],
        t0[pick, g_best],
        np.maximum(fitted[:, 0], fitted[:, 1]) - fitted[:, 2],
    )


def _restart_poor_fits(fc, w, w_c, c_c, t_mjd, seeds, fit):
    """Refit, from more starting templates, the sources whose refined fit is poor.

    ``fit``: :func:`_refine`'s ``(dchi2, shape, duration_days, t0_mjd, lens_minus_gauss)`` of
    these sources; ``seeds``: the bank's best template of each bank shape (:data:`SHAPES`
    order), as given to :func:`_refine`.

    Why: the chi^2 surface of a lens template gets rougher as the S/N grows (a deep lens's
    caustic spikes are a few nights wide), and the bank's seeds are coarse: its wide-source
    caustic lens can sit durations away from a deep event, the plain Gaussian dip finds the
    event's centre but at ~2.5 times its duration (it spans the enhancements too). From there
    the local refinement can end in a wrong optimum (a deep 14-180-day event fitted as a long
    Gaussian dip or a lens of twice the duration) that the DRW null then beats, so that deep,
    high-S/N events were lost. A fit is *poor* when its residual ``chi2_resid = chi2_const -
    dchi2`` exceeds the number of fitted values n (nights + catalog prior) by more than
    :data:`RESTART_EXCESS_SIGMA` sqrt(2 n) (the chi^2 distribution's standard deviation) and the
    template explains at least :data:`RESTART_MIN_EXPLAINED` of ``chi2_const - n`` (a dip fitted
    in a wrong optimum still explains most of it; a stochastic variable that one template
    explains less than half of is not an event on a steady source whatever the template). Only
    those sources pay for the restart; a source the template fits to the noise keeps its fit.

    Starts: two anchors, the refined Gaussian dip (its centre is accurate, its duration D_g) and
    the bank's caustic seed; from each, every lens without caustics (:data:`REFINE_SHAPES`) at
    duration D x f and every sharp caustic lens (:data:`TWIN_SHAPES`) at D x f x (spike scale:
    :data:`CAUSTIC_FROM_GAUSS` from the Gaussian, the spike positions' ratio from the caustic
    seed), f in :data:`RESTART_DURATION_FACTORS`; one :func:`_refine` from all of them with the
    sharp caustic lenses from its first pass on (a smooth lens puts the spikes elsewhere than the
    sharp one it would lead a sharp start to). The restart replaces the fit only where its dchi2
    is higher, so it never makes a fit worse; ``lens_minus_gauss`` is updated with the refined
    Gaussian dip's dchi2 recovered from the fit, ``dchi2_gauss = dchi2 - max(0,
    lens_minus_gauss)``.
    """
    best, shape, dur, t0, lg = (np.array(x, copy=True) for x in fit)
    if not best.size:
        return best, shape, dur, t0, lg
    h = _template_rows(shape, dur, t0, t_mjd)
    _, _, fconst = _fit_one_template(fc, w, w_c, c_c, h)
    chi2_const = (w * (fc - fconst[:, None]) ** 2).sum(axis=1) + w_c * (c_c - fconst) ** 2
    n_fitted = (w > 0).sum(axis=1) + (w_c > 0)
    excess = chi2_const - best - n_fitted
    poor = np.flatnonzero(
        (excess > RESTART_EXCESS_SIGMA * np.sqrt(2.0 * n_fitted))
        & (best >= RESTART_MIN_EXPLAINED * (best + excess))
    )
    if not poor.size:
        return best, shape, dur, t0, lg
    fc_p, w_p, w_cp, c_cp = fc[poor], w[poor], w_c[poor], c_c[poor]
    gauss_seed = next(sd for sd, name in zip(seeds, SHAPES, strict=True) if name == "gauss")
    caustic_seed = next(
        sd for sd, name in zip(seeds, SHAPES, strict=True) if shape_has_caustics(name)
    )
    # The refined Gaussian dip of each source (the Gaussian group alone: a smooth surface).
    _, _, g_dur, g_t0, _ = _refine(
        fc_p,
        w_p,
        w_cp,
        c_cp,
        t_mjd,
        [tuple(np.asarray(x)[poor] for x in gauss_seed)],
        all_shapes=False,
    )
    spike = _spike_positions()
    c_shape, c_dur, c_t0 = (np.asarray(x)[poor] for x in caustic_seed)
    c_spike = spike[[ALL_SHAPES.index(name) for name in c_shape]]
    smooth = [name for name in REFINE_SHAPES if _shape_group(name) == 0]
    ref_spike = spike[ALL_SHAPES.index("lens0.8")]
    starts = []
    for factor in RESTART_DURATION_FACTORS:
        for name in (*smooth, *TWIN_SHAPES):
            caustic = shape_has_caustics(name)
            own = spike[ALL_SHAPES.index(name)]
            g_scale = CAUSTIC_FROM_GAUSS * ref_spike / own if caustic else 1.0
            c_scale = c_spike / own if caustic else np.ones(poor.size)
            names = np.full(poor.size, name, dtype=object)
            starts.append((names, np.asarray(g_dur) * factor * g_scale, np.asarray(g_t0)))
            starts.append((names, c_dur * factor * c_scale, c_t0))
    r_best, r_shape, r_dur, r_t0, _ = _refine(
        fc_p, w_p, w_cp, c_cp, t_mjd, starts, all_shapes=False, sharpen_from=1
    )
    gauss = best[poor] - np.maximum(lg[poor], 0.0)
    lg[poor] = np.maximum(lg[poor], r_best - gauss)
    better = r_best > best[poor]
    upd = poor[better]
    best[upd], shape[upd], dur[upd], t0[upd] = (
        r_best[better],
        r_shape[better],
        r_dur[better],
        r_t0[better],
    )
    return best, shape, dur, t0, lg


# --------------------------------------------------------------------------------------------
# DRW null (Kalman filter)
# --------------------------------------------------------------------------------------------


def drw_delta_chi2(
    fc: np.ndarray,
    w: np.ndarray,
    w_c: np.ndarray,
    c_c: np.ndarray,
    t_mjd: np.ndarray,
    scale_mjy: np.ndarray,
    template: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """DRW null and DRW + template alternative against the constant source, per source.

    Returns ``(dchi2_drw, rms_mjy, tau_days, dchi2_drw_template)``: ``2 (ln L - ln L_const)`` of
    the DRW about a constant mean, maximised over the (rms, tau) grid with its best rms (mJy) and
    tau (days), and of the DRW about the mean plus ``A template`` (NaN without ``template``,
    sources x nights). Exact Gaussian likelihoods by a Kalman filter run on the data and on each
    regressor (1, template) together: with innovations e and their variances S,
    ``chi2 = min over the regressors' coefficients of sum (e_y - X b)^2 / S`` (+ the catalog
    prior on the mean), ``-2 ln L = chi2 + sum ln S``. ``scale_mjy``: the baseline flux the grid's
    fractional rms refer to.
    """
    n, m = fc.shape
    frac, tau = np.meshgrid(np.asarray(DRW_FRAC_RMS), np.asarray(DRW_TAU_DAYS), indexing="ij")
    frac, tau = frac.ravel(), tau.ravel()
    s2 = (np.abs(scale_mjy)[:, None] * frac[None, :]) ** 2  # (n, G)
    with np.errstate(divide="ignore"):
        var_obs = np.where(w > 0, 1.0 / w, np.inf)
    series = [fc, np.ones_like(fc)] + ([template] if template is not None else [])
    k_ser = len(series)
    state = [np.zeros_like(s2) for _ in range(k_ser)]
    # Cross sums a[i][j] = sum e_i e_j / S over the nights.
    cross = {(i, j): np.zeros_like(s2) for i in range(k_ser) for j in range(i, k_ser)}
    p = s2.copy()
    logdet = np.zeros_like(s2)
    t_prev = None
    for j in range(m):
        if t_prev is not None:
            a = np.exp(-(t_mjd[j] - t_prev) / tau)[None, :]
            for x in state:
                x *= a
            p = a * a * p + s2 * (1.0 - a * a)
        t_prev = t_mjd[j]
        obs = w[:, j] > 0
        if not obs.any():
            continue
        v = var_obs[:, j : j + 1]
        s = p + v
        with np.errstate(invalid="ignore", divide="ignore"):
            inv_s = np.where(obs[:, None], 1.0 / s, 0.0)
            logdet += np.where(obs[:, None], np.log(s / v), 0.0)
        gain = p * inv_s
        innov = [ser[:, j : j + 1] - x for ser, x in zip(series, state, strict=True)]
        for (i1, i2), acc in cross.items():
            acc += innov[i1] * innov[i2] * inv_s
        for x, e in zip(state, innov, strict=True):
            x += gain * e
        p = p - gain * p
    wc = w_c[:, None]
    cc = c_c[:, None]
    ayy = cross[(0, 0)] + wc * cc * cc
    ay1 = cross[(0, 1)] + wc * cc
    a11 = cross[(1, 1)] + wc
    with np.errstate(invalid="ignore", divide="ignore"):
        chi2_drw = ayy - ay1 * ay1 / a11
        if template is not None:
            ayh, a1h, ahh = cross[(0, 2)], cross[(1, 2)], cross[(2, 2)]
            det = a11 * ahh - a1h * a1h
            quad = (ahh * ay1 * ay1 - 2.0 * a1h * ay1 * ayh + a11 * ayh * ayh) / det
            chi2_tmpl = np.where(det > 1e-12 * a11 * ahh, ayy - quad, chi2_drw)
    sw = w.sum(axis=1) + w_c
    swf = (w * fc).sum(axis=1) + w_c * c_c
    swff = (w * fc * fc).sum(axis=1) + w_c * c_c * c_c
    with np.errstate(invalid="ignore", divide="ignore"):
        chi2_const = (swff - swf * swf / sw)[:, None]

    def best(chi2):
        delta = chi2_const - chi2 - logdet
        return np.where(np.isfinite(delta), delta, -np.inf)

    delta = best(chi2_drw)
    g = np.argmax(delta, axis=1)
    rows = np.arange(n)
    with_template = best(chi2_tmpl).max(axis=1) if template is not None else np.full(n, np.nan)
    return delta[rows, g], np.sqrt(s2[rows, g]), tau[g], with_template


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _prepare(matrix: LightcurveMatrix, catalog_frac_err: float):
    present = matrix.present
    r = noise_scale(matrix.flux, matrix.err)
    sigma = matrix.err * r[:, None]
    w = np.where(present, 1.0 / np.where(present, sigma, 1.0) ** 2, 0.0)
    f = np.where(present, matrix.flux, 0.0)
    # Centre on a robust reference (weighted median is overkill: the median of the nights) so the
    # matched-filter sums do not cancel; the constant is in every model, so nothing changes.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: sources without nights
        ref = np.nanmedian(np.where(present, matrix.flux, np.nan), axis=1)
    ref = np.where(np.isfinite(ref), ref, 0.0)
    fc = np.where(present, f - ref[:, None], 0.0)
    cat = matrix.catalog_flux_mjy
    has_cat = np.isfinite(cat) & (cat > 0) & (catalog_frac_err > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        w_c = np.where(has_cat, 1.0 / (catalog_frac_err * np.where(has_cat, cat, 1.0)) ** 2, 0.0)
    c_c = np.where(has_cat, cat - ref, 0.0)
    return fc, w, w_c, c_c, ref, r


def score_lightcurves(
    matrix: LightcurveMatrix, *, catalog_frac_err: float = DEFAULT_CATALOG_FRAC_ERR
) -> pd.DataFrame:
    """Template fit of every source of ``matrix``: :data:`SCORE_COLUMNS` (module docstring).

    ``dchi2_first``: best dchi2 over the bank; ``dchi2_const``: the same without the most
    influential night (equal to dchi2_first below :data:`PRE_THRESHOLD`); ``dchi2_drw``: the DRW
    null's improvement over the constant (NaN below the pre-threshold, where it is not needed);
    ``ese_stat = dchi2_const - max(0, dchi2_drw)``; the event columns are the best template's.
    Sources with fewer than :data:`MIN_NIGHTS` nights get NaN statistics.
    """
    fc, w, w_c, c_c, ref, r = _prepare(matrix, catalog_frac_err)
    t = matrix.t_mjd
    n = fc.shape[0]
    n_nights = (w > 0).sum(axis=1)
    enough = n_nights >= MIN_NIGHTS
    w = np.where(enough[:, None], w, 0.0)
    out = {
        "source_id": matrix.source_ids,
        "n_nights": n_nights,
        "noise_scale": r,
        "baseline_flux_mjy": np.full(n, np.nan),
        "dchi2_first": np.full(n, np.nan),
        "dchi2_const": np.full(n, np.nan),
        "dchi2_drw": np.full(n, np.nan),
        "dchi2_drw_template": np.full(n, np.nan),
        "ese_stat": np.full(n, np.nan),
        "event_t0_mjd": np.full(n, np.nan),
        "event_duration_days": np.full(n, np.nan),
        "event_depth_frac": np.full(n, np.nan),
        "event_amplitude_mjy": np.full(n, np.nan),
        "event_shape": np.full(n, None, dtype=object),
        "event_caustic": np.zeros(n, dtype=bool),
        "n_event_nights": np.zeros(n, dtype=np.int64),
        "dropped_night_mjd": np.full(n, np.nan),
        "n_clipped_nights": np.zeros(n, dtype=np.int64),
        "lens_minus_gauss": np.full(n, np.nan),
    }
    if n == 0 or len(t) == 0 or not enough.any():
        return pd.DataFrame(out)
    bank = TemplateBank.for_times(t[(w > 0).any(axis=0)])
    best, index, _ = _scan(fc, w, w_c, c_c, bank, t)
    lens_gauss = np.full(n, np.nan)
    out["dchi2_first"] = np.where(enough, best, np.nan)
    final = best.copy()
    shape_names = np.array(SHAPES, dtype=object)[bank.shape_index[index]]
    refined_shape = shape_names.copy()
    refined_dur = bank.duration_days[index].copy()
    refined_t0 = bank.t0_mjd[index].copy()
    # Leave the most influential night out, rescan the sources that could reach a threshold.
    redo = np.flatnonzero(enough & (best >= PRE_THRESHOLD))
    if redo.size:
        h = bank.rows(t, index[redo])
        f0, a, fconst = _fit_one_template(fc[redo], w[redo], w_c[redo], c_c[redo], h)
        resid_c = fc[redo] - fconst[:, None]
        resid_t = fc[redo] - f0[:, None] - a[:, None] * h
        delta = w[redo] * (resid_c**2 - resid_t**2)
        drop = np.argmax(delta, axis=1)
        w2 = w[redo].copy()
        w2[np.arange(redo.size), drop] = 0.0
        out["dropped_night_mjd"][redo] = t[drop]
        w[redo] = w2
        _, _, seeds_index = _scan(fc[redo], w2, w_c[redo], c_c[redo], bank, t)
        shape_names = np.array(SHAPES, dtype=object)
        seeds = [
            (
                shape_names[bank.shape_index[seeds_index[:, k]]],
                bank.duration_days[seeds_index[:, k]],
                bank.t0_mjd[seeds_index[:, k]],
            )
            for k in range(len(SHAPES))
        ]
        best3, shape3, dur3, t03, lg3 = _restart_poor_fits(
            fc[redo],
            w2,
            w_c[redo],
            c_c[redo],
            t,
            seeds,
            _refine(fc[redo], w2, w_c[redo], c_c[redo], t, seeds),
        )
        # Nights the refined template misses by > CLIP_PULL sigma (at most MAX_CLIPPED, worst
        # first: unresolved caustic spikes, bad nights) leave every model of the source, then
        # the fit is refined again from where it stands.
        h3 = _template_rows(shape3, dur3, t03, t)
        f0, a, _ = _fit_one_template(fc[redo], w2, w_c[redo], c_c[redo], h3)
        pull = np.sqrt(w2) * np.abs(fc[redo] - f0[:, None] - a[:, None] * h3)
        worst = np.argsort(-pull, axis=1)[:, :MAX_CLIPPED]
        clip = np.take_along_axis(pull, worst, axis=1) > CLIP_PULL
        out["n_clipped_nights"][redo] = clip.sum(axis=1)
        again = np.flatnonzero(clip.any(axis=1))
        if again.size:
            rows_a = np.repeat(again, MAX_CLIPPED)[clip[again].ravel()]
            w2[rows_a, worst[again][clip[again]]] = 0.0
            w[redo] = w2
            sub = [(sh[again], d[again], t0_[again]) for sh, d, t0_ in seeds]
            fc_a, w_ca, c_ca = fc[redo[again]], w_c[redo[again]], c_c[redo[again]]
            best4, shape4, dur4, t04, lg4 = _restart_poor_fits(
                fc_a,
                w2[again],
                w_ca,
                c_ca,
                t,
                sub,
                _refine(fc_a, w2[again], w_ca, c_ca, t, sub),
            )
            best3[again], shape3[again], dur3[again], t03[again] = best4, shape4, dur4, t04
            lg3[again] = lg4
        final[redo] = best3  # >= best2: the refinement starts from the bank's best templates
        lens_gauss[redo] = lg3
        refined_shape[redo] = shape3
        refined_dur[redo] = dur3
        refined_t0[redo] = t03
        h2 = _template_rows(shape3, dur3, t03, t)
        drw, _, _, drw_tmpl = drw_delta_chi2(
            fc[redo], w2, w_c[redo], c_c[redo], t, ref[redo], template=h2
        )
        out["dchi2_drw"][redo] = drw
        out["dchi2_drw_template"][redo] = drw_tmpl
    out["dchi2_const"] = np.where(enough, final, np.nan)
    # Template + (white or DRW noise) against the better of constant and DRW.
    drw = out["dchi2_drw"]
    null_best = np.where(np.isfinite(drw), np.maximum(drw, 0.0), 0.0)
    # Red noise under the template only as a correction: an ESE is an event on a steady source,
    # so the template on white noise must already give STEADY_FRACTION of what template + DRW
    # give; a variable whose excursion one template improves on top of its DRW is `variable`.
    with_drw = out["dchi2_drw_template"]
    steady = final >= STEADY_FRACTION * np.where(np.isfinite(with_drw), with_drw, final)
    alt_best = np.where(steady, np.fmax(final, with_drw), final)
    out["ese_stat"] = np.where(enough, alt_best - null_best, np.nan)
    out["lens_minus_gauss"] = np.where(enough, lens_gauss, np.nan)
    # Best template's parameters (all scored sources).
    idx = np.flatnonzero(enough)
    h = _template_rows(refined_shape[idx], refined_dur[idx], refined_t0[idx], t)
    f0, a, _ = _fit_one_template(fc[idx], w[idx], w_c[idx], c_c[idx], h)
    base = f0 + ref[idx]
    out["baseline_flux_mjy"][idx] = base
    # h(0) = -1: the fitted dip at the centre is A, i.e. depth A / F0 (the lens's point-source
    # depth for an exact template). Reported at the deepest night the data sample, so that a
    # centre falling between sparse nights does not extrapolate the amplitude.
    sampled = np.where(w[idx] > 0, -h, -np.inf).max(axis=1)
    sampled = np.where(np.isfinite(sampled), np.minimum(sampled, 1.0), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["event_depth_frac"][idx] = np.where(base > 0, a * sampled / base, np.nan)
    out["event_amplitude_mjy"][idx] = a
    out["event_t0_mjd"][idx] = refined_t0[idx]
    out["event_duration_days"][idx] = refined_dur[idx]
    out["event_shape"][idx] = refined_shape[idx]
    out["event_caustic"][idx] = [shape_has_caustics(s) for s in refined_shape[idx]]
    out["n_event_nights"][idx] = ((np.abs(h) >= EVENT_CORE_H) & (w[idx] > 0)).sum(axis=1)
    return pd.DataFrame(out)


# --------------------------------------------------------------------------------------------
# False-alarm calibration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TailCalibration:
    """Null exceedance curve of one statistic from weighted simulations: FAP(x) = the weight of
    the simulations at or above x, up to the anchor (the value exceeded by
    :data:`TAIL_ANCHOR_COUNT` simulations), exponential beyond it, ``p_a exp(-(x - x_a) / (2
    s))``, with the decay s measured between the anchor and the value exceeded by
    :data:`TAIL_SLOPE_COUNT` simulations and never below 1 (the chi^2 tail with two degrees of
    freedom; a heavier simulated tail, e.g. from the noise scale's own scatter, gives s > 1)."""

    values: np.ndarray  # sorted ascending
    tail_weight: np.ndarray  # tail_weight[i] = total weight of values[i:]
    anchor_x: float
    anchor_p: float
    slope: float = 1.0

    @classmethod
    def from_samples(cls, samples: np.ndarray, weights: np.ndarray | None = None):
        samples = np.asarray(samples, dtype=float)
        weights = np.full(samples.size, 1.0) if weights is None else np.asarray(weights, float)
        weights = weights / max(weights.sum(), 1e-300)
        order = np.argsort(np.where(np.isfinite(samples), samples, -np.inf), kind="stable")
        v = np.where(np.isfinite(samples), samples, -np.inf)[order]
        tail = np.cumsum(weights[order][::-1])[::-1]
        n = v.size
        if n == 0:
            return cls(v, tail, 0.0, 1.0)

        def point(count):
            x = float(v[n - min(count, n)])
            return x, float(tail[int(np.searchsorted(v, x, side="left"))])

        anchor_x, anchor_p = point(TAIL_ANCHOR_COUNT)
        slope = 1.0
        if n >= TAIL_SLOPE_COUNT:
            x_b, p_b = point(TAIL_SLOPE_COUNT)
            if np.isfinite(x_b) and anchor_x > x_b and p_b > anchor_p:
                slope = max(1.0, (anchor_x - x_b) / (2.0 * math.log(p_b / anchor_p)))
        return cls(v, tail, anchor_x, anchor_p, slope)

    def fap(self, x) -> np.ndarray:
        """P(null statistic >= x)."""
        x = np.asarray(x, dtype=float)
        n = self.values.size
        if n == 0:  # no simulation: nothing is known, every value is as likely as not
            return np.ones_like(x)
        pos = np.searchsorted(self.values, np.where(np.isfinite(x), x, 0.0), side="left")
        emp = np.where(pos < n, self.tail_weight[np.minimum(pos, n - 1)], 0.0)
        with np.errstate(over="ignore"):
            tail = self.anchor_p * np.exp(-(x - self.anchor_x) / (2.0 * self.slope))
        out = np.where(x <= self.anchor_x, emp, np.minimum(tail, self.anchor_p))
        return np.where(np.isfinite(x), out, np.where(x > 0, 0.0, 1.0))

    def threshold(self, fap: float) -> float:
        """Smallest x with FAP(x) <= fap (at least MIN_THRESHOLD)."""
        if fap >= self.anchor_p:
            above = np.flatnonzero(self.tail_weight <= fap)  # tail_weight decreases
            x = float(self.values[above[0]]) if above.size else self.anchor_x
            # Just below the first value whose tail weight is <= fap: FAP(x) <= fap there.
            x = (
                float(np.nextafter(self.values[above[0] - 1], np.inf))
                if above.size and above[0]
                else x
            )
        else:
            x = self.anchor_x + 2.0 * self.slope * math.log(self.anchor_p / fap)
        return float(max(x, MIN_THRESHOLD))


@dataclass(frozen=True)
class FalseAlarmCalibration:
    """Calibrated thresholds of one run: ``const`` (dchi2_const, constant null), ``ese``
    (ese_stat, population null), the target FAP per source and the simulations' sizes."""

    const: TailCalibration
    ese: TailCalibration
    fap_per_source: float
    n_simulations: int
    n_variable_simulations: int
    threshold_const: float = field(init=False)
    threshold_ese: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold_const", self.const.threshold(self.fap_per_source))
        object.__setattr__(self, "threshold_ese", self.ese.threshold(self.fap_per_source))

    def expected_false(self, n_sources: int) -> float:
        """Expected false candidates among ``n_sources`` null sources: n (FAP(x_c) + FAP(x_e))."""
        return float(
            n_sources * (self.const.fap(self.threshold_const) + self.ese.fap(self.threshold_ese))
        )


def _simulate_drw(rng, t_mjd, rms, tau, present):
    """DRW paths (n x nights) with stationary rms ``rms`` and timescale ``tau`` (exact OU
    discretisation over each row's present nights)."""
    n, m = present.shape
    x = rms * rng.standard_normal(n)
    out = np.zeros((n, m))
    for j in range(m):
        if j:
            a = np.exp(-(t_mjd[j] - t_mjd[j - 1]) / tau)
            x = a * x + rms * np.sqrt(1.0 - a * a) * rng.standard_normal(n)
        out[:, j] = x
    return out


def simulate_null(
    matrix: LightcurveMatrix,
    scores: pd.DataFrame,
    n_simulations: int,
    rng: np.random.Generator,
    *,
    with_variables: bool,
    variable_fraction: float | None = None,
    catalog_frac_err: float = DEFAULT_CATALOG_FRAC_ERR,
) -> tuple[LightcurveMatrix, int]:
    """Null lightcurves on the survey's own nights and errors (module docstring): each simulation
    copies the pattern of nights, errors x noise scale and baseline of a random source; with
    ``with_variables`` a population-sized fraction of them gets the DRW (rms, tau) of a random
    population variable. Returns the matrix and the number of DRW simulations."""
    n_src = len(matrix.source_ids)
    usable = np.flatnonzero(matrix.present.sum(axis=1) >= MIN_NIGHTS)
    if not usable.size:  # no source has the nights to be scored: nothing to simulate
        n_simulations = 0
    pick = rng.choice(usable, size=n_simulations) if usable.size else np.zeros(0, dtype=int)
    present = matrix.present[pick]
    r = scores["noise_scale"].to_numpy(dtype=float)[pick]
    base = scores["baseline_flux_mjy"].to_numpy(dtype=float)[pick]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: sources without nights
        med = np.nanmedian(np.where(matrix.present, matrix.flux, np.nan), axis=1)[pick]
    base = np.where(np.isfinite(base), base, med)
    sigma = np.where(present, matrix.err[pick] * r[:, None], np.nan)
    flux = base[:, None] + sigma * rng.standard_normal(sigma.shape)
    n_var = 0
    if with_variables:
        drw = scores["dchi2_drw"].to_numpy(dtype=float)
        var_rows = np.flatnonzero(np.isfinite(drw) & (drw >= DRW_VARIABLE_DCHI2))
        frac = var_rows.size / max(n_src, 1) if variable_fraction is None else variable_fraction
        n_var = round(frac * n_simulations)
        if n_var and var_rows.size:
            fc, w, w_c, c_c, ref, _ = _prepare(matrix, catalog_frac_err)
            sub = var_rows
            _, rms, tau, _ = drw_delta_chi2(
                fc[sub], w[sub], w_c[sub], c_c[sub], matrix.t_mjd, ref[sub]
            )
            choose = rng.integers(0, sub.size, n_var)
            rel = rms[choose] / np.abs(ref[sub][choose])
            rows = rng.choice(n_simulations, size=n_var, replace=False)
            flux[rows] += _simulate_drw(
                rng, matrix.t_mjd, rel * np.abs(base[rows]), tau[choose], present[rows]
            )
    flux = np.where(present, flux, np.nan)
    cat = matrix.catalog_flux_mjy[pick]
    cat = np.where(
        np.isfinite(cat), base * (1.0 + catalog_frac_err * rng.standard_normal(base.size)), np.nan
    )
    ids = np.array([f"null{i}" for i in range(n_simulations)], dtype=object)
    return LightcurveMatrix(ids, matrix.t_mjd, flux, sigma, cat), n_var


def calibrate_false_alarms(
    matrix: LightcurveMatrix,
    scores: pd.DataFrame,
    *,
    n_simulations: int = DEFAULT_N_SIMULATIONS,
    fap_per_source: float = DEFAULT_FAP_PER_SOURCE,
    seed: int = 0,
    catalog_frac_err: float = DEFAULT_CATALOG_FRAC_ERR,
) -> FalseAlarmCalibration:
    """Thresholds for this cadence by simulation (module docstring). ``scores`` is
    :func:`score_lightcurves` of ``matrix`` (noise scales, baselines, the population's DRW).

    ``n_simulations`` constant-source nulls give the constant null; the population null is their
    mixture with DRW nulls in the population's proportion f of DRW-preferring sources:
    ``FAP_pop(x) = (1 - f) P_const(x) + f P_drw(x)``, with P_drw from ``min(1, 4 f)
    n_simulations`` DRW simulations (oversampled 4x so that its tail is resolved).
    """
    rng = np.random.default_rng(seed)
    null_c, _ = simulate_null(
        matrix, scores, n_simulations, rng, with_variables=False, catalog_frac_err=catalog_frac_err
    )
    const_scores = score_lightcurves(null_c, catalog_frac_err=catalog_frac_err)
    sc = const_scores["ese_stat"]
    drw = scores["dchi2_drw"].to_numpy(dtype=float)
    n_pop = max(int(np.isfinite(scores["dchi2_const"].to_numpy(dtype=float)).sum()), 1)
    frac = float(np.sum(np.isfinite(drw) & (drw >= DRW_VARIABLE_DCHI2))) / n_pop
    n_drw = round(min(1.0, 4.0 * frac) * n_simulations) if frac > 0 else 0
    values = [sc.to_numpy(dtype=float)]
    weights = [np.full(len(sc), (1.0 - frac) / max(len(sc), 1))]
    if n_drw:
        null_v, n_drw = simulate_null(
            matrix,
            scores,
            n_drw,
            rng,
            with_variables=True,
            variable_fraction=1.0,
            catalog_frac_err=catalog_frac_err,
        )
        sv = score_lightcurves(null_v, catalog_frac_err=catalog_frac_err)["ese_stat"]
        values.append(sv.to_numpy(dtype=float))
        weights.append(np.full(len(sv), frac / max(len(sv), 1)))
    return FalseAlarmCalibration(
        const=TailCalibration.from_samples(const_scores["dchi2_const"].to_numpy(dtype=float)),
        ese=TailCalibration.from_samples(np.concatenate(values), np.concatenate(weights)),
        fap_per_source=fap_per_source,
        n_simulations=n_simulations,
        n_variable_simulations=n_drw,
    )


def classify(scores: pd.DataFrame, calibration: FalseAlarmCalibration) -> pd.DataFrame:
    """``scores`` plus ``flag, flag_type, significance, false_alarm_prob`` (module docstring).

    ``significance`` is the statistic of the class's test (ese_stat for ese/dip/spike,
    dchi2_const otherwise); ``false_alarm_prob`` its calibrated FAP per source.
    """
    first = scores["dchi2_first"].to_numpy(dtype=float)
    const = scores["dchi2_const"].to_numpy(dtype=float)
    ese = scores["ese_stat"].to_numpy(dtype=float)
    amplitude = scores["event_amplitude_mjy"].to_numpy(dtype=float)
    lg = scores["lens_minus_gauss"].to_numpy(dtype=float)
    xc, xe = calibration.threshold_const, calibration.threshold_ese
    with np.errstate(invalid="ignore"):
        is_event = ese >= xe
        is_var = ~is_event & (const >= xc)
        is_out = ~is_event & ~is_var & (first >= xc)
        dip = amplitude > 0  # A > 0: the template's dip (h(0) = -1) is below the baseline
        kind = np.where(dip, np.where(lg >= -DIP_SHAPE_MARGIN, FLAG_ESE, FLAG_DIP), FLAG_SPIKE)
    flag_type = np.where(
        is_event, kind, np.where(is_var, FLAG_VARIABLE, np.where(is_out, FLAG_OUTLIER, ""))
    )
    significance = np.where(is_event, ese, const)
    fap = np.where(is_event, calibration.ese.fap(ese), calibration.const.fap(const))
    out = scores.copy()
    out["flag"] = is_event | is_var
    out["flag_type"] = flag_type.astype(object)
    out["significance"] = significance
    out["false_alarm_prob"] = np.where(np.isfinite(const), fap, np.nan)
    return out


def detect_ese_templates(
    matrix: LightcurveMatrix,
    *,
    catalog_frac_err: float = DEFAULT_CATALOG_FRAC_ERR,
    n_simulations: int = DEFAULT_N_SIMULATIONS,
    fap_per_source: float = DEFAULT_FAP_PER_SOURCE,
    seed: int = 0,
) -> tuple[pd.DataFrame, FalseAlarmCalibration]:
    """Score, calibrate on this survey's cadence and classify: ``(rows, calibration)``."""
    scores = score_lightcurves(matrix, catalog_frac_err=catalog_frac_err)
    calibration = calibrate_false_alarms(
        matrix,
        scores,
        n_simulations=n_simulations,
        fap_per_source=fap_per_source,
        seed=seed,
        catalog_frac_err=catalog_frac_err,
    )
    return classify(scores, calibration), calibration
