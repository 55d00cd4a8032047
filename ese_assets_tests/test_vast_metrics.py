"""VAST-compatible metrics: eta without the flux-scale floor (whole history, incremental, migrated
databases), the eta-V population cut, and the two-epoch metrics Vs and m.

References are independent numpy implementations of the published formulas (VAST pipeline /
LOFAR TraP eta, Rowlinson et al. 2019 eta-V cut, Mooley et al. 2016 Vs and m).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from ese_assets import pipeline
from ese_assets.core.detection import eta_v_flags
from ese_assets.core.sums import QUOTED_SUM_COLUMNS
from ese_assets.core.variability import (
    combine_partial_sums,
    metrics_from_sums,
    night_partial_sums,
    variability_metrics,
)
from ese_assets.storage import engine as engine_mod
from ese_assets.storage import photometry as photometry_db
from ese_assets.storage import statistics as statistics_db
from ese_assets_tests import test_incremental_stats as inc

FSE = 0.02


def _vast_eta(flux: np.ndarray, err: np.ndarray) -> float:
    """VAST pipeline / TraP: eta = N/(N-1) (mean(w f^2) - mean(w f)^2 / mean(w)), w = 1/err^2."""
    n = len(flux)
    w = 1.0 / err**2
    return n / (n - 1) * (np.mean(w * flux**2) - np.mean(w * flux) ** 2 / np.mean(w))


def _floor_chi2_nu(flux: np.ndarray, err: np.ndarray, k: float) -> float:
    w = 1.0 / (err**2 + (k * flux) ** 2)
    wmean = np.sum(w * flux) / np.sum(w)
    return np.sum(w * (flux - wmean) ** 2) / (len(flux) - 1)


def _random_lightcurves(rng, n_src: int = 30) -> pd.DataFrame:
    frames = []
    for i in range(n_src):
        n = int(rng.integers(2, 80))
        level = rng.uniform(5.0, 500.0)
        err = level * rng.uniform(0.002, 0.05, n)  # S/N 20-500: bright ones dominated by the floor
        flux = level * (1 + rng.normal(0, 0.02, n)) + err * rng.standard_normal(n)
        mjd = 60000.0 + np.sort(rng.uniform(0, 300, n))
        frames.append(
            pd.DataFrame(
                {"source_id": f"S{i:03d}", "mjd": mjd, "flux_mjy": flux, "flux_err_mjy": err}
            )
        )
    return pd.concat(frames, ignore_index=True)


def test_eta_is_vast_eta_and_chi2_nu_keeps_the_floor():
    rng = np.random.default_rng(2019)
    table = _random_lightcurves(rng)
    got = variability_metrics(table.sample(frac=1.0, random_state=1), flux_scale_error=FSE)
    got = got.set_index("source_id")
    for sid, g in table.groupby("source_id"):
        f, e = g["flux_mjy"].to_numpy(), g["flux_err_mjy"].to_numpy()
        assert got.loc[sid, "eta_metric"] == pytest.approx(_vast_eta(f, e), rel=1e-8)
        assert got.loc[sid, "chi2_nu"] == pytest.approx(_floor_chi2_nu(f, e, FSE), rel=1e-8)
    # The floor matters: for these 2 %-scatter sources eta is far above chi2_nu.
    assert (got["eta_metric"] > got["chi2_nu"]).all()
    assert (got["eta_metric"] / got["chi2_nu"]).max() > 5


def test_eta_from_nightly_sums_equals_vast_eta():
    rng = np.random.default_rng(7)
    table = _random_lightcurves(rng)
    table["night"] = np.floor(table["mjd"]).astype(int).astype(str)
    table["shift_mjy"] = table.groupby("source_id")["flux_mjy"].transform("median") * 1.07
    nights = night_partial_sums(table, flux_scale_error=FSE)
    for col in QUOTED_SUM_COLUMNS:
        assert col in nights.columns
    moments = metrics_from_sums(combine_partial_sums(nights.sample(frac=1.0, random_state=3)))
    moments = moments.set_index("source_id")
    for sid, g in table.groupby("source_id"):
        f, e = g["flux_mjy"].to_numpy(), g["flux_err_mjy"].to_numpy()
        assert moments.loc[sid, "eta_metric"] == pytest.approx(_vast_eta(f, e), rel=1e-8)
        assert moments.loc[sid, "chi2_nu"] == pytest.approx(_floor_chi2_nu(f, e, FSE), rel=1e-8)


def test_eta_nan_for_unusable_quoted_error_but_chi2_nu_kept_by_the_floor():
    table = pd.DataFrame(
        {
            "source_id": "A",
            "mjd": [1.0, 2.0, 3.0, 4.0],
            "flux_mjy": [10.0, 11.0, 9.0, 10.0],
            "flux_err_mjy": [0.5, 0.0, 0.5, 0.5],
        }
    )
    r = variability_metrics(table, flux_scale_error=FSE).iloc[0]
    assert np.isnan(r["eta_metric"]) and np.isfinite(r["chi2_nu"])
    table["night"], table["shift_mjy"] = "n", 10.0
    m = metrics_from_sums(combine_partial_sums(night_partial_sums(table, flux_scale_error=FSE)))
    assert np.isnan(m["eta_metric"].iloc[0]) and np.isfinite(m["chi2_nu"].iloc[0])


def _drop_quoted_columns(engine) -> None:
    """Make the database look like one written before the quoted sums existed."""
    with engine.begin() as conn:
        for table in ("source_night_sums", "source_sums"):
            for col in ("n_bad_quoted_err", *QUOTED_SUM_COLUMNS):
                conn.execute(sa.text(f'ALTER TABLE {table} DROP COLUMN "{col}"'))


def test_old_database_gets_the_columns_and_its_sums_rebuilt(engine):
    inc._fill(engine, inc.NIGHTS[:4])
    for night in inc.NIGHTS[:3]:
        pipeline.update_variability(engine, [night], flux_scale_error=FSE)
    _drop_quoted_columns(engine)
    engine_mod._schema_checked.discard(engine)
    engine_mod.ensure_schema(engine)  # ALTER TABLE ... ADD COLUMN: NULL in the old rows
    assert statistics_db.source_sums(engine)["sum_q"].isna().all()
    pipeline.update_variability(engine, [inc.NIGHTS[3]], flux_scale_error=FSE)
    sums = statistics_db.source_sums(engine)
    nights = statistics_db.night_sums(engine, source_ids=inc.SOURCES)
    assert sums[list(QUOTED_SUM_COLUMNS)].notna().all().all()
    assert nights[list(QUOTED_SUM_COLUMNS)].notna().all().all()
    stats = inc._stats(engine).set_index("source_id")
    lcs = photometry_db.lightcurves(engine)
    for sid, g in lcs.groupby("source_id"):
        f, e = g["peak_jyb"].to_numpy() * 1e3, g["peak_err_jyb"].to_numpy() * 1e3
        assert stats.loc[sid, "eta_metric"] == pytest.approx(_vast_eta(f, e), rel=1e-8)
    # Re-running a night leaves identical tables; a full rebuild gives the same tables.
    before = {**inc._sums(engine), "variability_stats": inc._stats(engine)}
    pipeline.update_variability(engine, [inc.NIGHTS[1]], flux_scale_error=FSE)
    after = {**inc._sums(engine), "variability_stats": inc._stats(engine)}
    for table in before:
        pd.testing.assert_frame_equal(before[table], after[table], check_exact=True, obj=table)
    pipeline.recompute_variability(engine, flux_scale_error=FSE)
    inc._assert_frames(before["variability_stats"], inc._stats(engine))


# ------------------------------------------ eta-V cut ------------------------------------------


def test_eta_v_cut_against_an_independent_computation():
    rng = np.random.default_rng(5)
    n = 500
    stats = pd.DataFrame(
        {
            "source_id": [f"S{i}" for i in range(n)],
            "n_obs": rng.integers(5, 60, n),
            "eta_metric": 10 ** rng.normal(0.0, 0.4, n),
            "v_index": 10 ** rng.normal(-1.5, 0.3, n),
        }
    )
    stats.loc[:4, ["eta_metric", "v_index"]] = [[1e3, 0.5]] * 5  # five strong variables
    stats.loc[5, "eta_metric"] = np.nan
    stats.loc[6, "v_index"] = -0.1  # negative mean: not in the population
    for k in (1.0, 2.0):
        got = eta_v_flags(stats, k_sigma=k, min_obs=10)
        pop = stats[(stats["n_obs"] >= 10) & (stats["eta_metric"] > 0) & (stats["v_index"] > 0)]
        x, y = np.log10(pop["eta_metric"]), np.log10(pop["v_index"])
        x_cut, y_cut = x.mean() + k * x.std(ddof=1), y.mean() + k * y.std(ddof=1)
        want = pop.loc[(x > x_cut) & (y > y_cut), "source_id"].tolist()
        assert got["source_id"].tolist() == want
        assert set(got["flag_type"]) <= {"variable"}
        assert got["log_eta_threshold"].iloc[0] == pytest.approx(x_cut)
        assert {"S0", "S1", "S2", "S3", "S4"} <= set(want) or stats.loc[:4, "n_obs"].min() < 10
    assert len(eta_v_flags(stats.iloc[:2])) == 0  # no population to set thresholds from


def test_ese_detect_rule_eta_v_prints_the_cut_and_writes_nothing(sqlite_engine, capsys):
    from ese_assets.cli import main

    inc._fill(sqlite_engine, inc.NIGHTS)
    pipeline.update_variability(sqlite_engine, inc.NIGHTS, flux_scale_error=FSE)
    url = str(sqlite_engine.url)
    assert main(["detect", "--rule", "eta-v", "--eta-v-sigma", "0.5", "--products-db", url]) == 0
    out = json.loads(capsys.readouterr().out)
    stats = statistics_db.variability_stats(sqlite_engine)
    want = eta_v_flags(stats, k_sigma=0.5)["source_id"]
    assert sorted(c["source_id"] for c in out["candidates"]) == sorted(want)
    assert out["rule"] == "eta-v" and out["written"] is False
    with sqlite_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM ese_candidates")).scalar_one() == 0


# --------------------------------------- two-epoch metrics ---------------------------------------


def _brute_force_two_epoch(f: np.ndarray, s: np.ndarray, vs_min: float = 4.3):
    """Every pair (a before b): (Vs, m) of the largest |m| among |Vs| >= vs_min, f_a + f_b > 0."""
    best = (-1.0, np.nan, np.nan)
    for a in range(len(f)):
        for b in range(a + 1, len(f)):
            vs = (f[b] - f[a]) / np.sqrt(s[a] ** 2 + s[b] ** 2)
            if abs(vs) < vs_min or f[a] + f[b] <= 0:
                continue
            m = 2 * (f[b] - f[a]) / (f[b] + f[a])
            if abs(m) > best[0]:
                best = (abs(m), vs, m)
    return best[1], best[2]


def _two_epoch_population(rng, n_src: int = 120) -> pd.DataFrame:
    frames = []
    for i in range(n_src):
        n = int(rng.integers(1, 60))
        level = rng.uniform(0.5, 50.0)
        err = rng.uniform(0.2, 2.0, n)
        kind = i % 4  # stable, red-noise-like variable, one outlier, faint (fluxes around 0)
        flux = level + err * rng.standard_normal(n)
        if kind == 1:
            flux += level * 0.3 * np.cumsum(rng.standard_normal(n)) / np.sqrt(n)
        elif kind == 2:
            flux[rng.integers(n)] += 8 * err.max()
        elif kind == 3:
            flux = rng.normal(0.0, 3.0, n)
        mjd = 60000.0 + np.sort(rng.uniform(0, 400, n))
        frames.append(
            pd.DataFrame(
                {"source_id": f"S{i:03d}", "mjd": mjd, "flux_mjy": flux, "flux_err_mjy": err}
            )
        )
    return pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize("k", [0.0, 0.02])
def test_two_epoch_metrics_match_brute_force(k):
    rng = np.random.default_rng(2016)
    table = _two_epoch_population(rng)
    got = variability_metrics(table.sample(frac=1.0, random_state=4), flux_scale_error=k)
    got = got.set_index("source_id")
    n_found = 0
    for sid, g in table.groupby("source_id"):
        g = g.sort_values("mjd")
        f, e = g["flux_mjy"].to_numpy(), g["flux_err_mjy"].to_numpy()
        vs, m = _brute_force_two_epoch(f, np.sqrt(e**2 + (k * f) ** 2))
        np.testing.assert_allclose(
            [got.loc[sid, "two_epoch_vs"], got.loc[sid, "two_epoch_m"]],
            [vs, m],
            rtol=1e-12,
            equal_nan=True,
            err_msg=sid,
        )
        n_found += np.isfinite(m)
    # Both paths (the (max, min) shortcut and the pair scan) and the empty case are exercised.
    assert 10 < n_found < len(got) - 10


def test_two_epoch_metrics_stored_over_the_dip_window(engine):
    inc._fill(engine)
    for night in inc.NIGHTS:
        pipeline.update_variability(engine, [night], flux_scale_error=FSE, dip_window_days=5.0)
    stats = inc._stats(engine).set_index("source_id")
    lcs = photometry_db.lightcurves(engine)
    last = lcs["mjd"].max()
    for sid, g in lcs.groupby("source_id"):
        g = g[g["mjd"] >= g["mjd"].max() - 5.0].sort_values("mjd")  # the trailing window
        f, e = g["peak_jyb"].to_numpy() * 1e3, g["peak_err_jyb"].to_numpy() * 1e3
        vs, m = _brute_force_two_epoch(f, np.sqrt(e**2 + (FSE * f) ** 2))
        np.testing.assert_allclose(
            [stats.loc[sid, "two_epoch_vs"], stats.loc[sid, "two_epoch_m"]],
            [vs, m],
            rtol=1e-9,
            equal_nan=True,
            err_msg=sid,
        )
    # The window holds the end of the three sources' 40 % dip: those have a significant pair.
    assert np.isfinite(stats.loc[inc.SOURCES[:3], "two_epoch_m"]).all()
    assert last > 0


def test_two_epoch_metrics_on_nightly_bins(engine):
    inc._fill(engine)
    pipeline.update_variability(
        engine, inc.NIGHTS, flux_scale_error=FSE, dip_window_days=6.0, bin_nights="on"
    )
    stats = inc._stats(engine).set_index("source_id")
    bins = pipeline.nightly_lightcurves(engine, inc.SOURCES, window_days=6.0)
    for sid, g in bins.groupby("source_id"):
        vs, m = _brute_force_two_epoch(g["flux_mjy"].to_numpy(), g["flux_err_mjy"].to_numpy())
        np.testing.assert_allclose(
            [stats.loc[sid, "two_epoch_vs"], stats.loc[sid, "two_epoch_m"]],
            [vs, m],
            rtol=1e-9,
            equal_nan=True,
            err_msg=sid,
        )
    assert np.isfinite(stats.loc[inc.SOURCES[:3], "two_epoch_m"]).all()
