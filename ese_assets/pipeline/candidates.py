"""Candidates: the detection rules and the candidate workflow applied to ``ese_candidates``.

A detection run reads the statistics of the sources it examines, flags those that pass the rules
(:func:`ese_assets.core.detection.flag_candidates`), plans the candidate changes
(:func:`ese_assets.core.candidates.plan_detection`: new, updated, expired, re-opened) and writes
them with their history entries in one transaction, under its run id (the Dagster run id, or a
generated ``cli-``/``api-``/``run-`` id), which is what :func:`undo_detection` takes. A dry run
plans and writes nothing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
from sqlalchemy import Engine

from ese_assets.core.candidates import (
    EXPIRED_STATUS,
    NEW_STATUS,
    CandidatePlan,
    Change,
    UndoAction,
    plan_detection,
)
from ese_assets.core.detection import DetectionSettings, composite_score, flag_candidates
from ese_assets.core.values import py_scalar
from ese_assets.storage import candidate_history as history_db
from ese_assets.storage import candidates as candidates_db
from ese_assets.storage import statistics as statistics_db
from ese_assets.storage.access import reading

#: Fields of one candidate in the seed's ``ese-detect`` JSON output.
SEED_CANDIDATE_FIELDS = (
    "source_id",
    "ra_deg",
    "dec_deg",
    "significance",
    "nvss_flux_mjy",
    "mean_flux_mjy",
    "std_flux_mjy",
    "chi2_nu",
    "n_obs",
    "last_mjd",
    "flag_type",
)

_FLAGGED_COLUMNS = ["source_id", "significance", "flag_type", "sigma_deviation", "dip_significance"]


def new_run_id(kind: str = "cli") -> str:
    """A run id for a detection run outside Dagster: ``<kind>-<12 hex digits>``."""
    return f"{kind}-{uuid.uuid4().hex[:12]}"


@dataclass
class DetectionSummary:
    flagged: pd.DataFrame  # one row per flagged source (core.detection.flag_candidates)
    inserted: int
    updated: int
    run_id: str = ""
    dry_run: bool = False
    #: history entries written (or, in a dry run, that would be written)
    changes: list[Change] = field(default_factory=list)
    #: candidates a person changed between planning and writing: left as the person set them
    skipped: int = 0

    def count(self, old_status: str | None, new_status: str | None) -> int:
        return sum(c.old_status == old_status and c.new_status == new_status for c in self.changes)

    @property
    def expired(self) -> int:
        return sum(c.new_status == EXPIRED_STATUS for c in self.changes)

    @property
    def reopened(self) -> int:
        return self.count(EXPIRED_STATUS, NEW_STATUS)


def detect_candidates(
    engine: Engine,
    settings: DetectionSettings,
    *,
    source_ids: Sequence[str] | None = None,
    night: str | None = None,
    now: float | None = None,
    run_id: str | None = None,
    dry_run: bool = False,
) -> DetectionSummary:
    """Flag sources whose statistics pass the detection rules and update ``ese_candidates``.

    ``source_ids=None`` examines every source with statistics. Open candidates of flagged sources
    are updated in place, ``active`` candidates of examined sources that no longer qualify expire,
    expired ones that qualify again are re-opened, dismissed ones stay dismissed unless their
    significance grew. Re-running is idempotent. ``run_id`` (the Dagster run id; default: a new
    ``run-`` id) is recorded on every history entry. ``dry_run``: plan only; nothing is written.
    """
    now = time.time() if now is None else now
    run_id = run_id or new_run_id("run")
    stats = statistics_db.variability_stats(engine, source_ids=source_ids)
    flagged = (
        flag_candidates(stats, settings)
        if not stats.empty
        else pd.DataFrame(columns=_FLAGGED_COLUMNS)
    )
    if stats.empty:
        return DetectionSummary(flagged, 0, 0, run_id=run_id, dry_run=dry_run)
    ids = None if source_ids is None else stats["source_id"].tolist()
    context = reading(engine) if dry_run else candidates_db.candidates_writing(engine)
    with context as conn:
        existing = candidates_db.existing_candidates(conn, ids)
        plan: CandidatePlan = plan_detection(
            flagged, existing, night=night, now=now, examined=stats, settings=settings
        )
        if dry_run:
            changes, skipped = plan.changes, 0
        else:
            applied = candidates_db.apply_plan(conn, plan, run_id=run_id, at=now)
            changes, skipped = applied.changes, len(applied.skipped)
    n_flag_updates = len(plan.updates) - sum(
        c.candidate_id is not None and c.old_status != c.new_status for c in plan.changes
    )
    return DetectionSummary(
        flagged,
        len(plan.inserts),
        n_flag_updates,
        run_id=run_id,
        dry_run=dry_run,
        changes=changes,
        skipped=skipped,
    )


def seed_candidate_records(
    engine: Engine, flagged: pd.DataFrame, *, use_composite_scoring: bool = False
) -> list[dict]:
    """The flagged sources as the seed's ``ese-detect`` JSON records, most significant first:
    :data:`SEED_CANDIDATE_FIELDS` plus ``sigma_deviation`` and ``dip_significance`` (and the
    seed's ``composite_score`` and ``confidence`` with ``use_composite_scoring``)."""
    if flagged.empty:
        return []
    stats = statistics_db.variability_stats(engine, source_ids=flagged["source_id"].tolist())
    merged = flagged.merge(stats, on="source_id", how="left", suffixes=("", "_stats"))
    merged = merged.sort_values("significance", ascending=False, kind="mergesort")
    out = []
    for row in merged.to_dict("records"):
        item = {k: py_scalar(row.get(k)) for k in SEED_CANDIDATE_FIELDS}
        item["sigma_deviation"] = py_scalar(row.get("sigma_deviation"))
        item["dip_significance"] = py_scalar(row.get("dip_significance"))
        if use_composite_scoring:
            score, confidence = composite_score(
                row.get("sigma_deviation"), row.get("chi2_nu"), row.get("eta_metric")
            )
            item["composite_score"] = py_scalar(score)
            item["confidence"] = py_scalar(confidence)
        out.append(item)
    return out


def undo_detection(
    engine: Engine, run_id: str, *, by: str = "user", dry_run: bool = False
) -> tuple[str, list[UndoAction]]:
    """Undo detection run ``run_id`` (:func:`ese_assets.storage.candidates.undo_run`); returns
    the undo's own run id (an ``undo-`` id: it can be undone in turn) and what was done."""
    undo_id = new_run_id("undo")
    return undo_id, history_db.undo_run(engine, run_id, undo_id=undo_id, by=by, dry_run=dry_run)
