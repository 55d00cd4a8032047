"""The pipeline job: photometry -> variability_stats -> ese_candidates for one or more nights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import dagster as dg

JOB_NAME = "ese_pipeline"


def build_job(
    assets: Sequence[dg.AssetsDefinition],
    tags: Mapping[str, str] | None = None,
    executor_def: dg.ExecutorDefinition = dg.in_process_executor,
) -> dg.UnresolvedAssetJobDefinition:
    """The job over ``assets``; ``tags`` go on every run of it (sensor, schedule, backfill, UI).

    ``executor_def`` (``ESE_EXECUTOR``, :mod:`.executors`): by default all steps in the run's
    process: a run costs ~0.3 s of overhead instead of seconds per step, and the assets share
    the catalog's spatial index. The Celery executor sends each step to a worker of a cluster.
    """
    return dg.define_asset_job(
        name=JOB_NAME,
        tags=dict(tags or {}),
        selection=dg.AssetSelection.assets(*assets),
        executor_def=executor_def,
        description="Measure a night's images, update the statistics of the sources seen, "
        "flag ESEs.",
    )
