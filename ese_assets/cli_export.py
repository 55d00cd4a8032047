"""``ese export``: a source's lightcurve, or every candidate's, as CSV, JSON or VOTable.

The documents are the REST API's (:func:`ese_assets.web.export.lightcurve_document`), so a file
written here and ``GET /api/v1/sources/{id}/lightcurve?format=...`` hold the same data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ese_assets.web.export import EXPORT_FORMATS, LightcurveDocument


def document_bytes(doc: LightcurveDocument) -> bytes:
    """The document as file contents (JSON indented, text ending with a newline)."""
    if isinstance(doc.body, dict):
        return (json.dumps(doc.body, indent=2) + "\n").encode()
    if isinstance(doc.body, str):
        return doc.body.encode()
    return doc.body


def _engine_and_settings(args: argparse.Namespace):
    from ese_assets.cli import _settings
    from ese_assets.cli_candidates import open_products_db

    settings = _settings(args)
    return open_products_db(settings.products_db), settings


def export_one(args: argparse.Namespace) -> int:
    from ese_assets.web.export import lightcurve_document

    engine, settings = _engine_and_settings(args)
    doc = lightcurve_document(
        engine, args.source_id, args.format, exclude_flags=settings.exclude_flags
    )
    if doc is None:
        print(f"ese export: no measurements for source {args.source_id!r}", file=sys.stderr)
        return 1
    data = document_bytes(doc)
    if args.output:
        Path(args.output).write_bytes(data)
        print(f"wrote {doc.n_points} measurements of {args.source_id} to {args.output}")
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0


def export_candidates(args: argparse.Namespace) -> int:
    """One file per candidate source (``<source id>_lightcurve.<ext>``) in the ``--output``
    directory, with a progress bar on standard error."""
    from tqdm import tqdm

    from ese_assets.core.candidates import OPEN_STATUSES
    from ese_assets.storage import candidates as candidates_db
    from ese_assets.web.export import lightcurve_document
    from ese_assets.web.formats import download_name

    if not args.output:
        raise ValueError("--candidates needs --output DIR (one file per source is written there)")
    engine, settings = _engine_and_settings(args)
    status = {"open": OPEN_STATUSES, "all": None}.get(args.status, (args.status,))
    found = candidates_db.candidates(engine, status=status)
    ids = list(dict.fromkeys(found["source_id"]))  # most significant first, each source once
    if not ids:
        print(f"ese export: no {args.status} candidates; nothing written", file=sys.stderr)
        return 1
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_points = 0
    for source_id in tqdm(ids, unit="source", file=sys.stderr, disable=args.quiet):
        doc = lightcurve_document(
            engine, source_id, args.format, exclude_flags=settings.exclude_flags
        )
        if doc is None:  # a candidate whose photometry was removed since
            continue
        (out_dir / download_name(source_id, doc.extension)).write_bytes(document_bytes(doc))
        n_points += doc.n_points
    print(
        f"wrote the lightcurves of {len(ids)} {args.status} candidates ({n_points} measurements) "
        f"to {out_dir}/ as {args.format}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if bool(args.source_id) == bool(args.candidates):
        print("ese export: give --source-id ID or --candidates (one of them)", file=sys.stderr)
        return 2
    return export_candidates(args) if args.candidates else export_one(args)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``ese export``."""
    from ese_assets.cli import _add_db
    from ese_assets.core.candidates import CANDIDATE_STATUSES

    p = sub.add_parser(
        "export", help="export a source's lightcurve, or every candidate's, as CSV, JSON or VOTable"
    )
    p.add_argument("--source-id", help="the source to export")
    p.add_argument(
        "--candidates",
        action="store_true",
        help="export the lightcurve of every candidate (--status) into the --output directory",
    )
    p.add_argument(
        "--status",
        choices=["open", *CANDIDATE_STATUSES, "all"],
        default="open",
        help="with --candidates: which candidates (default: open)",
    )
    p.add_argument("--format", choices=list(EXPORT_FORMATS), default="csv")
    p.add_argument(
        "--output",
        help="file to write (default: standard output); with --candidates a directory",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar (--candidates)")
    _add_db(p)
    p.set_defaults(func=cmd_export)
