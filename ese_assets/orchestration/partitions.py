"""Night partitions shared by the assets, the job, the sensor and the schedule.

One partition per observing night (a calendar date in ``ESE_TIMEZONE``, UTC by default) scales to
decades (3 650 partitions in ten years), whereas one partition per image would pass Dagster's
recommended 100 000 partitions per asset within a year at DSA-110's cadence. ``end_offset=1`` makes
the night in progress a partition, so images arriving tonight are processed tonight.
"""

from __future__ import annotations

import dagster as dg

from ese_assets.settings import Settings

#: Date-range backfills launched from the UI run up to a week of nights per run.
nights_backfill_policy = dg.BackfillPolicy.multi_run(max_partitions_per_run=7)


def build_partitions(settings: Settings) -> dg.DailyPartitionsDefinition:
    """Nights from ``settings.partition_start`` to tonight, in ``settings.timezone``."""
    return dg.DailyPartitionsDefinition(
        start_date=settings.partition_start, timezone=settings.timezone, end_offset=1
    )
