"""Gaussian beam kernels in pixels and the correlated-noise quadratic form of a linear estimator.

The noise of a synthesis image is correlated like the beam: ``rho(tau) = exp(-tau^T C^-1 tau / 2)``
at pixel lag tau (C the beam covariance in pixels; Condon 1997, PASP 109, 166). The variance of a
linear estimator ``F = sum_i a_i d_i`` is then ``rms^2 sum_ij a_i a_j rho_ij``, evaluated here
exactly on the pixel grid by FFT convolution (:func:`convolve_with_rho`), in closed form for a
well-sampled beam (:func:`smoothed_kernel`), and for the beam-matched estimator on an unblanked
stamp (:func:`correlated_noise_factor`). See :mod:`ese_assets.core.photometry` for its use.

Pixel conventions: offsets ``(dx, dy)`` in pixels, covariances ``[[Cxx, Cxy], [Cxy, Cyy]]``.
"""

from __future__ import annotations

import math

import numpy as np

#: Noise models: "beam" (noise autocorrelation = beam) or "none" (white noise).
NOISE_MODELS = ("beam", "none")


def inverse_2x2(cov: np.ndarray) -> np.ndarray:
    a, b, c = cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1]
    det = a * c - b * b
    inv = np.empty_like(cov)
    inv[..., 0, 0] = c / det
    inv[..., 1, 1] = a / det
    inv[..., 0, 1] = inv[..., 1, 0] = -b / det
    return inv


def gaussian(icov: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """exp(-d^T C^-1 d / 2) with broadcastable icov[..., 2, 2] components and offsets."""
    q = icov[..., 0, 0] * dx * dx + 2.0 * icov[..., 0, 1] * dx * dy + icov[..., 1, 1] * dy * dy
    return np.exp(-0.5 * q)


def _fast_len(n: int) -> int:
    """Smallest 2,3,5-smooth integer >= n (fast FFT length)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


#: Noise-autocorrelation lags are kept up to RHO_SIGMAS marginal standard deviations per axis;
#: beyond, rho < exp(-RHO_SIGMAS^2 / 2) = 1.5e-8 (since tau^T C^-1 tau >= tau_y^2 / C_yy).
RHO_SIGMAS = 6.0


def convolve_with_rho(a: np.ndarray, icov_pix: np.ndarray) -> np.ndarray:
    """``(a conv rho)`` on the same (Ry, Rx) grid for a stack ``a[..., Ry, Rx]``, where
    ``rho(tau) = exp(-tau^T C^-1 tau / 2)`` is the beam-shaped noise autocorrelation at pixel
    lags tau (C = inverse of ``icov_pix``). Linear convolution by zero-padded FFT over all lags
    present in the grid up to RHO_SIGMAS marginal sigmas, so ``sum(a * result)`` is
    ``sum_ij a_i a_j rho_ij`` to ~1e-8."""
    ry, rx = a.shape[-2:]
    cov = inverse_2x2(np.asarray(icov_pix, dtype=float))
    hy = min(ry - 1, math.ceil(RHO_SIGMAS * math.sqrt(cov[1, 1])))
    hx = min(rx - 1, math.ceil(RHO_SIGMAS * math.sqrt(cov[0, 0])))
    ly = np.arange(-hy, hy + 1, dtype=float)[:, None]
    lx = np.arange(-hx, hx + 1, dtype=float)[None, :]
    rho = gaussian(icov_pix, lx, ly)
    fy, fx = _fast_len(ry + 2 * hy), _fast_len(rx + 2 * hx)
    spec = np.fft.rfft2(a, s=(fy, fx)) * np.fft.rfft2(rho, s=(fy, fx))
    full = np.fft.irfft2(spec, s=(fy, fx))
    return full[..., hy : hy + ry, hx : hx + rx]


def _det(c: np.ndarray) -> np.ndarray:
    return c[..., 0, 0] * c[..., 1, 1] - c[..., 0, 1] ** 2


def smoothed_kernel(icov_src: np.ndarray, icov_noise: np.ndarray, dx, dy) -> np.ndarray:
    """Beam kernel convolved with the noise autocorrelation, ``(K conv rho)(d)``, in closed form.

    With K = exp(-d^T C_s^-1 d / 2) and rho = exp(-d^T C_0^-1 d / 2) (peak 1), the continuous
    convolution per unit pixel area is
    ``2 pi sqrt(|C_s| |C_0| / |C_s + C_0|) exp(-d^T (C_s + C_0)^-1 d / 2)``
    (``pi sqrt|C| exp(-d^T C^-1 d / 4)`` for C_s = C_0). The pixel sum equals the integral up to
    aliasing terms ~exp(-2 pi^2 sigma_min^2) (Poisson summation), i.e. < 1e-4 for a beam FWHM of
    >= 2.5 pixels; the beam wings outside the fitted stamps (< 0.2 % of the peak) are included.
    ``icov_src`` (..., 2, 2) broadcasts against the offsets with trailing axes added.
    """
    c_src = inverse_2x2(icov_src)
    c_noise = inverse_2x2(np.asarray(icov_noise, dtype=float))
    c_sum = c_src + c_noise
    norm = 2.0 * np.pi * np.sqrt(_det(c_src) * _det(c_noise) / _det(c_sum))
    icov_sum = inverse_2x2(c_sum)[..., None, None, :, :]
    return norm[..., None, None] * gaussian(icov_sum, dx, dy)


def correlated_noise_factor(
    beam_cov_pix, half_size_pix: int, noise_correlation: str = "beam"
) -> float:
    """sigma_F / rms of the beam-matched estimator on a (2h+1)^2 stamp with no blanked pixels.

    ``"beam"``: sqrt(sum_ij K_i K_j rho_ij) / sum K^2 (eq. (1) of
    :mod:`ese_assets.core.photometry`), rho the beam-shaped noise autocorrelation; -> 2/sqrt(3)
    = 1.1547 for a well-sampled beam and a stamp of >= ~3 beams. ``"none"``: 1/sqrt(sum K^2)
    (white noise). Evaluated on the pixel grid and averaged (in variance) over the sub-pixel
    offsets (0, 0), (1/2, 0), (0, 1/2), (1/2, 1/2).
    """
    if noise_correlation not in NOISE_MODELS:
        raise ValueError(
            f"noise_correlation must be one of {NOISE_MODELS}, got {noise_correlation!r}"
        )
    cov = np.asarray(beam_cov_pix, dtype=float)
    icov = inverse_2x2(cov)
    h = int(half_size_pix)
    off = np.arange(-h, h + 1, dtype=float)
    shifts = np.array([[0.0, 0.0], [0.5, 0.0], [0.0, 0.5], [0.5, 0.5]])
    dx = off[None, None, :] - shifts[:, 0, None, None]
    dy = off[None, :, None] - shifts[:, 1, None, None]
    k = gaussian(icov, dx, dy)  # (4, S, S)
    den = np.sum(k * k, axis=(1, 2))
    if noise_correlation == "none":
        return float(np.sqrt(np.mean(1.0 / den)))
    quad = np.sum(k * convolve_with_rho(k, icov), axis=(1, 2))
    return float(np.sqrt(np.mean(quad / den**2)))
