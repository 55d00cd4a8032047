"""The reads behind the REST API and the review pages, as plain JSON-ready Python values.

Lightcurves, statistics and candidates come from the storage modules
(:mod:`ese_assets.storage.photometry`, :mod:`~ese_assets.storage.statistics`,
:mod:`~ese_assets.storage.candidates`). The one read they do not offer, a filtered page of
candidates with its total count, is SQLAlchemy Core with bound parameters here: the list must not
read every candidate to show fifty.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from astropy.time import Time
from sqlalchemy import Engine

from ese_assets.core.candidates import CANDIDATE_STATUSES, OPEN_STATUSES, check_status
from ese_assets.core.quality import DEFAULT_EXCLUDED_FLAGS, usable_measurement
from ese_assets.core.values import py_scalar
from ese_assets.storage import candidate_history as history_db
from ese_assets.storage import candidates as candidates_db
from ese_assets.storage import photometry as photometry_db
from ese_assets.storage import statistics as statistics_db
from ese_assets.storage.access import read_frame, reading
from ese_assets.storage.schema import ese_candidates
from ese_assets.storage.schema import variability_stats as stats_table

#: variability_stats columns shown with each candidate: the seed's display columns
#: (:data:`ese_assets.storage.candidates.CANDIDATE_STATS_COLUMNS`) plus what a reviewer needs to
#: judge the event: V, the baseline and the dip found (dates, epochs, depth).
CANDIDATE_EXTRA_STATS = (
    "v_index",
    "median_flux_mjy",
    "dip_start_mjd",
    "dip_end_mjd",
    "dip_n_epochs",
    "dip_depth_frac",
)
CANDIDATE_STATS = (*candidates_db.CANDIDATE_STATS_COLUMNS, *CANDIDATE_EXTRA_STATS)

#: Values of the ``status`` filter besides the statuses themselves.
STATUS_FILTERS = ("open", "all", *CANDIDATE_STATUSES)

#: The rules that can fire (``flag_type`` joins them with ``+``): core.detection's names.
#: ``sigma_deviation`` is the seed rule's name in rows flagged before it was called ``outlier``.
FLAG_RULES = ("dip", "spike", "outlier", "variable", "sigma_deviation")

#: Columns of a lightcurve data point (JSON, CSV and VOTable), in order. ``peak_jyb`` and
#: ``peak_err_jyb`` are the seed's columns, as measured; ``used`` says whether the statistics and
#: detection use the point (no excluded ``quality_flag`` bit).
LIGHTCURVE_FIELDS = (
    "mjd",
    "date_obs",
    "peak_jyb",
    "peak_err_jyb",
    "flux_mjy",
    "flux_err_mjy",
    "quality_flag",
    "used",
    "image_path",
)

_AUDIT_LINE = re.compile(
    r"^(?P<at>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) (?P<by>.+?): "
    r"(?P<status>" + "|".join(CANDIDATE_STATUSES) + r")(?:: (?P<note>.*))?$"
)


def jsonable(value: Any) -> Any:
    """A Python value JSON can carry: numpy scalars unwrapped, NaN/inf and pandas NA -> None."""
    value = py_scalar(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def records(frame: pd.DataFrame, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    cols = list(columns) if columns is not None else list(frame.columns)
    return [
        {c: jsonable(v) for c, v in zip(cols, row, strict=True)}
        for row in frame[cols].itertuples(index=False, name=None)
    ]


def mjd_to_iso(mjd: np.ndarray | Sequence[float]) -> list[str | None]:
    """UTC calendar times (ISO, milliseconds) of MJDs; None where the MJD is missing."""
    values = np.asarray(mjd, dtype=float)
    out: list[str | None] = [None] * len(values)
    ok = np.isfinite(values)
    if ok.any():
        iso = Time(values[ok], format="mjd", scale="utc").isot
        for i, text in zip(np.flatnonzero(ok), np.atleast_1d(iso), strict=True):
            out[i] = str(text)
    return out


# ------------------------------------------------------------------------------------ candidates


@dataclass(frozen=True)
class CandidateFilter:
    """Filters of the candidate list (REST API and review page alike).

    ``status``: a status, ``open`` (active or investigated) or ``all``. ``flag_type``: a rule
    (``dip``, ``spike``, ``sigma_deviation``) that must be among the rules that fired, or an exact
    ``flag_type`` such as ``sigma_deviation+dip``. ``min_significance``: significance at least
    this. ``night``: candidates the detection saw on that night (first flagged on or before it,
    last confirmed on or after it).
    """

    status: str = "all"
    flag_type: str | None = None
    min_significance: float | None = None
    night: str | None = None
    source_id: str | None = None

    def statuses(self) -> tuple[str, ...] | None:
        if self.status in (None, "", "all"):
            return None
        if self.status == "open":
            return OPEN_STATUSES
        return (check_status(self.status),)

    def where(self) -> list[sa.ColumnElement[bool]]:
        c = ese_candidates.c
        clauses: list[sa.ColumnElement[bool]] = []
        statuses = self.statuses()
        if statuses is not None:
            clauses.append(c.status.in_(statuses))
        if self.flag_type:
            rule = self.flag_type
            clauses.append(
                sa.or_(
                    c.flag_type == rule,
                    c.flag_type.like(sa.literal(rule) + "+%"),
                    c.flag_type.like("%+" + sa.literal(rule)),
                    c.flag_type.like("%+" + sa.literal(rule) + "+%"),
                )
            )
        if self.min_significance is not None:
            clauses.append(c.significance >= float(self.min_significance))
        if self.night:
            clauses.append(c.night <= self.night)
            clauses.append(sa.func.coalesce(c.last_night, c.night) >= self.night)
        if self.source_id:
            clauses.append(c.source_id == self.source_id)
        return clauses


def _candidate_select() -> sa.Select[Any]:
    join = ese_candidates.outerjoin(
        stats_table, stats_table.c.source_id == ese_candidates.c.source_id
    )
    return sa.select(ese_candidates, *(stats_table.c[col] for col in CANDIDATE_STATS)).select_from(
        join
    )


def candidate_page(
    engine: Engine, filters: CandidateFilter, *, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    """One page of candidates, most significant first (then by id), and the number matching."""
    where = filters.where()
    stmt = (
        _candidate_select()
        .where(*where)
        .order_by(ese_candidates.c.significance.desc(), ese_candidates.c.id)
        .limit(int(limit))
        .offset(int(offset))
    )
    count = sa.select(sa.func.count()).select_from(ese_candidates).where(*where)
    with reading(engine) as conn:
        total = int(conn.execute(count).scalar_one())
        frame = read_frame(conn, stmt)
    return _with_dates(records(frame)), total


def _with_dates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Calendar dates of the event window next to its MJDs (what a person reads)."""
    for key in ("dip_start", "dip_end"):
        isos = mjd_to_iso(
            [r.get(f"{key}_mjd") if r.get(f"{key}_mjd") is not None else np.nan for r in rows]
        )
        for row, iso in zip(rows, isos, strict=True):
            row[f"{key}_date"] = iso[:10] if iso else None
    return rows


def source_candidates(engine: Engine, source_id: str) -> list[dict[str, Any]]:
    """Every candidate row of one source (open and dismissed), oldest first."""
    stmt = _candidate_select().where(ese_candidates.c.source_id == source_id)
    with reading(engine) as conn:
        frame = read_frame(conn, stmt.order_by(ese_candidates.c.id))
    return _with_dates(records(frame))


def flag_types(engine: Engine) -> list[str]:
    """The distinct ``flag_type`` values in ``ese_candidates`` (for the filter menu)."""
    with reading(engine) as conn:
        rows = conn.execute(
            sa.select(ese_candidates.c.flag_type).distinct().order_by(ese_candidates.c.flag_type)
        )
        return [r[0] for r in rows]


def status_history(engine: Engine, candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Status changes of a source's candidates, oldest first, from ``ese_candidate_history``
    (:mod:`ese_assets.storage.candidate_history`: every change by a person or a detection run).

    A candidate older than the history table has no entries there; its flagging and the review
    lines ``"<UTC time> <by>: <status>[: <note>]"`` in its ``notes`` stand in for them.
    """
    ids = [int(c["id"]) for c in candidates]
    if not ids:
        return []
    entries = history_db.candidate_history(engine, candidate_ids=ids)
    events = [
        {
            "candidate_id": int(e["candidate_id"]),
            "at": _utc(e["changed_at"]),
            "by": e["changed_by"],
            "old_status": e["old_status"],
            "new_status": e["new_status"],
            "note": e["note"],
            "run_id": e["run_id"],
            "significance": e["significance"],
            "order": e["changed_at"],
        }
        for e in records(entries)
    ]
    recorded = {e["candidate_id"] for e in events}
    for cand in candidates:
        if int(cand["id"]) not in recorded:
            events.extend(_events_from_notes(cand))
    events.sort(key=lambda e: (e["order"], e["candidate_id"]))
    for event in events:
        del event["order"]
    return events


def _utc(unix_s: float) -> str:
    return dt.datetime.fromtimestamp(float(unix_s), tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _events_from_notes(cand: dict[str, Any]) -> list[dict[str, Any]]:
    """A legacy candidate's history: its flagging, then the review lines of its notes."""

    def event(at: str, order: float, by: str, old: str | None, new: str, note: str | None):
        return {
            "candidate_id": int(cand["id"]),
            "at": at,
            "by": by,
            "old_status": old,
            "new_status": new,
            "note": note,
            "run_id": None,
            "significance": None,
            "order": order,
        }

    flagged = float(cand["flagged_at"])
    events = [event(_utc(flagged), flagged, cand.get("flagged_by") or "auto", None, "active", None)]
    for line in (cand.get("notes") or "").splitlines():
        match = _AUDIT_LINE.match(line.strip())
        if match is None:
            continue
        at = dt.datetime.strptime(match["at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
        old = events[-1]["new_status"]
        events.append(
            event(match["at"], at.timestamp(), match["by"], old, match["status"], match["note"])
        )
    return events


# ------------------------------------------------------------------------------------ sources


def variability(engine: Engine, source_id: str) -> dict[str, Any] | None:
    """The source's ``variability_stats`` row (seed column names), or None."""
    stats = statistics_db.variability_stats(engine, source_ids=[source_id])
    if stats.empty:
        return None
    row = records(stats)[0]
    first, last = _dates(row, "first_mjd", "last_mjd")
    row.update(first_date=first, last_date=last)
    return row


def _dates(row: dict[str, Any], *keys: str) -> list[str | None]:
    values = [row.get(k) if row.get(k) is not None else np.nan for k in keys]
    return [iso[:10] if iso else None for iso in mjd_to_iso(values)]


def lightcurve(
    engine: Engine,
    source_id: str,
    *,
    exclude_flags: int = DEFAULT_EXCLUDED_FLAGS,
    start_mjd: float | None = None,
    end_mjd: float | None = None,
) -> pd.DataFrame:
    """One source's measurements in time order with :data:`LIGHTCURVE_FIELDS` (plus position and
    catalog flux columns); fluxes in mJy/beam next to the stored Jy/beam."""
    lc = photometry_db.lightcurves(engine, [source_id])
    if start_mjd is not None:
        lc = lc[lc["mjd"] >= start_mjd]
    if end_mjd is not None:
        lc = lc[lc["mjd"] <= end_mjd]
    lc = lc.sort_values(["mjd", "image_path"], kind="mergesort").reset_index(drop=True)
    return lc.assign(
        flux_mjy=lc["peak_jyb"] * 1e3,
        flux_err_mjy=lc["peak_err_jyb"] * 1e3,
        used=usable_measurement(lc["quality_flag"].to_numpy(), exclude_flags)
        & lc["peak_jyb"].notna().to_numpy(),
        date_obs=mjd_to_iso(lc["mjd"].to_numpy()),
    )


def lightcurve_fields(lc: pd.DataFrame) -> list[str]:
    """:data:`LIGHTCURVE_FIELDS`, plus ``normalized_flux_jy`` when the photometry has it."""
    extra = ["normalized_flux_jy"] if "normalized_flux_jy" in lc.columns else []
    return [*LIGHTCURVE_FIELDS[:6], *extra, *LIGHTCURVE_FIELDS[6:]]


# ------------------------------------------------------------------------------------ population


def eta_v_points(engine: Engine) -> list[dict[str, Any]]:
    """Every source with statistics: log-able η and V, n_obs, mean flux, and the status of its
    latest candidate (None when never flagged)."""
    stats = statistics_db.variability_stats(engine)
    cols = ["source_id", "eta_metric", "v_index", "n_obs", "mean_flux_mjy", "dip_significance"]
    stats = stats[cols]
    cands = candidates_db.candidates(engine)
    if not cands.empty:
        latest = cands.sort_values("id").drop_duplicates("source_id", keep="last")
        stats = stats.merge(
            latest[["source_id", "status", "significance", "flag_type"]], on="source_id", how="left"
        )
    else:
        stats = stats.assign(status=None, significance=np.nan, flag_type=None)
    return records(stats)
