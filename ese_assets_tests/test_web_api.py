"""The REST API over real HTTP: ``python -m ese_assets.web`` (uvicorn) in a subprocess, serving a
products database built by the real pipeline (ese_assets_tests.web_fixtures).

Expected values come from the seed guide's own SQL (section 6) run directly on the database, and
from the simulator's truth files, never from the code under test.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import subprocess
import time
from urllib.parse import quote

import dagster as dg
import pandas as pd
import pytest
import sqlalchemy as sa
from astropy.io.votable import parse_single_table
from openapi_spec_validator import validate

from ese_assets.storage.engine import make_engine
from ese_assets_tests.web_fixtures import (
    WebServer,
    copy_workspace,
    get_json,
    http,
    shared_workspace,
    truth_ese_ids,
)

TOKEN = "t0ken-for-the-web-tests-0123456789"
JOB_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return copy_workspace(shared_workspace(tmp_path_factory), tmp_path_factory.mktemp("web_api"))


@pytest.fixture(scope="module")
def server(workspace):
    with WebServer(workspace) as srv:
        yield srv


@pytest.fixture(scope="module")
def engine(workspace):
    return make_engine(workspace.products_db)


def seg(source_id: str) -> str:
    """A source id as a URL path segment, as the seed's curl example writes it."""
    return quote(source_id, safe="")


def wait_for_job(base_url: str, job_id: str) -> dict:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        status, job = get_json(f"{base_url}/api/jobs/{job_id}")
        assert status == 200, job
        if job["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} not finished after {JOB_TIMEOUT_S} s: {job}")


def seed_sql(engine, sql: str, **params) -> pd.DataFrame:
    with engine.connect() as conn:
        return pd.read_sql_query(sa.text(sql), conn, params=params)


# ------------------------------------------------------------------------------- OpenAPI, pages


def test_openapi_document_validates_and_lists_the_seed_endpoints(server):
    status, spec = get_json(server.base_url + "/openapi.json")
    assert status == 200
    validate(spec)  # raises on an invalid OpenAPI document
    paths = spec["paths"]
    for path, method in [
        ("/api/v1/sources/{source_id}/lightcurve", "get"),
        ("/api/v1/sources/{source_id}/variability", "get"),
        ("/api/ese/candidates", "get"),
        ("/api/jobs/ese-detect", "post"),
        ("/api/batch/ese-detect", "post"),
        ("/api/jobs/{job_id}", "get"),
    ]:
        assert method in paths[path], path
    limit = next(
        p for p in paths["/api/ese/candidates"]["get"]["parameters"] if p["name"] == "limit"
    )
    assert limit["schema"]["maximum"] == 500


def test_pages_render_and_load_nothing_from_the_network(server, engine):
    status, _, body = http("GET", server.base_url + "/candidates")
    assert status == 200
    html = body.decode()
    open_ids = seed_sql(
        engine, "SELECT source_id FROM ese_candidates WHERE status IN ('active', 'investigated')"
    )["source_id"]
    for source_id in open_ids:
        assert f'href="/sources/{seg(source_id)}"' in html
    for page in ["/candidates", f"/sources/{seg(open_ids.iloc[0])}", "/eta-v"]:
        status, _, body = http("GET", server.base_url + page)
        assert status == 200, page
        text = body.decode()
        assert 'src="http' not in text and 'href="http' not in text.replace(
            'href="http://127.0.0.1', ""
        )
    status, headers, body = http("GET", server.base_url + "/static/vendor/plotly.min.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert b"plotly.js v" in body[:200] and len(body) > 1_000_000
    # FastAPI's /docs would load Swagger UI from a CDN: not served.
    assert http("GET", server.base_url + "/docs")[0] == 404


# ------------------------------------------------------------------------- the seed's examples


def test_seed_curl_lightcurve_example_returns_the_seed_sql_rows(server, engine):
    # Seed guide section 7: curl "http://localhost:8000/api/v1/sources/NVSS%20J123456%2B420312/
    # lightcurve", here for one of our sources (ids of the form "NVSS J100002+294859").
    source_id = truth_ese_ids(server.workspace)[0]
    url = f"{server.base_url}/api/v1/sources/{seg(source_id)}/lightcurve"
    assert "%20" in url and "%2B" in url
    status, lc = get_json(url)
    assert status == 200
    # Seed guide section 6: "Get lightcurve for a source".
    expected = seed_sql(
        engine,
        "SELECT mjd, peak_jyb, peak_err_jyb, image_path FROM photometry "
        "WHERE source_id = :sid ORDER BY mjd",
        sid=source_id,
    )
    assert lc["source_id"] == source_id
    assert lc["n_points"] == len(expected) == len(lc["data_points"]) > 20
    got = pd.DataFrame(lc["data_points"])
    for column in ("mjd", "peak_jyb", "peak_err_jyb"):
        assert got[column].to_numpy() == pytest.approx(expected[column].to_numpy(), rel=1e-12)
    assert got["image_path"].tolist() == expected["image_path"].tolist()
    assert got["flux_mjy"].to_numpy() == pytest.approx(1e3 * expected["peak_jyb"].to_numpy())
    assert got["date_obs"].iloc[0].startswith("2025-01-01T02:00:00")


def test_seed_curl_candidates_example_returns_the_seed_sql_rows(server, engine, workspace):
    # Seed guide section 7: curl "http://localhost:8000/api/ese/candidates".
    status, body = get_json(server.base_url + "/api/ese/candidates")
    assert status == 200
    # Seed guide section 6: "List all ESE candidates (active)" (here every status).
    expected = seed_sql(
        engine,
        "SELECT e.source_id, e.significance, v.chi2_nu, v.eta_metric, v.n_obs "
        "FROM ese_candidates e JOIN variability_stats v ON e.source_id = v.source_id "
        "ORDER BY e.significance DESC, e.id",
    )
    assert body["total"] == len(expected) == len(body["candidates"])
    got = pd.DataFrame(body["candidates"])
    assert got["source_id"].tolist() == expected["source_id"].tolist()
    for column in ("significance", "chi2_nu", "eta_metric"):
        assert got[column].to_numpy() == pytest.approx(expected[column].to_numpy(), rel=1e-12)
    assert got["n_obs"].tolist() == expected["n_obs"].tolist()
    # The injected ESEs are there, with the dip window and depth a reviewer needs.
    ese = set(truth_ese_ids(workspace))
    assert ese <= set(got["source_id"])
    for row in body["candidates"]:
        if row["source_id"] in ese:
            assert row["dip_depth_frac"] < -0.2 and row["dip_start_date"] <= row["dip_end_date"]
            assert row["ra_deg"] is not None and row["flag_type"]


def test_variability_endpoint_is_the_variability_stats_row(server, engine):
    source_id = truth_ese_ids(server.workspace)[1]
    status, row = get_json(f"{server.base_url}/api/v1/sources/{seg(source_id)}/variability")
    assert status == 200
    expected = seed_sql(
        engine, "SELECT * FROM variability_stats WHERE source_id = :sid", sid=source_id
    ).iloc[0]
    for column in ("n_obs", "mean_flux_mjy", "std_flux_mjy", "chi2_nu", "sigma_deviation"):
        assert row[column] == pytest.approx(expected[column], rel=1e-12), column
    assert row["eta_metric"] == pytest.approx(expected["eta_metric"], rel=1e-12)
    missing = get_json(f"{server.base_url}/api/v1/sources/{seg('NVSS J000000+000000')}/variability")
    assert missing[0] == 404 and "NVSS J000000+000000" in missing[1]["detail"]


# ------------------------------------------------------------------------- lightcurve formats


def test_lightcurve_csv_and_votable_carry_the_same_points(server):
    source_id = truth_ese_ids(server.workspace)[0]
    base = f"{server.base_url}/api/v1/sources/{seg(source_id)}/lightcurve"
    _, lc = get_json(base)
    points = pd.DataFrame(lc["data_points"])

    status, headers, body = http("GET", base + "?format=csv")
    assert status == 200 and headers["content-type"].startswith("text/csv")
    assert "attachment" in headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert len(rows) == len(points)
    assert {r["source_id"] for r in rows} == {source_id}
    assert [float(r["mjd"]) for r in rows] == pytest.approx(points["mjd"].tolist(), rel=1e-9)
    assert [float(r["peak_jyb"]) for r in rows] == pytest.approx(points["peak_jyb"].tolist())

    status, headers, body = http("GET", base + "?format=votable")
    assert status == 200 and headers["content-type"].startswith("application/x-votable+xml")
    table = parse_single_table(io.BytesIO(body))
    assert table.get_field_by_id("mjd").unit.to_string() == "d"
    assert str(table.get_field_by_id("peak_jyb").unit) in ("Jy / beam", "Jy/beam")
    assert table.get_field_by_id("flux_mjy").ucd == "phot.flux.density"
    params = {p.ID: p.value for p in table.params}
    assert params["source_id"] == source_id and params["ra_deg"] == pytest.approx(lc["ra_deg"])
    data = table.to_table()
    assert len(data) == len(points)
    assert list(data["peak_err_jyb"]) == pytest.approx(points["peak_err_jyb"].tolist())
    assert list(data["used"]) == points["used"].tolist()


def test_lightcurve_date_filters_and_errors(server):
    source_id = truth_ese_ids(server.workspace)[0]
    base = f"{server.base_url}/api/v1/sources/{seg(source_id)}/lightcurve"
    _, window = get_json(base + "?start_date=2025-01-03&end_date=2025-01-05")
    dates = {p["date_obs"][:10] for p in window["data_points"]}
    assert dates == {"2025-01-03", "2025-01-04"}  # end_date is 2025-01-05T00:00 UTC
    assert get_json(base + "?start_date=yesterday")[0] == 422
    assert get_json(base + "?format=fits")[0] == 422
    missing = f"{server.base_url}/api/v1/sources/{seg('NVSS J000000+000000')}/lightcurve"
    assert get_json(missing)[0] == 404


# ------------------------------------------------------------------------- jobs


def test_detection_job_runs_in_dagster_and_writes_candidates(server, engine, workspace):
    stable = seed_sql(
        engine,
        "SELECT source_id, sigma_deviation FROM variability_stats "
        "WHERE source_id NOT IN (SELECT source_id FROM ese_candidates) "
        "ORDER BY sigma_deviation DESC LIMIT 1",
    ).iloc[0]
    # A threshold just below its sigma_deviation flags exactly this source (sigma rule).
    min_sigma = float(stable["sigma_deviation"]) * 0.99
    request = {"params": {"min_sigma": min_sigma, "source_id": stable["source_id"]}}
    status, _, body = http("POST", server.base_url + "/api/jobs/ese-detect", request)
    assert status == 202
    job = json.loads(body)
    assert job["type"] == "ese-detect" and job["status"] in ("QUEUED", "STARTING", "STARTED")
    assert "total_items" not in job
    assert job["params"] == {
        "source_id": stable["source_id"],
        "min_sigma": min_sigma,
        "recompute": False,
    }
    done = wait_for_job(server.base_url, job["id"])
    assert done["status"] == "SUCCESS", done
    assert "total_items" not in done and done["params"] == job["params"]
    assert done["result"]["candidates_found"] == 1
    assert done["result"]["candidates"][0]["source_id"] == stable["source_id"]
    assert done["finished_at"] >= done["started_at"] >= done["created_at"] - 1
    row = seed_sql(
        engine, "SELECT * FROM ese_candidates WHERE source_id = :sid", sid=stable["source_id"]
    )
    assert len(row) == 1 and row["status"].iloc[0] == "active"
    assert row["flag_type"].iloc[0].startswith("outlier")  # the seed rule's flags
    assert row["significance"].iloc[0] == pytest.approx(stable["sigma_deviation"], rel=1e-9)
    # The change is recorded with the run that made it (so `ese candidates undo` can undo it).
    changes = seed_sql(
        engine, "SELECT * FROM ese_candidate_history WHERE run_id = :rid", rid=job["id"]
    )
    assert changes[["source_id", "new_status"]].to_numpy().tolist() == [
        [stable["source_id"], "active"]
    ]
    # The run is in the instance the Dagster UI reads, tagged with its request and database.
    with dg.DagsterInstance.from_config(str(workspace.dagster_home)) as instance:
        run = instance.get_run_by_id(job["id"])
        assert run.job_name == "ese_detect" and run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags["ese/job_type"] == "ese-detect"
        assert run.tags["ese/products_db"].endswith(workspace.products_db)


def test_batch_detection_job_and_its_status(server, engine):
    ids = truth_ese_ids(server.workspace)
    request = {
        "job_type": "ese-detect",
        "params": {"min_sigma": 5.0, "recompute": True, "source_ids": [*ids, "NVSS nowhere"]},
    }
    status, _, body = http("POST", server.base_url + "/api/batch/ese-detect", request)
    assert status == 202
    job = json.loads(body)
    assert job["type"] == "batch_ese-detect" and job["total_items"] == 3
    done = wait_for_job(server.base_url, job["id"])
    assert done["status"] == "SUCCESS" and done["completed_items"] == 3
    assert done["result"]["unknown_source_ids"] == ["NVSS nowhere"]
    assert {c["source_id"] for c in done["result"]["candidates"]} == set(ids)
    assert get_json(f"{server.base_url}/api/batch/{job['id']}")[1]["id"] == job["id"]
    # Requests the seed's endpoint refuses: another job type, unknown parameters, bad presets.
    for bad in (
        {"job_type": "image", "params": {}},
        {"job_type": "ese-detect", "params": {"fits_paths": ["/x.fits"]}},
        {"job_type": "ese-detect", "params": {"preset": "reckless"}},
        {"job_type": "ese-detect", "params": {"min_sigma": -1}},
    ):
        assert http("POST", server.base_url + "/api/batch/ese-detect", bad)[0] == 422, bad
    assert get_json(server.base_url + "/api/jobs/no-such-run")[0] == 404
    unknown = {"params": {"source_id": "NVSS nowhere"}}
    assert http("POST", server.base_url + "/api/jobs/ese-detect", unknown)[0] == 404


# ------------------------------------------------------------------------- candidate list


def test_candidate_filters_and_paging_match_the_table(server, engine):
    # More variety than the two ESEs: a sensitive run flags outlier (seed rule) candidates too.
    status, _, body = http(
        "POST", server.base_url + "/api/batch/ese-detect", {"params": {"min_sigma": 2.0}}
    )
    assert status == 202
    assert wait_for_job(server.base_url, json.loads(body)["id"])["status"] == ("SUCCESS")
    table = seed_sql(engine, "SELECT * FROM ese_candidates").sort_values(
        ["significance", "id"], ascending=[False, True]
    )
    assert len(table) >= 4 and table["flag_type"].nunique() >= 2

    def ids(query: str) -> list[int]:
        status, body = get_json(f"{server.base_url}/api/ese/candidates?{query}&limit=500")
        assert status == 200, body
        assert body["total"] == len(body["candidates"])
        return [c["id"] for c in body["candidates"]]

    assert ids("status=all") == table["id"].tolist()
    assert ids("status=active") == table.loc[table["status"] == "active", "id"].tolist()
    for rule in ("dip", "outlier"):
        fired = table["flag_type"].str.split("+").apply(lambda parts, r=rule: r in parts)
        assert ids(f"flag_type={rule}") == table.loc[fired, "id"].tolist()
    cut = float(table["significance"].median())
    assert ids(f"min_significance={cut}") == table.loc[table["significance"] >= cut, "id"].tolist()
    night = "2025-01-10"
    seen = (table["night"] <= night) & (table["last_night"].fillna(table["night"]) >= night)
    assert ids(f"night={night}") == table.loc[seen, "id"].tolist()

    # Paging: pages of 2 cover the table in order; the size is bounded.
    pages, offset = [], 0
    while True:
        status, body = get_json(f"{server.base_url}/api/ese/candidates?limit=2&offset={offset}")
        assert body["total"] == len(table) and len(body["candidates"]) <= 2
        if not body["candidates"]:
            break
        pages += [c["id"] for c in body["candidates"]]
        offset += 2
    assert pages == table["id"].tolist()
    for bad in ("limit=501", "limit=0", "offset=-1", "status=closed", "night=10/01/2025"):
        assert get_json(f"{server.base_url}/api/ese/candidates?{bad}")[0] == 422, bad


# ------------------------------------------------------------------------- review writes


def test_status_changes_are_written_with_their_history(server, engine):
    source_id = truth_ese_ids(server.workspace)[1]
    url = f"{server.base_url}/api/ese/candidates/{seg(source_id)}/status"
    history_url = f"{server.base_url}/api/v1/sources/{seg(source_id)}/candidates"

    def stored() -> pd.Series:
        return seed_sql(
            engine,
            "SELECT id, status, notes, investigated_at FROM ese_candidates "
            "WHERE source_id = :sid ORDER BY id DESC",
            sid=source_id,
        ).iloc[0]

    change = {"status": "investigated", "notes": "chromatic? ask for VLA time", "by": "ana"}
    status, _, body = http("POST", url, change)
    assert status == 200, body
    row = stored()
    assert row["status"] == "investigated" and row["investigated_at"] > 0
    assert "ask for VLA time" in row["notes"]
    # Reopen: back to active, by another person.
    status, _, body = http("POST", url, {"status": "active", "notes": "new epochs", "by": "bo"})
    assert status == 200, body
    assert stored()["status"] == "active"
    assert http("POST", url, {"status": "active"})[0] == 409  # already active

    # The history the API shows is the ese_candidate_history table, oldest first.
    status, hist = get_json(history_url)
    table = seed_sql(
        engine,
        "SELECT changed_by, old_status, new_status, note FROM ese_candidate_history "
        "WHERE candidate_id = :cid ORDER BY id",
        cid=int(row["id"]),
    )
    got = [(h["by"], h["old_status"], h["new_status"], h["note"]) for h in hist["history"]]
    assert got == [tuple(None if pd.isna(v) else v for v in r) for r in table.to_numpy()]
    assert got[-2:] == [
        ("ana", "active", "investigated", "chromatic? ask for VLA time"),
        ("bo", "investigated", "active", "new epochs"),
    ]
    assert got[0][1] is None and got[0][2] == "active"  # created by the pipeline's run
    # Not allowed: a status outside the workflow, unknown fields, a source with no candidate.
    assert http("POST", url, {"status": "closed"})[0] == 422
    assert http("POST", url, {"status": "dismissed", "colour": "red"})[0] == 422
    nowhere = f"{server.base_url}/api/ese/candidates/{seg('NVSS nowhere')}/status"
    assert http("POST", nowhere, {"status": "dismissed"})[0] == 409


def test_cross_site_writes_and_foreign_hosts_are_refused(server):
    source_id = truth_ese_ids(server.workspace)[0]
    url = f"{server.base_url}/api/ese/candidates/{seg(source_id)}/status"
    evil = {"Origin": "http://evil.example"}
    assert http("POST", url, {"status": "dismissed"}, headers=evil)[0] == 403
    # DNS rebinding: a loopback server answers loopback host names only.
    assert http("GET", server.base_url + "/api/health", headers={"Host": "evil.example"})[0] == 400
    assert (
        get_json(f"{server.base_url}/api/ese/candidates?source_id={seg(source_id)}")[1][
            "candidates"
        ][0]["status"]
        == "active"
    )


def test_eta_v_points_cover_every_source(server, engine):
    status, points = get_json(server.base_url + "/api/v1/eta-v")
    assert status == 200
    n_stats = seed_sql(engine, "SELECT COUNT(*) AS n FROM variability_stats")["n"].iloc[0]
    assert len(points) == n_stats
    flagged = {p["source_id"] for p in points if p["status"]}
    assert set(truth_ese_ids(server.workspace)) <= flagged


# ------------------------------------------------------------------------- the token rule


def test_off_loopback_server_needs_the_token_for_writes(workspace, tmp_path):
    ws = copy_workspace(workspace, tmp_path / "ws")
    with WebServer(ws, host="0.0.0.0", extra_env={"ESE_WEB_TOKEN": TOKEN}) as srv:
        source_id = truth_ese_ids(ws)[0]
        url = f"{srv.base_url}/api/ese/candidates/{seg(source_id)}/status"
        change = {"status": "dismissed", "notes": "token test"}
        status, headers, _ = http("POST", url, change)
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        wrong = {"Authorization": "Bearer " + TOKEN[:-1] + "x"}
        assert http("POST", url, change, headers=wrong)[0] == 401
        assert http("POST", srv.base_url + "/api/jobs/ese-detect", {"params": {}})[0] == 401
        # Reads need no token, and nothing was written by the refused requests.
        status, body = get_json(f"{srv.base_url}/api/ese/candidates?source_id={seg(source_id)}")
        assert status == 200 and body["candidates"][0]["status"] == "active"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert http("POST", url, change, headers=auth)[0] == 200
        status, body = get_json(f"{srv.base_url}/api/ese/candidates?source_id={seg(source_id)}")
        assert body["candidates"][0]["status"] == "dismissed"


@pytest.mark.parametrize(
    ("host", "env", "message"),
    [
        ("0.0.0.0", {}, "refusing to listen on 0.0.0.0"),
        ("0.0.0.0", {"ESE_WEB_TOKEN": "short"}, "at least 16"),
        ("127.0.0.1", {"PIPELINE_PRODUCTS_DB": "/nonexistent/products.sqlite3"}, "does not exist"),
    ],
)
def test_server_refuses_unsafe_or_empty_configurations(workspace, host, env, message):
    srv = WebServer(workspace, host=host, extra_env=env)
    proc = subprocess.run(srv.command(), env=srv.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not os.path.exists("/nonexistent/products.sqlite3")


# ------------------------------------------------------------------------- both backends


def _copy_rows(src, dst, tables) -> None:
    from ese_assets.storage.schema import metadata

    with src.connect() as conn_in, dst.begin() as conn_out:
        for name in tables:
            table = metadata.tables[name]
            rows = [dict(r._mapping) for r in conn_in.execute(sa.select(table))]
            if rows:
                conn_out.execute(table.insert(), rows)


def test_candidate_queries_agree_on_sqlite_and_postgresql(workspace, postgres_engine):
    """The list's own SQL (filters, count, paging) gives the same pages on both backends."""
    from ese_assets.web import queries

    sqlite = make_engine(workspace.products_db)
    _copy_rows(sqlite, postgres_engine, ["variability_stats", "ese_candidates"])
    filters = [
        queries.CandidateFilter(),
        queries.CandidateFilter(status="open"),
        queries.CandidateFilter(flag_type="dip"),
        queries.CandidateFilter(flag_type="outlier", min_significance=2.0),
        queries.CandidateFilter(night="2025-01-12"),
    ]
    for f in filters:
        for limit, offset in ((500, 0), (1, 1)):
            a = queries.candidate_page(sqlite, f, limit=limit, offset=offset)
            b = queries.candidate_page(postgres_engine, f, limit=limit, offset=offset)
            assert a[1] == b[1], f
            assert [r["id"] for r in a[0]] == [r["id"] for r in b[0]], f
            for ra, rb in zip(a[0], b[0], strict=True):
                assert ra["significance"] == pytest.approx(rb["significance"], rel=1e-12)
                assert ra["dip_start_date"] == rb["dip_start_date"]


def test_history_of_a_candidate_older_than_the_history_table(workspace, tmp_path):
    """A candidate reviewed before ``ese_candidate_history`` existed: its flagging and the review
    lines of its notes are its history."""
    from ese_assets.web import queries

    ws = copy_workspace(workspace, tmp_path / "ws")
    engine = make_engine(ws.products_db)
    source_id = truth_ese_ids(ws)[0]
    with engine.begin() as conn:
        cid = conn.execute(
            sa.text("SELECT id FROM ese_candidates WHERE source_id = :sid"), {"sid": source_id}
        ).scalar_one()
        conn.execute(
            sa.text("DELETE FROM ese_candidate_history WHERE candidate_id = :c"), {"c": cid}
        )
        conn.execute(
            sa.text(
                "UPDATE ese_candidates SET status = 'dismissed', notes = :n, flagged_at = :f "
                "WHERE id = :c"
            ),
            {
                "c": cid,
                "f": dt.datetime(2025, 1, 1, 3, 0, 0, tzinfo=dt.UTC).timestamp(),
                "n": "2025-01-02T10:00:00Z ana: investigated: look again\n"
                "2025-01-03T11:30:00Z bo: dismissed",
            },
        )
    events = queries.status_history(engine, queries.source_candidates(engine, source_id))
    assert [(e["at"], e["by"], e["old_status"], e["new_status"], e["note"]) for e in events] == [
        ("2025-01-01T03:00:00Z", "auto", None, "active", None),
        ("2025-01-02T10:00:00Z", "ana", "active", "investigated", "look again"),
        ("2025-01-03T11:30:00Z", "bo", "investigated", "dismissed", None),
    ]
