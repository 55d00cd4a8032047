"""Blank (NaN) pixels never make fluxes: forced photometry on images with large blank regions.

Images are written as real FITS files with astropy and read back with the pipeline's reader:
(a) a single-dish-style map (SFL projection, 40 % of the pixels blank in large irregular
unobserved regions), (b) a primary-beam-corrected interferometer image in CASA's 4-D layout,
blank outside a circle, with noise rising towards the edge, (c) close pairs with one member on
blank pixels. Sources are injected with a renderer written here (the beam evaluated in sky
offsets of every pixel, no pixel Jacobian), independent of the simulator and of the code under
test; the blank fraction of each position is computed here too.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from ese_assets import pipeline
from ese_assets.core import photometry as ph
from ese_assets.core import simulate as sim
from ese_assets.core.catalog import load_catalog
from ese_assets.core.detection import DetectionSettings
from ese_assets.core.fits_image import Beam, load_image
from ese_assets.core.quality import (
    DEFAULT_EXCLUDED_FLAGS,
    FLAG_BAD_GAIN,
    FLAG_BLANK,
    FLAG_BLENDED,
    FLAG_EDGE,
    FLAG_NAN,
    MAX_BLANK_FRACTION,
    usable_measurement,
    validate_exclude_flags,
)
from ese_assets.orchestration.resources import resources_from_settings
from ese_assets.settings import Settings
from ese_assets.storage import candidates as candidates_db
from ese_assets.storage import photometry as photometry_db
from ese_assets.storage import statistics as statistics_db

ARCSEC = 1.0 / 3600.0
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
RMS_JYB = 0.049  # the image RMS of the real single-dish map of the issue


# --------------------------------------------------------------------------------------------
# Independent helpers
# --------------------------------------------------------------------------------------------
def _sky_offsets_deg(ra0, dec0, ra, dec):
    """Gnomonic (east, north) offsets in degrees of (ra, dec) about (ra0, dec0)."""
    ra0, dec0, ra, dec = (np.radians(v) for v in (ra0, dec0, ra, dec))
    cosc = np.sin(dec0) * np.sin(dec) + np.cos(dec0) * np.cos(dec) * np.cos(ra - ra0)
    east = np.cos(dec) * np.sin(ra - ra0) / cosc
    north = (np.cos(dec0) * np.sin(dec) - np.sin(dec0) * np.cos(dec) * np.cos(ra - ra0)) / cosc
    return np.degrees(east), np.degrees(north)


def _beam_on_sky(beam, east_deg, north_deg):
    """Elliptical Gaussian beam (peak 1) at sky offsets; BPA east of north."""
    s_maj, s_min = beam.major_deg / FWHM_PER_SIGMA, beam.minor_deg / FWHM_PER_SIGMA
    pa = math.radians(beam.pa_deg)
    along = east_deg * math.sin(pa) + north_deg * math.cos(pa)
    across = east_deg * math.cos(pa) - north_deg * math.sin(pa)
    return np.exp(-0.5 * ((along / s_maj) ** 2 + (across / s_min) ** 2))


def _pixel_sky(wcs, shape):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    ra, dec = wcs.pixel_to_world_values(xx, yy)
    return np.asarray(ra), np.asarray(dec)


def _render(wcs, shape, beam, ra_deg, dec_deg, flux_jy):
    """Point sources: flux x beam evaluated at each pixel's sky offset from each source."""
    pra, pdec = _pixel_sky(wcs, shape)
    img = np.zeros(shape)
    for ra, dec, f in zip(ra_deg, dec_deg, flux_jy, strict=True):
        east, north = _sky_offsets_deg(ra, dec, pra, pdec)
        img += f * _beam_on_sky(beam, east, north)
    return img


def _blank_fraction(wcs, shape, beam, blank, ra_deg, dec_deg, half_pix):
    """sum of K^2 over the blank pixels / over all pixels of the (2h+1)^2 stamp around the
    nearest pixel, with K the beam at the pixel's sky offset; and whether that pixel is blank."""
    x, y = wcs.world_to_pixel_values(ra_deg, dec_deg)
    cx, cy = np.floor(np.asarray(x) + 0.5).astype(int), np.floor(np.asarray(y) + 0.5).astype(int)
    pra, pdec = _pixel_sky(wcs, shape)
    frac = np.empty(cx.size)
    for i in range(cx.size):
        sl = (
            slice(cy[i] - half_pix, cy[i] + half_pix + 1),
            slice(cx[i] - half_pix, cx[i] + half_pix + 1),
        )
        east, north = _sky_offsets_deg(ra_deg[i], dec_deg[i], pra[sl], pdec[sl])
        k2 = _beam_on_sky(beam, east, north) ** 2
        frac[i] = k2[blank[sl]].sum() / k2.sum()
    return frac, blank[cy, cx], cx, cy


def _blank_regions(shape, blank_frac, scale_pix, rng):
    """Large irregular blank regions: white noise smoothed on scale_pix, cut at its quantile."""
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.rfftfreq(shape[1])[None, :]
    smooth = np.fft.irfft2(
        np.fft.rfft2(rng.standard_normal(shape))
        * np.exp(-2.0 * np.pi**2 * scale_pix**2 * (kx**2 + ky**2)),
        s=shape,
    )
    return smooth < np.quantile(smooth, blank_frac)


def _near(mask, radius_pix):
    """True where a True pixel of mask lies within radius_pix (FFT convolution with a disk)."""
    r = math.ceil(radius_pix)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = (np.hypot(xx, yy) <= radius_pix).astype(float)
    size = (mask.shape[0] + 2 * r + 1, mask.shape[1] + 2 * r + 1)
    full = np.fft.irfft2(np.fft.rfft2(mask.astype(float), size) * np.fft.rfft2(disk, size), size)
    return full[r : r + mask.shape[0], r : r + mask.shape[1]] > 0.5


def _pick_separated(xs, ys, min_sep, limit=None, taken=None):
    """Greedy subset of candidate positions at least min_sep apart (and from ``taken``)."""
    kx = [] if taken is None else list(taken[0])
    ky = [] if taken is None else list(taken[1])
    keep = []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if all((x - a) ** 2 + (y - b) ** 2 >= min_sep**2 for a, b in zip(kx, ky, strict=True)):
            keep.append(i)
            kx.append(x)
            ky.append(y)
            if limit is not None and len(keep) == limit:
                break
    return np.array(keep, dtype=int)


def _single_dish_wcs(shape, cell_deg, ra0, dec0):
    """SFL (Sanson-Flamsteed, the GLS of single-dish mapping software) celestial WCS."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---SFL", "DEC--SFL"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [shape[1] / 2 + 0.5, shape[0] / 2 + 0.5]
    w.wcs.cdelt = [-cell_deg, cell_deg]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.radesys = "ICRS"
    w.wcs.set()
    return w


def _write_single_dish_fits(path, data, wcs, beam):
    hdr = wcs.to_header()
    hdr["BUNIT"] = "JY/BEAM"
    hdr["BMAJ"], hdr["BMIN"], hdr["BPA"] = beam.major_deg, beam.minor_deg, beam.pa_deg
    hdr["DATE-OBS"] = "2021-03-04T05:06:07"
    hdr["TELESCOP"] = "SINGLE-DISH"
    fits.PrimaryHDU(data=data.astype(np.float32), header=hdr).writeto(path)
    return path


# --------------------------------------------------------------------------------------------
# (a) single-dish map with 40 % blank pixels in large irregular regions
# --------------------------------------------------------------------------------------------
def test_single_dish_map_with_large_blank_regions(tmp_path):
    shape = (256, 256)
    cell = 90.0 * ARCSEC
    beam = Beam(major_deg=450.0 * ARCSEC, minor_deg=450.0 * ARCSEC, pa_deg=0.0)  # 5 px FWHM
    wcs = _single_dish_wcs(shape, cell, ra0=150.0, dec0=30.0)
    rng = np.random.default_rng(2024)
    blank = _blank_regions(shape, 0.40, 12.0, rng)
    assert 0.39 < blank.mean() < 0.41
    fwhm_pix = beam.major_deg / cell
    half = math.ceil(1.5 * fwhm_pix)  # the documented stamp: 3 beams across
    margin = half + 2
    # Stamp fully observed: no blank pixel within the stamp's half-diagonal.
    well_inside = ~_near(blank, half * math.sqrt(2.0) + 1.0)
    deep_blank = ~_near(~blank, 1.0)  # the pixel and its 4 neighbours blank

    # Sources: well inside observed regions (whole stamp observed), and on blank pixels (some
    # bright: the unobserved part of the sky is not empty, and its wings reach observed pixels).
    cand = rng.uniform(margin, shape[0] - 1 - margin, (4000, 2))
    cxi, cyi = np.floor(cand[:, 0] + 0.5).astype(int), np.floor(cand[:, 1] + 0.5).astype(int)
    inside = well_inside[cyi, cxi]
    on_blank = deep_blank[cyi, cxi]
    sel_in = _pick_separated(cand[inside, 0], cand[inside, 1], 3.0 * fwhm_pix, limit=30)
    src_in = cand[inside][sel_in]
    sel_bl = _pick_separated(
        cand[on_blank, 0],
        cand[on_blank, 1],
        3.0 * fwhm_pix,
        limit=25,
        taken=(src_in[:, 0], src_in[:, 1]),
    )
    src_bl = cand[on_blank][sel_bl]
    assert len(src_in) >= 25 and len(src_bl) >= 20
    flux_in = RMS_JYB * np.exp(rng.uniform(np.log(10.0), np.log(100.0), len(src_in)))
    flux_bl = RMS_JYB * np.exp(rng.uniform(np.log(10.0), np.log(2000.0), len(src_bl)))
    xy_src = np.vstack([src_in, src_bl])
    ra_src, dec_src = wcs.pixel_to_world_values(xy_src[:, 0], xy_src[:, 1])
    flux_src = np.concatenate([flux_in, flux_bl])

    # Empty catalog positions (>= 3 beams from every source), many of them on or near blanks:
    # whatever they return must be consistent with an empty sky.
    empty = rng.uniform(margin, shape[0] - 1 - margin, (3000, 2))
    sel_e = _pick_separated(empty[:, 0], empty[:, 1], 1.6 * fwhm_pix)
    empty = empty[sel_e]
    far = (
        np.min(
            np.hypot(
                empty[:, None, 0] - xy_src[None, :, 0], empty[:, None, 1] - xy_src[None, :, 1]
            ),
            axis=1,
        )
        > 3.0 * fwhm_pix
    )
    empty = empty[far][:400]
    ra_e, dec_e = wcs.pixel_to_world_values(empty[:, 0], empty[:, 1])

    cov = sim.beam_covariance_pix(sim.make_sin_wcs(150.0, 30.0, cell, shape), beam)
    sky = _render(wcs, shape, beam, ra_src, dec_src, flux_src) + sim.correlated_noise(
        shape, cov, RMS_JYB, rng
    )
    sky[blank] = np.nan
    path = _write_single_dish_fits(tmp_path / "sd_map.fits", sky, wcs, beam)

    image = load_image(path)
    ra = np.concatenate([ra_src, ra_e])
    dec = np.concatenate([dec_src, dec_e])
    res = ph.forced_photometry(image.data, image.info.wcs, image.info.beam, ra, dec)
    flag, peak, err = res.quality_flag, res.peak_jyb, res.peak_err_jyb
    frac, centre_blank, _, _ = _blank_fraction(wcs, shape, beam, blank, ra, dec, half)
    n_in, n_src = len(src_in), len(xy_src)
    assert np.all(centre_blank[n_in:n_src]) and not centre_blank[:n_in].any()
    assert centre_blank[n_src:].sum() >= 100 and ((frac > 0) & ~centre_blank)[n_src:].sum() >= 50

    # No position whose own pixel is blank has a flux (before the fix: up to 1e6 x the RMS).
    assert not np.any(np.isfinite(peak[centre_blank]))
    # Every position whose own pixel is blank, or whose beam weight is mostly blank, is flagged
    # blank and has no flux at all (so no finite flux > 5 RMS can exist).
    is_blank = (flag & FLAG_BLANK) != 0
    assert np.all(is_blank[centre_blank])
    assert np.all(is_blank[frac > MAX_BLANK_FRACTION + 0.1])
    assert not np.any(is_blank[~centre_blank & (frac < MAX_BLANK_FRACTION - 0.1)])
    assert np.all(np.isnan(peak[is_blank])) and np.all(np.isnan(err[is_blank]))
    assert np.all((flag[is_blank] & FLAG_NAN) != 0)
    assert not usable_measurement(flag[is_blank]).any()

    # Sources well inside the observed regions: measured within their errors.
    pull = (peak[:n_in] - flux_in) / err[:n_in]
    assert np.all(flag[:n_in] == 0)
    assert np.all(np.abs(pull) < 4.0), pull
    assert abs(pull.mean()) < 3.5 / math.sqrt(n_in) + 0.1
    assert 0.6 < pull.std(ddof=1) < 1.5

    # Empty positions that were measured (some with blank pixels in the stamp): consistent with
    # zero flux, with errors that stay near the local RMS (no division by a vanishing sum K^2).
    measured = np.flatnonzero(~is_blank)[np.flatnonzero(~is_blank) >= n_src]
    assert measured.size >= 100 and np.any((flag[measured] & FLAG_NAN) != 0)
    assert np.all(np.isfinite(peak[measured]))
    assert np.all(np.abs(peak[measured]) < 5.0 * err[measured])
    assert np.all(err[measured] < 2.5 * res.local_rms_jyb[measured])
    finite = np.isfinite(peak)
    assert np.all(
        np.abs(peak[finite][~np.isin(np.flatnonzero(finite), np.arange(n_in))])
        < 5.0 * 1.6 * RMS_JYB
    )


# --------------------------------------------------------------------------------------------
# (b) primary-beam-corrected interferometer image: blank outside a circle, noise rising outwards
# --------------------------------------------------------------------------------------------
def test_interferometer_image_with_blanked_edges(tmp_path):
    shape = (256, 256)
    cell = 3.0 * ARCSEC
    beam = Beam(major_deg=16.0 * ARCSEC, minor_deg=11.0 * ARCSEC, pa_deg=30.0)
    ra0, dec0 = 210.0, 54.0
    wcs = sim.make_sin_wcs(ra0, dec0, cell, shape)
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    r = np.hypot(xx - shape[1] // 2, yy - shape[0] // 2)
    r_edge = 110.0  # CASA blanks where the primary-beam gain < pblimit
    pb = np.exp(
        -0.5 * (r / (r_edge / math.sqrt(2.0 * math.log(1.0 / 0.3)))) ** 2
    )  # 0.3 at the edge
    fwhm_pix = beam.major_deg / cell
    half = math.ceil(1.5 * fwhm_pix)

    # Sources on rings just inside, on and outside the blank edge, plus some in the middle.
    radii = np.array(
        [
            r_edge - 2.5 * fwhm_pix,
            r_edge - 0.8 * fwhm_pix,
            r_edge - 0.3 * fwhm_pix,
            r_edge + 0.3 * fwhm_pix,
            r_edge + 1.0 * fwhm_pix,
        ]
    )
    ang = np.linspace(0, 2 * np.pi, 13, endpoint=False)
    rr = np.repeat(radii, ang.size)
    aa = np.tile(ang, radii.size) + 0.1 * np.repeat(np.arange(radii.size), ang.size)
    xs = shape[1] // 2 + rr * np.cos(aa) + rng.uniform(-0.5, 0.5, rr.size)
    ys = shape[0] // 2 + rr * np.sin(aa) + rng.uniform(-0.5, 0.5, rr.size)
    centre = np.array([shape[1] // 2, shape[0] // 2])
    inner = rng.uniform(-50, 50, (12, 2)) + centre
    keep = _pick_separated(inner[:, 0], inner[:, 1], 4 * fwhm_pix)
    xs = np.concatenate([xs, inner[keep, 0]])
    ys = np.concatenate([ys, inner[keep, 1]])
    ra, dec = wcs.pixel_to_world_values(xs, ys)
    ra, dec = np.asarray(ra), np.asarray(dec)
    rms_centre = 2e-4
    flux = rms_centre * np.exp(rng.uniform(np.log(30.0), np.log(300.0), xs.size))

    cov = sim.beam_covariance_pix(wcs, beam)
    data = (
        _render(wcs, shape, beam, ra, dec, flux)
        + sim.correlated_noise(shape, cov, rms_centre, rng) / pb
    )
    blank = r > r_edge
    data[blank] = np.nan
    path = sim.write_fits_image(
        tmp_path / "field.pbcor.fits",
        data,
        ra_deg=ra0,
        dec_deg=dec0,
        cell_deg=cell,
        beam=beam,
        date_obs="2023-06-01T03:04:05",
        cube=True,
    )
    image = load_image(path)
    assert image.data.shape == shape
    res = ph.forced_photometry(image.data, image.info.wcs, image.info.beam, ra, dec)
    flag, peak, err = res.quality_flag, res.peak_jyb, res.peak_err_jyb
    frac, centre_blank, _, _ = _blank_fraction(wcs, shape, beam, blank, ra, dec, half)
    is_blank = (flag & FLAG_BLANK) != 0

    assert centre_blank.sum() >= 13 and ((frac > 0) & ~centre_blank).sum() >= 26
    assert np.all(is_blank[centre_blank]) and np.all(np.isnan(peak[centre_blank]))
    assert np.all(is_blank[frac > MAX_BLANK_FRACTION + 0.1])
    assert not np.any(is_blank[~centre_blank & (frac < MAX_BLANK_FRACTION - 0.1)])
    assert np.all(np.isnan(peak[is_blank]))
    assert np.all((flag & FLAG_EDGE) == 0)  # the stamps fit in the image: blanks, not edges

    # Sources near the edge with part of their stamp blank, and those in the middle, are measured
    # within their errors (the local RMS follows the rising noise).
    ok = ~is_blank
    assert ok.sum() >= 35 and np.any((flag[ok] & FLAG_NAN) != 0)
    pull = (peak[ok] - flux[ok]) / err[ok]
    assert np.all(np.abs(pull) < 4.5), pull
    assert np.all(usable_measurement(flag[ok]))


# --------------------------------------------------------------------------------------------
# (c) close pairs with one member on blank pixels; degenerate pairs
# --------------------------------------------------------------------------------------------
_SHAPE_C = (160, 160)
_WCS_C = sim.make_sin_wcs(80.0, -45.0, 3.0 * ARCSEC, _SHAPE_C)
_BEAM_C = Beam(18.0 * ARCSEC, 15.0 * ARCSEC, 20.0)  # 6 x 5 pixels; stamp h = 9


def _radec(xs, ys):
    ra, dec = _WCS_C.pixel_to_world_values(np.asarray(xs, float), np.asarray(ys, float))
    return np.asarray(ra), np.asarray(dec)


@pytest.mark.parametrize("blank_from", [82.0, 84.0, 85.0])
def test_blend_with_member_on_blank_pixels(blank_from):
    """A at x = 80, B 5.5 px (~0.9 beam) to its right on a region blank from x = blank_from on.

    B is not measured (blank, NaN) but its flux on the observed pixels is fitted as a nuisance
    amplitude, so A stays unbiased; a fit of A alone is biased by B's wing (the test can fail)."""
    xs, ys = np.array([80.0, 85.5, 40.0]), np.array([80.0, 81.0, 40.0])
    ra, dec = _radec(xs, ys)
    flux = np.array([0.010, 0.050, 0.010])
    rms = 1e-4
    cov = sim.beam_covariance_pix(_WCS_C, _BEAM_C)
    rng = np.random.default_rng(int(blank_from))
    data = _render(_WCS_C, _SHAPE_C, _BEAM_C, ra, dec, flux) + sim.correlated_noise(
        _SHAPE_C, cov, rms, rng
    )
    blank = np.zeros(_SHAPE_C, dtype=bool)
    blank[60:110, int(blank_from) :] = True
    data[blank] = np.nan
    res = ph.forced_photometry(data, _WCS_C, _BEAM_C, ra, dec)
    flag, peak, err = res.quality_flag, res.peak_jyb, res.peak_err_jyb
    assert flag[1] == FLAG_NAN | FLAG_BLENDED | FLAG_BLANK
    assert np.isnan(peak[1]) and np.isnan(err[1])
    assert flag[0] & FLAG_BLENDED and not flag[0] & FLAG_BLANK
    assert abs(peak[0] - flux[0]) < 4.0 * err[0], (peak[0], err[0])
    assert err[0] < 10.0 * rms  # the nuisance amplitude costs precision, within reason
    assert abs(peak[2] - flux[2]) < 4.0 * err[2] and flag[2] == 0
    alone = ph.forced_photometry(data, _WCS_C, _BEAM_C, ra[:1], dec[:1])
    assert alone.quality_flag[0] & FLAG_BLENDED == 0
    assert abs(alone.peak_jyb[0] - flux[0]) > 10.0 * alone.peak_err_jyb[0]


def test_blend_member_with_far_wing_pixels_only():
    """B sits deep in a blank region; only its far wing (K_B < 0.1) beside A is observed. B is a
    nuisance amplitude that absorbs those few pixels: never reported, and A stays unbiased."""
    xs, ys = np.array([80.0, 88.5]), np.array([80.0, 80.0])
    ra, dec = _radec(xs, ys)
    flux = np.array([0.02, 0.5])  # B is bright: 25 x A, 5000 x the noise
    rms = 1e-4
    rng = np.random.default_rng(11)
    data = _render(_WCS_C, _SHAPE_C, _BEAM_C, ra, dec, flux)
    data += sim.correlated_noise(_SHAPE_C, sim.beam_covariance_pix(_WCS_C, _BEAM_C), rms, rng)
    data[:, 84:] = np.nan
    res = ph.forced_photometry(data, _WCS_C, _BEAM_C, ra, dec)
    assert res.quality_flag[1] == FLAG_NAN | FLAG_BLENDED | FLAG_BLANK and np.isnan(res.peak_jyb[1])
    assert res.quality_flag[0] == FLAG_NAN | FLAG_BLENDED
    assert abs(res.peak_jyb[0] - flux[0]) < 4.0 * res.peak_err_jyb[0]
    alone = ph.forced_photometry(data, _WCS_C, _BEAM_C, ra[:1], dec[:1])
    assert alone.peak_jyb[0] - flux[0] > 10.0 * alone.peak_err_jyb[0]  # B's wing, unmodelled


def test_degenerate_blend_drops_the_blank_member():
    """A and B 0.02 px apart (cond(A_s) ~ 1e5), B's own pixel blank: the system is solved again
    without B, so A (which then carries both fluxes) is measured and B is not."""
    xs, ys = np.array([80.49, 80.51]), np.array([80.0, 80.0])
    ra, dec = _radec(xs, ys)
    data = _render(_WCS_C, _SHAPE_C, _BEAM_C, ra, dec, [0.01, 0.01])
    data += np.random.default_rng(12).normal(0.0, 1e-6, _SHAPE_C)
    data[80, 81] = np.nan  # B's nearest pixel
    res = ph.forced_photometry(data, _WCS_C, _BEAM_C, ra, dec)
    assert res.quality_flag[1] == FLAG_NAN | FLAG_BLENDED | FLAG_BLANK and np.isnan(res.peak_jyb[1])
    assert res.quality_flag[0] == FLAG_NAN | FLAG_BLENDED
    assert res.peak_jyb[0] == pytest.approx(0.02, rel=1e-3)


def test_degenerate_pair_gives_no_flux_instead_of_a_huge_one():
    """Two catalog entries at (almost) the same position cannot be separated: cond(A_s) ~ 1e8;
    both get NaN rather than amplitudes of +-10^4 times the noise."""
    xs, ys = np.array([80.0, 80.001, 40.0]), np.array([80.0, 80.0, 40.0])
    ra, dec = _radec(xs, ys)
    data = sim.render_point_sources(
        _SHAPE_C, _WCS_C, _BEAM_C, ra[[0, 2]], dec[[0, 2]], [0.02, 0.01]
    )
    data += sim.correlated_noise(
        _SHAPE_C, sim.beam_covariance_pix(_WCS_C, _BEAM_C), 1e-3, np.random.default_rng(5)
    )
    res = ph.forced_photometry(data, _WCS_C, _BEAM_C, ra, dec)
    assert np.all(res.quality_flag[:2] & FLAG_BLENDED)
    assert np.all(np.isnan(res.peak_jyb[:2])) and np.all(np.isnan(res.peak_err_jyb[:2]))
    assert abs(res.peak_jyb[2] - 0.01) < 4.0 * res.peak_err_jyb[2]
    # A resolvable pair (0.5 beam apart) is still solved, with honest errors.
    xs2 = np.array([80.0, 83.0])
    ra2, dec2 = _radec(xs2, ys[:2])
    data2 = sim.render_point_sources(_SHAPE_C, _WCS_C, _BEAM_C, ra2, dec2, [0.02, 0.01])
    data2 += np.random.default_rng(6).normal(0.0, 1e-6, _SHAPE_C)
    res2 = ph.forced_photometry(data2, _WCS_C, _BEAM_C, ra2, dec2)
    np.testing.assert_allclose(res2.peak_jyb, [0.02, 0.01], rtol=1e-3)


# --------------------------------------------------------------------------------------------
# The usability rule
# --------------------------------------------------------------------------------------------
def test_usable_measurement_rule():
    flags = np.array(
        [
            0,
            FLAG_EDGE,
            FLAG_NAN,
            FLAG_BLENDED,
            FLAG_BLANK | FLAG_NAN,
            FLAG_NAN | FLAG_BLENDED,
            FLAG_BLANK | FLAG_BLENDED | FLAG_NAN,
        ]
    )
    assert DEFAULT_EXCLUDED_FLAGS == FLAG_EDGE | FLAG_BLANK | FLAG_BAD_GAIN
    np.testing.assert_array_equal(usable_measurement(flags), [1, 0, 1, 1, 0, 1, 0])
    np.testing.assert_array_equal(
        usable_measurement(flags, FLAG_BLANK | FLAG_BLENDED), [1, 1, 1, 0, 0, 0, 0]
    )
    np.testing.assert_array_equal(usable_measurement(flags, 0), [1] * 7)
    assert usable_measurement(0) is True and usable_measurement(FLAG_BLANK) is False
    assert validate_exclude_flags(9) == 9
    for bad in (-1, 32, 63):
        with pytest.raises(ValueError, match="quality bits"):
            validate_exclude_flags(bad)


# --------------------------------------------------------------------------------------------
# Downstream: a blank epoch never reaches statistics or detection (real pipeline, both backends)
# --------------------------------------------------------------------------------------------
_N_NIGHTS = 31
_BLANK_NIGHT = 15
_FIELD = dict(ra_deg=150.0, dec_deg=20.0, cell_deg=3.0 * ARCSEC)
_FIELD_SHAPE = (96, 96)
_FIELD_BEAM = Beam(15.0 * ARCSEC, 12.0 * ARCSEC, 30.0)
_SOURCES_XY = {"SRC_ON_BLANK": (48.3, 47.6), "SRC_A": (20.2, 70.9), "SRC_B": (74.6, 24.1)}
_FLUX_MJY = 50.0
_RMS_MJY = 1.0
_BLANK_RADIUS_PIX = 7.0  # only the stamp's corners stay observed


def _write_field(directory):
    """31 nightly images of three steady 50 mJy sources; on night 15 the sky around SRC_ON_BLANK
    was not observed (NaN disc). Returns (catalog path, image paths, wing-only flux of the blank
    epoch in Jy: what a fit of the remaining beam wings gives)."""
    wcs = sim.make_sin_wcs(_FIELD["ra_deg"], _FIELD["dec_deg"], _FIELD["cell_deg"], _FIELD_SHAPE)
    xs, ys = np.array(list(_SOURCES_XY.values())).T
    ra, dec = wcs.pixel_to_world_values(xs, ys)
    ra, dec = np.asarray(ra), np.asarray(dec)
    catalog = directory / "catalog.csv"
    catalog.write_text(
        "name,ra_deg,dec_deg,flux_mjy\n"
        + "".join(
            f"{n},{r:.8f},{d:.8f},{_FLUX_MJY}\n"
            for n, r, d in zip(_SOURCES_XY, ra, dec, strict=True)
        )
    )
    sky = _render(wcs, _FIELD_SHAPE, _FIELD_BEAM, ra, dec, np.full(3, _FLUX_MJY * 1e-3))
    cov = sim.beam_covariance_pix(wcs, _FIELD_BEAM)
    rng = np.random.default_rng(31)
    yy, xx = np.mgrid[0 : _FIELD_SHAPE[0], 0 : _FIELD_SHAPE[1]]
    hole = np.hypot(xx - xs[0], yy - ys[0]) < _BLANK_RADIUS_PIX
    paths, wing_flux = [], None
    (directory / "images").mkdir()
    for night in range(_N_NIGHTS):
        data = sky + sim.correlated_noise(_FIELD_SHAPE, cov, _RMS_MJY * 1e-3, rng)
        if night == _BLANK_NIGHT:
            data[hole] = np.nan
            # The naive estimate over the unblanked stamp pixels (the bug this guards against).
            h = math.ceil(1.5 * _FIELD_BEAM.major_deg / _FIELD["cell_deg"])
            cx, cy = math.floor(xs[0] + 0.5), math.floor(ys[0] + 0.5)
            sl = (slice(cy - h, cy + h + 1), slice(cx - h, cx + h + 1))
            pra, pdec = _pixel_sky(wcs, _FIELD_SHAPE)
            k = _beam_on_sky(_FIELD_BEAM, *_sky_offsets_deg(ra[0], dec[0], pra[sl], pdec[sl]))
            ok = np.isfinite(data[sl])
            wing_flux = float(np.sum(data[sl][ok] * k[ok]) / np.sum(k[ok] ** 2))
        paths.append(
            sim.write_fits_image(
                directory / "images" / f"field_{night:02d}.fits",
                data,
                **_FIELD,
                beam=_FIELD_BEAM,
                date_obs=f"2023-03-{night + 1:02d}T06:00:00",
            )
        )
    return catalog, paths, wing_flux


def _stats_of(engine, source_id):
    return statistics_db.variability_stats(engine, [source_id]).iloc[0]


def test_blank_epoch_never_reaches_statistics_or_detection(engine, tmp_path):
    catalog_path, paths, wing_flux_jy = _write_field(tmp_path)
    catalog = load_catalog(catalog_path)
    scan = pipeline.scan_directory(
        engine, tmp_path / "images", timezone="UTC", first_night="2020-01-01"
    )
    assert len(scan.registered) == _N_NIGHTS and not scan.rejected, scan
    results = pipeline.measure_images(engine, catalog, scan.registered)
    assert [r.status for r in results] == ["measured"] * _N_NIGHTS
    nights = [f"2023-03-{n + 1:02d}" for n in range(_N_NIGHTS)]
    # the seed rule at its conservative preset (sigma_deviation >= 5), which one bad epoch fires
    settings = DetectionSettings(use_sigma_rule=True)
    for night in nights:
        pipeline.update_variability(engine, [night], flux_scale_error=0.02)
    src = "SRC_ON_BLANK"
    blank_image = str(paths[_BLANK_NIGHT].resolve())

    # 1. The blank position is not a measurement: no row, 30 epochs, a clean lightcurve.
    rows = photometry_db.lightcurves(engine, [src])
    assert len(rows) == _N_NIGHTS - 1 and blank_image not in set(rows["image_path"])
    clean = _stats_of(engine, src)
    assert clean["n_obs"] == _N_NIGHTS - 1 and clean["sigma_deviation"] < 4.0
    pipeline.detect_candidates(engine, settings, night=nights[-1])
    assert candidates_db.candidates(engine).empty

    # 2. A row for it stored with its blank flag and the flux the wings give (as the estimator
    # did before: far from the truth) is honoured: not read by the sums, the dip window or the
    # consistency checks, on the nightly path and on the rebuild.
    assert abs(wing_flux_jy * 1e3 - _FLUX_MJY) > 10 * _RMS_MJY, wing_flux_jy
    image_rows = photometry_db.lightcurves(engine)
    image_rows = image_rows[image_rows["image_path"] == blank_image].drop(columns=["image_path"])
    src_row = (
        rows.iloc[[0]]
        .drop(columns=["image_path"])
        .assign(
            mjd=image_rows["mjd"].iloc[0],
            peak_jyb=wing_flux_jy,
            peak_err_jyb=1.5e-3,
            quality_flag=FLAG_BLANK | FLAG_NAN,
        )
    )
    photometry_db.replace_image_photometry(
        engine, blank_image, pd.concat([image_rows, src_row], ignore_index=True)
    )
    assert len(photometry_db.lightcurves(engine, [src])) == _N_NIGHTS
    pipeline.update_variability(engine, [nights[_BLANK_NIGHT]], flux_scale_error=0.02)
    after = _stats_of(engine, src)
    for col in (
        "n_obs",
        "mean_flux_mjy",
        "std_flux_mjy",
        "sigma_deviation",
        "chi2_nu",
        "median_flux_mjy",
        "dip_significance",
        "min_flux_mjy",
        "max_flux_mjy",
    ):
        assert after[col] == pytest.approx(clean[col], rel=1e-9), col
    assert statistics_db.night_stats_mismatches(engine, nights) == 0
    assert statistics_db.stats_photometry_mismatches(engine, list(_SOURCES_XY)) == 0
    pipeline.detect_candidates(engine, settings, night=nights[-1])
    assert candidates_db.candidates(engine).empty
    pipeline.recompute_variability(engine, flux_scale_error=0.02)
    assert _stats_of(engine, src)["sigma_deviation"] == pytest.approx(clean["sigma_deviation"])
    reference = pipeline.stats_from_lightcurves(
        photometry_db.lightcurves(engine, [src]), flux_scale_error=0.02
    )
    assert reference["sigma_deviation"].iloc[0] == pytest.approx(clean["sigma_deviation"])

    # 3. The exclusion is what protects: with no bit excluded the same row enters the statistics,
    # sigma_deviation reaches its bound (N-1)/sqrt(N) and a candidate appears.
    pipeline.recompute_variability(engine, flux_scale_error=0.02, exclude_flags=0)
    polluted = _stats_of(engine, src)
    assert polluted["n_obs"] == _N_NIGHTS
    assert polluted["sigma_deviation"] > 5.0
    assert statistics_db.stats_photometry_mismatches(engine, [src], exclude_flags=0) == 0
    assert statistics_db.stats_photometry_mismatches(engine, [src]) == 1
    pipeline.detect_candidates(engine, settings, night=nights[-1])
    assert list(candidates_db.candidates(engine)["source_id"]) == [src]


def test_exclude_flags_setting(monkeypatch):
    monkeypatch.delenv("ESE_EXCLUDE_FLAGS", raising=False)
    assert Settings.from_env().exclude_flags == DEFAULT_EXCLUDED_FLAGS
    monkeypatch.setenv("ESE_EXCLUDE_FLAGS", str(FLAG_EDGE | FLAG_BLANK | FLAG_BLENDED))
    settings = Settings.from_env()
    assert settings.exclude_flags == 13
    assert resources_from_settings(settings, bind_env=False)["detection"].exclude_flags == 13
    for bad in ("32", "-1", "2.5", "blank"):
        monkeypatch.setenv("ESE_EXCLUDE_FLAGS", bad)
        with pytest.raises(ValueError, match="ESE_EXCLUDE_FLAGS"):
            Settings.from_env()
