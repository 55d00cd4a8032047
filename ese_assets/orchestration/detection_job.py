"""The ``ese_detect`` job: ESE detection for a given set of sources (or all), on demand.

Launched by the REST API (``POST /api/jobs/ese-detect``, ``POST /api/batch/ese-detect``, see
:mod:`ese_assets.web.jobs`) and visible in the Dagster UI like any run. It is an op job, not an
asset job: ``ese_candidates`` is partitioned by night, while this job re-scores chosen sources
across their whole history, whatever night they were measured in. It calls the same units of work
as the ``ese_candidates`` asset and ``ese detect`` (:mod:`ese_assets.pipeline`), so the candidate
workflow is the same: open candidates are updated in place, dismissed ones stay dismissed unless
their significance grew.

The op's output metadata (``candidates_found``, the flagged sources) is what ``GET /api/jobs/{id}``
reports as the run's result.
"""

# No `from __future__ import annotations`: Dagster reads the config/resource annotations.
import dagster as dg
from pydantic import Field

from ese_assets import pipeline
from ese_assets.core.detection import DetectionSettings, resolve_min_sigma
from ese_assets.orchestration.assets import failures_for_dagster
from ese_assets.orchestration.resources import DetectionResource, ProductsDatabase
from ese_assets.storage import statistics as statistics_db

DETECT_JOB_NAME = "ese_detect"
DETECT_OP_NAME = "detect_ese_candidates"
#: Output-metadata keys of the op (read back by the REST API).
RESULT_KEYS = (
    "candidates_found",
    "new_candidates",
    "updated_candidates",
    "expired_candidates",
    "reopened_candidates",
    "unknown_source_ids",
)


class DetectConfig(dg.Config):
    """What to detect: the seed's ``ese-detect`` parameters."""

    source_ids: list[str] = Field(
        default_factory=list, description="Sources to examine; empty: every source."
    )
    preset: str | None = Field(
        default=None, description="conservative (5.0), moderate (3.5) or sensitive (3.0)."
    )
    min_sigma: float | None = Field(
        default=None, description="sigma_deviation threshold; overrides the preset."
    )
    min_dip_sigma: float | None = Field(
        default=None, description="|dip_significance| threshold; default: the resource's."
    )
    recompute: bool = Field(
        default=False,
        description="Rebuild the sums and variability_stats of these sources from photometry "
        "first (O(history)).",
    )


def _settings(config: DetectConfig, detection: DetectionResource) -> DetectionSettings:
    """The request's thresholds; what it leaves out comes from the ``detection`` resource."""
    explicit = config.preset is not None or config.min_sigma is not None
    return DetectionSettings(
        min_sigma=resolve_min_sigma(config.preset, config.min_sigma)
        if explicit
        else detection.min_sigma,
        min_dip_sigma=detection.min_dip_sigma
        if config.min_dip_sigma is None
        else config.min_dip_sigma,
        min_obs=detection.min_obs,
        # a request that names a sigma threshold asks for the seed's rule
        use_sigma_rule=explicit or detection.use_sigma_rule,
    )


@dg.op(name=DETECT_OP_NAME, out=dg.Out(dg.Nothing))
def detect_ese_candidates_op(
    context: dg.OpExecutionContext,
    config: DetectConfig,
    products_db: ProductsDatabase,
    detection: DetectionResource,
):
    """Flag the chosen sources whose statistics pass the detection rules; update
    ``ese_candidates``."""
    engine = products_db.get_engine()
    ids = list(dict.fromkeys(config.source_ids)) or None
    with failures_for_dagster():
        settings = _settings(config, detection)
        if config.recompute:
            pipeline.recompute_variability(
                engine,
                ids,
                flux_scale_error=detection.flux_scale_error,
                dip_window_days=detection.dip_window_days,
                exclude_flags=detection.exclude_flags,
                flux_scale=detection.flux_scale,
            )
        unknown: list[str] = []
        if ids is not None:
            known = set(statistics_db.variability_stats(engine, source_ids=ids)["source_id"])
            unknown = [i for i in ids if i not in known]
        # The Dagster run id goes on every history entry, so `ese candidates undo` can undo it.
        summary = pipeline.detect_candidates(
            engine, settings, source_ids=ids, run_id=context.run_id
        )
    if unknown:
        context.log.warning(f"no statistics for {len(unknown)} source(s): {unknown[:10]}")
    flagged = summary.flagged.sort_values("significance", ascending=False)
    rows = [
        {
            "source_id": str(r.source_id),
            "significance": float(r.significance),
            "flag_type": str(r.flag_type),
        }
        for r in flagged.itertuples(index=False)
    ]
    yield dg.Output(
        None,
        metadata={
            "sources_examined": "all" if ids is None else len(ids),
            "candidates_found": len(rows),
            "new_candidates": summary.inserted,
            "updated_candidates": summary.updated,
            "expired_candidates": summary.expired,
            "reopened_candidates": summary.reopened,
            "unknown_source_ids": dg.MetadataValue.json(unknown),
            "min_sigma": settings.min_sigma,
            "min_dip_sigma": settings.min_dip_sigma,
            "candidates": dg.MetadataValue.json(rows),
        },
    )


def build_detection_job() -> dg.JobDefinition:
    """The ``ese_detect`` job (one op, in process: detection takes well under a second per
    thousand sources, less than a subprocess would cost)."""

    @dg.job(
        name=DETECT_JOB_NAME,
        executor_def=dg.in_process_executor,
        description="ESE detection for chosen sources (REST API: POST /api/jobs/ese-detect, "
        "POST /api/batch/ese-detect).",
    )
    def ese_detect():
        detect_ese_candidates_op()

    return ese_detect
