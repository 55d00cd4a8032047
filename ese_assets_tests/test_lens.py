"""Tests of the Gaussian plasma lens (Clegg, Fey & Lazio 1998) in ese_assets.core.lens."""

from __future__ import annotations

import numpy as np
import pytest

from ese_assets.core import lens


def brute_force_images(u_prime: float, alpha: float, half: float = 8.0, n: int = 1_000_000):
    """Roots of u(1 + alpha^2 e^{-u^2}) = u' by sign changes on a very fine grid (linear
    interpolation). An even number of nodes keeps u = 0 off the grid (a zero there would count as
    two sign changes)."""
    u = np.linspace(-half, half, n)
    g = lens.lens_map(u, alpha) - u_prime
    idx = np.nonzero(np.sign(g[:-1]) != np.sign(g[1:]))[0]
    return u[idx] - g[idx] * (u[idx + 1] - u[idx]) / (g[idx + 1] - g[idx])


def test_alpha_for_depth_gives_on_axis_depth():
    depths = np.array([0.05, 0.15, 0.3, 0.5, 0.7, 0.9])
    alpha = lens.alpha_for_depth(depths)
    np.testing.assert_allclose(alpha**2 / (1 + alpha**2), depths, rtol=1e-12)
    np.testing.assert_allclose(lens.gaussian_lens_gain(0.0, alpha), 1 - depths, rtol=1e-12)
    assert lens.alpha_for_depth(0.5) == pytest.approx(1.0)
    assert isinstance(lens.alpha_for_depth(0.3), float)
    for bad in (-0.1, 1.0, 1.5, np.nan):
        with pytest.raises(ValueError):
            lens.alpha_for_depth(bad)


@pytest.mark.parametrize("alpha", [0.3, 1.0, 2.0, 5.0])
def test_gain_tends_to_one_far_from_lens(alpha):
    # Far means beyond the multiple-image region too: for alpha = 5 it reaches |u'| ~ 11.5.
    u_prime = np.array([-1000.0, -50.0, -20.0, 20.0, 50.0, 1000.0])
    np.testing.assert_allclose(lens.gaussian_lens_gain(u_prime, alpha), 1.0, atol=1e-9)
    np.testing.assert_allclose(
        lens.gaussian_lens_gain(u_prime, alpha, source_size=0.1), 1.0, atol=1e-9
    )


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0, 1.4, 1.49])
def test_weak_lens_single_image_and_on_axis_gain(alpha):
    u_prime = np.linspace(-6, 6, 2001)
    roots, _gains = lens.lens_images(u_prime, alpha)
    assert np.all(np.sum(np.isfinite(roots), axis=-1) == 1)  # no caustics below alpha = 1.4966
    gain = lens.gaussian_lens_gain(u_prime, alpha)
    assert np.all(np.isfinite(gain)) and gain.max() < 1 / (1 - alpha**2 * 2 * np.exp(-1.5))
    assert lens.gaussian_lens_gain(0.0, alpha) == pytest.approx(1 / (1 + alpha**2), rel=1e-12)
    # Minimum on axis; symmetric.
    assert gain.argmin() == 1000
    np.testing.assert_allclose(gain, gain[::-1], rtol=1e-10)


def test_multiple_images_and_caustic_spikes_only_above_threshold():
    u_prime = np.linspace(-5, 5, 20001)
    assert pytest.approx(np.exp(1.5) / 2) == lens.ALPHA2_CAUSTIC
    for alpha in (1.45, 1.49):
        roots, _ = lens.lens_images(u_prime, alpha)
        assert np.isfinite(roots).sum(axis=-1).max() == 1
    for alpha in (1.51, 2.0, 4.0):
        roots, _ = lens.lens_images(u_prime, alpha)
        n_images = np.isfinite(roots).sum(axis=-1)
        assert n_images.max() == 3
        assert set(np.unique(n_images)) <= {1, 3}
        gain = lens.gaussian_lens_gain(u_prime, alpha)
        # Caustic spikes: G ~ |u' - u'_c|^-1/2 gets large on a fine grid; the dip stays deep.
        assert gain.max() > 5.0
        assert gain[10000] == pytest.approx(1 / (1 + alpha**2))
        # Three-image region is a symmetric pair of intervals away from the axis.
        three = u_prime[n_images == 3]
        assert np.all(np.abs(three) > 0.5)
        assert np.isclose(three.min(), -three.max())


@pytest.mark.parametrize("alpha", [0.7, 1.6, 2.0, 4.0])
def test_roots_match_brute_force(alpha):
    rng = np.random.default_rng(7)
    u_prime = np.concatenate([rng.uniform(-4, 4, 40), [0.0, 1.3, -2.2]])
    roots, gains = lens.lens_images(u_prime, alpha)
    np.testing.assert_allclose(
        lens.lens_map(np.where(np.isfinite(roots), roots, 0.0), alpha)[np.isfinite(roots)],
        np.broadcast_to(u_prime[:, None], roots.shape)[np.isfinite(roots)],
        atol=1e-12,
    )
    for k, up in enumerate(u_prime):
        mine = np.sort(roots[k][np.isfinite(roots[k])])
        brute = brute_force_images(up, alpha)
        assert mine.size == brute.size, (up, mine, brute)
        np.testing.assert_allclose(mine, brute, atol=1e-6)
        # Gain = sum |du'/du|^-1 over the brute-force images (skip near-caustic points).
        jac = np.abs(lens.lens_jacobian(brute, alpha))
        if jac.min() > 0.05:
            assert np.nansum(gains[k]) == pytest.approx(np.sum(1 / jac), rel=1e-5)


def test_array_alpha_broadcasts_like_scalar_calls():
    u_prime = np.linspace(-3, 3, 13)
    alphas = np.array([0.5, 1.0, 2.5])
    grid = lens.gaussian_lens_gain(u_prime[:, None], alphas[None, :])
    for j, a in enumerate(alphas):
        np.testing.assert_allclose(grid[:, j], lens.gaussian_lens_gain(u_prime, a), rtol=1e-13)
    smooth = lens.gaussian_lens_gain(u_prime[:, None], alphas[None, :], 0.1)
    for j, a in enumerate(alphas):
        np.testing.assert_allclose(
            smooth[:, j], lens.gaussian_lens_gain(u_prime, a, 0.1), rtol=1e-10
        )


@pytest.mark.parametrize(
    ("alpha", "size"), [(1.0, 0.0), (0.5, 0.0), (1.0, 0.05), (3.0, 0.1), (3.0, 0.03)]
)
def test_flux_conservation(alpha, size):
    """Integral of (G - 1) du' vanishes: integral of G over an interval of u' is the length of its
    pre-image in u (change of variables over each image), and far from the lens u = u'. The flux
    missing in the dip reappears in the enhancements; smoothing by a normalized Gaussian keeps it.
    (Point sources with caustics are excluded: their integrable singularities defeat a grid sum.)"""
    u_prime = np.linspace(-12, 12, 24_001)
    excess = lens.gaussian_lens_gain(u_prime, alpha, size) - 1.0
    step = u_prime[1] - u_prime[0]
    deficit = -np.sum(np.minimum(excess, 0)) * step
    assert deficit > 0.1  # the dip itself is substantial
    assert abs(np.sum(excess) * step) < 1e-5 * deficit


def test_preimage_excess_is_bounded_antiderivative_of_gain_excess():
    alpha = 2.5
    v = np.linspace(-10, 10, 40_001)
    q = lens.preimage_excess(v, alpha)
    assert np.all(np.isfinite(q)) and abs(q[0]) < 1e-12 and abs(q[-1]) < 1e-12
    # Finite differences of Q equal the point gain minus one away from the caustics.
    mid = 0.5 * (v[1:] + v[:-1])
    dq = np.diff(q) / np.diff(v)
    roots, _ = lens.lens_images(mid, alpha)
    jac = np.abs(lens.lens_jacobian(roots, alpha))
    n_end = np.isfinite(lens.lens_images(v, alpha)[0]).sum(axis=-1)
    # Away from caustics: no caustic inside the cell (same image count at both ends) and
    # |u'_u| > 0.3.
    smooth = (np.nanmin(jac, axis=-1) > 0.3) & (n_end[1:] == n_end[:-1])
    assert (~smooth).sum() < 1000 and (n_end == 3).sum() > 1000
    np.testing.assert_allclose(
        dq[smooth], lens.gaussian_lens_gain(mid[smooth], alpha) - 1, rtol=1e-3, atol=1e-4
    )


def test_finite_source_equals_brute_force_convolution():
    alpha, size = 1.0, 0.2  # no caustics, so the point gain can be convolved directly on a grid
    v = np.linspace(-10, 10, 200_001)
    point = lens.gaussian_lens_gain(v, alpha)
    targets = np.array([-2.5, -1.3, -0.4, 0.0, 0.7, 1.5, 3.0])
    kernel = np.exp(-0.5 * ((v[None, :] - targets[:, None]) / size) ** 2) / (
        size * np.sqrt(2 * np.pi)
    )
    brute = (kernel * point).sum(axis=1) * (v[1] - v[0])
    np.testing.assert_allclose(lens.gaussian_lens_gain(targets, alpha, size), brute, rtol=1e-6)


def test_finite_source_caps_caustics():
    alpha = 3.0
    point = lens.gaussian_lens_gain(np.linspace(-4, 4, 80_001), alpha)
    u_prime = np.linspace(-4, 4, 4_001)
    smooth = lens.gaussian_lens_gain(u_prime, alpha, 0.05)
    assert point.max() > 30
    assert np.all(np.isfinite(smooth)) and 1.2 < smooth.max() < 10
    # Smoothing barely changes the flat bottom of the dip.
    assert smooth[2_000] == pytest.approx(1 / (1 + alpha**2), rel=1e-3)
    # A bigger source smooths more.
    assert lens.gaussian_lens_gain(u_prime, alpha, 0.3).max() < smooth.max()


def test_ese_lightcurve_time_convention():
    t0, duration, depth = 60700.0, 20.0, 0.4
    t = t0 + np.linspace(-60, 60, 241)
    g = lens.ese_lightcurve(t, t0, duration, depth, source_size=0.0)
    alpha = lens.alpha_for_depth(depth)
    # u' = (t - t0) / T with T = duration / 4.
    np.testing.assert_allclose(
        g, lens.gaussian_lens_gain((t - t0) / (duration / 4), alpha), rtol=1e-14
    )
    assert g[120] == pytest.approx(1 - depth)
    np.testing.assert_allclose(g, g[::-1], rtol=1e-10)
    assert np.all(np.abs(g[np.abs(t - t0) > 2 * duration] - 1) < 1e-6)
    # The dip (G < 1) is contained in |t - t0| < duration / 2; enhancements bracket it.
    assert np.all(np.abs(t[g < 0.99] - t0) < duration / 2)
    assert g.max() > 1.0
    # Finite source: slightly shallower, never deeper.
    g_s = lens.ese_lightcurve(t0, t0, duration, depth, source_size=0.05)
    assert 1 - depth < g_s < 1 - depth + 0.01
    with pytest.raises(ValueError):
        lens.ese_lightcurve(t, t0, 0.0, depth)
