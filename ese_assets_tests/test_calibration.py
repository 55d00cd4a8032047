"""Per-image flux-scale calibration (ese_assets.core.calibration) against simulated truth.

The simulator here is independent of the module: it draws true fluxes, per-image gains (2 % rms,
1 % of images off by 10-20 %), 5 % red-noise variables, single-epoch outliers, quoted errors 10 %
off and one ESE, and the tests compare what the calibration recovers with the injected truth.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ese_assets.core.calibration import (
    IMAGE_GAIN_COLUMNS,
    NORMALIZED_COLUMNS,
    CalibrationOptions,
    calibrate_measurements,
)


def simulate(
    seed: int = 1,
    n_sources: int = 400,
    n_nights: int = 120,
    images_per_night: int = 3,
    rms_mjy: float = 0.5,
    bad_fraction: float = 0.01,
    variable_fraction: float = 0.05,
    n_outlier_sources: int = 4,
):
    """Measurements (source_id, image_id, mjd, flux_mjy, flux_err_mjy) and the truth."""
    rng = np.random.default_rng(seed)
    n_img = n_nights * images_per_night
    mjd = (
        60000.0
        + np.repeat(np.arange(n_nights), images_per_night)
        + np.tile(np.arange(images_per_night) * 0.05, n_nights)
    )
    gains = 1.0 + 0.02 * rng.standard_normal(n_img)
    n_bad = max(1, round(bad_fraction * n_img))
    bad_images = rng.choice(n_img, n_bad, replace=False)
    gains[bad_images] *= 1.0 + rng.choice([-1, 1], n_bad) * rng.uniform(0.10, 0.20, n_bad)

    true_flux = 3.0 * (1.0 - rng.random(n_sources)) ** (-1 / 0.8)  # power law from 3 mJy
    true_flux = np.minimum(true_flux, 3000.0)
    ids = np.array([f"S{i:04d}" for i in range(n_sources)])
    light = np.tile(true_flux[:, None], (1, n_img))
    # red-noise variables: AR(1) over nights with 30-300 day timescale, 2-10 % rms
    n_var = round(variable_fraction * n_sources)
    variables = rng.choice(np.arange(1, n_sources), n_var, replace=False)
    rms_var = rng.uniform(0.02, 0.10, n_var)
    tau = rng.uniform(30, 300, n_var)
    t = mjd - mjd[0]
    for k, s in enumerate(variables):
        x = np.zeros(n_img)
        x[0] = rng.standard_normal()
        for j in range(1, n_img):
            a = np.exp(-(t[j] - t[j - 1]) / tau[k])
            x[j] = a * x[j - 1] + np.sqrt(1 - a * a) * rng.standard_normal()
        light[s] *= 1.0 + rms_var[k] * x
    # one ESE: a bright stable source dips by 30 % for 20 nights
    ese = 0
    true_flux[ese] = 200.0
    light[ese] = 200.0
    in_dip = (t >= 50) & (t < 70)
    light[ese, in_dip] *= 0.7
    # single-epoch outliers
    outlier_sources = rng.choice(
        np.setdiff1d(np.arange(1, n_sources), variables), n_outlier_sources, replace=False
    )
    outlier_epochs = rng.integers(0, n_img, n_outlier_sources)
    light[outlier_sources, outlier_epochs] *= 1.5

    quoted_factor = rng.choice([0.9, 1.1], n_sources)  # quoted errors 10 % off
    noise = rms_mjy * rng.standard_normal((n_sources, n_img))
    measured = light * gains[None, :] + noise
    quoted = np.tile((rms_mjy * quoted_factor)[:, None], (1, n_img))
    table = pd.DataFrame(
        {
            "source_id": np.repeat(ids, n_img),
            "image_id": np.tile([f"img{j:05d}" for j in range(n_img)], n_sources),
            "mjd": np.tile(mjd, n_sources),
            "flux_mjy": measured.ravel(),
            "flux_err_mjy": quoted.ravel(),
        }
    )
    truth = {
        "gains": gains,
        "bad_images": np.sort(bad_images),
        "true_flux": true_flux,
        "light": light,
        "ids": ids,
        "variables": variables,
        "rms_var": rms_var,
        "ese": ese,
        "in_dip": in_dip,
        "mjd": mjd,
        "rms_mjy": rms_mjy,
    }
    return table, truth


@pytest.fixture(scope="module")
def survey():
    table, truth = simulate()
    catalog = pd.Series(truth["true_flux"], index=truth["ids"])
    rows, images = calibrate_measurements(table, catalog_flux_mjy=catalog)
    return table, truth, rows, images


def test_columns_and_rows(survey):
    table, _truth, rows, images = survey
    assert list(images.columns) == list(IMAGE_GAIN_COLUMNS)
    assert len(rows) == len(table) and rows.index.equals(table.index)
    assert set(NORMALIZED_COLUMNS) <= set(rows.columns)
    assert images["image_id"].is_unique and images["calibrated"].all()
    assert (images["n_ref"] >= 20).all()


def test_gains_recovered_within_errors(survey):
    _table, truth, _rows, images = survey
    good = ~np.isin(np.arange(len(images)), truth["bad_images"])
    # Baselines carry the data's scale: gains are the true ones up to one common factor c.
    c = np.median(truth["gains"][good] / images["gain"].to_numpy()[good])
    z = (images["gain"].to_numpy() - truth["gains"] / c) / images["gain_err"].to_numpy()
    assert abs(c - 1) < 0.005
    assert 0.6 < np.std(z[good]) < 1.5, np.std(z[good])
    assert np.mean(np.abs(z[good]) < 4) > 0.99
    # the errors are small compared with the 2 % scatter being corrected
    assert np.median(images["gain_err"]) < 0.005
    # bad images: their (large) gains are recovered too
    bad = truth["bad_images"]
    assert np.all(np.abs(z[bad]) < 5), z[bad]


def test_median_estimator_recovers_gains_within_errors():
    table, truth = simulate(seed=12, n_sources=300, n_nights=60)
    _rows, images = calibrate_measurements(table, gain_estimator="median")
    good = ~np.isin(np.arange(len(images)), truth["bad_images"])
    c = np.median(truth["gains"][good] / images["gain"].to_numpy()[good])
    z = (images["gain"].to_numpy() - truth["gains"] / c) / images["gain_err"].to_numpy()
    assert 0.6 < np.std(z[good]) < 1.5, np.std(z[good])
    assert set(truth["bad_images"]) <= set(np.flatnonzero(images["bad"].to_numpy()))
    with pytest.raises(ValueError, match="gain_estimator"):
        calibrate_measurements(table, gain_estimator="mode")


def test_bad_images_flagged(survey):
    _table, truth, rows, images = survey
    flagged = np.flatnonzero(images["bad"].to_numpy())
    assert set(truth["bad_images"]) <= set(flagged)
    assert len(set(flagged) - set(truth["bad_images"])) <= 0.01 * len(images)
    assert images.loc[images["bad"], "reason"].str.contains("sigma from 1").all()
    assert images.loc[~images["bad"], "reason"].isna().all()
    bad_ids = set(images.loc[images["bad"], "image_id"])
    assert rows["bad_image"].to_numpy().tolist() == rows["image_id"].isin(bad_ids).tolist()


def test_variable_sources_not_references(survey):
    _table, truth, rows, _images = survey
    used = rows.groupby("source_id")["reference"].any()
    ids = truth["ids"]
    noise_frac = truth["rms_mjy"] / truth["true_flux"][truth["variables"]]
    # realized fractional rms of each variable's true lightcurve over the survey
    light = truth["light"][truth["variables"]]
    realized = np.std(light, axis=1) / np.mean(light, axis=1)
    # variables whose intrinsic rms clearly exceeds their noise are never references
    clear = (realized > 3 * noise_frac) & (realized > 0.02)
    assert clear.sum() >= 3
    assert not used[ids[truth["variables"][clear]]].any()
    # ...while plenty of stable bright sources are
    stable_bright = np.setdiff1d(np.flatnonzero(truth["true_flux"] > 30), truth["variables"])
    assert used[ids[stable_bright]].mean() > 0.9


def test_normalization_removes_gain_scatter(survey):
    _table, truth, rows, images = survey
    good_img = ~images["bad"].to_numpy()
    bright = np.setdiff1d(np.flatnonzero(truth["true_flux"] > 100), truth["variables"])
    bright = bright[bright != truth["ese"]]
    sel = rows["source_id"].isin(truth["ids"][bright]).to_numpy()
    img = rows["image_id"].str[3:].astype(int).to_numpy()
    sel = sel & good_img[img]
    true = truth["light"][rows["source_id"].str[1:].astype(int).to_numpy()[sel], img[sel]]
    raw = rows["flux_mjy"].to_numpy()[sel] / true - 1
    norm = rows["normalized_flux_mjy"].to_numpy()[sel] / true - 1
    # raw ratios carry the 2 % gain scatter, normalized ones only the noise and gain errors
    assert np.std(raw) > 0.018
    assert np.std(norm - np.median(norm)) < 0.006
    # normalized errors describe the normalized scatter (quoted errors 10 % off either way)
    pull = (rows["normalized_flux_mjy"].to_numpy()[sel] - true * np.median(norm + 1)) / rows[
        "normalized_flux_err_mjy"
    ].to_numpy()[sel]
    assert 0.9 < np.std(pull) < 1.25, np.std(pull)


def test_ese_dip_preserved(survey):
    _table, truth, rows, images = survey
    ese = rows[rows["source_id"] == truth["ids"][truth["ese"]]].sort_values("mjd")
    good = ~ese["bad_image"].to_numpy()
    in_dip = truth["in_dip"][good]
    norm = ese["normalized_flux_mjy"].to_numpy()[good]
    err = ese["normalized_flux_err_mjy"].to_numpy()[good]
    depth = np.mean(norm[in_dip]) / np.median(norm[~in_dip]) - 1
    depth_err = np.std(norm[in_dip]) / np.sqrt(in_dip.sum()) / np.median(norm[~in_dip])
    assert abs(depth - (-0.30)) < 4 * depth_err + 0.003, (depth, depth_err)
    # each epoch agrees with the injected truth (times the common scale c of the gains: the
    # baselines carry the data's scale) within its error
    c = np.median(truth["gains"] / images["gain"].to_numpy())
    truth_flux = c * truth["light"][truth["ese"]][good]
    pull = (norm - truth_flux) / err
    assert np.std(pull) < 1.4 and abs(np.mean(pull)) < 0.5
    # the dip does not pull its images' gains: gains in the dip are unbiased
    dip_images = ese["image_id"].to_numpy()[good][in_dip]
    g = images.set_index("image_id").loc[dip_images, "gain"].to_numpy()
    g_true = truth["gains"][[int(i[3:]) for i in dip_images]]
    assert abs(np.mean(c * g / g_true) - 1) < 0.002


def test_night_of_bad_gain_is_flagged_even_when_uniform():
    """A whole night off by 15 % is flagged (gains are judged against 1, not the night)."""
    table, _truth = simulate(seed=3, n_sources=200, n_nights=40, images_per_night=5)
    night_rows = table["mjd"].between(60020, 60020.9)
    table.loc[night_rows, "flux_mjy"] *= 0.85
    _rows, images = calibrate_measurements(table)
    in_night = images["mjd"].between(60020, 60020.9)
    assert in_night.sum() == 5 and images.loc[in_night, "bad"].all()
    assert images.loc[in_night, "gain"].between(0.80, 0.87).all()


def test_direction_dependent_error_flagged_by_scatter():
    """An image whose flux scale varies across the field: large reference scatter -> bad."""
    table, _truth = simulate(seed=4, n_sources=300, n_nights=30, images_per_night=2, bad_fraction=0)
    rng = np.random.default_rng(9)
    sick = table["image_id"] == "img00011"
    table.loc[sick, "flux_mjy"] *= 1 + 0.15 * rng.standard_normal(sick.sum())
    _rows, images = calibrate_measurements(table)
    row = images.set_index("image_id").loc["img00011"]
    assert row["bad"] and "reference scatter" in row["reason"]
    assert images["bad"].sum() <= 2


def test_catalog_baselines_then_prior():
    """Without history: catalog baselines (rescaled by the data's scale); with a prior."""
    table, truth = simulate(seed=5, n_sources=300, n_nights=1, images_per_night=1, bad_fraction=0)
    # a catalog at another frequency: 30 % brighter, with 5 % per-source scatter
    rng = np.random.default_rng(2)
    cat = pd.Series(truth["true_flux"] * 1.3 * (1 + 0.05 * rng.standard_normal(300)), truth["ids"])
    _rows, images = calibrate_measurements(table, catalog_flux_mjy=cat)
    assert images["calibrated"].all() and not images["bad"].any()
    # one image: kappa (the catalog's scale) absorbs its gain, which is 1 within its error
    assert abs(images["gain"].iloc[0] - 1) < 3 * images["gain_err"].iloc[0]
    # with prior baselines (a history of earlier nights) the gain is measured absolutely
    prior = pd.DataFrame({"baseline_mjy": truth["true_flux"], "n_history": 10}, index=truth["ids"])
    _rows, images = calibrate_measurements(table, catalog_flux_mjy=cat, prior_baselines=prior)
    g = images["gain"].iloc[0]
    assert abs(g - truth["gains"][0]) < 4 * images["gain_err"].iloc[0]
    # and a prior-variable source is no reference
    prior["variable"] = False
    prior.loc[truth["ids"][:50], "variable"] = True
    rows, _ = calibrate_measurements(table, prior_baselines=prior)
    assert not rows.loc[rows["source_id"].isin(truth["ids"][:50]), "reference"].any()


def test_bright_ese_hosts_of_a_small_field_do_not_set_the_gain():
    """A field with 6 references, 2 of them the brightest and in ESEs at the same time (one at a
    caustic that doubles it, one in a 60 % dip): the gains stay those of the stable references,
    no image is flagged bad, and the events keep their depth after normalization."""
    rng = np.random.default_rng(21)
    n_img, mjd = 40, 60000.0 + np.arange(40)
    flux = np.array([400.0, 300.0, 60.0, 50.0, 40.0, 30.0])
    gains = 1 + 0.02 * rng.standard_normal(n_img)
    light = np.tile(flux[:, None], (1, n_img))
    event = (np.arange(n_img) >= 15) & (np.arange(n_img) < 23)
    light[0, event] *= 2.0  # caustic
    light[1, event] *= 0.4  # dip
    measured = light * gains + 0.5 * rng.standard_normal(light.shape)
    table = pd.DataFrame(
        {
            "source_id": np.repeat([f"S{i}" for i in range(6)], n_img),
            "image_id": np.tile(np.arange(n_img), 6),
            "mjd": np.tile(mjd, 6),
            "flux_mjy": measured.ravel(),
            "flux_err_mjy": 0.5,
        }
    )
    rows, images = calibrate_measurements(table)
    assert images["calibrated"].all() and not images["bad"].any(), images[images["bad"]]
    c = np.median(gains / images["gain"].to_numpy())
    pull = (images["gain"].to_numpy() - gains / c) / images["gain_err"].to_numpy()
    # (errors from 4-6 residuals each: noisy themselves)
    assert np.std(pull) < 1.5 and np.abs(pull).max() < 5
    host = rows[rows["source_id"] == "S1"].sort_values("mjd")["normalized_flux_mjy"].to_numpy()
    assert abs(np.mean(host[event]) / np.median(host[~event]) - 0.4) < 0.02
    # when fewer than min_refs references agree, the image is left uncalibrated, not bad
    few = table[table["source_id"].isin(["S0", "S1", "S2", "S3"])]
    _rows, images = calibrate_measurements(few)
    in_event = images["image_id"].isin(np.flatnonzero(event))
    assert not images["bad"].any()
    assert (~images.loc[in_event, "calibrated"]).all()
    assert images.loc[in_event, "reason"].str.contains("only 2 of 4 references agree").all()


def test_too_few_references_leaves_image_uncalibrated():
    table, _truth = simulate(seed=6, n_sources=40, n_nights=5, images_per_night=2, bad_fraction=0)
    _rows, images = calibrate_measurements(table, min_ref_snr=1e6)
    assert (~images["calibrated"]).all() and (images["gain"] == 1).all()
    assert images["reason"].str.startswith("not calibrated").all()
    rows, _ = calibrate_measurements(table, min_ref_snr=1e6)
    assert np.array_equal(rows["normalized_flux_mjy"], rows["flux_mjy"])


def test_bad_options_and_columns():
    table, _ = simulate(seed=7, n_sources=30, n_nights=3, images_per_night=1)
    with pytest.raises(ValueError, match="unknown calibration option"):
        calibrate_measurements(table, min_snr=3)
    with pytest.raises(ValueError, match="min_refs"):
        CalibrationOptions(min_refs=0)
    with pytest.raises(ValueError, match="lack column"):
        calibrate_measurements(table.drop(columns="image_id"))


def test_deterministic_and_order_free():
    table, _ = simulate(seed=8, n_sources=100, n_nights=10, images_per_night=2)
    rows1, images1 = calibrate_measurements(table)
    shuffled = table.sample(frac=1.0, random_state=3)
    rows2, images2 = calibrate_measurements(shuffled)
    pd.testing.assert_frame_equal(images1, images2)
    pd.testing.assert_frame_equal(rows1, rows2.loc[rows1.index])
