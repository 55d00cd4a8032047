"""Cost of processing ONE new night as the history grows ("ten days vs ten years").

For each history length H (nights), a fresh SQLite products database is filled with H nights of
synthetic photometry (``images_db.register_images`` +
``photometry_db.replace_image_photometry``, fake image paths, no FITS), for the same sources as a
real simulated image, and its statistics sums are built once with
``pipeline.recompute_variability`` (the O(history) rebuild; its time is printed). Then one new
night is processed exactly as a Dagster run does it, and each stage is timed:

* register: ``pipeline.inspect_files`` (header read, duplicate check, insert);
* measure: ``pipeline.measure_image`` (read FITS, forced photometry, one-transaction write);
* variability: ``pipeline.update_variability`` for the new night (the night's photometry, one sums
  row per source, and the trailing dip window: its nightly bins, and the raw epochs of the sources
  the default ``bin_nights="auto"`` leaves unbinned, those with <= 365 epochs in the window), once
  per ``--dip-windows`` value: with a window shorter than the history, the cost should stop
  growing with H;
* detect: ``pipeline.detect_candidates`` for the sources of the night.

The variability stage is broken down once into its two reads (the night's photometry; the dip
window, as the stage reads it) and compared with ``recompute_variability`` of the night's
sources, i.e. what recomputing them from their whole history costs (the pre-incremental design).

Ratios are against the shortest history. A stage whose ratio stays ~1 is incremental; one that
grows with H is not.

Run: ``.venv/bin/python benchmarks/bench_incremental.py [--histories 10,100,1000] [--sources 200]
[--dip-windows 365,30]``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from _common import (
    Field,
    Timing,
    add_common_arguments,
    close_products_db,
    epochs,
    fill_products_db,
    fmt_ratio,
    fmt_seconds,
    iso_of,
    make_field,
    night_of,
    open_products_db,
    print_header,
    print_table,
    progress_printer,
    quiet_logging,
    synthetic_lightcurves,
    temp_dir,
    time_call,
    write_field_fits,
)

from ese_assets import pipeline
from ese_assets.core.binning import DEFAULT_BIN_NIGHTS, night_bins, sources_to_bin
from ese_assets.core.detection import DetectionSettings
from ese_assets.storage import images as images_db
from ese_assets.storage import photometry as photometry_db
from ese_assets.storage import statistics as statistics_db

FIRST_MJD = 58849.0  # 2020-01-01, the default first partition
FLUX_SCALE_ERROR = 0.02
#: A stage that took this long (s) is not repeated (keeps the largest history within the budget).
MAX_SECONDS_PER_STAGE = 5.0
READS = ("  read night photometry", "  read dip window (bins + unbinned epochs)")
FULL = "full-history rebuild of the night's sources"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--histories",
        default="10,100,1000",
        help="history lengths in nights, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--sources",
        type=int,
        default=200,
        help="catalog sources in the field (default: %(default)s)",
    )
    parser.add_argument(
        "--images-per-night",
        type=int,
        default=4,
        help="images per night of history (default: %(default)s)",
    )
    parser.add_argument(
        "--npix",
        type=int,
        default=512,
        help="side of the new image in pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--dip-windows",
        default="365,30",
        help="ESE_DIP_WINDOW_DAYS values to time the variability stage with, "
        "comma-separated; the first is used for the breakdown "
        "(default: %(default)s)",
    )
    args = add_common_arguments(parser, repeat=2).parse_args(argv)
    args.histories = sorted({int(h) for h in args.histories.split(",") if h.strip()})
    args.dip_windows = [float(w) for w in args.dip_windows.split(",") if w.strip()]
    return args


def variability_stage(window_days: float) -> str:
    return f"variability (window {window_days:g} d)"


def stages(windows: list[float]) -> tuple[str, ...]:
    return ("register", "measure", *(variability_stage(w) for w in windows), "detect")


@dataclass
class NightCost:
    """Timings of one new night on top of a history of ``nights`` nights."""

    nights: int
    history_rows: int
    rows_read: int = 0
    sums_build_seconds: float = 0.0
    stages: dict[str, Timing] = field(default_factory=dict)


def build_history(
    engine, fld: Field, n_nights: int, images_per_night: int, rng: np.random.Generator
) -> int:
    """H nights of constant-flux photometry of the field's sources, written as the pipeline
    would."""
    cat = fld.catalog
    mjds = epochs(FIRST_MJD, n_nights, images_per_night)
    lc = synthetic_lightcurves(cat.source_id, mjds, rng, mean_mjy=cat.flux_mjy)
    fill_products_db(
        engine,
        lc,
        dict(zip(cat.source_id, cat.ra_deg, strict=True)),
        dict(zip(cat.source_id, cat.dec_deg, strict=True)),
        progress=progress_printer(f"H={n_nights}: history images", 1000),
    )
    return len(lc)


def process_new_night(
    engine, fld: Field, image_path: str, repeat: int, windows: list[float], cost: NightCost
) -> None:
    """Time each stage of one new night: registration once, the idempotent stages ``repeat``
    times unless a run took over MAX_SECONDS_PER_STAGE."""
    settings = DetectionSettings()
    cost.stages["register"] = time_call(
        lambda: pipeline.inspect_files(
            engine, [image_path], timezone="UTC", first_night="2000-01-01"
        )
    )
    if cost.stages["register"].value.rejected:
        raise RuntimeError(f"new image rejected: {cost.stages['register'].value.rejected}")
    night = night_of_image(engine, image_path)
    cost.stages["measure"] = time_call(
        lambda: pipeline.measure_image(engine, fld.catalog, image_path),
        repeat,
        MAX_SECONDS_PER_STAGE,
    )
    # Largest window last, so the stored statistics end as the default setting's.
    for window in sorted(windows, reverse=True):
        cost.stages[variability_stage(window)] = time_call(
            lambda w=window: pipeline.update_variability(
                engine, [night], flux_scale_error=FLUX_SCALE_ERROR, dip_window_days=w
            ),
            repeat,
            MAX_SECONDS_PER_STAGE,
        )
    stats = cost.stages[variability_stage(windows[0])].value
    sources = stats["source_id"].tolist()
    cost.stages["detect"] = time_call(
        lambda: pipeline.detect_candidates(engine, settings, source_ids=sources, night=night),
        repeat,
        MAX_SECONDS_PER_STAGE,
    )
    # The variability stage's reads (once each), and the full-history alternative.
    night_rows = time_call(lambda: photometry_db.night_photometry(engine, [night]))
    window_rows = time_call(lambda: window_read(engine, sources, windows[0]))
    cost.stages.update(zip(READS, (night_rows, window_rows), strict=True))
    cost.stages[FULL] = time_call(
        lambda: pipeline.recompute_variability(
            engine, sources, flux_scale_error=FLUX_SCALE_ERROR, dip_window_days=windows[0]
        )
    )
    # Rows read: the night's photometry, one source_sums row per source, the dip window.
    cost.rows_read = len(night_rows.value) + len(sources) + len(window_rows.value)


def window_read(engine, sources: list[str], window_days: float) -> pd.DataFrame:
    """The dip window as the stage reads it with the default ``bin_nights="auto"``: every source's
    nightly bins, then the raw epochs of the sources it leaves unbinned. One frame of both."""
    bins = statistics_db.window_night_sums(engine, sources, window_days)
    binned = set(sources_to_bin(night_bins(bins), DEFAULT_BIN_NIGHTS))
    raw = photometry_db.window_photometry(
        engine, [s for s in sources if s not in binned], window_days
    )
    return pd.concat([bins[["source_id"]], raw[["source_id"]]], ignore_index=True)


def night_of_image(engine, path: str) -> str:
    """The night the pipeline assigned to a registered image."""
    images = images_db.images_near_mjd(engine, -1e9, 1e9)
    return str(images.loc[images["path"] == path, "night"].iloc[0])


def run_history(args, fld: Field, n_nights: int, rng: np.random.Generator) -> NightCost:
    """Build a database with ``n_nights`` of history and process one new night on top of it."""
    with temp_dir(f"incremental_h{n_nights}") as tmp:
        db = tmp / "products.sqlite3"
        engine = open_products_db(db)
        build = time_call(lambda: build_history(engine, fld, n_nights, args.images_per_night, rng))
        sums = time_call(
            lambda: pipeline.recompute_variability(
                engine, flux_scale_error=FLUX_SCALE_ERROR, dip_window_days=args.dip_windows[0]
            )
        )
        new_mjd = FIRST_MJD + n_nights + 2.0 / 24.0
        image = str(write_field_fits(fld, tmp / f"new_{night_of(new_mjd)}.fits", iso_of(new_mjd)))
        cost = NightCost(n_nights, build.value, sums_build_seconds=sums.median)
        print(
            f"  H={n_nights}: {build.value:,} history rows written in {fmt_seconds(build.median)}, "
            f"sums built in {fmt_seconds(sums.median)}; processing night {night_of(new_mjd)} ...",
            flush=True,
        )
        process_new_night(engine, fld, image, args.repeat, args.dip_windows, cost)
        close_products_db(db)
    return cost


def report(costs: list[NightCost], repeat: int, windows: list[float]) -> None:
    base = costs[0]
    headers = (
        ["stage"]
        + [f"H={c.nights}" for c in costs]
        + [f"ratio H={c.nights}/H={base.nights}" for c in costs[1:]]
    )
    rows = []
    total = f"total (4 stages, window {windows[0]:g} d)"
    for stage in (*stages(windows), total, *READS, FULL):
        times = [
            total_time(c, windows[0]) if stage == total else c.stages[stage].median for c in costs
        ]
        rows.append(
            [stage] + [fmt_seconds(t) for t in times] + [fmt_ratio(t / times[0]) for t in times[1:]]
        )
    print(
        f"time of ONE new night (median of up to {repeat} runs for measure/variability/detect, "
        f"one run once a stage takes > {MAX_SECONDS_PER_STAGE:g} s;\nregister, the reads and the "
        "full-history rebuild run once; the reads are the variability stage's two queries):"
    )
    print_table(headers, rows)
    info = [
        ["history photometry rows"]
        + [f"{c.history_rows:,}" for c in costs]
        + [fmt_ratio(c.history_rows / base.history_rows) for c in costs[1:]],
        [f"rows read by the variability stage (window {windows[0]:g} d)"]
        + [f"{c.rows_read:,}" for c in costs]
        + [fmt_ratio(c.rows_read / max(base.rows_read, 1)) for c in costs[1:]],
        ["variability time per row read"]
        + [
            fmt_seconds(c.stages[variability_stage(windows[0])].median / max(c.rows_read, 1))
            for c in costs
        ]
        + ["" for _ in costs[1:]],
        ["one-time sums build (recompute_variability, all sources)"]
        + [fmt_seconds(c.sums_build_seconds) for c in costs]
        + [fmt_ratio(c.sums_build_seconds / base.sums_build_seconds) for c in costs[1:]],
    ]
    print_table(["size", *headers[1:]], info)


def total_time(cost: NightCost, window: float) -> float:
    return sum(
        cost.stages[s].median for s in ("register", "measure", variability_stage(window), "detect")
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    rng = np.random.default_rng(args.seed)
    print_header(
        "bench_incremental: cost of one new night vs the length of the history already stored",
        [
            f"history: H nights x {args.images_per_night} images x {args.sources} sources "
            "of synthetic photometry in SQLite (fake image paths); new night: one real "
            f"{args.npix}x{args.npix} simulated FITS image of the same sources",
            "ratio = stage time at H / stage time at the shortest H "
            "(1x = cost independent of history)",
        ],
    )
    fld = make_field(args.npix, args.sources, rng)
    print("  warm-up (imports, caches, catalog index; not reported):", flush=True)
    run_history(args, fld, 1, rng)
    costs = [run_history(args, fld, h, rng) for h in args.histories]
    print()
    report(costs, args.repeat, args.dip_windows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
