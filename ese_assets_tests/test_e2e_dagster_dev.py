"""End to end: a real ``dagster dev`` (webserver + daemon) processes files dropped into incoming/.

Starts ``dagster dev`` on a free localhost port with a temporary DAGSTER_HOME, copies simulated
FITS files plus a corrupt file and a non-FITS file into the incoming directory, then waits (bounded)
until the sensor's runs have succeeded (checked through the GraphQL API) and the products database
holds photometry, statistics, a candidate, the bad FITS file rejected with its reason and the
non-FITS file ignored.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ese_assets.storage import candidates as candidates_db
from ese_assets.storage import images as images_db
from ese_assets.storage import photometry as photometry_db
from ese_assets.storage import statistics as statistics_db
from ese_assets.storage.engine import make_engine
from ese_assets_tests.survey import NIGHTS

PROJECT = Path(__file__).resolve().parents[1]
DAGSTER = Path(sys.executable).with_name("dagster")
RUNS_QUERY = """
query { runsOrError { __typename ... on Runs { results { runId status tags { key value } } } } }
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["data"]


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"dagster dev exited ({proc.returncode}) while waiting for {what}:\n"
                + log.read_text()[-4000:]
            )
        try:
            value = predicate()
        except AssertionError:
            raise
        except Exception:  # not up yet (no server, no tables): poll again
            value = None
        if value:
            return value
        time.sleep(2)
    pytest.fail(
        f"timed out after {timeout_s:.0f} s waiting for {what}:\n" + log.read_text()[-4000:]
    )


@pytest.fixture
def dagster_dev(tmp_path, small_survey):
    home = tmp_path / "dagster_home"
    (home / ".nux").mkdir(parents=True)
    shutil.copy(PROJECT / "dagster.yaml", home / "dagster.yaml")
    (home / ".nux" / "nux.yaml").write_text("seen: 1\n")
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "PIPELINE_PRODUCTS_DB": str(tmp_path / "products.sqlite3"),
        "ESE_CATALOG": str(small_survey / "catalog.csv"),
        "ESE_INCOMING_DIR": str(incoming),
        "ESE_SETTLE_SECONDS": "2",
        "ESE_SENSOR_INTERVAL_SECONDS": "5",
    }
    log = tmp_path / "dagster_dev.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(DAGSTER),
                "dev",
                "-m",
                "ese_assets.definitions",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=PROJECT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5).status
                == 200
            ),
            120,
            "the webserver",
            proc,
            log,
        )
        yield {
            "port": port,
            "incoming": incoming,
            "db": env["PIPELINE_PRODUCTS_DB"],
            "proc": proc,
            "log": log,
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_files_dropped_into_incoming_flow_through_a_real_dagster_instance(
    dagster_dev, small_survey
):
    port, incoming = dagster_dev["port"], dagster_dev["incoming"]
    proc, log = dagster_dev["proc"], dagster_dev["log"]
    for fits in sorted((small_survey / "incoming").glob("*.fits")):
        shutil.copy(fits, incoming / fits.name)
    (incoming / "broken.fits").write_bytes(
        b"SIMPLE  =                    T / garbage" + b"\x01" * 3000
    )
    (incoming / "README.txt").write_text("observer notes, not an image\n")

    engine = make_engine(dagster_dev["db"])

    def sensor_runs_done():
        runs = graphql(port, RUNS_QUERY)["runsOrError"]["results"]
        sensor_runs = [
            r
            for r in runs
            if any(t["key"] == "ese/trigger" and t["value"] == "sensor" for t in r["tags"])
        ]
        failed = [r for r in sensor_runs if r["status"] in ("FAILURE", "CANCELED")]
        assert not failed, f"runs failed: {failed}\n" + log.read_text()[-4000:]
        all_measured = images_db.image_counts_by_status(engine).get("measured") == 12
        done = sensor_runs and all(r["status"] == "SUCCESS" for r in sensor_runs)
        return sensor_runs if done and all_measured else None

    runs = wait_for(sensor_runs_done, 420, "the sensor's runs to succeed", proc, log)
    nights = {t["value"] for r in runs for t in r["tags"] if t["key"] == "dagster/partition"}
    assert nights == set(NIGHTS)

    counts = images_db.image_counts_by_status(engine)
    # broken.fits is rejected with its reason; README.txt is not an image at all: ignored
    assert counts.get("measured") == 12 and counts.get("rejected") == 1, counts
    rejected = images_db.rejected_images(engine).set_index("path")["reason"]
    assert list(rejected.index) == [str(incoming / "broken.fits")] and rejected.iloc[0]
    assert str(incoming / "README.txt") not in images_db.known_image_paths(
        engine, [str(incoming / "README.txt")]
    )
    assert photometry_db.photometry_counts(engine) > 300
    assert len(statistics_db.variability_stats(engine)) > 30
    assert len(candidates_db.candidates(engine)) >= 1
