"""Tests of ese_assets.core.photometry: geometry, unbiasedness, honest errors, flags, background.

Statistical tests use fixed seeds and tolerances set from the sample size (about 3.5 standard
errors): with N pulls the mean has standard error 1/sqrt(N) and the standard deviation
1/sqrt(2N).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.wcs import WCS

from ese_assets.core import photometry as ph
from ese_assets.core import simulate as sim
from ese_assets.core.fits_image import Beam
from ese_assets.core.photometry import FLAG_BLANK, FLAG_BLENDED, FLAG_EDGE, FLAG_NAN

ARCSEC = 1.0 / 3600.0


# --------------------------------------------------------------------------------------------
# Private helpers (independent of the code under test)
# --------------------------------------------------------------------------------------------
def _sin_wcs(ra_deg, dec_deg, cell_deg, shape, rot_deg=0.0, aspect=1.0) -> WCS:
    """SIN WCS with RA to the left (CDELT1 < 0), optional sky rotation (PC), non-square pixels."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---SIN", "DEC--SIN"]
    w.wcs.crval = [ra_deg % 360.0, dec_deg]
    w.wcs.crpix = [shape[1] / 2 + 0.5, shape[0] / 2 + 0.5]
    w.wcs.cdelt = [-cell_deg, cell_deg * aspect]
    c, s = math.cos(math.radians(rot_deg)), math.sin(math.radians(rot_deg))
    w.wcs.pc = [[c, -s], [s, c]]
    w.wcs.set()
    return w


def _render_on_sky(shape, wcs, beam, ra_deg, dec_deg, flux_jy) -> np.ndarray:
    """Point sources rendered by evaluating the beam in *sky* offsets of every pixel (gnomonic
    east/north offsets about each source), i.e. without any pixel Jacobian: an independent check
    of the Jacobian, the PA convention and the RA flip of the code under test."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    pra, pdec = wcs.pixel_to_world_values(xx.ravel(), yy.ravel())
    pra, pdec = np.radians(pra), np.radians(pdec)
    s_maj, s_min = beam.major_deg / ph.FWHM_PER_SIGMA, beam.minor_deg / ph.FWHM_PER_SIGMA
    pa = math.radians(beam.pa_deg)
    img = np.zeros(ny * nx)
    for ra, dec, f in zip(np.radians(ra_deg), np.radians(dec_deg), flux_jy, strict=True):
        cosc = np.sin(dec) * np.sin(pdec) + np.cos(dec) * np.cos(pdec) * np.cos(pra - ra)
        east = np.degrees(np.cos(pdec) * np.sin(pra - ra) / cosc)
        north = np.degrees(
            (np.cos(dec) * np.sin(pdec) - np.sin(dec) * np.cos(pdec) * np.cos(pra - ra)) / cosc
        )
        along = east * math.sin(pa) + north * math.cos(pa)  # along the major axis
        across = east * math.cos(pa) - north * math.sin(pa)
        img += f * np.exp(-0.5 * ((along / s_maj) ** 2 + (across / s_min) ** 2))
    return img.reshape(shape)


def _grid_sources(wcs, shape, spacing_pix, margin_pix, rng, jitter_pix=None):
    """Sky positions on a jittered pixel grid (sub-pixel positions, well separated)."""
    ny, nx = shape
    gx = np.arange(margin_pix, nx - margin_pix + 1e-9, spacing_pix)
    gy = np.arange(margin_pix, ny - margin_pix + 1e-9, spacing_pix)
    xs, ys = np.meshgrid(gx, gy)
    jitter = spacing_pix / 8 if jitter_pix is None else jitter_pix
    xs = xs.ravel() + rng.uniform(-jitter, jitter, xs.size)
    ys = ys.ravel() + rng.uniform(-jitter, jitter, ys.size)
    ra, dec = wcs.pixel_to_world_values(xs, ys)
    return np.asarray(ra), np.asarray(dec), xs, ys


def _pulls(shape, wcs, beam, noise_fn, n_real, seed, noise_correlation, n_src=200):
    """Pulls (F - F_true)/sigma over n_real images of ~n_src sources at 2-50 sigma."""
    rng = np.random.default_rng(seed)
    rms = 1e-3
    pulls = []
    for _ in range(n_real):
        ra, dec, _, _ = _grid_sources(wcs, shape, 32, 24, rng)
        keep = rng.permutation(ra.size)[:n_src]
        ra, dec = ra[keep], dec[keep]
        flux = rms * np.exp(rng.uniform(np.log(2.0), np.log(50.0), ra.size))
        img = sim.render_point_sources(shape, wcs, beam, ra, dec, flux) + noise_fn(rng, rms)
        res = ph.forced_photometry(img, wcs, beam, ra, dec, noise_correlation=noise_correlation)
        assert np.all(res.quality_flag == 0)
        pulls.append((res.peak_jyb - flux) / res.peak_err_jyb)
    return np.concatenate(pulls)


def _assert_pulls_ok(pulls):
    n = pulls.size
    mean_tol = 3.5 / math.sqrt(n)
    std_tol = 3.5 / math.sqrt(2 * n)
    assert np.all(np.isfinite(pulls))
    assert abs(pulls.mean()) < max(mean_tol, 0.05), pulls.mean()
    assert abs(pulls.std(ddof=1) - 1.0) < max(std_tol, 0.05), pulls.std(ddof=1)


# --------------------------------------------------------------------------------------------
# (a) geometry: noiseless sources on a SIN WCS with an elliptical rotated beam
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "renderer,wcs_kw",
    [
        ("sky", dict(rot_deg=0.0, aspect=1.0)),
        ("sky", dict(rot_deg=23.0, aspect=1.0)),
        ("sky", dict(rot_deg=-40.0, aspect=1.3)),
        ("simulator", dict(rot_deg=0.0, aspect=1.0)),
    ],
)
def test_noiseless_subpixel_recovery_elliptical_rotated_beam(renderer, wcs_kw):
    shape = (200, 240)
    # Field centre near RA = 0 so the sources straddle the 0/360 wrap; high declination.
    wcs = _sin_wcs(0.02, 62.0, 2.0 * ARCSEC, shape, **wcs_kw)
    beam = Beam(major_deg=15.0 * ARCSEC, minor_deg=7.0 * ARCSEC, pa_deg=35.0)
    rng = np.random.default_rng(7)
    ra, dec, xs, ys = _grid_sources(wcs, shape, 36, 20, rng, jitter_pix=3.0)
    assert np.any(ra > 359.0) and np.any(ra < 1.0)
    flux = rng.uniform(0.005, 0.2, ra.size)
    if renderer == "sky":
        img = _render_on_sky(shape, wcs, beam, ra, dec, flux)
    else:
        img = sim.render_point_sources(shape, wcs, beam, ra, dec, flux)
    res = ph.forced_photometry(img, wcs, beam, ra, dec)
    assert len(res) == ra.size
    np.testing.assert_allclose(res.x_pix, xs, atol=1e-6)
    np.testing.assert_allclose(res.y_pix, ys, atol=1e-6)
    assert np.all(res.quality_flag == 0)
    rel = res.peak_jyb / flux - 1.0
    assert np.max(np.abs(rel)) < 0.005, rel

    # The test can fail: the beam turned by 90 degrees (or PA measured the wrong way) is far off.
    for wrong in (
        Beam(beam.major_deg, beam.minor_deg, beam.pa_deg + 90.0),
        Beam(beam.major_deg, beam.minor_deg, -beam.pa_deg),
    ):
        bad = ph.forced_photometry(img, wcs, wrong, ra, dec)
        assert np.median(np.abs(bad.peak_jyb / flux - 1.0)) > 0.05


def test_beam_covariance_matches_simulator_jacobian():
    shape = (128, 128)
    wcs = _sin_wcs(210.0, -30.0, 3.0 * ARCSEC, shape, rot_deg=30.0, aspect=1.2)
    beam = Beam(20.0 * ARCSEC, 9.0 * ARCSEC, -50.0)
    xs = np.array([5.0, 64.3, 120.7])
    ys = np.array([7.0, 63.9, 100.2])
    ra, dec = wcs.pixel_to_world_values(xs, ys)
    mine = ph.beam_covariance_pixels(wcs, beam, ra, dec)
    theirs = sim.beam_covariance_pix(wcs, beam, xs, ys)
    np.testing.assert_allclose(mine, theirs, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Noise factor
# --------------------------------------------------------------------------------------------
def test_correlated_noise_factor_matches_brute_force_and_limit():
    cov = np.array([[3.0, 0.8], [0.8, 1.6]])  # elliptical, tilted, FWHM ~3-4.5 px
    icov = np.linalg.inv(cov)
    h = 6
    off = np.arange(-h, h + 1, dtype=float)
    xx, yy = np.meshgrid(off, off)
    p = np.stack([xx.ravel(), yy.ravel()], axis=1)
    quads, dens = [], []
    for sx, sy in [(0, 0), (0.5, 0), (0, 0.5), (0.5, 0.5)]:
        d = p - [sx, sy]
        k = np.exp(-0.5 * np.einsum("ni,ij,nj->n", d, icov, d))
        lag = p[:, None, :] - p[None, :, :]  # O(S^4) pair sum, fine for a 13x13 stamp
        rho = np.exp(-0.5 * np.einsum("abi,ij,abj->ab", lag, icov, lag))
        quads.append(k @ rho @ k)
        dens.append(np.sum(k * k))
    brute = math.sqrt(np.mean(np.array(quads) / np.array(dens) ** 2))
    assert ph.correlated_noise_factor(cov, h, "beam") == pytest.approx(brute, rel=1e-10)
    assert ph.correlated_noise_factor(cov, h, "none") == pytest.approx(
        math.sqrt(np.mean(1.0 / np.array(dens))), rel=1e-10
    )
    # Well-sampled limit 2/sqrt(3), with a 3-beam stamp and with a large one.
    big = np.diag([(8.0 / ph.FWHM_PER_SIGMA) ** 2] * 2)
    assert ph.correlated_noise_factor(big, 12, "beam") == pytest.approx(2 / math.sqrt(3), rel=1e-3)
    assert ph.correlated_noise_factor(big, 40, "beam") == pytest.approx(2 / math.sqrt(3), rel=1e-6)


# --------------------------------------------------------------------------------------------
# (b) and (c): unbiasedness and honest errors
# --------------------------------------------------------------------------------------------
_SHAPE_STAT = (512, 512)
_WCS_STAT = sim.make_sin_wcs(150.0, 35.0, 3.0 * ARCSEC, _SHAPE_STAT)
_BEAM_STAT = Beam(15.0 * ARCSEC, 10.0 * ARCSEC, 30.0)  # 5 x 3.3 pixels


def test_pulls_beam_correlated_noise():
    cov = sim.beam_covariance_pix(_WCS_STAT, _BEAM_STAT)

    def noise(rng, rms):
        return sim.correlated_noise(_SHAPE_STAT, cov, rms, rng)

    pulls = _pulls(_SHAPE_STAT, _WCS_STAT, _BEAM_STAT, noise, 5, 11, "beam")
    assert pulls.size == 1000
    _assert_pulls_ok(pulls)
    # The white-noise error would be far too small for this noise (the test discriminates).
    white = _pulls(_SHAPE_STAT, _WCS_STAT, _BEAM_STAT, noise, 1, 12, "none")
    assert white.std() > 2.0


def test_pulls_white_noise():
    def noise(rng, rms):
        return rng.normal(0.0, rms, _SHAPE_STAT)

    pulls = _pulls(_SHAPE_STAT, _WCS_STAT, _BEAM_STAT, noise, 5, 21, "none")
    _assert_pulls_ok(pulls)
    # ... and the correlated-noise error would be too large for white noise.
    beam_model = _pulls(_SHAPE_STAT, _WCS_STAT, _BEAM_STAT, noise, 1, 22, "beam")
    assert beam_model.std() < 0.6


def test_flux_scale_error_added_in_quadrature():
    shape = (128, 128)
    wcs = sim.make_sin_wcs(10.0, 20.0, 3.0 * ARCSEC, shape)
    beam = Beam(15.0 * ARCSEC, 15.0 * ARCSEC, 0.0)
    ra, dec = wcs.pixel_to_world_values(np.array([40.2, 90.7]), np.array([50.5, 80.1]))
    img = sim.render_point_sources(shape, wcs, beam, ra, dec, [0.1, 0.02])
    img += np.random.default_rng(3).normal(0, 1e-3, shape)
    a = ph.forced_photometry(img, wcs, beam, ra, dec)
    b = ph.forced_photometry(img, wcs, beam, ra, dec, flux_scale_error=0.05)
    np.testing.assert_allclose(b.peak_jyb, a.peak_jyb)
    np.testing.assert_allclose(b.peak_err_jyb, np.hypot(a.peak_err_jyb, 0.05 * a.peak_jyb))


# --------------------------------------------------------------------------------------------
# (d) flags
# --------------------------------------------------------------------------------------------
_SHAPE_F = (160, 160)
_WCS_F = sim.make_sin_wcs(80.0, -45.0, 3.0 * ARCSEC, _SHAPE_F)
_BEAM_F = Beam(18.0 * ARCSEC, 12.0 * ARCSEC, 60.0)  # 6 x 4 pixels; stamp h = 9


def _radec(xs, ys):
    ra, dec = _WCS_F.pixel_to_world_values(np.asarray(xs, float), np.asarray(ys, float))
    return np.asarray(ra), np.asarray(dec)


def test_edge_and_off_image_flags():
    ra, dec = _radec([3.2, 40.3, 156.0, 80.0, -30.0], [80.0, 40.7, 100.0, 152.5, 80.0])
    img = sim.render_point_sources(_SHAPE_F, _WCS_F, _BEAM_F, ra, dec, 0.01)
    # plus a NaN position and the antipode of the field (not on the SIN hemisphere)
    ra = np.append(ra, [np.nan, 260.0])
    dec = np.append(dec, [10.0, 45.0])
    res = ph.forced_photometry(img, _WCS_F, _BEAM_F, ra, dec)
    edge = np.array([True, False, True, True, True, True, True])
    assert np.array_equal((res.quality_flag & FLAG_EDGE) != 0, edge)
    assert np.all(np.isnan(res.peak_jyb[edge])) and np.all(np.isnan(res.peak_err_jyb[edge]))
    assert res.peak_jyb[1] == pytest.approx(0.01, rel=1e-6)
    assert np.isnan(res.background_jyb[4]) and np.isfinite(res.background_jyb[0])


def _brute_force_factor(img, x, y, ra, dec):
    """sqrt(sum_ij K_i K_j rho_ij) / sum K_i^2 over the finite pixels of the stamp, O(S^4)."""
    h = math.ceil(1.5 * _BEAM_F.major_deg / (3.0 * ARCSEC))
    cx, cy = math.floor(x + 0.5), math.floor(y + 0.5)
    yy, xx = np.mgrid[cy - h : cy + h + 1, cx - h : cx + h + 1]
    ok = np.isfinite(img[yy, xx])
    p = np.stack([xx[ok], yy[ok]], axis=1).astype(float)
    icov_src = np.linalg.inv(ph.beam_covariance_pixels(_WCS_F, _BEAM_F, ra, dec)[0])
    icov_noise = np.linalg.inv(sim.beam_covariance_pix(_WCS_F, _BEAM_F))
    d = p - [x, y]
    k = np.exp(-0.5 * np.einsum("ni,ij,nj->n", d, icov_src, d))
    lag = p[:, None, :] - p[None, :, :]
    rho = np.exp(-0.5 * np.einsum("abi,ij,abj->ab", lag, icov_noise, lag))
    return math.sqrt(k @ rho @ k) / np.sum(k * k)


def test_nan_pixels_and_all_nan_stamp():
    xs, ys = [40.3, 110.6, 40.0], [40.2, 50.4, 120.0]
    ra, dec = _radec(xs, ys)
    flux = np.array([0.02, 0.03, 0.04])
    clean = sim.render_point_sources(_SHAPE_F, _WCS_F, _BEAM_F, ra, dec, flux)
    clean += np.random.default_rng(4).normal(0.0, 1e-5, _SHAPE_F)  # so that the RMS is not zero
    img = clean.copy()
    img[38:41, 43:46] = np.nan  # a few blanked pixels beside source 0
    img[120 - 12 : 120 + 13, 40 - 12 : 40 + 13] = np.nan  # source 2 entirely blanked
    ref = ph.forced_photometry(clean, _WCS_F, _BEAM_F, ra, dec)
    for model in ("beam", "none"):
        res = ph.forced_photometry(img, _WCS_F, _BEAM_F, ra, dec, noise_correlation=model)
        ref_m = ph.forced_photometry(clean, _WCS_F, _BEAM_F, ra, dec, noise_correlation=model)
        assert list(res.quality_flag) == [FLAG_NAN, 0, FLAG_NAN | FLAG_BLANK]
        assert res.peak_jyb[0] == pytest.approx(0.02, rel=3e-3)  # still unbiased (err ~1e-5)
        ratio = res.peak_err_jyb[0] / res.local_rms_jyb[0]
        if model == "none":
            # White noise: fewer pixels -> larger error (per unit RMS: the blanks move the mesh).
            assert ratio > 1.005 * ref_m.peak_err_jyb[0] / ref_m.local_rms_jyb[0]
        else:
            # Correlated noise: the exact eq. (1) over the unblanked pixels (brute-force pair sum).
            # (It can be *smaller* than 2/sqrt(3): the peak pixel alone has error = rms.)
            assert ratio == pytest.approx(
                _brute_force_factor(img, xs[0], ys[0], ra[0], dec[0]), rel=1e-4
            )
        assert res.peak_jyb[1] == pytest.approx(ref.peak_jyb[1], rel=1e-5)  # (mesh moved)
        assert np.isnan(res.peak_jyb[2]) and np.isnan(res.peak_err_jyb[2])


def test_blended_pair_joint_fit_noiseless():
    # Separation 1.0 and 1.3 beam majors (6 px), a triple, and an isolated source.
    xs = np.array([50.0, 55.3, 100.2, 103.1, 106.9, 60.5, 120.0])
    ys = np.array([50.0, 52.9, 100.4, 104.2, 101.0, 120.0, 30.0])
    ra, dec = _radec(xs, ys)
    flux = np.array([0.05, 0.01, 0.02, 0.03, 0.015, 0.02, 0.01])
    img = sim.render_point_sources(_SHAPE_F, _WCS_F, _BEAM_F, ra, dec, flux)
    img += np.random.default_rng(2).normal(0.0, 1e-7, _SHAPE_F)  # tiny noise: a non-zero RMS
    res = ph.forced_photometry(img, _WCS_F, _BEAM_F, ra, dec)
    blended = np.array([1, 1, 1, 1, 1, 0, 0], bool)
    assert np.array_equal((res.quality_flag & FLAG_BLENDED) != 0, blended)
    np.testing.assert_allclose(res.peak_jyb, flux, rtol=1e-4)
    # Without the joint fit the faint neighbour would be badly biased.
    alone = ph.forced_photometry(img, _WCS_F, _BEAM_F, ra[1:2], dec[1:2])
    assert alone.quality_flag[0] == 0 and alone.peak_jyb[0] > 1.2 * flux[1]
    # Correlated-noise errors of the pair (0, 1): brute force A^-1 B A^-1 over the union of stamps.
    h = math.ceil(1.5 * _BEAM_F.major_deg / (3.0 * ARCSEC))
    cx, cy = np.floor(xs[:2] + 0.5).astype(int), np.floor(ys[:2] + 0.5).astype(int)
    yy, xx = np.mgrid[0 : _SHAPE_F[0], 0 : _SHAPE_F[1]]
    union = (np.abs(xx[..., None] - cx) <= h) & (np.abs(yy[..., None] - cy) <= h)
    pix = np.stack([xx[union.any(-1)], yy[union.any(-1)]], axis=1).astype(float)
    icov_src = np.linalg.inv(ph.beam_covariance_pixels(_WCS_F, _BEAM_F, ra[:2], dec[:2]))
    kern = np.stack(
        [
            np.exp(
                -0.5
                * np.einsum("ni,ij,nj->n", pix - [xs[m], ys[m]], icov_src[m], pix - [xs[m], ys[m]])
            )
            for m in range(2)
        ]
    )
    lag = pix[:, None, :] - pix[None, :, :]
    icov_noise = np.linalg.inv(sim.beam_covariance_pix(_WCS_F, _BEAM_F))
    rho = np.exp(-0.5 * np.einsum("abi,ij,abj->ab", lag, icov_noise, lag))
    a_inv = np.linalg.inv(kern @ kern.T)
    cov = a_inv @ (kern @ rho @ kern.T) @ a_inv
    np.testing.assert_allclose(
        res.peak_err_jyb[:2] / res.local_rms_jyb[:2], np.sqrt(np.diag(cov)), rtol=1e-4
    )

    # White noise: errors of blended members exceed the isolated error (anti-correlated amplitudes).
    white = ph.forced_photometry(img, _WCS_F, _BEAM_F, ra, dec, noise_correlation="none")
    np.testing.assert_allclose(white.peak_jyb, flux, rtol=1e-4)
    for m in range(5):  # (A^-1)_mm >= 1/A_mm, compared per unit RMS with the member fitted alone
        single = ph.forced_photometry(
            img, _WCS_F, _BEAM_F, ra[m : m + 1], dec[m : m + 1], noise_correlation="none"
        )
        assert single.quality_flag[0] == 0
        assert (
            white.peak_err_jyb[m] / white.local_rms_jyb[m]
            > single.peak_err_jyb[0] / single.local_rms_jyb[0]
        )


def test_blended_pairs_statistics_correlated_noise():
    shape = (384, 384)
    wcs = sim.make_sin_wcs(150.0, 35.0, 3.0 * ARCSEC, shape)
    beam = _BEAM_STAT
    cov = sim.beam_covariance_pix(wcs, beam)
    rng = np.random.default_rng(31)
    pulls, rms = [], 1e-3
    for _ in range(4):
        _, _, xs, ys = _grid_sources(wcs, shape, 40, 24, rng, jitter_pix=2.0)
        ang = rng.uniform(0, 2 * np.pi, xs.size)
        sep = rng.uniform(3.0, 7.0, xs.size)  # 0.6-1.4 beam majors
        x2, y2 = xs + sep * np.cos(ang), ys + sep * np.sin(ang)
        allx, ally = np.concatenate([xs, x2]), np.concatenate([ys, y2])
        ra, dec = wcs.pixel_to_world_values(allx, ally)
        flux = rms * np.exp(rng.uniform(np.log(3.0), np.log(50.0), allx.size))
        img = sim.render_point_sources(shape, wcs, beam, ra, dec, flux)
        img = img + sim.correlated_noise(shape, cov, rms, rng)
        res = ph.forced_photometry(img, wcs, beam, ra, dec)
        assert np.all(res.quality_flag == FLAG_BLENDED)
        pulls.append((res.peak_jyb - flux) / res.peak_err_jyb)
    pulls = np.concatenate(pulls)
    assert pulls.size >= 500
    _assert_pulls_ok(pulls)


def test_friends_of_friends_matches_brute_force():
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 200, 400)
    y = rng.uniform(0, 200, 400)
    link = 7.0
    labels = ph.friends_of_friends(x, y, link)
    # Brute force: connected components of the adjacency matrix by repeated min-propagation.
    adj = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :]) < link
    ref = np.arange(x.size)
    for _ in range(x.size):
        new = np.where(adj, ref[None, :], x.size).min(axis=1)
        if np.array_equal(new, ref):
            break
        ref = new
    assert np.array_equal(labels, ref)
    assert np.bincount(labels).max() >= 3  # the sample has chains, not only pairs


# --------------------------------------------------------------------------------------------
# (e) background and RMS
# --------------------------------------------------------------------------------------------
def test_background_mesh_plane_and_rms_non_divisible_shape():
    shape = (300, 430)  # not multiples of the box
    box = 64
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    plane = 0.02 + 1e-5 * xx - 2e-5 * yy
    rng = np.random.default_rng(8)
    # (a flat background here: a gradient across a box would widen the pixel distribution)
    bkg, rms = ph.background_and_rms(0.02 + rng.normal(0, 2e-3, shape), box)
    assert bkg.shape == rms.shape == (5, 7)
    assert np.mean(rms) == pytest.approx(2e-3, rel=0.01)  # unbiased (clipping bias corrected)
    assert np.all(np.abs(rms / 2e-3 - 1) < 0.08)  # per box: ~1.9 % sd, 35 boxes
    assert np.all(np.abs(bkg - 0.02) < 0.2e-3)
    # Exact plane (no noise): box medians are the plane at the box centres, so the bilinear
    # interpolation (and the linear extrapolation to the edges) reproduces the plane everywhere.
    bkg0, _rms0 = ph.background_and_rms(plane, box)
    px = np.concatenate([rng.uniform(0, 429, 200), [0.0, 429.0, -0.4]])
    py = np.concatenate([rng.uniform(0, 299, 200), [299.0, 0.0, 0.0]])
    got = ph.sample_mesh(bkg0, box, px, py, shape=shape)
    np.testing.assert_allclose(got, 0.02 + 1e-5 * px - 2e-5 * py, atol=1e-9)
    # Box larger than the image: one box.
    b1, _r1 = ph.background_and_rms(plane, 1000)
    assert b1.shape == (1, 1)


def test_background_mesh_nan_boxes_filled():
    rng = np.random.default_rng(9)
    img = rng.normal(0.5, 1.0, (128, 128))
    img[:64, :64] = np.nan
    bkg, rms = ph.background_and_rms(img, 32)
    assert np.all(np.isfinite(bkg)) and np.all(np.isfinite(rms))
    assert np.all(np.abs(bkg - 0.5) < 0.15) and np.all(np.abs(rms - 1.0) < 0.15)


def test_background_offset_removed_and_rms_recovered():
    shape = (384, 384)
    wcs = sim.make_sin_wcs(150.0, 35.0, 3.0 * ARCSEC, shape)
    beam = Beam(15.0 * ARCSEC, 15.0 * ARCSEC, 0.0)
    rng = np.random.default_rng(41)
    ra, dec, xs, ys = _grid_sources(wcs, shape, 32, 24, rng)
    flux = rng.uniform(0.005, 0.05, ra.size)
    rms = 1e-3
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    # 30 sigma offset plus a gradient (0.8 sigma across the image; a steeper one would widen the
    # pixel distribution inside a mesh box and so raise the RMS).
    offset = 0.03 + 2e-6 * (xx - 192) + 1e-6 * (yy - 192)
    img = sim.render_point_sources(shape, wcs, beam, ra, dec, flux) + rng.normal(0, rms, shape)
    res = ph.forced_photometry(img + offset, wcs, beam, ra, dec, noise_correlation="none")
    res0 = ph.forced_photometry(img, wcs, beam, ra, dec, noise_correlation="none")
    true_off = 0.03 + 2e-6 * (xs - 192) + 1e-6 * (ys - 192)
    assert np.all(np.abs(res.background_jyb - true_off) < 0.2 * rms)
    # per box (100 px, stride 2) ~2.3 % sd; up to 2x at the edges (linear extrapolation)
    assert np.all(np.abs(res.local_rms_jyb / rms - 1.0) < 0.12)
    assert np.median(res.local_rms_jyb) == pytest.approx(rms, rel=0.02)
    pulls = (res.peak_jyb - flux) / res.peak_err_jyb
    assert abs(pulls.mean()) < 3.5 / math.sqrt(pulls.size)
    np.testing.assert_allclose(res.peak_jyb, res0.peak_jyb, atol=0.2 * rms)


def test_invalid_arguments():
    img = np.zeros((32, 32))
    wcs = sim.make_sin_wcs(10.0, 10.0, 3.0 * ARCSEC, img.shape)
    beam = Beam(15.0 * ARCSEC, 15.0 * ARCSEC, 0.0)
    with pytest.raises(ValueError, match="noise_correlation"):
        ph.forced_photometry(img, wcs, beam, [10.0], [10.0], noise_correlation="pink")
    with pytest.raises(ValueError, match="2-D"):
        ph.forced_photometry(np.zeros((2, 32, 32)), wcs, beam, [10.0], [10.0])
    empty = ph.forced_photometry(img, wcs, beam, [], [])
    assert len(empty) == 0


# --------------------------------------------------------------------------------------------
# (f) a 4-D CASA-style cube read through fits_image.load_image measures like the 2-D file
# --------------------------------------------------------------------------------------------
def test_cube_and_plane_files_give_same_result(tmp_path):
    from ese_assets.core.fits_image import load_image

    shape = (160, 176)
    ra0, dec0, cell = 120.0, 45.0, 3.0 * ARCSEC
    beam = Beam(15.0 * ARCSEC, 10.0 * ARCSEC, -20.0)
    wcs = sim.make_sin_wcs(ra0, dec0, cell, shape)
    rng = np.random.default_rng(51)
    ra, dec, _, _ = _grid_sources(wcs, shape, 30, 20, rng)
    flux = rng.uniform(0.005, 0.05, ra.size)
    img = sim.render_point_sources(shape, wcs, beam, ra, dec, flux)
    img += sim.correlated_noise(shape, sim.beam_covariance_pix(wcs, beam), 1e-3, rng)
    img[5:9, 100:110] = np.nan
    kw = dict(ra_deg=ra0, dec_deg=dec0, cell_deg=cell, beam=beam, date_obs="2024-03-01T04:05:06")
    p2 = sim.write_fits_image(tmp_path / "plane.fits", img, **kw)
    p4 = sim.write_fits_image(tmp_path / "cube.fits", img, cube=True, **kw)
    im2, im4 = load_image(p2), load_image(p4)
    assert im4.data.shape == shape and im4.info.wcs.naxis == 2
    r2 = ph.forced_photometry(im2.data, im2.info.wcs, im2.info.beam, ra, dec)
    r4 = ph.forced_photometry(im4.data, im4.info.wcs, im4.info.beam, ra, dec)
    for name in ("peak_jyb", "peak_err_jyb", "local_rms_jyb", "background_jyb", "x_pix", "y_pix"):
        np.testing.assert_array_equal(getattr(r4, name), getattr(r2, name))
    np.testing.assert_array_equal(r4.quality_flag, r2.quality_flag)
    # ... and both agree with the in-memory image (float32 storage) and the truth.
    r_mem = ph.forced_photometry(img, wcs, beam, ra, dec)
    np.testing.assert_allclose(r2.peak_jyb, r_mem.peak_jyb, atol=1e-6)
    good = r2.quality_flag == 0
    assert good.sum() >= 20
    assert np.all(np.abs(r2.peak_jyb[good] - flux[good]) < 5 * r2.peak_err_jyb[good])
