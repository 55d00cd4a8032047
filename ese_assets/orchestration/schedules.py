"""Nightly reconciliation: re-run the night that just ended, in full.

The run measures every usable image of the night (catching files the sensor missed and images
whose runs failed), recomputes the statistics and re-applies detection. Measurement is idempotent,
so re-running a night that the sensor already processed changes nothing but timestamps.

``build_schedule_from_partitioned_job`` is not used: with ``end_offset=1`` it targets the night in
progress, while reconciliation must target the night that has ended.
"""

import datetime as dt
from zoneinfo import ZoneInfo

import dagster as dg

from ese_assets.settings import Settings


def previous_night(when: dt.datetime, timezone: str) -> str:
    """The night (``YYYY-MM-DD`` in ``timezone``) before the local date of ``when``."""
    return (when.astimezone(ZoneInfo(timezone)).date() - dt.timedelta(days=1)).isoformat()


def build_schedule(settings: Settings, job) -> dg.ScheduleDefinition:
    """The nightly reconciliation of ``job`` at ``settings.nightly_hour`` local time."""

    @dg.schedule(
        name="nightly_reconciliation",
        job=job,
        cron_schedule=f"0 {settings.nightly_hour} * * *",
        execution_timezone=settings.timezone,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Reprocesses the previous night in full (catch-up, recompute, detection).",
    )
    def nightly_schedule(context: dg.ScheduleEvaluationContext):
        night = previous_night(context.scheduled_execution_time, settings.timezone)
        if night < settings.partition_start:
            return dg.SkipReason(
                f"night {night} precedes the first partition {settings.partition_start}"
            )
        return dg.RunRequest(
            run_key=f"nightly:{night}", partition_key=night, tags={"ese/trigger": "schedule"}
        )

    return nightly_schedule
