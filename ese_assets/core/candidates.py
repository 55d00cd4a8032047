"""The ESE candidate workflow as pure functions (no database): statuses and their transitions.

A flagged source gets one ``active`` candidate. People move it to ``investigated`` or
``dismissed``; ``active`` and ``investigated`` are *open* (at most one open candidate per source,
also enforced by a partial unique index in the database). Each detection run updates the open
candidate of every flagged source in place; a dismissed candidate stays dismissed unless the
source's significance grows to :data:`REGROW_FACTOR` times the dismissed one (a new ``active``
row whose notes say why), so a person's decision is respected until the signal changes.
"""

from __future__ import annotations

import datetime as dt

import pandas as pd

from ese_assets.core.values import py_scalar

#: Every candidate status (the database CHECK constraint is generated from this tuple).
CANDIDATE_STATUSES = ("active", "investigated", "dismissed")

#: Status of a newly flagged candidate.
NEW_STATUS = "active"

#: Statuses that count as open: at most one open candidate per source.
OPEN_STATUSES = ("active", "investigated")

#: Statuses a person may set on an open candidate.
REVIEW_STATUSES = ("investigated", "dismissed")

#: A dismissed candidate is re-opened when significance >= REGROW_FACTOR x the dismissed one.
REGROW_FACTOR = 1.25

#: ``flagged_by`` of candidates created by the pipeline.
AUTO_FLAGGER = "auto"

_FLAGGED_COLUMNS = ["source_id", "significance", "flag_type", "sigma_deviation", "dip_significance"]


def check_status(status: str, allowed: tuple[str, ...] = CANDIDATE_STATUSES) -> str:
    """``status`` if it is one of ``allowed``, else ValueError naming the valid ones."""
    if status not in allowed:
        raise ValueError(f"invalid candidate status {status!r}; expected one of {list(allowed)}")
    return status


def review_update(
    status: str, *, old_notes: str | None, notes: str | None, by: str, now: float
) -> dict:
    """Column values that record a person setting an open candidate to ``status``.

    ``status`` must be one of :data:`REVIEW_STATUSES` (new candidates are ``active``). Sets
    ``investigated_at`` or ``dismissed_at`` to ``now`` (Unix seconds) and appends the line
    ``"<UTC time> <by>: <status>[: <notes>]"`` to the notes (an audit trail of who changed what).
    """
    if status not in REVIEW_STATUSES:
        raise ValueError(
            f"invalid candidate status {status!r}: a candidate can be set to "
            f"{' or '.join(repr(s) for s in REVIEW_STATUSES)} "
            f"(new candidates are {NEW_STATUS!r})"
        )
    stamp = dt.datetime.fromtimestamp(now, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    line = f"{stamp} {by}: {status}" + (f": {notes}" if notes else "")
    values = {"status": status, "notes": f"{old_notes}\n{line}" if old_notes else line}
    values["investigated_at" if status == "investigated" else "dismissed_at"] = now
    return values


def _latest_night(previous, night: str | None) -> str | None:
    """The later of two ``YYYY-MM-DD`` nights (ISO dates sort as strings); None/NaN ignored."""
    known = [n for n in (previous, night) if isinstance(n, str) and n]
    return max(known) if known else None


def plan_candidate_changes(
    flagged: pd.DataFrame,
    existing: pd.DataFrame | None,
    *,
    night: str | None,
    now: float,
    regrow_factor: float = REGROW_FACTOR,
) -> tuple[list[dict], list[dict]]:
    """Decide candidate-table inserts and updates for this night's flagged sources.

    ``flagged``: output of :func:`ese_assets.core.detection.flag_candidates`. ``existing``: all
    ``ese_candidates`` rows of the flagged sources, columns ``id, source_id, status, significance``
    and optionally ``last_night`` (may be empty or None). Per flagged source:

    * an open candidate exists -> update it: keys ``id, significance, flag_type, sigma_deviation,
      dip_significance, last_night``; the status is left alone (an investigated candidate stays
      investigated). ``last_night`` is the latest night that confirmed the candidate, so re-running
      an older night (a backfill) does not move it backwards. Should several open rows exist
      (legacy data), the most recent one (largest id) is updated.
    * no open candidate, the most recent row (largest id) is dismissed -> nothing, unless
      ``significance >= regrow_factor * dismissed significance``; then insert a new active row whose
      notes say why.
    * no candidate rows -> insert ``source_id, flagged_at=now, flagged_by="auto", significance,
      flag_type, status="active", night, last_night=night, sigma_deviation, dip_significance,
      notes=None``.

    Sources not flagged tonight are left alone (people resolve open candidates). Idempotent: after
    the inserts are applied, planning the same flagged set again yields only updates with the same
    values. Returns ``(inserts, updates)``, lists of dicts of plain Python values (NaN -> None).
    """
    if not regrow_factor > 0:
        raise ValueError(f"regrow_factor must be > 0, got {regrow_factor!r}")
    inserts: list[dict] = []
    updates: list[dict] = []
    if flagged is None or len(flagged) == 0:
        return inserts, updates
    flagged = flagged[_FLAGGED_COLUMNS].drop_duplicates("source_id", keep="last")
    flagged = flagged.assign(source_id=flagged["source_id"].astype(object))

    if existing is None or len(existing) == 0:
        existing = pd.DataFrame(
            {
                "id": pd.Series([], dtype="int64"),
                "source_id": pd.Series([], dtype=object),
                "status": pd.Series([], dtype=object),
                "significance": pd.Series([], dtype="float64"),
            }
        )
    if "last_night" not in existing:
        existing = existing.assign(last_night=None)
    ex = existing[["id", "source_id", "status", "significance", "last_night"]].copy()
    ex["source_id"] = ex["source_id"].astype(object)
    ex = ex.sort_values("id", kind="stable")
    is_open = ex["status"].isin(OPEN_STATUSES)
    # Most recent open row per source, and most recent row of any status per source.
    open_rows = ex[is_open].drop_duplicates("source_id", keep="last")
    latest = ex.drop_duplicates("source_id", keep="last")

    merged = flagged.merge(
        open_rows[["source_id", "id", "last_night"]].rename(
            columns={"id": "open_id", "last_night": "open_last_night"}
        ),
        on="source_id",
        how="left",
    ).merge(
        latest[["source_id", "id", "status", "significance"]].rename(
            columns={"id": "latest_id", "status": "latest_status", "significance": "latest_sig"}
        ),
        on="source_id",
        how="left",
    )
    has_open = merged["open_id"].notna()
    has_any = merged["latest_id"].notna()
    # No open row but some rows: every row is dismissed (the only status that is not open).
    regrow = has_any & ~has_open & (merged["significance"] >= regrow_factor * merged["latest_sig"])
    insert = ~has_any | regrow

    for rec in merged[has_open].to_dict("records"):
        updates.append(
            {
                "id": int(rec["open_id"]),
                "significance": py_scalar(rec["significance"]),
                "flag_type": py_scalar(rec["flag_type"]),
                "sigma_deviation": py_scalar(rec["sigma_deviation"]),
                "dip_significance": py_scalar(rec["dip_significance"]),
                "last_night": _latest_night(rec["open_last_night"], night),
            }
        )

    for rec, again in zip(merged[insert].to_dict("records"), regrow[insert], strict=True):
        notes = None
        if again:
            notes = (
                f"re-flagged after dismissal: significance {rec['significance']:.2f} >= "
                f"{regrow_factor:g} x {rec['latest_sig']:.2f} of dismissed candidate "
                f"id {int(rec['latest_id'])}"
            )
        inserts.append(
            {
                "source_id": py_scalar(rec["source_id"]),
                "flagged_at": float(now),
                "flagged_by": AUTO_FLAGGER,
                "significance": py_scalar(rec["significance"]),
                "flag_type": py_scalar(rec["flag_type"]),
                "status": NEW_STATUS,
                "night": night,
                "last_night": night,
                "sigma_deviation": py_scalar(rec["sigma_deviation"]),
                "dip_significance": py_scalar(rec["dip_significance"]),
                "notes": notes,
            }
        )
    return inserts, updates
