"""Tests of ese_assets.core.variability against hand computations and a slow reference
implementation."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from ese_assets.core.detection import DetectionSettings, max_sigma_deviation
from ese_assets.core.variability import METRIC_COLUMNS, variability_metrics, window_ladder

# --------------------------------------------------------------------------------------------
# Slow, transparent reference: one Python loop per source, textbook formulas, no shifts/tricks.
# --------------------------------------------------------------------------------------------


def _ladder_ref(n: int, min_len: int = 3) -> list[int]:
    fib = [1, 2]
    while fib[-1] < 10 * n + 10:
        fib.append(fib[-1] + fib[-2])
    lengths = sorted({min_len} | {x for x in fib if x >= min_len})
    return [x for x in lengths if x <= n]


def _reference_metrics(
    df: pd.DataFrame, flux_scale_error: float = 0.0, clip: float | None = 5.0, min_len: int = 3
) -> dict[str, dict[str, float]]:
    out = {}
    for sid in sorted(set(df["source_id"])):
        g = df[df["source_id"] == sid].sort_values("mjd", kind="stable")
        f = [float(x) for x in g["flux_mjy"]]
        e = [float(x) for x in g["flux_err_mjy"]]
        t = [float(x) for x in g["mjd"]]
        n = len(f)
        sig = [math.sqrt(ei**2 + (flux_scale_error * fi) ** 2) for fi, ei in zip(f, e, strict=True)]
        w = [1.0 / s**2 for s in sig]
        mean = sum(f) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in f) / (n - 1)) if n > 1 else math.nan
        wmean = sum(wi * fi for wi, fi in zip(w, f, strict=True)) / sum(w)
        chi2 = (
            (sum((fi - wmean) ** 2 / s**2 for fi, s in zip(f, sig, strict=True)) / (n - 1))
            if n > 1
            else math.nan
        )
        # VAST/TraP eta: quoted errors only (no flux-scale floor).
        q = [1.0 / ei**2 for ei in e]
        qmean = sum(qi * fi for qi, fi in zip(q, f, strict=True)) / sum(q)
        eta = (
            sum(qi * (fi - qmean) ** 2 for qi, fi in zip(q, f, strict=True)) / (n - 1)
            if n > 1
            else math.nan
        )
        med = float(np.median(f))
        rstd = 1.4826 * float(np.median([abs(x - med) for x in f]))
        res = dict(
            n_obs=n,
            mean_flux_mjy=mean,
            std_flux_mjy=std,
            min_flux_mjy=min(f),
            max_flux_mjy=max(f),
            weighted_mean_flux_mjy=wmean,
            chi2_nu=chi2,
            eta_metric=eta,
            v_index=std / mean if n > 1 else math.nan,
            sigma_deviation=(max(abs(max(f) - mean), abs(min(f) - mean)) / std)
            if n > 1
            else math.nan,
            median_flux_mjy=med,
            robust_std_mjy=rstd,
            first_mjd=t[0],
            last_mjd=t[-1],
            dip_significance=math.nan,
            dip_start_mjd=math.nan,
            dip_end_mjd=math.nan,
            dip_n_epochs=None,
            dip_depth_frac=math.nan,
        )
        s_ex2 = max(0.0, rstd**2 - float(np.median(sig)) ** 2)
        z = [(fi - med) / math.sqrt(s**2 + s_ex2) for fi, s in zip(f, sig, strict=True)]
        if clip is not None:
            z = [min(max(zi, -clip), clip) for zi in z]
        best = None
        for length in _ladder_ref(n, min_len):
            for j in range(n - length + 1):
                s_win = sum(z[j : j + length]) / math.sqrt(length)
                if best is None or abs(s_win) > abs(best[0]) + 1e-12:
                    best = (s_win, j, length)
        if best is not None:
            s_win, j, length = best
            res.update(
                dip_significance=s_win,
                dip_start_mjd=t[j],
                dip_end_mjd=t[j + length - 1],
                dip_n_epochs=length,
                dip_depth_frac=(sum(f[j : j + length]) / length) / med - 1,
            )
        # Two-epoch metrics (Mooley et al. 2016): every pair, largest |m| among |Vs| >= 4.3.
        pair = (-1.0, math.nan, math.nan)
        for a in range(n):
            for b in range(a + 1, n):
                vs = (f[b] - f[a]) / math.sqrt(sig[a] ** 2 + sig[b] ** 2)
                if abs(vs) >= 4.3 and f[a] + f[b] > 0:
                    m = 2 * (f[b] - f[a]) / (f[b] + f[a])
                    pair = max(pair, (abs(m), vs, m), key=lambda x: x[0])
        res.update(two_epoch_vs=pair[1], two_epoch_m=pair[2])
        out[sid] = res
    return out


def _random_table(rng, n_src=25, max_epochs=60, shuffle=True):
    frames = []
    for k in range(n_src):
        n = int(rng.integers(1, max_epochs + 1)) if k > 2 else k + 1  # include N = 1, 2, 3
        base = rng.uniform(5, 500)
        err = rng.uniform(0.02, 0.1, n) * base
        flux = base + err * rng.standard_normal(n) * rng.uniform(0.8, 3.0)
        if n > 20 and k % 3 == 0:  # some dips
            j = int(rng.integers(0, n - 10))
            flux[j : j + 10] *= 0.6
        mjd = 60000 + np.cumsum(rng.uniform(0.1, 3, n))
        frames.append(
            pd.DataFrame(
                {"source_id": f"J{k:04d}+0000", "mjd": mjd, "flux_mjy": flux, "flux_err_mjy": err}
            )
        )
    df = pd.concat(frames, ignore_index=True)
    if shuffle:
        df = df.sample(frac=1.0, random_state=int(rng.integers(1 << 30))).reset_index(drop=True)
    return df


def _lc(fluxes, errs, mjd=None, sid="S"):
    n = len(fluxes)
    return pd.DataFrame(
        {
            "source_id": [sid] * n,
            "mjd": np.arange(n, dtype=float) + 60000.0 if mjd is None else mjd,
            "flux_mjy": np.asarray(fluxes, float),
            "flux_err_mjy": np.asarray(errs, float),
        }
    )


# --------------------------------------------------------------------------------------------


def test_hand_computed_small_lightcurve():
    # f = 10, 12, 11, 7 (time order), errors 1, 1, 2, 1; written out by hand:
    # mean 10; deviations 0, 2, 1, -3 -> sum of squares 14 -> s^2 = 14/3.
    # weights 1, 1, 1/4, 1 -> fbar_w = (10 + 12 + 11/4 + 7)/(13/4) = 127/13.
    # residuals 3/13, 29/13, 16/13, -36/13 -> chi2 = (9 + 841 + 256/4 + 1296)/169 = 2210/169, /3.
    # median 10.5; |f - 10.5| = 0.5, 1.5, 0.5, 3.5 -> MAD 1.0.
    df = _lc([10, 12, 11, 7], [1, 1, 2, 1], mjd=[60001.0, 60002.0, 60003.0, 60004.0])
    r = variability_metrics(df.iloc[[2, 0, 3, 1]]).iloc[0]  # row order must not matter
    assert r["n_obs"] == 4
    assert r["mean_flux_mjy"] == pytest.approx(10.0)
    assert r["std_flux_mjy"] == pytest.approx(math.sqrt(14 / 3))
    assert (r["min_flux_mjy"], r["max_flux_mjy"]) == (7.0, 12.0)
    assert r["weighted_mean_flux_mjy"] == pytest.approx(127 / 13)
    assert r["chi2_nu"] == pytest.approx(2210 / 169 / 3)
    assert r["eta_metric"] == pytest.approx(2210 / 169 / 3)
    assert r["v_index"] == pytest.approx(math.sqrt(14 / 3) / 10)
    assert r["sigma_deviation"] == pytest.approx(3 / math.sqrt(14 / 3))
    assert r["median_flux_mjy"] == pytest.approx(10.5)
    assert r["robust_std_mjy"] == pytest.approx(1.4826)
    assert (r["first_mjd"], r["last_mjd"]) == (60001.0, 60004.0)
    # Dip statistic: median sigma = 1 -> s_excess^2 = 1.4826^2 - 1; sigma_tot = 1.4826 for the
    # error-1 epochs and sqrt(4 + 1.4826^2 - 1) for the error-2 epoch. Only L = 3 fits in N = 4.
    st1 = 1.4826
    st2 = math.sqrt(4 + 1.4826**2 - 1)
    z = [(10 - 10.5) / st1, (12 - 10.5) / st1, (11 - 10.5) / st2, (7 - 10.5) / st1]
    s_first, s_last = sum(z[:3]) / math.sqrt(3), sum(z[1:]) / math.sqrt(3)
    assert abs(s_last) > abs(s_first)
    assert r["dip_significance"] == pytest.approx(s_last)  # about -0.652
    assert r["dip_significance"] < 0
    assert (r["dip_start_mjd"], r["dip_end_mjd"], r["dip_n_epochs"]) == (60002.0, 60004.0, 3)
    assert r["dip_depth_frac"] == pytest.approx((12 + 11 + 7) / 3 / 10.5 - 1)


def test_flux_scale_error_adds_in_quadrature():
    # errors 3 and 4 with k = 0.1 on fluxes 40 / 30 -> sigma = 5 for both.
    df = _lc([40.0, 30.0], [3.0, 4.0])
    r = variability_metrics(df, flux_scale_error=0.1).iloc[0]
    assert r["weighted_mean_flux_mjy"] == pytest.approx(35.0)
    assert r["chi2_nu"] == pytest.approx((25 + 25) / 25 / 1)
    r0 = variability_metrics(df).iloc[0]
    assert r0["weighted_mean_flux_mjy"] == pytest.approx((40 / 9 + 30 / 16) / (1 / 9 + 1 / 16))


def test_matches_slow_reference_on_random_table():
    rng = np.random.default_rng(20240607)
    df = _random_table(rng)
    for k in (0.0, 0.05):
        got = variability_metrics(df, flux_scale_error=k)
        ref = _reference_metrics(df, flux_scale_error=k)
        assert list(got.columns) == list(METRIC_COLUMNS)
        assert list(got["source_id"]) == sorted(ref)
        for _, row in got.iterrows():
            exp = ref[row["source_id"]]
            for col in METRIC_COLUMNS[1:]:
                if col == "dip_n_epochs":
                    assert (None if pd.isna(row[col]) else int(row[col])) == exp[col], (
                        row["source_id"],
                        col,
                    )
                else:
                    np.testing.assert_allclose(
                        row[col],
                        exp[col],
                        rtol=1e-9,
                        atol=1e-12,
                        err_msg=f"{row['source_id']} {col}",
                    )


def test_result_does_not_depend_on_row_order_or_other_sources():
    rng = np.random.default_rng(5)
    df = _random_table(rng, n_src=12, shuffle=False)
    full = variability_metrics(df)
    shuffled = variability_metrics(df.sample(frac=1.0, random_state=3))
    pd.testing.assert_frame_equal(full, shuffled, rtol=1e-12)
    one = variability_metrics(df[df["source_id"] == "J0007+0000"]).iloc[0]
    row = full.set_index("source_id").loc["J0007+0000"]
    for col in METRIC_COLUMNS[1:]:
        if col != "dip_n_epochs":
            np.testing.assert_allclose(one[col], row[col], rtol=1e-12)


def test_single_epoch_gives_nan_not_error():
    r = variability_metrics(_lc([5.0], [0.5])).iloc[0]
    assert r["n_obs"] == 1
    assert (
        r["mean_flux_mjy"] == 5.0
        and r["weighted_mean_flux_mjy"] == 5.0
        and r["median_flux_mjy"] == 5.0
    )
    for col in (
        "std_flux_mjy",
        "chi2_nu",
        "eta_metric",
        "v_index",
        "sigma_deviation",
        "dip_significance",
        "dip_start_mjd",
        "dip_depth_frac",
    ):
        assert np.isnan(r[col]), col
    assert pd.isna(r["dip_n_epochs"])


def test_empty_input_and_missing_columns():
    empty = variability_metrics(
        pd.DataFrame({"source_id": [], "mjd": [], "flux_mjy": [], "flux_err_mjy": []})
    )
    assert len(empty) == 0 and list(empty.columns) == list(METRIC_COLUMNS)
    with pytest.raises(ValueError, match="flux_err_mjy"):
        variability_metrics(pd.DataFrame({"source_id": ["a"], "mjd": [1.0], "flux_mjy": [1.0]}))


def test_nonfinite_rows_dropped_and_bad_errors_give_nan_weighted_metrics():
    df = pd.concat(
        [
            _lc([10, 11, np.nan, 9, 10], [1, 1, 1, 1, 1], sid="A"),
            _lc([10, 11, 12, 9], [1, 0.0, 1, 1], sid="B"),
        ],
        ignore_index=True,
    )
    r = variability_metrics(df).set_index("source_id")
    assert r.loc["A", "n_obs"] == 4 and r.loc["A", "mean_flux_mjy"] == pytest.approx(10.0)
    assert np.isfinite(r.loc["A", "chi2_nu"])
    assert r.loc["B", "mean_flux_mjy"] == pytest.approx(10.5)
    assert np.isnan(r.loc["B", "chi2_nu"]) and np.isnan(r.loc["B", "dip_significance"])


def test_numerically_stable_for_large_offset():
    # Fluxes 1e6 +- 1e-3 mJy: raw sums of squares lose everything here (1e12 vs 1e-6).
    rng = np.random.default_rng(11)
    n = 200
    flux = 1e6 + 1e-3 * rng.standard_normal(n)
    err = np.full(n, 1e-3) * rng.uniform(0.8, 1.2, n)
    r = variability_metrics(_lc(flux, err)).iloc[0]
    # Exact rational arithmetic on the very same float inputs.
    fq = [Fraction(float(x)) for x in flux]
    wq = [1 / Fraction(float(e)) ** 2 for e in err]
    mean_q = sum(fq) / n
    var_q = sum((x - mean_q) ** 2 for x in fq) / (n - 1)
    wmean_q = sum(w * x for w, x in zip(wq, fq, strict=True)) / sum(wq)
    chi2_q = sum(w * (x - wmean_q) ** 2 for w, x in zip(wq, fq, strict=True)) / (n - 1)
    assert r["std_flux_mjy"] == pytest.approx(math.sqrt(float(var_q)), rel=1e-7)
    assert r["weighted_mean_flux_mjy"] == pytest.approx(float(wmean_q), rel=0, abs=1e-9)
    assert r["chi2_nu"] == pytest.approx(float(chi2_q), rel=1e-7)
    assert r["eta_metric"] == pytest.approx(float(chi2_q), rel=1e-7)
    assert 0.5 < r["chi2_nu"] < 1.5
    # The naive textbook forms really do fail here (so the test is meaningful).
    naive_var = (np.sum(flux**2) - np.sum(flux) ** 2 / n) / (n - 1)
    assert abs(naive_var - float(var_q)) > 0.1 * float(var_q)


def test_eta_equals_chi2_nu_without_floor_only():
    rng = np.random.default_rng(3)
    table = _random_table(rng, n_src=40)
    r = variability_metrics(table)
    r = r[r["n_obs"] > 1]
    np.testing.assert_allclose(r["eta_metric"], r["chi2_nu"], rtol=1e-9)
    # With the 2 % floor chi2_nu drops, eta (quoted errors) does not move.
    floored = variability_metrics(table, flux_scale_error=0.02)
    floored = floored[floored["n_obs"] > 1]
    np.testing.assert_allclose(floored["eta_metric"], r["eta_metric"], rtol=1e-12)
    assert (floored["chi2_nu"] < r["chi2_nu"]).all()


def test_sigma_deviation_bound():
    rng = np.random.default_rng(8)
    frames = []
    for k, n in enumerate([2, 3, 5, 10, 11, 15, 27, 50, 200]):
        for rep in range(20):
            flux = rng.standard_t(1.5, n) * 10 + 100  # heavy tails push towards the bound
            frames.append(_lc(flux, np.ones(n), sid=f"R{k}_{rep}"))
        # N - 1 equal values and one outlier reach the bound exactly.
        frames.append(_lc([100.0] * (n - 1) + [150.0], np.ones(n), sid=f"X{k}"))
    r = variability_metrics(pd.concat(frames, ignore_index=True))
    bound = max_sigma_deviation(r["n_obs"].to_numpy())
    assert np.all(r["sigma_deviation"].to_numpy() <= bound * (1 + 1e-12))
    extreme = r[r["source_id"].str.startswith("X")]
    np.testing.assert_allclose(
        extreme["sigma_deviation"], max_sigma_deviation(extreme["n_obs"].to_numpy()), rtol=1e-12
    )
    # 5 sigma needs 27 epochs: a single 1000-sigma outlier among 26 epochs still scores < 5.
    lone = variability_metrics(_lc([100.0] * 25 + [1e5], np.ones(26))).iloc[0]
    assert lone["sigma_deviation"] < 5.0


def test_window_ladder():
    assert list(window_ladder(100)) == [3, 5, 8, 13, 21, 34, 55, 89]
    assert list(window_ladder(2)) == []
    assert list(window_ladder(10, min_len=4)) == [4, 5, 8]
    lengths = window_ladder(10_000)
    assert np.all(lengths[1:] / lengths[:-1] <= 5 / 3 + 1e-12)


# ----------------------------------- dip statistic ------------------------------------------


def _dip_source(rng, n=300, snr=20.0, depth=0.3, width=15, start=140, flux=100.0, sid="D"):
    err = np.full(n, flux / snr)
    f = flux + err * rng.standard_normal(n)
    f[start : start + width] -= depth * flux
    mjd = 60000.0 + np.arange(n) * 0.2
    return _lc(f, err, mjd=mjd, sid=sid), mjd[start], mjd[start + width - 1]


@pytest.mark.parametrize(("snr", "min_detected"), [(20.0, 1.0), (8.0, 0.95)])
def test_injected_30pc_dip_over_15_epochs_is_detected(snr, min_detected):
    """30 % dip over 15 of 300 epochs. Per-epoch z = 0.3 * S/N = 6 (S/N 20) or 2.4 (S/N 8).

    Expected S ~ z * sqrt(13) (the ladder length 13 fits inside the dip; z clipped at 5):
    ~17.7 and ~8.7. At S/N 8 the margin over the threshold 6 is ~2.7 sigma of S, so a few per cent
    of noise realisations fall short (2000 realisations by hand: 98.9 % detected; S/N 20: 100 %).
    """
    rng = np.random.default_rng(int(snr))
    threshold = DetectionSettings().min_dip_sigma
    frames, truth = [], []
    for k in range(100):
        df, t0, t1 = _dip_source(rng, snr=snr, start=20 + 2 * k, sid=f"D{k:03d}")
        frames.append(df)
        truth.append((t0, t1))
    r = variability_metrics(pd.concat(frames, ignore_index=True))
    s = r["dip_significance"].to_numpy()
    assert np.mean(s <= -threshold) >= min_detected, np.sort(s)[-5:]
    expected = min(0.3 * snr, 5.0) * math.sqrt(13)
    assert np.median(-s) == pytest.approx(expected, rel=0.1)
    t0 = np.array([a for a, _ in truth])
    t1 = np.array([b for _, b in truth])
    overlap = np.minimum(r["dip_end_mjd"], t1) - np.maximum(r["dip_start_mjd"], t0)
    assert np.mean(overlap > 0) >= min_detected  # the window sits on the injected dip
    assert np.median(r["dip_depth_frac"]) == pytest.approx(-0.3, abs=0.05)


def test_spike_is_positive_and_single_outlier_is_not_detected():
    rng = np.random.default_rng(4)
    n = 300
    err = np.ones(n)
    flare = 100 + rng.standard_normal(n)
    flare[100:120] += 3.0
    outlier = 100 + rng.standard_normal(n)
    outlier[50] += 50.0  # one bad image, 50 sigma
    r = variability_metrics(
        pd.concat([_lc(flare, err, sid="flare"), _lc(outlier, err, sid="outlier")])
    )
    r = r.set_index("source_id")
    assert r.loc["flare", "dip_significance"] >= DetectionSettings().min_dip_sigma
    assert abs(r.loc["outlier", "dip_significance"]) < DetectionSettings().min_dip_sigma
    assert (
        r.loc["outlier", "sigma_deviation"] > 15
    )  # the seed metric fires on the bad image instead


def test_excess_scatter_is_absorbed():
    # Errors underestimated 3x: the robust scatter term keeps |S| at the noise level.
    rng = np.random.default_rng(9)
    frames = [
        _lc(100 + 3 * rng.standard_normal(300), np.ones(300), sid=f"N{k}") for k in range(200)
    ]
    r = variability_metrics(pd.concat(frames, ignore_index=True))
    assert np.abs(r["dip_significance"]).max() < DetectionSettings().min_dip_sigma
    assert r["chi2_nu"].median() == pytest.approx(9.0, rel=0.15)


def _noise_table(rng, n_src, n_epochs):
    err = rng.uniform(0.5, 2.0, (n_src, n_epochs))
    f = 100.0 + err * rng.standard_normal((n_src, n_epochs))
    mjd = np.sort(rng.uniform(0, 30, (n_src, n_epochs)), axis=1) + 60000
    return pd.DataFrame(
        {
            "source_id": np.repeat(np.arange(n_src), n_epochs),
            "mjd": mjd.ravel(),
            "flux_mjy": f.ravel(),
            "flux_err_mjy": err.ravel(),
        }
    )


def test_false_alarm_rate_on_pure_noise():
    """Look-elsewhere: the distribution of max|S| over the window scan for constant sources.

    Seeded Gaussian noise with heteroscedastic, correctly quoted errors; N from 20 to 2000 epochs.
    The median of max|S| grows with N (more windows); the rate above the default threshold is
    extrapolated from the rate above 4.5 with the Gaussian tail ratio Q(6)/Q(4.5) ~ 2.9e-4 (tails
    of maxima of correlated Gaussian fields fall at least that fast). A larger run by hand
    (2e5 sources at N=20 ... 2e4 at N=2000; 6e3 at N=5000) measured P(|S|>=5.0) = 2e-5, 1.4e-4,
    6e-4, 2.2e-3, 4.7e-3, 1.0e-2 and P(|S|>=5.5) = 5e-6, 0, 7e-5, 5e-5, 3.5e-4, 1e-3 for N = 20,
    100, 300, 1000, 2000, 5000, and no source at all with |S| >= 6.
    """
    rng = np.random.default_rng(2718)
    threshold = DetectionSettings().min_dip_sigma
    medians, total, above = [], 0, 0
    q_ratio = 0.5 * math.erfc(threshold / math.sqrt(2)) / (0.5 * math.erfc(4.5 / math.sqrt(2)))
    for n_epochs, n_src in [(20, 10_000), (100, 4_000), (500, 1_500), (2000, 600)]:
        s = np.abs(
            variability_metrics(_noise_table(rng, n_src, n_epochs))["dip_significance"].to_numpy()
        )
        assert np.all(np.isfinite(s))
        medians.append(np.median(s))
        total += n_src
        above += int(np.sum(s >= threshold))
        p45 = np.mean(s >= 4.5)
        assert p45 < 0.1, (n_epochs, p45)
        assert p45 * q_ratio < 1e-3, (n_epochs, p45)
        assert np.mean(s >= 5.0) < 1e-2, n_epochs
    assert above == 0, f"{above} of {total} constant sources reached |S| >= {threshold}"
    assert np.all(np.diff(medians) > 0)  # look-elsewhere: max|S| grows with N
    assert 1.5 < medians[0] < 2.5 and 3.3 < medians[-1] < 4.3
