"""End to end: ``ingest.ingest_directory`` (Dagster runs) vs the bare pipeline calls, same images.

A small survey is simulated (core.simulate.SurveyConfig with few nights). Then, each into its own
fresh SQLite products database:

* Dagster: ``ese_assets.ingest.ingest_directory`` -- registers the files, then one in-process
  Dagster run per night (``photometry`` -> ``variability_stats`` -> ``ese_candidates`` assets,
  with their asset checks and metadata queries) against a Dagster instance in a temporary
  ``DAGSTER_HOME``;
* bare: ``pipeline.scan_directory``, then per night ``pipeline.measure_images``,
  ``update_variability`` and ``detect_candidates`` -- the calls the assets make, nothing else.

Each path runs twice on fresh databases; the first ("cold") run pays one-off costs (Dagster
instance storage created, catalog read and indexed), the second ("warm") is what a long-running
process pays per batch. Ratio = Dagster / bare: the orchestration overhead.

Run: ``.venv/bin/python benchmarks/bench_ingest_end_to_end.py [--nights 3] [--images-per-night 4]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from _common import (
    add_common_arguments,
    close_products_db,
    fmt_ratio,
    fmt_seconds,
    open_products_db,
    print_header,
    print_table,
    quiet_logging,
    temp_dir,
    time_call,
)

from ese_assets import pipeline
from ese_assets.core.catalog import load_catalog
from ese_assets.core.simulate import SurveyConfig, simulate_survey
from ese_assets.settings import Settings
from ese_assets.storage import candidates as candidates_db
from ese_assets.storage import images as images_db
from ese_assets.storage import photometry as photometry_db
from ese_assets.storage import statistics as statistics_db

PARTITION_START = "2020-01-01"
TIMEZONE = "UTC"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nights", type=int, default=3, help="nights simulated (default: %(default)s)"
    )
    parser.add_argument("--images-per-night", type=int, default=4, help="(default: %(default)s)")
    parser.add_argument(
        "--npix", type=int, default=512, help="image side in pixels (default: %(default)s)"
    )
    parser.add_argument(
        "--sources", type=int, default=250, help="sources in the field (default: %(default)s)"
    )
    return add_common_arguments(parser, repeat=3).parse_args(argv)


def survey_config(args) -> SurveyConfig:
    """The default demo survey (SurveyConfig defaults), with fewer nights, images and sources."""
    return SurveyConfig(
        seed=args.seed,
        n_nights=args.nights,
        images_per_night=args.images_per_night,
        npix=args.npix,
        n_sources=args.sources,
    )


def settings_for(base: Settings, survey: Path, work: Path) -> Settings:
    """Settings of one run: private products database, the survey's catalog and images."""
    return dataclasses.replace(
        base,
        data_dir=str(work),
        products_db=str(work / "products.sqlite3"),
        catalog_path=str(survey / "catalog.csv"),
        incoming_dir=str(survey / "incoming"),
        partition_start=PARTITION_START,
        timezone=TIMEZONE,
        settle_seconds=0.0,
    )


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Send file descriptor 2 (Dagster's console run log) to ``path`` for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def run_dagster(settings: Settings) -> int:
    """``ingest_directory`` as ``ese ingest`` calls it; returns the number of night runs.

    Dagster's console log of each run (what ``ese ingest`` shows) goes to
    ``<data_dir>/dagster.log``.
    """
    from ese_assets.ingest import ingest_directory  # imported here: the import loads Dagster

    log = Path(settings.data_dir) / "dagster.log"
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    with stderr_to(log):
        runs = ingest_directory(settings, settings.incoming_dir, progress=lambda _: None).runs
    failed = [r.night for r in runs if not r.success]
    if failed:
        tail = log.read_text(errors="replace").splitlines()[-20:]
        raise RuntimeError(
            f"Dagster runs failed for nights {failed}; log tail:\n" + "\n".join(tail)
        )
    return len(runs)


def run_bare(settings: Settings) -> int:
    """The same work with the pipeline functions only; returns the number of nights."""
    engine = open_products_db(Path(settings.products_db))
    pipeline.scan_directory(
        engine,
        settings.incoming_dir,
        timezone=TIMEZONE,
        first_night=PARTITION_START,
        settle_seconds=0.0,
    )
    catalog = load_catalog(settings.catalog_path)
    pending = images_db.pending_images(engine)
    for night, group in pending.groupby("night", sort=True):
        pipeline.measure_images(
            engine, catalog, sorted(group["path"]), min_flux_mjy=settings.min_flux_mjy
        )
        pipeline.update_variability(engine, [night], flux_scale_error=settings.flux_scale_error)
        pipeline.detect_candidates(
            engine,
            settings.detection(),
            source_ids=photometry_db.sources_measured_in_nights(engine, [night]),
            night=night,
        )
    return pending["night"].nunique()


def products_summary(settings: Settings) -> tuple[int, int, int]:
    """(photometry rows, variability_stats rows, candidates) of a finished run."""
    engine = open_products_db(Path(settings.products_db))
    result = (
        photometry_db.photometry_counts(engine),
        len(statistics_db.variability_stats(engine)),
        len(candidates_db.candidates(engine)),
    )
    close_products_db(Path(settings.products_db))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    config = survey_config(args)
    n_images = config.n_images
    print_header(
        "bench_ingest_end_to_end: Dagster ingest_directory vs bare pipeline calls, same images",
        [
            f"survey: {args.nights} nights x {args.images_per_night} images of "
            f"{args.npix}x{args.npix} px, {args.sources} sources (core.simulate.SurveyConfig); "
            f"{args.repeat} runs per path, each on a fresh products database",
            "ratio = Dagster time / bare time "
            "(orchestration overhead: runs, event log, asset checks)",
        ],
    )
    with temp_dir("ingest") as tmp:
        sim = time_call(lambda: simulate_survey(config, tmp / "survey"))
        print(f"  simulated {n_images} images in {fmt_seconds(sim.median)}", flush=True)
        os.environ["DAGSTER_HOME"] = str(tmp / "dagster_home")  # never the user's instance
        base = Settings.from_env()
        dagster, bare, summaries = [], [], []
        for i in range(max(1, args.repeat)):
            d_settings = settings_for(base, tmp / "survey", tmp / f"dagster_{i}")
            b_settings = settings_for(base, tmp / "survey", tmp / f"bare_{i}")
            dagster.append(time_call(lambda s=d_settings: run_dagster(s)))
            bare.append(time_call(lambda s=b_settings: run_bare(s)))
            summaries.append((products_summary(d_settings), products_summary(b_settings)))
            print(
                f"  run {i + 1}: Dagster {fmt_seconds(dagster[-1].median)}, "
                f"bare {fmt_seconds(bare[-1].median)}",
                flush=True,
            )
    print()
    report(dagster, bare, n_images, args.nights)
    same = all(d == b for d, b in summaries)
    d, b = summaries[-1]
    print(
        f"same products from both paths: {'yes' if same else 'NO'} (photometry rows, "
        f"statistics rows, candidates: Dagster {d}, bare {b})"
    )
    return 0


def report(dagster, bare, n_images: int, n_nights: int) -> None:
    rows = []
    for i, (d, b) in enumerate(zip(dagster, bare, strict=True)):
        label = "cold (first run in process)" if i == 0 else f"warm (run {i + 1})"
        dt, bt = d.median, b.median
        rows.append(
            (
                label,
                fmt_seconds(dt),
                fmt_seconds(bt),
                fmt_seconds(dt / n_images),
                fmt_seconds(bt / n_images),
                fmt_seconds((dt - bt) / n_nights),
                fmt_ratio(dt / bt),
            )
        )
    print_table(
        [
            "run",
            "Dagster total",
            "bare total",
            "Dagster / image",
            "bare / image",
            "overhead / night run",
            "ratio",
        ],
        rows,
    )


if __name__ == "__main__":
    sys.exit(main())
