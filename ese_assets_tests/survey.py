"""Simulated surveys and pipeline workspaces shared by the orchestration tests.

The ``small_survey`` fixture (conftest.py) simulates :data:`SMALL_SURVEY` once per test session.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from ese_assets.core.simulate import SurveyConfig
from ese_assets.settings import Settings

#: Three nights of four 256x256 images: 12 epochs, one deep long ESE on a bright source, so every
#: stage (photometry, statistics, a candidate) has something to do in a few seconds.
SMALL_SURVEY = SurveyConfig(
    seed=7,
    n_nights=3,
    images_per_night=4,
    npix=256,
    n_sources=40,
    n_variables=2,
    n_ese=1,
    ese_depths=(0.6,),
    ese_duration_days=(1.0, 1.0),
    ese_t0_window=(0.5, 0.5),
    ese_min_flux_mjy=50.0,
    cube_fraction=0.25,
)
NIGHTS = ("2025-01-01", "2025-01-02", "2025-01-03")


def make_workspace(
    tmp_path: Path,
    survey: Path,
    *,
    copy_images: bool = True,
    products_db: str | None = None,
    settle_seconds: float = 0.0,
) -> Settings:
    """A private incoming directory, catalog and products database for one test."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    if copy_images:
        for fits in sorted((survey / "incoming").glob("*.fits")):
            shutil.copy2(fits, incoming / fits.name)
    return dataclasses.replace(
        Settings.from_env(),
        data_dir=str(tmp_path),
        products_db=products_db or str(tmp_path / "products.sqlite3"),
        catalog_path=str(survey / "catalog.csv"),
        incoming_dir=str(incoming),
        settle_seconds=settle_seconds,
    )


def ingest_survey(tmp_path: Path, survey: Path, **changes) -> Settings:
    """:func:`make_workspace` (with ``changes`` to its settings), then every image through
    ``ese ingest``'s real Dagster runs, in a Dagster home of its own; no image may fail."""
    from ese_assets.ingest import ingest_directory

    settings = dataclasses.replace(make_workspace(tmp_path, survey), **changes)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
        report = ingest_directory(settings, Path(settings.incoming_dir), progress=lambda _msg: None)
    assert not report.failed, report.failed
    return settings
