"""The FastAPI application: REST API, review pages, static files, and the write-token rule.

Writes (POST, PUT, PATCH, DELETE) need ``Authorization: Bearer $ESE_WEB_TOKEN`` whenever the
server listens on anything but the loopback interface (or a token is configured); the check is a
middleware, so no write route can be added without it. Cross-site writes are refused too: a
write whose ``Origin`` is not this server is rejected (a page on another site cannot make the
browser of someone on this machine dismiss candidates), and on loopback only loopback ``Host``
names are served (DNS rebinding).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ese_assets.definitions import build_definitions
from ese_assets.orchestration.detection_job import DETECT_JOB_NAME
from ese_assets.settings import Settings
from ese_assets.storage.engine import ensure_schema, make_engine
from ese_assets.storage.errors import DatabaseUnavailable
from ese_assets.web import api, pages
from ese_assets.web.config import WebConfig, is_loopback
from ese_assets.web.jobs import JobLauncher, JobsUnavailable
from ese_assets.web.pages import PACKAGE_DIR

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]", "::1"]

DESCRIPTION = """\
The seed's REST API over the products database, and the candidate review web app.

* Source ids go URL-encoded in the path: `NVSS J123456+420312` is `NVSS%20J123456%2B420312`.
* Candidate lists are paged (`limit` at most 500, `offset`), most significant first.
* Detection jobs are Dagster runs of the `ese_detect` job (visible in the Dagster UI); poll
  `GET /api/jobs/{id}` until `status` is `SUCCESS` or `FAILURE`.
* Writes need `Authorization: Bearer <ESE_WEB_TOKEN>` when the server listens on a non-loopback
  address.
"""


def plotly_js() -> Path:
    """plotly.js as shipped inside the ``plotly`` Python package (served locally: no CDN)."""
    return Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))


def _token_ok(request: Request, token: str) -> bool:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip(), token)


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser's cross-site request (curl, scripts)
    return urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower()


def create_app(config: WebConfig, settings: Settings | None = None) -> FastAPI:
    """The application serving ``config.products_db``; detection runs use ``settings`` (the
    environment's by default) for the detection resource's thresholds."""
    settings = settings or Settings.from_env()
    if settings.products_db != config.products_db:
        settings = dataclasses.replace(settings, products_db=config.products_db)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(config.products_db)
        ensure_schema(engine)
        app.state.engine = engine
        job = build_definitions(settings, bind_env=False).resolve_job_def(DETECT_JOB_NAME)
        app.state.launcher = JobLauncher(
            job, dagster_home=config.dagster_home, products_db=config.products_db
        )
        try:
            yield
        finally:
            app.state.launcher.shutdown()

    app = FastAPI(
        title="ese_assets",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        # FastAPI's /docs and /redoc load their scripts from a CDN: the document is at
        # /openapi.json, and nothing this server serves needs the network.
        docs_url=None,
        redoc_url=None,
    )
    app.state.config = config
    app.state.exclude_flags = settings.exclude_flags
    app.state.templates = pages.templates()

    @app.middleware("http")
    async def guard_writes(request: Request, call_next):
        if request.method in WRITE_METHODS:
            if not _same_origin(request):
                return JSONResponse({"detail": "cross-origin write refused"}, status_code=403)
            if config.token_required and not _token_ok(request, config.token or ""):
                return JSONResponse(
                    {
                        "detail": "this server needs 'Authorization: Bearer <ESE_WEB_TOKEN>' "
                        "for writes"
                    },
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await call_next(request)

    if is_loopback(config.host):
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS)

    @app.exception_handler(DatabaseUnavailable)
    async def database_unavailable(request: Request, exc: DatabaseUnavailable):
        return JSONResponse(
            {"detail": f"products database unavailable, try again: {exc}"},
            status_code=503,
            headers={"Retry-After": "10"},
        )

    @app.exception_handler(JobsUnavailable)
    async def jobs_unavailable(request: Request, exc: JobsUnavailable):
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.get("/static/vendor/plotly.min.js", include_in_schema=False)
    def plotly_bundle() -> FileResponse:
        return FileResponse(
            plotly_js(),
            media_type="text/javascript",
            headers={"Cache-Control": "public, max-age=86400"},
        )

    app.mount("/static", StaticFiles(directory=PACKAGE_DIR / "static"), name="static")
    app.include_router(api.router)
    app.include_router(pages.router)
    return app
