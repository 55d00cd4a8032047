"""Bad input never stops the pipeline: each problem is recorded with a reason naming it."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from astropy.io import fits

from ese_assets import pipeline
from ese_assets.core.catalog import CatalogError, load_catalog
from ese_assets.storage import images as images_db
from ese_assets.storage import photometry as photometry_db
from ese_assets.storage.engine import ensure_schema, make_engine
from ese_assets_tests.survey import NIGHTS, make_workspace
from ese_assets_tests.test_orchestration import run_night


def _first_image(survey: Path) -> Path:
    return sorted((survey / "incoming").glob("*.fits"))[0]


def _scan(settings):
    engine = make_engine(settings.products_db)
    ensure_schema(engine)
    return engine, pipeline.scan_directory(
        engine, settings.incoming_dir, timezone="UTC", first_night="2020-01-01"
    )


def test_unusable_files_are_rejected_with_named_reasons(tmp_path, small_survey):
    settings = make_workspace(tmp_path, small_survey, copy_images=False)
    incoming = Path(settings.incoming_dir)
    src = _first_image(small_survey)
    with fits.open(src) as hdul:
        header, data = hdul[0].header.copy(), hdul[0].data.copy()
    variants = {
        "no_beam.fits": lambda h: h.remove("BMAJ"),
        "no_time.fits": lambda h: [h.remove(k) for k in ("DATE-OBS", "MJD-OBS") if k in h],
        "no_wcs.fits": lambda h: [h.remove(k) for k in ("CTYPE1", "CTYPE2")],
    }
    for name, edit in variants.items():
        h = header.copy()
        edit(h)
        fits.PrimaryHDU(data, h).writeto(incoming / name)
    _, scan = _scan(settings)
    reasons = {Path(p).name: r for p, r in scan.rejected}
    assert "BMAJ" in reasons["no_beam.fits"]
    assert "DATE-OBS" in reasons["no_time.fits"] or "MJD-OBS" in reasons["no_time.fits"]
    assert "WCS" in reasons["no_wcs.fits"] or "CTYPE" in reasons["no_wcs.fits"]
    assert not scan.registered


def test_all_nan_image_is_rejected_at_measurement_and_the_night_goes_on(tmp_path, small_survey):
    settings = make_workspace(tmp_path, small_survey)
    incoming = Path(settings.incoming_dir)
    victim = sorted(incoming.glob("img_20250101*.fits"))[0]
    with fits.open(victim, mode="update") as hdul:
        hdul[0].data[...] = np.nan
    with dg.instance_for_test() as instance:
        run_night(settings, NIGHTS[0], instance)
    engine = make_engine(settings.products_db)
    counts = images_db.image_counts_by_status(engine, night=NIGHTS[0])
    assert counts["measured"] == 3 and counts["rejected"] == 1
    reason = images_db.rejected_images(engine, night=NIGHTS[0])["reason"].iloc[0]
    assert "NaN" in reason


def test_duplicate_file_under_another_name_is_rejected(tmp_path, small_survey):
    settings = make_workspace(tmp_path, small_survey)
    incoming = Path(settings.incoming_dir)
    original = sorted(incoming.glob("*.fits"))[0]
    shutil.copy(original, incoming / "zz_copy_of_first.fits")
    _, scan = _scan(settings)
    assert len(scan.registered) == 12
    assert [(Path(p).name, original.name in r) for p, r in scan.rejected] == [
        ("zz_copy_of_first.fits", True)
    ]


def test_cube_and_plain_images_are_both_measured(tmp_path, small_survey):
    truth = (small_survey / "truth_images.csv").read_text()
    assert "True" in truth and "False" in truth  # the survey holds both kinds
    settings = make_workspace(tmp_path, small_survey)
    with dg.instance_for_test() as instance:
        run_night(settings, NIGHTS[0], instance)
    counts = images_db.image_counts_by_status(make_engine(settings.products_db), night=NIGHTS[0])
    assert counts["measured"] == 4


def test_malformed_catalog_fails_the_run_with_the_file_named(tmp_path, small_survey):
    bad = tmp_path / "bad_catalog.csv"
    bad.write_text("name,ra_deg,dec_deg,flux_mjy\nA,10,95,3\n")  # |Dec| > 90
    with pytest.raises(CatalogError, match=r"bad_catalog\.csv"):
        load_catalog(bad)
    settings = make_workspace(tmp_path, small_survey)
    import dataclasses

    settings = dataclasses.replace(settings, catalog_path=str(bad))
    from ese_assets.definitions import build_definitions

    job = build_definitions(settings, bind_env=False).resolve_job_def("ese_pipeline")
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            partition_key=NIGHTS[0], instance=instance, raise_on_error=False
        )
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        assert "bad_catalog.csv" in failure.event_specific_data.error.to_string()
    # Nothing was half-written; the images wait for the next run with a fixed catalog.
    engine = make_engine(settings.products_db)
    assert photometry_db.photometry_counts(engine) == 0
    assert images_db.image_counts_by_status(engine)["measured"] == 0


def test_copy_arriving_after_the_original_is_rejected(tmp_path, small_survey):
    settings = make_workspace(tmp_path, small_survey)
    _, first = _scan(settings)
    assert len(first.registered) == 12 and not first.rejected
    original = Path(sorted(first.registered)[3])
    shutil.copy(original, Path(settings.incoming_dir) / "late_copy.fits")
    _, later = _scan(settings)
    assert not later.registered
    assert [(Path(p).name, str(original) in r) for p, r in later.rejected] == [
        ("late_copy.fits", True)
    ]
