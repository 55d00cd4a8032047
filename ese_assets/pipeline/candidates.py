"""Candidates: the detection rules and the candidate workflow applied to ``ese_candidates``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
from sqlalchemy import Engine

from ese_assets.core.candidates import plan_candidate_changes
from ese_assets.core.detection import DetectionSettings, flag_candidates
from ese_assets.storage import candidates as candidates_db
from ese_assets.storage import statistics as statistics_db


@dataclass
class DetectionSummary:
    flagged: pd.DataFrame  # one row per flagged source (core.detection.flag_candidates)
    inserted: int
    updated: int


def detect_candidates(
    engine: Engine,
    settings: DetectionSettings,
    *,
    source_ids: Sequence[str] | None = None,
    night: str | None = None,
    now: float | None = None,
) -> DetectionSummary:
    """Flag sources whose statistics pass the detection rules and update ``ese_candidates``.

    ``source_ids=None`` examines every source with statistics. Re-running is idempotent: open
    candidates are updated in place, dismissed ones stay dismissed unless their significance grew.
    """
    now = time.time() if now is None else now
    stats = statistics_db.variability_stats(engine, source_ids=source_ids)
    flagged = (
        flag_candidates(stats, settings)
        if not stats.empty
        else pd.DataFrame(
            columns=[
                "source_id",
                "significance",
                "flag_type",
                "sigma_deviation",
                "dip_significance",
            ]
        )
    )
    if flagged.empty:
        return DetectionSummary(flagged, 0, 0)
    existing = candidates_db.existing_candidates(engine, flagged["source_id"].tolist())
    inserts, updates = plan_candidate_changes(flagged, existing, night=night, now=now)
    candidates_db.apply_candidate_changes(engine, inserts, updates)
    return DetectionSummary(flagged, len(inserts), len(updates))
