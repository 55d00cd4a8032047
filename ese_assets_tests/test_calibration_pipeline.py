"""Flux-scale calibration through the real pipeline: FITS images, SQL, Dagster runs.

One simulated survey (8 nights x 4 images, an ESE) in which one image of night 5 has a 15 % gain
error and every image of night 7 too (a bad night). Ingested twice through ``ese_assets.ingest``
(real Dagster runs): with the defaults (normalized fluxes, bad images excluded) and with
calibration switched off for the statistics (``ESE_FLUX_SCALE=raw``, the bad-gain bit not
excluded). The truth (the simulator's per-image gains times the injected errors) is the
independent reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from ese_assets.core.calibration import FLUX_SCALES
from ese_assets.core.quality import DEFAULT_EXCLUDED_FLAGS, FLAG_BAD_GAIN
from ese_assets.core.simulate import SurveyConfig, simulate_survey
from ese_assets.settings import Settings
from ese_assets.storage import calibration as calibration_db
from ese_assets.storage import candidates as candidates_db
from ese_assets.storage import statistics as statistics_db
from ese_assets.storage.access import read_frame
from ese_assets.storage.engine import ensure_schema, make_engine
from ese_assets.storage.schema import photometry
from ese_assets_tests.survey import ingest_survey

SURVEY = SurveyConfig(
    seed=606,
    n_nights=8,
    images_per_night=4,
    npix=256,
    n_sources=80,
    flux_min_mjy=5.0,
    n_variables=0,
    n_ese=1,
    ese_depths=(0.4,),
    ese_duration_days=(3.0, 3.0),
    ese_t0_window=(0.25, 0.25),
    ese_min_flux_mjy=50.0,
    cube_fraction=0.0,
)
BAD_GAIN = 0.85  # the injected flux-scale error
BAD_IMAGE_NIGHT = "2025-01-05"  # its second image
BAD_NIGHT = "2025-01-07"  # every image


def _scale_image(path: Path, factor: float) -> None:
    """A flux-scale error: every pixel (sources and noise alike) times ``factor``."""
    with fits.open(path) as hdul:
        data = hdul[0].data * np.float32(factor)
        header = hdul[0].header.copy()
    fits.writeto(path, data.astype(np.float32), header, overwrite=True)


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration_survey")
    simulate_survey(SURVEY, out)
    images = pd.read_csv(out / "truth_images.csv")
    images["night"] = images["date_obs"].str[:10]
    images["true_gain"] = images["gain"]
    bad = images.index[images["night"] == BAD_NIGHT].tolist()
    bad.append(images.index[images["night"] == BAD_IMAGE_NIGHT][1])
    for i in bad:
        _scale_image(out / "incoming" / Path(images.at[i, "image"]).name, BAD_GAIN)
        images.at[i, "true_gain"] *= BAD_GAIN
    images["bad"] = False
    images.loc[bad, "bad"] = True
    images["file"] = images["image"].map(lambda p: Path(p).name)
    return out, images


@pytest.fixture(scope="module")
def runs(survey, tmp_path_factory):
    survey_dir, _images = survey
    return {
        "calibrated": ingest_survey(tmp_path_factory.mktemp("cal"), survey_dir),
        "raw": ingest_survey(
            tmp_path_factory.mktemp("raw"),
            survey_dir,
            flux_scale="raw",
            exclude_flags=DEFAULT_EXCLUDED_FLAGS & ~FLAG_BAD_GAIN,
        ),
    }


def _photometry(settings: Settings) -> pd.DataFrame:
    with make_engine(settings.products_db).connect() as conn:
        rows = read_frame(conn, photometry.select())
    rows["file"] = rows["image_path"].map(lambda p: Path(p).name)
    return rows


def _gains(settings: Settings, images: pd.DataFrame) -> pd.DataFrame:
    gains = calibration_db.gains(make_engine(settings.products_db))
    gains["file"] = gains["image_path"].map(lambda p: Path(p).name)
    return gains.merge(images[["file", "true_gain", "bad"]], on="file", suffixes=("", "_true"))


def test_without_calibration_every_source_dips_in_the_bad_images(survey, runs):
    _dir, images = survey
    rows = _photometry(runs["raw"])
    bright = rows.groupby("source_id")["peak_jyb"].transform("median") / rows["peak_err_jyb"] > 30
    ratio = rows["peak_jyb"] / rows.groupby("source_id")["peak_jyb"].transform("median")
    in_bad = rows["file"].isin(images.loc[images["bad"], "file"])
    assert bright.sum() > 100
    # every bright source is ~15 % low in every bad image
    assert (ratio[in_bad & bright] < 0.92).mean() > 0.97
    assert (ratio[~in_bad & bright] < 0.92).mean() < 0.05
    # and the bad night makes a dip candidate of most bright sources: the default rule alone
    candidates = candidates_db.candidates(make_engine(runs["raw"].products_db))
    n_bright = rows.loc[bright, "source_id"].nunique()
    assert len(candidates) > 0.5 * n_bright


def test_with_calibration_bad_images_flagged_gains_recovered_and_no_candidate(survey, runs):
    _dir, images = survey
    settings = runs["calibrated"]
    gains = _gains(settings, images)
    assert len(gains) == len(images) and gains["calibrated"].all()
    # exactly the injected images are bad, each for its gain
    assert set(gains.loc[gains["bad"], "file"]) == set(images.loc[images["bad"], "file"])
    assert gains.loc[gains["bad"], "reason"].str.contains("sigma from 1").all()
    # gains recovered within their errors: nights 4.. have prior baselines from earlier nights,
    # on the data's scale, so g = c * true gain with one common c
    late = gains["night"] >= "2025-01-04"
    good_late = late & ~gains["bad"]
    c = np.median(gains.loc[good_late, "gain"] / gains.loc[good_late, "true_gain"])
    assert abs(c - 1) < 0.02
    pull = (gains["gain"] - c * gains["true_gain"]) / gains["gain_err"]
    assert (pull[late].abs() < 4).all(), gains.loc[late].assign(pull=pull)
    assert (gains.loc[gains["bad"], "gain"] / c).between(0.80, 0.90).all()
    # the bad images' rows carry the bad-gain bit and are left out of the statistics
    rows = _photometry(settings)
    in_bad = rows["file"].isin(images.loc[images["bad"], "file"])
    flagged = (rows["quality_flag"] & FLAG_BAD_GAIN) != 0
    assert flagged[in_bad].all() and not flagged[~in_bad].any()
    stats = statistics_db.variability_stats(make_engine(settings.products_db))
    usable = rows[~in_bad & ((rows["quality_flag"] & DEFAULT_EXCLUDED_FLAGS) == 0)]
    n_obs = usable.groupby("source_id").size()
    assert (stats.set_index("source_id")["n_obs"] == n_obs.reindex(stats["source_id"])).all()
    # normalized fluxes of the bad images are right again (the gain divided out)
    norm_ratio = rows["normalized_flux_jy"] / rows.groupby("source_id")[
        "normalized_flux_jy"
    ].transform("median")
    bright = rows.groupby("source_id")["peak_jyb"].transform("median") / rows["peak_err_jyb"] > 30
    tolerance = 4 * rows["normalized_flux_err_jy"] / rows["normalized_flux_jy"] + 0.01
    assert ((norm_ratio - 1).abs() < tolerance)[in_bad & bright].mean() > 0.95
    # no candidate from the bad images; the ESE is still found (its dip survives normalization)
    truth = pd.read_csv(_dir / "truth_sources.csv")
    ese_names = set(truth.loc[truth["ese_depth"] > 0, "name"])
    candidates = candidates_db.candidates(make_engine(settings.products_db))
    assert len(ese_names) == 1
    assert set(candidates["source_id"]) == ese_names, candidates[["source_id", "flag_type"]]


def test_rerunning_a_night_leaves_identical_calibration(survey, runs, tmp_path, monkeypatch):
    """Re-materializing a night recomputes its gains and normalized fluxes to the same values."""
    from ese_assets_tests import snapshots

    settings = runs["calibrated"]
    engine = make_engine(settings.products_db)
    tables = ("image_gains", "calibration_references", "photometry", "source_night_sums")
    before = {t: snapshots.table_snapshot(engine, t) for t in tables}
    from ese_assets.definitions import build_definitions

    monkeypatch.setenv("DAGSTER_HOME", str(Path(settings.data_dir) / "dagster_home"))
    import dagster as dg

    job = build_definitions(settings, bind_env=False).resolve_job_def("ese_pipeline")
    with dg.instance_for_test() as instance:
        assert job.execute_in_process(partition_key=BAD_NIGHT, instance=instance).success
    for t in tables:
        pd.testing.assert_frame_equal(before[t], snapshots.table_snapshot(engine, t), obj=t)


def test_existing_database_gets_the_calibration_schema(tmp_path):
    """A products database made before calibration existed gains its tables and columns."""
    import sqlalchemy as sa

    path = tmp_path / "old.sqlite3"
    with sa.create_engine(f"sqlite:///{path}").begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE photometry (id INTEGER PRIMARY KEY, image_path TEXT NOT NULL, "
                "ra_deg REAL NOT NULL, dec_deg REAL NOT NULL, nvss_flux_mjy REAL, "
                "peak_jyb REAL NOT NULL, peak_err_jyb REAL, measured_at REAL NOT NULL, "
                "source_id TEXT NOT NULL, mjd REAL NOT NULL)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO photometry (image_path, ra_deg, dec_deg, peak_jyb, measured_at, "
                "source_id, mjd) VALUES ('a.fits', 1, 2, 0.1, 0, 's', 60000)"
            )
        )
    engine = make_engine(str(path))
    ensure_schema(engine)
    inspector = sa.inspect(engine)
    columns = {c["name"] for c in inspector.get_columns("photometry")}
    assert {"normalized_flux_jy", "normalized_flux_err_jy"} <= columns
    assert {"image_gains", "calibration_references"} <= set(inspector.get_table_names())
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT normalized_flux_jy FROM photometry")).scalar() is None


def test_flux_scale_setting(monkeypatch):
    monkeypatch.setenv("ESE_FLUX_SCALE", "RAW")
    assert Settings.from_env().flux_scale == "raw"
    monkeypatch.setenv("ESE_FLUX_SCALE", "calibrated")
    with pytest.raises(ValueError) as err:
        Settings.from_env()
    assert str(err.value) == (
        "environment variable ESE_FLUX_SCALE: flux scale 'calibrated' is not one of "
        + ", ".join(FLUX_SCALES)
    )
    monkeypatch.delenv("ESE_FLUX_SCALE")
    assert Settings.from_env().flux_scale == "normalized"
