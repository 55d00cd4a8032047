"""Fixtures of the web tests: a products database built by the real pipeline, a real HTTP server.

* :func:`build_review_workspace` runs the ``ese_pipeline`` job night by night over a simulated
  survey (:data:`WEB_SURVEY`: 16 nights, two ESEs lasting a week) into a fresh SQLite products
  database and a persistent Dagster instance (``DAGSTER_HOME`` with the project's
  ``dagster.yaml``). :func:`shared_workspace` builds it once per test session and
  :func:`copy_workspace` gives a test that writes its own copy. The catalog's names get the
  seed's ``NVSS`` prefix, so source ids carry a space and a ``+`` like the seed guide's
  ``NVSS J123456+420312`` and the URLs must encode both.
* :class:`WebServer` starts ``python -m ese_assets.web`` (uvicorn) in a subprocess on a free port
  and waits until it answers; stopping it sends SIGTERM to its process group.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import dagster as dg

from ese_assets.core.simulate import SurveyConfig, simulate_survey
from ese_assets.definitions import build_definitions
from ese_assets.settings import Settings
from ese_assets.storage.engine import dispose_engine

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: The seed's catalog prefix: source ids like ``NVSS J100037+301430``.
NAME_PREFIX = "NVSS "

#: 16 nights of two 256x256 images: two deep ESEs of about a week on bright sources, two ordinary
#: variables, 38 stable sources; a few seconds of pipeline per night.
WEB_SURVEY = SurveyConfig(
    seed=11,
    n_nights=16,
    images_per_night=2,
    npix=256,
    n_sources=42,
    n_variables=2,
    n_ese=2,
    ese_depths=(0.6, 0.5),
    ese_duration_days=(6.0, 8.0),
    ese_t0_window=(0.35, 0.6),
    ese_min_flux_mjy=40.0,
    cube_fraction=0.25,
)


@dataclasses.dataclass(frozen=True)
class ReviewWorkspace:
    settings: Settings
    dagster_home: Path
    truth_dir: Path

    @property
    def products_db(self) -> str:
        return self.settings.products_db

    def env(self) -> dict[str, str]:
        """Environment of a process working on this workspace (the server, ``ese``)."""
        return {
            "PIPELINE_PRODUCTS_DB": self.settings.products_db,
            "ESE_CATALOG": str(self.settings.catalog_path),
            "ESE_INCOMING_DIR": self.settings.incoming_dir,
            "DAGSTER_HOME": str(self.dagster_home),
        }


def _prefixed_catalog(src: Path, dst: Path) -> None:
    with src.open(newline="") as fin, dst.open("w", newline="") as fout:
        reader = csv.DictReader(fin)
        writer = csv.DictWriter(fout, fieldnames=reader.fieldnames)
        writer.writeheader()
        for row in reader:
            writer.writerow({**row, "name": NAME_PREFIX + row["name"]})


def build_review_workspace(survey: Path, root: Path) -> ReviewWorkspace:
    """Run the pipeline over every night of ``survey`` into ``root`` (see module docstring)."""
    incoming = root / "incoming"
    incoming.mkdir(parents=True)
    for fits in sorted((survey / "incoming").glob("*.fits")):
        shutil.copy2(fits, incoming / fits.name)
    catalog = root / "catalog.csv"
    _prefixed_catalog(survey / "catalog.csv", catalog)
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")
    settings = dataclasses.replace(
        Settings.from_env(),
        data_dir=str(root),
        products_db=str(root / "products.sqlite3"),
        catalog_path=str(catalog),
        incoming_dir=str(incoming),
        settle_seconds=0.0,
    )
    with (survey / "truth_images.csv").open(newline="") as f:
        nights = sorted({r["date_obs"][:10] for r in csv.DictReader(f)})
    job = build_definitions(settings, bind_env=False).resolve_job_def("ese_pipeline")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        for night in nights:
            result = job.execute_in_process(partition_key=night, instance=instance)
            assert result.success, f"pipeline run of {night} failed"
    dispose_engine(settings.products_db)  # SQLite file complete on disk, so copies are whole
    return ReviewWorkspace(settings=settings, dagster_home=home, truth_dir=survey)


_SHARED: dict[str, ReviewWorkspace] = {}


def shared_workspace(tmp_path_factory) -> ReviewWorkspace:
    """The :data:`WEB_SURVEY` workspace, simulated and run once per test session (read only)."""
    if "ws" not in _SHARED:
        survey = tmp_path_factory.mktemp("web_survey")
        simulate_survey(WEB_SURVEY, survey)
        _SHARED["ws"] = build_review_workspace(survey, tmp_path_factory.mktemp("web_ws"))
    return _SHARED["ws"]


def copy_workspace(ws: ReviewWorkspace, root: Path) -> ReviewWorkspace:
    """A private copy of ``ws``'s products database and Dagster instance, for tests that write."""
    root.mkdir(parents=True, exist_ok=True)
    src_db = Path(ws.products_db)
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{src_db}{suffix}").exists():
            shutil.copy2(f"{src_db}{suffix}", root / f"{src_db.name}{suffix}")
    shutil.copytree(ws.dagster_home, root / "dagster_home")
    settings = dataclasses.replace(
        ws.settings, data_dir=str(root), products_db=str(root / src_db.name)
    )
    return ReviewWorkspace(
        settings=settings, dagster_home=root / "dagster_home", truth_dir=ws.truth_dir
    )


def truth_ese_ids(workspace: ReviewWorkspace) -> list[str]:
    """Source ids (as stored) of the ESEs the simulator injected."""
    with (workspace.truth_dir / "truth_sources.csv").open(newline="") as f:
        return [NAME_PREFIX + r["name"] for r in csv.DictReader(f) if r["kind"] == "ese"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(
    method: str,
    url: str,
    body: object | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request (urllib, no client library in between): status, headers, body bytes."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers.items()), err.read()


def get_json(url: str, headers: Mapping[str, str] | None = None) -> tuple[int, object]:
    status, _, body = http("GET", url, headers=headers)
    return status, json.loads(body) if body else None


class WebServer:
    """``python -m ese_assets.web`` in a subprocess, for one test module or test."""

    def __init__(
        self,
        workspace: ReviewWorkspace,
        *,
        host: str = "127.0.0.1",
        extra_env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.workspace = workspace
        self.host = host
        self.port = free_port()
        self.env = {**os.environ, **workspace.env(), **(extra_env or {})}
        self.env.pop("WEB_HOST", None)
        self.env.pop("WEB_PORT", None)
        self.log_path = log_path or workspace.settings.data_dir + f"/web_{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "ese_assets.web",
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]

    def start(self, timeout: float = 60.0) -> WebServer:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            self.command(),
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(PROJECT_ROOT),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"web server exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                status, _, _ = http("GET", self.base_url + "/api/health", timeout=2)
                if status == 200:
                    return self
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"web server did not answer in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def running_server(workspace: ReviewWorkspace, **kwargs) -> Iterator[WebServer]:
    with WebServer(workspace, **kwargs) as server:
        yield server
