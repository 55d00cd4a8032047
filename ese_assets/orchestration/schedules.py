"""Nightly reconciliation: re-run the night that just ended, in full.

The run measures every usable image of the night (catching files the sensor missed and images
whose run failed), recomputes the statistics and re-applies detection. Measurement is idempotent,
so re-running a night that the sensor already processed changes nothing but timestamps.
"""

from __future__ import annotations

import dagster as dg

from ese_assets.orchestration.jobs import ese_pipeline_job
from ese_assets.settings import Settings

nightly_schedule = dg.build_schedule_from_partitioned_job(
    ese_pipeline_job,
    name="nightly_reconciliation",
    hour_of_day=Settings.from_env().nightly_hour,
    minute_of_hour=0,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Reprocesses the previous night in full (catch-up, recompute, detection).",
)
