"""Request and response bodies of the REST API (they make the OpenAPI document).

Field names are the seed's: the ``photometry``, ``variability_stats`` and ``ese_candidates``
columns, the seed's job request ``{"params": {...}}`` / ``{"job_type": "ese-detect", "params":
{...}}`` and its Job/BatchJob fields (``id``, ``type``, ``status``, ``total_items``...).
Responses allow extra fields, so columns added to the tables later reach clients unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ese_assets.core.detection import resolve_min_sigma

#: Longest source list of one batch request (a larger set: several requests, or all sources).
MAX_BATCH_SOURCES = 10_000
#: Longest note a reviewer can attach (characters).
MAX_NOTE_CHARS = 4_000


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class LightcurvePoint(_Open):
    mjd: float = Field(description="Observation time (MJD, from the FITS header).")
    date_obs: str | None = Field(description="The same time as UTC ISO 8601.")
    peak_jyb: float | None = Field(description="Forced-photometry peak flux density (Jy/beam).")
    peak_err_jyb: float | None = Field(description="Its 1σ error (Jy/beam).")
    flux_mjy: float | None = Field(description="peak_jyb in mJy/beam.")
    flux_err_mjy: float | None = Field(description="peak_err_jyb in mJy/beam.")
    quality_flag: int = Field(
        description="Bit mask: 1 edge, 2 blank pixels in the stamp, 4 blended, 8 blank."
    )
    used: bool = Field(description="Used by the statistics and detection (no excluded bit).")
    image_path: str


class Lightcurve(_Open):
    source_id: str
    ra_deg: float | None = None
    dec_deg: float | None = None
    nvss_flux_mjy: float | None = None
    n_points: int
    data_points: list[LightcurvePoint]


class Variability(_Open):
    """The source's ``variability_stats`` row (every column, the seed's names)."""

    source_id: str
    n_obs: int
    mean_flux_mjy: float | None = None
    std_flux_mjy: float | None = None
    chi2_nu: float | None = None
    sigma_deviation: float | None = None
    eta_metric: float | None = None
    v_index: float | None = None


class Candidate(_Open):
    """An ``ese_candidates`` row with display columns of its statistics."""

    id: int
    source_id: str
    status: str
    significance: float
    flag_type: str
    flagged_at: float
    flagged_by: str
    notes: str | None = None
    night: str | None = None
    last_night: str | None = None
    ra_deg: float | None = None
    dec_deg: float | None = None
    chi2_nu: float | None = None
    eta_metric: float | None = None
    n_obs: int | None = None


class CandidateList(BaseModel):
    candidates: list[Candidate]
    total: int = Field(description="Candidates matching the filters (all pages).")
    limit: int
    offset: int


class HistoryEvent(BaseModel):
    candidate_id: int
    at: str = Field(description="UTC time of the change.")
    by: str
    old_status: str | None = Field(description="null: the candidate was created.")
    new_status: str | None = Field(description="null: the candidate was removed (undo).")
    note: str | None
    run_id: str | None = Field(
        default=None, description="Detection run that made the change; null: a person."
    )
    significance: float | None = None


class CandidateHistory(BaseModel):
    source_id: str
    candidates: list[Candidate]
    history: list[HistoryEvent]


class StatusChange(BaseModel):
    """A reviewer's decision on a source's candidate."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["investigated", "dismissed", "active"] = Field(
        description="investigated or dismissed (an open candidate), or active: reopen the "
        "source's investigated, dismissed or expired candidate."
    )
    notes: str | None = Field(default=None, max_length=MAX_NOTE_CHARS)
    by: str = Field(default="web", min_length=1, max_length=100)


class DetectParams(BaseModel):
    """The seed's ``ese-detect`` parameters."""

    model_config = ConfigDict(extra="forbid")

    min_sigma: float | None = Field(
        default=None, description="sigma_deviation threshold (overrides preset)."
    )
    preset: str | None = Field(
        default=None, description="conservative (5.0), moderate (3.5) or sensitive (3.0)."
    )
    min_dip_sigma: float | None = Field(default=None, gt=0)
    recompute: bool = Field(
        default=False, description="Rebuild the statistics from photometry first."
    )

    @model_validator(mode="after")
    def _thresholds(self) -> DetectParams:
        resolve_min_sigma(self.preset, self.min_sigma)  # ValueError -> 422 with the reason
        return self


class SingleDetectParams(DetectParams):
    source_id: str | None = Field(default=None, description="One source; null: every source.")


class BatchDetectParams(DetectParams):
    source_ids: list[str] | None = Field(
        default=None,
        max_length=MAX_BATCH_SOURCES,
        description="Sources to examine; null or empty: every source.",
    )


class DetectJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    params: SingleDetectParams = Field(default_factory=SingleDetectParams)


class BatchDetectJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_type: Literal["ese-detect"] = "ese-detect"
    params: BatchDetectParams = Field(default_factory=BatchDetectParams)


class Job(_Open):
    """A detection run: ``id`` is the Dagster run id, ``status`` its Dagster status (QUEUED,
    STARTED, SUCCESS, FAILURE, ...)."""

    id: str
    type: str
    status: str
    params: dict[str, Any]
    created_at: float | None
    started_at: float | None
    finished_at: float | None
    dagster_job: str
    result: dict[str, Any] | None = Field(
        description="When SUCCESS: candidates_found, new_candidates, updated_candidates, "
        "unknown_source_ids and the flagged candidates."
    )
    error: str | None
    total_items: int | None = None
    completed_items: int | None = None
    failed_items: int | None = None
