"""Shared helpers of the benchmark scripts: timing, tables, synthetic data and products databases.

Every benchmark prints its figures as ratios against a baseline measured in the same process and
run, so the numbers are comparable between machines only as ratios (absolute seconds depend on the
machine and its load). Nothing here is a test: no assertions on speed, no pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import platform
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ese_assets.core import simulate as sim
from ese_assets.core.catalog import Catalog
from ese_assets.core.fits_image import Beam
from ese_assets.core.source_ids import iau_source_ids
from ese_assets.storage import images as images_db
from ese_assets.storage import photometry as photometry_db
from ese_assets.storage.engine import dispose_engine, ensure_schema, make_engine

# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock seconds of ``repeat`` runs of one call; ``value`` is the last call's result."""

    seconds: list[float]
    value: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)


def time_call(fn: Callable[[], Any], repeat: int = 1, max_seconds: float | None = None) -> Timing:
    """Run ``fn()`` ``repeat`` times (garbage collected before each run) and time each run.

    With ``max_seconds``, stop repeating once the runs so far took that long (slow calls are
    then timed fewer times, at least once).
    """
    seconds: list[float] = []
    value = None
    for _ in range(max(1, int(repeat))):
        gc.collect()
        start = time.perf_counter()
        value = fn()
        seconds.append(time.perf_counter() - start)
        if max_seconds is not None and sum(seconds) >= max_seconds:
            break
    return Timing(seconds, value)


def peak_traced_mib(fn: Callable[[], Any]) -> float:
    """Peak Python-heap growth (MiB) while ``fn()`` runs, numpy buffers included (tracemalloc).

    Run separately from the timed calls: tracing slows allocation-heavy code down.
    """
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return (peak - base) / 2**20


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def print_header(title: str, lines: Sequence[str] = ()) -> None:
    """Benchmark title, what is measured, and the machine it runs on."""
    print("=" * 100)
    print(title)
    print("=" * 100)
    for line in lines:
        print(line)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, numpy {np.__version__}, pandas {pd.__version__}"
    )
    print()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))
    print()


def fmt_seconds(seconds: float) -> str:
    """Seconds with a unit that keeps 3 significant digits (us, ms, s)."""
    if not math.isfinite(seconds):
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_rate(count: float, seconds: float, unit: str = "/s") -> str:
    """``count / seconds`` with thousands separators."""
    if seconds <= 0 or not math.isfinite(seconds):
        return "n/a"
    rate = count / seconds
    return f"{rate:,.0f} {unit}" if rate >= 10 else f"{rate:.2f} {unit}"


def fmt_ratio(value: float) -> str:
    """A ratio such as ``12.3x`` (two significant decimals below 10)."""
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}x" if value < 10 else f"{value:,.0f}x" if value >= 100 else f"{value:.1f}x"


def add_common_arguments(
    parser: argparse.ArgumentParser, *, repeat: int = 3
) -> argparse.ArgumentParser:
    """Options every benchmark takes: ``--repeat`` and ``--seed``."""
    parser.add_argument(
        "--repeat",
        type=int,
        default=repeat,
        help="runs of each fast timed call; the median is reported (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=12345, help="random seed (default: %(default)s)"
    )
    return parser


def quiet_logging() -> None:
    """Keep library warnings (e.g. the pipeline's per-image log lines) out of the tables."""
    logging.basicConfig(level=logging.ERROR)
    for name in ("ese_assets", "dagster", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"ese_bench_{prefix}_") as name:
        yield Path(name)


# --------------------------------------------------------------------------------------------
# Synthetic sky: one simulated image of a field with known sources
# --------------------------------------------------------------------------------------------

#: Beam and pixel size of the simulated images (those of core.simulate.SurveyConfig's defaults).
BEAM = Beam(45.0 / 3600.0, 30.0 / 3600.0, 30.0)
CELL_DEG = 10.0 / 3600.0
FIELD_RA_DEG = 150.0
FIELD_DEC_DEG = 30.0


@dataclass
class Field:
    """A simulated image and the catalog of the sources rendered into it."""

    data: np.ndarray  # (npix, npix) Jy/beam, float64
    wcs: Any
    beam: Beam
    catalog: Catalog  # source_id, ra_deg, dec_deg, flux_mjy (true flux)

    @property
    def npix(self) -> int:
        return int(self.data.shape[0])


def make_field(
    npix: int,
    n_sources: int,
    rng: np.random.Generator,
    *,
    rms_mjy: float = 0.5,
    edge_pix: float = 20.0,
) -> Field:
    """Render ``n_sources`` point sources (3-100 mJy, uniform positions ``edge_pix`` inside the
    edges) plus beam-correlated noise on an ``npix`` x ``npix`` SIN image (core.simulate)."""
    shape = (npix, npix)
    wcs = sim.make_sin_wcs(FIELD_RA_DEG, FIELD_DEC_DEG, CELL_DEG, shape)
    x = rng.uniform(edge_pix, npix - 1 - edge_pix, n_sources)
    y = rng.uniform(edge_pix, npix - 1 - edge_pix, n_sources)
    ra, dec = wcs.wcs_pix2world(x, y, 0)
    flux_mjy = rng.uniform(3.0, 100.0, n_sources)
    data = sim.render_point_sources(shape, wcs, BEAM, ra, dec, flux_mjy / 1e3)
    data += sim.correlated_noise(shape, sim.beam_covariance_pix(wcs, BEAM), rms_mjy / 1e3, rng)
    names = unique_source_ids(ra, dec)
    return Field(data, wcs, BEAM, Catalog(names, ra, dec, flux_mjy))


def unique_source_ids(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """IAU-style names of the positions; a name repeated by two close positions gets a suffix."""
    names = pd.Series(iau_source_ids(ra, dec), dtype=object)
    dup = names.groupby(names).cumcount()
    return np.where(dup > 0, names + "_" + dup.astype(str), names).astype(object)


def write_field_fits(field: Field, path: Path, date_obs: str) -> Path:
    """The field as a FITS image (float32, with beam and DATE-OBS) at ``path``."""
    return sim.write_fits_image(
        path,
        field.data,
        ra_deg=FIELD_RA_DEG,
        dec_deg=FIELD_DEC_DEG,
        cell_deg=CELL_DEG,
        beam=field.beam,
        date_obs=date_obs,
    )


# --------------------------------------------------------------------------------------------
# Synthetic light curves and products databases (no FITS: rows written directly)
# --------------------------------------------------------------------------------------------


def synthetic_lightcurves(
    source_ids: Sequence[str],
    mjds: Sequence[float],
    rng: np.random.Generator,
    mean_mjy: np.ndarray | None = None,
) -> pd.DataFrame:
    """Long table ``source_id, mjd, flux_mjy, flux_err_mjy``: every source at every epoch, constant
    fluxes (``mean_mjy``, default uniform 5-200 mJy) with 2-5 % heteroscedastic errors; rows
    shuffled (any order is valid input)."""
    ids = np.asarray(source_ids, dtype=object)
    mjds = np.asarray(mjds, dtype=float)
    mean = rng.uniform(5.0, 200.0, ids.size) if mean_mjy is None else np.asarray(mean_mjy, float)
    err = mean[None, :] * rng.uniform(0.02, 0.05, (mjds.size, ids.size))
    flux = mean[None, :] + err * rng.standard_normal(err.shape)
    frame = pd.DataFrame(
        {
            "source_id": np.tile(ids, mjds.size),
            "mjd": np.repeat(mjds, ids.size),
            "flux_mjy": flux.ravel(),
            "flux_err_mjy": err.ravel(),
        }
    )
    return frame.sample(frac=1.0, random_state=int(rng.integers(2**31))).reset_index(drop=True)


def synthetic_source_ids(
    n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source_ids, ra_deg, dec_deg) of ``n`` distinct sources scattered around the field centre."""
    ra = FIELD_RA_DEG + rng.uniform(-2.0, 2.0, n)
    dec = FIELD_DEC_DEG + rng.uniform(-2.0, 2.0, n)
    return unique_source_ids(ra, dec), ra, dec


def night_of(mjd: float) -> str:
    """UTC calendar date (the project's default partition timezone) of an MJD, YYYY-MM-DD."""
    return (pd.Timestamp("1858-11-17") + pd.to_timedelta(mjd, unit="D")).strftime("%Y-%m-%d")


def iso_of(mjd: float) -> str:
    """ISO 8601 UTC string (DATE-OBS) of an MJD."""
    return (pd.Timestamp("1858-11-17") + pd.to_timedelta(mjd, unit="D")).strftime(
        "%Y-%m-%dT%H:%M:%S"
    )


def epochs(first_mjd: float, n_nights: int, images_per_night: int) -> np.ndarray:
    """Observation MJDs: ``images_per_night`` images an hour apart from 02:00 UTC each night."""
    night = np.arange(n_nights, dtype=float)[:, None]
    hour = (2.0 + np.arange(images_per_night, dtype=float))[None, :] / 24.0
    return (first_mjd + night + hour).ravel()


def open_products_db(path: Path):
    """A fresh SQLite products database (engine with the project's settings, schema created)."""
    engine = make_engine(path)
    ensure_schema(engine)
    return engine


def close_products_db(path: Path) -> None:
    """Dispose of the cached engine of ``path`` (before its directory is removed)."""
    dispose_engine(path)


def fill_products_db(
    engine,
    lightcurves: pd.DataFrame,
    ra_deg: dict,
    dec_deg: dict,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Store a synthetic long table as the pipeline would: one fake image per distinct mjd,
    registered with :func:`images_db.register_images`, its rows written with
    :func:`photometry_db.replace_image_photometry` (one transaction per image). Returns the
    images written.

    ``lightcurves`` has ``source_id, mjd, flux_mjy, flux_err_mjy``; ``ra_deg``/``dec_deg`` map a
    source_id to its position. Fake paths such as ``/bench/img_59000.083333.fits`` never exist.
    """
    by_epoch = lightcurves.sort_values(["mjd", "source_id"]).groupby("mjd", sort=True)
    records = [
        {
            "path": f"/bench/img_{mjd:.6f}.fits",
            "night": night_of(mjd),
            "mjd": float(mjd),
            "status": "queued",
        }
        for mjd in by_epoch.groups
    ]
    images_db.register_images(engine, records)
    for i, (record, (mjd, rows)) in enumerate(zip(records, by_epoch, strict=True), start=1):
        ids = rows["source_id"].to_numpy(dtype=object)
        frame = pd.DataFrame(
            {
                "ra_deg": [ra_deg[s] for s in ids],
                "dec_deg": [dec_deg[s] for s in ids],
                "nvss_flux_mjy": rows["flux_mjy"].to_numpy(),
                "peak_jyb": rows["flux_mjy"].to_numpy() / 1e3,
                "peak_err_jyb": rows["flux_err_mjy"].to_numpy() / 1e3,
                "measured_at": time.time(),
                "source_id": ids,
                "mjd": float(mjd),
                "local_rms_jyb": rows["flux_err_mjy"].to_numpy() / 1e3 / 1.15,
                "background_jyb": 0.0,
                "quality_flag": 0,
            }
        )
        rms = float(np.median(frame["local_rms_jyb"]))
        photometry_db.replace_image_photometry(
            engine,
            record["path"],
            frame,
            {"mjd": float(mjd), "median_rms_jyb": rms, "n_sources": len(frame)},
        )
        if progress is not None:
            progress(i, len(records))
    return len(records)


def progress_printer(label: str, every: int = 500) -> Callable[[int, int], None]:
    """A ``progress(i, n)`` callback printing ``label: i/n`` every ``every`` steps and at the
    end."""

    def report(i: int, n: int) -> None:
        if i == n or i % every == 0:
            print(f"  {label}: {i}/{n}", flush=True)

    return report
