"""Full recompute of the variability statistics against a bare SQL ``GROUP BY`` over the same rows.

``ese detect --recompute`` (``pipeline.recompute_variability``) rebuilds every source's per-night
sums, whole-history sums and window statistics from the ``photometry`` table. Its floor is reading
those rows once: the **baseline** is a bare SQL aggregate over the same usable rows, run in the same
process against the same database,

    SELECT source_id, COUNT(*), SUM(peak_jyb), SUM(peak_jyb * peak_jyb), MIN(peak_jyb),
           MAX(peak_jyb) FROM photometry WHERE quality_flag & :excluded = 0 GROUP BY source_id

(``fetchall``), i.e. the moments a hand-written SQL report would give. Target (issue 7): the full
recompute of 10^7 measurements takes <= 2x the baseline, on SQLite and on PostgreSQL.

Rows are written straight into ``images`` and ``photometry`` (bulk inserts; PostgreSQL ``COPY``) at
DSA-110's cadence (``--epochs-per-night`` images a night, ``--sources`` sources in each), constant
sources with 2-5 % errors. The write is not timed. The recompute's answer is checked against the
baseline (per-source N and mean flux agree to 1e-9), so the ratio compares equal work on the
moments.

PostgreSQL runs when ``ESE_BENCH_POSTGRES_URL`` or ``ESE_TEST_POSTGRES_URL`` names a server (a
temporary database is created on it and dropped); otherwise its rows say NOT MEASURED.

Run: ``.venv/bin/python benchmarks/bench_recompute.py [--rows 10000000] [--sources 1000]
[--backends sqlite,postgresql]``. Default ``--rows 2000000`` (about 2 minutes on 2 cores);
``--rows 10000000`` is the target's size (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
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
    synthetic_source_ids,
    temp_dir,
    time_call,
)

from ese_assets import pipeline
from ese_assets.core.quality import DEFAULT_EXCLUDED_FLAGS
from ese_assets.storage.engine import dispose_engine, ensure_schema, make_engine

TARGET_RATIO = 2.0
FLUX_SCALE_ERROR = 0.02
PHOTOMETRY_COLUMNS = (
    "image_path",
    "ra_deg",
    "dec_deg",
    "nvss_flux_mjy",
    "peak_jyb",
    "peak_err_jyb",
    "measured_at",
    "source_id",
    "mjd",
    "local_rms_jyb",
    "background_jyb",
    "quality_flag",
)
BASELINE_SQL = sa.text(
    "SELECT source_id, COUNT(*), SUM(peak_jyb), SUM(peak_jyb * peak_jyb), MIN(peak_jyb), "
    "MAX(peak_jyb) FROM photometry WHERE (quality_flag & :excluded) = 0 GROUP BY source_id"
)


def _image_chunks(
    n_rows: int, n_sources: int, epochs_per_night: int, seed: int
) -> Iterator[tuple[list[tuple], list[tuple]]]:
    """(image rows, photometry rows) one night at a time, until ``n_rows`` measurements."""
    rng = np.random.default_rng(seed)
    ids, ra, dec = synthetic_source_ids(n_sources, rng)
    mean_mjy = rng.uniform(5.0, 200.0, n_sources)
    n_images = max(1, n_rows // n_sources)
    n_nights = -(-n_images // epochs_per_night)
    # DSA-110 images the sky as it drifts past: epochs spread over 0.8 day, one night per day.
    step = 0.8 / epochs_per_night
    mjds = (
        60000.0 + np.arange(n_nights)[:, None] + step * np.arange(epochs_per_night)[None, :]
    ).ravel()[:n_images]
    for night_start in range(0, n_images, epochs_per_night):
        night_mjds = mjds[night_start : night_start + epochs_per_night]
        image_rows, phot_rows = [], []
        for mjd in night_mjds:
            path = f"/bench/img_{mjd:.6f}.fits"
            image_rows.append((path, night_of(mjd), float(mjd), "measured", 0.0))
            err = mean_mjy * rng.uniform(0.02, 0.05, n_sources)
            flux = mean_mjy + err * rng.standard_normal(n_sources)
            phot_rows.extend(
                zip(
                    [path] * n_sources,
                    ra.tolist(),
                    dec.tolist(),
                    mean_mjy.tolist(),
                    (flux / 1e3).tolist(),
                    (err / 1e3).tolist(),
                    [0.0] * n_sources,
                    ids.tolist(),
                    [float(mjd)] * n_sources,
                    (err / 1.15e3).tolist(),
                    [0.0] * n_sources,
                    [0] * n_sources,
                    strict=True,
                )
            )
        yield image_rows, phot_rows


def _fill(engine: sa.Engine, args: argparse.Namespace) -> int:
    """Bulk-write the synthetic survey; returns the photometry rows written."""
    image_sql = (
        "INSERT INTO images (path, night, mjd, status, registered_at) VALUES (?, ?, ?, ?, ?)"
    )
    phot_sql = (
        f"INSERT INTO photometry ({', '.join(PHOTOMETRY_COLUMNS)}) "
        f"VALUES ({', '.join('?' * len(PHOTOMETRY_COLUMNS))})"
    )
    written = 0
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        postgres = engine.dialect.name == "postgresql"
        for image_rows, phot_rows in _image_chunks(
            args.rows, args.sources, args.epochs_per_night, args.seed
        ):
            if postgres:
                with cursor.copy(
                    "COPY images (path, night, mjd, status, registered_at) FROM STDIN"
                ) as copy:
                    for row in image_rows:
                        copy.write_row(row)
                with cursor.copy(
                    f"COPY photometry ({', '.join(PHOTOMETRY_COLUMNS)}) FROM STDIN"
                ) as copy:
                    for row in phot_rows:
                        copy.write_row(row)
            else:
                cursor.executemany(image_sql, image_rows)
                cursor.executemany(phot_sql, phot_rows)
            raw.commit()
            written += len(phot_rows)
            print(
                f"  written {written:,}/{args.rows:,} rows", end="\r", flush=True, file=sys.stderr
            )
        if postgres:
            cursor.execute("ANALYZE")
            raw.commit()
    finally:
        raw.close()
    print(file=sys.stderr)
    return written


def _baseline(engine: sa.Engine) -> dict[str, tuple[int, float]]:
    with engine.connect() as conn:
        rows = conn.execute(BASELINE_SQL, {"excluded": DEFAULT_EXCLUDED_FLAGS}).fetchall()
    return {str(r[0]): (int(r[1]), float(r[2]) / int(r[1])) for r in rows}


def _recompute(engine: sa.Engine) -> int:
    return pipeline.recompute_variability(engine, flux_scale_error=FLUX_SCALE_ERROR)


def _agreement(engine: sa.Engine, baseline: dict[str, tuple[int, float]]) -> float:
    """Largest relative difference of N and mean flux between the statistics and the baseline."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT source_id, n_obs, mean_flux_mjy FROM variability_stats")
        ).fetchall()
    worst = 0.0 if len(rows) == len(baseline) else float("inf")
    for source_id, n_obs, mean_mjy in rows:
        n_ref, mean_ref_jy = baseline[str(source_id)]
        worst = max(worst, abs(n_obs - n_ref) / n_ref, abs(mean_mjy / (mean_ref_jy * 1e3) - 1))
    return worst


@contextmanager
def _sqlite_engine() -> Iterator[sa.Engine]:
    with temp_dir("bench_recompute_") as tmp:
        path = tmp / "products.sqlite3"
        engine = open_products_db(path)
        try:
            yield engine
        finally:
            close_products_db(path)


@contextmanager
def _postgres_engine(server_url: str) -> Iterator[sa.Engine]:
    name = f"ese_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    ensure_schema(engine)
    try:
        yield engine
    finally:
        dispose_engine(url)
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _measure(engine: sa.Engine, args: argparse.Namespace) -> list:
    written = _fill(engine, args)
    base = time_call(lambda: _baseline(engine), repeat=args.repeat)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    recompute = time_call(lambda: _recompute(engine), repeat=args.repeat)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    agree = _agreement(engine, base.value)
    ratio = recompute.median / base.median
    return [
        engine.dialect.name,
        f"{written:,}",
        fmt_seconds(base.median),
        fmt_seconds(recompute.median),
        fmt_ratio(ratio),
        "MET" if ratio <= TARGET_RATIO else "MISSED",
        f"{max(rss_after, rss_before):.0f} MiB",
        f"{agree:.1e}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=lambda s: int(float(s)), default=2_000_000)
    parser.add_argument("--sources", type=int, default=1000)
    parser.add_argument("--epochs-per-night", type=int, default=300)
    parser.add_argument("--backends", default="sqlite,postgresql")
    add_common_arguments(parser, repeat=1)
    args = parser.parse_args(argv)
    quiet_logging()
    print_header(
        "Full recompute (ese detect --recompute) against a bare SQL GROUP BY",
        [
            f"{args.rows:,} measurements: {args.sources} sources x "
            f"{args.rows // args.sources:,} images ({args.epochs_per_night} a night)",
            f"target: recompute <= {TARGET_RATIO:.0f}x the GROUP BY (issue 7, at 10^7 rows)",
        ],
    )
    server = os.environ.get("ESE_BENCH_POSTGRES_URL") or os.environ.get("ESE_TEST_POSTGRES_URL")
    rows = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if backend == "sqlite":
            with _sqlite_engine() as engine:
                rows.append(_measure(engine, args))
        elif backend == "postgresql" and server:
            with _postgres_engine(server) as engine:
                rows.append(_measure(engine, args))
        else:
            rows.append([backend, "NOT MEASURED (set ESE_BENCH_POSTGRES_URL)", *[""] * 6])
    print_table(
        [
            "backend",
            "rows",
            "GROUP BY (baseline)",
            "recompute",
            "ratio",
            "target <= 2x",
            "peak RSS",
            "max rel. diff N, mean",
        ],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
