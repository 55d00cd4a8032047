"""Nightly reconciliation: re-run the night that just ended, in full.

The run measures every usable image of the night (catching files the sensor missed and images
whose run failed), recomputes the statistics and re-applies detection. Measurement is idempotent,
so re-running a night that the sensor already processed changes nothing but timestamps.

``build_schedule_from_partitioned_job`` is not used: with ``end_offset=1`` it targets the night in
progress, while reconciliation must target the night that has ended.
"""

import datetime as dt
from zoneinfo import ZoneInfo

import dagster as dg

from ese_assets.orchestration.jobs import ese_pipeline_job
from ese_assets.orchestration.partitions import PARTITION_START, PARTITION_TIMEZONE
from ese_assets.settings import Settings

NIGHTLY_HOUR = Settings.from_env().nightly_hour


def previous_night(when: dt.datetime, timezone: str = PARTITION_TIMEZONE) -> str:
    """The night (``YYYY-MM-DD`` in ``timezone``) before the local date of ``when``."""
    return (when.astimezone(ZoneInfo(timezone)).date() - dt.timedelta(days=1)).isoformat()


@dg.schedule(
    name="nightly_reconciliation",
    job=ese_pipeline_job,
    cron_schedule=f"0 {NIGHTLY_HOUR} * * *",
    execution_timezone=PARTITION_TIMEZONE,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Reprocesses the previous night in full (catch-up, recompute, detection).",
)
def nightly_schedule(context: dg.ScheduleEvaluationContext):
    night = previous_night(context.scheduled_execution_time)
    if night < PARTITION_START:
        return dg.SkipReason(f"night {night} precedes the first partition {PARTITION_START}")
    return dg.RunRequest(run_key=f"nightly:{night}", partition_key=night,
                         tags={"ese/trigger": "schedule"})
