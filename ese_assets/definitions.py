"""Dagster code location: ``dagster dev -m ese_assets.definitions``."""

from __future__ import annotations

import dagster as dg

from ese_assets.orchestration.assets import build_assets
from ese_assets.orchestration.detection_job import build_detection_job
from ese_assets.orchestration.executors import pipeline_executor
from ese_assets.orchestration.jobs import build_job
from ese_assets.orchestration.partitions import build_partitions
from ese_assets.orchestration.resources import resources_from_settings
from ese_assets.orchestration.runs import products_db_tags
from ese_assets.orchestration.schedules import build_schedule
from ese_assets.orchestration.sensors import build_sensor
from ese_assets.settings import Settings


def build_definitions(settings: Settings | None = None, *, bind_env: bool = True) -> dg.Definitions:
    """Every definition (partitions, assets, job, sensor, schedule, resources) from ``settings``.

    ``settings`` defaults to the environment, read once here; nothing else reads it.
    """
    settings = settings or Settings.from_env()
    partitions = build_partitions(settings)
    assets = build_assets(partitions, settings.retry_delay_s)
    # every run names its products database, so runs of several databases in one instance differ
    job = build_job(
        assets,
        tags=products_db_tags(settings.products_db),
        executor_def=pipeline_executor(settings),
    )
    return dg.Definitions(
        assets=assets,
        jobs=[job, build_detection_job()],
        sensors=[build_sensor(settings, job, partitions)],
        schedules=[build_schedule(settings, job)],
        resources=resources_from_settings(settings, bind_env=bind_env),
    )


defs = build_definitions()
