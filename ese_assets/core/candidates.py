"""The ESE candidate workflow as pure functions (no database): statuses, transitions, history.

Statuses (:data:`CANDIDATE_STATUSES`):

* ``active``: flagged by detection, waiting for a person;
* ``investigated``: a person is looking at it;
* ``dismissed``: a person decided it is not an ESE;
* ``expired``: detection examined the source again and its statistics no longer pass the rules of
  that run; the row keeps the significance of the last time it qualified, and the same row becomes
  ``active`` again when the source qualifies again.

``active`` and ``investigated`` are *open*: at most one open candidate per source (also enforced
by a partial unique index in the database). Each detection run updates the open candidate of every
flagged source in place and expires the ``active`` candidates of the sources it examined that no
longer qualify (a person's ``investigated`` candidate stays until the person decides). A
dismissed candidate stays dismissed unless the source's significance grows to
:data:`REGROW_FACTOR` times the dismissed one (a new ``active`` row whose notes say why), so a
person's decision is respected until the signal changes. People move candidates with
:func:`review_update` (investigate, dismiss) and :func:`reopen_update`.

Every change of a candidate's status, and of the rule that flags it, is a :class:`Change`: one row
of the history table (who, when, old -> new status, a note, the detection run), holding the values
the candidate had before, so that a detection run can be undone (:func:`plan_undo`).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ese_assets.core.detection import DetectionSettings
from ese_assets.core.values import py_scalar

#: Every candidate status (the database CHECK constraint is generated from this tuple).
CANDIDATE_STATUSES = ("active", "investigated", "dismissed", "expired")

#: Status of a newly flagged candidate (and of a re-opened one).
NEW_STATUS = "active"

#: Statuses that count as open: at most one open candidate per source.
OPEN_STATUSES = ("active", "investigated")

#: Statuses a person may set on an open candidate.
REVIEW_STATUSES = ("investigated", "dismissed")

#: Status of a candidate whose source no longer qualifies.
EXPIRED_STATUS = "expired"

#: Open statuses that detection expires when the source no longer qualifies.
EXPIRING_STATUSES = ("active",)

#: A dismissed candidate is re-opened when significance >= REGROW_FACTOR x the dismissed one.
REGROW_FACTOR = 1.25

#: ``flagged_by`` of candidates created by the pipeline, ``changed_by`` of its history entries.
AUTO_FLAGGER = "auto"

#: Columns detection writes on an existing candidate; a history entry of a detection run keeps
#: their values before the change, which is what undoing the run restores.
DETECTION_COLUMNS = (
    "status",
    "significance",
    "flag_type",
    "sigma_deviation",
    "dip_significance",
    "last_night",
)

_FLAGGED_COLUMNS = ["source_id", "significance", "flag_type", "sigma_deviation", "dip_significance"]
_EXISTING_COLUMNS = ["id", "source_id", *DETECTION_COLUMNS]


def check_status(status: str, allowed: tuple[str, ...] = CANDIDATE_STATUSES) -> str:
    """``status`` if it is one of ``allowed``, else ValueError naming the valid ones."""
    if status not in allowed:
        raise ValueError(f"invalid candidate status {status!r}; expected one of {list(allowed)}")
    return status


def _audit_line(action: str, notes: str | None, by: str, now: float) -> str:
    stamp = dt.datetime.fromtimestamp(now, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{stamp} {by}: {action}" + (f": {notes}" if notes else "")


def review_update(
    status: str, *, old_notes: str | None, notes: str | None, by: str, now: float
) -> dict:
    """Column values that record a person setting an open candidate to ``status``.

    ``status`` must be one of :data:`REVIEW_STATUSES` (new candidates are ``active``). Sets
    ``investigated_at`` or ``dismissed_at`` to ``now`` (Unix seconds) and appends the line
    ``"<UTC time> <by>: <status>[: <notes>]"`` to the notes (the seed's audit trail; the history
    table has every change too).
    """
    if status not in REVIEW_STATUSES:
        raise ValueError(
            f"invalid candidate status {status!r}: a candidate can be set to "
            f"{' or '.join(repr(s) for s in REVIEW_STATUSES)} "
            f"(new candidates are {NEW_STATUS!r}; use reopen to make one {NEW_STATUS!r} again)"
        )
    line = _audit_line(status, notes, by, now)
    values = {"status": status, "notes": f"{old_notes}\n{line}" if old_notes else line}
    values["investigated_at" if status == "investigated" else "dismissed_at"] = now
    return values


def reopen_update(
    old_status: str, *, old_notes: str | None, notes: str | None, by: str, now: float
) -> dict:
    """Column values that record a person re-opening a candidate (back to ``active``).

    Any status but ``active`` can be re-opened (an investigated candidate goes back to the queue,
    a dismissed or expired one is open again); the notes get the line
    ``"<UTC time> <by>: reopened[: <notes>]"``.
    """
    check_status(old_status)
    if old_status == NEW_STATUS:
        raise ValueError(f"the candidate is already {NEW_STATUS!r}")
    line = _audit_line("reopened", notes, by, now)
    return {"status": NEW_STATUS, "notes": f"{old_notes}\n{line}" if old_notes else line}


@dataclass
class Change:
    """One history entry: a candidate of ``source_id`` went from ``old_status`` (None: created)
    to ``new_status`` (None: removed).

    The candidate is ``candidate_id``, or, for a candidate the plan creates, the
    ``insert_index``-th planned insert. ``previous``: the candidate's :data:`DETECTION_COLUMNS`
    before the change (a removed candidate: its whole row); ``significance`` after the change.
    """

    source_id: str
    old_status: str | None
    new_status: str | None
    note: str | None = None
    candidate_id: int | None = None
    insert_index: int | None = None
    previous: dict | None = None
    significance: float | None = None


@dataclass
class CandidatePlan:
    """What one detection run changes in ``ese_candidates`` (see :func:`plan_detection`).

    ``updates`` are dicts with ``id`` plus the columns to set; ``allowed`` maps each updated id to
    the statuses the row must still have when the update is applied (a person may have changed it
    since the plan was made: then the update is skipped); ``changes`` are the history entries.
    """

    inserts: list[dict] = field(default_factory=list)
    updates: list[dict] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    allowed: dict[int, tuple[str, ...]] = field(default_factory=dict)


def _latest_night(previous, night: str | None) -> str | None:
    """The later of two ``YYYY-MM-DD`` nights (ISO dates sort as strings); None/NaN ignored."""
    known = [n for n in (previous, night) if isinstance(n, str) and n]
    return max(known) if known else None


def _fmt(value: Any) -> str:
    value = py_scalar(value)
    return "n/a" if value is None or not math.isfinite(float(value)) else f"{float(value):.2f}"


def thresholds_text(settings: DetectionSettings) -> str:
    """The rules of a detection run in a few words (history notes, dry-run output)."""
    rules = []
    if settings.use_sigma_rule:
        rules.append(f"sigma_deviation >= {settings.min_sigma:g}")
    if settings.use_dip_rule:
        rules.append(f"|dip_significance| >= {settings.min_dip_sigma:g}")
    return f"{' or '.join(rules) or 'no rule'}, n_obs >= {settings.min_obs}"


def why_not_flagged(stats: Mapping[str, Any], settings: DetectionSettings) -> str:
    """Why a source's statistics (``n_obs``, ``sigma_deviation``, ``dip_significance``) do not
    pass the rules of ``settings`` (:func:`ese_assets.core.detection.flag_candidates`)."""
    n_obs = py_scalar(stats.get("n_obs"))
    if n_obs is None or n_obs < settings.min_obs:
        return f"n_obs {n_obs} < {settings.min_obs}"
    parts = []
    if settings.use_sigma_rule:
        parts.append(
            f"sigma_deviation {_fmt(stats.get('sigma_deviation'))} < {settings.min_sigma:g}"
        )
    if settings.use_dip_rule:
        dip = py_scalar(stats.get("dip_significance"))
        parts.append(
            f"|dip_significance| {_fmt(abs(dip) if dip is not None else None)} "
            f"< {settings.min_dip_sigma:g}"
        )
    return ", ".join(parts) or "no detection rule enabled"


def _existing_rows(existing: pd.DataFrame | None) -> list[dict]:
    """Existing candidate rows as dicts of plain values (missing optional columns: None), by id."""
    if existing is None or len(existing) == 0:
        return []
    frame = existing.assign(**{c: None for c in _EXISTING_COLUMNS if c not in existing.columns})[
        _EXISTING_COLUMNS
    ]
    rows = [{k: py_scalar(v) for k, v in r.items()} for r in frame.to_dict("records")]
    for r in rows:
        r["id"] = int(r["id"])
        r["source_id"] = str(r["source_id"])
    return sorted(rows, key=lambda r: r["id"])


def _previous(row: dict) -> dict:
    return {c: row.get(c) for c in DETECTION_COLUMNS}


def plan_detection(
    flagged: pd.DataFrame | None,
    existing: pd.DataFrame | None,
    *,
    night: str | None,
    now: float,
    examined: pd.DataFrame | None = None,
    settings: DetectionSettings | None = None,
    regrow_factor: float = REGROW_FACTOR,
) -> CandidatePlan:
    """Decide the candidate-table changes of one detection run, with their history entries.

    ``flagged``: output of :func:`ese_assets.core.detection.flag_candidates`. ``existing``: every
    ``ese_candidates`` row of the flagged and examined sources, columns ``id, source_id, status,
    significance`` and optionally ``last_night, flag_type, sigma_deviation, dip_significance``.
    ``examined``: the statistics the run looked at (``source_id, n_obs, sigma_deviation,
    dip_significance``); None: only flagged sources are considered (nothing expires).
    ``settings``: the run's rules, quoted in the history notes. Per source:

    * flagged, an open candidate exists -> update it: ``id, significance, flag_type,
      sigma_deviation, dip_significance, last_night``; the status is left alone (an investigated
      candidate stays investigated). ``last_night`` is the latest night that confirmed the
      candidate, so re-running an older night (a backfill) does not move it backwards. A change
      of ``flag_type`` is a history entry. Should several open rows exist (legacy data), the most
      recent one (largest id) is updated.
    * flagged, no open candidate, the most recent row is expired -> that row becomes ``active``
      again with the new values.
    * flagged, no open candidate, the most recent row is dismissed -> nothing, unless
      ``significance >= regrow_factor * dismissed significance``; then insert a new active row
      whose notes say why.
    * flagged, no candidate rows -> insert ``source_id, flagged_at=now, flagged_by="auto",
      significance, flag_type, status="active", night, last_night=night, sigma_deviation,
      dip_significance, notes=None``.
    * examined, not flagged, an ``active`` candidate -> ``expired`` (the history note says which
      rule values fall short). ``investigated`` candidates are a person's: left alone.

    Sources neither flagged nor examined are left alone. Idempotent: after the plan is applied,
    planning the same run again yields only updates with the same values and no history entries.
    """
    if not regrow_factor > 0:
        raise ValueError(f"regrow_factor must be > 0, got {regrow_factor!r}")
    plan = CandidatePlan()
    latest: dict[str, dict] = {}
    latest_open: dict[str, dict] = {}
    for row in _existing_rows(existing):
        latest[row["source_id"]] = row
        if row["status"] in OPEN_STATUSES:
            latest_open[row["source_id"]] = row
    rules = f" ({thresholds_text(settings)})" if settings is not None else ""

    flagged_ids: set[str] = set()
    if flagged is not None and len(flagged):
        unique = flagged[_FLAGGED_COLUMNS].drop_duplicates("source_id", keep="last")
        for rec in unique.to_dict("records"):
            sid = str(rec["source_id"])
            flagged_ids.add(sid)
            values = {k: py_scalar(rec[k]) for k in _FLAGGED_COLUMNS[1:]}
            what = f"{values['flag_type']}, significance {_fmt(values['significance'])}"
            open_row, last = latest_open.get(sid), latest.get(sid)
            if open_row is not None:
                cid = open_row["id"]
                plan.updates.append(
                    {
                        "id": cid,
                        **values,
                        "last_night": _latest_night(open_row["last_night"], night),
                    }
                )
                plan.allowed[cid] = OPEN_STATUSES
                old_type = open_row["flag_type"]
                if old_type is not None and old_type != values["flag_type"]:
                    plan.changes.append(
                        Change(
                            sid,
                            open_row["status"],
                            open_row["status"],
                            f"flag_type {old_type} -> {values['flag_type']}{rules}",
                            candidate_id=cid,
                            previous=_previous(open_row),
                            significance=values["significance"],
                        )
                    )
            elif last is not None and last["status"] == EXPIRED_STATUS:
                cid = last["id"]
                plan.updates.append(
                    {
                        "id": cid,
                        "status": NEW_STATUS,
                        **values,
                        "last_night": _latest_night(last["last_night"], night),
                    }
                )
                plan.allowed[cid] = (EXPIRED_STATUS,)
                plan.changes.append(
                    Change(
                        sid,
                        EXPIRED_STATUS,
                        NEW_STATUS,
                        f"qualifies again: {what}{rules}",
                        candidate_id=cid,
                        previous=_previous(last),
                        significance=values["significance"],
                    )
                )
            else:
                notes = None
                if last is not None:  # every row of the source is dismissed (the rest is open)
                    if not values["significance"] >= regrow_factor * last["significance"]:
                        continue
                    notes = (
                        f"re-flagged after dismissal: significance {values['significance']:.2f} "
                        f">= {regrow_factor:g} x {last['significance']:.2f} of dismissed "
                        f"candidate id {last['id']}"
                    )
                plan.changes.append(
                    Change(
                        sid,
                        None,
                        NEW_STATUS,
                        (notes or f"flagged: {what}") + rules,
                        insert_index=len(plan.inserts),
                        significance=values["significance"],
                    )
                )
                plan.inserts.append(
                    {
                        "source_id": sid,
                        "flagged_at": float(now),
                        "flagged_by": AUTO_FLAGGER,
                        "significance": values["significance"],
                        "flag_type": values["flag_type"],
                        "status": NEW_STATUS,
                        "night": night,
                        "last_night": night,
                        "sigma_deviation": values["sigma_deviation"],
                        "dip_significance": values["dip_significance"],
                        "notes": notes,
                    }
                )

    if examined is not None and len(examined):
        stats_of = {
            str(r["source_id"]): r
            for r in examined[["source_id", "n_obs", "sigma_deviation", "dip_significance"]]
            .drop_duplicates("source_id", keep="last")
            .to_dict("records")
        }
        for sid in sorted(set(stats_of) - flagged_ids):
            row = latest_open.get(sid)
            if row is None or row["status"] not in EXPIRING_STATUSES:
                continue
            why = why_not_flagged(stats_of[sid], settings) if settings is not None else ""
            plan.updates.append({"id": row["id"], "status": EXPIRED_STATUS})
            plan.allowed[row["id"]] = (row["status"],)
            plan.changes.append(
                Change(
                    sid,
                    row["status"],
                    EXPIRED_STATUS,
                    f"no longer qualifies: {why}{rules}" if why else "no longer qualifies",
                    candidate_id=row["id"],
                    previous=_previous(row),
                    significance=row["significance"],
                )
            )
    plan.updates.sort(key=lambda u: u["id"])
    return plan


def plan_candidate_changes(
    flagged: pd.DataFrame,
    existing: pd.DataFrame | None,
    *,
    night: str | None,
    now: float,
    regrow_factor: float = REGROW_FACTOR,
) -> tuple[list[dict], list[dict]]:
    """``(inserts, updates)`` of :func:`plan_detection` for the flagged sources only (nothing
    expires): lists of dicts of plain Python values (NaN -> None)."""
    plan = plan_detection(flagged, existing, night=night, now=now, regrow_factor=regrow_factor)
    return plan.inserts, plan.updates


@dataclass
class UndoAction:
    """What undoing a run does to one candidate.

    ``kind``: ``"remove"`` (the run created it), ``"restore"`` (set ``values``, the candidate's
    columns before the run), ``"recreate"`` (the run removed it: insert ``values``, its whole row,
    again) or ``"skip"`` (changed since the run: ``note`` says by whom; undo that first).
    ``status``: the candidate's status now (None: it does not exist).
    """

    kind: str
    candidate_id: int
    source_id: str
    status: str | None
    values: dict | None
    note: str


def cancelled_runs(entries: Iterable[Mapping]) -> set[str]:
    """The runs whose changes in these history entries were undone (by an undo that was not
    itself undone). An undo's entries carry the run they undid (``undoes``); read newest first,
    so the latest word on a run wins."""
    cancelled: set[str] = set()
    for entry in sorted(entries, key=lambda e: int(e["id"]), reverse=True):
        run, undoes = py_scalar(entry.get("run_id")), py_scalar(entry.get("undoes"))
        if undoes is not None and (run is None or run not in cancelled):
            cancelled.add(undoes)
    return cancelled


def _changed_after(
    entries: list[Mapping], first: Mapping, last: Mapping, cancelled: set[str]
) -> list[Mapping]:
    """Entries after a run's entries (``first`` .. ``last``) that changed the candidate since:
    not of an undone run, and not an undo of a run that came after it (such a pair cancels)."""
    first_of: dict[str, int] = {}
    for e in entries:
        first_of.setdefault(str(py_scalar(e.get("run_id"))), int(e["id"]))
    start = int(first["id"])
    later = []
    for e in entries:
        if int(e["id"]) <= int(last["id"]) or py_scalar(e.get("run_id")) in cancelled:
            continue
        undoes = py_scalar(e.get("undoes"))
        if undoes is None or first_of.get(undoes, start) < start:
            later.append(e)
    return later


def plan_undo(run_id: str, histories: Mapping[int, Iterable[Mapping]]) -> list[UndoAction]:
    """Undo one run (a detection run, or an undo), candidate by candidate.

    ``histories``: for each candidate the run changed, all its history rows (``id, run_id,
    undoes, source_id, old_status, new_status, previous, changed_by, changed_at``; ``previous`` a
    dict or None). A candidate is skipped when the run was undone already, or when it was changed
    after the run (by a person, a later run, or the undo of an earlier run), so undo never
    overwrites a later decision: undo the later run first. A later run together with its undo
    changes nothing and does not count. Otherwise the state before the run's first entry comes
    back. Returns ``list[UndoAction]`` ordered by candidate id.
    """
    actions = []
    for cid in sorted(histories):
        entries = sorted(histories[cid], key=lambda e: int(e["id"]))
        cancelled = cancelled_runs(entries)
        ours = [e for e in entries if py_scalar(e.get("run_id")) == run_id]
        sid = str(entries[0]["source_id"]) if entries else ""
        if not ours or run_id in cancelled:
            actions.append(UndoAction("skip", cid, sid, None, None, "already undone"))
            continue
        first, last = ours[0], ours[-1]
        later = _changed_after(entries, first, last, cancelled)
        now_status = py_scalar(last["new_status"])
        if later:
            newest = later[-1]
            stamp = dt.datetime.fromtimestamp(float(newest["changed_at"]), tz=dt.UTC)
            run = py_scalar(newest.get("run_id"))
            by = newest["changed_by"] + (f" (run {run})" if run else "")
            actions.append(
                UndoAction(
                    "skip",
                    cid,
                    sid,
                    py_scalar(newest["new_status"]),
                    None,
                    f"changed since by {by} at {stamp:%Y-%m-%dT%H:%M:%SZ}: "
                    f"{newest['old_status']} -> {newest['new_status']}",
                )
            )
        elif py_scalar(first["old_status"]) is None:
            actions.append(
                UndoAction("remove", cid, sid, now_status, None, f"undo of run {run_id}: removed")
            )
        elif py_scalar(first["new_status"]) is None:
            actions.append(
                UndoAction(
                    "recreate",
                    cid,
                    sid,
                    None,
                    dict(first["previous"] or {}),
                    f"undo of run {run_id}: restored",
                )
            )
        else:
            values = {k: v for k, v in (first["previous"] or {}).items() if k in DETECTION_COLUMNS}
            actions.append(
                UndoAction(
                    "restore", cid, sid, now_status, values, f"undo of run {run_id}: restored"
                )
            )
    return actions
