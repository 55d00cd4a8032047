"""Observing nights: the calendar unit that partitions the pipeline.

A night is the calendar date (``YYYY-MM-DD``) of the observation start time in a chosen time zone
(UTC by default). Observatories whose nights straddle midnight UTC set the zone so that one night's
images share one date, e.g. ``America/Los_Angeles`` for OVRO (DSA-110).
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from astropy.time import Time

NIGHT_FORMAT = "%Y-%m-%d"


def night_of_mjd(mjd_utc: float, timezone: str = "UTC") -> str:
    """Night (``YYYY-MM-DD`` in ``timezone``) of an observation at UTC MJD ``mjd_utc``."""
    when = Time(float(mjd_utc), format="mjd", scale="utc").to_datetime(timezone=dt.UTC)
    return when.astimezone(ZoneInfo(timezone)).strftime(NIGHT_FORMAT)


def night_bounds_mjd(night: str, timezone: str = "UTC") -> tuple[float, float]:
    """UTC MJD interval ``[start, end)`` covered by ``night`` in ``timezone``."""
    day = dt.datetime.strptime(night, NIGHT_FORMAT).replace(tzinfo=ZoneInfo(timezone))
    start = Time(day.astimezone(dt.UTC)).mjd
    end = Time((day + dt.timedelta(days=1)).astimezone(dt.UTC)).mjd
    return float(start), float(end)
