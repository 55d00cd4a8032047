"""The review web app in a real headless browser: Debian's ``chromium`` driven by Selenium through
Debian's ``chromium-driver`` (never a downloaded browser), against ``python -m ese_assets.web``
serving a products database built by the real pipeline.

The flow a reviewer follows: open the candidate list, open a candidate, see its lightcurve (the
plot's SVG has one marker per measurement, hovering a marker shows its values), dismiss it with a
note, see the change in the page and in the database, reopen it; then the η–V page. Screenshots
are saved under ``$ESE_TEST_ARTIFACTS/web`` (default: the test's temporary directory).

Skipped with a message when chromium or chromedriver is missing, unless ``ESE_REQUIRE_BROWSER=1``
(``.ci/run`` installs both and sets it), then a missing browser fails the test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import pytest
import sqlalchemy as sa

from ese_assets.storage.engine import make_engine
from ese_assets_tests.web_fixtures import (
    WebServer,
    copy_workspace,
    get_json,
    shared_workspace,
    truth_ese_ids,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REQUIRE_ENV = "ESE_REQUIRE_BROWSER"
ARTIFACTS_ENV = "ESE_TEST_ARTIFACTS"
#: Flags of a browser that stays off the network and out of the user's profile.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-quic",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)
WAIT_S = 30


def _require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if not missing:
        return
    message = (
        f"browser test needs Debian's chromium and chromium-driver ({', '.join(missing)} "
        "missing): apt-get install chromium chromium-driver"
    )
    if os.environ.get(REQUIRE_ENV, "").strip() in ("1", "true", "yes"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    root = os.environ.get(ARTIFACTS_ENV, "").strip()
    out = Path(root) / "web" if root else tmp_path_factory.mktemp("web_screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="ese-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _require_browser()
    ws = copy_workspace(shared_workspace(tmp_path_factory), tmp_path_factory.mktemp("web_browser"))
    with WebServer(ws) as srv:
        yield srv


def _wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(condition, message)


def test_review_a_candidate_in_the_browser(browser, server, artifacts):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    engine = make_engine(server.workspace.products_db)
    with engine.connect() as conn:
        open_rows = pd.read_sql_query(
            sa.text(
                "SELECT id, source_id, significance FROM ese_candidates "
                "WHERE status IN ('active', 'investigated') ORDER BY significance DESC, id"
            ),
            conn,
        )
    ese = truth_ese_ids(server.workspace)
    assert set(ese) <= set(open_rows["source_id"])

    # 1. The list: one row per open candidate, most significant first.
    browser.get(server.base_url + "/candidates")
    rows = browser.find_elements(By.CSS_SELECTOR, "#candidates tbody tr")
    assert [r.get_attribute("data-source-id") for r in rows] == open_rows["source_id"].tolist()
    browser.save_screenshot(str(artifacts / "01_candidates.png"))

    # 2. Open an injected ESE's page from the list.
    source_id = ese[0]
    link = browser.find_element(
        By.CSS_SELECTOR, f'#candidates tr[data-source-id="{source_id}"] a.source-link'
    )
    link.click()
    _wait(browser, lambda d: d.find_element(By.ID, "source-id").text == source_id, "source page")
    assert browser.current_url.endswith("/sources/" + quote(source_id, safe=""))

    # 3. Its lightcurve: plotly's SVG holds one marker per measurement of the API's lightcurve.
    _, lc = get_json(f"{server.base_url}/api/v1/sources/{quote(source_id, safe='')}/lightcurve")
    n_points = lc["n_points"]
    _wait(
        browser,
        lambda d: d.find_element(By.ID, "lightcurve").get_attribute("data-ready") == "true",
        "lightcurve plot drawn",
    )
    markers = browser.find_elements(By.CSS_SELECTOR, "#lightcurve .scatterlayer path.point")
    assert len(markers) == n_points > 20
    svg = browser.find_element(By.CSS_SELECTOR, "#lightcurve svg.main-svg")
    assert svg.size["width"] > 600 and svg.size["height"] > 300
    # The event window is shaded (a plotly shape) and hovering a marker shows its values.
    assert browser.find_elements(By.CSS_SELECTOR, "#lightcurve .shapelayer path")
    ActionChains(browser).move_to_element(markers[0]).perform()
    hover = _wait(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#lightcurve .hoverlayer .hovertext"),
        "hover label",
    )
    first = lc["data_points"][0]
    assert f"MJD {first['mjd']:.4f}" in hover[0].text
    assert first["image_path"].rsplit("/", 1)[-1] in hover[0].text
    browser.save_screenshot(str(artifacts / "02_source_lightcurve.png"))

    # 4. Dismiss it with a note; the page shows the new status and the history line.
    note = "achromatic in the 3 GHz follow-up, not an ESE"
    browser.find_element(By.ID, "note").send_keys(note)
    browser.find_element(By.ID, "reviewer").send_keys("browser-test")
    browser.find_element(By.ID, "btn-dismissed").click()
    _wait(
        browser,
        lambda d: (
            d.find_element(By.ID, "status").text == "dismissed"
            and d.find_elements(By.CSS_SELECTOR, "#history tbody tr")
            and "dismissed" in d.find_elements(By.CSS_SELECTOR, "#history tbody tr")[-1].text
        ),
        "dismissed status and history shown",
    )
    last = browser.find_elements(By.CSS_SELECTOR, "#history tbody tr")[-1].text
    assert "browser-test" in last and note in last and "active → dismissed" in last
    assert browser.find_element(By.ID, "btn-dismissed").get_attribute("disabled")
    _wait(
        browser,
        lambda d: d.find_element(By.ID, "lightcurve").get_attribute("data-ready") == "true",
        "lightcurve redrawn after reload",
    )
    browser.save_screenshot(str(artifacts / "03_dismissed.png"))

    # 5. The database has the change (the seed's SQL).
    with engine.connect() as conn:
        row = (
            conn.execute(
                sa.text(
                    "SELECT status, notes, dismissed_at FROM ese_candidates "
                    "WHERE source_id = :sid ORDER BY id DESC"
                ),
                {"sid": source_id},
            )
            .mappings()
            .first()
        )
    assert row["status"] == "dismissed" and row["dismissed_at"] > 0
    assert note in row["notes"] and "browser-test" in row["notes"]

    # 6. The list no longer shows it among the open candidates.
    browser.get(server.base_url + "/candidates")
    listed = [
        r.get_attribute("data-source-id")
        for r in browser.find_elements(By.CSS_SELECTOR, "#candidates tbody tr")
    ]
    assert source_id not in listed and len(listed) == len(open_rows) - 1

    # 7. Reopen it from its page.
    browser.get(f"{server.base_url}/sources/{quote(source_id, safe='')}")
    browser.find_element(By.ID, "note").send_keys("reopened: new epochs")
    browser.find_element(By.ID, "btn-reopen").click()
    _wait(
        browser,
        lambda d: (
            d.find_element(By.ID, "status").text == "active"
            and "dismissed → active"
            in d.find_elements(By.CSS_SELECTOR, "#history tbody tr")[-1].text
        ),
        "reopened",
    )
    with engine.connect() as conn:
        status = conn.execute(
            sa.text("SELECT status FROM ese_candidates WHERE source_id = :sid ORDER BY id DESC"),
            {"sid": source_id},
        ).scalar()
    assert status == "active"


def test_eta_v_page_plots_every_source(browser, server, artifacts):
    from selenium.webdriver.common.by import By

    _, points = get_json(server.base_url + "/api/v1/eta-v")
    plottable = [p for p in points if (p["eta_metric"] or 0) > 0 and (p["v_index"] or 0) > 0]
    browser.get(server.base_url + "/eta-v")
    _wait(
        browser,
        lambda d: d.find_element(By.ID, "etav").get_attribute("data-ready") == "true",
        "eta-V plot drawn",
    )
    markers = browser.find_elements(By.CSS_SELECTOR, "#etav .scatterlayer path.point")
    assert len(markers) == len(plottable) > 30
    legend = browser.find_element(By.CSS_SELECTOR, "#etav .legend").text
    assert "not flagged" in legend
    browser.save_screenshot(str(artifacts / "04_eta_v.png"))
