"""Statistics stage of ONE new night after H nights of DSA-110-cadence history (nightly bins).

DSA-110 writes ~300 images a day. One SQLite products database grows through the history lengths
H (default 10, 100, 365 nights): each night's images, photometry rows and ``source_night_sums``
rows are written directly into the tables (bulk ``INSERT``s; the night sums by the pipeline's own
``core.variability.night_partial_sums`` and ``storage.statistics.replace_night_sums``), then
``source_sums`` is summed from the night rows. At each H one new night (images and photometry only,
as the photometry stage leaves it) is processed by ``pipeline.update_variability`` -- the
statistics stage of a Dagster run -- and timed:

* **binned** (``bin_nights="auto"``, the default: every source here holds 300 epochs a night, so it
  is binned; the night's first run is not timed, the timed runs repeat it): reads the night's
  photometry, one ``source_sums`` row per source and one ``source_night_sums`` row per source and
  night of the 365-day window;
* **unbinned** (``bin_nights="off"``, only up to ``--unbinned-max-history`` nights: it reads every
  epoch of the window, 300 x H per source);
* **baseline**: a bare SQL query of the same run that reads the new night's photometry rows
  (``SELECT ... FROM photometry JOIN images ... WHERE night = ?``, ``fetchall``), the read no
  statistics stage can avoid.

Figures: seconds and peak Python-heap growth (tracemalloc, numpy buffers included) of each, as
ratios to the baseline, and t(H)/t(shortest H) of the binned stage (target: t(365)/t(10) <= 1.5).
Sources are scaled down from DSA-110's ~1000 (``--sources``, default 100: 365 nights are then
1.1e7 photometry rows, written in a few minutes on 2 cores); every part of the stage is linear in
the sources, so the last table also extrapolates to 1000 sources (target: <= 10 s, <= 2 GiB).

Run: ``.venv/bin/python benchmarks/bench_nightly_bins.py [--histories 10,100,365] [--sources 100]
[--epochs-per-night 300] [--unbinned-max-history 10] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import sqlalchemy as sa
from _common import (
    Timing,
    add_common_arguments,
    close_products_db,
    fmt_ratio,
    fmt_seconds,
    night_of,
    open_products_db,
    peak_traced_mib,
    print_header,
    print_table,
    quiet_logging,
    temp_dir,
    time_call,
)

from ese_assets import pipeline
from ese_assets.core.binning import BIN_SUMS_COLUMNS
from ese_assets.core.sums import combine_partial_sums, night_partial_sums
from ese_assets.storage import photometry as photometry_db
from ese_assets.storage import statistics as statistics_db

FIRST_MJD = 58849.0  # 2020-01-01, the default first partition
FLUX_SCALE_ERROR = 0.02
WINDOW_DAYS = 365.0
#: Targets of the issue, for 1000 sources at 300 epochs a night.
TARGET_FLATNESS = 1.5
TARGET_SECONDS = 10.0
TARGET_MIB = 2048.0
DSA110_SOURCES = 1000

_PHOT_COLUMNS = (
    "image_path",
    "ra_deg",
    "dec_deg",
    "nvss_flux_mjy",
    "peak_jyb",
    "peak_err_jyb",
    "measured_at",
    "source_id",
    "mjd",
    "quality_flag",
)
_IMAGE_COLUMNS = ("path", "night", "mjd", "status", "registered_at", "measured_at", "n_sources")

#: Row labels of the report.
LABELS = {"baseline": "bare SQL", "binned": "binned (auto)", "unbinned": "unbinned (off)"}

BARE_QUERY = sa.text(
    "SELECT p.source_id, p.mjd, p.peak_jyb, p.peak_err_jyb FROM photometry p "
    "JOIN images i ON i.path = p.image_path WHERE i.night = :night"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--histories", default="10,100,365", help="nights (default: %(default)s)")
    parser.add_argument("--sources", type=int, default=100, help="sources (default: %(default)s)")
    parser.add_argument(
        "--epochs-per-night", type=int, default=300, help="images a night (default: %(default)s)"
    )
    parser.add_argument(
        "--unbinned-max-history",
        type=int,
        default=10,
        help="time the unbinned stage only up to this history (default: %(default)s)",
    )
    args = add_common_arguments(parser, repeat=3).parse_args(argv)
    args.histories = sorted({int(h) for h in args.histories.split(",") if h.strip()})
    return args


@dataclass
class Catalog:
    source_id: np.ndarray
    flux_mjy: np.ndarray
    ra_deg: np.ndarray
    dec_deg: np.ndarray


def make_catalog(n: int, rng: np.random.Generator) -> Catalog:
    return Catalog(
        source_id=np.array([f"DSA{i:05d}" for i in range(n)], dtype=object),
        flux_mjy=rng.uniform(10.0, 200.0, n),
        ra_deg=rng.uniform(149.0, 151.0, n),
        dec_deg=rng.uniform(29.0, 31.0, n),
    )


def night_mjds(k: int, per_night: int) -> np.ndarray:
    """Images evenly spread over night ``k`` (DSA-110 images all day: ~288 s apart)."""
    return FIRST_MJD + k + (np.arange(per_night) + 0.5) / per_night


def night_rows(cat: Catalog, k: int, per_night: int, rng: np.random.Generator) -> pd.DataFrame:
    """Photometry of night ``k``: constant sources, 2 % per-image gain, 1 mJy noise."""
    mjd = np.repeat(night_mjds(k, per_night), len(cat.source_id))
    gain = np.repeat(1 + 0.02 * rng.standard_normal(per_night), len(cat.source_id))
    flux = np.tile(cat.flux_mjy, per_night) * gain + rng.standard_normal(len(mjd))
    night = night_of(FIRST_MJD + k + 0.5)
    return pd.DataFrame(
        {
            "image_path": [f"/bench/{night}/img_{m:.6f}.fits" for m in mjd],
            "ra_deg": np.tile(cat.ra_deg, per_night),
            "dec_deg": np.tile(cat.dec_deg, per_night),
            "nvss_flux_mjy": np.tile(cat.flux_mjy, per_night),
            "peak_jyb": flux / 1e3,
            "peak_err_jyb": np.full(len(mjd), 1e-3),
            "measured_at": time.time(),
            "source_id": np.tile(cat.source_id, per_night),
            "mjd": mjd,
            "quality_flag": 0,
            "night": night,
        }
    )


def write_nights(engine, cat: Catalog, ks, per_night: int, rng, *, with_sums: bool) -> int:
    """Images and photometry of nights ``ks`` (bulk INSERTs), and their night sums when
    ``with_sums`` (what the statistics stage would have stored). Returns photometry rows."""
    written = 0
    insert_phot, insert_img = (
        f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
        for table, cols in (("photometry", _PHOT_COLUMNS), ("images", _IMAGE_COLUMNS))
    )
    for k in ks:
        rows = night_rows(cat, k, per_night, rng)
        now = time.time()
        images = rows.drop_duplicates("image_path")
        with engine.begin() as conn:
            conn.exec_driver_sql(
                insert_img,
                [
                    (p, n, float(m), "measured", now, now, len(cat.source_id))
                    for p, n, m in zip(
                        images["image_path"], images["night"], images["mjd"], strict=True
                    )
                ],
            )
            conn.exec_driver_sql(
                insert_phot, list(rows[list(_PHOT_COLUMNS)].itertuples(index=False, name=None))
            )
            if with_sums:
                table = pd.DataFrame(
                    {
                        "source_id": rows["source_id"],
                        "night": rows["night"],
                        "mjd": rows["mjd"],
                        "flux_mjy": rows["peak_jyb"] * 1e3,
                        "flux_err_mjy": rows["peak_err_jyb"] * 1e3,
                        "shift_mjy": rows["nvss_flux_mjy"],  # the catalog flux, as the stage
                    }
                )
                sums = night_partial_sums(table, flux_scale_error=FLUX_SCALE_ERROR)
                sums["last_measured_at"] = now
                sums["flux_scale_error"] = FLUX_SCALE_ERROR
                statistics_db.replace_night_sums(conn, sums, nights=[rows["night"].iloc[0]])
        written += len(rows)
    return written


def rebuild_source_sums(engine, cat: Catalog) -> None:
    """``source_sums`` = the sum of every source's night rows (what the stage keeps by addition)."""
    nights = statistics_db.night_sums(engine, source_ids=cat.source_id)
    totals = combine_partial_sums(nights)
    catalog = pd.DataFrame(
        {
            "source_id": cat.source_id,
            "ra_deg": cat.ra_deg,
            "dec_deg": cat.dec_deg,
            "nvss_flux_mjy": cat.flux_mjy,
            "last_measured_at": time.time(),
        }
    )
    totals = totals.merge(catalog, on="source_id")
    totals["flux_scale_error"] = FLUX_SCALE_ERROR
    statistics_db.put_source_sums(engine, totals)


@dataclass
class NightCost:
    history: int
    history_rows: int
    db_mib: float
    stages: dict[str, Timing] = field(default_factory=dict)
    mib: dict[str, float] = field(default_factory=dict)
    rows_read: dict[str, int] = field(default_factory=dict)


def measure_night(engine, cat: Catalog, night: str, cost: NightCost, args) -> None:
    """Time the stage on ``night`` binned (and unbinned while affordable) and the bare query."""

    def stage(mode: str):
        return lambda: pipeline.update_variability(
            engine,
            [night],
            flux_scale_error=FLUX_SCALE_ERROR,
            dip_window_days=WINDOW_DAYS,
            bin_nights=mode,
        )

    def bare():
        with engine.connect() as conn:
            return conn.execute(BARE_QUERY, {"night": night}).fetchall()

    stage("auto")()  # the night's first run (new sums); the timed runs repeat it identically
    cost.stages["binned"] = time_call(stage("auto"), args.repeat)
    cost.stages["baseline"] = time_call(bare, args.repeat)
    cost.mib["binned"] = peak_traced_mib(stage("auto"))
    cost.mib["baseline"] = peak_traced_mib(bare)
    ids = list(cat.source_id)
    night_n = len(cost.stages["baseline"].value)
    cost.stages["window read"] = time_call(
        lambda: statistics_db.window_night_sums(engine, ids, WINDOW_DAYS, columns=BIN_SUMS_COLUMNS),
        args.repeat,
    )
    window = cost.stages["window read"].value
    cost.rows_read["binned"] = night_n + len(ids) + len(window)
    cost.rows_read["baseline"] = night_n
    if cost.history <= args.unbinned_max_history:
        cost.stages["unbinned"] = time_call(stage("off"), 1)
        cost.mib["unbinned"] = peak_traced_mib(stage("off"))
        raw = photometry_db.window_photometry(engine, ids, WINDOW_DAYS)
        cost.rows_read["unbinned"] = night_n + len(ids) + len(raw)
        stage("auto")()  # leave the default's statistics stored
    binned = cost.stages["binned"].value
    assert len(binned) == len(ids) and (binned["n_obs"] == (cost.history + 1) * args.epn).all()


def report(costs: list[NightCost], args) -> None:
    base = costs[0]
    heads = [f"H={c.history}" for c in costs]
    print(
        f"\nONE new night ({args.sources} sources x {args.epn} epochs) after H nights of history; "
        f"median of {args.repeat} runs; ratio = / bare SQL query of the night's rows (same run):"
    )
    rows = []
    for name in ("baseline", "binned", "unbinned"):
        if not any(name in c.stages for c in costs):
            continue
        rows.append(
            [f"{LABELS[name]}: time"]
            + [fmt_seconds(c.stages[name].median) if name in c.stages else "-" for c in costs]
        )
        rows.append(
            [f"{LABELS[name]}: fastest run"]
            + [fmt_seconds(c.stages[name].best) if name in c.stages else "-" for c in costs]
        )
        rows.append(
            [f"{LABELS[name]}: time / baseline"]
            + [
                fmt_ratio(c.stages[name].median / c.stages["baseline"].median)
                if name in c.stages
                else "-"
                for c in costs
            ]
        )
        rows.append(
            [f"{LABELS[name]}: peak heap MiB"]
            + [f"{c.mib[name]:.1f}" if name in c.mib else "-" for c in costs]
        )
        rows.append(
            [f"{LABELS[name]}: peak heap / baseline"]
            + [fmt_ratio(c.mib[name] / c.mib["baseline"]) if name in c.mib else "-" for c in costs]
        )
        rows.append(
            [f"{LABELS[name]}: rows read"]
            + [f"{c.rows_read[name]:,}" if name in c.rows_read else "-" for c in costs]
        )
        if name == "binned":  # the part that grows with H: the window's nightly bins
            rows.append(
                ["binned (auto): window read"]
                + [fmt_seconds(c.stages["window read"].median) for c in costs]
            )
    rows.append(["history photometry rows"] + [f"{c.history_rows:,}" for c in costs])
    rows.append(["database size MiB"] + [f"{c.db_mib:,.0f}" for c in costs])
    print_table(["", *heads], rows)

    last = costs[-1]
    flat = last.stages["binned"].median / base.stages["binned"].median
    flat_best = last.stages["binned"].best / base.stages["binned"].best
    scale = DSA110_SOURCES / args.sources
    t_1000 = last.stages["binned"].median * scale
    mib_1000 = last.mib["binned"] * scale
    print(
        f"\nbinned stage t(H={last.history})/t(H={base.history}) = {flat:.2f} of the medians, "
        f"{flat_best:.2f} of the fastest runs (target <= {TARGET_FLATNESS}: "
        f"{'met' if flat <= TARGET_FLATNESS else 'MISSED'} / "
        f"{'met' if flat_best <= TARGET_FLATNESS else 'MISSED'}; a loaded machine moves the "
        "medians)"
    )
    print(
        f"extrapolated to {DSA110_SOURCES} sources at H={last.history} (x{scale:g}: linear in "
        "sources, fixed costs included, so an upper bound): "
        f"{t_1000:.1f} s (target <= {TARGET_SECONDS:g} s: "
        f"{'met' if t_1000 <= TARGET_SECONDS else 'MISSED'}), peak heap {mib_1000:.0f} MiB "
        f"(target <= {TARGET_MIB:.0f} MiB: {'met' if mib_1000 <= TARGET_MIB else 'MISSED'})"
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process peak RSS over the whole run (history writes included): {rss:.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.epn = args.epochs_per_night
    quiet_logging()
    rng = np.random.default_rng(args.seed)
    print_header(
        "bench_nightly_bins: statistics of one new night vs DSA-110-cadence history (nightly bins)",
        [
            f"history: H nights x {args.epn} images x {args.sources} sources written directly "
            "into SQLite (photometry, images, source_night_sums, source_sums)",
            f"sources scaled down from DSA-110's ~{DSA110_SOURCES} to fit this machine; "
            f"window {WINDOW_DAYS:g} d",
        ],
    )
    cat = make_catalog(args.sources, rng)
    costs = []
    with temp_dir("nightly_bins") as tmp:
        db = tmp / "products.sqlite3"
        engine = open_products_db(db)
        done, rows = 0, 0
        for h in args.histories:
            started = time.perf_counter()
            rows += write_nights(engine, cat, range(done, h), args.epn, rng, with_sums=True)
            rebuild_source_sums(engine, cat)
            rows += write_nights(engine, cat, [h], args.epn, rng, with_sums=False)
            night = night_of(FIRST_MJD + h + 0.5)
            print(
                f"  H={h}: {rows:,} photometry rows written in "
                f"{time.perf_counter() - started:.0f} s; processing night {night} ...",
                flush=True,
            )
            cost = NightCost(h, rows - args.sources * args.epn, os.path.getsize(db) / 2**20)
            measure_night(engine, cat, night, cost, args)
            costs.append(cost)
            done = h + 1
        close_products_db(db)
    report(costs, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
