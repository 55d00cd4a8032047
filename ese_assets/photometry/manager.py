"""``PhotometryManager(...).measure_for_fits(path, config=PhotometryConfig(...))``, the seed's
forced photometry of one image (a single image or a mosaic).

It measures through the pipeline's own code (:func:`ese_assets.pipeline.measurement.photometry_rows`
for a measurement only; with a products database, the pipeline's units of work in the order a
Dagster run applies them: register the file, measure it in one transaction, update the statistics
of its night, and, when asked, run the detection on the sources it measured). So the stored rows,
sums and statistics are exactly those a pipeline run would write; a later run of the same night
finds them consistent.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import sqlalchemy as sa

from ese_assets import pipeline
from ese_assets.core.catalog import Catalog, CatalogError, load_catalog_cached
from ese_assets.core.fits_image import load_image
from ese_assets.core.nights import night_of_mjd
from ese_assets.pipeline.candidates import new_run_id, seed_candidate_records
from ese_assets.pipeline.measurement import photometry_rows
from ese_assets.settings import Settings
from ese_assets.storage.engine import ensure_schema, make_engine
from ese_assets.storage.schema import images as images_table
from ese_assets.storage.schema import photometry as photometry_table

#: The seed's catalog names; each means the catalog configured by ESE_CATALOG (or
#: MASTER_SOURCES_DB), which holds the survey's reference sources (NVSS, FIRST or a master list).
SEED_CATALOG_NAMES = ("nvss", "first", "master")


@dataclass(frozen=True)
class PhotometryConfig:
    """What :meth:`PhotometryManager.measure_for_fits` measures (the seed's fields).

    ``catalog``: a catalog file (any format of ``ESE_CATALOG``) or one of the seed's names
    (:data:`SEED_CATALOG_NAMES`; ``None`` = the configured catalog). ``radius_deg``: only sources
    within this angle of the image centre (``None``: the whole image). ``min_flux_mjy``: catalog
    flux threshold. ``detect_ese``: after storing, run the ESE detection on the measured sources
    (needs a products database).
    """

    catalog: str | None = None
    radius_deg: float | None = None
    min_flux_mjy: float = 0.0
    detect_ese: bool = False


@dataclass
class PhotometryResult:
    """The outcome of one ``measure_for_fits``: the rows measured (``photometry`` columns)."""

    fits_path: str
    mjd: float
    catalog_path: str
    measurements: pd.DataFrame
    stored: bool  # written to the products database
    night: str | None = None  # the image's night (when stored)
    candidates: list[dict] = field(default_factory=list)  # open candidates flagged (detect_ese)

    @property
    def measurements_successful(self) -> int:
        """Sources measured (the seed's field)."""
        return len(self.measurements)

    @property
    def n_flagged(self) -> int:
        """Measurements with a ``quality_flag`` bit set (blended, blank pixels...)."""
        return int((self.measurements["quality_flag"] != 0).sum())


class PhotometryManager:
    """Forced photometry of FITS images at catalog positions (the seed's ``PhotometryManager``).

    ``products_db_path``: a products database (path or SQLAlchemy URL) to store the measurements
    in, as the pipeline does; ``None`` measures without storing. ``settings``: the environment
    (default :meth:`Settings.from_env`: catalog, time zone, first night, statistics options).
    """

    def __init__(
        self,
        products_db_path: str | os.PathLike | None = None,
        *,
        settings: Settings | None = None,
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.products_db = None if products_db_path is None else os.fspath(products_db_path)

    def catalog_path(self, config: PhotometryConfig) -> str:
        """The catalog file ``config.catalog`` names (see :class:`PhotometryConfig`)."""
        name = config.catalog
        if name is not None and name.lower() not in SEED_CATALOG_NAMES:
            return str(Path(name).expanduser().resolve())
        if not self.settings.catalog_path:
            raise CatalogError(
                "(no catalog)",
                "no source catalog configured: set ESE_CATALOG / MASTER_SOURCES_DB "
                "or pass PhotometryConfig(catalog=FILE)",
            )
        return self.settings.catalog_path

    def load_catalog(self, config: PhotometryConfig) -> Catalog:
        return load_catalog_cached(self.catalog_path(config))

    def measure_for_fits(
        self, fits_path: str | os.PathLike, config: PhotometryConfig | None = None
    ) -> PhotometryResult:
        """Measure the catalog sources in one FITS image (see the module docstring).

        Raises a ValueError whose text names the file and the problem for an image or catalog that
        cannot be used (also when a products database would reject the image, e.g. a night
        before ``ESE_PARTITION_START``).
        """
        config = config or PhotometryConfig()
        if config.detect_ese and self.products_db is None:
            raise ValueError("detect_ese=True needs a products database (products_db_path)")
        catalog_path = self.catalog_path(config)
        catalog = load_catalog_cached(catalog_path)
        path = str(Path(fits_path).expanduser().resolve())
        if self.products_db is None:
            image = load_image(path)
            rows = photometry_rows(
                image,
                catalog,
                min_flux_mjy=config.min_flux_mjy,
                radius_deg=config.radius_deg,
                now=time.time(),
            )
            return PhotometryResult(path, image.info.mjd, catalog_path, rows, stored=False)
        return self._measure_and_store(path, catalog, catalog_path, config)

    def _measure_and_store(
        self, path: str, catalog: Catalog, catalog_path: str, config: PhotometryConfig
    ) -> PhotometryResult:
        settings = self.settings
        engine = make_engine(self.products_db)
        ensure_schema(engine)
        scan = pipeline.inspect_files(
            engine, [path], timezone=settings.timezone, first_night=settings.partition_start
        )
        if scan.rejected:
            raise ValueError(f"{path}: rejected: {scan.rejected[0][1]}")
        with engine.connect() as conn:  # registered before: a rejected image stays rejected
            known = conn.execute(
                sa.select(images_table.c.status, images_table.c.reason).where(
                    images_table.c.path == path
                )
            ).one()
        if known.status == "rejected":
            raise ValueError(f"{path}: rejected: {known.reason}")
        result = pipeline.measure_image(
            engine,
            catalog,
            path,
            min_flux_mjy=config.min_flux_mjy,
            radius_deg=config.radius_deg,
        )
        if result.status != "measured":
            raise ValueError(f"{path}: {result.status}: {result.reason}")
        with engine.connect() as conn:
            mjd = conn.execute(
                sa.select(images_table.c.mjd).where(images_table.c.path == path)
            ).scalar_one()
        night = night_of_mjd(mjd, settings.timezone)
        # as the pipeline: the night's gains and normalized fluxes, then its statistics
        pipeline.calibrate_nights(engine, [night], exclude_flags=settings.exclude_flags)
        with engine.connect() as conn:
            rows = pd.read_sql(
                sa.select(photometry_table)
                .where(photometry_table.c.image_path == path)
                .order_by(photometry_table.c.source_id),
                conn,
            ).drop(columns="id")
        pipeline.update_variability(
            engine,
            [night],
            flux_scale_error=settings.flux_scale_error,
            dip_window_days=settings.dip_window_days,
            exclude_flags=settings.exclude_flags,
            bin_nights=settings.bin_nights,
            flux_scale=settings.flux_scale,
        )
        found: list[dict] = []
        if config.detect_ese and len(rows):
            summary = pipeline.detect_candidates(
                engine,
                settings.detection(),
                source_ids=sorted(rows["source_id"].unique()),
                run_id=new_run_id("api"),
            )
            found = seed_candidate_records(engine, summary.flagged)
        return PhotometryResult(
            path, mjd, catalog_path, rows, stored=True, night=night, candidates=found
        )
