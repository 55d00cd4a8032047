"""``ese``: command line interface.

Subcommands: ``simulate``, ``ingest``, ``detect``, ``export``, ``candidates``, ``mark``, ``plot``,
``photometry``, ``demo``.
Options default to the environment (``PIPELINE_PRODUCTS_DB``, ``ESE_CATALOG``...); see README.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ese_assets import cli_candidates, cli_export, cli_lightcurves, cli_photometry
from ese_assets.cli_candidates import open_products_db
from ese_assets.core.detection import (
    DEFAULT_ETA_V_SIGMA,
    DEFAULT_MIN_DIP_SIGMA,
    DEFAULT_MIN_OBS,
    DEFAULT_PRESET,
    PRESETS,
    DetectionSettings,
    eta_v_flags,
    resolve_min_sigma,
    sigma_rule_requested,
)
from ese_assets.settings import Settings

if TYPE_CHECKING:  # the simulator (and astropy.wcs) is imported only by `ese simulate`
    from ese_assets.core.simulate import SurveyConfig, SurveyManifest


def _settings(args: argparse.Namespace) -> Settings:
    """Environment settings, overridden by ``--products-db`` / ``--catalog`` when given."""
    settings = Settings.from_env()
    overrides = {}
    if getattr(args, "products_db", None):
        overrides["products_db"] = str(args.products_db)
    if getattr(args, "catalog", None):
        overrides["catalog_path"] = str(Path(args.catalog).expanduser().resolve())
    return dataclasses.replace(settings, **overrides)


def _add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--products-db",
        help="products database: SQLite path or SQLAlchemy URL (default: $PIPELINE_PRODUCTS_DB)",
    )


def add_simulate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``ese simulate`` options (defaults = :class:`SurveyConfig` defaults)."""
    from ese_assets.core.simulate import SurveyConfig

    d = SurveyConfig()
    add = parser.add_argument
    add("--out-dir", default="data/demo", help="output directory (default: %(default)s)")
    add("--seed", type=int, default=d.seed)
    add("--nights", type=int, default=d.n_nights, help="number of nights")
    add("--images-per-night", type=int, default=d.images_per_night)
    add("--start-date", default=d.start_date, help="first night, YYYY-MM-DD (UTC)")
    add("--npix", type=int, default=d.npix, help="image size in pixels (square)")
    add("--n-sources", type=int, default=d.n_sources)
    add("--n-variables", type=int, default=d.n_variables)
    add("--n-ese", type=int, default=d.n_ese, help="number of injected ESEs")
    add("--rms-mjy", type=float, default=d.rms_mjy, help="image noise, mJy/beam")
    add("--flux-scale-error", type=float, default=d.flux_scale_error)
    add("--cube-fraction", type=float, default=d.cube_fraction)
    add("--jitter-arcmin", type=float, default=d.pointing_jitter_arcmin)
    add(
        "--stable-only",
        action="store_true",
        help="no variables, no ESEs, no flux-scale error (unbiasedness checks)",
    )
    add("--overwrite", action="store_true", help="replace an existing simulation")
    add("--quiet", action="store_true", help="no progress output")
    return parser


def survey_config_from_args(args: argparse.Namespace) -> SurveyConfig:
    """The SurveyConfig of parsed ``ese simulate`` arguments."""
    from ese_assets.core.simulate import SurveyConfig

    config = SurveyConfig(
        seed=args.seed,
        n_nights=args.nights,
        images_per_night=args.images_per_night,
        start_date=args.start_date,
        npix=args.npix,
        n_sources=args.n_sources,
        n_variables=args.n_variables,
        n_ese=args.n_ese,
        rms_mjy=args.rms_mjy,
        flux_scale_error=args.flux_scale_error,
        cube_fraction=args.cube_fraction,
        pointing_jitter_arcmin=args.jitter_arcmin,
    )
    return config.without_variability() if args.stable_only else config


def run_simulate(args: argparse.Namespace) -> SurveyManifest:
    """Run ``ese simulate``: progress on stderr (unless --quiet), summary on stdout."""
    from ese_assets.core.simulate import simulate_survey

    def report(i: int, n: int, path: Path) -> None:
        if i == n or i % 10 == 0:
            print(
                f"\rsimulate: {i}/{n} images",
                end="\n" if i == n else "",
                file=sys.stderr,
                flush=True,
            )

    manifest = simulate_survey(
        survey_config_from_args(args),
        args.out_dir,
        overwrite=args.overwrite,
        progress=None if args.quiet else report,
    )
    print(
        f"wrote {manifest.n_images} images to {manifest.incoming_dir}, catalog "
        f"{manifest.catalog_path} ({manifest.n_sources} sources, {manifest.n_variables} "
        f"variables, {manifest.n_ese} ESEs) in {manifest.elapsed_s:.1f} s"
    )
    return manifest


def cmd_simulate(args: argparse.Namespace) -> int:
    run_simulate(args)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from ese_assets.ingest import ingest_directory

    settings = _settings(args)
    if not Path(args.directory).is_dir():
        print(f"ese ingest: {args.directory} is not a directory", file=sys.stderr)
        return 2
    report = ingest_directory(
        settings,
        args.directory,
        settle_seconds=args.settle_seconds,
        verbose=args.verbose,
        recursive=args.recursive,
    )
    failed = report.failed
    print(f"{len(report.runs)} runs, {len(failed)} failed")
    if failed:
        print(
            f"ese ingest: {len(failed)} of {len(report.runs)} runs failed (first: night "
            f"{failed[0].night}: {failed[0].error}); their images stay queued and are "
            "measured by the next `ese ingest` or sensor tick",
            file=sys.stderr,
        )
        return 1
    return 0


def _print_eta_v(engine, args: argparse.Namespace, min_obs: int) -> int:
    """``ese detect --rule eta-v``: the sources the eta-V population cut flags, as JSON; a
    comparison rule, so nothing is written to ese_candidates."""
    from ese_assets.core.values import py_scalar
    from ese_assets.storage import statistics as statistics_db

    stats = statistics_db.variability_stats(engine)
    flagged = eta_v_flags(stats, k_sigma=args.eta_v_sigma, min_obs=min_obs)
    flagged = flagged.sort_values("significance", ascending=False, kind="mergesort")
    records = [{k: py_scalar(v) for k, v in row.items()} for row in flagged.to_dict("records")]
    out = {"rule": "eta-v", "k_sigma": args.eta_v_sigma, "population": len(stats)}
    out.update(candidates_found=len(records), candidates=records, written=False)
    print(json.dumps(out, indent=2))
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    """The seed's ``ese-detect`` JSON, plus the run id (to undo the run) and the changes made;
    ``--dry-run`` plans without writing."""
    from ese_assets import pipeline
    from ese_assets.pipeline.candidates import new_run_id, seed_candidate_records
    from ese_assets.storage.engine import describe_url

    settings = _settings(args)
    if args.dry_run and args.recompute:
        raise ValueError("--dry-run cannot be combined with --recompute (recomputing writes)")
    engine = open_products_db(settings.products_db)
    detection = DetectionSettings(
        min_sigma=resolve_min_sigma(args.preset, args.min_sigma),
        min_dip_sigma=DEFAULT_MIN_DIP_SIGMA if args.min_dip_sigma is None else args.min_dip_sigma,
        min_obs=DEFAULT_MIN_OBS if args.min_obs is None else args.min_obs,
        use_sigma_rule=sigma_rule_requested(args.preset, args.min_sigma) or settings.use_sigma_rule,
    )
    ids = [args.source_id] if args.source_id else None
    if args.recompute:
        pipeline.recompute_variability(
            engine,
            ids,
            flux_scale_error=settings.flux_scale_error,
            dip_window_days=settings.dip_window_days,
            exclude_flags=settings.exclude_flags,
            bin_nights=settings.bin_nights,
            flux_scale=settings.flux_scale,
        )
    if args.rule == "eta-v":
        return _print_eta_v(engine, args, detection.min_obs)
    summary = pipeline.detect_candidates(
        engine, detection, source_ids=ids, dry_run=args.dry_run, run_id=new_run_id("cli")
    )
    found = seed_candidate_records(
        engine, summary.flagged, use_composite_scoring=args.use_composite_scoring
    )
    changes = [
        {
            "source_id": c.source_id,
            "candidate_id": c.candidate_id,
            "old_status": c.old_status,
            "new_status": c.new_status,
            "note": c.note,
        }
        for c in summary.changes
    ]
    print(
        json.dumps(
            {
                "products_db": describe_url(settings.products_db),
                "preset": args.preset,
                "min_sigma": detection.min_sigma,
                "source_id": args.source_id,
                "recompute": args.recompute,
                "candidates_found": len(found),
                "candidates": found,
                "run_id": summary.run_id,
                "dry_run": args.dry_run,
                "changes": changes,
            },
            indent=2,
        )
    )
    counts = (
        f"{summary.inserted} new, {summary.expired} expired, {summary.reopened} re-opened, "
        f"{summary.updated} updated"
    )
    if args.dry_run:
        print(f"ese detect: dry run: would change {counts}; nothing written", file=sys.stderr)
    elif summary.changes:
        print(
            f"ese detect: run {summary.run_id}: {counts}; "
            f"undo with: ese candidates undo {summary.run_id}",
            file=sys.stderr,
        )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """``ese plot SOURCE_ID`` (a lightcurve) or ``ese plot --eta-v`` (the population)."""
    from ese_assets import api, plots

    if bool(args.source_id) == bool(args.eta_v):
        print("ese plot: give a SOURCE_ID or --eta-v (one of them)", file=sys.stderr)
        return 2
    settings = _settings(args)
    engine = open_products_db(settings.products_db)  # a read command: never creates one
    if args.eta_v:
        output = args.output or "eta_v.png"
        api.plot_eta_v(engine, output)
        print(f"wrote the eta-V diagram to {output}")
        return 0
    output = args.output or plots.default_lightcurve_path(args.source_id)
    api.Source(args.source_id, engine).plot_lightcurve(
        use_normalized=args.normalized,
        highlight_baseline=not args.no_baseline,
        highlight_ese_period=not args.no_event,
        show_template=not args.no_template,
        save=True,
        outfile=output,
        exclude_flags=settings.exclude_flags,
    )
    print(f"wrote the lightcurve of {args.source_id} to {output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ese_assets.demo import run_demo

    return 0 if run_demo(args.out_dir, fresh=args.fresh) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ese", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="write a simulated survey (FITS images, catalog, truth)")
    add_simulate_arguments(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "ingest",
        help="register a directory of images and run their nights through the Dagster instance",
    )
    p.add_argument("directory")
    p.add_argument("--catalog", help="source catalog (default: $ESE_CATALOG or $MASTER_SOURCES_DB)")
    p.add_argument(
        "--settle-seconds",
        type=float,
        default=0.0,
        help="skip files modified less than this many seconds ago (default 0)",
    )
    p.add_argument("--verbose", action="store_true", help="also print Dagster's step logs")
    p.add_argument(
        "--recursive",
        action="store_true",
        help="also the FITS files of every sub-directory (e.g. one directory per night)",
    )
    _add_db(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("detect", help="flag ESE candidates; prints JSON")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="sigma_deviation threshold preset "
        f"(default {DEFAULT_PRESET} = {PRESETS[DEFAULT_PRESET]:g})",
    )
    p.add_argument("--min-sigma", type=float, default=None, help="custom sigma_deviation threshold")
    p.add_argument(
        "--min-dip-sigma",
        type=float,
        default=None,
        help="dip-statistic threshold (default: the calibrated value)",
    )
    p.add_argument("--min-obs", type=int, default=None, help="minimum number of epochs")
    p.add_argument("--source-id", help="examine only this source")
    p.add_argument(
        "--rule",
        choices=("default", "eta-v"),
        default="default",
        help="default: the dip rule (plus the seed's sigma rule when --preset/--min-sigma or "
        "ESE_USE_SIGMA_RULE=1); eta-v: print the eta-V population cut for comparison, "
        "write nothing",
    )
    p.add_argument(
        "--eta-v-sigma",
        type=float,
        default=DEFAULT_ETA_V_SIGMA,
        help="k of the eta-V cut: mean + k std of log eta and log V "
        f"(default {DEFAULT_ETA_V_SIGMA:g})",
    )
    p.add_argument(
        "--recompute",
        action="store_true",
        help="recompute variability statistics from photometry first",
    )
    p.add_argument(
        "--use-composite-scoring",
        action="store_true",
        help="add the seed's composite score and confidence to each candidate",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be flagged and what would change; write nothing",
    )
    _add_db(p)
    p.set_defaults(func=cmd_detect)

    cli_export.add_parser(sub)
    cli_candidates.add_parsers(sub)
    cli_lightcurves.add_parser(sub)
    cli_photometry.add_parsers(sub)

    p = sub.add_parser(
        "plot",
        help="plot a source's lightcurve, or the eta-V diagram of all sources (PNG or PDF)",
    )
    p.add_argument("source_id", nargs="?", help="source to plot")
    p.add_argument(
        "--eta-v",
        action="store_true",
        help="plot log eta against log V of every source, open candidates highlighted",
    )
    p.add_argument(
        "--output",
        help="file to write, .png or .pdf (default: <source_id>_lightcurve.png or eta_v.png)",
    )
    p.add_argument(
        "--normalized", action="store_true", help="plot normalized fluxes (normalized_flux_jy)"
    )
    p.add_argument("--no-baseline", action="store_true", help="do not shade the first 10 epochs")
    p.add_argument("--no-event", action="store_true", help="do not shade the detected event")
    p.add_argument(
        "--no-template",
        action="store_true",
        help="do not fit and draw the ESE template (the fit calibrates its false-alarm "
        "thresholds on the source's nights, seconds to a minute)",
    )
    _add_db(p)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("demo", help="simulate a month, run it through Dagster, compare with truth")
    p.add_argument("--out-dir", default="data/demo")
    p.add_argument("--fresh", action="store_true", help="delete --out-dir first")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Expected failures (bad input, bad settings, a database that is busy
    or unreachable) print one line and return non-zero, never a traceback."""
    from ese_assets.storage.errors import DatabaseUnavailable

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DatabaseUnavailable as exc:
        print(
            f"ese {args.command}: {exc} (nothing was lost; run the command again)", file=sys.stderr
        )
        return 3
    except (ValueError, FileNotFoundError) as exc:  # InputError is a ValueError
        print(f"ese {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
