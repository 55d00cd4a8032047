"""Run the pipeline for a directory of images through a persistent Dagster instance.

``ese ingest`` and ``ese demo`` use this: files are registered exactly as the sensor registers
them, then each night's run (the same run request the sensor would make) executes in this process
against the instance in ``$DAGSTER_HOME``, so the runs, their logs and materializations appear in
the Dagster UI next to the sensor's and the schedule's runs.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from ese_assets import pipeline
from ese_assets.definitions import build_definitions
from ese_assets.orchestration.jobs import ese_pipeline_job
from ese_assets.orchestration.partitions import (
    PARTITION_START,
    PARTITION_TIMEZONE,
    nights_partitions,
)
from ese_assets.orchestration.sensors import night_run_requests
from ese_assets.settings import Settings
from ese_assets.storage import images as images_db
from ese_assets.storage.engine import ensure_schema, make_engine

#: The project's instance configuration (source checkout); copied into a new DAGSTER_HOME.
PROJECT_DAGSTER_YAML = Path(__file__).resolve().parents[1] / "dagster.yaml"


def dagster_instance(settings: Settings) -> dg.DagsterInstance:
    """The persistent instance of ``$DAGSTER_HOME`` (default: ``<data dir>/dagster_home``).

    A new home gets the project's ``dagster.yaml`` (as ``make demo``/``make ui`` do), so the CLI
    and the UI see the same configuration.
    """
    home = Path(os.environ.get("DAGSTER_HOME") or Path(settings.data_dir) / "dagster_home")
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists() and PROJECT_DAGSTER_YAML.exists():
        shutil.copy(PROJECT_DAGSTER_YAML, home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return dg.DagsterInstance.get()


@dataclass
class NightRun:
    night: str
    run_id: str
    success: bool
    n_images: int
    seconds: float


def ingest_directory(settings: Settings, directory: str | Path, *, settle_seconds: float = 0.0,
                     progress=print, verbose: bool = False,
                     ) -> tuple[pipeline.ScanResult, list[NightRun]]:
    """Register the files of ``directory`` and run every night that has pending images.

    Each run's full log is in the Dagster instance (UI); the console shows one line per run unless
    ``verbose`` also echoes Dagster's own step logs.
    """
    engine = make_engine(settings.products_db)
    ensure_schema(engine)
    scan = pipeline.scan_directory(engine, directory, settle_seconds=settle_seconds,
                                   timezone=PARTITION_TIMEZONE, first_night=PARTITION_START,
                                   progress=progress)
    progress(f"{directory}: {len(scan.registered)} new images, {len(scan.rejected)} rejected, "
             f"{scan.already_known} already known, {len(scan.waiting)} still being written")
    requests = night_run_requests(images_db.pending_images(engine),
                                  nights_partitions.get_last_partition_key())
    if not requests:
        return scan, []
    instance = dagster_instance(settings)
    job = build_definitions(settings, bind_env=False).resolve_job_def(ese_pipeline_job.name)
    runs = []
    for i, request in enumerate(requests, start=1):
        paths = request.run_config["ops"]["photometry"]["config"]["image_paths"]
        images_db.set_image_status(engine, paths, "queued")  # keep a running sensor off these files
        started = time.monotonic()
        result = job.execute_in_process(
            partition_key=request.partition_key,
            run_config={**request.run_config, "loggers": {"console": {"config": {
                "log_level": "DEBUG" if verbose else "WARNING"}}}},
            instance=instance, tags={**request.tags, "ese/trigger": "cli"},
            raise_on_error=False)
        run = NightRun(request.partition_key, result.run_id, result.success, len(paths),
                       time.monotonic() - started)
        runs.append(run)
        progress(f"[{i}/{len(requests)}] night {run.night}: {run.n_images} images, "
                 f"{'succeeded' if run.success else 'FAILED'} in {run.seconds:.1f} s "
                 f"(run {run.run_id[:8]})")
    return scan, runs
