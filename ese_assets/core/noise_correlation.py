"""The noise correlation of an image, measured from its own source-free positions.

Why
---
The error of the beam-matched estimator ``F = sum_i K_i d_i / sum_i K_i^2`` (stamp pixels i, beam
kernel K of peak 1; :mod:`ese_assets.core.photometry`) depends on how the noise is correlated.
For noise of autocovariance ``C(tau) = <d_i d_j>`` at pixel lag ``tau = i - j`` the variance of any
linear estimator ``F = sum_i a_i d_i`` is ``sum_ij a_i a_j C(i - j)``, here::

    Var(F) = sum_ij K_i K_j C(i - j) / (sum_i K_i^2)^2                                    (1)

(the variance of a linear combination of correlated variables; noise correlated on the beam
scale in radio maps: Condon 1997, PASP 109, 166). The photometry's error model assumes
``C = rms^2 rho_beam``, noise correlated exactly like the restoring beam, which gives
``sigma_F = q_beam rms`` with ``q_beam = sqrt(sum_ij K_i K_j rho_beam(i - j)) / sum K^2``,
-> 2/sqrt(3) for a well-sampled beam.
Real noise is not always beam-shaped: noise made by convolving white noise with the beam has an
autocorrelation sqrt(2) wider, CLEAN residuals and restored components mix correlations,
single-dish maps differ again. For a Gaussian autocorrelation of covariance ``s^2 C_beam``
(width s beams), eq. (1) in the well-sampled limit gives::

    sigma_F / (q_beam rms) = sqrt(3 s^2 / (s^2 + 2))                                      (2)

(the Gaussian integral of ``(K conv K)(tau) rho(tau)``, see :mod:`ese_assets.core.photometry`):
0.577 for s = 1/2, 0.775 for s = 1/sqrt(2), 1 for s = 1, 1.225 for s = sqrt(2), 1.414 for s = 2
-- compare the blank-sky flux/error std of 0.77-1.88 measured on real and test images.

Method: the estimator's scatter at source-free positions
--------------------------------------------------------
Rather than model C, the estimator itself is applied where there is only noise ("empty
apertures", the standard noise measure of correlated-noise images, e.g. Labbe et al. 2003, AJ 125,
1107): at P positions on a regular pixel grid whose stamps hold no blank pixel and do not overlap
the stamp of any catalog source, ``F_p = sum_i K0_i (d_{p+i} - b_p) / sum K0^2`` with the kernel
``K0`` centred on the pixel and ``b_p`` the background mesh there. Its expectation of ``F_p^2``
is exactly eq. (1) at the local noise, so the pulls ``z_p = F_p / (q_beam rms_p)`` (rms_p the
local RMS mesh) have standard deviation::

    c = sqrt(sum_ij K0_i K0_j C(i - j)) / (q_beam rms)                                    (3)

the factor by which the beam assumption's error must be multiplied: the corrected error is
``c * q_beam * rms``. c is the sigma-clipped (3 sigma) MAD standard deviation of the z_p
(:func:`ese_assets.core.background.sigma_clipped_median_mad_std`, corrected for the clipping
bias), so residual sources that are not in the catalog, artefacts and the odd bright pixel do
not bias it: a position holding one is an outlier of z, not a change of its width. The same
factor is applied to every measurement of the image; for stamps with blank pixels and for joint
fits of close pairs (whose exact beam-model errors differ) it is the best available estimate.

Cost, number of positions, uncertainty
--------------------------------------
Positions are spaced ``max(S/2, sqrt(area / MAX_POSITIONS))`` pixels (S = 2h + 1 the stamp): at
S/2 the estimator values of neighbouring positions correlate by ~0.1 for beam-like noise, so
they are nearly independent samples, and at most ``MAX_POSITIONS`` stamps are gathered (a 2048^2
image with a 15-pixel stamp: ~16 000 positions, about one read of the image). The MAD standard
deviation of N independent Gaussian samples has a relative error of 1.166 / sqrt(N) (efficiency
0.37), i.e. 0.9 % at N = 16 000, 2.6 % at 2 000 and 8 % at ``MIN_POSITIONS`` = 200; with fewer
usable positions the image keeps the beam assumption (factor 1), with the reason. The stated
uncertainty is measured, not assumed: the positions are split into 4 x 4 blocks of the image, c
is computed in each block (``c_g`` from ``n_g`` positions) and
``err^2 = sum_g n_g (c_g - c)^2 / ((G - 1) N)`` (the scatter of the block values, which also
holds when neighbouring positions are correlated, as for noise correlated wider than the beam,
or when the correlation varies over the field).

Pixel conventions: arrays ``[y, x]``, 0-based pixel positions, covariances ``[[Cxx, Cxy], [Cxy,
Cyy]]`` (as in :mod:`ese_assets.core.kernels`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ese_assets.core.background import (
    clipped_mad_std_bias,
    sample_mesh,
    sigma_clipped_median_mad_std,
)
from ese_assets.core.kernels import convolve_with_rho, gaussian

#: How the pipeline sets the error of a measurement (``ESE_NOISE_CORRELATION``): "measure" the
#: image's noise correlation from its source-free positions (this module), or assume the "beam".
NOISE_CORRELATION_MODES = ("measure", "beam")
DEFAULT_NOISE_CORRELATION = "measure"

#: Fewer usable source-free positions than this: the factor would be uncertain by more than ~8 %
#: (MAD of Gaussian samples: 1.166 / sqrt(N)), so the image keeps the beam assumption.
MIN_POSITIONS = 200
#: At most this many positions are measured (~0.9 % precision); larger images use a wider grid.
MAX_POSITIONS = 16384
#: Blocks per image axis for the uncertainty (4 x 4 blocks); blocks with fewer positions than
#: MIN_BLOCK_POSITIONS do not enter it.
BLOCKS_PER_AXIS = 4
MIN_BLOCK_POSITIONS = 10
#: Relative error of the MAD standard deviation of N independent Gaussian samples times sqrt(N):
#: 1 / (2 m g(m)) with m = Phi^-1(3/4) = 0.6745 and g(m) = 2 phi(m) the density of |X| there.
MAD_STD_REL_ERROR = 1.1664
#: Sigma of the clipping of the pulls (as the background mesh).
CLIP_SIGMA = 3.0
#: Stamp pixels per batch of gathered stamps (each float64 temporary <= 1 MiB).
CHUNK_PIX = 2**17


@dataclass(frozen=True)
class NoiseCorrelation:
    """The per-image error correction: ``corrected error = factor * beam-assumption error``.

    ``factor``: c of eq. (3) when ``measured``, else 1 (the beam assumption).
    ``factor_err``: its 1-sigma uncertainty (NaN when not measured).
    ``n_positions``: source-free positions used (or found, when too few).
    ``reason``: why the factor was not measured (None when it was).
    """

    factor: float
    factor_err: float
    n_positions: int
    measured: bool
    reason: str | None = None


def beam_assumption(reason: str, n_positions: int = 0) -> NoiseCorrelation:
    """The beam assumption (factor 1), with the reason it is used."""
    return NoiseCorrelation(
        factor=1.0, factor_err=math.nan, n_positions=int(n_positions), measured=False, reason=reason
    )


def validate_noise_correlation(mode: str) -> str:
    """``mode`` if it is one of :data:`NOISE_CORRELATION_MODES`, else ValueError naming them."""
    if mode not in NOISE_CORRELATION_MODES:
        raise ValueError(f"must be one of {', '.join(NOISE_CORRELATION_MODES)}; got {mode!r}")
    return mode


def beam_model_factor(icov_pix: np.ndarray, half_size_pix: int) -> float:
    """``q_beam = sqrt(sum_ij K_i K_j rho_beam(i - j)) / sum K^2`` for the kernel centred on a
    pixel, on a (2h+1)^2 stamp; rho_beam the beam-shaped autocorrelation (peak 1)."""
    off = np.arange(-int(half_size_pix), int(half_size_pix) + 1, dtype=float)
    k = gaussian(np.asarray(icov_pix, dtype=float), off[None, :], off[:, None])
    quad = float(np.sum(k * convolve_with_rho(k, icov_pix)))
    return math.sqrt(quad) / float(np.sum(k * k))


def position_grid(
    shape: tuple[int, int], half_size_pix: int, spacing_pix: int
) -> tuple[np.ndarray, np.ndarray]:
    """Integer pixel centres (x, y) of a regular grid whose (2h+1)^2 stamps lie inside the image,
    centred in the image; flattened, row by row."""
    ny, nx = int(shape[0]), int(shape[1])
    h, g = int(half_size_pix), max(1, int(spacing_pix))

    def axis(n: int) -> np.ndarray:
        span = n - 1 - 2 * h  # centres h .. n - 1 - h
        if span < 0:
            return np.empty(0, dtype=np.int64)
        count = span // g + 1
        start = h + (span - (count - 1) * g) // 2
        return start + g * np.arange(count, dtype=np.int64)

    xs, ys = axis(nx), axis(ny)
    gx, gy = np.meshgrid(xs, ys)
    return gx.ravel(), gy.ravel()


def _near_sources(gx, gy, src_x, src_y, reach_pix: int) -> np.ndarray:
    """True for grid positions within ``reach_pix`` (Chebyshev, integer centres) of a source.

    The grid is regular (``gx``/``gy`` from :func:`position_grid`); each source marks the grid
    cells of its reach by index arithmetic, so the cost is ~sources x (reach/spacing)^2."""
    xs, ys = np.unique(gx), np.unique(gy)
    near = np.zeros((ys.size, xs.size), dtype=bool)
    sx = np.asarray(src_x, dtype=float)
    sy = np.asarray(src_y, dtype=float)
    ok = np.isfinite(sx) & np.isfinite(sy)
    if not ok.any() or xs.size == 0 or ys.size == 0:
        return near.ravel()
    cx = np.floor(sx[ok] + 0.5).astype(np.int64)
    cy = np.floor(sy[ok] + 0.5).astype(np.int64)
    gstep_x = int(xs[1] - xs[0]) if xs.size > 1 else 1
    gstep_y = int(ys[1] - ys[0]) if ys.size > 1 else 1
    ix_lo = np.maximum(0, -((xs[0] - (cx - reach_pix)) // gstep_x))  # ceil((cx - r - x0) / g)
    iy_lo = np.maximum(0, -((ys[0] - (cy - reach_pix)) // gstep_y))
    ix_hi = np.minimum(xs.size - 1, (cx + reach_pix - xs[0]) // gstep_x)
    iy_hi = np.minimum(ys.size - 1, (cy + reach_pix - ys[0]) // gstep_y)
    mx = 2 * reach_pix // gstep_x + 1
    my = 2 * reach_pix // gstep_y + 1
    ix = ix_lo[:, None, None] + np.arange(mx)[None, None, :]
    iy = iy_lo[:, None, None] + np.arange(my)[None, :, None]
    hit = (ix <= ix_hi[:, None, None]) & (iy <= iy_hi[:, None, None])
    ix, iy = np.broadcast_arrays(ix, iy)
    near[iy[hit], ix[hit]] = True
    return near.ravel()


def blank_position_fluxes(
    data: np.ndarray, kernel: np.ndarray, x: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """``sum_i K_i d_{p+i} / sum K^2`` at integer pixel centres (x, y) for a (2h+1)^2 kernel
    (no background subtracted; NaN where a stamp holds a blank pixel). Stamps are gathered in
    batches from a window view of the image (one fancy index per batch, a contiguous copy) and
    reduced by one matrix-vector product in the image's float type (float32 sums of a few hundred
    terms: relative error ~1e-7, far below the noise being measured; 2.6x faster than float64)."""
    size = kernel.shape[0]
    h = size // 2
    data = np.asarray(data)
    if not np.issubdtype(data.dtype, np.floating):
        data = data.astype(float)
    windows = sliding_window_view(data, (size, size))
    k = np.asarray(kernel, dtype=float)
    k_norm = (k / float(np.sum(k * k))).astype(data.dtype).ravel()
    out = np.empty(x.size)
    step = max(1, CHUNK_PIX // (size * size))
    for s in range(0, x.size, step):
        stamps = windows[y[s : s + step] - h, x[s : s + step] - h]
        out[s : s + step] = stamps.reshape(stamps.shape[0], -1) @ k_norm
    return out


def _clipped_scale(rows: np.ndarray) -> np.ndarray:
    """Sigma-clipped MAD standard deviation of each row (NaN ignored), corrected for the clipping
    bias, so that it estimates the standard deviation of Gaussian samples."""
    _, mad_std = sigma_clipped_median_mad_std(np.array(rows, dtype=float), sigma=CLIP_SIGMA)
    return mad_std / clipped_mad_std_bias(CLIP_SIGMA)


def block_uncertainty(z: np.ndarray, x, y, shape, factor: float) -> float:
    """1-sigma uncertainty of the scale ``factor`` of the pulls ``z`` at positions (x, y), from
    the scatter of the values of 4 x 4 image blocks (see the module docstring); NaN when fewer
    than 4 blocks hold MIN_BLOCK_POSITIONS positions."""
    ny, nx = int(shape[0]), int(shape[1])
    block = (np.asarray(y) * BLOCKS_PER_AXIS // ny) * BLOCKS_PER_AXIS + (
        np.asarray(x) * BLOCKS_PER_AXIS // nx
    )
    counts = np.bincount(block, minlength=BLOCKS_PER_AXIS**2)
    used = np.flatnonzero(counts >= MIN_BLOCK_POSITIONS)
    if used.size < 4:
        return math.nan
    order = np.argsort(block, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    rows = np.full((used.size, int(counts[used].max())), np.nan)
    for r, b in enumerate(used):
        members = z[order[starts[b] : starts[b + 1]]]
        rows[r, : members.size] = members
    c_g = _clipped_scale(rows)
    n_g = counts[used]
    n = float(n_g.sum())
    return math.sqrt(float(np.sum(n_g * (c_g - factor) ** 2)) / ((used.size - 1) * n))


def measure_noise_correlation(
    data: np.ndarray,
    icov_pix: np.ndarray,
    half_size_pix: int,
    *,
    background_mesh: np.ndarray,
    rms_mesh: np.ndarray,
    box_pix: int,
    source_x_pix=(),
    source_y_pix=(),
    min_positions: int = MIN_POSITIONS,
    max_positions: int = MAX_POSITIONS,
) -> NoiseCorrelation:
    """The error correction c of eq. (3) for one image, from the estimator's scatter at
    source-free positions (module docstring).

    ``data``: 2-D image (NaN = blank). ``icov_pix``: inverse beam covariance in pixels (the beam at
    the image centre, as the photometry uses for its noise factor). ``half_size_pix``: h of the
    photometry's (2h+1)^2 stamps. ``background_mesh``/``rms_mesh``/``box_pix``: the meshes of
    :func:`ese_assets.core.background.background_and_rms` for this image. ``source_x_pix`` /
    ``source_y_pix``: 0-based pixel positions of the catalog sources; positions whose stamp
    overlaps a source's stamp are not used. Fewer than ``min_positions`` usable positions, or no
    finite result: the beam assumption with the reason.
    """
    data = np.asarray(data)
    if data.ndim != 2:
        raise ValueError(f"data must be a 2-D image, got shape {data.shape}")
    ny, nx = data.shape
    h = int(half_size_pix)
    size = 2 * h + 1
    spacing = max(math.ceil(size / 2), math.ceil(math.sqrt(ny * nx / max(1, max_positions))))
    gx, gy = position_grid((ny, nx), h, spacing)
    free = ~_near_sources(gx, gy, source_x_pix, source_y_pix, 2 * h)
    gx, gy = gx[free], gy[free]
    icov = np.asarray(icov_pix, dtype=float)
    off = np.arange(-h, h + 1, dtype=float)
    kernel = gaussian(icov, off[None, :], off[:, None])
    flux = blank_position_fluxes(data, kernel, gx, gy)
    bkg = sample_mesh(background_mesh, box_pix, gx, gy, shape=(ny, nx))
    rms = sample_mesh(rms_mesh, box_pix, gx, gy, shape=(ny, nx))
    # The background enters F as b_p * sum K / sum K^2 (it is constant over a stamp).
    flux = flux - bkg * float(np.sum(kernel)) / float(np.sum(kernel * kernel))
    q_beam = beam_model_factor(icov, h)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = flux / (rms * q_beam)
    usable = np.isfinite(z) & (rms > 0)
    n = int(usable.sum())
    if n < min_positions:
        return beam_assumption(
            f"only {n} source-free positions without blank pixels (at least {min_positions} "
            "needed to measure the noise correlation): beam assumption",
            n,
        )
    z, gx, gy = z[usable], gx[usable], gy[usable]
    factor = float(_clipped_scale(z[None, :])[0])
    if not (math.isfinite(factor) and factor > 0):
        return beam_assumption(f"noise correlation not measurable (factor {factor})", n)
    err = block_uncertainty(z, gx, gy, (ny, nx), factor)
    if not math.isfinite(err):  # too few blocks: the independent-sample MAD error
        err = MAD_STD_REL_ERROR * factor / math.sqrt(n)
    return NoiseCorrelation(factor=factor, factor_err=err, n_positions=n, measured=True)
