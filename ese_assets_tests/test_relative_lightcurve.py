"""Relative lightcurves (``Source.calculate_relative_lightcurve``) on a real products database.

One simulated survey (10 nights x 4 images, an ESE, two bright variables) in which one image has a
15 % flux-scale error, ingested through ``ese_assets.ingest`` (real FITS, real Dagster runs, real
SQL). The simulator's truth (each source's intrinsic flux per image) is the independent reference:
the relative lightcurve must follow it, the bad image included, while the raw fluxes do not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits

from ese_assets.api import Source
from ese_assets.core.relative import cone_box, relative_lightcurve
from ese_assets.core.simulate import SurveyConfig, simulate_survey
from ese_assets.storage import cone as cone_db
from ese_assets.storage import statistics as statistics_db
from ese_assets.storage.engine import make_engine
from ese_assets_tests.survey import ingest_survey

SURVEY = SurveyConfig(
    seed=4242,
    n_nights=10,
    images_per_night=4,
    npix=256,
    n_sources=80,
    flux_min_mjy=5.0,
    n_variables=2,
    variable_min_flux_mjy=30.0,
    variable_modulation=(0.2, 0.3),
    n_ese=1,
    ese_depths=(0.4,),
    ese_duration_days=(4.0, 4.0),
    ese_t0_window=(0.6, 0.6),
    ese_min_flux_mjy=50.0,
    cube_fraction=0.0,
)
BAD_GAIN = 0.85  # the injected flux-scale error of one image, outside the event
BAD_IMAGE_NIGHT = "2025-01-02"  # its second image
RADIUS_DEG, MAX_ETA, MIN_NEIGHBORS = 0.5, 1.5, 3  # the seed guide's example


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    out = tmp_path_factory.mktemp("relative_survey")
    simulate_survey(SURVEY, out)
    images = pd.read_csv(out / "truth_images.csv")
    bad = images.index[images["date_obs"].str[:10] == BAD_IMAGE_NIGHT][1]
    bad_file = Path(images.at[bad, "image"]).name
    path = out / "incoming" / bad_file
    with fits.open(path) as hdul:  # every pixel, sources and noise alike
        data, header = hdul[0].data * np.float32(BAD_GAIN), hdul[0].header.copy()
    fits.writeto(path, data.astype(np.float32), header, overwrite=True)
    return out, bad_file


@pytest.fixture(scope="module")
def products(survey, tmp_path_factory):
    survey_dir, _bad = survey
    return ingest_survey(tmp_path_factory.mktemp("relative_run"), survey_dir).products_db


@pytest.fixture(scope="module")
def truth(survey):
    survey_dir, _bad = survey
    sources = pd.read_csv(survey_dir / "truth_sources.csv")
    fluxes = pd.read_csv(survey_dir / "truth_fluxes.csv")
    # intrinsic flux (ESE and variability included, image gain not)
    fluxes["intrinsic_mjy"] = fluxes["true_flux_mjy"] / fluxes["gain"]
    return sources, fluxes


def _ese_host(truth) -> str:
    sources, _fluxes = truth
    (name,) = sources.loc[sources["kind"] == "ese", "name"]
    return name


def _with_truth(epochs: pd.DataFrame, fluxes: pd.DataFrame, name: str) -> pd.DataFrame:
    frame = epochs.assign(image=epochs["image_id"].map(lambda p: Path(p).name))
    mine = fluxes[fluxes["name"] == name][["image", "intrinsic_mjy"]]
    merged = frame.merge(mine, on="image", how="left", validate="one_to_one")
    assert merged["intrinsic_mjy"].notna().all()
    return merged


def test_bad_image_cancels_and_the_ese_dip_remains(survey, products, truth):
    _dir, bad_file = survey
    _sources, fluxes = truth
    host = _ese_host(truth)
    rel = Source(host, products_db=products).calculate_relative_lightcurve(
        radius_deg=RADIUS_DEG, max_eta=MAX_ETA, min_neighbors=MIN_NEIGHBORS
    )
    ep = _with_truth(rel.epochs, fluxes, host)
    assert len(rel.neighbors) >= MIN_NEIGHBORS and (ep["n_neighbors"] >= MIN_NEIGHBORS).all()
    assert len(ep) + rel.n_images_dropped == SURVEY.n_images
    assert bad_file in set(ep["image"])  # the bad image is used, not dropped

    truth_jy = ep["intrinsic_mjy"].to_numpy() / 1e3
    rel_jy, rel_err = ep["relative_flux_jy"].to_numpy(), ep["relative_flux_err_jy"].to_numpy()
    c = np.median(rel_jy / truth_jy)  # the ensemble's scale: the survey's median gain
    assert abs(c - 1) < 0.03
    pull = (rel_jy - c * truth_jy) / rel_err
    is_bad = (ep["image"] == bad_file).to_numpy()
    assert abs(pull[is_bad][0]) < 4, ep[is_bad]
    assert np.all(np.abs(pull) < 5), ep.assign(pull=pull)
    assert 0.5 < np.std(pull) < 2.0
    # the raw flux of the bad image is ~15 % low against the same truth: an effect was removed
    raw_ratio = ep["flux_jy"].to_numpy() / (c * truth_jy)
    assert 0.80 < raw_ratio[is_bad][0] < 0.90
    assert abs(rel_jy[is_bad][0] / (c * truth_jy[is_bad][0]) - 1) < 0.04
    # ... and the ensemble saw the image's gain
    assert 0.80 < ep.loc[is_bad, "ensemble"].iloc[0] < 0.90

    # the injected dip is in the relative lightcurve at its true depth
    baseline = np.median(truth_jy)
    in_dip = truth_jy < 0.8 * baseline
    assert in_dip.sum() >= 3
    deepest = np.argmin(truth_jy)
    assert abs(rel_jy[deepest] / (c * baseline) - truth_jy[deepest] / baseline) < 0.05
    dip_depth = 1 - np.mean(rel_jy[in_dip]) / np.median(rel_jy[~in_dip])
    true_depth = 1 - np.mean(truth_jy[in_dip]) / np.median(truth_jy[~in_dip])
    assert abs(dip_depth - true_depth) < 0.03
    assert dip_depth > 0.2


def test_neighbours_are_stable_within_the_radius_and_ranked(products, truth):
    host = _ese_host(truth)
    sources, _fluxes = truth
    engine = make_engine(products)
    stats = statistics_db.variability_stats(engine).set_index("source_id")
    rel = Source(host, products_db=products).calculate_relative_lightcurve(
        RADIUS_DEG, MAX_ETA, MIN_NEIGHBORS
    )
    nb = rel.neighbors
    assert host not in rel.neighbor_ids
    # a second way to the separations: astropy
    pos = sources.set_index("name")
    here = SkyCoord(pos.at[host, "ra_deg"] * u.deg, pos.at[host, "dec_deg"] * u.deg)
    there = SkyCoord(
        stats.loc[nb["source_id"], "ra_deg"].to_numpy() * u.deg,
        stats.loc[nb["source_id"], "dec_deg"].to_numpy() * u.deg,
    )
    np.testing.assert_allclose(nb["sep_deg"], here.separation(there).deg, atol=1e-3)
    assert (nb["sep_deg"] <= RADIUS_DEG).all()
    assert (stats.loc[nb["source_id"], "eta_metric"].to_numpy() <= MAX_ETA).all()
    assert list(nb["rank"]) == list(range(1, len(nb) + 1))
    assert nb["median_frac_err"].is_monotonic_increasing
    np.testing.assert_allclose(nb["weight"].sum(), 1.0)
    # every stable source of the cone measured often enough is used: none left out silently
    all_stats = stats.assign(
        sep=here.separation(
            SkyCoord(stats["ra_deg"].values * u.deg, stats["dec_deg"].values * u.deg)
        ).deg
    )
    eligible = all_stats[(all_stats["sep"] <= RADIUS_DEG) & (all_stats["eta_metric"] <= MAX_ETA)]
    eligible = eligible.drop(index=host, errors="ignore")
    assert set(nb["source_id"]) <= set(eligible.index)
    assert len(eligible) - len(nb) == rel.excluded["few_epochs"] + rel.excluded["faint"]


def test_a_variable_neighbour_is_excluded(products, truth):
    host = _ese_host(truth)
    sources, _fluxes = truth
    variables = set(sources.loc[sources["kind"] == "variable", "name"])
    engine = make_engine(products)
    stats = statistics_db.variability_stats(engine).set_index("source_id")
    near = cone_db.sources_in_cone(
        engine, stats.at[host, "ra_deg"], stats.at[host, "dec_deg"], RADIUS_DEG
    )
    in_cone = variables & set(near["source_id"])
    assert in_cone, "the survey must put a variable inside the cone"
    assert (stats.loc[sorted(in_cone), "eta_metric"] > MAX_ETA).all()
    src = Source(host, products_db=products)
    rel = src.calculate_relative_lightcurve(RADIUS_DEG, MAX_ETA, MIN_NEIGHBORS)
    assert not in_cone & set(rel.neighbor_ids)
    assert rel.excluded["variable"] >= len(in_cone)
    # the exclusion is the eta cut: without it the variables join the ensemble
    loose = src.calculate_relative_lightcurve(RADIUS_DEG, max_eta=1e12, min_neighbors=MIN_NEIGHBORS)
    assert in_cone <= set(loose.neighbor_ids)
    assert loose.excluded["variable"] == 0


def test_too_few_neighbours_is_one_clear_line(products, truth):
    host = _ese_host(truth)
    src = Source(host, products_db=products)
    rel = src.calculate_relative_lightcurve(RADIUS_DEG, MAX_ETA, MIN_NEIGHBORS)
    n = len(rel.neighbors)
    with pytest.raises(ValueError) as err:
        src.calculate_relative_lightcurve(RADIUS_DEG, MAX_ETA, min_neighbors=n + 1)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"source {host!r}: {n} stable neighbour(s) within 0.5 deg")
    assert f"{n + 1} needed" in message
    with pytest.raises(ValueError, match=r": 0 stable neighbour\(s\) within 0.001 deg"):
        src.calculate_relative_lightcurve(0.001, MAX_ETA, MIN_NEIGHBORS)
    with pytest.raises(ValueError, match="no usable measurements"):
        Source("J000000+000000", products_db=products).calculate_relative_lightcurve()


# ------------------------------------------------------------------ the pure function, by hand


def test_formulas_on_a_hand_computed_case():
    """Two neighbours, three images: the ensemble and errors worked out by hand."""
    target = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d"],
            "mjd": [1.0, 2.0, 3.0, 4.0],
            "flux_jy": [1.0, 0.9, 0.5, 1.0],
            "flux_err_jy": [0.01] * 4,
        }
    )
    # neighbour p: median 2.0, frac err 0.01 -> weight 1e4; q: median 1.0, frac err 0.02 -> 2500
    neighbors = pd.DataFrame(
        {
            "source_id": ["p"] * 4 + ["q"] * 4 + ["v"] * 4,
            "image_id": ["a", "b", "c", "d"] * 3,
            "flux_jy": [2.0, 1.8, 2.0, 2.0, 1.0, 0.9, 1.0, 1.0, 1.0, 3.0, 0.2, 1.0],
            "flux_err_jy": [0.02] * 8 + [0.01] * 4,
        }
    )
    candidates = pd.DataFrame(
        {"source_id": ["p", "q", "v", "far"], "sep_deg": [0.2, 0.1, 0.1, 0.9], "eta": [1, 1, 50, 1]}
    )
    rel = relative_lightcurve(
        target, neighbors, candidates, radius_deg=0.5, max_eta=1.5, min_neighbors=2, source_id="t"
    )
    assert rel.neighbor_ids == ["p", "q"]  # p has the smaller fractional error
    assert rel.excluded["variable"] == 1
    w = np.array([1e4, 2500.0])
    n = np.array([[1.0, 0.9, 1.0, 1.0], [1.0, 0.9, 1.0, 1.0]])
    s = np.array([[0.01] * 4, [0.02] * 4])
    ens = (w[:, None] * n).sum(0) / w.sum()
    ens_err = np.sqrt(((w[:, None] * s) ** 2).sum(0)) / w.sum()
    f = target["flux_jy"].to_numpy()
    np.testing.assert_allclose(rel.epochs["ensemble"], ens)
    np.testing.assert_allclose(rel.epochs["ensemble_err"], ens_err)
    np.testing.assert_allclose(rel.epochs["relative_flux_jy"], f / ens)
    np.testing.assert_allclose(
        rel.epochs["relative_flux_err_jy"], np.sqrt((0.01 / ens) ** 2 + (f * ens_err / ens**2) ** 2)
    )
    np.testing.assert_allclose(rel.epochs["relative_flux_jy"], [1.0, 1.0, 0.5, 1.0])
    np.testing.assert_allclose(rel.neighbors["weight"], w / w.sum())
    # an image with only one neighbour measured is dropped at min_neighbors=2
    rel2 = relative_lightcurve(
        target,
        neighbors[~((neighbors["source_id"] == "q") & (neighbors["image_id"] == "c"))],
        candidates,
        radius_deg=0.5,
        max_eta=1.5,
        min_neighbors=2,
        source_id="t",
    )
    assert list(rel2.epochs["image_id"]) == ["a", "b", "d"] and rel2.n_images_dropped == 1


@pytest.mark.parametrize("ra0,dec0", [(0.2, 10.0), (359.9, -40.0), (180.0, 89.7), (45.0, 0.0)])
def test_cone_box_holds_the_cone(ra0, dec0):
    rng = np.random.default_rng(1)
    radius = 0.5
    centre = SkyCoord(ra0 * u.deg, dec0 * u.deg)
    pts = centre.directional_offset_by(
        rng.uniform(0, 360, 20000) * u.deg, np.sqrt(rng.uniform(0, 1, 20000)) * radius * u.deg
    )
    ra, dec = pts.ra.deg % 360.0, pts.dec.deg
    dec_min, dec_max, ranges = cone_box(ra0, dec0, radius)
    inside = (dec >= dec_min) & (dec <= dec_max)
    inside &= np.any([(ra >= lo) & (ra <= hi) for lo, hi in ranges], axis=0)
    assert inside.all()


def test_cone_query_across_ra_zero(engine):
    """The SQL box across RA 0 finds sources on both sides, and only those in the cone (SQLite
    and PostgreSQL)."""
    rows = pd.DataFrame(
        {
            "source_id": ["east", "west", "corner", "far"],
            "ra_deg": [0.3, 359.7, 0.45, 2.0],
            "dec_deg": [0.0, 0.1, 0.45, 0.0],
            "eta_metric": [1.0, 1.0, 1.0, 1.0],
            "n_obs": [5, 5, 5, 5],
        }
    )
    statistics_db.upsert_variability_stats(engine, rows)
    found = cone_db.sources_in_cone(engine, 0.0, 0.0, 0.5)
    assert list(found["source_id"]) == ["east", "west"]  # corner: in the box, not in the cone
    expected = SkyCoord(0 * u.deg, 0 * u.deg).separation(
        SkyCoord([0.3, 359.7] * u.deg, [0.0, 0.1] * u.deg)
    )
    np.testing.assert_allclose(found["sep_deg"], expected.deg, rtol=1e-9)
