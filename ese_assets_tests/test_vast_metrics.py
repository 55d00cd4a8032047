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
