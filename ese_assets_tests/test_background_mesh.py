"""The background/RMS mesh (core.background) against astropy, and the photometry's memory.

The mesh's sigma clipping runs on sorted rows (binary searches instead of astropy's selection per
box and iteration). Its statistics must be astropy's: every expected number below comes from
astropy's ``SigmaClippedStats`` (cenfunc='median', stdfunc='mad_std') on each box's pixels,
gathered in the test from the documented mesh layout, one box at a time.
"""

from __future__ import annotations

import math
import tracemalloc
import warnings

import numpy as np
import pytest
from astropy.stats import SigmaClippedStats, mad_std, sigma_clip

from ese_assets.core import background as bg
from ese_assets.core import photometry as ph
from ese_assets.core import simulate as sim
from ese_assets.core.fits_image import Beam

ARCSEC = 1.0 / 3600.0


def _astropy_clipped(values, sigma=3.0, maxiters=5) -> tuple[float, float]:
    """(median, mad_std) of astropy's sigma clipping of one 1-D sample, along its axis: astropy's
    C path (``_sigmaclip_fast``), which the mesh always used. (With axis=None astropy runs a
    Python loop whose final sample can differ: it keeps the cumulative intersection of all
    bounds, where the C path keeps every value inside the last bounds.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NaN in the input; all-NaN samples
        if not np.isfinite(values).any():
            return math.nan, math.nan
        stats = SigmaClippedStats(
            np.asarray(values, dtype=float),
            sigma=sigma,
            maxiters=maxiters,
            cenfunc="median",
            stdfunc="mad_std",
            axis=0,
        )
        return float(stats.median()), float(stats.mad_std())


def _layout(n: int, box: int) -> tuple[int, np.ndarray]:
    """The documented mesh layout: round(n / box) boxes of box pixels spread evenly from 0 to
    n - box (one box of n pixels when n < 1.5 box)."""
    nb = max(1, math.floor(n / box + 0.5))
    if nb == 1:
        return n, np.array([0])
    return box, np.floor(np.linspace(0.0, n - box, nb) + 0.5).astype(int)


def _rows_with_everything(rng) -> np.ndarray:
    """Rows of float32 noise with one-sided outliers (sources), ties, NaN and +-inf, rows that
    are all NaN, constant, single-valued or mostly blank."""
    rows = []
    for _ in range(60):
        n = int(rng.integers(1, 500))
        v = rng.normal(0.0, 1.0, n).astype(np.float32)
        src = rng.random(n) < 0.1
        v[src] += rng.exponential(8.0, src.sum()).astype(np.float32)
        v[rng.random(n) < rng.uniform(0.0, 0.9)] = np.nan
        if rng.random() < 0.3:
            v = np.round(v * 2) / 2  # many ties
        if rng.random() < 0.2 and n > 3:
            v[:3] = [np.inf, -np.inf, np.inf]
        rows.append(v)
    rows += [
        np.full(7, np.nan, np.float32),
        np.full(9, 0.25, np.float32),
        np.array([3.0], np.float32),
        np.array([1.0, 2.0], np.float32),
        np.array([1.0, 1.0, 1.0, 5.0], np.float32),
    ]
    width = max(r.size for r in rows)
    out = np.full((len(rows), width), np.nan, dtype=np.float32)
    for i, r in enumerate(rows):
        out[i, : r.size] = r
    return out


@pytest.mark.parametrize("sigma,maxiters", [(3.0, 5), (2.0, None), (1.5, 1), (2.5, 2), (3.0, 0)])
def test_sorted_clipping_equals_astropy_row_by_row(sigma, maxiters):
    values = _rows_with_everything(np.random.default_rng(7))
    median, std = bg.sigma_clipped_median_mad_std(values.copy(), sigma=sigma, maxiters=maxiters)
    expected = np.array([_astropy_clipped(row, sigma, maxiters) for row in values])
    np.testing.assert_allclose(median, expected[:, 0], rtol=1e-12, atol=0.0, equal_nan=True)
    np.testing.assert_allclose(std, expected[:, 1], rtol=1e-12, atol=0.0, equal_nan=True)
    # float64 input, non-contiguous input and big-endian input give the same numbers.
    for other in (
        values.astype(np.float64),
        np.asfortranarray(values),
        values.astype(">f4"),
    ):
        m2, s2 = bg.sigma_clipped_median_mad_std(other, sigma=sigma, maxiters=maxiters)
        np.testing.assert_array_equal(m2, median)
        np.testing.assert_array_equal(s2, std)


def test_clipping_bias_of_the_mad_matches_astropy_on_gaussian_noise():
    """clipped_mad_std_bias(3) is what astropy's 3-sigma clipped MAD-std gives for unit normal
    noise (10^6 samples: standard error ~0.001)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal(1_000_000)
    clipped = sigma_clip(x, sigma=3.0, maxiters=None, cenfunc="median", stdfunc="mad_std")
    measured = mad_std(clipped.compressed())
    assert bg.clipped_mad_std_bias(3.0) == pytest.approx(measured, abs=0.004)
    assert bg.clipped_mad_std_bias(3.0) == pytest.approx(0.99675, abs=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mesh_equals_astropy_per_box_on_simulated_sky(dtype):
    """A sky with sources, beam-correlated noise, a background gradient, blank (NaN) regions and
    a source mask, on a shape that is not a multiple of the box, sampled every 2nd pixel: each
    box's background and RMS are astropy's clipped median and MAD-std of that box's pixels."""
    shape = (333, 410)
    wcs = sim.make_sin_wcs(150.0, 30.0, 4.0 * ARCSEC, shape)
    beam = Beam(20.0 * ARCSEC, 14.0 * ARCSEC, 30.0)  # 5 x 3.5 px
    rng = np.random.default_rng(3)
    xs = rng.uniform(0, shape[1] - 1, 250)
    ys = rng.uniform(0, shape[0] - 1, 250)
    ra, dec = wcs.pixel_to_world_values(xs, ys)
    flux = 1e-3 * np.exp(rng.uniform(np.log(3.0), np.log(200.0), xs.size))
    xx = np.arange(shape[1])[None, :]
    sky = (
        sim.render_point_sources(shape, wcs, beam, ra, dec, flux)
        + sim.correlated_noise(shape, sim.beam_covariance_pix(wcs, beam), 1e-3, rng)
        + 2e-3
        + 3e-6 * xx
    ).astype(dtype)
    sky[40:140, 20:150] = np.nan  # a blank region covering a box and parts of others
    sky[rng.random(shape) < 0.02] = np.nan  # scattered blanks
    mask = np.zeros(shape, dtype=bool)
    for x, y in zip(xs[::2], ys[::2], strict=True):  # half of the sources masked
        cx, cy = round(x), round(y)
        mask[max(cy - 6, 0) : cy + 7, max(cx - 6, 0) : cx + 7] = True
    box, stride = 64, 2
    before = sky.copy()
    bkg, rms = bg.background_and_rms(sky, box, mask=mask, stride=stride)
    np.testing.assert_array_equal(sky, before)  # the image is not modified (sorted copies)

    by, starts_y = _layout(shape[0], box)
    bx, starts_x = _layout(shape[1], box)
    assert bkg.shape == rms.shape == (starts_y.size, starts_x.size)
    bias = bg.clipped_mad_std_bias(3.0)
    compared = 0
    for i, y0 in enumerate(starts_y):
        for j, x0 in enumerate(starts_x):
            cell = sky[y0 : y0 + by, x0 : x0 + bx].astype(float)
            cell[mask[y0 : y0 + by, x0 : x0 + bx]] = np.nan
            sub = cell[((by - 1) % stride) // 2 :: stride, ((bx - 1) % stride) // 2 :: stride]
            if np.isfinite(sub).sum() < 0.1 * sub.size:
                # too few pixels: filled from the neighbours instead
                assert np.isfinite(bkg[i, j]) and np.isfinite(rms[i, j])
                continue
            med, std = _astropy_clipped(sub.ravel())
            assert bkg[i, j] == pytest.approx(med, rel=1e-12, abs=0.0)
            assert rms[i, j] == pytest.approx(std / bias, rel=1e-12, abs=0.0)
            compared += 1
    assert compared >= 0.8 * bkg.size
    assert compared < bkg.size  # the fully blank box was filled, not measured


def test_photometry_peak_memory_within_4x_the_image_and_input_untouched():
    """A 1024^2 float32 image with 3000 sources (blends included): peak heap growth during
    forced_photometry stays under 4x the image (no float64 copy of the whole image, bounded
    chunks), and the image is not modified."""
    shape = (1024, 1024)
    wcs = sim.make_sin_wcs(150.0, 30.0, 10.0 * ARCSEC, shape)
    beam = Beam(45.0 * ARCSEC, 30.0 * ARCSEC, 30.0)
    rng = np.random.default_rng(5)
    xs = rng.uniform(10, shape[1] - 11, 3000)
    ys = rng.uniform(10, shape[0] - 11, 3000)
    ra, dec = wcs.pixel_to_world_values(xs, ys)
    flux = rng.uniform(3e-3, 0.1, xs.size)
    data = (
        sim.render_point_sources(shape, wcs, beam, ra, dec, flux)
        + sim.correlated_noise(shape, sim.beam_covariance_pix(wcs, beam), 5e-4, rng)
    ).astype(np.float32)
    before = data.copy()
    ph.forced_photometry(data, wcs, beam, ra, dec)  # warm up (WCS caches)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        res = ph.forced_photometry(data, wcs, beam, ra, dec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (peak - base) <= 4.0 * data.nbytes, (peak - base) / data.nbytes
    np.testing.assert_array_equal(data, before)
    assert ((res.quality_flag & ph.FLAG_BLENDED) != 0).sum() > 100
    ok = res.quality_flag == 0
    pulls = (res.peak_jyb[ok] - flux[ok]) / res.peak_err_jyb[ok]
    # Sane answers (unbiasedness is tested on uncrowded fields in test_photometry.py; here the
    # wings of neighbours just beyond the blend radius add ~0.15 sigma of confusion).
    assert abs(np.mean(pulls)) < 0.3 and 0.8 < np.std(pulls) < 1.3
