"""``ese detect-lightcurves FILE``: ESE detection on a measurement table from any pipeline;
``ese detect-lightcurves --db``: the same on the pipeline's products database
(:func:`ese_assets.lightcurves_products.detect_in_products`, read-only).

Reads CSV, Parquet, FITS or VOTable (:func:`ese_assets.lightcurves.read_measurements`), runs
:func:`ese_assets.lightcurves.detect_in_lightcurves` and writes one row per source (CSV, or
Parquet / FITS / VOTable by the output's suffix), or prints the flagged sources when no output
is given. A summary line (sources, flagged, thresholds, expected false candidates) goes to
stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from ese_assets.core import ese_template
from ese_assets.core.variability import DEFAULT_FLUX_SCALE_ERROR


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``detect-lightcurves`` to the ``ese`` sub-command parsers."""
    p = sub.add_parser(
        "detect-lightcurves",
        help="find ESEs in a table of measurements from any pipeline (CSV, Parquet, FITS, VOTable)",
        description=(
            "Columns: source_id, mjd, flux, flux_err[, image_id] (mJy; the VAST pipeline's "
            "source, time, flux_peak, flux_peak_err, image_id work as they are). With an image "
            "id column the per-image flux-scale calibration is applied first."
        ),
    )
    p.add_argument("file", nargs="?", help="measurement table (.csv, .parquet, .fits, .xml/.vot)")
    p.add_argument(
        "--db",
        action="store_true",
        help="read the pipeline's products database instead of a file (usable rows, fluxes as "
        "ESE_FLUX_SCALE and ESE_EXCLUDE_FLAGS say; nothing is written)",
    )
    p.add_argument(
        "--products-db",
        help="with --db (implied): SQLite path or SQLAlchemy URL (default: $PIPELINE_PRODUCTS_DB)",
    )
    p.add_argument(
        "--source-id",
        action="append",
        help="with --db: only this source (repeat for more; default: every measured source)",
    )
    p.add_argument(
        "--output",
        "-o",
        help="write every source's row here (.csv, .parquet, .fits, .xml); default: print the "
        "flagged sources as CSV",
    )
    p.add_argument(
        "--catalog",
        help="table with source_id and catalog flux_mjy (the baseline prior), any readable format",
    )
    p.add_argument(
        "--no-calibration",
        action="store_true",
        help="do not apply the per-image calibration even when image ids are present",
    )
    p.add_argument(
        "--flux-scale-error",
        type=float,
        default=DEFAULT_FLUX_SCALE_ERROR,
        help="fractional flux-scale error added in quadrature per epoch (default %(default)g)",
    )
    p.add_argument(
        "--fap",
        type=float,
        default=ese_template.DEFAULT_FAP_PER_SOURCE,
        help="false-alarm probability per source of the thresholds (default %(default)g)",
    )
    p.add_argument(
        "--simulations",
        type=int,
        default=ese_template.DEFAULT_N_SIMULATIONS,
        help="null simulations of the false-alarm calibration (default %(default)d)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulations")
    p.set_defaults(func=cmd_detect_lightcurves)


def _write(frame: pd.DataFrame, path: Path) -> None:
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        frame.to_parquet(path, index=False)
    elif name.endswith((".fits", ".fit", ".xml", ".vot", ".votable")):
        from astropy.table import Table

        table = Table.from_pandas(
            frame.astype({c: str for c in frame.columns if frame[c].dtype == object})
        )
        table.write(path, format="fits" if ".fit" in name else "votable", overwrite=True)
    else:
        frame.to_csv(path, index=False)


def _detect_in_products(args: argparse.Namespace):
    """``(result, run)`` of ``--db``: on the products database of the settings."""
    import dataclasses

    from ese_assets.cli_candidates import open_products_db
    from ese_assets.lightcurves_products import detect_in_products
    from ese_assets.settings import Settings

    if args.catalog or args.no_calibration:
        raise ValueError(
            "--catalog and --no-calibration are for files (--db uses the catalog flux and the "
            "calibration stored in the database)"
        )
    settings = Settings.from_env()
    if args.products_db:
        settings = dataclasses.replace(settings, products_db=str(args.products_db))
    engine = open_products_db(settings.products_db)  # a read command: never creates one
    result, run = detect_in_products(
        engine,
        args.source_id,
        exclude_flags=settings.exclude_flags,
        flux_scale=settings.flux_scale,
        flux_scale_error=args.flux_scale_error,
        n_simulations=args.simulations,
        fap_per_source=args.fap,
        seed=args.seed,
        return_run=True,
    )
    return result, run


def cmd_detect_lightcurves(args: argparse.Namespace) -> int:
    from ese_assets.lightcurves import detect_in_lightcurves, read_measurements

    from_db = args.db or bool(args.products_db)
    if from_db == bool(args.file):
        raise ValueError("give a measurement FILE or --db / --products-db (one of them)")
    if args.source_id and not from_db:
        raise ValueError("--source-id is for --db")
    if from_db:
        result, run = _detect_in_products(args)
        return _report(result, run, args)
    path = Path(args.file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        table = read_measurements(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: cannot read the table ({exc})") from exc
    catalog = None
    if args.catalog:
        cat = read_measurements(args.catalog)
        lower = {c.lower(): c for c in cat.columns}
        sid = lower.get("source_id") or lower.get("source")
        flux = lower.get("flux_mjy") or lower.get("catalog_flux_mjy") or lower.get("flux")
        if sid is None or flux is None:
            raise ValueError(f"{args.catalog}: needs source_id and flux_mjy columns")
        catalog = pd.Series(cat[flux].to_numpy(dtype=float), index=cat[sid].astype(str))
    try:
        result, run = detect_in_lightcurves(
            table,
            catalog_flux_mjy=catalog,
            flux_scale_error=args.flux_scale_error,
            calibrate=not args.no_calibration,
            n_simulations=args.simulations,
            fap_per_source=args.fap,
            seed=args.seed,
            return_run=True,
        )
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return _report(result, run, args)


def _report(result: pd.DataFrame, run, args: argparse.Namespace) -> int:
    """The summary line on stderr, then every row to ``--output`` or the flagged ones to stdout."""
    flagged = result[result["flag"]]
    cal = run.calibration
    print(
        f"{len(result)} sources, {len(flagged)} flagged "
        f"({', '.join(f'{k} {v}' for k, v in flagged['flag_type'].value_counts().items())}); "
        f"thresholds dchi2_const >= {cal.threshold_const:.1f}, ese_stat >= "
        f"{cal.threshold_ese:.1f} (FAP {cal.fap_per_source:g} per source); expected false "
        f"candidates {run.expected_false_candidates:.3g}; {run.n_excluded} of "
        f"{run.n_measurements} measurements left out",
        file=sys.stderr,
    )
    if args.output:
        _write(result, Path(args.output))
    else:
        flagged.to_csv(sys.stdout, index=False)
    return 0
