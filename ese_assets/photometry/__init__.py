"""The seed system's ``photometry`` names: ``PhotometryManager`` and ``PhotometryConfig``
(``ese_assets.photometry.manager``, as ``dsa110_contimg.photometry.manager``). The forced
photometry itself is :func:`ese_assets.pipeline.measurement.photometry_rows`."""

from ese_assets.photometry.manager import (
    SEED_CATALOG_NAMES,
    PhotometryConfig,
    PhotometryManager,
    PhotometryResult,
)

__all__ = ["SEED_CATALOG_NAMES", "PhotometryConfig", "PhotometryManager", "PhotometryResult"]
