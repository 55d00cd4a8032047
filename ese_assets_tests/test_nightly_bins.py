"""Statistics and detection on nightly bins (core.binning, the statistics stage's bin_nights).

Real SQL on SQLite and PostgreSQL (the ``engine`` fixture), photometry written through the storage
functions the pipeline uses, statistics from the real stage (``update_variability`` /
``recompute_variability``). References are computed independently with plain numpy per night.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from ese_assets.core.binning import (
    AUTO_BIN_ABOVE_EPOCHS,
    BIN_COLUMNS,
    DEFAULT_BIN_NIGHTS,
    bin_measurements,
    binned_window_metrics,
    night_bins,
    sources_to_bin,
    validate_bin_nights,
)
from ese_assets.core.detection import DEFAULT_MIN_DIP_SIGMA
from ese_assets.core.quality import FLAG_BLANK
from ese_assets.core.sums import MOMENT_COLUMNS, night_partial_sums
from ese_assets.core.variability import WINDOW_COLUMNS
from ese_assets.orchestration.resources import resources_from_settings
from ese_assets.pipeline.statistics import (
    nightly_lightcurves,
    recompute_variability,
    update_variability,
)
from ese_assets.settings import Settings
from ese_assets.storage import images as images_db
from ese_assets.storage import photometry as photometry_db
from ese_assets.storage import statistics as statistics_db
from ese_assets_tests import snapshots

FSE = 0.02
FIRST_NIGHT = dt.date(2026, 1, 1)  # MJD 61041
FIRST_MJD = 61041.0
STATS_VOLATILE = ("updated_at", "last_measured_at")


def _night(k: int) -> str:
    return (FIRST_NIGHT + dt.timedelta(days=int(k))).isoformat()


def _write_survey(engine, epochs: pd.DataFrame) -> list[str]:
    """Write ``epochs`` (source_id, night_index, mjd, flux_mjy, err_mjy[, quality_flag]) as
    photometry of one image per distinct (night_index, mjd), as the pipeline stores it.
    Returns the nights written, sorted."""
    level = epochs.groupby("source_id")["flux_mjy"].median()
    for (k, mjd), rows in epochs.groupby(["night_index", "mjd"], sort=True):
        path = f"/survey/{_night(k)}/img_{mjd:.5f}.fits"
        images_db.register_images(engine, [{"path": path, "night": _night(k), "mjd": float(mjd)}])
        frame = pd.DataFrame(
            {
                "source_id": rows["source_id"].to_numpy(),
                "ra_deg": 150.0,
                "dec_deg": 30.0,
                "nvss_flux_mjy": 1.1 * level.reindex(rows["source_id"]).to_numpy(),
                "peak_jyb": rows["flux_mjy"].to_numpy() / 1e3,
                "peak_err_jyb": rows["err_mjy"].to_numpy() / 1e3,
                "mjd": float(mjd),
                "quality_flag": rows.get("quality_flag", pd.Series(0, index=rows.index))
                .fillna(0)
                .astype(int)
                .to_numpy(),
            }
        )
        photometry_db.replace_image_photometry(engine, path, frame)
    return sorted({_night(k) for k in epochs["night_index"]})


def _dense_epochs(
    rng: np.random.Generator,
    sources: dict[str, float],
    *,
    nights: int,
    per_night: int,
    snr: float,
    dips: dict[str, tuple[int, int, float]] | None = None,
) -> pd.DataFrame:
    """``per_night`` epochs a night (every 0.02 d from 0.3 d), flux level per source, error
    level/snr, and a box dip (first night, last night + 1, depth) for the sources in ``dips``."""
    k = np.repeat(np.arange(nights), per_night)
    mjd = FIRST_MJD + k + 0.3 + 0.02 * np.tile(np.arange(per_night), nights)
    parts = []
    for sid, level in sources.items():
        true = np.full(len(k), level)
        if dips and sid in dips:
            start, stop, depth = dips[sid]
            true[(k >= start) & (k < stop)] *= 1 - depth
        err = np.full(len(k), level / snr)
        parts.append(
            pd.DataFrame(
                {
                    "source_id": sid,
                    "night_index": k,
                    "mjd": mjd,
                    "flux_mjy": true + err * rng.standard_normal(len(k)),
                    "err_mjy": err,
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def _stats(engine) -> pd.DataFrame:
    return snapshots.table_snapshot(engine, "variability_stats", exclude=STATS_VOLATILE)


# --------------------------------------------------------------------------------------------------
# Bins against an independent per-night computation
# --------------------------------------------------------------------------------------------------


def _reference_bins(epochs: pd.DataFrame, k: float) -> pd.DataFrame:
    """Per (source, night) weighted mean, error, scatter: a plain loop, no sums."""
    rows = []
    for (sid, night), g in epochs.groupby(["source_id", "night_index"], sort=True):
        f = g["flux_mjy"].to_numpy(float)
        e = g["err_mjy"].to_numpy(float)
        w = 1.0 / (e**2 + (k * f) ** 2)
        mean = np.sum(w * f) / np.sum(w)
        n = len(f)
        rows.append(
            {
                "source_id": sid,
                "night": _night(night),
                "flux_mjy": mean,
                "flux_err_mjy": 1.0 / np.sqrt(np.sum(w)),
                "n_epochs": n,
                "first_mjd": g["mjd"].min(),
                "last_mjd": g["mjd"].max(),
                "night_chi2_nu": np.sum(w * (f - mean) ** 2) / (n - 1) if n > 1 else np.nan,
                "night_std_mjy": np.std(f, ddof=1) if n > 1 else np.nan,
            }
        )
    return pd.DataFrame(rows)


def test_bins_equal_an_independent_per_night_computation(engine):
    rng = np.random.default_rng(21)
    parts = []
    for s, level in enumerate((5.0, 40.0, 800.0)):
        for k in range(12):
            n = int(rng.integers(1, 9))  # 1 to 8 epochs a night
            mjd = FIRST_MJD + k + np.sort(rng.uniform(0.2, 0.6, n))
            err = level * rng.uniform(0.02, 0.2, n)
            scatter = 4.0 if k == 7 and s == 1 else 1.0  # a night with excess scatter
            parts.append(
                pd.DataFrame(
                    {
                        "source_id": f"S{s}",
                        "night_index": k,
                        "mjd": mjd,
                        "flux_mjy": level + scatter * err * rng.standard_normal(n),
                        "err_mjy": err,
                    }
                )
            )
    epochs = pd.concat(parts, ignore_index=True)
    # A blank (excluded) measurement in a night: it must not enter the bin.
    blank = epochs.iloc[[0]].assign(flux_mjy=1e4, mjd=epochs["mjd"].iloc[0] + 0.01)
    nights = _write_survey(engine, pd.concat([epochs, blank.assign(quality_flag=FLAG_BLANK)]))
    for night in nights:
        update_variability(engine, [night], flux_scale_error=FSE)

    got = nightly_lightcurves(engine, ["S0", "S1", "S2"])
    assert list(got.columns) == list(BIN_COLUMNS)
    ref = _reference_bins(epochs, FSE)
    got = got.sort_values(["source_id", "night"]).reset_index(drop=True)
    assert got["source_id"].tolist() == ref["source_id"].tolist()
    assert got["night"].tolist() == ref["night"].tolist()
    assert (got["n_epochs"].to_numpy() == ref["n_epochs"].to_numpy()).all()
    for col in ("flux_mjy", "flux_err_mjy", "first_mjd", "last_mjd"):
        np.testing.assert_allclose(got[col], ref[col], rtol=1e-12, err_msg=col)
    for col in ("night_chi2_nu", "night_std_mjy"):  # from sums of squares about a shift
        np.testing.assert_allclose(got[col], ref[col], rtol=1e-9, equal_nan=True, err_msg=col)
    np.testing.assert_allclose(got["mjd"], 0.5 * (ref["first_mjd"] + ref["last_mjd"]), rtol=1e-15)
    # The night with excess scatter stands out.
    chi2 = got.set_index(["source_id", "night"])["night_chi2_nu"]
    assert chi2.loc[("S1", _night(7))] > 4 * np.nanmedian(chi2.to_numpy())

    # The same bins from raw epochs of any pipeline (the in-memory path).
    table = epochs.assign(night=epochs["night_index"].map(_night), flux_err_mjy=epochs["err_mjy"])
    mem = bin_measurements(table, flux_scale_error=FSE).sort_values(["source_id", "night"])
    for col in ("flux_mjy", "flux_err_mjy", "night_chi2_nu"):
        np.testing.assert_allclose(mem[col], ref[col], rtol=1e-9, equal_nan=True, err_msg=col)


def test_a_night_with_an_unusable_error_gives_no_bin_error_and_no_dip():
    sums = night_partial_sums(
        pd.DataFrame(
            {
                "source_id": "S",
                "night": ["a", "a", "b", "c", "d"],
                "mjd": [1.1, 1.2, 2.1, 3.1, 4.1],
                "flux_mjy": [10.0, 12.0, 11.0, 9.0, 10.5],
                "flux_err_mjy": [1.0, 0.0, 1.0, 1.0, 1.0],
                "shift_mjy": 10.0,
            }
        )
    )
    bins = night_bins(sums)
    assert np.isnan(bins["flux_err_mjy"].iloc[0]) and bins["flux_mjy"].iloc[0] == 11.0
    window = binned_window_metrics(bins)
    assert np.isnan(window["dip_significance"].iloc[0])  # as unbinned: a bad error, no dip
    assert window["median_flux_mjy"].iloc[0] == pytest.approx(10.75)


# --------------------------------------------------------------------------------------------------
# Binned and unbinned: identical moments; identical everything with one epoch a night
# --------------------------------------------------------------------------------------------------


def test_whole_history_moments_identical_binned_and_unbinned(engine):
    rng = np.random.default_rng(5)
    sources = {"A": 12.0, "B": 150.0, "C": 3.0}
    epochs = _dense_epochs(rng, sources, nights=20, per_night=6, snr=8.0, dips={"B": (8, 14, 0.3)})
    nights = _write_survey(engine, epochs)
    for night in nights:
        update_variability(engine, [night], flux_scale_error=FSE, bin_nights="on")
    binned = _stats(engine)
    update_variability(engine, [nights[-1]], flux_scale_error=FSE, bin_nights="off")
    unbinned = _stats(engine)
    for col in MOMENT_COLUMNS[1:]:
        np.testing.assert_allclose(
            binned[col].to_numpy(float), unbinned[col].to_numpy(float), rtol=1e-12, err_msg=col
        )
    assert (binned["n_obs"] == 20 * 6).all()
    # The window statistics did change: six epochs a night, the robust std of nightly means is
    # ~sqrt(6) below the epoch scatter of the stable sources.
    ratio = (binned["robust_std_mjy"] / unbinned["robust_std_mjy"]).to_numpy()
    assert ratio[[0, 2]].max() < 0.75, ratio
    assert (binned["dip_n_epochs"] % 6 == 0).all()  # whole nights


def test_one_epoch_a_night_binned_equals_unbinned(engine):
    """A sparse survey: auto keeps the raw epochs (bit-identical to off); on gives the same to
    rounding, the dip included."""
    rng = np.random.default_rng(8)
    nights_idx = np.sort(rng.choice(np.arange(200), size=45, replace=False))
    parts = []
    for sid, level, dip in (("D", 30.0, True), ("E", 8.0, False), ("F", 500.0, False)):
        mjd = FIRST_MJD + nights_idx + rng.uniform(0.1, 0.9, len(nights_idx))
        true = np.where(dip & (nights_idx >= 80) & (nights_idx < 130), 0.6 * level, level)
        err = level * rng.uniform(0.03, 0.08, len(mjd))
        parts.append(
            pd.DataFrame(
                {
                    "source_id": sid,
                    "night_index": nights_idx,
                    "mjd": mjd,
                    "flux_mjy": true + err * rng.standard_normal(len(mjd)),
                    "err_mjy": err,
                }
            )
        )
    _write_survey(engine, pd.concat(parts, ignore_index=True))
    results = {}
    for mode in ("off", "auto", "on"):
        recompute_variability(engine, flux_scale_error=FSE, bin_nights=mode)
        results[mode] = _stats(engine)
    pd.testing.assert_frame_equal(results["auto"], results["off"], check_exact=True)
    on, off = results["on"], results["off"]
    assert abs(off.set_index("source_id").loc["D", "dip_significance"]) > DEFAULT_MIN_DIP_SIGMA
    assert (on["dip_n_epochs"] == off["dip_n_epochs"]).all()
    for col in on.columns.drop("source_id"):
        np.testing.assert_allclose(
            on[col].to_numpy(float),
            off[col].to_numpy(float),
            rtol=1e-12,
            atol=0,
            equal_nan=True,
            err_msg=col,
        )


# --------------------------------------------------------------------------------------------------
# An ESE at dense cadence
# --------------------------------------------------------------------------------------------------


def test_ese_at_dense_cadence_found_binned_like_unbinned(engine):
    """12 epochs a night for 60 nights, a 20-night 30 % dip at per-epoch S/N 8: binned and
    unbinned find it with comparable significance over the same nights; stable sources stay quiet.

    (Measured with the same generator, 30 seeds: median S binned/unbinned 1.01 at S/N 8; 0.7-0.8
    at S/N 3-5, where the dip covers a third of this short history and the MAD-based excess noise
    absorbs more of a dip that bins resolve at >= 2 sigma a night; 0.95-0.98 at S/N 2-4 in a
    365-night window.)"""
    rng = np.random.default_rng(2024)
    ese = [f"ESE{i}" for i in range(6)]
    stable = [f"ST{i}" for i in range(6)]
    sources = {sid: float(rng.uniform(10, 50)) for sid in ese + stable}
    dips = {sid: (20, 40, 0.3) for sid in ese}
    epochs = _dense_epochs(rng, sources, nights=60, per_night=12, snr=8.0, dips=dips)
    nights = _write_survey(engine, epochs)
    update_variability(engine, nights, flux_scale_error=FSE)  # auto: every source binned
    binned = _stats(engine).set_index("source_id")
    update_variability(engine, [nights[-1]], flux_scale_error=FSE, bin_nights="off")
    unbinned = _stats(engine).set_index("source_id")

    s_bin = binned.loc[ese, "dip_significance"].to_numpy(float)
    s_raw = unbinned.loc[ese, "dip_significance"].to_numpy(float)
    assert (s_raw < -DEFAULT_MIN_DIP_SIGMA).all(), s_raw
    assert (s_bin < -DEFAULT_MIN_DIP_SIGMA).all(), s_bin
    assert 0.75 <= np.median(s_bin / s_raw) <= 1.33, (s_bin, s_raw)
    start, end = FIRST_MJD + 20, FIRST_MJD + 40
    for stats in (binned, unbinned):
        found = stats.loc[ese]
        assert (abs(found["dip_start_mjd"] - start) < 3).all(), found["dip_start_mjd"]
        assert (abs(found["dip_end_mjd"] - end) < 3).all(), found["dip_end_mjd"]
        # Depth against the median, which a dip over a third of the epochs pulls down a little.
        assert found["dip_depth_frac"].between(-0.34, -0.2).all(), found["dip_depth_frac"]
    # Binned windows are whole nights: their epochs are a multiple of 12.
    assert (binned.loc[ese, "dip_n_epochs"] % 12 == 0).all()
    for stats in (binned, unbinned):
        assert (stats.loc[stable, "dip_significance"].abs() < DEFAULT_MIN_DIP_SIGMA).all()


# --------------------------------------------------------------------------------------------------
# What the stage reads
# --------------------------------------------------------------------------------------------------


def _count_rows(monkeypatch, module, name: str, counts: dict[str, int]) -> None:
    original = getattr(module, name)

    def counted(*args, **kwargs):
        frame = original(*args, **kwargs)
        counts[name] = counts.get(name, 0) + len(frame)
        return frame

    monkeypatch.setattr(module, name, counted)


@pytest.mark.parametrize(
    ("bin_nights", "per_night"), [("auto", 24), ("on", 24), ("off", 24), ("auto", 6)]
)
def test_stage_reads_one_row_per_source_and_night_of_the_window(
    engine, monkeypatch, bin_nights, per_night
):
    rng = np.random.default_rng(3)
    sources = {f"R{i}": 20.0 + i for i in range(5)}
    n_nights, window_days = 25, 20.0
    epochs = _dense_epochs(rng, sources, nights=n_nights, per_night=per_night, snr=20.0)
    nights = _write_survey(engine, epochs)
    update_variability(engine, nights, flux_scale_error=FSE)
    counts: dict[str, int] = {}
    _count_rows(monkeypatch, statistics_db, "window_night_sums", counts)
    _count_rows(monkeypatch, photometry_db, "window_photometry", counts)
    stats = update_variability(
        engine,
        [nights[-1]],
        flux_scale_error=FSE,
        dip_window_days=window_days,
        bin_nights=bin_nights,
    )
    assert len(stats) == len(sources)
    # Nights whose mid-time is within the window of the last epoch: 20; the raw window's epochs.
    last = epochs["mjd"].max()
    mid = FIRST_MJD + np.arange(n_nights) + 0.3 + 0.01 * (per_night - 1)
    window_nights = int((mid >= last - window_days).sum())
    assert window_nights == 20
    raw_rows = int((epochs["mjd"] >= last - window_days).sum())
    assert raw_rows >= len(sources) * window_nights * per_night
    if bin_nights == "off":  # every epoch of the window: grows with the cadence
        assert "window_night_sums" not in counts
        assert counts["window_photometry"] == raw_rows
    elif per_night * window_nights > AUTO_BIN_ABOVE_EPOCHS:  # one row per night, any cadence
        assert counts["window_night_sums"] == len(sources) * window_nights
        assert counts.get("window_photometry", 0) == 0
        assert (stats["dip_n_epochs"].dropna() % per_night == 0).all()  # whole nights
    else:  # auto on a cheap window: its exact epochs, no more rows than a binned year
        assert counts["window_night_sums"] == len(sources) * window_nights
        assert counts["window_photometry"] == raw_rows <= len(sources) * AUTO_BIN_ABOVE_EPOCHS


def test_window_read_ignores_nights_before_the_window(engine):
    """The night floor of the read: nights far older than the window are never returned, and the
    mid-night rule decides the boundary night (the raw read would take its last epochs)."""
    rng = np.random.default_rng(4)
    epochs = _dense_epochs(rng, {"W": 10.0}, nights=30, per_night=4, snr=10.0)
    nights = _write_survey(engine, epochs)
    update_variability(engine, nights, flux_scale_error=FSE)
    last = epochs["mjd"].max()  # night 29 + 0.36 d
    rows = statistics_db.window_night_sums(engine, ["W"], 10.0)
    mids = 0.5 * (rows["first_mjd"] + rows["last_mjd"])
    assert (mids >= last - 10.0).all() and len(rows) == 10  # nights 20..29 (mid 0.33 d)
    raw = photometry_db.window_photometry(engine, ["W"], 10.0)
    assert len(raw) == 10 * 4 + 1  # plus the last epoch of night 19 (0.36 d)
    assert len(statistics_db.window_night_sums(engine, ["W"], 1e6)) == 30
    assert statistics_db.window_night_sums(engine, [], 10.0).empty


# --------------------------------------------------------------------------------------------------
# The setting
# --------------------------------------------------------------------------------------------------


def test_bin_nights_setting(monkeypatch):
    monkeypatch.delenv("ESE_BIN_NIGHTS", raising=False)
    assert Settings.from_env().bin_nights == DEFAULT_BIN_NIGHTS == "auto"
    monkeypatch.setenv("ESE_BIN_NIGHTS", " OFF ")
    settings = Settings.from_env()
    assert settings.bin_nights == "off"
    assert resources_from_settings(settings, bind_env=False)["detection"].bin_nights == "off"
    monkeypatch.setenv("ESE_BIN_NIGHTS", "sometimes")
    with pytest.raises(ValueError, match=r"ESE_BIN_NIGHTS.*auto, on, off"):
        Settings.from_env()
    with pytest.raises(ValueError, match="bin_nights"):
        validate_bin_nights("yes")


def test_auto_rule_bins_expensive_windows_with_multi_epoch_nights():
    cap = AUTO_BIN_ABOVE_EPOCHS
    bins = pd.DataFrame(
        {
            "source_id": ["dense"] * 2 + ["cheap"] * 3 + ["sparse"] * (cap + 10),
            "n_epochs": [cap, 1] + [2, 2, 2] + [1] * (cap + 10),
        }
    )
    assert list(sources_to_bin(bins, "auto")) == ["dense"]
    assert list(sources_to_bin(bins, "on")) == ["cheap", "dense", "sparse"]
    assert list(sources_to_bin(bins, "off")) == []
    assert list(sources_to_bin(bins.iloc[:0], "auto")) == []


def test_window_columns_are_the_stage_columns():
    # The binned path fills exactly the columns the unbinned path fills.
    epochs = _dense_epochs(np.random.default_rng(1), {"X": 5.0}, nights=6, per_night=3, snr=5)
    table = epochs.assign(night=epochs["night_index"].map(_night), flux_err_mjy=epochs["err_mjy"])
    out = binned_window_metrics(bin_measurements(table, flux_scale_error=FSE))
    assert list(out.columns) == list(WINDOW_COLUMNS)
