"""Sensor: new or changed FITS files in the incoming directory become runs of their night.

Each tick lists the directory, registers files that are complete (unmodified for
``settle_seconds``), records unusable files as rejected with their reason, and then requests runs
for every image that still needs one: new images, images whose run failed, was canceled or never
started, and failed images whose backoff has elapsed (:mod:`ese_assets.pipeline.recovery`). One
run per night and batch, the batch's paths in the run config; the run key holds the batch token,
so a tick repeated after a crash never launches the same work twice.

Files rejected when registered are logged and also reported as an observation of the
``photometry`` asset (table of files and reasons): a file without a readable time has no night,
so no night's materialization would ever show it.
"""

# No `from __future__ import annotations`: Dagster reads the config/resource annotations.
from pathlib import Path

import dagster as dg

from ese_assets import pipeline
from ese_assets.orchestration.resources import IncomingDirectory, ProductsDatabase
from ese_assets.orchestration.runs import batch_run_config, batch_tags, plan_unfinished
from ese_assets.settings import Settings

#: New files examined per tick: a tick must finish well within Dagster's sensor timeout (60 s),
#: so a backlog of thousands of files is registered over several ticks.
MAX_NEW_FILES_PER_TICK = 2000

#: The asset whose event log shows the files rejected when registered.
REJECTIONS_ASSET = "photometry"
#: Rows of the rejected-files table of one observation (the count is always complete).
MAX_REJECTIONS_SHOWN = 200


def rejection_observation(rejected, trigger: str):
    """An observation of :data:`REJECTIONS_ASSET` listing ``rejected`` files (``(path, reason)``
    pairs) with their reasons, or None when there are none. ``trigger``: who registered them."""
    if not rejected:
        return None
    shown = sorted(rejected)[:MAX_REJECTIONS_SHOWN]
    table = dg.MetadataValue.table(
        records=[
            dg.TableRecord({"file": Path(path).name, "reason": reason, "path": path})
            for path, reason in shown
        ],
        schema=dg.TableSchema(
            columns=[dg.TableColumn(c, "string") for c in ("file", "reason", "path")]
        ),
    )
    return dg.AssetObservation(
        asset_key=REJECTIONS_ASSET,
        description=f"{len(rejected)} files rejected when registered ({trigger})",
        metadata={"files_rejected": len(rejected), "rejected_files": table, "trigger": trigger},
    )


def build_sensor(settings: Settings, job, partitions: dg.PartitionsDefinition):
    """The incoming-directory sensor of ``job`` (on by default)."""

    @dg.sensor(
        job=job,
        minimum_interval_seconds=settings.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Registers new FITS files in ESE_INCOMING_DIR and runs every image that "
        "still needs a run (new, interrupted, failed).",
    )
    def incoming_images_sensor(
        context: dg.SensorEvaluationContext,
        products_db: ProductsDatabase,
        incoming: IncomingDirectory,
    ) -> dg.SensorResult | dg.SkipReason:
        engine = products_db.get_engine()
        scan = None
        try:
            scan = pipeline.scan_directory(
                engine,
                incoming.path,
                settle_seconds=incoming.settle_seconds,
                timezone=incoming.timezone,
                first_night=incoming.partition_start,
                limit=MAX_NEW_FILES_PER_TICK,
            )
        except FileNotFoundError as exc:
            context.log.warning(str(exc))  # recovery of known images goes on regardless
        observation = None
        if scan is not None:
            for path, reason in scan.rejected:
                context.log.warning(f"rejected {path}: {reason}")
            observation = rejection_observation(scan.rejected, "sensor")
        events = [observation] if observation is not None else []
        plan = plan_unfinished(
            engine,
            context.instance,
            settings,
            last_night=partitions.get_last_partition_key(),
            patient=True,
        )
        for path in plan.gave_up:
            context.log.error(f"{path}: giving up after {settings.max_attempts} requests")
        if not plan.batches:
            waiting = f", {len(scan.waiting)} still being written" if scan and scan.waiting else ""
            rejected = len(scan.rejected) if scan else 0
            skip = f"nothing to run ({plan.summary()}; {rejected} rejected{waiting})"
            if not events:
                return dg.SkipReason(skip)
            return dg.SensorResult(skip_reason=skip, asset_events=events)
        context.log.info(
            plan.summary()
            + (f"; {scan.deferred} files left for the next tick" if scan and scan.deferred else "")
        )
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=batch.run_key,
                    partition_key=batch.night,
                    run_config=batch_run_config(batch),
                    tags=batch_tags(batch, "sensor", products_db.url),
                )
                for batch in plan.batches
            ],
            asset_events=events,
        )

    return incoming_images_sensor
