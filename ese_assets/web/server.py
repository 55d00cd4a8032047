"""The server command: ``python -m ese_assets.web [--host H] [--port P] [--with-dagster]``.

With ``--with-dagster`` (what ``make ui`` runs) it also starts ``dagster dev`` (webserver and
daemon) in its own process group, so one command serves both UIs. Ctrl-C (or SIGTERM) stops the
web server, which then stops ``dagster dev`` and every process it started; if ``dagster dev``
ends first, the web server stops too. Beside ``dagster dev``, a products database that does not
exist yet is waited for (the pipeline's first run creates it); alone, the server refuses to start
on it (it never creates an empty database by reading).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from ese_assets.settings import Settings
from ese_assets.web.app import create_app
from ese_assets.web.config import DEFAULT_HOST, MissingDatabase, WebConfig, WebConfigError

#: Seconds ``dagster dev`` gets to shut down after SIGINT, then after SIGTERM, before SIGKILL.
DAGSTER_STOP_TIMEOUT_S = 20.0
#: Signals that stop the server (and with it ``dagster dev``).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: How often a missing products database is looked for beside ``dagster dev``.
DATABASE_POLL_S = 2.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ese_assets.web",
        description="Candidate review web app and REST API over the products database.",
    )
    p.add_argument("--host", help=f"address to listen on (WEB_HOST, default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, help="port (WEB_PORT, default 8000)")
    p.add_argument(
        "--products-db", help="products database path or URL (default PIPELINE_PRODUCTS_DB)"
    )
    p.add_argument(
        "--with-dagster",
        action="store_true",
        help="also run `dagster dev -m ese_assets.definitions` (the Dagster UI and daemon)",
    )
    p.add_argument("--dagster-host", default=DEFAULT_HOST, help="Dagster UI address")
    p.add_argument("--dagster-port", type=int, default=3000, help="Dagster UI port")
    return p


def _start_dagster(host: str, port: int) -> subprocess.Popen:
    dagster = Path(sys.executable).with_name("dagster")
    command = [str(dagster), "dev", "-m", "ese_assets.definitions", "-h", host, "-p", str(port)]
    # Its own process group, stopped by :func:`_stop` (webserver, daemon and code servers alike);
    # default signal dispositions, even when this process was started with SIGINT ignored (a
    # background job), or dagster dev would ignore SIGINT and SIGTERM.
    return subprocess.Popen(
        command,
        start_new_session=True,
        preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in STOP_SIGNALS],
    )


def _stop(proc: subprocess.Popen) -> None:
    """Stop ``dagster dev`` and everything it started: SIGINT (its Ctrl-C shutdown), then
    SIGTERM, then SIGKILL to its process group."""
    for sig, timeout in (
        (signal.SIGINT, DAGSTER_STOP_TIMEOUT_S),
        (signal.SIGTERM, DAGSTER_STOP_TIMEOUT_S),
        (signal.SIGKILL, None),
    ):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # children left by a dagster dev that died
        os.killpg(proc.pid, signal.SIGKILL)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _wait_for_database(config: WebConfig, dagster: subprocess.Popen) -> bool:
    """Beside ``dagster dev``, a products database that does not exist yet (a new deployment
    whose first images have not arrived) is waited for instead of refused: the sensor's first
    run creates it. False when ``dagster dev`` ended first."""
    print(
        f"ese web: {config.describe()} does not exist yet; the review app starts when the "
        "pipeline has created it (copy images into the incoming directory, or run `make demo`)",
        flush=True,
    )
    while True:
        try:
            config.check()
            return True
        except MissingDatabase:
            if dagster.poll() is not None:
                return False
            time.sleep(DATABASE_POLL_S)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.with_dagster and not os.environ.get("DAGSTER_HOME"):
        print("ese web: --with-dagster needs DAGSTER_HOME", file=sys.stderr)
        return 2
    missing = False
    try:
        settings = Settings.from_env()
        config = WebConfig.from_env(
            products_db=args.products_db or settings.products_db, host=args.host, port=args.port
        )
        try:
            config.check()
        except MissingDatabase:
            if not args.with_dagster:
                raise
            missing = True
    except (WebConfigError, ValueError) as exc:
        print(f"ese web: {exc}", file=sys.stderr)
        return 2
    dagster: subprocess.Popen | None = None
    if args.with_dagster:
        # Ctrl-C and SIGTERM become KeyboardInterrupt here (uvicorn hands them back after its
        # graceful shutdown), so the `finally` below always stops dagster dev.
        for sig in STOP_SIGNALS:
            signal.signal(sig, _interrupt)
        dagster = _start_dagster(args.dagster_host, args.dagster_port)
        print(f"ese web: Dagster UI http://{args.dagster_host}:{args.dagster_port}", flush=True)
    try:
        if missing and not _wait_for_database(config, dagster):
            return dagster.returncode or 0
        return _serve(config, settings, dagster)
    except KeyboardInterrupt:
        return 0
    finally:
        if dagster is not None:
            _stop(dagster)


def _serve(config: WebConfig, settings: Settings, dagster: subprocess.Popen | None) -> int:
    server = uvicorn.Server(
        uvicorn.Config(create_app(config, settings), host=config.host, port=config.port)
    )
    print(
        f"ese web: review app http://{config.host}:{config.port}/candidates, REST API "
        f"http://{config.host}:{config.port}/api (OpenAPI: /openapi.json), "
        f"database {config.describe()}"
        + ("; writes need the ESE_WEB_TOKEN bearer token" if config.token_required else ""),
        flush=True,
    )
    if dagster is not None:

        def watch() -> None:
            dagster.wait()
            server.should_exit = True  # dagster dev ended (Ctrl-C or a crash): stop serving too

        threading.Thread(target=watch, name="dagster-dev-watch", daemon=True).start()
    server.run()
    if dagster is not None and dagster.returncode not in (None, 0, -signal.SIGINT, -signal.SIGTERM):
        return dagster.returncode
    return 0 if server.started else 1
