"""Variability statistics: vectorized ``variability_metrics`` and the single history query vs
per-source baselines.

Part 1, metrics (in memory, N sources x M epochs, rows shuffled):

* ``variability_metrics`` on the whole long table (baseline);
* a Python loop over sources (pandas groupby) computing the same metrics per source with plain
  numpy (written here from the formulas in core.variability's docstring; checked against the
  vectorized output);
* ``variability_metrics`` called once per source, timed on a sample and extrapolated.

Part 2, reading light curves from an SQLite products database (built in a temporary directory
through ``images_db.register_images`` + ``photometry_db.replace_image_photometry``, one fake
image per epoch):

* ``photometry_db.lightcurves_for_nights`` over all nights: one query (baseline);
* the seed's pattern: one query per source (``photometry_db.lightcurves(engine, [source_id])``);
* the same, with plain SQL per source (no pandas per query);
* diagnostic: the single query's SQL with rows turned into tuples before the DataFrame is built.

Run: ``.venv/bin/python benchmarks/bench_variability.py [--sources 5000] [--epochs 200]``.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import pandas as pd
from _common import (
    add_common_arguments,
    close_products_db,
    epochs,
    fill_products_db,
    fmt_rate,
    fmt_ratio,
    fmt_seconds,
    night_of,
    open_products_db,
    print_header,
    print_table,
    progress_printer,
    quiet_logging,
    synthetic_lightcurves,
    synthetic_source_ids,
    temp_dir,
    time_call,
)

from ese_assets.core.variability import MAD_TO_SIGMA, variability_metrics, window_ladder
from ese_assets.storage import photometry as photometry_db

FLUX_SCALE_ERROR = 0.02  # the project's default (ESE_FLUX_SCALE_ERROR)
FIRST_MJD = 60676.0  # 2025-01-01
IMAGES_PER_NIGHT = 4
COMPARED = (
    "n_obs",
    "mean_flux_mjy",
    "std_flux_mjy",
    "weighted_mean_flux_mjy",
    "chi2_nu",
    "eta_metric",
    "v_index",
    "sigma_deviation",
    "median_flux_mjy",
    "robust_std_mjy",
    "dip_significance",
    "dip_start_mjd",
    "dip_n_epochs",
    "dip_depth_frac",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sources", type=int, default=5000, help="sources, part 1 (default: %(default)s)"
    )
    parser.add_argument(
        "--epochs", type=int, default=200, help="epochs per source (default: %(default)s)"
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=300,
        help="sources timed for 'variability_metrics per source' (extrapolated; "
        "default: %(default)s)",
    )
    parser.add_argument(
        "--db-sources",
        type=int,
        default=2000,
        help="sources in the SQLite database of part 2 (x --epochs rows; default: %(default)s)",
    )
    return add_common_arguments(parser, repeat=3).parse_args(argv)


# --------------------------------------------------------------------------------------------
# Per-source baseline: the metrics of one source with plain numpy
# --------------------------------------------------------------------------------------------


def _dip_scan(mjd, f, sigma, median, robust_std, min_len=3, clip=5.0) -> dict:
    """Windowed dip statistic of one source (time-ordered arrays), as in core.variability."""
    n = f.size
    sigma_med = np.median(sigma)
    excess2 = max(0.0, robust_std**2 - sigma_med**2)
    z = np.clip((f - median) / np.sqrt(sigma * sigma + excess2), -clip, clip)
    cz = np.concatenate(([0.0], np.cumsum(z)))
    best, best_pos, best_len = -1.0, 0, 0
    for length in window_ladder(n, min_len):
        s = np.abs(cz[length:] - cz[:-length]) / math.sqrt(length)
        pos = int(np.argmax(s))
        if s[pos] > best:
            best, best_pos, best_len = float(s[pos]), pos, int(length)
    if best_len == 0:
        return {}
    window = slice(best_pos, best_pos + best_len)
    return {
        "dip_significance": (cz[best_pos + best_len] - cz[best_pos]) / math.sqrt(best_len),
        "dip_start_mjd": mjd[best_pos],
        "dip_end_mjd": mjd[best_pos + best_len - 1],
        "dip_n_epochs": best_len,
        "dip_depth_frac": np.mean(f[window]) / median - 1.0 if median > 0 else np.nan,
    }


def metrics_one_source(
    mjd: np.ndarray, flux: np.ndarray, err: np.ndarray, flux_scale_error: float
) -> dict:
    """Variability metrics of one source (see core.variability for the definitions)."""
    order = np.argsort(mjd, kind="stable")
    mjd, f, err = mjd[order], flux[order], err[order]
    n = f.size
    sigma = np.sqrt(err * err + (flux_scale_error * f) ** 2)
    w = 1.0 / (sigma * sigma)
    mean = f.mean()
    std = f.std(ddof=1) if n > 1 else np.nan
    wmean = np.sum(w * f) / np.sum(w)
    d = f - mean
    median = np.median(f)
    robust_std = MAD_TO_SIGMA * np.median(np.abs(f - median))
    out = {
        "n_obs": n,
        "mean_flux_mjy": mean,
        "std_flux_mjy": std,
        "min_flux_mjy": f.min(),
        "max_flux_mjy": f.max(),
        "weighted_mean_flux_mjy": wmean,
        "chi2_nu": np.sum(w * (f - wmean) ** 2) / (n - 1) if n > 1 else np.nan,
        "eta_metric": (
            n / (n - 1) * (np.mean(w * d * d) - np.mean(w * d) ** 2 / np.mean(w))
            if n > 1
            else np.nan
        ),
        "v_index": std / mean,
        "sigma_deviation": max(abs(f.max() - mean), abs(f.min() - mean)) / std,
        "median_flux_mjy": median,
        "robust_std_mjy": robust_std,
        "first_mjd": mjd[0],
        "last_mjd": mjd[-1],
    }
    out.update(_dip_scan(mjd, f, sigma, median, robust_std))
    return out


def per_source_loop(lc: pd.DataFrame, flux_scale_error: float) -> pd.DataFrame:
    """One row of metrics per source, a Python loop over the groups of ``source_id``."""
    rows = []
    for sid, group in lc.groupby("source_id", sort=True):
        row = metrics_one_source(
            group["mjd"].to_numpy(),
            group["flux_mjy"].to_numpy(),
            group["flux_err_mjy"].to_numpy(),
            flux_scale_error,
        )
        row["source_id"] = sid
        rows.append(row)
    return pd.DataFrame(rows)


def vectorized_per_source(lc: pd.DataFrame, source_ids, flux_scale_error: float) -> int:
    """``variability_metrics`` called once per source (the groups of the given sources)."""
    groups = lc.groupby("source_id", sort=True)
    for sid in source_ids:
        variability_metrics(groups.get_group(sid), flux_scale_error=flux_scale_error)
    return len(source_ids)


def max_relative_difference(ref: pd.DataFrame, other: pd.DataFrame) -> tuple[float, str]:
    """Largest |a - b| / max(|a|, 1e-12) over :data:`COMPARED` (NaN == NaN), and its column."""
    a = ref.set_index("source_id").sort_index()
    b = other.set_index("source_id").sort_index().reindex(a.index)
    worst, column = 0.0, "-"
    for col in COMPARED:
        x = pd.to_numeric(a[col]).to_numpy(dtype=float, na_value=np.nan)
        y = pd.to_numeric(b[col]).to_numpy(dtype=float, na_value=np.nan)
        both_nan = np.isnan(x) & np.isnan(y)
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.where(both_nan, 0.0, np.abs(x - y) / np.maximum(np.abs(x), 1e-12))
        rel = np.where(np.isnan(rel), np.inf, rel)  # NaN on one side only
        if rel.max() > worst:
            worst, column = float(rel.max()), col
    return worst, column


# --------------------------------------------------------------------------------------------
# Part 2: database reads
# --------------------------------------------------------------------------------------------

#: The SQL of photometry_db.lightcurves_for_nights, for the diagnostic rows.
NIGHTS_SQL = (
    "SELECT source_id, mjd, peak_jyb, peak_err_jyb, ra_deg, dec_deg, nvss_flux_mjy, image_path, "
    "measured_at, quality_flag FROM photometry WHERE source_id IN (SELECT DISTINCT p.source_id "
    "FROM photometry p JOIN images i ON i.path = p.image_path WHERE i.night IN ({marks})) "
    "ORDER BY source_id, mjd, image_path"
)
SOURCE_SQL = (
    "SELECT source_id, mjd, peak_jyb, peak_err_jyb, ra_deg, dec_deg, nvss_flux_mjy, "
    "image_path, measured_at, quality_flag FROM photometry WHERE source_id = ? "
    "ORDER BY mjd, image_path"
)


def read_nights_as_tuples(engine, nights: list[str]) -> pd.DataFrame:
    """Diagnostic: the single query, rows converted to plain tuples before building the frame."""
    with engine.connect() as conn:
        result = conn.exec_driver_sql(
            NIGHTS_SQL.format(marks=",".join("?" * len(nights))), tuple(nights)
        )
        columns = list(result.keys())
        return pd.DataFrame.from_records([tuple(r) for r in result.fetchall()], columns=columns)


def read_per_source(engine, source_ids) -> int:
    """The seed's pattern through the project's reader: one query per source."""
    return sum(len(photometry_db.lightcurves(engine, [sid])) for sid in source_ids)


def read_per_source_sql(engine, source_ids) -> int:
    """One plain parameterised query per source, rows fetched as tuples (no per-query pandas)."""
    n = 0
    with engine.connect() as conn:
        for sid in source_ids:
            n += len(conn.exec_driver_sql(SOURCE_SQL, (sid,)).fetchall())
    return n


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------


def bench_metrics(args, rng) -> None:
    ids, _, _ = synthetic_source_ids(args.sources, rng)
    mjds = epochs(FIRST_MJD, math.ceil(args.epochs / IMAGES_PER_NIGHT), IMAGES_PER_NIGHT)[
        : args.epochs
    ]
    lc = synthetic_lightcurves(ids, mjds, rng)
    n = args.sources
    k = max(1, min(args.sample, n))
    sample = np.sort(rng.choice(np.sort(ids), k, replace=False))

    vec = time_call(lambda: variability_metrics(lc, flux_scale_error=FLUX_SCALE_ERROR), args.repeat)
    loop = time_call(lambda: per_source_loop(lc, FLUX_SCALE_ERROR))
    calls = time_call(lambda: vectorized_per_source(lc, sample, FLUX_SCALE_ERROR))
    base = vec.median
    rows = [
        ("variability_metrics, all sources (baseline)", vec.median, "measured"),
        ("Python loop over sources (groupby + numpy)", loop.median, "measured"),
        ("variability_metrics called per source", calls.median * n / k, f"{k} timed, extrapolated"),
    ]
    print(
        f"part 1: metrics in memory, {n} sources x {args.epochs} epochs = {len(lc):,} rows "
        f"(flux_scale_error {FLUX_SCALE_ERROR}); median of {args.repeat} runs for the baseline"
    )
    print_table(
        ["method", "time", "sources/s", "rows/s", "ratio", "how"],
        [
            (name, fmt_seconds(t), fmt_rate(n, t), fmt_rate(len(lc), t), fmt_ratio(t / base), how)
            for name, t, how in rows
        ],
    )
    worst, column = max_relative_difference(vec.value, loop.value)
    print(
        f"agreement: largest relative difference loop vs vectorized over {len(COMPARED)} "
        f"columns = {worst:.1e} (in {column})\n"
    )


def bench_reads(args, rng) -> None:
    n = args.db_sources
    ids, ra, dec = synthetic_source_ids(n, rng)
    mjds = epochs(FIRST_MJD, math.ceil(args.epochs / IMAGES_PER_NIGHT), IMAGES_PER_NIGHT)[
        : args.epochs
    ]
    lc = synthetic_lightcurves(ids, mjds, rng)
    nights = sorted({night_of(m) for m in mjds})
    with temp_dir("variability") as tmp:
        path = tmp / "products.sqlite3"
        engine = open_products_db(path)
        print(
            f"part 2: building an SQLite products database of {n} sources x {len(mjds)} images "
            f"= {len(lc):,} photometry rows ...",
            flush=True,
        )
        build = time_call(
            lambda: fill_products_db(
                engine,
                lc,
                dict(zip(ids, ra, strict=True)),
                dict(zip(ids, dec, strict=True)),
                progress=progress_printer("images", 100),
            )
        )
        print(
            f"  built in {fmt_seconds(build.median)} ({fmt_rate(len(lc), build.median, 'rows/s')}, "
            f"one transaction per image)\n"
        )
        single = time_call(
            lambda: photometry_db.lightcurves_for_nights(engine, nights), args.repeat
        )
        tuples = time_call(lambda: read_nights_as_tuples(engine, nights), args.repeat)
        per_source = time_call(lambda: read_per_source(engine, ids))
        per_sql = time_call(lambda: read_per_source_sql(engine, ids))
        size_mib = path.stat().st_size / 2**20
        close_products_db(path)

    n_rows = len(single.value)
    base = single.median
    rows = [
        ("lightcurves_for_nights: one query (baseline)", single.median, n_rows),
        ("seed: photometry_db.lightcurves per source", per_source.median, per_source.value),
        ("seed: plain SQL query per source (tuples)", per_sql.median, per_sql.value),
        ("diagnostic: one query, tuples -> DataFrame", tuples.median, len(tuples.value)),
    ]
    print(
        f"reading every source's history from SQLite ({size_mib:.0f} MiB file, {len(nights)} "
        f"nights); median of {args.repeat} runs for the one-query rows, per-source rows run once"
    )
    print_table(
        ["method", "time", "rows read", "sources/s", "ratio"],
        [
            (name, fmt_seconds(t), f"{r:,}", fmt_rate(n, t), fmt_ratio(t / base))
            for name, t, r in rows
        ],
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    rng = np.random.default_rng(args.seed)
    print_header(
        "bench_variability: per-source variability statistics, vectorized vs one source at a time",
        ["ratio = time of the row / time of the baseline of its table (higher = slower)"],
    )
    bench_metrics(args, rng)
    bench_reads(args, rng)
    return 0


if __name__ == "__main__":
    sys.exit(main())
