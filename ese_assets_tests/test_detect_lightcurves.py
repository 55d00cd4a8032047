"""ESE detection on anyone's lightcurves: api.detect_in_lightcurves and `ese detect-lightcurves`,
on real CSV, Parquet, FITS and VOTable files, with the VAST pipeline's column names."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.table import Table

from ese_assets import api, cli
from ese_assets.core.lens import ese_lightcurve
from ese_assets.lightcurves import read_measurements

N_SRC = 40
MJD = 60000.25 + np.arange(100.0)
ESE = 7  # index of the source with an event
SIMS = 600


@pytest.fixture(scope="module")
def survey() -> pd.DataFrame:
    """VAST-style measurements: source (int), time (datetime), flux_peak, flux_peak_err,
    image_id; per-image gains of 2 %, one ESE (depth 0.4, 40 days) in source 7."""
    rng = np.random.default_rng(8)
    base = rng.uniform(20.0, 200.0, N_SRC)
    err = base / rng.uniform(40.0, 150.0, N_SRC)
    gains = 1.0 + 0.02 * rng.standard_normal(MJD.size)
    model = np.ones((N_SRC, MJD.size))
    model[ESE] = ese_lightcurve(MJD, 60050.0, 40.0, 0.4)
    flux = base[:, None] * model * gains[None, :] + err[:, None] * rng.standard_normal(model.shape)
    return pd.DataFrame(
        {
            "source": np.repeat(np.arange(N_SRC), MJD.size),
            "time": pd.to_datetime(np.tile(MJD, N_SRC) - 40587.0, unit="D"),
            "flux_peak": flux.ravel(),
            "flux_peak_err": np.repeat(err, MJD.size),
            "image_id": np.tile(np.arange(MJD.size), N_SRC),
        }
    )


def _generic(survey: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "source_id": survey["source"].astype(str),
            "mjd": np.tile(MJD, N_SRC),
            "flux": survey["flux_peak"],
            "flux_err": survey["flux_peak_err"],
            "image_id": survey["image_id"],
        }
    )


@pytest.fixture(scope="module")
def files(survey, tmp_path_factory) -> dict[str, object]:
    """The same measurements as CSV (VAST names, ISO times), Parquet (VAST names, date-times),
    FITS and VOTable (generic names, MJD)."""
    d = tmp_path_factory.mktemp("lightcurves")
    out = {}
    out["csv"] = d / "measurements.csv"
    survey.assign(time=survey["time"].dt.strftime("%Y-%m-%dT%H:%M:%S.%f")).to_csv(
        out["csv"], index=False
    )
    out["parquet"] = d / "measurements.parquet"
    survey.to_parquet(out["parquet"], index=False)
    generic = _generic(survey)
    out["fits"] = d / "measurements.fits"
    Table.from_pandas(generic).write(out["fits"], format="fits")
    out["votable"] = d / "measurements.xml"
    Table.from_pandas(generic).write(out["votable"], format="votable")
    return out


@pytest.fixture(scope="module")
def reference(survey):
    return api.detect_in_lightcurves(survey, n_simulations=SIMS, return_run=True)


def test_vast_columns_flag_the_event_and_nothing_else(reference):
    result, run = reference
    assert len(result) == N_SRC
    by_id = result.set_index("source_id")
    ese = by_id.loc[str(ESE)]
    assert ese["flag"] and ese["flag_type"] == "ese"
    assert abs(ese["event_t0_mjd"] - 60050.0) < 4.0
    assert ese["event_depth_frac"] == pytest.approx(0.4, abs=0.06)
    assert ese["false_alarm_prob"] < 1e-6
    others = by_id.drop(index=str(ESE))
    assert not others["flag"].any()
    # The pipeline's statistics come along, one row per source over every epoch.
    assert (result["n_obs"] == MJD.size).all()
    assert np.isfinite(result[["eta_metric", "v_index", "chi2_nu", "dip_significance"]]).all().all()
    # Per-image calibration ran (image ids present): a gain per image.
    assert run.image_gains is not None and len(run.image_gains) == MJD.size
    assert run.expected_false_candidates == pytest.approx(
        N_SRC
        * (
            run.calibration.const.fap(run.calibration.threshold_const)
            + run.calibration.ese.fap(run.calibration.threshold_ese)
        )
    )


@pytest.mark.parametrize("fmt", ["csv", "parquet", "fits", "votable"])
def test_every_file_format_gives_the_same_answers(files, reference, fmt):
    table = read_measurements(files[fmt])
    result = api.detect_in_lightcurves(table, n_simulations=SIMS)
    expected = reference[0]
    assert list(result["source_id"]) == list(expected["source_id"])
    assert list(result["flag_type"]) == list(expected["flag_type"])
    # Times survive each format to well under a second: the same numbers.
    np.testing.assert_allclose(result["dchi2_const"], expected["dchi2_const"], rtol=1e-6, atol=1e-6)


def test_without_calibration_the_gain_errors_stay_in_the_fluxes(survey):
    raw = api.detect_in_lightcurves(survey, calibrate=False, n_simulations=SIMS)
    cal = api.detect_in_lightcurves(survey, n_simulations=SIMS)
    # 2 % image gains are noise common to all sources: without calibration the noise scale
    # the detector measures from night-to-night differences is larger.
    assert raw["noise_scale"].median() > cal["noise_scale"].median()


def test_cli_writes_every_source_and_prints_the_flagged(files, tmp_path, capsys):
    out = tmp_path / "result.csv"
    code = cli.main(
        ["detect-lightcurves", str(files["csv"]), "--output", str(out), "--simulations", str(SIMS)]
    )
    assert code == 0
    written = pd.read_csv(out)
    assert len(written) == N_SRC
    assert written.loc[written["flag"], "source_id"].astype(str).tolist() == [str(ESE)]
    summary = capsys.readouterr().err
    assert f"{N_SRC} sources, 1 flagged (ese 1)" in summary
    code = cli.main(["detect-lightcurves", str(files["parquet"]), "--simulations", str(SIMS)])
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("source_id,flag,flag_type")
    assert len(printed) == 2 and printed[1].startswith(f"{ESE},True,ese")


def test_cli_names_the_file_and_the_missing_columns(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"source_id": ["a"], "mjd": [60000.0], "flux": [1.0]}).to_csv(bad, index=False)
    assert cli.main(["detect-lightcurves", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "flux_err_mjy" in err[0]
    unknown = tmp_path / "table.xyz"
    unknown.write_text("x")
    assert cli.main(["detect-lightcurves", str(unknown)]) == 2
    assert "unknown table format" in capsys.readouterr().err


def test_too_few_nights_and_unusable_rows():
    """Sources with fewer than MIN_NIGHTS nights are reported, unscored and unflagged; rows
    without a flux or a positive error are left out and counted."""
    table = pd.DataFrame(
        {
            "source_id": ["a", "a", "a", "b", "b"],
            "mjd": [60000.0, 60001.0, 60002.0, 60000.0, 60001.0],
            "flux": [1.0, 1.1, np.nan, 2.0, 2.0],
            "flux_err": [0.1, 0.1, 0.1, 0.1, 0.0],
        }
    )
    result, run = api.detect_in_lightcurves(table, n_simulations=100, return_run=True)
    assert list(result["source_id"]) == ["a", "b"]
    assert not result["flag"].any()
    assert result["false_alarm_prob"].isna().all()
    assert list(result["n_obs"]) == [2, 1]
    assert run.n_excluded == 2 and run.n_measurements == 5
    assert run.expected_false_candidates == 0.0
