"""Incremental statistics: additive partial sums (core) and the bounded-cost pipeline stage.

The whole-history moments from sums must equal ``variability_metrics`` on the full history, and the
incremental path (nights in any order, re-runs with changed photometry) must equal a full rebuild.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from ese_assets import pipeline
from ese_assets.core.binning import bin_measurements, binned_window_metrics
from ese_assets.core.variability import (
    MOMENT_COLUMNS,
    WINDOW_COLUMNS,
    combine_partial_sums,
    metrics_from_sums,
    night_partial_sums,
    variability_metrics,
)
from ese_assets.storage import images as images_db
from ese_assets.storage import photometry as photometry_db
from ese_assets.storage import statistics as statistics_db
from ese_assets_tests import snapshots
from ese_assets_tests.test_variability import _lc, _random_table

FSE = 0.02
STATS_VOLATILE = ("updated_at", "last_measured_at")


# --------------------------------------------------------------------------------------------------
# core: night_partial_sums / combine_partial_sums / metrics_from_sums
# --------------------------------------------------------------------------------------------------


def _with_nights_and_shift(df: pd.DataFrame, rng, offset_frac: float = 0.1) -> pd.DataFrame:
    """Nights = integer MJD; a per-source shift near (not at) the source's level, like a catalog."""
    df = df.copy()
    df["night"] = np.floor(df["mjd"]).astype(int).astype(str)
    level = df.groupby("source_id")["flux_mjy"].transform("median")
    factor = df["source_id"].map(
        {s: 1 + offset_frac * rng.standard_normal() for s in df["source_id"].unique()}
    )
    df["shift_mjy"] = level * factor
    return df


def _sums_metrics(df: pd.DataFrame, k: float, rng) -> pd.DataFrame:
    parts = night_partial_sums(df, flux_scale_error=k)
    # Nights combined in a random order, as an incremental history would add them.
    return metrics_from_sums(
        combine_partial_sums(parts.sample(frac=1.0, random_state=int(rng.integers(1 << 30))))
    )


def _assert_moments_equal(got: pd.DataFrame, ref: pd.DataFrame, rtol: float) -> None:
    assert list(got.columns) == list(MOMENT_COLUMNS)
    assert list(got["source_id"]) == list(ref["source_id"])
    for col in MOMENT_COLUMNS[1:]:
        np.testing.assert_allclose(
            got[col].to_numpy(float),
            ref[col].to_numpy(float),
            rtol=rtol,
            atol=0,
            equal_nan=True,
            err_msg=col,
        )


@pytest.mark.parametrize("k", [0.0, 0.05])
def test_metrics_from_sums_equal_full_history_metrics(k):
    rng = np.random.default_rng(77)
    df = _with_nights_and_shift(_random_table(rng, n_src=40, max_epochs=120), rng)  # unsorted rows
    _assert_moments_equal(
        _sums_metrics(df, k, rng), variability_metrics(df, flux_scale_error=k), rtol=1e-9
    )


def test_metrics_from_sums_stable_for_large_offset():
    # 1e6 +- 1e-3 mJy over many nights: raw sums of squares would keep no digit of the variance.
    rng = np.random.default_rng(11)
    n = 300
    flux = 1e6 + 1e-3 * rng.standard_normal(n)
    err = 1e-3 * rng.uniform(0.8, 1.2, n)
    df = _lc(flux, err, mjd=60000.0 + np.sort(rng.uniform(0, 100, n)))
    df["night"] = np.floor(df["mjd"]).astype(int).astype(str)
    df["shift_mjy"] = 1e6  # the catalog flux
    got = _sums_metrics(df.sample(frac=1.0, random_state=1), 0.0, rng)
    _assert_moments_equal(got, variability_metrics(df), rtol=1e-9)
    fq = [Fraction(float(x)) for x in flux]
    mean_q = sum(fq) / n
    var_q = sum((x - mean_q) ** 2 for x in fq) / (n - 1)
    assert got["std_flux_mjy"].iloc[0] == pytest.approx(math.sqrt(float(var_q)), rel=1e-9)


def test_partial_sums_single_epoch_bad_errors_and_nonfinite_rows():
    df = pd.concat(
        [
            _lc([5.0], [0.5], sid="one"),
            _lc([10, 11, 12, 9], [1, 0.0, 1, 1], sid="bad"),
            _lc([10, 11, np.nan, 9], [1, 1, 1, 1], sid="nan"),
        ],
        ignore_index=True,
    )
    df["night"] = "2026-01-01"
    df["shift_mjy"] = 10.0
    parts = night_partial_sums(df)
    assert parts.set_index("source_id")["n_bad_err"].to_dict() == {"bad": 1, "nan": 0, "one": 0}
    got = metrics_from_sums(combine_partial_sums(parts)).set_index("source_id")
    ref = variability_metrics(df).set_index("source_id")
    assert got.loc["nan", "n_obs"] == 3
    assert np.isnan(got.loc["bad", "chi2_nu"]) and np.isnan(
        got.loc["bad", "weighted_mean_flux_mjy"]
    )
    assert got.loc["bad", "mean_flux_mjy"] == pytest.approx(10.5)
    assert np.isnan(got.loc["one", "std_flux_mjy"]) and np.isnan(got.loc["one", "chi2_nu"])
    for col in MOMENT_COLUMNS[1:]:
        np.testing.assert_allclose(
            got[col].to_numpy(float),
            ref[col].to_numpy(float),
            rtol=1e-12,
            equal_nan=True,
            err_msg=col,
        )


def test_equal_input_gives_bit_identical_sums_and_shifts_must_match():
    rng = np.random.default_rng(4)
    df = _with_nights_and_shift(_random_table(rng, n_src=10), rng)
    a = night_partial_sums(df, flux_scale_error=FSE)
    b = night_partial_sums(df.sample(frac=1.0, random_state=9), flux_scale_error=FSE)
    pd.testing.assert_frame_equal(a, b, check_exact=True)  # (source, mjd) order, not input order
    bad = a.copy()
    bad.loc[bad.index[0], "shift_mjy"] += 1.0
    if (bad["source_id"] == bad["source_id"].iloc[0]).sum() > 1:
        with pytest.raises(ValueError, match="shift_mjy"):
            combine_partial_sums(bad)


# --------------------------------------------------------------------------------------------------
# pipeline: incremental == rebuild, on SQLite and PostgreSQL
# --------------------------------------------------------------------------------------------------

SOURCES = [f"J{i:06d}+000000" for i in range(12)]
NIGHTS = [f"2026-02-{d:02d}" for d in range(1, 13)]
IMAGES_PER_NIGHT = 3


def _path(night: str, j: int) -> str:
    return f"/data/{night}/img{j}.fits"


def _mjd(night: str, j: int) -> float:
    return 61072.0 + (int(night[-2:]) - 1) + 0.1 + 0.05 * j  # 2026-02-01 is MJD 61072


def _photometry(night: str, j: int, seed: int, sources=SOURCES) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = len(sources)
    level = 0.05 + 0.01 * np.arange(n)  # Jy/beam
    peak = level * (1 + 0.03 * rng.standard_normal(n))
    if night in NIGHTS[5:8]:
        peak[:3] *= 0.6  # a dip in three sources
    return pd.DataFrame(
        {
            "source_id": list(sources),
            "ra_deg": 150.0 + 0.01 * np.arange(n),
            "dec_deg": 30.0,
            "nvss_flux_mjy": np.where(np.arange(n) == 4, np.nan, level * 1e3 * 1.1),  # one unknown
            "peak_jyb": peak,
            "peak_err_jyb": 1e-3 * (1 + 0.2 * rng.random(n)),
            "mjd": _mjd(night, j),
        }
    )


def _measure(engine, night: str, j: int, seed: int, sources=SOURCES) -> None:
    path = _path(night, j)
    images_db.register_images(engine, [{"path": path, "night": night, "mjd": _mjd(night, j)}])
    photometry_db.replace_image_photometry(engine, path, _photometry(night, j, seed, sources))


def _fill(engine, nights=NIGHTS) -> None:
    for k, night in enumerate(nights):
        for j in range(IMAGES_PER_NIGHT):
            _measure(engine, night, j, seed=100 * k + j)


def _stats(engine) -> pd.DataFrame:
    return snapshots.table_snapshot(engine, "variability_stats", exclude=STATS_VOLATILE)


def _sums(engine) -> dict[str, pd.DataFrame]:
    return {
        t: snapshots.table_snapshot(engine, t, exclude=("last_measured_at",))
        for t in ("source_night_sums", "source_sums")
    }


def _assert_frames(a: pd.DataFrame, b: pd.DataFrame, rtol: float = 1e-9) -> None:
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=rtol, atol=1e-9)


def test_incremental_in_any_order_with_remeasured_images_equals_rebuild(engine):
    _fill(engine)
    rng = np.random.default_rng(3)
    for night in rng.permutation(NIGHTS):
        pipeline.update_variability(engine, [night], flux_scale_error=FSE)
    # Re-measure images with other fluxes: one that holds a minimum of source 0 (the dip), one
    # whose new photometry drops two sources, then re-run those nights (one as a two-night batch).
    _measure(engine, NIGHTS[6], 1, seed=999)
    _measure(engine, NIGHTS[2], 0, seed=998, sources=SOURCES[:-2])
    _measure(engine, NIGHTS[9], 2, seed=997)
    for j in range(IMAGES_PER_NIGHT):  # the last source vanishes from a whole night
        _measure(engine, NIGHTS[10], j, seed=900 + j, sources=SOURCES[:-1])
    pipeline.update_variability(engine, [NIGHTS[6]], flux_scale_error=FSE)
    pipeline.update_variability(engine, [NIGHTS[9], NIGHTS[2], NIGHTS[10]], flux_scale_error=FSE)
    incremental, incremental_sums = _stats(engine), _sums(engine)

    # Full-history reference straight from photometry (the window holds every epoch here; 36
    # epochs, so the default bin_nights="auto" keeps the raw epochs).
    ref = pipeline.stats_from_lightcurves(photometry_db.lightcurves(engine), flux_scale_error=FSE)
    ref = ref.set_index("source_id").loc[incremental["source_id"]]
    assert (incremental["n_obs"].to_numpy() == ref["n_obs"].to_numpy()).all()
    assert statistics_db.stats_photometry_mismatches(engine, SOURCES) == 0
    for col in (
        "mean_flux_mjy",
        "std_flux_mjy",
        "min_flux_mjy",
        "max_flux_mjy",
        "chi2_nu",
        "eta_metric",
        "weighted_mean_flux_mjy",
        "sigma_deviation",
        "median_flux_mjy",
        "dip_significance",
        "first_mjd",
        "last_mjd",
    ):
        np.testing.assert_allclose(incremental[col], ref[col], rtol=1e-9, err_msg=col)

    assert pipeline.recompute_variability(engine, flux_scale_error=FSE) == len(SOURCES)
    _assert_frames(incremental, _stats(engine))
    rebuilt = _sums(engine)
    for table in rebuilt:
        _assert_frames(incremental_sums[table], rebuilt[table])


def test_rerun_of_a_night_leaves_identical_tables(engine):
    _fill(engine, NIGHTS[:4])
    for night in NIGHTS[:4]:
        pipeline.update_variability(engine, [night], flux_scale_error=FSE)
    before = {**_sums(engine), "variability_stats": _stats(engine)}
    pipeline.update_variability(engine, [NIGHTS[1]], flux_scale_error=FSE)
    pipeline.update_variability(engine, NIGHTS[:4], flux_scale_error=FSE)
    after = {**_sums(engine), "variability_stats": _stats(engine)}
    for table in before:
        pd.testing.assert_frame_equal(before[table], after[table], check_exact=True, obj=table)


def test_flux_scale_error_change_rebuilds_the_sources(engine):
    _fill(engine, NIGHTS[:5])
    for night in NIGHTS[:5]:
        pipeline.update_variability(engine, [night], flux_scale_error=FSE)
    stats = pipeline.update_variability(engine, [NIGHTS[4]], flux_scale_error=0.05)
    assert len(stats) == len(SOURCES)
    night_rows = statistics_db.night_sums(engine, source_ids=SOURCES)
    assert len(night_rows) == 5 * len(SOURCES) and (night_rows["flux_scale_error"] == 0.05).all()
    assert (statistics_db.source_sums(engine)["flux_scale_error"] == 0.05).all()
    ref = pipeline.stats_from_lightcurves(photometry_db.lightcurves(engine), flux_scale_error=0.05)
    np.testing.assert_allclose(_stats(engine)["chi2_nu"], ref["chi2_nu"], rtol=1e-9)
    assert (_stats(engine)["n_obs"] == 5 * IMAGES_PER_NIGHT).all()


def test_history_without_sums_is_rebuilt_on_first_update(engine):
    """A database that predates the sums tables: the first night processed rebuilds its sources."""
    _fill(engine, NIGHTS[:4])
    pipeline.update_variability(engine, [NIGHTS[3]], flux_scale_error=FSE)
    assert (_stats(engine)["n_obs"] == 4 * IMAGES_PER_NIGHT).all()
    assert len(statistics_db.night_sums(engine, source_ids=SOURCES)) == 4 * len(SOURCES)


def _epochs_with_nights(lc: pd.DataFrame) -> pd.DataFrame:
    """Photometry rows as a measurement table (mJy) with each row's night (from its image path)."""
    return pd.DataFrame(
        {
            "source_id": lc["source_id"],
            "night": lc["image_path"].str.split("/").str[2],
            "mjd": lc["mjd"],
            "flux_mjy": lc["peak_jyb"] * 1e3,
            "flux_err_mjy": lc["peak_err_jyb"] * 1e3,
        }
    )


@pytest.mark.parametrize("bin_nights", ["off", "on"])
def test_dip_statistics_cover_the_trailing_window_only(engine, bin_nights):
    _fill(engine)
    window_days = 4.0
    for night in NIGHTS:
        pipeline.update_variability(
            engine,
            [night],
            flux_scale_error=FSE,
            dip_window_days=window_days,
            bin_nights=bin_nights,
        )
    stats = _stats(engine).set_index("source_id")
    lc = photometry_db.lightcurves(engine)
    last = lc.groupby("source_id")["mjd"].transform("max")
    if bin_nights == "off":  # the epochs of the window
        recent = lc[lc["mjd"] >= last - window_days]
        ref = pipeline.stats_from_lightcurves(recent, flux_scale_error=FSE).set_index("source_id")
    else:  # the nights whose mid-time is in the window (not the window's first night here)
        bins = bin_measurements(_epochs_with_nights(lc), flux_scale_error=FSE)
        last_bin = bins.groupby("source_id")["last_mjd"].transform("max")
        in_window = bins["mjd"] >= last_bin - window_days
        assert bins[in_window].groupby("source_id").size().eq(4).all()
        ref = binned_window_metrics(bins[in_window]).set_index("source_id")
    for col in WINDOW_COLUMNS[1:]:
        np.testing.assert_allclose(
            stats[col].astype(float),
            ref[col].astype(float),
            rtol=1e-12,
            equal_nan=True,
            err_msg=col,
        )
    assert (stats["n_obs"] == len(NIGHTS) * IMAGES_PER_NIGHT).all()  # moments: whole history
    assert (stats["first_mjd"] == _mjd(NIGHTS[0], 0)).all()


def test_failed_update_leaves_the_previous_sums(engine, monkeypatch):
    _fill(engine, NIGHTS[:3])
    for night in NIGHTS[:2]:
        pipeline.update_variability(engine, [night], flux_scale_error=FSE)
    before = {**_sums(engine), "variability_stats": _stats(engine)}

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(
        statistics_db, "upsert_variability_stats", crash
    )  # after the sums were written
    with pytest.raises(RuntimeError, match="killed"):
        pipeline.update_variability(engine, [NIGHTS[2]], flux_scale_error=FSE)
    after = {**_sums(engine), "variability_stats": _stats(engine)}
    for table in before:
        pd.testing.assert_frame_equal(before[table], after[table], check_exact=True, obj=table)


def test_bounded_night_check_catches_what_the_full_check_catches(engine):
    import sqlalchemy as sa

    from ese_assets.storage.schema import source_night_sums
    from ese_assets.storage.schema import variability_stats as stats_table

    _fill(engine, NIGHTS[:3])
    for night in NIGHTS[:3]:
        pipeline.update_variability(engine, [night], flux_scale_error=FSE)
    assert statistics_db.night_stats_mismatches(engine, NIGHTS[:3]) == 0
    # New photometry of a night whose statistics have not run yet: the night's sums are stale.
    _measure(engine, NIGHTS[1], 0, seed=555, sources=SOURCES[:-3])
    assert statistics_db.night_stats_mismatches(engine, [NIGHTS[1]]) == 3
    assert (
        statistics_db.night_stats_mismatches(engine, [NIGHTS[0]]) == 0
    )  # other nights are not read
    pipeline.update_variability(engine, [NIGHTS[1]], flux_scale_error=FSE)
    assert statistics_db.night_stats_mismatches(engine, NIGHTS[:3]) == 0
    # Statistics that disagree with the accumulated sums, and a night's sums that disagree with
    # its photometry, are both counted.
    with engine.begin() as conn:
        conn.execute(
            sa.update(stats_table)
            .where(stats_table.c.source_id == SOURCES[0])
            .values(n_obs=stats_table.c.n_obs + 1)
        )
        conn.execute(
            sa.update(source_night_sums)
            .where(
                source_night_sums.c.source_id == SOURCES[1], source_night_sums.c.night == NIGHTS[2]
            )
            .values(n_obs=source_night_sums.c.n_obs - 1)
        )
    assert statistics_db.night_stats_mismatches(engine, [NIGHTS[2]]) == 2
    assert (
        statistics_db.stats_photometry_mismatches(engine, SOURCES) == 1
    )  # the stats row, via photometry
