"""``ese candidates list|show|investigate|dismiss|reopen|runs|undo`` and ``ese mark``: the
candidate workflow on the command line (registered by :mod:`ese_assets.cli`).

``ese candidates`` with no action lists (as before), and ``ese mark ID investigated|dismissed``
is kept for compatibility. Every change is recorded in ``ese_candidate_history`` with who made
it (``--by``, default: the login name). Read commands open an existing products database only
(:func:`open_products_db`): a wrong path says so instead of creating an empty database.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import sys
from typing import TYPE_CHECKING, Any

from ese_assets.core.candidates import CANDIDATE_STATUSES, OPEN_STATUSES, REVIEW_STATUSES
from ese_assets.core.values import py_scalar
from ese_assets.settings import Settings

if TYPE_CHECKING:  # pandas and SQLAlchemy are imported when a command runs, not for `ese --help`
    import pandas as pd
    from sqlalchemy import Engine

#: How to point the CLI at a products database, appended to "does not exist".
DB_HINT = (
    "set PIPELINE_PRODUCTS_DB or pass --products-db (after `make demo`: "
    "source data/demo/demo.env), or create one with `make demo` or `ese ingest DIR`"
)

#: Columns of ``ese candidates list`` (table format).
LIST_COLUMNS = (
    "id",
    "source_id",
    "status",
    "significance",
    "flag_type",
    "n_obs",
    "mean_flux_mjy",
    "chi2_nu",
    "night",
    "last_night",
)
#: variability_stats columns shown by ``ese candidates show``.
SHOW_STATS = (
    "ra_deg",
    "dec_deg",
    "nvss_flux_mjy",
    "n_obs",
    "first_mjd",
    "last_mjd",
    "mean_flux_mjy",
    "std_flux_mjy",
    "median_flux_mjy",
    "robust_std_mjy",
    "chi2_nu",
    "eta_metric",
    "v_index",
    "sigma_deviation",
    "dip_significance",
    "dip_start_mjd",
    "dip_end_mjd",
    "dip_n_epochs",
    "dip_depth_frac",
)


def open_products_db(products_db: str) -> Engine:
    """The engine of an existing products database; FileNotFoundError (one line, with
    :data:`DB_HINT`) when it does not exist or has no pipeline tables. Nothing is created."""
    from ese_assets.storage.engine import open_existing

    try:
        return open_existing(products_db)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}; {DB_HINT}") from None


def default_user() -> str:
    """Who makes a change when ``--by`` is not given: the login name."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (a container without a passwd entry)
        return "user"


def utc(seconds: Any) -> str:
    """Unix seconds as ``YYYY-MM-DDTHH:MM:SSZ`` ('' when missing)."""
    value = py_scalar(seconds)
    if value is None:
        return ""
    return dt.datetime.fromtimestamp(float(value), tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _engine(args: argparse.Namespace) -> Engine:
    settings = Settings.from_env()
    return open_products_db(getattr(args, "products_db", None) or settings.products_db)


def _records(df: pd.DataFrame) -> list[dict]:
    return [{k: py_scalar(v) for k, v in row.items()} for row in df.to_dict("records")]


def _print_frame(df: pd.DataFrame, fmt: str, empty: str) -> None:
    import pandas as pd

    if fmt == "json":
        print(json.dumps(_records(df), indent=2))
    elif fmt == "csv":
        sys.stdout.write(df.to_csv(index=False))
    elif df.empty:
        print(empty)
    else:
        with pd.option_context("display.width", 200, "display.max_columns", 30):
            print(df.to_string(index=False))


def cmd_list(args: argparse.Namespace) -> int:
    from ese_assets.storage import candidates as candidates_db

    status = {"open": OPEN_STATUSES, "all": None}.get(args.status, (args.status,))
    df = candidates_db.candidates(_engine(args), status=status)
    if args.flag_type:
        df = df[df["flag_type"].str.split("+").map(lambda rules: args.flag_type in rules)]
    if args.min_significance is not None:
        df = df[df["significance"] >= args.min_significance]
    if args.night:
        first = df["night"].fillna(df["last_night"])
        df = df[(first <= args.night) & (df["last_night"].fillna(first) >= args.night)]
    if args.limit:
        df = df.head(args.limit)
    if args.format == "table":
        df = df[[c for c in LIST_COLUMNS if c in df.columns]]
    _print_frame(df.reset_index(drop=True), args.format, f"no {args.status} candidates")
    return 0


def _number(value: Any, spec: str = ".2f") -> str:
    value = py_scalar(value)
    return "-" if value is None else format(value, spec) if isinstance(value, float) else str(value)


def _history_lines(history: pd.DataFrame) -> list[str]:
    lines = []
    for h in history.itertuples(index=False):
        old = h.old_status if isinstance(h.old_status, str) else "(new)"
        new = h.new_status if isinstance(h.new_status, str) else "(removed)"
        run = f" [run {h.run_id}]" if isinstance(h.run_id, str) else ""
        note = f": {h.note}" if isinstance(h.note, str) and h.note else ""
        lines.append(
            f"  {utc(h.changed_at)}  candidate {h.candidate_id}  {old} -> {new}  "
            f"by {h.changed_by}{run}{note}"
        )
    return lines


def cmd_show(args: argparse.Namespace) -> int:
    from ese_assets.storage import candidate_history as history_db
    from ese_assets.storage import candidates as candidates_db
    from ese_assets.storage import statistics as statistics_db

    engine = _engine(args)
    rows = candidates_db.candidates(engine, source_ids=[args.source_id]).sort_values("id")
    stats = statistics_db.variability_stats(engine, source_ids=[args.source_id])
    history = history_db.candidate_history(engine, source_ids=[args.source_id])
    if rows.empty and stats.empty and history.empty:
        print(f"ese candidates show: no source {args.source_id!r}", file=sys.stderr)
        return 1
    statistics = {c: py_scalar(stats.iloc[0][c]) for c in SHOW_STATS} if len(stats) else None
    if args.format == "json":
        cand_columns = [c for c in rows.columns if c not in SHOW_STATS]
        out = {
            "source_id": args.source_id,
            "candidates": _records(rows[cand_columns]),
            "statistics": statistics,
            "history": _records(history),
        }
        print(json.dumps(out, indent=2))
        return 0
    print(f"source {args.source_id}")
    if rows.empty:
        print("  no candidate")
    for r in rows.itertuples(index=False):
        nights = "..".join(n if isinstance(n, str) else "-" for n in (r.night, r.last_night))
        print(
            f"candidate {r.id}: {r.status}, {r.flag_type}, significance {r.significance:.2f} "
            f"(sigma_deviation {_number(r.sigma_deviation)}, dip_significance "
            f"{_number(r.dip_significance)}); flagged {utc(r.flagged_at)} by {r.flagged_by}, "
            f"nights {nights}"
        )
        if isinstance(r.notes, str) and r.notes:
            print("  notes: " + r.notes.replace("\n", "\n         "))
    print("statistics:" if statistics else "statistics: none")
    for key, value in (statistics or {}).items():
        print(f"  {key:18s} {_number(value, '.6g')}")
    print("history:" if len(history) else "history: none")
    for line in _history_lines(history):
        print(line)
    return 0


def _change(args: argparse.Namespace, status: str) -> int:
    from ese_assets.storage import candidates as candidates_db

    engine = _engine(args)
    if status == "active":
        cid = candidates_db.reopen_candidate(engine, args.source_id, notes=args.note, by=args.by)
    else:
        cid = candidates_db.set_candidate_status(
            engine, args.source_id, status, notes=args.note, by=args.by
        )
    print(f"{args.source_id}: candidate {cid} {status} (by {args.by})")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from ese_assets.storage import candidate_history as history_db

    runs = history_db.detection_runs(_engine(args), limit=args.limit)
    if args.format == "table":
        runs = runs.assign(
            first_change_at=runs["first_change_at"].map(utc),
            last_change_at=runs["last_change_at"].map(utc),
        )
    _print_frame(runs, args.format, "no run has changed candidates yet")
    return 0


def cmd_undo(args: argparse.Namespace) -> int:
    from ese_assets.pipeline.candidates import undo_detection

    undo_id, actions = undo_detection(_engine(args), args.run_id, by=args.by, dry_run=args.dry_run)
    verb = {"remove": "remove", "restore": "restore", "recreate": "re-create", "skip": "keep"}
    for a in actions:
        values = a.values or {}
        if a.kind == "skip":
            state = f"{a.source_id}, {a.status}" if a.status else a.source_id
            print(f"keep candidate {a.candidate_id} ({state}): {a.note}")
            continue
        target = f" -> {values.get('status')}" if a.kind in ("restore", "recreate") else ""
        print(
            f"{'would ' if args.dry_run else ''}{verb[a.kind]} candidate {a.candidate_id} "
            f"({a.source_id}, {a.status or 'removed'}{target})"
        )
    done = [a for a in actions if a.kind != "skip"]
    kept = f"{len(actions) - len(done)} kept"
    if args.dry_run:
        print(f"dry run: {len(done)} candidates would change, {kept}; nothing written")
    elif not done:
        print(f"nothing to undo for run {args.run_id} ({kept})")
    else:
        print(
            f"undo of run {args.run_id}: {len(done)} candidates changed, {kept}; recorded as "
            f"run {undo_id} (undo it with: ese candidates undo {undo_id})"
        )
    return 0


def cmd_candidates(args: argparse.Namespace) -> int:
    action = getattr(args, "action", None) or "list"
    if action in ("investigate", "dismiss", "reopen"):
        status = {"investigate": "investigated", "dismiss": "dismissed", "reopen": "active"}
        return _change(args, status[action])
    return {"list": cmd_list, "show": cmd_show, "runs": cmd_runs, "undo": cmd_undo}[action](args)


def cmd_mark(args: argparse.Namespace) -> int:
    """``ese mark ID investigated|dismissed`` (kept for compatibility)."""
    return _change(args, args.status)


def _add_db(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    parser.add_argument(
        "--products-db",
        default=argparse.SUPPRESS if suppress else None,
        help="products database: SQLite path or SQLAlchemy URL (default: $PIPELINE_PRODUCTS_DB)",
    )


def _add_list_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """--status and --format; on the sub-commands without defaults (``suppress``), so values
    given before the action (``ese candidates --status all list``) are not overwritten."""

    def default(value: str) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--status",
        default=default("open"),
        choices=["open", *CANDIDATE_STATUSES, "all"],
        help="open = active or investigated (default: open)",
    )
    parser.add_argument("--format", choices=["table", "json", "csv"], default=default("table"))
    _add_db(parser, suppress)


def _add_change(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source_id")
    parser.add_argument("--note", "--notes", dest="note", help="why (kept in the history)")
    parser.add_argument("--by", default=default_user(), help="who decides (default: login name)")
    _add_db(parser, suppress=True)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``candidates`` (with its actions) and ``mark`` to the ``ese`` sub-command parsers."""
    p = sub.add_parser(
        "candidates",
        help="the candidate workflow: list, show, investigate, dismiss, reopen, runs, undo",
        description="ESE candidates. With no action: list (as `list`).",
    )
    _add_list_options(p, suppress=False)
    p.set_defaults(func=cmd_candidates, action=None)
    actions = p.add_subparsers(dest="action", metavar="ACTION")

    q = actions.add_parser("list", help="list candidates (default: open ones)")
    _add_list_options(q, suppress=True)
    q.add_argument("--flag-type", help="only candidates flagged by this rule (dip, spike, ...)")
    q.add_argument("--min-significance", type=float, help="only candidates at least this strong")
    q.add_argument("--night", help="only candidates flagged or confirmed around this night")
    q.add_argument("--limit", type=int, help="at most this many (most significant first)")
    p.set_defaults(flag_type=None, min_significance=None, night=None, limit=None)

    q = actions.add_parser("show", help="a source's candidates, statistics and history")
    q.add_argument("source_id")
    q.add_argument("--format", choices=["text", "json"], default="text")
    _add_db(q, suppress=True)

    for name, what in (
        ("investigate", "mark a source's open candidate investigated"),
        ("dismiss", "mark a source's open candidate dismissed"),
        ("reopen", "make a source's candidate active again (investigated, dismissed or expired)"),
    ):
        _add_change(actions.add_parser(name, help=what))

    q = actions.add_parser("runs", help="the runs that changed candidates, newest first")
    q.add_argument("--limit", type=int, default=20)
    q.add_argument("--format", choices=["table", "json", "csv"], default="table")
    _add_db(q, suppress=True)

    q = actions.add_parser(
        "undo",
        help="undo a detection run: remove the candidates it created, restore those it changed",
    )
    q.add_argument("run_id", help="run id (`ese detect` prints it; `ese candidates runs` lists)")
    q.add_argument("--dry-run", action="store_true", help="print what would change only")
    q.add_argument("--by", default=default_user(), help="who undoes (default: login name)")
    _add_db(q, suppress=True)

    p = sub.add_parser(
        "mark", help="mark a source's open candidate investigated or dismissed (as candidates ...)"
    )
    p.add_argument("source_id")
    p.add_argument("status", choices=REVIEW_STATUSES)
    p.add_argument("--notes", "--note", dest="note", help="why (kept in the history)")
    p.add_argument("--by", default=default_user(), help="who decides (default: login name)")
    _add_db(p)
    p.set_defaults(func=cmd_mark)
