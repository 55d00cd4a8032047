"""``PhotometryManager.measure_for_fits`` and ``ese photometry nvss``: the seed's forced photometry
of one image, measured by the pipeline's own code and, with a products database, stored as a
pipeline run stores it. Real simulated FITS images, real SQL."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from astropy.io.votable import parse_single_table

from ese_assets import cli, pipeline
from ese_assets.api import PhotometryConfig, PhotometryManager
from ese_assets.core.catalog import load_catalog
from ese_assets.photometry.manager import PhotometryManager as SeedPathManager
from ese_assets.storage import schema
from ese_assets.storage.engine import ensure_schema, make_engine
from ese_assets_tests.survey import NIGHTS, make_workspace

#: Columns both ways of measuring must agree on (measured_at is the time of measuring).
COMPARED = ["source_id", "ra_deg", "dec_deg", "nvss_flux_mjy", "peak_jyb", "peak_err_jyb", "mjd"]
COMPARED += ["local_rms_jyb", "background_jyb", "quality_flag"]


def _images(settings) -> list[str]:
    return sorted(str(p) for p in Path(settings.incoming_dir).glob("*.fits"))


def _table(engine, name: str) -> pd.DataFrame:
    with engine.connect() as conn:
        frame = pd.read_sql(sa.select(schema.metadata.tables[name]), conn)
    drop = [c for c in ("id", "measured_at", "updated_at", "last_measured_at") if c in frame]
    frame = frame.drop(columns=drop)
    return frame.sort_values(list(frame.columns[:2])).reset_index(drop=True)


@pytest.fixture
def settings(tmp_path, small_survey):
    return dataclasses.replace(
        make_workspace(tmp_path, small_survey), partition_start=NIGHTS[0], timezone="UTC"
    )


def test_seed_module_path_is_the_api_class():
    assert SeedPathManager is PhotometryManager


def test_measure_only_equals_what_the_pipeline_stores(settings):
    path = _images(settings)[0]
    # The pipeline's way: register and measure into a database.
    engine = make_engine(settings.products_db)
    ensure_schema(engine)
    pipeline.inspect_files(
        engine, [path], timezone=settings.timezone, first_night=settings.partition_start
    )
    pipeline.measure_image(engine, load_catalog(settings.catalog_path), path)
    stored = _table(engine, "photometry").sort_values("source_id").reset_index(drop=True)
    # The manager without a database: same rows, nothing written anywhere.
    result = PhotometryManager(settings=settings).measure_for_fits(path)
    rows = result.measurements.sort_values("source_id").reset_index(drop=True)
    assert not result.stored and result.measurements_successful == len(stored) > 10
    pd.testing.assert_frame_equal(rows[COMPARED], stored[COMPARED], check_dtype=False)
    # radius and flux threshold select the same sources a direct computation selects
    config = PhotometryConfig(radius_deg=0.3, min_flux_mjy=20.0)
    some = PhotometryManager(settings=settings).measure_for_fits(path, config=config)
    with engine.connect() as conn:
        centre = conn.execute(
            sa.text("SELECT ra_center_deg, dec_center_deg FROM images WHERE path = :p"),
            {"p": path},
        ).one()
    ra, dec = np.radians(stored["ra_deg"]), np.radians(stored["dec_deg"])
    ra0, dec0 = np.radians(centre[0]), np.radians(centre[1])
    # haversine separation: a second formula for the angle the manager computes with dot products
    hav = np.sin((dec - dec0) / 2) ** 2 + np.cos(dec) * np.cos(dec0) * np.sin((ra - ra0) / 2) ** 2
    sep_deg = np.degrees(2 * np.arcsin(np.sqrt(hav)))
    expected = stored[(sep_deg <= 0.3) & (stored["nvss_flux_mjy"] >= 20.0)]
    assert 0 < len(some.measurements) == len(expected) < len(stored)
    assert set(some.measurements["source_id"]) == set(expected["source_id"])


def test_stored_measurements_are_those_of_a_pipeline_run(settings, tmp_path):
    paths = _images(settings)
    # Reference: the pipeline's units of work for two nights' images.
    ref_settings = dataclasses.replace(settings, products_db=str(tmp_path / "ref.sqlite3"))
    ref = make_engine(ref_settings.products_db)
    ensure_schema(ref)
    pipeline.inspect_files(ref, paths, timezone="UTC", first_night=NIGHTS[0])
    catalog = load_catalog(settings.catalog_path)
    for path in paths[:8]:
        pipeline.measure_image(ref, catalog, path)
    pipeline.calibrate_nights(ref, NIGHTS[:2])
    pipeline.update_variability(
        ref, NIGHTS[:2], flux_scale_error=settings.flux_scale_error, bin_nights="off"
    )
    # The manager, image by image (the seed's bulk workflow), into its own database.
    settings = dataclasses.replace(settings, bin_nights="off")
    manager = PhotometryManager(products_db_path=Path(settings.products_db), settings=settings)
    for path in paths[:8]:
        result = manager.measure_for_fits(path, config=PhotometryConfig(catalog="nvss"))
        assert result.stored and result.night in NIGHTS[:2]
    engine = make_engine(settings.products_db)
    mine, theirs = _table(engine, "photometry"), _table(ref, "photometry")
    pd.testing.assert_frame_equal(mine[COMPARED], theirs[COMPARED], check_dtype=False)
    stats, ref_stats = _table(engine, "variability_stats"), _table(ref, "variability_stats")
    assert len(stats) > 10 and (stats["n_obs"] == 8).any()
    pd.testing.assert_frame_equal(stats, ref_stats, check_dtype=False, rtol=1e-9)
    # Measuring an image again changes nothing (its rows are replaced, the sums corrected).
    manager.measure_for_fits(paths[0])
    pd.testing.assert_frame_equal(_table(engine, "variability_stats"), stats, rtol=1e-9)
    pd.testing.assert_frame_equal(_table(engine, "photometry"), mine)
    # With detect_ese the detection runs on the measured sources: the ESE of the survey is
    # flagged once its dip is in (all three nights).
    for path in paths[8:]:
        last = manager.measure_for_fits(path, config=PhotometryConfig(detect_ese=True))
    flagged = {c["source_id"] for c in last.candidates}
    truth = pd.read_csv(Path(settings.catalog_path).parent / "truth_sources.csv")
    assert set(truth.loc[truth["kind"] == "ese", "name"]) <= flagged


def test_bad_inputs_are_one_line_errors(settings, tmp_path):
    path = _images(settings)[0]
    with pytest.raises(ValueError, match="needs a products database"):
        PhotometryManager(settings=settings).measure_for_fits(
            path, config=PhotometryConfig(detect_ese=True)
        )
    broken = tmp_path / "broken.fits"
    broken.write_text("not a FITS file")
    with pytest.raises(ValueError, match=r"broken\.fits"):
        PhotometryManager(settings=settings).measure_for_fits(broken)
    # A night before the first partition: the database would reject it, so it is not stored.
    late = dataclasses.replace(settings, partition_start=NIGHTS[1])
    manager = PhotometryManager(products_db_path=late.products_db, settings=late)
    for _ in range(2):  # and it stays rejected when asked again
        with pytest.raises(ValueError, match=r"rejected: observation night .* precedes") as err:
            manager.measure_for_fits(path)
        assert str(err.value).startswith(path)
    no_catalog = dataclasses.replace(settings, catalog_path=None)
    with pytest.raises(ValueError, match="no source catalog configured"):
        PhotometryManager(settings=no_catalog).measure_for_fits(path)


def test_ese_photometry_nvss_prints_and_writes_csv(settings, tmp_path, capsys, monkeypatch):
    path = _images(settings)[0]
    monkeypatch.setenv("ESE_CATALOG", settings.catalog_path)
    out_csv = tmp_path / "nvss.csv"
    argv = ["photometry", "nvss", "--fits", path, "--min-mjy", "10"]
    assert cli.main([*argv, "--output", str(out_csv)]) == 0
    written = pd.read_csv(out_csv)
    expected = PhotometryManager(settings=settings).measure_for_fits(
        path, config=PhotometryConfig(min_flux_mjy=10.0)
    )
    assert sorted(written["source_id"]) == sorted(expected.measurements["source_id"])
    np.testing.assert_allclose(
        written.sort_values("source_id")["flux_mjy"],
        expected.measurements.sort_values("source_id")["peak_jyb"] * 1e3,
    )
    assert (written["nvss_flux_mjy"] >= 10).all()
    capsys.readouterr()
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].split()[:2] == ["source_id", "ra_deg"]
    assert len(out.splitlines()) == 1 + len(written)
    assert f"{len(written)} sources measured in {path}" in err
    # --store puts it in the products database (which did not exist yet)
    db = tmp_path / "stored.sqlite3"
    monkeypatch.setenv("ESE_PARTITION_START", NIGHTS[0])
    assert cli.main([*argv, "--store", "--products-db", str(db)]) == 0
    with make_engine(str(db)).connect() as conn:
        n = conn.execute(sa.text("SELECT COUNT(*) FROM photometry")).scalar_one()
    assert n == len(written)
    # a missing image is one line, exit 2
    assert cli.main(["photometry", "nvss", "--fits", str(tmp_path / "nope.fits")]) == 2
    assert "nope.fits" in capsys.readouterr().err


def test_export_of_every_candidate_as_json_and_votable(settings, tmp_path, capsys):
    manager = PhotometryManager(products_db_path=settings.products_db, settings=settings)
    for path in _images(settings):
        manager.measure_for_fits(path, config=PhotometryConfig(detect_ese=True))
    engine = make_engine(settings.products_db)
    with engine.connect() as conn:
        open_ids = set(
            conn.execute(
                sa.text("SELECT source_id FROM ese_candidates WHERE status IN (:a, :i)"),
                {"a": "active", "i": "investigated"},
            ).scalars()
        )
        counts = dict(
            conn.execute(
                sa.text("SELECT source_id, COUNT(*) FROM photometry GROUP BY source_id")
            ).all()
        )
    assert open_ids
    db = ["--products-db", settings.products_db]
    for fmt, ext in (("json", "json"), ("votable", "vot")):
        out_dir = tmp_path / fmt
        assert (
            cli.main(["export", "--candidates", "--format", fmt, "--output", str(out_dir), *db])
            == 0
        )
        files = sorted(out_dir.iterdir())
        assert [f.name for f in files] == sorted(f"{s}_lightcurve.{ext}" for s in open_ids)
        for f in files:
            source_id = f.name.removesuffix(f"_lightcurve.{ext}")
            if fmt == "json":
                doc = json.loads(f.read_text())
                assert doc["source_id"] == source_id
                assert doc["n_points"] == len(doc["data_points"]) == counts[source_id]
            else:
                table = parse_single_table(f).to_table()
                assert len(table) == counts[source_id]
                assert str(table["mjd"].unit) == "d"
    assert f"wrote the lightcurves of {len(open_ids)} open candidates" in capsys.readouterr().out
    # one source to standard output; neither or both of --source-id/--candidates is refused
    assert cli.main(["export", "--source-id", sorted(open_ids)[0], "--format", "json", *db]) == 0
    assert json.loads(capsys.readouterr().out)["source_id"] == sorted(open_ids)[0]
    assert cli.main(["export", *db]) == 2
    assert cli.main(["export", "--candidates", "--status", "dismissed", "--output", "x", *db]) == 1
