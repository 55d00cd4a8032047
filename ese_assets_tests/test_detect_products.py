"""The ESE template detection on the pipeline's own products database
(``ese_assets.api.detect_in_products``, ``ese detect-lightcurves --db``) and the fitted model in
lightcurve plots.

A simulated survey (40 nights x 1 image, one 50 % ESE of 12 days, no variables; 14 nights were
too few for the DRW null to tell an 8-day event from red noise) runs through
``ese_assets.ingest`` (real FITS, real Dagster runs, real SQL). The injected event (the
simulator's truth) must be found, the stable sources not; and the answer must equal
``detect_in_lightcurves`` on the same rows read independently with plain sqlite3.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ese_assets import api, plots
from ese_assets.core import ese_template
from ese_assets.core.quality import DEFAULT_EXCLUDED_FLAGS
from ese_assets.core.simulate import SurveyConfig, simulate_survey
from ese_assets.lightcurves import detect_in_lightcurves
from ese_assets_tests.survey import ingest_survey

SURVEY = SurveyConfig(
    seed=515,
    n_nights=40,
    images_per_night=1,
    npix=256,
    n_sources=40,
    n_variables=0,
    n_ese=1,
    ese_depths=(0.5,),
    ese_duration_days=(12.0, 12.0),
    ese_t0_window=(0.5, 0.5),
    ese_min_flux_mjy=50.0,
    cube_fraction=0.0,
)


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    out = tmp_path_factory.mktemp("products_detect_survey")
    simulate_survey(SURVEY, out)
    return out


@pytest.fixture(scope="module")
def products(survey, tmp_path_factory) -> str:
    return ingest_survey(tmp_path_factory.mktemp("products_detect_run"), survey).products_db


@pytest.fixture(scope="module")
def truth(survey) -> pd.DataFrame:
    return pd.read_csv(survey / "truth_sources.csv")


@pytest.fixture(scope="module")
def result(products) -> pd.DataFrame:
    return api.detect_in_products(products)


def _ese(truth) -> pd.Series:
    (row,) = (r for _, r in truth.iterrows() if r["kind"] == "ese")
    return row


def _sql_rows(db: str) -> tuple[pd.DataFrame, pd.Series]:
    """Usable rows and catalog fluxes read with plain sqlite3 (normalized, raw where NULL)."""
    with sqlite3.connect(db) as conn:
        rows = pd.read_sql_query(
            "SELECT p.source_id, p.mjd,"
            " 1000.0 * COALESCE(p.normalized_flux_jy, p.peak_jyb) AS flux_mjy,"
            " 1000.0 * CASE WHEN p.normalized_flux_jy IS NULL THEN p.peak_err_jyb"
            "   ELSE p.normalized_flux_err_jy END AS flux_err_mjy,"
            " i.night, p.image_path AS image_id"
            " FROM photometry p JOIN images i ON i.path = p.image_path"
            " WHERE (p.quality_flag & ?) = 0 AND p.peak_jyb IS NOT NULL"
            " ORDER BY p.source_id, i.night, p.mjd, p.image_path",
            conn,
            params=(DEFAULT_EXCLUDED_FLAGS,),
        )
        cat = pd.read_sql_query("SELECT DISTINCT source_id, nvss_flux_mjy FROM photometry", conn)
    assert not cat["source_id"].duplicated().any()
    return rows, pd.Series(cat["nvss_flux_mjy"].to_numpy(float), index=cat["source_id"])


def test_the_injected_ese_is_found_and_the_stable_sources_are_not(result, truth):
    ese = _ese(truth)
    assert set(result["source_id"]) == set(truth["name"])
    host = result.set_index("source_id").loc[ese["name"]]
    assert host["flag"] and host["flag_type"] == "ese", host.to_dict()
    half = ese["ese_duration_days"] / 2
    assert abs(host["event_t0_mjd"] - ese["ese_t0_mjd"]) < half
    others = result[result["source_id"] != ese["name"]]
    assert len(others) == len(truth) - 1
    assert not others["flag"].any(), others[others["flag"]][["source_id", "flag_type"]]


def test_equals_detect_in_lightcurves_on_rows_read_with_plain_sql(products, result):
    rows, catalog = _sql_rows(products)
    independent = detect_in_lightcurves(rows, catalog_flux_mjy=catalog, calibrate=False)
    pd.testing.assert_frame_equal(result, independent, check_exact=False, rtol=1e-9)


def test_one_source_and_raw_fluxes(products, result, truth):
    ese = _ese(truth)
    one = api.detect_in_products(products, [ese["name"]])
    assert list(one["source_id"]) == [ese["name"]] and one["flag_type"].iloc[0] == "ese"
    raw = api.detect_in_products(products, flux_scale="raw")
    rows, catalog = _sql_rows(products)
    with sqlite3.connect(products) as conn:
        peak = pd.read_sql_query(
            "SELECT 1000.0 * p.peak_jyb AS f, 1000.0 * p.peak_err_jyb AS e"
            " FROM photometry p JOIN images i ON i.path = p.image_path"
            " WHERE (p.quality_flag & ?) = 0 AND p.peak_jyb IS NOT NULL"
            " ORDER BY p.source_id, i.night, p.mjd, p.image_path",
            conn,
            params=(DEFAULT_EXCLUDED_FLAGS,),
        )
    rows = rows.assign(flux_mjy=peak["f"].to_numpy(), flux_err_mjy=peak["e"].to_numpy())
    expected = detect_in_lightcurves(rows, catalog_flux_mjy=catalog, calibrate=False)
    pd.testing.assert_frame_equal(raw, expected, check_exact=False, rtol=1e-9)


def ese_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ese_assets.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_cli_db(products, result, tmp_path):
    import os

    out = tmp_path / "all.csv"
    done = ese_cli("detect-lightcurves", "--products-db", products, "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert f"{len(result)} sources, 1 flagged (ese 1)" in done.stderr
    written = pd.read_csv(out)
    assert list(written["source_id"]) == list(result["source_id"])
    np.testing.assert_allclose(written["significance"], result["significance"], rtol=1e-9)
    # --db: the configured database; the flagged rows on stdout
    env = {**os.environ, "PIPELINE_PRODUCTS_DB": products}
    done = ese_cli("detect-lightcurves", "--db", env=env)
    assert done.returncode == 0, done.stderr
    printed = pd.read_csv(pd.io.common.StringIO(done.stdout))
    assert list(printed["source_id"]) == list(result.loc[result["flag"], "source_id"])
    missing = tmp_path / "typo.sqlite3"
    done = ese_cli("detect-lightcurves", "--products-db", str(missing))
    assert done.returncode == 2 and not missing.exists()
    assert len(done.stderr.strip().splitlines()) == 1 and str(missing) in done.stderr
    done = ese_cli("detect-lightcurves", "x.csv", "--db", env=env)
    assert done.returncode == 2 and "one of them" in done.stderr


def _template_line(fig):
    found = [a for a in fig.axes[0].lines if a.get_gid() == plots.GID_TEMPLATE]
    assert len(found) <= 1
    return found[0] if found else None


def test_plot_draws_the_fitted_model_for_the_ese_only(products, result, truth):
    ese = _ese(truth)
    source = api.Source(ese["name"], products)
    fig = source.plot_lightcurve(use_normalized=True)
    line = _template_line(fig)
    assert line is not None and line.get_label() == "fitted template"
    x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
    fit = source.template_fit(flux_scale="normalized")
    np.testing.assert_allclose(y, ese_template.fitted_model_flux(fit, x))
    # the model's minimum lies in the injected event, below the baseline by about its depth
    half = ese["ese_duration_days"] / 2
    assert abs(x[np.argmin(y)] - ese["ese_t0_mjd"]) < half
    assert 0.2 < 1 - y.min() / fit["baseline_flux_mjy"] < 0.8
    # raw fluxes (the default plot): the model is the raw fit's
    assert _template_line(source.plot_lightcurve()) is not None
    stable = result.loc[~result["flag"], "source_id"].iloc[0]
    assert _template_line(api.Source(stable, products).plot_lightcurve()) is None
    assert _template_line(source.plot_lightcurve(show_template=False)) is None
