"""Units of work that join the science core to the products database.

Dagster assets, the sensor, the CLI and the Python API all call these functions, so the same code
path serves every interface. Nothing here imports Dagster.

Units and their transactions:

* :func:`scan_directory` (:mod:`.registration`) registers new files in ``images`` (usable ones
  ``pending``, the rest ``rejected`` with a reason). It reads only FITS headers.
* :func:`measure_images` (:mod:`.measurement`) measures each image in one transaction (its
  photometry rows are replaced and its ``images`` row marked ``measured``), so a run killed
  half-way leaves whole images only.
* :func:`calibrate_nights` (:mod:`.calibration`) computes each image's flux-scale gain from its
  reference sources, one transaction per night: ``image_gains``, normalized fluxes and the
  bad-image quality bit in ``photometry``.
* :func:`update_variability` (:mod:`.statistics`) updates the statistics of every source measured
  in some nights in one transaction: additive per-night sums give the whole-history moments, a
  trailing window the dip statistic, so the cost does not grow with the history.
  :func:`recompute_variability` rebuilds them from the whole history on demand.
* :func:`detect_candidates` (:mod:`.candidates`) applies the detection rules and the candidate
  workflow (:mod:`ese_assets.core.candidates`).
"""

from ese_assets.pipeline.calibration import calibrate_nights
from ese_assets.pipeline.candidates import DetectionSummary, detect_candidates
from ese_assets.pipeline.measurement import ImageResult, measure_image, measure_images
from ese_assets.pipeline.progress import Progress
from ese_assets.pipeline.registration import (
    PARTIAL_SUFFIXES,
    REGISTER_BATCH,
    ScanResult,
    inspect_files,
    scan_directory,
)
from ese_assets.pipeline.statistics import (
    nightly_lightcurves,
    recompute_variability,
    stats_from_lightcurves,
    update_variability,
)

__all__ = [
    "PARTIAL_SUFFIXES",
    "REGISTER_BATCH",
    "DetectionSummary",
    "ImageResult",
    "Progress",
    "ScanResult",
    "calibrate_nights",
    "detect_candidates",
    "inspect_files",
    "measure_image",
    "measure_images",
    "nightly_lightcurves",
    "recompute_variability",
    "scan_directory",
    "stats_from_lightcurves",
    "update_variability",
]
