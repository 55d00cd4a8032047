"""Cost of the calibration stage of ONE night against the statistics stage of the same night.

An SQLite products database holds ``--history`` nights of ``--epochs-per-night`` images of
``--sources`` constant sources (2 % per-image gains, 1 mJy noise, 10-200 mJy: every source is a
reference), written by bulk ``INSERT``s; those nights are calibrated and their statistics computed
once (untimed), so a new night sees the reference history the pipeline would have stored. Then one
new night (images and photometry only, as the photometry stage leaves it) is processed and timed:

* **calibration**: ``pipeline.calibrate_nights`` (the ``image_calibration`` asset): reads the
  night's photometry and the reference history, computes the gains, writes ``image_gains``, the
  night's reference values, and every row's normalized flux (one ``UPDATE`` per row, by id);
* **core only**: ``core.calibration.calibrate_measurements`` on the same table in memory;
* **statistics**: ``pipeline.update_variability`` of the same night (the ``variability_stats``
  asset, nightly bins), the stage the calibration sits in front of;
* **baseline**: a bare SQL read of the night's photometry rows, the read no stage can avoid.

Figures are seconds and ratios to the baseline measured in the same run.

Run: ``.venv/bin/python benchmarks/bench_calibration.py [--sources 200] [--epochs-per-night 300]
[--history 5] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pandas as pd
import sqlalchemy as sa
from _common import (
    add_common_arguments,
    close_products_db,
    fmt_ratio,
    fmt_seconds,
    night_of,
    open_products_db,
    print_header,
    print_table,
    quiet_logging,
    temp_dir,
    time_call,
)

from ese_assets import pipeline
from ese_assets.core.calibration import calibrate_measurements
from ese_assets.storage import calibration as calibration_db

FIRST_MJD = 58849.0  # 2020-01-01, the default first partition
FLUX_SCALE_ERROR = 0.02
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
BARE_QUERY = sa.text(
    "SELECT p.id, p.source_id, p.mjd, p.peak_jyb, p.peak_err_jyb FROM photometry p "
    "JOIN images i ON i.path = p.image_path WHERE i.night = :night"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=200, help="sources (default: %(default)s)")
    parser.add_argument(
        "--epochs-per-night", type=int, default=300, help="images a night (default: %(default)s)"
    )
    parser.add_argument(
        "--history", type=int, default=5, help="nights before the timed one (default: %(default)s)"
    )
    return add_common_arguments(parser, repeat=3).parse_args(argv)


def write_night(engine, k: int, args, rng) -> str:
    """Images and photometry of night ``k`` (bulk INSERTs); returns the night."""
    n, per_night = args.sources, args.epochs_per_night
    ids = np.array([f"REF{i:05d}" for i in range(n)], dtype=object)
    flux = np.random.default_rng(args.seed).uniform(10.0, 200.0, n)
    mjd_img = FIRST_MJD + k + (np.arange(per_night) + 0.5) / per_night
    mjd = np.repeat(mjd_img, n)
    gain = np.repeat(1 + 0.02 * rng.standard_normal(per_night), n)
    measured = np.tile(flux, per_night) * gain + rng.standard_normal(len(mjd))
    night = night_of(FIRST_MJD + k + 0.5)
    paths = np.repeat([f"/bench/{night}/img_{m:.6f}.fits" for m in mjd_img], n)
    now = time.time()
    rows = pd.DataFrame(
        {
            "image_path": paths,
            "ra_deg": 150.0,
            "dec_deg": 30.0,
            "nvss_flux_mjy": np.tile(flux, per_night),
            "peak_jyb": measured / 1e3,
            "peak_err_jyb": 1e-3,
            "measured_at": now,
            "source_id": np.tile(ids, per_night),
            "mjd": mjd,
            "quality_flag": 0,
        }
    )
    insert_phot, insert_img = (
        f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
        for table, cols in (("photometry", _PHOT_COLUMNS), ("images", _IMAGE_COLUMNS))
    )
    with engine.begin() as conn:
        conn.exec_driver_sql(
            insert_img,
            [
                (f"/bench/{night}/img_{m:.6f}.fits", night, float(m), "measured", now, now, n)
                for m in mjd_img
            ],
        )
        conn.exec_driver_sql(
            insert_phot, list(rows[list(_PHOT_COLUMNS)].itertuples(index=False, name=None))
        )
    return night


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    rng = np.random.default_rng(args.seed)
    print_header(
        "Calibration stage of one night (pipeline.calibrate_nights) vs the statistics stage",
        [
            f"{args.sources} sources x {args.epochs_per_night} images a night, "
            f"{args.history} nights of history; median of {args.repeat} runs",
        ],
    )
    with temp_dir("calibration") as tmp:
        path = tmp / "products.sqlite3"
        engine = open_products_db(path)
        for k in range(args.history):
            night = write_night(engine, k, args, rng)
            pipeline.calibrate_nights(engine, [night])
            pipeline.update_variability(engine, [night], flux_scale_error=FLUX_SCALE_ERROR)
        night = write_night(engine, args.history, args, rng)
        n_rows = args.sources * args.epochs_per_night

        def calibration():
            return pipeline.calibrate_nights(engine, [night])

        def statistics():
            return pipeline.update_variability(engine, [night], flux_scale_error=FLUX_SCALE_ERROR)

        def bare():
            with engine.connect() as conn:
                return conn.execute(BARE_QUERY, {"night": night}).fetchall()

        table = pd.DataFrame(
            bare(), columns=["id", "source_id", "mjd", "flux_mjy", "flux_err_mjy"]
        ).assign(image_id=lambda d: d["mjd"], flux_mjy=lambda d: d["flux_mjy"] * 1e3)

        def core():
            return calibrate_measurements(table.assign(flux_err_mjy=1.0))

        timings = {
            "baseline (bare SQL read)": time_call(bare, args.repeat),
            "core only (in memory)": time_call(core, args.repeat),
            "calibration (stage)": time_call(calibration, args.repeat),
            "statistics (stage)": time_call(statistics, args.repeat),
        }
        gains = calibration_db.gains(engine, [night])
        close_products_db(path)
    base = timings["baseline (bare SQL read)"].median
    print_table(
        ["", "seconds", "x baseline", "rows/s"],
        [
            [name, fmt_seconds(t.median), fmt_ratio(t.median / base), f"{n_rows / t.median:,.0f}"]
            for name, t in timings.items()
        ],
    )
    ratio = timings["calibration (stage)"].median / timings["statistics (stage)"].median
    print(f"calibration / statistics of the same night: {fmt_ratio(ratio)}")
    print(
        f"gains of the night: {len(gains)} images, median {gains['gain'].median():.4f}, "
        f"median error {gains['gain_err'].median():.4f}, median references "
        f"{gains['n_ref'].median():.0f}, bad {int(gains['bad'].sum())}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
