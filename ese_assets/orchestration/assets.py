"""The night-partitioned assets: ``photometry`` -> ``image_calibration`` -> ``variability_stats``
-> ``ese_candidates``, built by :func:`build_assets` for the partitions of a :class:`Settings`.

Each asset writes to the products database itself and returns a ``MaterializeResult`` (nothing is
pickled by an IO manager). Checks run inside the asset that owns the data, for the same nights.
A ranged run (a UI backfill batches up to a week per run) handles all its nights at once.

Errors: a database that is busy or unreachable (:class:`DatabaseUnavailable`) is retried by the
step's ``RetryPolicy`` with exponential backoff; anything else (a bad catalog, a bug) fails the
step at once with one line (``dg.Failure(allow_retries=False)``), since retrying cannot help.
"""

# No `from __future__ import annotations`: Dagster reads the config/resource annotations.
import contextlib
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from ese_assets import pipeline
from ese_assets.core.candidates import OPEN_STATUSES
from ese_assets.core.errors import InputError
from ese_assets.core.values import py_scalar
from ese_assets.orchestration.candidate_report import candidate_metadata
from ese_assets.orchestration.partitions import nights_backfill_policy
from ese_assets.orchestration.resources import (
    DetectionResource,
    IncomingDirectory,
    MeasurementResource,
    ProductsDatabase,
    SourceCatalogResource,
)
from ese_assets.orchestration.runs import PID_TAG, process_tags
from ese_assets.storage import calibration as calibration_db
from ese_assets.storage import candidates as candidates_db
from ese_assets.storage import images as images_db
from ese_assets.storage import photometry as photometry_db
from ese_assets.storage import statistics as statistics_db
from ese_assets.storage.errors import DatabaseUnavailable
from ese_assets.storage.schema import UNFINISHED_STATUSES

GROUP = "ese"
#: Rows of a metadata table shown in the UI (a DSA-110 night has ~300 images).
_MAX_TABLE_ROWS = 500
#: Step retries after a busy or unreachable database (delays: retry_delay_s, x2, x4, x8).
STEP_RETRIES = 4


@contextlib.contextmanager
def failures_for_dagster():
    """Database outages propagate (the RetryPolicy retries the step); every other error becomes
    a one-line ``dg.Failure`` that is not retried (the cause stays attached for the UI)."""
    try:
        yield
    except DatabaseUnavailable:
        raise
    except InputError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    except Exception as exc:
        raise dg.Failure(description=f"{type(exc).__name__}: {exc}", allow_retries=False) from exc


def retry_policy(retry_delay_s: float) -> dg.RetryPolicy:
    """Exponential backoff with jitter, so concurrent runs do not retry in lock-step."""
    return dg.RetryPolicy(
        max_retries=STEP_RETRIES,
        delay=retry_delay_s,
        backoff=dg.Backoff.EXPONENTIAL,
        jitter=dg.Jitter.PLUS_MINUS,
    )


class PhotometryConfig(dg.Config):
    """Run configuration of ``photometry``; the sensor fills ``image_paths``."""

    image_paths: list[str] = Field(
        default_factory=list,
        description="Measure only these FITS files (they are registered first if new). Empty: "
        "register anything new in the incoming directory, then measure every usable "
        "image of the night(s).",
    )


def _noise_metadata(measured: list, mode: str) -> dict:
    """The error model of the images a photometry run measured (ESE_NOISE_CORRELATION): the
    measured noise-correlation factors (images.noise_corr_*) and which images kept the beam
    assumption, and why."""
    noises = [(r.path, r.noise) for r in measured if r.noise is not None]
    factors = [n.factor for _, n in noises if n.measured]
    meta: dict = {
        "noise_correlation": mode,
        "noise_corr_factor_median": float(np.median(factors)) if factors else None,
        "noise_corr_factor_min": float(np.min(factors)) if factors else None,
        "noise_corr_factor_max": float(np.max(factors)) if factors else None,
        "images_beam_assumption": sum(not n.measured for _, n in noises),
    }
    if noises:
        meta["noise_corr_images"] = _table(
            pd.DataFrame(
                {
                    "file": [Path(p).name for p, _ in noises],
                    "factor": [n.factor for _, n in noises],
                    "factor_err": [n.factor_err for _, n in noises],
                    "positions": [str(n.n_positions) for _, n in noises],
                    "reason": [n.reason or "" for _, n in noises],
                }
            ),
            ["file", "factor", "factor_err", "positions", "reason"],
        )
    return meta


def _table(df: pd.DataFrame, columns: list[str]) -> dg.TableMetadataValue:
    """A small table for the UI; floats rounded so it stays readable."""
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn(c, "float" if pd.api.types.is_float_dtype(df[c]) else "string")
            for c in columns
        ]
    )
    records = []
    for row in df[columns].itertuples(index=False):
        values = [py_scalar(v) for v in row]  # numpy scalars -> Python, NaN -> None
        records.append(
            dg.TableRecord(
                {
                    c: (
                        str(v)
                        if not isinstance(v, float | type(None))
                        else round(v, 3)
                        if v is not None and np.isfinite(v)
                        else None
                    )
                    for c, v in zip(columns, values, strict=True)
                }
            )
        )
    return dg.MetadataValue.table(records=records, schema=schema)


def _images_to_measure(
    engine, nights: list[str], config: PhotometryConfig, incoming: IncomingDirectory, log
) -> list[str]:
    """Paths of the images this run measures, registering files it has not seen yet.

    A batch (``image_paths``) measures those of its images that are not measured yet, so a step
    retried after a database outage continues where it stopped; a full-night run measures every
    usable image of its nights again.
    """
    common = dict(timezone=incoming.timezone, first_night=incoming.partition_start)
    if config.image_paths:
        pipeline.inspect_files(engine, config.image_paths, **common)
        wanted = {str(Path(p).expanduser().resolve()) for p in config.image_paths}
        statuses = UNFINISHED_STATUSES
    else:
        if Path(incoming.path).is_dir():  # catch files the sensor has not registered yet
            pipeline.scan_directory(
                engine, incoming.path, settle_seconds=incoming.settle_seconds, **common
            )
        wanted = None
        statuses = images_db.USABLE_STATUSES
    paths: list[str] = []
    for night in nights:
        usable = images_db.night_images(engine, night, statuses=statuses)["path"].tolist()
        paths += [p for p in usable if wanted is None or p in wanted]
    if wanted is not None:
        done = {
            p
            for night in nights
            for p in images_db.night_images(engine, night, statuses="measured")["path"]
        }
        for p in sorted(wanted - set(paths) - done):
            log.warning(
                f"{p}: not measured in nights {nights[0]}..{nights[-1]} "
                "(rejected, or observed in another night)"
            )
    return sorted(paths)


def build_assets(
    partitions: dg.PartitionsDefinition, retry_delay_s: float
) -> list[dg.AssetsDefinition]:
    """``photometry``, ``image_calibration``, ``variability_stats`` and ``ese_candidates`` over
    ``partitions``."""
    policy = retry_policy(retry_delay_s)

    def night_asset(**kwargs):
        return dg.asset(
            partitions_def=partitions,
            backfill_policy=nights_backfill_policy,
            group_name=GROUP,
            kinds={"python", "sql"},
            retry_policy=policy,
            **kwargs,
        )

    def check(name: str, asset: str, description: str) -> dg.AssetCheckSpec:
        return dg.AssetCheckSpec(
            name, asset=asset, description=description, partitions_def=partitions
        )

    @night_asset(
        check_specs=[
            check(
                "images_measured",
                "photometry",
                "Every usable image of the night has been measured (none pending or failed).",
            ),
            check(
                "errors_valid",
                "photometry",
                "Every stored measurement has a finite flux and a positive, finite error.",
            ),
        ],
    )
    def photometry(
        context: dg.AssetExecutionContext,
        config: PhotometryConfig,
        products_db: ProductsDatabase,
        catalog: SourceCatalogResource,
        incoming: IncomingDirectory,
        measurement: MeasurementResource,
    ) -> dg.MaterializeResult:
        """Forced photometry of every catalog source in every image of the night.

        Each image is read once and measured in one transaction that replaces its earlier rows, so
        re-running a night (or a run killed half-way) never duplicates or half-writes measurements.
        Up to ``ESE_PHOTOMETRY_WORKERS`` images are read and measured at once by worker processes;
        this step's process writes them.
        """
        nights = list(context.partition_keys)
        if context.run.tags.get(PID_TAG) != process_tags()[PID_TAG]:
            # lets the sensor tell a run whose process died from one that is still measuring
            context.instance.add_run_tags(context.run_id, process_tags())
        engine = products_db.get_engine()
        with failures_for_dagster():
            sources = catalog.load()  # validated before any image: a bad catalog fails at once
            paths = _images_to_measure(engine, nights, config, incoming, context.log)
            context.log.info(f"measuring {len(paths)} images of {nights[0]}..{nights[-1]}")
            results = pipeline.measure_images(
                engine,
                sources,
                paths,
                min_flux_mjy=catalog.min_flux_mjy,
                workers=measurement.workers,
                noise_correlation=measurement.noise_correlation,
                progress=context.log.info,
            )

        measured = [r for r in results if r.status == "measured"]
        rms = [r.median_rms_jyb for r in measured if r.median_rms_jyb is not None]
        rejected = pd.concat(
            [images_db.rejected_images(engine, night=n) for n in nights], ignore_index=True
        )
        counts = images_db.image_counts_by_status(engine, nights=nights)
        summary = photometry_db.night_photometry_summary(engine, nights)
        not_done = counts.get("pending", 0) + counts.get("queued", 0) + counts.get("failed", 0)
        metadata = {
            "images_measured": len(measured),
            "images_failed": sum(r.status == "failed" for r in results),
            "images_rejected": len(rejected),
            "sources_measured": int(sum(r.n_sources for r in measured)),
            "median_rms_mjy": float(np.median(rms) * 1e3) if rms else None,
            "rows_in_nights": summary["n_rows"],
        }
        metadata.update(_noise_metadata(measured, measurement.noise_correlation))
        if len(rejected):
            metadata["rejected_files"] = _table(
                rejected.assign(file=rejected["path"].map(lambda p: Path(p).name)),
                ["file", "reason"],
            )
        return dg.MaterializeResult(
            metadata=metadata,
            check_results=[
                dg.AssetCheckResult(
                    check_name="images_measured",
                    passed=not_done == 0,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={"status_counts": dg.MetadataValue.json(counts)},
                ),
                dg.AssetCheckResult(
                    check_name="errors_valid",
                    passed=summary["n_bad_errors"] == 0,
                    metadata={"bad_rows": summary["n_bad_errors"]},
                ),
            ],
        )

    @night_asset(
        deps=[photometry],
        check_specs=[
            check(
                "no_bad_images",
                "image_calibration",
                "No image of the night has an outlying gain or a large reference scatter (bad "
                "images are left out of the statistics; this check says there were some).",
            )
        ],
    )
    def image_calibration(
        context: dg.AssetExecutionContext,
        products_db: ProductsDatabase,
        detection: DetectionResource,
    ) -> dg.MaterializeResult:
        """Flux-scale gain of every image of the night from its stable reference sources.

        Writes ``image_gains``, the reference history of the night, each photometry row's
        ``normalized_flux_jy`` and the bad-gain quality bit (core.calibration). Re-materializing a
        night recomputes all of it from the night's photometry and the history of earlier nights.
        """
        nights = list(context.partition_keys)
        engine = products_db.get_engine()
        with failures_for_dagster():
            pipeline.calibrate_nights(engine, nights, exclude_flags=detection.exclude_flags)
            gains = calibration_db.gains(engine, nights)
        bad = gains[gains["bad"].astype(bool)] if len(gains) else gains
        metadata: dict = {
            "images": len(gains),
            "images_calibrated": int(gains["calibrated"].astype(bool).sum()) if len(gains) else 0,
            "images_bad": len(bad),
        }
        if len(gains):
            ok = gains[gains["calibrated"].astype(bool)]
            if len(ok):
                metadata.update(
                    median_gain=float(ok["gain"].median()),
                    gain_robust_rms=float(
                        1.4826 * (ok["gain"] - ok["gain"].median()).abs().median()
                    ),
                    median_gain_err=float(ok["gain_err"].median()),
                    median_n_ref=float(ok["n_ref"].median()),
                    median_ref_scatter=float(ok["ref_scatter"].median()),
                )
            shown = gains.assign(file=gains["image_path"].map(lambda p: Path(p).name))
            shown["bad"] = shown["bad"].map(lambda b: "BAD" if b else "")
            metadata["image_gains"] = _table(
                shown.head(_MAX_TABLE_ROWS),
                ["file", "gain", "gain_err", "n_ref", "ref_scatter", "bad", "reason"],
            )
        return dg.MaterializeResult(
            metadata=metadata,
            check_results=[
                dg.AssetCheckResult(
                    check_name="no_bad_images",
                    passed=len(bad) == 0,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={
                        "bad_images": dg.MetadataValue.json(
                            dict(
                                zip(
                                    bad["image_path"].map(lambda p: Path(p).name),
                                    bad["reason"],
                                    strict=True,
                                )
                            )
                        )
                    },
                )
            ],
        )

    @night_asset(
        deps=[image_calibration],
        check_specs=[
            check(
                "consistent_with_photometry",
                "variability_stats",
                "Each source's sums of the night count the night's photometry rows, and "
                "n_obs in variability_stats equals the accumulated sums.",
            )
        ],
    )
    def variability_stats(
        context: dg.AssetExecutionContext,
        products_db: ProductsDatabase,
        detection: DetectionResource,
    ) -> dg.MaterializeResult:
        """Variability statistics of every source measured in the night.

        Moments (n_obs, mean, std, chi2_nu, eta, ...) cover the whole history through additive
        per-night sums; median, robust std and the dip statistic cover the last
        ``dip_window_days``. The cost of a night does not grow with the history. The check
        compares the night's sums with the night's photometry rows and the statistics with the
        accumulated sums, also at a bounded cost.
        """
        nights = list(context.partition_keys)
        engine = products_db.get_engine()
        with failures_for_dagster():
            stats = pipeline.update_variability(
                engine,
                nights,
                flux_scale_error=detection.flux_scale_error,
                dip_window_days=detection.dip_window_days,
                exclude_flags=detection.exclude_flags,
                bin_nights=detection.bin_nights,
                flux_scale=detection.flux_scale,
            )
        # Bounded by the nights, like the stage itself (a whole-history COUNT would undo that).
        mismatched = statistics_db.night_stats_mismatches(
            engine, nights, exclude_flags=detection.exclude_flags
        )
        metadata: dict = {"sources": len(stats)}
        if len(stats):
            metadata.update(
                median_n_obs=float(stats["n_obs"].median()),
                median_chi2_nu=float(np.nanmedian(stats["chi2_nu"])),
                sources_chi2_nu_above_3=int((stats["chi2_nu"] > 3).sum()),
                max_abs_dip_significance=float(np.nanmax(np.abs(stats["dip_significance"])))
                if stats["dip_significance"].notna().any()
                else None,
            )
        return dg.MaterializeResult(
            metadata=metadata,
            check_results=[
                dg.AssetCheckResult(
                    check_name="consistent_with_photometry",
                    passed=mismatched == 0,
                    metadata={"mismatched_sources": mismatched},
                )
            ],
        )

    @night_asset(
        deps=[variability_stats],
        check_specs=[
            check(
                "candidates_sane",
                "ese_candidates",
                "At most one open candidate per source; every candidate has statistics "
                "and a finite, positive significance.",
            )
        ],
    )
    def ese_candidates(
        context: dg.AssetExecutionContext,
        products_db: ProductsDatabase,
        detection: DetectionResource,
    ) -> dg.MaterializeResult:
        """Flag sources measured in the night whose lightcurves look like ESEs."""
        nights = list(context.partition_keys)
        engine = products_db.get_engine()
        with failures_for_dagster():
            source_ids = photometry_db.sources_measured_in_nights(engine, nights)
            summary = pipeline.detect_candidates(
                engine,
                detection.settings(),
                source_ids=source_ids,
                night=nights[-1],
                run_id=context.run.run_id,  # the history names the Dagster run
            )
        open_now = candidates_db.candidates(engine, status=OPEN_STATUSES)
        problems = candidates_db.candidate_problems(engine)
        metadata: dict = {
            "sources_examined": len(source_ids),
            "flagged_tonight": len(summary.flagged),
            "new_candidates": summary.inserted,
            "updated_candidates": summary.updated,
            "open_candidates": len(open_now),
            "min_sigma": detection.min_sigma,
            "min_dip_sigma": detection.min_dip_sigma,
        }
        # top_candidates (position, dip dates and depth, flag type, status) and
        # top_candidate_plots (small PNG lightcurves of the first few, in Markdown)
        metadata.update(
            candidate_metadata(engine, open_now, context.log, exclude_flags=detection.exclude_flags)
        )
        return dg.MaterializeResult(
            metadata=metadata,
            check_results=[
                dg.AssetCheckResult(
                    check_name="candidates_sane",
                    passed=not problems,
                    metadata={"problems": dg.MetadataValue.json(problems)},
                )
            ],
        )

    return [photometry, image_calibration, variability_stats, ese_candidates]
