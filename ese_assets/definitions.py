"""Dagster code location: ``dagster dev -m ese_assets.definitions``."""

from __future__ import annotations

import dagster as dg

from ese_assets.orchestration.assets import ese_candidates, photometry, variability_stats
from ese_assets.orchestration.jobs import ese_pipeline_job
from ese_assets.orchestration.resources import resources_from_settings
from ese_assets.orchestration.schedules import nightly_schedule
from ese_assets.orchestration.sensors import incoming_images_sensor
from ese_assets.settings import Settings


def build_definitions(settings: Settings | None = None, *, bind_env: bool = True) -> dg.Definitions:
    """All definitions, with resources configured from ``settings`` (default: the environment)."""
    settings = settings or Settings.from_env()
    return dg.Definitions(
        assets=[photometry, variability_stats, ese_candidates],
        jobs=[ese_pipeline_job],
        sensors=[incoming_images_sensor],
        schedules=[nightly_schedule],
        resources=resources_from_settings(settings, bind_env=bind_env),
    )


defs = build_definitions()
