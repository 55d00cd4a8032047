"""The review web app's pages: the candidate list, a source's page, the η–V diagram.

Pages are rendered on the server (Jinja2, autoescaped) from the same reads as the REST API; the
interactive plots are drawn in the browser by plotly.js (served from this server, no CDN) from the
REST endpoints, and the review buttons post to ``/api/ese/candidates/{id}/status``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from astropy import units as u
from astropy.coordinates import Angle
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from ese_assets.core.candidates import CANDIDATE_STATUSES, OPEN_STATUSES
from ese_assets.web import queries
from ese_assets.web.api import DEFAULT_PAGE_SIZE, engine_of

PACKAGE_DIR = Path(__file__).resolve().parent
router = APIRouter(include_in_schema=False)


def path_quote(value: str) -> str:
    """A source id as one URL path segment (space, ``+`` and ``/`` encoded)."""
    return quote(str(value), safe="")


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table cell: ``digits`` significant figures, em dash when missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:.{digits}e}"
    return str(value)


def sexagesimal(ra_deg: float | None, dec_deg: float | None) -> str:
    if ra_deg is None or dec_deg is None:
        return ""
    ra = Angle(ra_deg * u.deg).to_string(unit=u.hourangle, sep=":", precision=2, pad=True)
    dec = Angle(dec_deg * u.deg).to_string(
        unit=u.deg, sep=":", precision=1, alwayssign=True, pad=True
    )
    return f"{ra} {dec}"


def templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(PACKAGE_DIR / "templates"), autoescape=True
    )
    tpl = Jinja2Templates(env=env)
    tpl.env.filters["path_quote"] = path_quote
    tpl.env.filters["fmt"] = fmt
    tpl.env.globals["sexagesimal"] = sexagesimal
    tpl.env.globals["OPEN_STATUSES"] = OPEN_STATUSES
    return tpl


def _render(request: Request, name: str, **context: Any) -> HTMLResponse:
    config = request.app.state.config
    return request.app.state.templates.TemplateResponse(
        request,
        name,
        {"token_required": config.token_required, "products_db": config.describe(), **context},
    )


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/candidates", status_code=307)


@router.get("/candidates", response_class=HTMLResponse)
def candidates_page(
    request: Request,
    status: str = "open",
    flag_type: str = "",
    min_significance: str = "",
    night: str = "",
    page: int = Query(1, ge=1),
) -> HTMLResponse:
    if status not in queries.STATUS_FILTERS:
        raise HTTPException(400, f"unknown status {status!r}")
    try:
        min_sig = float(min_significance) if min_significance.strip() else None
    except ValueError:
        raise HTTPException(400, f"min_significance={min_significance!r} is not a number") from None
    filters = queries.CandidateFilter(
        status=status,
        flag_type=flag_type or None,
        min_significance=min_sig,
        night=night or None,
    )
    engine = engine_of(request)
    limit = DEFAULT_PAGE_SIZE
    rows, total = queries.candidate_page(engine, filters, limit=limit, offset=(page - 1) * limit)
    pages = max(1, math.ceil(total / limit))
    args = {
        "status": status,
        "flag_type": flag_type,
        "min_significance": min_significance,
        "night": night,
    }

    def page_url(n: int) -> str:
        return "/candidates?" + urlencode({**args, "page": n})

    return _render(
        request,
        "candidates.html",
        rows=rows,
        total=total,
        page=page,
        pages=pages,
        page_url=page_url,
        filters=args,
        statuses=queries.STATUS_FILTERS,
        flag_types=sorted({*queries.FLAG_RULES, *queries.flag_types(engine)}),
    )


@router.get("/sources/{source_id:path}", response_class=HTMLResponse)
def source_page(request: Request, source_id: str) -> HTMLResponse:
    engine = engine_of(request)
    stats = queries.variability(engine, source_id)
    cands = queries.source_candidates(engine, source_id)
    if stats is None and not cands:
        lc = queries.lightcurve(engine, source_id)
        if lc.empty:
            raise HTTPException(404, f"source {source_id!r} has no measurements")
    current = cands[-1] if cands else None
    return _render(
        request,
        "source.html",
        source_id=source_id,
        stats=stats or {},
        candidates=cands,
        current=current,
        history=queries.status_history(engine, cands),
        statuses=CANDIDATE_STATUSES,
    )


@router.get("/eta-v", response_class=HTMLResponse)
def eta_v_page(request: Request) -> HTMLResponse:
    return _render(request, "eta_v.html")
