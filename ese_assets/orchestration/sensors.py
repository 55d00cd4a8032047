"""Sensor: new FITS files in the incoming directory become runs of their night.

Each tick lists the directory, registers files that are complete (unmodified for
``settle_seconds``), records unusable files as rejected with their reason, and requests one run per
night for the pending images, their paths in the run config. The run key is derived from the
night and the image list, so a tick repeated after a crash never launches the same work twice.
"""

# No `from __future__ import annotations`: Dagster reads the config/resource annotations.
import hashlib

import dagster as dg

from ese_assets import pipeline
from ese_assets.orchestration.jobs import ese_pipeline_job
from ese_assets.orchestration.partitions import (
    PARTITION_START, PARTITION_TIMEZONE, nights_partitions,
)
from ese_assets.orchestration.resources import IncomingDirectory, ProductsDatabase
from ese_assets.settings import Settings
from ese_assets.storage import images as images_db

#: Upper bound on images per run, so one run of a busy night stays minutes long, not hours.
MAX_IMAGES_PER_RUN = 400
#: New files examined per tick: a tick must finish well within Dagster's sensor timeout (60 s),
#: so a backlog of thousands of files is registered over several ticks.
MAX_NEW_FILES_PER_TICK = 2000


def night_run_requests(pending, last_night: str) -> list[dg.RunRequest]:
    """One run request per night (and per ``MAX_IMAGES_PER_RUN`` images) of ``pending`` images."""
    requests = []
    for night, group in pending.groupby("night", sort=True):
        if night > last_night:  # clock skew: the partition does not exist yet; wait for it
            continue
        paths = sorted(group["path"])
        for start in range(0, len(paths), MAX_IMAGES_PER_RUN):
            chunk = paths[start:start + MAX_IMAGES_PER_RUN]
            digest = hashlib.sha1("\n".join(chunk).encode()).hexdigest()[:16]
            requests.append(dg.RunRequest(
                run_key=f"{night}:{digest}",
                partition_key=night,
                run_config={"ops": {"photometry": {"config": {"image_paths": chunk}}}},
                tags={"ese/trigger": "sensor", "ese/images": str(len(chunk))},
            ))
    return requests


@dg.sensor(
    job=ese_pipeline_job,
    minimum_interval_seconds=Settings.from_env().sensor_interval_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers new FITS files in ESE_INCOMING_DIR and runs their nights.",
)
def incoming_images_sensor(context: dg.SensorEvaluationContext, products_db: ProductsDatabase,
                           incoming: IncomingDirectory) -> dg.SensorResult | dg.SkipReason:
    engine = products_db.get_engine()
    try:
        scan = pipeline.scan_directory(engine, incoming.path,
                                       settle_seconds=incoming.settle_seconds,
                                       timezone=PARTITION_TIMEZONE, first_night=PARTITION_START,
                                       limit=MAX_NEW_FILES_PER_TICK)
    except FileNotFoundError as exc:
        return dg.SkipReason(str(exc))
    for path, reason in scan.rejected:
        context.log.warning(f"rejected {path}: {reason}")
    pending = images_db.pending_images(engine)
    last_night = nights_partitions.get_last_partition_key()
    requests = night_run_requests(pending, last_night)
    requested = [p for r in requests for p in r.run_config["ops"]["photometry"]["config"]["image_paths"]]
    images_db.set_image_status(engine, requested, "queued")
    if not requests:
        waiting = f", {len(scan.waiting)} still being written" if scan.waiting else ""
        return dg.SkipReason(f"no new images ({len(scan.rejected)} rejected{waiting})")
    context.log.info(f"{len(requested)} new images in {len(requests)} runs; "
                     f"{len(scan.rejected)} rejected, {len(scan.waiting)} still being written, "
                     f"{scan.deferred} left for the next tick")
    return dg.SensorResult(run_requests=requests)
