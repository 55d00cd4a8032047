"""Simulated radio images: a SIN-projection WCS, point sources rendered as the beam, noise
correlated on the beam scale, and FITS files written the way imagers write them.

- :func:`make_sin_wcs` / :func:`celestial_header`: a 2-D SIN-projection WCS with RA increasing to
  the left (``CDELT1 < 0``), reference pixel at the array centre (0-based pixel ``(nx//2, ny//2)``).
- :func:`beam_covariance_pix`: the beam as a 2x2 covariance matrix in pixel units, built from the
  local WCS Jacobian so that BPA (east of north) is oriented correctly whatever the sign of CDELT1.
- :func:`render_point_sources`: unresolved sources as the elliptical Gaussian beam with peak = flux
  (a point source of S Jy has a peak of S Jy/beam), evaluated only inside a +-5 sigma stamp.
- :func:`correlated_noise`: Gaussian noise whose autocorrelation has the shape of the beam, the
  usual model for noise in a synthesis image (Condon 1997, PASP 109, 166).
- :func:`write_fits_image`: a 2-D image or a 4-D CASA-style cube (RA, Dec, FREQ, STOKES).

Used by the survey simulator (:mod:`ese_assets.core.simulate`) and by the tests, which build
images with known fluxes from these functions.

Pixel conventions: numpy arrays are indexed ``[y, x]``; pixel coordinates are 0-based (astropy
``origin=0``); pixel covariances are ``[[Cxx, Cxy], [Cxy, Cyy]]`` in pixel^2.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from ese_assets.core.beam import beam_covariance_sky
from ese_assets.core.fits_image import Beam

#: Point sources are rendered within +-STAMP_SIGMA standard deviations (exp(-12.5) ~ 4e-6 of peak).
STAMP_SIGMA = 5.0


# --------------------------------------------------------------------------------------------
# WCS and beam geometry
# --------------------------------------------------------------------------------------------
def celestial_header(
    ra_deg: float, dec_deg: float, cell_deg: float, shape: tuple[int, int]
) -> fits.Header:
    """Celestial WCS keywords of a SIN image of ``shape = (ny, nx)`` centred on (ra_deg, dec_deg).

    ``CRPIX`` (1-based) = ``n//2 + 1``, so the field centre falls on the 0-based pixel ``n//2``.
    ``CDELT1 = -cell`` (RA increases to the left, the standard orientation), ``CDELT2 = +cell``.
    """
    ny, nx = int(shape[0]), int(shape[1])
    hdr = fits.Header()
    hdr["CTYPE1"] = "RA---SIN"
    hdr["CRVAL1"] = float(ra_deg) % 360.0
    hdr["CDELT1"] = -float(cell_deg)
    hdr["CRPIX1"] = float(nx // 2 + 1)
    hdr["CUNIT1"] = "deg"
    hdr["CTYPE2"] = "DEC--SIN"
    hdr["CRVAL2"] = float(dec_deg)
    hdr["CDELT2"] = float(cell_deg)
    hdr["CRPIX2"] = float(ny // 2 + 1)
    hdr["CUNIT2"] = "deg"
    hdr["RADESYS"] = "ICRS"
    return hdr


def make_sin_wcs(ra_deg: float, dec_deg: float, cell_deg: float, shape: tuple[int, int]) -> WCS:
    """2-D celestial WCS identical to the one :func:`write_fits_image` writes
    (see :func:`celestial_header`)."""
    hdr = celestial_header(ra_deg, dec_deg, cell_deg, shape)
    hdr["NAXIS"] = 2
    hdr["NAXIS1"] = int(shape[1])
    hdr["NAXIS2"] = int(shape[0])
    return WCS(hdr)


def _tangent_offsets_deg(ra0_deg, dec0_deg, ra_deg, dec_deg):
    """Gnomonic (east, north) offsets in degrees of (ra, dec) about (ra0, dec0).

    xi = cos d sin(da) / cos c, eta = (cos d0 sin d - sin d0 cos d cos da) / cos c,
    cos c = sin d0 sin d + cos d0 cos d cos da (Calabretta & Greisen 2002). Exact to first order in
    the offset, which is all the local Jacobian needs; handles the RA = 0/360 wrap.
    """
    ra0, dec0 = np.radians(ra0_deg), np.radians(dec0_deg)
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    dra = ra - ra0
    cosc = np.sin(dec0) * np.sin(dec) + np.cos(dec0) * np.cos(dec) * np.cos(dra)
    xi = np.cos(dec) * np.sin(dra) / cosc
    eta = (np.cos(dec0) * np.sin(dec) - np.sin(dec0) * np.cos(dec) * np.cos(dra)) / cosc
    return np.degrees(xi), np.degrees(eta)


def pixel_jacobian(wcs: WCS, x, y) -> np.ndarray:
    """Local Jacobian d(east, north)/d(x, y) in deg/pixel at pixel positions (x, y).

    Shape (..., 2, 2).

    Central differences of +-0.5 pixel through the full WCS; ``J[..., 0, :]`` is d(east)/d(x, y),
    ``J[..., 1, :]`` is d(north)/d(x, y). For a standard image J = [[-cell, 0], [0, cell]].
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ra0, dec0 = wcs.wcs_pix2world(x, y, 0)
    h = 0.5
    xs = np.stack([x + h, x - h, x, x])
    ys = np.stack([y, y, y + h, y - h])
    ra, dec = wcs.wcs_pix2world(xs, ys, 0)
    e, n = _tangent_offsets_deg(ra0[None], dec0[None], ra, dec)
    jac = np.empty((*x.shape, 2, 2))
    jac[..., 0, 0] = (e[0] - e[1]) / (2 * h)
    jac[..., 1, 0] = (n[0] - n[1]) / (2 * h)
    jac[..., 0, 1] = (e[2] - e[3]) / (2 * h)
    jac[..., 1, 1] = (n[2] - n[3]) / (2 * h)
    return jac


def beam_covariance_pix(wcs: WCS, beam: Beam, x=None, y=None) -> np.ndarray:
    """Beam covariance in pixel^2 at pixel (x, y) (default: the WCS reference pixel).

    Shape (..., 2, 2).

    C_pix = J^-1 C_sky J^-T with J the local Jacobian d(east, north)/d(x, y)
    (:func:`pixel_jacobian`).
    """
    if x is None or y is None:
        x, y = wcs.wcs.crpix[0] - 1.0, wcs.wcs.crpix[1] - 1.0
    jinv = np.linalg.inv(pixel_jacobian(wcs, x, y))
    c_sky = beam_covariance_sky(beam)
    return jinv @ c_sky @ np.swapaxes(jinv, -1, -2)


# --------------------------------------------------------------------------------------------
# Rendering and noise
# --------------------------------------------------------------------------------------------
def render_point_sources(shape, wcs: WCS, beam: Beam, ra_deg, dec_deg, flux_jy) -> np.ndarray:
    """Image (Jy/beam, float64, ``shape = (ny, nx)``) of point sources convolved with the beam.

    Each source is the elliptical Gaussian exp(-d^T C^-1 d / 2) * flux with C the pixel beam
    covariance at the source position (:func:`beam_covariance_pix`), so its peak equals its flux in
    Jy (Jy/beam). Evaluated only in a box of +-5 sigma (marginal sigma along each axis) around each
    source: all stamps are gathered in one array and accumulated with ``np.add.at``. Sources whose
    pixel position is not finite are skipped; stamps are clipped at the image edges.
    """
    ny, nx = int(shape[0]), int(shape[1])
    image = np.zeros((ny, nx))
    ra = np.atleast_1d(np.asarray(ra_deg, dtype=float))
    dec = np.atleast_1d(np.asarray(dec_deg, dtype=float))
    flux = np.broadcast_to(np.asarray(flux_jy, dtype=float), ra.shape)
    if ra.size == 0:
        return image
    x, y = wcs.wcs_world2pix(ra, dec, 0)
    cov = beam_covariance_pix(
        wcs, beam, np.where(np.isfinite(x), x, 0.0), np.where(np.isfinite(y), y, 0.0)
    )
    half_x = STAMP_SIGMA * np.sqrt(cov[:, 0, 0])
    half_y = STAMP_SIGMA * np.sqrt(cov[:, 1, 1])
    keep = np.isfinite(x) & np.isfinite(y) & (flux != 0)
    # Only sources whose stamp overlaps the image contribute.
    keep &= (
        (x + half_x >= -0.5)
        & (x - half_x <= nx - 0.5)
        & (y + half_y >= -0.5)
        & (y - half_y <= ny - 0.5)
    )
    if not keep.any():
        return image
    x, y, flux, cov = x[keep], y[keep], flux[keep], cov[keep]
    half_x, half_y = half_x[keep], half_y[keep]
    # One common stamp size (the largest) keeps the gather rectangular; pixels outside each source's
    # own +-5 sigma box are zeroed, so the result does not depend on the other sources.
    hx = math.ceil(half_x.max())
    hy = math.ceil(half_y.max())
    off_x = np.arange(-hx, hx + 1)
    off_y = np.arange(-hy, hy + 1)
    cx = np.rint(x).astype(np.int64)
    cy = np.rint(y).astype(np.int64)
    px = cx[:, None, None] + off_x[None, None, :]  # (n, 1, sx)
    py = cy[:, None, None] + off_y[None, :, None]  # (n, sy, 1)
    dx = px - x[:, None, None]
    dy = py - y[:, None, None]
    icov = np.linalg.inv(cov)
    q = (
        icov[:, 0, 0, None, None] * dx**2
        + 2 * icov[:, 0, 1, None, None] * dx * dy
        + icov[:, 1, 1, None, None] * dy**2
    )
    val = flux[:, None, None] * np.exp(-0.5 * q)
    inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
    inside = inside & (np.abs(dx) <= half_x[:, None, None]) & (np.abs(dy) <= half_y[:, None, None])
    px_b, py_b = np.broadcast_arrays(px, py)
    np.add.at(image.ravel(), (py_b * nx + px_b)[inside], val[inside])
    return image


def correlated_noise(shape, beam_cov_pix, rms_jyb: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise (Jy/beam) with pixel RMS ``rms_jyb`` and autocorrelation shaped like the beam.

    White noise is convolved (FFT) with a Gaussian kernel of covariance C/2, C = ``beam_cov_pix``
    (2x2, pixel^2): the autocorrelation of that kernel is a Gaussian of covariance C, i.e. the beam,
    so neighbouring pixels at lag d correlate by exp(-d^T C^-1 d / 2). The field is generated on a
    grid padded by 5 sigma and cropped, so the FFT's periodic wrap does not correlate opposite
    edges.
    The result is scaled by the exact expected standard deviation of the filtered field
    (Parseval: var = sum |H|^2 / N), so its expected pixel variance is rms_jyb^2 (not forced per
    realization).
    """
    ny, nx = int(shape[0]), int(shape[1])
    cov = np.asarray(beam_cov_pix, dtype=float)
    pad_x = math.ceil(STAMP_SIGMA * math.sqrt(cov[0, 0]))
    pad_y = math.ceil(STAMP_SIGMA * math.sqrt(cov[1, 1]))
    my, mx = ny + 2 * pad_y, nx + 2 * pad_x
    white = rng.standard_normal((my, mx))
    # Fourier transform of a Gaussian of covariance K = C/2: exp(-2 pi^2 k^T K k),
    # k in cycles/pixel.
    ky = np.fft.fftfreq(my)[:, None]
    kx = np.fft.rfftfreq(mx)[None, :]
    kcov = 0.5 * cov
    transfer = np.exp(
        -2.0 * np.pi**2 * (kcov[0, 0] * kx**2 + 2 * kcov[0, 1] * kx * ky + kcov[1, 1] * ky**2)
    )
    field_ = np.fft.irfft2(np.fft.rfft2(white) * transfer, s=(my, mx))
    # Expected variance of the filtered unit-variance white noise: mean of |H|^2 over the full grid
    # (rfft stores the non-redundant half: columns other than 0 and Nyquist count twice).
    weight = np.full(kx.shape, 2.0)
    weight[0, 0] = 1.0
    if mx % 2 == 0:
        weight[0, -1] = 1.0
    var = float(np.sum(transfer**2 * weight)) / (my * mx)
    return field_[pad_y : pad_y + ny, pad_x : pad_x + nx] * (rms_jyb / math.sqrt(var))


# --------------------------------------------------------------------------------------------
# FITS output
# --------------------------------------------------------------------------------------------
def write_fits_image(
    path,
    data_jyb,
    *,
    ra_deg: float,
    dec_deg: float,
    cell_deg: float,
    beam: Beam,
    date_obs: str,
    freq_hz: float = 1.4e9,
    cube: bool = False,
    extra_header: dict[str, Any] | None = None,
) -> Path:
    """Write a SIN-projection image in Jy/beam (float32) and return its path.

    Header: the WCS of :func:`celestial_header`, BUNIT 'JY/BEAM', BMAJ/BMIN/BPA in degrees,
    DATE-OBS (ISO UTC, as given), MJD-OBS (from DATE-OBS via astropy Time), TIMESYS 'UTC', RESTFRQ.
    ``cube=True`` writes a 4-D CASA-style cube: numpy shape (1, 1, ny, nx), FITS axes
    RA---SIN, DEC--SIN, FREQ (CRVAL3 = freq_hz), STOKES (CRVAL4 = 1, I). ``extra_header`` items are
    set last (they may override). The file is written to a hidden temporary name in the same
    directory and renamed, so a directory watcher never sees a partial ``*.fits`` file.
    """
    path = Path(path)
    data = np.asarray(data_jyb, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"data_jyb must be 2-D (ny, nx), got shape {data.shape}")
    t = Time(date_obs, format="isot", scale="utc")
    hdr = fits.Header()
    hdr.update(celestial_header(ra_deg, dec_deg, cell_deg, data.shape))
    if cube:
        hdr["CTYPE3"] = "FREQ"
        hdr["CRVAL3"] = float(freq_hz)
        hdr["CDELT3"] = 1.0e6
        hdr["CRPIX3"] = 1.0
        hdr["CUNIT3"] = "Hz"
        hdr["CTYPE4"] = "STOKES"
        hdr["CRVAL4"] = 1.0
        hdr["CDELT4"] = 1.0
        hdr["CRPIX4"] = 1.0
        hdr["CUNIT4"] = ""
        data = data[None, None, :, :]
    hdr["BUNIT"] = "JY/BEAM"
    hdr["BMAJ"] = float(beam.major_deg)
    hdr["BMIN"] = float(beam.minor_deg)
    hdr["BPA"] = float(beam.pa_deg)
    hdr["BTYPE"] = "Intensity"
    hdr["DATE-OBS"] = t.isot
    hdr["MJD-OBS"] = float(t.mjd)
    hdr["TIMESYS"] = "UTC"
    hdr["RESTFRQ"] = float(freq_hz)
    hdr["TELESCOP"] = "ESE-SIM"
    hdr["ORIGIN"] = "ese_assets.core.simulate"
    for key, value in (extra_header or {}).items():
        hdr[key] = value
    hdu = fits.PrimaryHDU(data=data, header=hdr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    hdu.writeto(tmp, overwrite=True)
    os.replace(tmp, path)
    return path
