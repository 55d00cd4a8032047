"""Every README example runs as written after ``make demo``, and the seed guide's SQL (section 6)
returns the expected rows on the demo database.

One ``make demo`` (module fixture) runs in a temporary checkout (the repository's Makefile and
dagster.yaml, its ``.venv`` linked), with none of the pipeline's variables set, as on a clean
clone. Then the README's code blocks are read from README.md and run in that checkout in README
order, as a user types them: shell blocks through ``bash`` (after ``source .venv/bin/activate;
source data/demo/demo.env`` when the README's "After make demo" has told the user to type those),
Python blocks through the venv's python, the ``curl`` block against a real ``python -m
ese_assets.web`` server (on a free port: ``localhost:8000`` is replaced by it). Exit codes and the
documented output are checked. :data:`EXCLUDED` lists the blocks that cannot run here and why;
every block of the README is either run by a test or listed there (a new example without a test
fails :func:`test_every_readme_block_is_run_or_excluded`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io.votable import parse_single_table

from ese_assets import cli
from ese_assets.core.catalog import unit_vectors
from ese_assets_tests.web_fixtures import free_port, get_json, http

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
#: The seed user guide (beside the clone in CI; absent for users: then its copy below is used).
SEED_GUIDE = REPO.parent / "shared" / "seeds" / "001_9228c854f21afa8a.txt"
#: The demo's sources the README's examples name.
ESE_ID = "J100151+294338"
OTHER_ID = "J095934+293829"

# --------------------------------------------------------------------------- README code blocks


@dataclass(frozen=True)
class Block:
    heading: str  # the nearest heading above the block, without the #'s
    index: int  # its position among the blocks under that heading
    lang: str
    text: str
    line: int  # first line of the block's text in README.md

    @property
    def key(self) -> tuple[str, int]:
        return (self.heading, self.index)


def readme_blocks() -> list[Block]:
    blocks, heading, counts = [], "", {}
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            heading = line.lstrip("#").strip()
        elif line.startswith("```"):
            lang = line[3:].strip()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            index = counts.get(heading, 0)
            counts[heading] = index + 1
            blocks.append(Block(heading, index, lang, "\n".join(lines[i + 1 : end]) + "\n", i + 2))
            i = end
        i += 1
    return blocks


def block(heading: str, index: int = 0) -> Block:
    found = [b for b in readme_blocks() if b.key == (heading, index)]
    assert found, f"README.md has no code block {index} under {heading!r}"
    return found[0]


#: Blocks that cannot run in a test, and why. Keep this list tiny.
EXCLUDED: dict[tuple[str, int], str] = {
    ("Two commands", 1): "`make ui` runs until Ctrl-C; its two servers are tested elsewhere: the "
    "web app by the curl block below (the same `python -m ese_assets.web`) and "
    "test_web_browser.py, the Dagster UI by test_e2e_dagster_dev.py",
    ("Using it on your own data", 0): "points at the user's own /data/... files and ends in "
    "`make ui`; the same commands run on the demo's files in the blocks below",
}
#: Blocks run by the tests below (the test that runs each).
RUN: dict[tuple[str, int], str] = {
    ("Two commands", 0): "demo fixture (`make demo`); `make test` is this suite",
    ("Two commands", 2): "test_make_demo_prints_what_the_readme_shows",
    ("After `make demo`", 0): "test_after_make_demo_commands",
    ("Command line", 0): "test_command_line_synopsis_matches_the_parser",
    ("Command line", 1): "test_command_line_examples",
    ("Python API", 0): "test_python_api_example",
    ("Python API", 1): "test_photometry_manager_example",
    ("Python API", 2): "test_relative_lightcurve_example",
    ("Plots", 0): "test_plot_commands",
    ("Plots", 1): "test_plot_python_example",
    ("Web app and REST API", 0): "test_curl_examples_against_the_server",
    # Needs a broker, PostgreSQL and Celery workers: test_distributed.py runs these commands (its
    # worker_argv / execute_argv), and test_distributed_block_is_what_test_distributed_runs
    # checks that the block and those commands are the same.
    ("Past one machine", 0): "test_distributed_block_is_what_test_distributed_runs",
}


def test_every_readme_block_is_run_or_excluded():
    keys = [b.key for b in readme_blocks()]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(RUN) | set(EXCLUDED), (
        "README code blocks without a test (add one to RUN) or gone (remove them): "
        f"{sorted(set(keys) ^ (set(RUN) | set(EXCLUDED)))}"
    )
    assert not set(RUN) & set(EXCLUDED)


# ----------------------------------------------------------------------------------- the demo


def _clean_env() -> dict[str, str]:
    """A new user's shell: none of the pipeline's variables, no virtualenv active."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ESE_", "PIPELINE_", "MASTER_", "DAGSTER_", "WEB_", "VIRTUAL_ENV"))
        # Under `make test` (as in .ci/run) make's own variables would make the inner `make demo`
        # print "make[1]: Entering/Leaving directory" lines a user's shell never shows.
        and k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")
    }
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env


@dataclass
class Demo:
    root: Path  # the checkout
    output: str  # what `make demo` printed
    pristine_db: Path  # a copy of the products database right after the demo

    @property
    def products_db(self) -> Path:
        return self.root / "data" / "demo" / "products.sqlite3"

    def env(self) -> dict[str, str]:
        """The clean shell after ``source data/demo/demo.env`` and ``.venv/bin/activate``."""
        exports = {}
        for line in (self.root / "data" / "demo" / "demo.env").read_text().splitlines():
            m = re.match(r"export (\w+)=(.*)", line)
            if m:
                exports[m.group(1)] = shlex.split(m.group(2))[0]
        env = {**_clean_env(), **exports}
        env["PATH"] = str(self.root / ".venv" / "bin") + os.pathsep + env["PATH"]
        return env

    def bash(self, script: str, *, after_setup: bool = True, timeout: float = 300) -> str:
        """Run a README shell block in the checkout (``set -e``); returns stdout."""
        setup = "source .venv/bin/activate; source data/demo/demo.env\n" if after_setup else ""
        proc = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", setup + script],
            cwd=self.root,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, f"{script}\nexit {proc.returncode}\n{proc.stderr[-3000:]}"
        return proc.stdout

    def python(self, code: str, timeout: float = 300) -> str:
        proc = subprocess.run(
            [str(self.root / ".venv" / "bin" / "python"), "-c", code],
            cwd=self.root,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, f"{code}\nexit {proc.returncode}\n{proc.stderr[-3000:]}"
        return proc.stdout

    def sql(self, query: str, params=(), db: Path | None = None) -> pd.DataFrame:
        with sqlite3.connect(db or self.products_db) as conn:
            return pd.read_sql_query(query, conn, params=params)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Demo:
    """``make demo`` in a temporary checkout, once for this module."""
    root = tmp_path_factory.mktemp("checkout")
    for name in ("Makefile", "pyproject.toml", "requirements.lock"):
        (root / name).symlink_to(REPO / name)
    shutil.copy(REPO / "dagster.yaml", root / "dagster.yaml")
    (root / ".venv").symlink_to(Path(sys.prefix))
    # `-o .venv/.installed`: the test runs inside the installed environment, which `make` must
    # not reinstall (it would when the lock file is newer); everything else is `make demo`.
    proc = subprocess.run(
        ["make", "-o", ".venv/.installed", "demo"],
        cwd=root,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pristine = root / "pristine.sqlite3"
    with (
        sqlite3.connect(root / "data" / "demo" / "products.sqlite3") as src,
        sqlite3.connect(pristine) as dst,
    ):
        src.backup(dst)
    return Demo(root, proc.stdout, pristine)


def test_make_demo_prints_what_the_readme_shows(demo):
    shown = block("Two commands", 2).text.splitlines()
    printed = demo.output.splitlines()
    start = printed.index(shown[0])  # the README shows the end of the output
    for want, got in zip(shown, printed[start:], strict=True):
        want = want.replace("/path/to/checkout", str(demo.root))
        # the checkout's .venv links to the environment running this test: `make demo` names it
        got = got.replace(str(Path(sys.prefix)), ".venv")
        if re.fullmatch(r"total \d+ s\.", want):  # the time differs from machine to machine
            assert re.fullmatch(r"total \d+ s\.", got), got
        else:
            assert got == want


def test_after_make_demo_commands(demo):
    text = block("After `make demo`").text
    assert text.startswith("source .venv/bin/activate")
    out = demo.bash(text, after_setup=False)
    # `ese candidates list`: a table, then `ese candidates show`: "source ID", its candidate...
    listing, rest = out.split(f"source {ESE_ID}\n", 1)
    columns = listing.splitlines()[0].split()
    assert {"id", "source_id", "status", "significance", "flag_type"} <= set(columns)
    at = columns.index("source_id")
    listed = [line.split()[at] for line in listing.splitlines()[1:] if line.strip()]
    active = demo.sql(
        "SELECT source_id FROM ese_candidates WHERE status = 'active' ORDER BY significance DESC"
    )
    assert listed[: len(active)] == list(active["source_id"])  # most significant first
    assert re.match(r"candidate \d+: active, dip, significance", rest)
    assert "statistics:" in rest and "history:" in rest
    dry = json.loads(out[out.index('{\n  "products_db"') :])
    assert dry["dry_run"] is True and dry["preset"] == "sensitive"
    # nothing was written: the candidates are those of the demo
    assert demo.sql("SELECT COUNT(*) AS n FROM ese_candidates")["n"].iloc[0] == len(
        demo.sql("SELECT id FROM ese_candidates", db=demo.pristine_db)
    )


# ------------------------------------------------------------------------------- command line


def _synopsis_lines(text: str) -> list[str]:
    """The ``ese ...`` lines of the synopsis block, continuation lines joined, comments cut."""
    lines: list[str] = []
    for raw in text.splitlines():
        line = raw.split("  #")[0].split(" # ")[0].rstrip()
        if line.startswith("ese "):
            lines.append(line)
        elif line.strip() and lines:
            lines[-1] += " " + line.strip()
    return lines


def _subparser(parser, words: list[str]):
    for word in words:
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        assert word in sub.choices, f"`ese {' '.join(words)}`: no sub-command {word!r}"
        parser = sub.choices[word]
    return parser


def test_command_line_synopsis_matches_the_parser():
    lines = _synopsis_lines(block("Command line", 0).text)
    assert len(lines) >= 15
    parser = cli.build_parser()
    for line in lines:
        tokens = line.split()[1:]
        words: list[str] = []
        for tok in tokens:
            if not re.fullmatch(r"[a-z][a-z|-]*", tok):
                break
            words.append(tok)
        alternatives = [w.split("|") for w in words]
        paths = [[]]
        for alts in alternatives:
            paths = [[*p, a] for p in paths for a in alts]
        options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line))
        for path in paths:
            # a trailing word may be a positional value (`ese mark ID investigated|dismissed`)
            while path and not _has_path(parser, path):
                path = path[:-1]
            assert path, line
            sub = _subparser(parser, path)
            known = {s for a in sub._actions for s in a.option_strings}
            assert options <= known, f"{line}: unknown options {sorted(options - known)}"
            for action in sub._actions:
                if action.choices and action.option_strings:
                    for opt in action.option_strings:
                        m = re.search(re.escape(opt) + r" ([a-z][a-z0-9|-]*\|[a-z0-9|-]+)", line)
                        if m:
                            assert set(m.group(1).split("|")) <= set(action.choices), line


def _has_path(parser, path: list[str]) -> bool:
    try:
        _subparser(parser, path)
    except (AssertionError, StopIteration):
        return False
    return True


def test_command_line_examples(demo):
    text = block("Command line", 1).text
    assert text.startswith("source .venv/bin/activate")
    out = demo.bash(text, after_setup=False)
    # nvss: a table of the catalog sources above 20 mJy in the image, measured as the pipeline
    # measured them (same image, same code)
    image = str(demo.root / "data/demo/incoming/img_20250110T030000.fits")
    stored = demo.sql(
        "SELECT source_id, peak_jyb FROM photometry WHERE image_path = ? AND nvss_flux_mjy >= 20",
        (image,),
        db=demo.pristine_db,
    ).set_index("source_id")
    lines = out.splitlines()
    header = lines.index(next(ln for ln in lines if ln.split()[:1] == ["source_id"]))
    table = pd.DataFrame(
        [ln.split() for ln in lines[header + 1 : header + 1 + len(stored)]],
        columns=lines[header].split(),
    ).set_index("source_id")
    assert sorted(table.index) == sorted(stored.index)
    # Without the fainter catalog sources as neighbours (--min-mjy 20) the background around each
    # source differs slightly: within a small fraction of the error of the pipeline's value.
    diff = (table["flux_mjy"].astype(float) - stored.loc[table.index, "peak_jyb"] * 1e3).abs()
    assert (diff < 0.25 * table["flux_err_mjy"].astype(float)).all()
    # batch: both sources in every image of the survey
    results = pd.read_csv(demo.root / "photometry_results.csv")
    n_images = len(pd.read_csv(demo.root / "data/demo/truth_images.csv"))
    assert len(results) == 2 * n_images == 240
    assert set(results["source_id"]) == {ESE_ID, OTHER_ID}
    truth = demo.sql(
        "SELECT image_path, peak_jyb FROM photometry WHERE source_id = ?",
        (ESE_ID,),
        demo.pristine_db,
    ).set_index("image_path")
    mine = results[results["source_id"] == ESE_ID].set_index("image_path")
    mine.index = [str((demo.root / p).resolve()) for p in mine.index]
    # The same images measured at the same positions (rounded to 1e-6 deg in the list), with two
    # sources instead of the catalog as neighbours: the fluxes agree far within the errors.
    diff = (mine["peak_jyb"] - truth.loc[mine.index, "peak_jyb"]).abs()
    assert (diff < 0.5 * mine["peak_err_jyb"]).all()
    # the VOTable: every measurement of the source, with units
    table = parse_single_table(demo.root / "J100151+294338.vot").to_table()
    lc = demo.sql(
        "SELECT mjd, peak_jyb FROM photometry WHERE source_id = ? ORDER BY mjd", (ESE_ID,)
    )
    assert len(table) == len(lc) == n_images
    np.testing.assert_allclose(table["peak_jyb"], lc["peak_jyb"])
    assert str(table["peak_jyb"].unit) == "Jy / beam"
    # the bulk export: one CSV per open candidate
    open_ids = demo.sql(
        "SELECT DISTINCT source_id FROM ese_candidates WHERE status IN ('active', 'investigated')"
    )["source_id"]
    written = sorted(p.name for p in (demo.root / "lightcurves").iterdir())
    assert written == sorted(f"{s}_lightcurve.csv" for s in open_ids)
    one = pd.read_csv(demo.root / "lightcurves" / f"{ESE_ID}_lightcurve.csv")
    np.testing.assert_allclose(one["peak_jyb"], lc["peak_jyb"])


def test_photometry_batch_skips_bad_files_with_one_line(demo, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for src in sorted((demo.root / "data/demo/incoming").glob("img_20250101*.fits")):
        shutil.copy(src, images / src.name)
    (images / "broken.fits").write_text("not a FITS file\n")
    good = images / "img_20250101T020000.fits"
    (images / "truncated.fits").write_bytes(good.read_bytes()[:5000])
    (images / "notes.txt").write_text("ignored: not FITS by name and first bytes\n")
    sources = tmp_path / "sources.csv"
    sources.write_text(f"name,ra,dec\n{ESE_ID},150.463308,29.727218\nFAR,10.0,-5.0\n")
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("ese")),
            *("photometry", "batch", "--source-list", str(sources)),
            *("--image-dir", str(images), "--output", "r.csv"),
        ],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    skipped = [ln for ln in re.split(r"[\r\n]", proc.stderr) if "skipped" in ln]
    assert len(skipped) == 2
    assert any("broken.fits" in ln for ln in skipped)
    assert any("truncated.fits" in ln and "truncated" in ln for ln in skipped)
    assert "4/4" in proc.stderr or "6/6" in proc.stderr  # the progress bar reached the end
    rows = pd.read_csv(tmp_path / "r.csv")
    assert list(rows["source_id"].unique()) == [ESE_ID]  # FAR is in no image
    assert len(rows) == 4


# --------------------------------------------------------------------------------- Python API


def test_python_api_example(demo):
    out = demo.python(block("Python API", 0).text)
    lines = out.splitlines()
    assert lines and all(
        re.fullmatch(r"J\d{6}[+-]\d{6}: sigma=\d+\.\d, chi2/nu=\d+\.\d\d, [\w,]+", ln)
        for ln in lines
    ), out
    assert any(ln.startswith(ESE_ID + ":") for ln in lines)
    status = demo.sql(
        "SELECT status, notes FROM ese_candidates WHERE source_id = ? ORDER BY id DESC LIMIT 1",
        (ESE_ID,),
    )
    assert status["status"].iloc[0] == "dismissed"
    assert "achromatic, not an ESE" in status["notes"].iloc[0]
    assert (demo.root / "J100151+294338.pdf").read_bytes()[:5] == b"%PDF-"


def test_photometry_manager_example(demo):
    out = demo.python(block("Python API", 1).text)
    n = int(re.fullmatch(r"Measured (\d+) sources\n", out).group(1))
    # A second way: the pipeline's rows of that image within 1.5 deg of its centre, >= 5 mJy.
    image = str(demo.root / "data/demo/incoming/img_20250110T030000.fits")
    centre = demo.sql(
        "SELECT ra_center_deg, dec_center_deg FROM images WHERE path = ?", (image,)
    ).iloc[0]
    rows = demo.sql(
        "SELECT ra_deg, dec_deg FROM photometry WHERE image_path = ? AND nvss_flux_mjy >= 5",
        (image,),
        db=demo.pristine_db,
    )
    c = unit_vectors(np.array([centre["ra_center_deg"]]), np.array([centre["dec_center_deg"]]))
    cos_sep = unit_vectors(rows["ra_deg"].to_numpy(), rows["dec_deg"].to_numpy()) @ c[0]
    expected = int((cos_sep >= np.cos(np.radians(1.5))).sum())
    assert n == expected > 0


def test_relative_lightcurve_example(demo):
    out = demo.python(block("Python API", 2).text)
    m = re.fullmatch(r"(\d+) neighbours, (\d+) epochs, deepest (\d+)% down\n", out)
    assert m, out
    n_neighbours, n_epochs, depth = (int(g) for g in m.groups())
    # A second way: the stable sources within 0.5 deg in variability_stats, measured (not edge,
    # not blank) in at least half of the ESE host's images with median S/N >= 3.
    rows = demo.sql(
        "SELECT source_id, image_path, peak_jyb, peak_err_jyb FROM photometry "
        "WHERE (quality_flag & 9) = 0"  # the edge and blank bits
    )
    own = set(rows.loc[rows["source_id"] == ESE_ID, "image_path"])
    stats = demo.sql("SELECT source_id, ra_deg, dec_deg, eta_metric FROM variability_stats")
    host = stats[stats["source_id"] == ESE_ID].iloc[0]
    c = unit_vectors(np.array([host["ra_deg"]]), np.array([host["dec_deg"]]))[0]
    cos_sep = unit_vectors(stats["ra_deg"].to_numpy(), stats["dec_deg"].to_numpy()) @ c
    near = stats[(cos_sep >= np.cos(np.radians(0.5))) & (stats["eta_metric"] <= 1.5)]
    common = rows[rows["image_path"].isin(own) & rows["source_id"].isin(near["source_id"])]
    per = common.groupby("source_id").agg(
        n=("peak_jyb", "size"), f=("peak_jyb", "median"), e=("peak_err_jyb", "median")
    )
    per = per.drop(index=ESE_ID, errors="ignore")
    assert n_neighbours == int(((per["n"] >= len(own) / 2) & (per["f"] / per["e"] >= 3)).sum())
    assert n_epochs == len(own) == 120
    truth = pd.read_csv(demo.root / "data" / "demo" / "truth_sources.csv").set_index("name")
    assert abs(depth / 100 - truth.at[ESE_ID, "ese_depth"]) < 0.1


# -------------------------------------------------------------------------------------- plots


def test_plot_commands(demo):
    out = demo.bash(block("Plots", 0).text)
    assert f"wrote the lightcurve of {ESE_ID} to {ESE_ID}_lightcurve.png" in out
    assert (demo.root / f"{ESE_ID}_lightcurve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (demo.root / "lc.pdf").read_bytes()[:5] == b"%PDF-"
    assert (demo.root / "eta_v.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_python_example(demo):
    for name in ("lc.png", "3c286_lightcurve.pdf", "eta_v.png"):
        (demo.root / name).unlink(missing_ok=True)
    demo.python(block("Plots", 1).text)
    assert (demo.root / "lc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (demo.root / "3c286_lightcurve.pdf").read_bytes()[:5] == b"%PDF-"
    assert (demo.root / "eta_v.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ web/curl


def documented_keys(comment: str) -> tuple[set[str], bool]:
    """The top-level field names of a ``{a, b, c: [...], ...}`` comment, and whether it ends in
    ``...`` (more fields allowed)."""
    start = comment.index("{")
    depth, fields, current = 0, [], ""
    for ch in comment[start:]:
        if ch in "{[":
            depth += 1
            if depth == 1:
                continue
        if ch in "}]":
            depth -= 1
            if depth == 0:
                fields.append(current)
                break
        if depth == 1 and ch == ",":
            fields.append(current)
            current = ""
        elif depth == 1:
            current += ch
    names = [f.split(":")[0].strip() for f in fields]
    return {n for n in names if n and n != "..."}, "..." in names


@dataclass
class Command:
    comment: str  # the comment lines just above it
    text: str


def curl_commands(text: str) -> list[Command]:
    commands, comment, pending = [], "", ""
    for line in text.splitlines():
        if not pending and line.startswith("#"):
            comment += line.lstrip("# ") + " "
            continue
        pending += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(Command(comment.strip(), pending.strip()))
            comment, pending = "", ""
    return commands


def test_curl_examples_against_the_server(demo):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = demo.env()
    with open(demo.root / "web.log", "wb") as log:
        server = subprocess.Popen(
            [str(demo.root / ".venv/bin/python"), "-m", "ese_assets.web", "--port", str(port)],
            cwd=demo.root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_for(base, server)
            _run_curl_block(demo, port, base)
        finally:
            server.terminate()
            server.wait(timeout=30)


def _wait_for(base: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.poll() is None, "web server exited"
        try:
            if http("GET", base + "/api/health", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("web server did not start")


def _run_curl_block(demo: Demo, port: int, base: str) -> None:
    commands = curl_commands(block("Web app and REST API", 0).text)
    assert all("localhost:8000" in c.text for c in commands if c.text.startswith("curl"))
    script = "".join(
        f"{c.text.replace('localhost:8000', f'localhost:{port}')}\n"
        f"printf '\\n@@%d %d@@\\n' {i} $?\n"
        for i, c in enumerate(commands)
    )
    out = demo.bash("set +e\n" + script)
    outputs = {}
    for m in re.finditer(r"(.*?)\n@@(\d+) (\d+)@@\n", out, flags=re.DOTALL):
        i, rc = int(m.group(2)), int(m.group(3))
        assert rc == 0, f"{commands[i].text}: exit {rc}"
        outputs[i] = m.group(1)
    assert sorted(outputs) == list(range(len(commands)))

    def find(fragment: str) -> tuple[Command, str]:
        i = next(i for i, c in enumerate(commands) if fragment in c.text)
        return commands[i], outputs[i]

    n_points = len(demo.sql("SELECT id FROM photometry WHERE source_id = ?", (ESE_ID,)))
    cmd, body = find('/lightcurve"')
    keys, _ = documented_keys(cmd.comment)
    doc = json.loads(body)
    assert set(doc) == keys and doc["n_points"] == n_points == len(doc["data_points"])
    point_keys, _ = documented_keys(cmd.comment[cmd.comment.index("data_points") :])
    optional = {"normalized_flux_jy"} if "normalized_flux_jy" in cmd.comment else set()
    assert point_keys <= set(doc["data_points"][0]) <= point_keys | optional
    _, body = find("format=votable")
    path = demo.root / "curl.vot"
    path.write_text(body)
    assert len(parse_single_table(path).to_table()) == n_points
    _, body = find("/variability")
    stats = json.loads(body)
    row = demo.sql("SELECT n_obs, chi2_nu FROM variability_stats WHERE source_id = ?", (ESE_ID,))
    assert stats["n_obs"] == row["n_obs"].iloc[0]
    assert stats["chi2_nu"] == pytest.approx(row["chi2_nu"].iloc[0])
    _, body = find(f"{ESE_ID.replace('+', '%2B')}/candidates")
    assert ESE_ID in body and "history" in body
    cmd, body = find('/api/ese/candidates"')
    keys, _ = documented_keys(cmd.comment)
    listing = json.loads(body)
    assert set(listing) == keys
    total = demo.sql("SELECT COUNT(*) AS n FROM ese_candidates")  # no filter: every status
    assert listing["total"] == total["n"].iloc[0]
    _, body = find("limit=2&offset=2")
    page = json.loads(body)
    assert page["limit"] == 2 and page["offset"] == 2 and len(page["candidates"]) <= 2
    assert all("dip" in c["flag_type"] for c in page["candidates"])
    assert {c["status"] for c in page["candidates"]} <= {"active", "investigated"}
    cmd, body = find("/api/jobs/ese-detect")
    keys, more = documented_keys(cmd.comment)
    job = json.loads(body)
    assert more and keys <= set(job)
    cmd, body = find("api/jobs/$JOB_ID")
    assert json.loads(body)["status"] in {"QUEUED", "STARTED", "SUCCESS", "FAILURE"}
    # Both detection runs finish in Dagster (the documented polling).
    for job_id in (job["id"], json.loads(body)["id"]):
        deadline = time.monotonic() + 180
        while True:
            status = get_json(f"{base}/api/jobs/{job_id}")[1]["status"]
            if status in ("SUCCESS", "FAILURE") or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert status == "SUCCESS"
    # The Investigated button's request changed the candidate, with its note in the history.
    row = demo.sql(
        "SELECT status FROM ese_candidates WHERE source_id = ? ORDER BY id DESC LIMIT 1",
        (OTHER_ID,),
    )
    assert row["status"].iloc[0] == "investigated"
    note = demo.sql(
        "SELECT new_status, note FROM ese_candidate_history WHERE source_id = ? "
        "ORDER BY id DESC LIMIT 1",
        (OTHER_ID,),
    )
    assert note.iloc[0].tolist() == ["investigated", "VLA asked"]


# ------------------------------------------------------------------- the seed guide's SQL (§6)

#: Section 6 of the seed user guide, verbatim (checked against the guide when it is beside the
#: clone), and the query its "Run queries" line sends with sqlite3.
SEED_SECTION_6_SQL = """\
-- List all ESE candidates (active)
SELECT e.source_id, e.significance, v.chi2_nu, v.eta_metric, v.n_obs
FROM ese_candidates e
JOIN variability_stats v ON e.source_id = v.source_id
WHERE e.status = 'active'
ORDER BY e.significance DESC;

-- Get lightcurve for a source
SELECT mjd, peak_jyb, peak_err_jyb, image_path
FROM photometry
WHERE source_id = 'NVSS J123456+420312'
ORDER BY mjd;

-- Find highly variable sources (not yet flagged)
SELECT source_id, sigma_deviation, chi2_nu, eta_metric, n_obs
FROM variability_stats
WHERE sigma_deviation >= 3.0 AND n_obs >= 10
ORDER BY sigma_deviation DESC
LIMIT 50;
"""
SEED_RUN_QUERY = "SELECT * FROM ese_candidates WHERE status='active';"
#: The guide's example source id; the demo's sources are named J..., so the queries run with a
#: demo ESE in its place (the same text otherwise).
SEED_SOURCE_ID = "NVSS J123456+420312"


def seed_queries() -> dict[str, str]:
    """Title (the ``--`` comment) -> query text."""
    queries = {}
    for chunk in SEED_SECTION_6_SQL.split(";"):
        lines = [ln for ln in chunk.strip().splitlines() if ln.strip()]
        if lines:
            queries[lines[0].removeprefix("-- ")] = "\n".join(lines[1:])
    return queries


def test_seed_sql_copy_is_the_guide_verbatim():
    if not SEED_GUIDE.exists():
        pytest.skip(f"{SEED_GUIDE} is not beside this clone (it is in CI)")
    guide = SEED_GUIDE.read_text()
    section = guide[guide.index("## 6. Query Results") : guide.index("## 7.")]
    sql = re.search(r"```sql\n(.*?)```", section, flags=re.DOTALL).group(1)
    assert sql == SEED_SECTION_6_SQL
    assert f'sqlite3 $DB "{SEED_RUN_QUERY}"' in section


def _truth(demo: Demo) -> pd.DataFrame:
    return pd.read_csv(demo.root / "data/demo/truth_sources.csv")


def test_seed_sql_active_candidates(demo):
    query = seed_queries()["List all ESE candidates (active)"]
    got = demo.sql(query, db=demo.pristine_db)
    truth = _truth(demo)
    required = truth[
        (truth["kind"] == "ese")
        & (truth["ese_depth"] >= 0.3)
        & (truth["ese_epochs_in_event"] >= 15)
    ]["name"]
    stable = truth[truth["kind"] == "stable"]["name"]
    assert set(required) <= set(got["source_id"])  # the injected ESEs the demo must find
    assert not set(stable) & set(got["source_id"])
    assert got["significance"].is_monotonic_decreasing
    # A second way: the API's candidates and statistics, joined in pandas.
    from ese_assets.storage import candidates as candidates_db
    from ese_assets.storage import statistics as statistics_db
    from ese_assets.storage.engine import make_engine

    engine = make_engine(str(demo.pristine_db))
    cands = candidates_db.candidates(engine, status=("active",))
    stats = statistics_db.variability_stats(engine)
    joined = (
        cands[["source_id", "significance"]]
        .merge(stats[["source_id", "chi2_nu", "eta_metric", "n_obs"]], on="source_id")
        .sort_values("significance", ascending=False)
    )
    assert list(got["source_id"]) == list(joined["source_id"])
    np.testing.assert_allclose(got["chi2_nu"], joined["chi2_nu"])
    np.testing.assert_allclose(got["eta_metric"], joined["eta_metric"])
    np.testing.assert_array_equal(got["n_obs"], joined["n_obs"])
    # The guide's sqlite3 line: the same candidates, every seed column present.
    run = demo.sql(SEED_RUN_QUERY, db=demo.pristine_db)
    assert set(run["source_id"]) == set(got["source_id"])
    seed_columns = ["id", "source_id", "flagged_at", "flagged_by", "significance", "flag_type"]
    seed_columns += ["notes", "status", "investigated_at", "dismissed_at"]
    assert set(seed_columns) <= set(run.columns)


def test_seed_sql_lightcurve_of_a_source(demo):
    query = seed_queries()["Get lightcurve for a source"]
    assert SEED_SOURCE_ID in query
    got = demo.sql(query.replace(SEED_SOURCE_ID, ESE_ID), db=demo.pristine_db)
    n_images = len(pd.read_csv(demo.root / "data/demo/truth_images.csv"))
    assert len(got) == n_images  # one measurement per image of the survey
    assert got["mjd"].is_monotonic_increasing
    assert list(got.columns) == ["mjd", "peak_jyb", "peak_err_jyb", "image_path"]
    # The injected dip is in it: the faintest epochs are well below the catalog flux.
    truth = _truth(demo).set_index("name").loc[ESE_ID]
    assert got["peak_jyb"].min() * 1e3 < (1 - 0.5 * truth["ese_depth"]) * truth["mean_flux_mjy"]


def test_seed_sql_highly_variable_sources(demo):
    query = seed_queries()["Find highly variable sources (not yet flagged)"]
    got = demo.sql(query, db=demo.pristine_db)
    stats = demo.sql("SELECT * FROM variability_stats", db=demo.pristine_db)
    expected = stats[(stats["sigma_deviation"] >= 3.0) & (stats["n_obs"] >= 10)]
    expected = expected.sort_values("sigma_deviation", ascending=False).head(50)
    assert 0 < len(got) == len(expected)
    np.testing.assert_allclose(got["sigma_deviation"], expected["sigma_deviation"])
    assert (got["sigma_deviation"] >= 3.0).all() and (got["n_obs"] >= 10).all()


def test_seed_troubleshooting_counts_and_readme_sql(demo):
    # Section 11 of the guide, and the README's Tables examples.
    n = demo.sql("SELECT COUNT(*) AS n FROM photometry;", db=demo.pristine_db)["n"].iloc[0]
    assert n > 0
    n5 = demo.sql(
        "SELECT COUNT(*) AS n FROM variability_stats WHERE n_obs >= 5;", db=demo.pristine_db
    )
    assert n5["n"].iloc[0] > 0
    readme = README.read_text()
    for sql in re.findall(r"`(SELECT [^`]+)`", readme):
        demo.sql(sql, db=demo.pristine_db)  # runs


def test_distributed_block_is_what_test_distributed_runs():
    """The README's Celery commands are, word for word, those test_distributed.py runs (with the
    README's queue ``dagster``, paths relative to the checkout and its example night)."""
    from ese_assets_tests.test_distributed import execute_argv, worker_argv

    def readme_form(argv: list[str]) -> str:
        words = [Path(a).name if os.path.isabs(a) else a for a in argv]
        return shlex.join(words)

    text = block("Past one machine", 0).text
    lines = [ln.rstrip(" &") for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert 'cp dagster-postgres.yaml "$DAGSTER_HOME/dagster.yaml"' in lines
    for name in ("w1", "w2"):
        assert readme_form(worker_argv("dagster", name)) in lines
    assert readme_form(execute_argv("2025-01-01")) in lines
