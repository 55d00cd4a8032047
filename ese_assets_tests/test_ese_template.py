"""ESE template fit (core.ese_template): recovery of injected lens events, no ESE flags on
constant, red-noise or single-outlier lightcurves, and calibrated false-alarm probabilities.

The truth is made here with numpy (Gaussian noise, an Ornstein-Uhlenbeck red noise written out
step by step) and the physical lens model of core.lens; the detector never sees it.
"""

from __future__ import annotations

import numpy as np
import pytest

from ese_assets.core import ese_template as et
from ese_assets.core.lens import ese_lightcurve

T_DAILY = 60000.3 + np.arange(240.0)


def _matrix(flux, err, t=T_DAILY, catalog=None):
    n = flux.shape[0]
    ids = np.array([f"s{i:04d}" for i in range(n)], dtype=object)
    cat = np.full(n, np.nan) if catalog is None else np.asarray(catalog, float)
    return et.LightcurveMatrix(ids, np.asarray(t, float), flux, err, cat)


def _constant(rng, n, t=T_DAILY, snr=(20.0, 150.0)):
    base = rng.uniform(10.0, 200.0, n)
    err = (base / rng.uniform(*snr, n))[:, None] * np.ones((1, t.size))
    return base, base[:, None] + err * rng.standard_normal(err.shape), err


def _ou(rng, t, rms, tau):
    x = np.empty((rms.size, t.size))
    x[:, 0] = rms * rng.standard_normal(rms.size)
    for j in range(1, t.size):
        a = np.exp(-(t[j] - t[j - 1]) / tau)
        x[:, j] = a * x[:, j - 1] + rms * np.sqrt(1 - a * a) * rng.standard_normal(rms.size)
    return x


def test_injected_lens_events_recovered_with_their_parameters():
    rng = np.random.default_rng(11)
    cases = [  # depth, duration, S/N
        (0.1, 30.0, 100.0),
        (0.2, 60.0, 50.0),
        (0.3, 20.0, 80.0),
        (0.4, 120.0, 40.0),
        (0.5, 45.0, 60.0),
        (0.8, 90.0, 100.0),  # caustics
    ]
    n = len(cases)
    base = rng.uniform(20.0, 100.0, n)
    t0 = np.array([rng.uniform(60040.0, 60200.0) for _ in cases])
    flux = np.empty((n, T_DAILY.size))
    err = np.empty_like(flux)
    for i, (depth, dur, snr) in enumerate(cases):
        err[i] = base[i] / snr
        flux[i] = base[i] * ese_lightcurve(T_DAILY, t0[i], dur, depth)
        flux[i] += err[i] * rng.standard_normal(T_DAILY.size)
    scores = et.score_lightcurves(_matrix(flux, err, catalog=base))
    for i, (depth, dur, _snr) in enumerate(cases):
        row = scores.iloc[i]
        assert abs(row["event_t0_mjd"] - t0[i]) < 0.1 * dur, (i, row["event_t0_mjd"], t0[i])
        assert abs(np.log(row["event_duration_days"] / dur)) < np.log(1.25), (i, row)
        assert abs(row["event_depth_frac"] - depth) < max(0.03, 0.15 * depth), (i, row)
        assert row["ese_stat"] > 100
        assert row["baseline_flux_mjy"] == pytest.approx(base[i], rel=0.02)
    assert bool(scores.iloc[-1]["event_caustic"]) is True
    assert not scores.iloc[:4]["event_caustic"].any()


def test_baseline_holds_when_the_event_covers_most_of_the_data():
    """A 365-day lens event over a 240-day window (62 % of the nights 5 % or more down): the
    catalog flux and the nights outside set the baseline, not the dipped median."""
    rng = np.random.default_rng(3)
    base = np.array([50.0, 80.0])
    err = (base / 100.0)[:, None] * np.ones((1, T_DAILY.size))
    gain = ese_lightcurve(T_DAILY, 60120.0, 365.0, 0.3)
    flux = base[:, None] * gain[None, :] + err * rng.standard_normal(err.shape)
    assert np.median(flux[0]) < 0.9 * base[0]  # the median follows the dip
    scores = et.score_lightcurves(_matrix(flux, err, catalog=base * 1.03))
    assert scores["event_depth_frac"].to_numpy() == pytest.approx([0.3, 0.3], abs=0.05)
    assert scores["baseline_flux_mjy"].to_numpy() == pytest.approx(base, rel=0.03)


def test_constant_red_noise_and_single_outliers_are_not_ese():
    rng = np.random.default_rng(5)
    n_const, n_red, n_out = 400, 60, 40
    _, flux, err = _constant(rng, n_const + n_red + n_out)
    red = slice(n_const, n_const + n_red)
    level = flux[red].mean(axis=1)
    flux[red] += level[:, None] * _ou(
        rng, T_DAILY, rng.uniform(0.03, 0.10, n_red), rng.uniform(30.0, 300.0, n_red)
    )
    out = np.arange(n_const + n_red, n_const + n_red + n_out)
    epoch = rng.integers(0, T_DAILY.size, n_out)
    flux[out, epoch] += 50.0 * err[out, epoch] * rng.choice([-1.0, 1.0], n_out)
    result, calibration = et.detect_ese_templates(_matrix(flux, err), n_simulations=1500, seed=1)
    types = result["flag_type"].to_numpy()
    assert not np.isin(types[:n_const], et.FLAGGED_TYPES).any()
    red_types = types[red]
    assert not np.isin(red_types, (et.FLAG_ESE, et.FLAG_DIP, et.FLAG_SPIKE)).any()
    assert (red_types == et.FLAG_VARIABLE).mean() > 0.5  # 3-10 % rms over months is seen
    # One 50-sigma night never makes a candidate: it is named, not flagged.
    assert not result["flag"].to_numpy()[out].any()
    assert (types[out] == et.FLAG_OUTLIER).mean() > 0.9
    assert (result["dropped_night_mjd"].to_numpy()[out] == T_DAILY[epoch]).all()
    assert calibration.threshold_const >= et.MIN_THRESHOLD


def test_false_alarm_probability_matches_fresh_null_simulations():
    """Calibrate on one set of null simulations, then count fresh, independent nulls (other
    seed) above the values the calibration gives FAP 1e-2 (empirical part) and 2e-3 (the
    exponential tail beyond its anchor): within 3 binomial sigma of the stated FAP."""
    rng = np.random.default_rng(21)
    t = 60000.3 + np.sort(rng.choice(np.arange(150.0), 90, replace=False))
    _, flux, err = _constant(rng, 200, t=t)
    matrix = _matrix(flux, err, t=t)
    scores = et.score_lightcurves(matrix)
    cal = et.calibrate_false_alarms(matrix, scores, n_simulations=3000, seed=7).const
    fresh, _ = et.simulate_null(
        matrix, scores, 8000, np.random.default_rng(99), with_variables=False
    )
    stat = et.score_lightcurves(fresh)["dchi2_const"].to_numpy()
    for fap in (1e-2, 2e-3):
        # The value of stated FAP `fap`: by bisection on the calibration's curve.
        lo, hi = 0.0, 200.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if cal.fap(mid) > fap else (lo, mid)
        x = hi
        assert float(cal.fap(x)) == pytest.approx(fap, rel=0.05)
        observed = np.mean(stat >= x)
        sigma = np.sqrt(fap * (1 - fap) / stat.size)
        assert abs(observed - fap) < 3 * sigma + 1.0 / stat.size, (fap, observed, x)
    assert cal.anchor_p < 1e-2  # the 2e-3 point lies in the extrapolated tail
    assert cal.anchor_p > 2e-3


def test_threshold_and_tail_formula():
    samples = np.arange(1000.0)  # uniform: FAP(x) = (1000 - ceil(x)) / 1000 below the anchor
    cal = et.TailCalibration.from_samples(samples)
    assert cal.anchor_x == 980.0
    assert cal.anchor_p == pytest.approx(0.02)
    # Decay measured between the 200th (x = 800, FAP 0.2) and the 20th largest value.
    slope = (980.0 - 800.0) / (2.0 * np.log(0.2 / 0.02))
    assert cal.slope == pytest.approx(slope)
    assert float(cal.fap(500.0)) == pytest.approx(0.5)
    assert float(cal.fap(990.0)) == pytest.approx(0.02 * np.exp(-10.0 / (2.0 * slope)))
    assert cal.threshold(1e-4) == pytest.approx(980.0 + 2.0 * slope * np.log(0.02 / 1e-4))
    x = cal.threshold(0.1)
    assert float(cal.fap(x)) <= 0.1 < float(cal.fap(x - 1.0))
    # A chi^2 (2 dof) sample: its measured decay is ~1, and never taken below 1.
    chi2 = -2.0 * np.log((np.arange(5000) + 0.5) / 5000)
    assert et.TailCalibration.from_samples(chi2).slope == pytest.approx(1.0, abs=0.01)
    assert et.TailCalibration.from_samples(0.5 * chi2).slope == 1.0
