"""REST API: the seed's endpoints (``/api/v1/sources/{id}/lightcurve``, ``.../variability``,
``/api/ese/candidates``, ``POST /api/jobs/ese-detect``, ``POST /api/batch/ese-detect``,
``GET /api/jobs/{id}``) and the review writes of the web app.

Source ids travel URL-encoded in the path (``NVSS%20J123456%2B420312``); the routes take the rest
of the path so an id may even contain ``/``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from astropy.time import Time
from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from sqlalchemy import Engine

from ese_assets.core.candidates import NEW_STATUS
from ese_assets.storage import candidates as candidates_db
from ese_assets.web import formats, queries
from ese_assets.web.config import WebConfig
from ese_assets.web.export import lightcurve_document
from ese_assets.web.jobs import BATCH_TYPE, SINGLE_TYPE, JobLauncher
from ese_assets.web.models import (
    BatchDetectJobRequest,
    CandidateHistory,
    CandidateList,
    DetectJobRequest,
    Job,
    Lightcurve,
    StatusChange,
    Variability,
)

#: Page size of the candidate list: default and upper bound (larger requests are refused, 422).
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

router = APIRouter()


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


def config_of(request: Request) -> WebConfig:
    return request.app.state.config


def launcher_of(request: Request) -> JobLauncher:
    return request.app.state.launcher


def _not_found(what: str) -> HTTPException:
    return HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=what)


def _mjd(date: str | None, name: str) -> float | None:
    if not date:
        return None
    try:
        return float(Time(date, scale="utc").mjd)
    except ValueError:
        raise HTTPException(
            status_code=422, detail=f"{name}={date!r} is not an ISO date (YYYY-MM-DD)"
        ) from None


def _attachment(source_id: str, extension: str) -> dict[str, str]:
    name = formats.download_name(source_id, extension)
    return {"Content-Disposition": f'attachment; filename="{name}"'}


@router.get("/api/health", tags=["server"], summary="Liveness and the database served")
def health(request: Request) -> dict[str, Any]:
    config = config_of(request)
    return {
        "status": "ok",
        "products_db": config.describe(),
        "writes_need_token": config.token_required,
    }


@router.get(
    "/api/v1/sources/{source_id:path}/lightcurve",
    tags=["sources"],
    summary="Lightcurve data points of a source",
    response_model=Lightcurve,
    responses={
        200: {
            "content": {
                formats.CSV_MEDIA_TYPE: {"schema": {"type": "string"}},
                formats.VOTABLE_MEDIA_TYPE: {"schema": {"type": "string"}},
            },
            "description": "JSON (default), CSV or VOTable (`format`).",
        },
        404: {"description": "No measurements of this source."},
    },
)
def get_lightcurve(
    request: Request,
    source_id: str,
    format: Annotated[Literal["json", "csv", "votable"], Query()] = "json",
    start_date: Annotated[str | None, Query(description="ISO date, inclusive")] = None,
    end_date: Annotated[str | None, Query(description="ISO date, inclusive")] = None,
) -> Any:
    """Every measurement of the source in time order (flagged ones too, with ``used`` false
    when the statistics leave them out)."""
    doc = lightcurve_document(
        engine_of(request),
        source_id,
        format,
        exclude_flags=request.app.state.exclude_flags,
        start_mjd=_mjd(start_date, "start_date"),
        end_mjd=_mjd(end_date, "end_date"),
    )
    if doc is None:
        raise _not_found(f"source {source_id!r} has no measurements")
    if format == "json":
        return doc.body
    return Response(
        doc.body, media_type=doc.media_type, headers=_attachment(source_id, doc.extension)
    )


@router.get(
    "/api/v1/sources/{source_id:path}/variability",
    tags=["sources"],
    summary="Variability statistics of a source",
    response_model=Variability,
    responses={404: {"description": "No statistics for this source."}},
)
def get_variability(request: Request, source_id: str) -> Any:
    """The source's ``variability_stats`` row: whole-history moments (n_obs, mean, std, χ²_ν,
    η, V, σ_deviation) and the dip statistic over the trailing window."""
    row = queries.variability(engine_of(request), source_id)
    if row is None:
        raise _not_found(f"source {source_id!r} has no variability statistics")
    return row


@router.get(
    "/api/v1/sources/{source_id:path}/candidates",
    tags=["candidates"],
    summary="A source's candidates and their status history",
    response_model=CandidateHistory,
)
def get_source_candidates(request: Request, source_id: str) -> Any:
    engine = engine_of(request)
    cands = queries.source_candidates(engine, source_id)
    return {
        "source_id": source_id,
        "candidates": cands,
        "history": queries.status_history(engine, cands),
    }


@router.get(
    "/api/ese/candidates",
    tags=["candidates"],
    summary="List ESE candidates",
    response_model=CandidateList,
)
def list_candidates(
    request: Request,
    status_: Annotated[
        Literal[queries.STATUS_FILTERS],  # type: ignore[valid-type]
        Query(alias="status", description="open = active or investigated"),
    ] = "all",
    flag_type: Annotated[
        str | None,
        Query(
            description="A rule that fired (dip, spike, outlier, variable) or an exact flag_type",
            max_length=100,
        ),
    ] = None,
    min_significance: Annotated[float | None, Query(ge=0)] = None,
    night: Annotated[
        str | None,
        Query(
            pattern=r"^\d{4}-\d{2}-\d{2}$",
            description="Candidates the detection saw on this night (YYYY-MM-DD)",
        ),
    ] = None,
    source_id: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Any:
    """Candidates with the statistics a reviewer needs (position, χ²_ν, η, V, n_obs, dip window
    and depth), most significant first; ``total`` counts all pages."""
    filters = queries.CandidateFilter(
        status=status_,
        flag_type=flag_type,
        min_significance=min_significance,
        night=night,
        source_id=source_id,
    )
    rows, total = queries.candidate_page(engine_of(request), filters, limit=limit, offset=offset)
    return {"candidates": rows, "total": total, "limit": limit, "offset": offset}


@router.post(
    "/api/ese/candidates/{source_id:path}/status",
    tags=["candidates"],
    summary="Mark a source's candidate investigated or dismissed, or reopen it",
    response_model=CandidateHistory,
    responses={
        401: {"description": "Token required and missing or wrong."},
        409: {"description": "No candidate in a state that allows this change."},
    },
)
def change_status(request: Request, source_id: str, change: StatusChange) -> Any:
    engine = engine_of(request)
    try:
        if change.status == NEW_STATUS:
            candidates_db.reopen_candidate(engine, source_id, notes=change.notes, by=change.by)
        else:
            candidates_db.set_candidate_status(
                engine, source_id, change.status, notes=change.notes, by=change.by
            )
    except ValueError as exc:
        raise HTTPException(status_code=status.HTTP_409_CONFLICT, detail=str(exc)) from None
    return get_source_candidates(request, source_id)


def _job(request: Request, run_id: str) -> Any:
    job = launcher_of(request).status(run_id)
    if job is None:
        raise _not_found(f"no detection job {run_id!r}")
    return job


@router.post(
    "/api/jobs/ese-detect",
    tags=["jobs"],
    summary="Launch detection (one source or all) as a Dagster run",
    response_model=Job,
    response_model_exclude_unset=True,
    status_code=status.HTTP_202_ACCEPTED,
)
def launch_detect(request: Request, body: DetectJobRequest | None = None) -> Any:
    """Starts a run of the ``ese_detect`` Dagster job and returns at once; poll
    ``GET /api/jobs/{id}`` until ``status`` is SUCCESS or FAILURE."""
    params = (body or DetectJobRequest()).params
    source_ids = [params.source_id] if params.source_id else []
    if params.source_id and queries.variability(engine_of(request), params.source_id) is None:
        lc = queries.lightcurve(engine_of(request), params.source_id)
        if lc.empty:
            raise _not_found(f"source {params.source_id!r} has no measurements")
    run_id = launcher_of(request).launch(SINGLE_TYPE, _op_config(params, source_ids))
    return _job(request, run_id)


@router.post(
    "/api/batch/ese-detect",
    tags=["jobs"],
    summary="Launch detection for a set of sources as one Dagster run",
    response_model=Job,
    response_model_exclude_unset=True,
    status_code=status.HTTP_202_ACCEPTED,
)
def launch_batch_detect(request: Request, body: BatchDetectJobRequest | None = None) -> Any:
    """One run for the whole set (``total_items`` = number of sources; all sources count as one
    item). Sources without statistics are listed in the result's ``unknown_source_ids``."""
    params = (body or BatchDetectJobRequest()).params
    source_ids = list(dict.fromkeys(params.source_ids or []))
    run_id = launcher_of(request).launch(BATCH_TYPE, _op_config(params, source_ids))
    return _job(request, run_id)


def _op_config(params: Any, source_ids: list[str]) -> dict[str, Any]:
    config: dict[str, Any] = {"source_ids": source_ids, "recompute": params.recompute}
    for key in ("preset", "min_sigma", "min_dip_sigma"):
        value = getattr(params, key)
        if value is not None:
            config[key] = value
    return config


@router.get(
    "/api/jobs/{job_id}",
    tags=["jobs"],
    summary="Status of a detection job",
    response_model=Job,
    response_model_exclude_unset=True,
)
def get_job(request: Request, job_id: str) -> Any:
    return _job(request, job_id)


@router.get(
    "/api/batch/{batch_id}",
    tags=["jobs"],
    summary="Status of a batch detection job",
    response_model=Job,
    response_model_exclude_unset=True,
)
def get_batch(request: Request, batch_id: str) -> Any:
    return _job(request, batch_id)


@router.get("/api/v1/eta-v", tags=["sources"], summary="η and V of every source")
def eta_v(request: Request) -> list[dict[str, Any]]:
    """``eta_metric``, ``v_index``, ``n_obs``, mean flux and the latest candidate status of every
    source with statistics (the η–V diagram's data)."""
    return queries.eta_v_points(engine_of(request))
