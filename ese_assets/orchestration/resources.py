"""Resources: the products database, the source catalog, the incoming directory, detection settings.

Each is a ``ConfigurableResource``; :func:`resources_from_settings` binds them to environment
variables (``EnvVar``, so the UI shows where a value comes from) or to the documented defaults.
"""

from __future__ import annotations

import os

import dagster as dg
from sqlalchemy import Engine

from ese_assets.core.binning import DEFAULT_BIN_NIGHTS
from ese_assets.core.calibration import DEFAULT_FLUX_SCALE
from ese_assets.core.catalog import Catalog, load_catalog_cached
from ese_assets.core.detection import (
    DEFAULT_MIN_DIP_SIGMA,
    DEFAULT_MIN_OBS,
    DEFAULT_MIN_SIGMA,
    DEFAULT_PRESET,
    DEFAULT_USE_SIGMA_RULE,
    DetectionSettings,
)
from ese_assets.core.noise_correlation import DEFAULT_NOISE_CORRELATION
from ese_assets.core.quality import DEFAULT_EXCLUDED_FLAGS
from ese_assets.core.variability import DEFAULT_DIP_WINDOW_DAYS, DEFAULT_FLUX_SCALE_ERROR
from ese_assets.settings import (
    DEFAULT_MIN_FLUX_MJY,
    DEFAULT_PARTITION_START,
    DEFAULT_SETTLE_SECONDS,
    DEFAULT_TIMEZONE,
    Settings,
)
from ese_assets.storage.engine import ensure_schema, make_engine


class ProductsDatabase(dg.ConfigurableResource):
    """The products database (``PIPELINE_PRODUCTS_DB``): an SQLAlchemy URL or an SQLite file
    path."""

    url: str

    def get_engine(self) -> Engine:
        engine = make_engine(self.url)
        ensure_schema(engine)  # once per process and engine
        return engine


class SourceCatalogResource(dg.ConfigurableResource):
    """The source catalog (``ESE_CATALOG`` file, or the seed's ``MASTER_SOURCES_DB`` SQLite)."""

    path: str = ""
    min_flux_mjy: float = DEFAULT_MIN_FLUX_MJY

    def load(self) -> Catalog:
        if not self.path:
            raise ValueError(
                "no source catalog configured: set ESE_CATALOG (CSV, FITS table or "
                "VOTable) or MASTER_SOURCES_DB (SQLite with a 'sources' table)"
            )
        return load_catalog_cached(self.path)


class IncomingDirectory(dg.ConfigurableResource):
    """Where telescopes write FITS images (``ESE_INCOMING_DIR``)."""

    path: str
    settle_seconds: float = DEFAULT_SETTLE_SECONDS  # a file unmodified this long is complete
    timezone: str = DEFAULT_TIMEZONE  # a file's night is its observation date in this zone
    partition_start: str = DEFAULT_PARTITION_START  # files observed before are rejected


class MeasurementResource(dg.ConfigurableResource):
    """How a run measures its images (``ESE_PHOTOMETRY_WORKERS``)."""

    # processes reading and measuring images at once (pipeline.parallel); 1: in the run's process
    workers: int
    # errors: "measure" each image's noise correlation or assume the "beam" (ESE_NOISE_CORRELATION)
    noise_correlation: str = DEFAULT_NOISE_CORRELATION


class DetectionResource(dg.ConfigurableResource):
    """Variability and detection settings (``ESE_PRESET``, ``ESE_MIN_SIGMA``, ...)."""

    preset: str = DEFAULT_PRESET
    min_sigma: float = DEFAULT_MIN_SIGMA
    min_dip_sigma: float = DEFAULT_MIN_DIP_SIGMA
    min_obs: int = DEFAULT_MIN_OBS
    flux_scale_error: float = DEFAULT_FLUX_SCALE_ERROR
    dip_window_days: float = DEFAULT_DIP_WINDOW_DAYS  # median/robust std/dip over this window
    exclude_flags: int = DEFAULT_EXCLUDED_FLAGS  # quality bits left out of the statistics
    bin_nights: str = DEFAULT_BIN_NIGHTS  # window statistics on nightly bins: auto | on | off
    use_sigma_rule: bool = DEFAULT_USE_SIGMA_RULE  # the seed's rule (ESE_USE_SIGMA_RULE)
    flux_scale: str = DEFAULT_FLUX_SCALE  # normalized | raw fluxes (ESE_FLUX_SCALE)

    def settings(self) -> DetectionSettings:
        return DetectionSettings(
            min_sigma=self.min_sigma,
            min_dip_sigma=self.min_dip_sigma,
            min_obs=self.min_obs,
            use_sigma_rule=self.use_sigma_rule,
        )


def _from_env(name: str, value: str) -> str | dg.EnvVar:
    return dg.EnvVar(name) if os.environ.get(name, "").strip() else value


def resources_from_settings(settings: Settings, *, bind_env: bool = True) -> dict:
    """Resource instances for :class:`dagster.Definitions`.

    ``bind_env`` ties string values to their environment variables when those are set (the
    webserver/daemon case); the CLI passes ``False`` when command-line options override them.
    """
    env = _from_env if bind_env else (lambda _name, value: value)
    catalog_var = (
        "ESE_CATALOG" if os.environ.get("ESE_CATALOG", "").strip() else "MASTER_SOURCES_DB"
    )
    return {
        "products_db": ProductsDatabase(url=env("PIPELINE_PRODUCTS_DB", settings.products_db)),
        "catalog": SourceCatalogResource(
            path=env(catalog_var, settings.catalog_path or ""), min_flux_mjy=settings.min_flux_mjy
        ),
        "incoming": IncomingDirectory(
            path=env("ESE_INCOMING_DIR", settings.incoming_dir),
            settle_seconds=settings.settle_seconds,
            timezone=settings.timezone,
            partition_start=settings.partition_start,
        ),
        "measurement": MeasurementResource(
            workers=settings.photometry_workers, noise_correlation=settings.noise_correlation
        ),
        "detection": DetectionResource(
            preset=settings.preset,
            min_sigma=settings.min_sigma,
            min_dip_sigma=settings.min_dip_sigma,
            min_obs=settings.min_obs,
            flux_scale_error=settings.flux_scale_error,
            dip_window_days=settings.dip_window_days,
            exclude_flags=settings.exclude_flags,
            bin_nights=settings.bin_nights,
            use_sigma_rule=settings.use_sigma_rule,
            flux_scale=settings.flux_scale,
        ),
    }
