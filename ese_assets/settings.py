"""Configuration from environment variables, with defaults that work out of the box.

Every variable is documented in the README ("Configuration"). Paths are made absolute when read, so
runs launched by the Dagster daemon in another process see the same files.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ese_assets.core.binning import DEFAULT_BIN_NIGHTS, validate_bin_nights
from ese_assets.core.calibration import DEFAULT_FLUX_SCALE, validate_flux_scale
from ese_assets.core.detection import (
    DEFAULT_MIN_DIP_SIGMA,
    DEFAULT_MIN_OBS,
    DEFAULT_PRESET,
    DEFAULT_USE_SIGMA_RULE,
    PRESETS,
    DetectionSettings,
    resolve_min_sigma,
    sigma_rule_requested,
)
from ese_assets.core.noise_correlation import DEFAULT_NOISE_CORRELATION, NOISE_CORRELATION_MODES
from ese_assets.core.quality import DEFAULT_EXCLUDED_FLAGS, validate_exclude_flags
from ese_assets.core.variability import DEFAULT_DIP_WINDOW_DAYS, DEFAULT_FLUX_SCALE_ERROR

#: A file is complete when unmodified this long (seconds); younger files may still be written.
DEFAULT_SETTLE_SECONDS = 10.0

#: Catalog flux limit (mJy) of forced photometry: every catalog source in the footprint.
DEFAULT_MIN_FLUX_MJY = 0.0

#: First night partition, time zone of the night calendar, hour of the nightly reconciliation.
DEFAULT_PARTITION_START = "2020-01-01"
DEFAULT_TIMEZONE = "UTC"
DEFAULT_NIGHTLY_HOUR = 12
DEFAULT_SENSOR_INTERVAL_SECONDS = 30

#: First delay (seconds) of every retry: a Dagster step that met a busy or unreachable database
#: waits this long, then twice as long...; a failed or orphaned image waits delay * 2**attempts
#: (capped at an hour) before it is requested again.
DEFAULT_RETRY_DELAY_S = 30.0
#: Run requests per image before the sensor gives up on it (the nightly run and `ese ingest`
#: still retry it).
DEFAULT_MAX_ATTEMPTS = 5


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow),
    at least 1: the default number of photometry worker processes."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


#: Dagster executors of the pipeline job (ESE_EXECUTOR): steps in the run's own process, or as
#: Celery tasks on workers (dagster-celery, the ``distributed`` extra) that may run on other hosts.
EXECUTORS = ("in_process", "celery")
DEFAULT_EXECUTOR = "in_process"
#: Broker of the Celery executor and its workers; the RabbitMQ server of a single-host install.
DEFAULT_CELERY_BROKER = "amqp://guest:guest@127.0.0.1:5672//"
#: Where Celery workers send task results back (dagster-celery's default: replies over the broker).
DEFAULT_CELERY_BACKEND = "rpc://"
#: Broker queue of the pipeline's steps (dagster-celery's default); workers listen on it (-q).
DEFAULT_CELERY_QUEUE = "dagster"


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name, "").strip()
    return value if value else default


def _env_float(name: str, default: float) -> float:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from None


def _positive(name: str, default: float) -> float:
    value = _env_float(name, default)
    if not value > 0:
        raise ValueError(f"environment variable {name}={value!r} must be > 0")
    return value


def _exclude_flags(name: str) -> int:
    value = _env_float(name, DEFAULT_EXCLUDED_FLAGS)
    try:
        if value != int(value):
            raise ValueError(f"not an integer: {value}")
        return validate_exclude_flags(int(value))
    except ValueError as exc:
        raise ValueError(f"environment variable {name}: {exc}") from None


def _bin_nights(name: str) -> str:
    try:
        return validate_bin_nights(_env(name, DEFAULT_BIN_NIGHTS))
    except ValueError as exc:
        raise ValueError(f"environment variable {name}: {exc}") from None


def _flux_scale(name: str) -> str:
    try:
        return validate_flux_scale(_env(name, DEFAULT_FLUX_SCALE))
    except ValueError as exc:
        raise ValueError(f"environment variable {name}: {exc}") from None


def _use_sigma_rule(name: str) -> bool | None:
    """``ESE_USE_SIGMA_RULE``: 1/true/yes or 0/false/no; None when unset."""
    raw = _env(name)
    if raw is None:
        return None
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name}={raw!r} is not one of 1/0/true/false/yes/no")


def _int(name: str, default: int) -> int:
    value = _env_float(name, default)
    if value != int(value):
        raise ValueError(f"environment variable {name}={value!r} is not a whole number")
    return int(value)


def _validate(settings: Settings) -> None:
    """One clear ValueError naming the environment variable of the first bad value."""
    try:
        dt.date.fromisoformat(settings.partition_start)
    except ValueError:
        raise ValueError(
            f"ESE_PARTITION_START={settings.partition_start!r} is not a date (YYYY-MM-DD)"
        ) from None
    try:
        ZoneInfo(settings.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"ESE_TIMEZONE={settings.timezone!r} is not an IANA time zone "
            "(e.g. UTC, America/Los_Angeles)"
        ) from None
    checks = (
        ("ESE_SETTLE_SECONDS", settings.settle_seconds, settings.settle_seconds >= 0, ">= 0"),
        ("ESE_MIN_FLUX_MJY", settings.min_flux_mjy, settings.min_flux_mjy >= 0, ">= 0"),
        (
            "ESE_FLUX_SCALE_ERROR",
            settings.flux_scale_error,
            0 <= settings.flux_scale_error < 1,
            "in [0, 1)",
        ),
        ("ESE_MIN_OBS", settings.min_obs, settings.min_obs >= 2, ">= 2"),
        ("ESE_NIGHTLY_HOUR", settings.nightly_hour, 0 <= settings.nightly_hour <= 23, "0-23"),
        (
            "ESE_SENSOR_INTERVAL_SECONDS",
            settings.sensor_interval_seconds,
            settings.sensor_interval_seconds >= 1,
            ">= 1",
        ),
        ("ESE_RETRY_DELAY_S", settings.retry_delay_s, settings.retry_delay_s >= 0, ">= 0"),
        ("ESE_MAX_ATTEMPTS", settings.max_attempts, settings.max_attempts >= 1, ">= 1"),
        (
            "ESE_NOISE_CORRELATION",
            settings.noise_correlation,
            settings.noise_correlation in NOISE_CORRELATION_MODES,
            f"one of {', '.join(NOISE_CORRELATION_MODES)}",
        ),
        (
            "ESE_PHOTOMETRY_WORKERS",
            settings.photometry_workers,
            settings.photometry_workers >= 1,
            ">= 1 (1 measures the images one by one in the run's process)",
        ),
        (
            "ESE_EXECUTOR",
            settings.executor,
            settings.executor in EXECUTORS,
            f"one of {', '.join(EXECUTORS)}",
        ),
    )
    for name, value, ok, rule in checks:
        if not ok:
            raise ValueError(f"{name}={value!r} must be {rule}")


def _abspath(value: str) -> str:
    """Absolute path for a filesystem path; URLs (``scheme://``) are returned unchanged."""
    return value if "://" in value else str(Path(value).expanduser().resolve())


@dataclass(frozen=True)
class Settings:
    """Everything the pipeline needs to know about its environment."""

    data_dir: str
    products_db: str  # SQLAlchemy URL or path of an SQLite file
    catalog_path: str | None  # source catalog file (CSV/FITS/VOTable) or MASTER_SOURCES_DB SQLite
    incoming_dir: str
    partition_start: str  # first night, YYYY-MM-DD
    timezone: str  # IANA name; a night is a calendar date in this zone
    settle_seconds: float  # a file is complete when unmodified for this long
    min_flux_mjy: float  # catalog flux limit for forced photometry
    flux_scale_error: float  # fractional calibration floor used by the variability metrics
    dip_window_days: float  # trailing window of the robust baseline and the dip statistic
    preset: str
    min_sigma: float
    min_dip_sigma: float
    min_obs: int
    nightly_hour: int  # local hour at which the nightly reconciliation runs
    sensor_interval_seconds: int  # how often the daemon evaluates the incoming-directory sensor
    # photometry rows with any of these quality bits are left out of statistics (core.quality)
    exclude_flags: int = DEFAULT_EXCLUDED_FLAGS
    retry_delay_s: float = DEFAULT_RETRY_DELAY_S  # first delay of step and image retries
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # run requests per image before the sensor gives up
    # window statistics on nightly bins: auto | on | off (core.binning.sources_to_bin)
    bin_nights: str = DEFAULT_BIN_NIGHTS
    # the seed's sigma_deviation rule: ESE_USE_SIGMA_RULE, else on when ESE_PRESET/ESE_MIN_SIGMA
    # are set (core.detection.sigma_rule_requested), else off
    use_sigma_rule: bool = DEFAULT_USE_SIGMA_RULE
    # errors of the photometry: "measure" each image's noise correlation, or assume the "beam"
    # (core.noise_correlation)
    noise_correlation: str = DEFAULT_NOISE_CORRELATION
    # statistics and detection on gain-normalized or raw fluxes (core.calibration.FLUX_SCALES)
    flux_scale: str = DEFAULT_FLUX_SCALE
    # worker processes measuring a run's images in parallel (pipeline.parallel); 1 = serial
    photometry_workers: int = field(default_factory=usable_cores)
    # Dagster executor of the pipeline job, and the Celery broker/backend when it is "celery"
    executor: str = DEFAULT_EXECUTOR
    celery_broker: str = DEFAULT_CELERY_BROKER
    celery_backend: str = DEFAULT_CELERY_BACKEND
    celery_queue: str = DEFAULT_CELERY_QUEUE

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_env(cls) -> Settings:
        data_dir = _abspath(_env("ESE_DATA_DIR", "data"))
        preset = _env("ESE_PRESET", DEFAULT_PRESET)
        if preset not in PRESETS:
            raise ValueError(f"ESE_PRESET={preset!r} is not one of {sorted(PRESETS)}")
        min_sigma_env = _env("ESE_MIN_SIGMA")
        catalog = _env("ESE_CATALOG") or _env("MASTER_SOURCES_DB")
        return cls(
            data_dir=data_dir,
            products_db=_abspath(
                _env("PIPELINE_PRODUCTS_DB", str(Path(data_dir) / "products.sqlite3"))
            ),
            catalog_path=_abspath(catalog) if catalog else None,
            incoming_dir=_abspath(_env("ESE_INCOMING_DIR", str(Path(data_dir) / "incoming"))),
            partition_start=_env("ESE_PARTITION_START", DEFAULT_PARTITION_START),
            timezone=_env("ESE_TIMEZONE", DEFAULT_TIMEZONE),
            settle_seconds=_env_float("ESE_SETTLE_SECONDS", DEFAULT_SETTLE_SECONDS),
            min_flux_mjy=_env_float("ESE_MIN_FLUX_MJY", DEFAULT_MIN_FLUX_MJY),
            flux_scale_error=_env_float("ESE_FLUX_SCALE_ERROR", DEFAULT_FLUX_SCALE_ERROR),
            dip_window_days=_positive("ESE_DIP_WINDOW_DAYS", DEFAULT_DIP_WINDOW_DAYS),
            preset=preset,
            min_sigma=resolve_min_sigma(preset, float(min_sigma_env) if min_sigma_env else None),
            min_dip_sigma=_env_float("ESE_MIN_DIP_SIGMA", DEFAULT_MIN_DIP_SIGMA),
            min_obs=_int("ESE_MIN_OBS", DEFAULT_MIN_OBS),
            nightly_hour=_int("ESE_NIGHTLY_HOUR", DEFAULT_NIGHTLY_HOUR),
            sensor_interval_seconds=_int(
                "ESE_SENSOR_INTERVAL_SECONDS", DEFAULT_SENSOR_INTERVAL_SECONDS
            ),
            exclude_flags=_exclude_flags("ESE_EXCLUDE_FLAGS"),
            retry_delay_s=_env_float("ESE_RETRY_DELAY_S", DEFAULT_RETRY_DELAY_S),
            max_attempts=_int("ESE_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS),
            noise_correlation=_env("ESE_NOISE_CORRELATION", DEFAULT_NOISE_CORRELATION),
            bin_nights=_bin_nights("ESE_BIN_NIGHTS"),
            flux_scale=_flux_scale("ESE_FLUX_SCALE"),
            use_sigma_rule=sigma_rule_requested(
                _env("ESE_PRESET"), min_sigma_env, _use_sigma_rule("ESE_USE_SIGMA_RULE")
            ),
            photometry_workers=_int("ESE_PHOTOMETRY_WORKERS", usable_cores()),
            executor=_env("ESE_EXECUTOR", DEFAULT_EXECUTOR),
            celery_broker=_env("ESE_CELERY_BROKER", DEFAULT_CELERY_BROKER),
            celery_backend=_env("ESE_CELERY_BACKEND", DEFAULT_CELERY_BACKEND),
            celery_queue=_env("ESE_CELERY_QUEUE", DEFAULT_CELERY_QUEUE),
        )

    def detection(self) -> DetectionSettings:
        return DetectionSettings(
            min_sigma=self.min_sigma,
            min_dip_sigma=self.min_dip_sigma,
            min_obs=self.min_obs,
            use_sigma_rule=self.use_sigma_rule,
        )
