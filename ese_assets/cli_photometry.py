"""``ese photometry nvss|batch``: the seed's ``photometry.cli`` commands.

``nvss`` measures one image at the catalog sources in its field (``PhotometryManager``);
``batch`` measures a list of positions in every FITS image of a directory. Both measure through
:func:`ese_assets.pipeline.measurement.photometry_rows`, the pipeline's own forced photometry.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

#: Columns of the printed table and of the CSV files, in this order (fluxes also in mJy).
OUTPUT_COLUMNS = (
    "source_id",
    "ra_deg",
    "dec_deg",
    "nvss_flux_mjy",
    "mjd",
    "peak_jyb",
    "peak_err_jyb",
    "flux_mjy",
    "flux_err_mjy",
    "local_rms_jyb",
    "quality_flag",
    "image_path",
)
#: Columns printed by ``ese photometry nvss`` (the CSV has all of OUTPUT_COLUMNS).
TABLE_COLUMNS = (
    "source_id",
    "ra_deg",
    "dec_deg",
    "nvss_flux_mjy",
    "flux_mjy",
    "flux_err_mjy",
    "quality_flag",
)


def output_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """Photometry rows as the commands write them: fluxes also in mJy/beam."""
    out = rows.assign(flux_mjy=rows["peak_jyb"] * 1e3, flux_err_mjy=rows["peak_err_jyb"] * 1e3)
    return out[list(OUTPUT_COLUMNS)]


def _settings(args: argparse.Namespace):
    from ese_assets.cli import _settings as settings_of

    return settings_of(args)


def cmd_nvss(args: argparse.Namespace) -> int:
    """Forced photometry of the catalog sources in one image; a table (or ``--output`` CSV)."""
    from ese_assets.photometry import PhotometryConfig, PhotometryManager

    settings = _settings(args)
    manager = PhotometryManager(settings.products_db if args.store else None, settings=settings)
    result = manager.measure_for_fits(
        args.fits,
        config=PhotometryConfig(
            radius_deg=args.radius_deg, min_flux_mjy=args.min_mjy, detect_ese=args.detect_ese
        ),
    )
    table = output_frame(result.measurements).sort_values("source_id", kind="mergesort")
    stored = f"; stored in {settings.products_db} (night {result.night})" if result.stored else ""
    print(
        f"ese photometry nvss: {len(table)} sources measured in {result.fits_path} "
        f"(MJD {result.mjd:.5f}, catalog {result.catalog_path}, >= {args.min_mjy:g} mJy)"
        f"{stored}",
        file=sys.stderr,
    )
    if args.output:
        table.to_csv(args.output, index=False, float_format="%.10g")
        print(f"wrote {len(table)} measurements to {args.output}")
    else:
        with pd.option_context("display.width", 200, "display.max_rows", None):
            print(table[list(TABLE_COLUMNS)].to_string(index=False, float_format="{:.4f}".format))
    if args.detect_ese:
        ids = ", ".join(c["source_id"] for c in result.candidates) or "none"
        print(f"ESE candidates among them: {ids}")
    return 0


def image_files(directory: Path, recursive: bool) -> list[Path]:
    """The FITS files of ``directory`` (by name and first bytes, as the pipeline says), sorted."""
    from ese_assets.pipeline.registration import is_fits_file

    found = directory.rglob("*") if recursive else directory.iterdir()
    return sorted(p.absolute() for p in found if p.is_file() and is_fits_file(p))


def cmd_batch(args: argparse.Namespace) -> int:
    """Forced photometry of a source list over the FITS images of a directory, into one CSV.

    A file that cannot be measured gets one line on standard error and is skipped."""
    from tqdm import tqdm

    from ese_assets.core.catalog import load_catalog
    from ese_assets.core.fits_image import load_image
    from ese_assets.pipeline.measurement import photometry_rows

    directory = Path(args.image_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"--image-dir {directory} is not a directory")
    sources = load_catalog(args.source_list)  # name, ra, dec (any catalog columns and units)
    files = image_files(directory, args.recursive)
    if not files:
        raise FileNotFoundError(f"no FITS files in {directory}")
    frames, skipped = [], 0
    now = time.time()
    with tqdm(files, unit="image", file=sys.stderr, disable=args.quiet) as bar:
        for path in bar:
            try:
                image = load_image(path)
                rows = photometry_rows(image, sources, now=now)
            except (ValueError, OSError) as exc:  # ImageError names the file; OSError may not
                text = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
                bar.write(f"ese photometry batch: skipped {text}", file=sys.stderr)
                skipped += 1
                continue
            frames.append(output_frame(rows))
    result = pd.concat(frames, ignore_index=True) if frames else output_frame(_empty_rows())
    result = result.sort_values(["source_id", "mjd"], kind="mergesort")
    result.to_csv(args.output, index=False, float_format="%.10g")
    print(
        f"wrote {len(result)} measurements of {result['source_id'].nunique()} of "
        f"{len(sources)} sources in {len(frames)} images to {args.output}"
        + (f" ({skipped} files skipped)" if skipped else "")
    )
    return 1 if not frames else 0


def _empty_rows() -> pd.DataFrame:
    return pd.DataFrame(
        {c: pd.Series(dtype=float) for c in OUTPUT_COLUMNS if c not in ("flux_mjy", "flux_err_mjy")}
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``ese photometry nvss`` and ``ese photometry batch``."""
    from ese_assets.cli import _add_db

    p = sub.add_parser("photometry", help="forced photometry of FITS images (the seed's CLI)")
    psub = p.add_subparsers(dest="photometry_command", required=True)

    n = psub.add_parser("nvss", help="measure the catalog sources in one image's field")
    n.add_argument("--fits", required=True, help="FITS image")
    n.add_argument(
        "--min-mjy", type=float, default=0.0, help="catalog flux threshold, mJy (default 0)"
    )
    n.add_argument("--radius-deg", type=float, help="only sources this close to the image centre")
    n.add_argument("--catalog", help="source catalog (default: $ESE_CATALOG or $MASTER_SOURCES_DB)")
    n.add_argument("--output", help="CSV file to write (default: a table on standard output)")
    n.add_argument(
        "--store",
        action="store_true",
        help="also record the image and its measurements in the products database, as the "
        "pipeline does (statistics of its night updated)",
    )
    n.add_argument(
        "--detect-ese", action="store_true", help="with --store: run the detection on them"
    )
    _add_db(n)
    n.set_defaults(func=cmd_nvss)

    b = psub.add_parser("batch", help="measure a source list in every FITS image of a directory")
    b.add_argument("--source-list", required=True, help="CSV of name, ra, dec (degrees)")
    b.add_argument("--image-dir", required=True, help="directory of FITS images")
    b.add_argument("--output", required=True, help="CSV file to write")
    b.add_argument("--recursive", action="store_true", help="also the sub-directories' images")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument(
        "--products-db", help="accepted for the seed's command line; batch writes only --output"
    )
    b.set_defaults(func=cmd_batch)
