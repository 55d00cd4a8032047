"""Photometry of a night with 1, 2, ... worker processes (ESE_PHOTOMETRY_WORKERS).

A night of ``--images`` simulated 2048x2048 float32 FITS images with ``--sources`` catalog sources
each is measured by ``pipeline.measure_images`` (what the ``photometry`` asset calls) into a fresh
SQLite products database, once per worker count and repeat, the worker counts interleaved so that
the load of a shared machine hits them alike. Each figure is a ratio against the 1-worker time of
the same run (the serial path: read, measure, write one image after the other in one process).

The design: workers read and measure, the run's process writes every image in its own
transaction. So the parent's share per image (receiving the rows, the write) bounds the speed-up:
with ``t_worker`` (read + measure, in a worker) and ``t_parent`` (write) per image, ``N`` workers
give at most ``min(N, cores, (t_worker + t_parent) / t_parent)`` times the serial throughput.
Both are measured here (in this process, one image at a time) and the bound printed.

Run: ``.venv/bin/python benchmarks/bench_workers.py [--images 60] [--sources 1000]
[--npix 2048] [--workers 1,2] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _common import (
    add_common_arguments,
    close_products_db,
    fmt_ratio,
    fmt_seconds,
    iso_of,
    make_field,
    open_products_db,
    print_header,
    print_table,
    quiet_logging,
    temp_dir,
    write_field_fits,
)

from ese_assets import pipeline
from ese_assets.pipeline import measurement
from ese_assets.settings import usable_cores

#: First image of the simulated night (MJD 60676.1 = 2025-01-01 02:24 UTC), one every 5 minutes.
FIRST_MJD = 60676.1
CADENCE_DAYS = 5.0 / 1440.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60, help="images in the night (%(default)s)")
    parser.add_argument("--sources", type=int, default=1000, help="sources (%(default)s)")
    parser.add_argument("--npix", type=int, default=2048, help="image side (%(default)s)")
    parser.add_argument(
        "--workers",
        default="1,2",
        help="worker counts, comma-separated; 1 (the baseline) is always run (%(default)s)",
    )
    return add_common_arguments(parser, repeat=3).parse_args(argv)


def write_night(root: Path, args: argparse.Namespace, rng: np.random.Generator):
    """``--images`` FITS files of one field, each with its own noise, and the catalog."""
    field = make_field(args.npix, args.sources, rng)
    base = field.data
    paths = []
    for i in range(args.images):
        # each image its own pixels (a shifted copy of the noise added): no two files alike
        field.data = base + 0.1 * np.roll(base, 37 * (i + 1), axis=1)
        date_obs = iso_of(FIRST_MJD + i * CADENCE_DAYS)
        paths.append(str(write_field_fits(field, root / f"img_{i:04d}.fits", date_obs)))
    return field.catalog, paths


def measure_night(root: Path, catalog, paths: list[str], workers: int, tag: str) -> float:
    """Seconds of ``measure_images`` over the night into a fresh database (registration not
    timed)."""
    db = root / f"products_{tag}.sqlite3"
    engine = open_products_db(db)
    pipeline.inspect_files(engine, paths, timezone="UTC", first_night="2020-01-01")
    start = time.perf_counter()
    results = pipeline.measure_images(engine, catalog, paths, workers=workers)
    seconds = time.perf_counter() - start
    close_products_db(db)
    db.unlink()
    bad = [r for r in results if r.status != "measured"]
    if bad:
        raise RuntimeError(f"{len(bad)} images not measured, e.g. {bad[0]}")
    return seconds


def per_image_shares(root: Path, catalog, paths: list[str], n: int) -> tuple[float, float]:
    """Median seconds per image of read + measure (a worker's share) and of the write (the
    parent's share), one image at a time in this process."""
    db = root / "products_shares.sqlite3"
    engine = open_products_db(db)
    pipeline.inspect_files(engine, paths[:n], timezone="UTC", first_night="2020-01-01")
    compute, write = [], []
    for path in paths[:n]:
        t0 = time.perf_counter()
        measured = measurement.read_and_measure(catalog, path)
        t1 = time.perf_counter()
        measurement.record_measurement(engine, measured)
        t2 = time.perf_counter()
        compute.append(t1 - t0)
        write.append(t2 - t1)
    close_products_db(db)
    return statistics.median(compute), statistics.median(write)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    counts = sorted({1, *(int(w) for w in args.workers.split(","))})
    cores = usable_cores()
    print_header(
        "Photometry of a night by worker processes (pipeline.measure_images, workers=N)",
        [
            f"{args.images} images of {args.npix}x{args.npix} float32, {args.sources} sources "
            f"each, SQLite products database; worker counts {counts}, {args.repeat} repeats "
            "(interleaved; median and best reported)",
            f"usable cores: {cores}; load average at start: "
            + ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        ],
    )
    rng = np.random.default_rng(args.seed)
    with temp_dir("workers") as root:
        catalog, paths = write_night(root, args, rng)
        # warm-up: file cache, catalog index, the fork server of the worker processes
        measure_night(root, catalog, paths[: 2 * max(counts)], max(counts), "warm")
        times: dict[int, list[float]] = {w: [] for w in counts}
        for rep in range(args.repeat):
            for w in counts:
                times[w].append(measure_night(root, catalog, paths, w, f"{w}_{rep}"))
        t_worker, t_parent = per_image_shares(root, catalog, paths, min(20, len(paths)))
    base = statistics.median(times[1])
    rows = []
    for w in counts:
        median, best = statistics.median(times[w]), min(times[w])
        rows.append(
            [
                f"{w} worker{'s' if w > 1 else ''}" + (" (serial path)" if w == 1 else ""),
                fmt_seconds(median),
                fmt_seconds(best),
                fmt_seconds(median / args.images),
                fmt_ratio(base / median),
                fmt_ratio(min(times[1]) / best),
            ]
        )
    print_table(
        [
            "photometry of the night",
            "median",
            "best",
            "per image",
            "speed-up (median)",
            "speed-up (best)",
        ],
        rows,
    )
    bound = (t_worker + t_parent) / t_parent if t_parent > 0 else float("inf")
    print(
        f"per image, one at a time: read + measure {fmt_seconds(t_worker)} (a worker's share), "
        f"write {fmt_seconds(t_parent)} (the run's process's share)"
    )
    print(
        f"worker count the design supports: the run's process writes every image, so N workers "
        f"reach at most (read+measure+write)/write = {bound:.1f}x the serial throughput; "
        f"on this machine min(N, {cores} cores, {bound:.1f}): "
        f"{min(cores, int(bound)) if bound >= 1 else 1} workers; more workers only add memory "
        f"(~one image each)"
    )
    print("load average at end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(
        "all timings: "
        + "; ".join(f"{w}: " + ", ".join(f"{t:.2f}" for t in times[w]) for w in counts)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
