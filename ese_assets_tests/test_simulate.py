"""Tests of the sky/survey simulator (ese_assets.core.simulate)."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from ese_assets import cli
from ese_assets.core import lens
from ese_assets.core import simulate as sim
from ese_assets.core.beam import FWHM_PER_SIGMA
from ese_assets.core.fits_image import Beam

CELL_DEG = 10.0 / 3600.0
BEAM = Beam(45.0 / 3600.0, 30.0 / 3600.0, 30.0)

# Small survey for the tests: 3 nights x 3 images of 128^2 px, ESEs short enough to fit in it.
SMALL = sim.SurveyConfig(
    seed=11,
    n_nights=3,
    images_per_night=3,
    npix=128,
    n_sources=30,
    n_variables=2,
    n_ese=2,
    ese_duration_days=(1.0, 2.0),
    ese_isolation_beams=2.0,
    cube_fraction=0.4,
    pointing_jitter_arcmin=1.0,
)


@pytest.fixture(scope="module")
def small_survey(tmp_path_factory):
    return sim.simulate_survey(SMALL, tmp_path_factory.mktemp("survey"))


def test_wcs_orientation_and_beam_covariance():
    wcs = sim.make_sin_wcs(150.0, 30.0, CELL_DEG, (64, 64))
    assert wcs.wcs.cdelt[0] < 0 and wcs.wcs.cdelt[1] > 0
    # Field centre on 0-based pixel (32, 32).
    np.testing.assert_allclose(wcs.wcs_world2pix(150.0, 30.0, 0), [32.0, 32.0], atol=1e-9)
    jac = sim.pixel_jacobian(wcs, 32.0, 32.0)
    np.testing.assert_allclose(jac, [[-CELL_DEG, 0], [0, CELL_DEG]], rtol=1e-6, atol=1e-12)
    s_maj = 45.0 / FWHM_PER_SIGMA / 10.0  # pixels
    s_min = 30.0 / FWHM_PER_SIGMA / 10.0
    for pa, direction in [(0.0, (0.0, 1.0)), (90.0, (-1.0, 0.0)), (30.0, (-0.5, np.sqrt(0.75)))]:
        cov = sim.beam_covariance_pix(wcs, Beam(BEAM.major_deg, BEAM.minor_deg, pa))
        vals, vecs = np.linalg.eigh(cov)
        np.testing.assert_allclose(vals, [s_min**2, s_maj**2], rtol=1e-5)
        # Major axis: east of north, and east is towards -x (RA increases to the left).
        assert abs(abs(vecs[:, 1] @ np.array(direction)) - 1) < 1e-6
    # Mirrored image (RA increasing to the right): the major axis of PA 30 tilts towards +x.
    hdr = sim.celestial_header(150.0, 30.0, CELL_DEG, (64, 64))
    hdr["CDELT1"] = CELL_DEG
    cov = sim.beam_covariance_pix(WCS(hdr), BEAM)
    major = np.linalg.eigh(cov)[1][:, 1]
    assert abs(abs(major @ np.array([0.5, np.sqrt(0.75)])) - 1) < 1e-6


def test_render_point_source_peak_and_integral():
    shape = (96, 96)
    wcs = sim.make_sin_wcs(150.0, 30.0, CELL_DEG, shape)
    img = sim.render_point_sources(shape, wcs, BEAM, [150.0], [30.0], [0.25])
    assert img.max() == pytest.approx(0.25, rel=1e-12)
    assert np.unravel_index(img.argmax(), shape) == (48, 48)
    cov = sim.beam_covariance_pix(wcs, BEAM)
    # Integral of a Gaussian of peak F: 2 pi F sqrt(det C) (pixel units); the 5-sigma box loses
    # < 1e-5.
    assert img.sum() == pytest.approx(0.25 * 2 * np.pi * np.sqrt(np.linalg.det(cov)), rel=1e-5)
    # Off-centre source: every pixel follows the Gaussian formula exactly.
    ra, dec = wcs.wcs_pix2world(30.3, 60.8, 0)
    img = sim.render_point_sources(shape, wcs, BEAM, [ra], [dec], [1.0])
    icov = np.linalg.inv(sim.beam_covariance_pix(wcs, BEAM, 30.3, 60.8))
    for yy, xx in [(61, 30), (60, 31), (63, 28), (58, 33)]:
        d = np.array([xx - 30.3, yy - 60.8])
        assert img[yy, xx] == pytest.approx(np.exp(-0.5 * d @ icov @ d), rel=1e-9)
    # Sources add linearly and sources off the image (or with NaN positions) are harmless.
    two = sim.render_point_sources(
        shape, wcs, BEAM, [ra, 150.0, 160.0], [dec, 30.0, 30.0], [1.0, 0.25, 9.0]
    )
    one = sim.render_point_sources(shape, wcs, BEAM, [150.0], [30.0], [0.25])
    np.testing.assert_allclose(two, img + one, atol=1e-15)


def test_render_clips_at_edges():
    shape = (40, 50)
    wcs = sim.make_sin_wcs(150.0, 30.0, CELL_DEG, shape)
    ra, dec = wcs.wcs_pix2world(
        [0.0, 49.0, 2.0], [0.0, 39.0, 45.0], 0
    )  # last one just above the top
    img = sim.render_point_sources(shape, wcs, BEAM, ra, dec, [1.0, 2.0, 3.0])
    assert img[0, 0] == pytest.approx(1.0) and img[39, 49] == pytest.approx(2.0)
    assert 0 < img[39, 2] < 3.0 * np.exp(-0.5 * 36 / 3.1)  # tail of the source 6 px above the edge


def test_correlated_noise_rms_and_beam_shaped_correlation():
    shape = (512, 512)
    wcs = sim.make_sin_wcs(150.0, 30.0, CELL_DEG, shape)
    cov = sim.beam_covariance_pix(wcs, BEAM)
    noise = sim.correlated_noise(shape, cov, 5e-4, np.random.default_rng(3))
    assert noise.std() == pytest.approx(5e-4, rel=0.05)
    assert abs(noise.mean()) < 5e-5
    icov = np.linalg.inv(cov)
    var = np.mean(noise**2)
    for dx, dy in [(1, 0), (0, 1), (1, 1), (1, -1), (3, 0), (0, 3)]:
        a = noise[max(0, -dy) : 512 - max(0, dy), : 512 - dx]
        b = noise[max(0, dy) : 512 - max(0, -dy) if dy < 0 else 512, dx:][: a.shape[0]]
        rho = np.mean(a * b) / var
        d = np.array([dx, dy])
        assert rho == pytest.approx(np.exp(-0.5 * d @ icov @ d), abs=0.04), (dx, dy)
    # The tilted beam (BPA 30 deg, east to the left) correlates (+1, +1) differently from (+1, -1).
    diag_pp, diag_pm = np.array([1, 1]), np.array([1, -1])
    assert (
        abs(np.exp(-0.5 * diag_pp @ icov @ diag_pp) - np.exp(-0.5 * diag_pm @ icov @ diag_pm)) > 0.1
    )
    # Same generator state -> same field.
    again = sim.correlated_noise(shape, cov, 5e-4, np.random.default_rng(3))
    np.testing.assert_array_equal(noise, again)


def test_write_fits_image_2d_and_cube(tmp_path):
    data = np.arange(12.0).reshape(3, 4)
    p2 = sim.write_fits_image(
        tmp_path / "a.fits",
        data,
        ra_deg=10.0,
        dec_deg=-20.0,
        cell_deg=CELL_DEG,
        beam=BEAM,
        date_obs="2025-03-04T05:06:07.5",
    )
    p4 = sim.write_fits_image(
        tmp_path / "b.fits",
        data,
        ra_deg=10.0,
        dec_deg=-20.0,
        cell_deg=CELL_DEG,
        beam=BEAM,
        date_obs="2025-03-04T05:06:07.5",
        cube=True,
        freq_hz=1.3e9,
        extra_header={"OBJECT": "X"},
    )
    with fits.open(p2) as hdul:
        h, d = hdul[0].header, hdul[0].data
        assert h["NAXIS"] == 2 and d.shape == (3, 4)
        np.testing.assert_array_equal(d, data)
    with fits.open(p4) as hdul:
        h4, d4 = hdul[0].header, hdul[0].data
        assert h4["NAXIS"] == 4 and d4.shape == (1, 1, 3, 4)
        assert [h4[f"CTYPE{i}"] for i in range(1, 5)] == ["RA---SIN", "DEC--SIN", "FREQ", "STOKES"]
        assert h4["CRVAL3"] == 1.3e9 and h4["OBJECT"] == "X"
        np.testing.assert_array_equal(d4[0, 0], data)
    for header in (h, h4):
        assert header["BUNIT"] == "JY/BEAM"
        assert (header["BMAJ"], header["BMIN"], header["BPA"]) == (
            BEAM.major_deg,
            BEAM.minor_deg,
            BEAM.pa_deg,
        )
        assert header["MJD-OBS"] == pytest.approx(
            Time("2025-03-04T05:06:07.5", scale="utc").mjd, abs=1e-9
        )
        w = WCS(header).celestial
        np.testing.assert_allclose(w.wcs_pix2world(2.0, 1.0, 0), [10.0, -20.0], atol=1e-10)
    assert not list(tmp_path.glob(".*"))  # temporary files renamed away


def test_power_law_fluxes_follow_euclidean_counts():
    flux = sim._power_law_fluxes(np.random.default_rng(5), 200_000, 3.0, 2000.0, 1.5)
    assert flux.min() >= 3.0 and flux.max() <= 2000.0
    frac = (3.0 / 30.0) ** 1.5  # N(>30 mJy) / N(>3 mJy), ignoring the tiny truncation
    assert np.mean(flux > 30.0) == pytest.approx(frac, rel=0.05)


def test_survey_is_deterministic(small_survey, tmp_path):
    again = sim.simulate_survey(SMALL, tmp_path)
    for attr in ("catalog_path", "truth_sources_path", "truth_fluxes_path", "truth_images_path"):
        assert getattr(small_survey, attr).read_bytes() == getattr(again, attr).read_bytes()
    for a, b in zip(small_survey.image_paths, again.image_paths, strict=True):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()
    other = sim.simulate_survey(
        SMALL.__class__(**{**SMALL.__dict__, "seed": 12}), tmp_path / "other"
    )
    assert other.catalog_path.read_bytes() != small_survey.catalog_path.read_bytes()


def test_survey_files_and_headers(small_survey):
    m = small_survey
    assert m.n_images == 9 and len(list(m.incoming_dir.glob("*.fits"))) == 9
    catalog = pd.read_csv(m.catalog_path)
    assert list(catalog.columns) == ["name", "ra_deg", "dec_deg", "flux_mjy"]
    assert catalog["name"].is_unique and len(catalog) == SMALL.n_sources
    truth = pd.read_csv(m.truth_sources_path)
    assert (truth["kind"] == "ese").sum() == 2 and (truth["kind"] == "variable").sum() == 2
    assert truth["name"].tolist() == catalog["name"].tolist()
    # Catalog flux: mean flux with ~5 % lognormal scatter.
    ratio = np.log(catalog["flux_mjy"] / truth["mean_flux_mjy"])
    assert 0 < ratio.std() < 0.15
    images = pd.read_csv(m.truth_images_path)
    fluxes = pd.read_csv(m.truth_fluxes_path)
    assert len(fluxes) == 9 * SMALL.n_sources
    assert images["cube"].any() and not images["cube"].all()
    assert images["image"].tolist() == [p.name for p in m.image_paths]
    assert images["image"].iloc[0] == "img_20250101T020000.fits"
    for row, path in zip(images.itertuples(), m.image_paths, strict=True):
        with fits.open(path) as hdul:
            h, data = hdul[0].header, hdul[0].data
        assert Time(h["DATE-OBS"], scale="utc").mjd == pytest.approx(row.mjd, abs=1e-8)
        assert h["MJD-OBS"] == pytest.approx(row.mjd, abs=1e-8)
        assert h["DATE-OBS"] == row.date_obs
        assert h["NAXIS"] == (4 if row.cube else 2)
        assert data.shape == ((1, 1, 128, 128) if row.cube else (128, 128))
        w = WCS(h).celestial
        np.testing.assert_allclose(w.wcs.crval, [row.ra_deg, row.dec_deg], atol=1e-9)
        assert h["BMAJ"] == pytest.approx(45 / 3600) and h["BPA"] == 30.0
    # Times: nights at 02:00, 03:00, 04:00 UTC.
    np.testing.assert_allclose(np.diff(images["mjd"].to_numpy())[:2] * 24, [1.0, 1.0], atol=1e-6)
    # Pointing jitter of ~1 arcmin.
    sep = np.hypot((images["ra_deg"] - 150) * np.cos(np.radians(30)), images["dec_deg"] - 30) * 60
    assert 0 < sep.max() < 6


def test_ese_true_fluxes_follow_lens_lightcurve(small_survey):
    truth = pd.read_csv(small_survey.truth_sources_path)
    fluxes = pd.read_csv(small_survey.truth_fluxes_path).merge(truth, on="name")
    ese = fluxes[fluxes["kind"] == "ese"]
    assert len(ese) == 2 * 9
    assert (truth.loc[truth["kind"] == "ese", "mean_flux_mjy"] >= SMALL.ese_min_flux_mjy).all()
    expect = (
        ese["mean_flux_mjy"]
        * ese["gain"]
        * lens.ese_lightcurve(
            ese["mjd"].to_numpy(),
            ese["ese_t0_mjd"].to_numpy(),
            ese["ese_duration_days"].to_numpy(),
            ese["ese_depth"].to_numpy(),
            SMALL.ese_source_size,
        )
    )
    np.testing.assert_allclose(ese["true_flux_mjy"], expect, rtol=1e-9)  # CSV keeps 15 digits
    assert (
        ese["true_flux_mjy"] / (ese["mean_flux_mjy"] * ese["gain"])
    ).min() < 0.9  # a dip was sampled
    # Depths and epoch counts as documented.
    hosts = truth[truth["kind"] == "ese"]
    assert sorted(hosts["ese_depth"]) == sorted(SMALL.ese_depths[:2])
    in_event = ese.assign(
        inside=np.abs(ese["mjd"] - ese["ese_t0_mjd"]) < ese["ese_duration_days"] / 2
    )
    np.testing.assert_array_equal(
        in_event.groupby("name")["inside"].sum().sort_index().to_numpy(),
        hosts.set_index("name")["ese_epochs_in_event"].sort_index().to_numpy(),
    )
    # Stable sources: true flux = mean flux x image gain.
    stable = fluxes[fluxes["kind"] == "stable"]
    np.testing.assert_allclose(
        stable["true_flux_mjy"], stable["mean_flux_mjy"] * stable["gain"], rtol=1e-12
    )
    assert stable["gain"].std() > 0


def test_stable_only_survey_pixels_match_truth(tmp_path):
    """No noise, no variability, no gain errors: each isolated source's image equals its flux."""
    config = sim.SurveyConfig(
        seed=3,
        n_nights=1,
        images_per_night=2,
        npix=128,
        n_sources=20,
        rms_mjy=0.0,
        cube_fraction=0.0,
    ).without_variability()
    assert config.n_ese == 0 and config.n_variables == 0 and config.flux_scale_error == 0
    m = sim.simulate_survey(config, tmp_path)
    fluxes = pd.read_csv(m.truth_fluxes_path)
    truth = pd.read_csv(m.truth_sources_path)
    assert (fluxes["gain"] == 1.0).all() and set(truth["kind"]) == {"stable"}
    np.testing.assert_allclose(
        fluxes["true_flux_mjy"].to_numpy(),
        np.tile(truth["mean_flux_mjy"].to_numpy(), 2),
        rtol=1e-14,
    )
    for path in m.image_paths:
        data = fits.getdata(path).astype(float)
        rows = fluxes[(fluxes["image"] == path.name) & fluxes["in_image"]]
        x, y = rows["x_pix"].to_numpy(), rows["y_pix"].to_numpy()
        sep = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
        np.fill_diagonal(sep, np.inf)
        iso = (sep.min(axis=1) > 12) & (x > 10) & (x < 117) & (y > 10) & (y < 117)
        assert iso.sum() >= 5
        render = sim.render_point_sources(
            data.shape,
            WCS(fits.getheader(path)).celestial,
            config.beam,
            truth.set_index("name").loc[rows["name"], "ra_deg"],
            truth.set_index("name").loc[rows["name"], "dec_deg"],
            rows["true_flux_mjy"].to_numpy() / 1000,
        )
        np.testing.assert_allclose(data, render, atol=1e-6 * render.max())  # float32 storage
        # Peak pixel near each isolated source ~ its flux (sub-pixel offset loses < 15 %).
        for xi, yi, f in zip(x[iso], y[iso], rows["true_flux_mjy"].to_numpy()[iso], strict=True):
            row, col = round(yi), round(xi)
            peak = data[row - 1 : row + 2, col - 1 : col + 2].max()
            assert 0.85 * f / 1000 <= peak <= f / 1000 * (1 + 1e-6)


def test_survey_noise_level(tmp_path):
    config = sim.SurveyConfig(
        seed=4,
        n_nights=1,
        images_per_night=1,
        npix=256,
        n_sources=5,
        flux_min_mjy=1.0,
        flux_max_mjy=2.0,
        rms_mjy=0.5,
        cube_fraction=1.0,
        n_variables=0,
        n_ese=0,
    )
    m = sim.simulate_survey(config, tmp_path)
    data = fits.getdata(m.image_paths[0])[0, 0].astype(float)
    assert np.median(np.abs(data - np.median(data))) * 1.4826 == pytest.approx(5e-4, rel=0.1)


def test_overwrite_protection_and_cli(tmp_path, capsys):
    parser = cli.add_simulate_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--out-dir",
            str(tmp_path),
            "--nights",
            "1",
            "--images-per-night",
            "2",
            "--npix",
            "64",
            "--n-sources",
            "12",
            "--n-ese",
            "1",
            "--n-variables",
            "1",
            "--quiet",
        ]
    )
    m = cli.run_simulate(args)
    assert m.n_images == 2 and m.n_ese == 1
    assert "wrote 2 images" in capsys.readouterr().out
    with pytest.raises(FileExistsError):
        cli.run_simulate(args)
    args = parser.parse_args(
        [
            "--out-dir",
            str(tmp_path),
            "--nights",
            "1",
            "--images-per-night",
            "1",
            "--npix",
            "64",
            "--n-sources",
            "12",
            "--stable-only",
            "--overwrite",
            "--quiet",
        ]
    )
    m2 = cli.run_simulate(args)
    assert m2.n_ese == 0 and m2.n_variables == 0
    # The stale second image of the first run was removed.
    assert sorted(p.name for p in m2.incoming_dir.glob("*.fits")) == [m2.image_paths[0].name]


def test_config_validation_and_defaults():
    d = sim.SurveyConfig()
    assert d.n_images == 120 and d.npix == 512 and d.n_ese == 6 and d.n_sources == 250
    d.validate()
    with pytest.raises(ValueError):
        sim.SurveyConfig(n_sources=3, n_ese=6).validate()
    with pytest.raises(ValueError):
        sim.SurveyConfig(ese_depths=(1.2,)).validate()
