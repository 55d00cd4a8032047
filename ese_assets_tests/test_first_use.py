"""No first-use traps: read commands never create an empty database, non-FITS files are ignored,
``ese ingest --recursive`` (and a hint without it), each message printed once, rejected files
visible in the Dagster instance, runs tagged with their products database, and the demo's next
commands work as printed. Real files, real CLI processes, real Dagster instances."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import sqlalchemy as sa

from ese_assets import cli
from ese_assets.definitions import build_definitions
from ese_assets.demo import DEMO_ENV, run_demo
from ese_assets.orchestration.resources import resources_from_settings
from ese_assets.orchestration.runs import PRODUCTS_DB_TAG, products_db_tags
from ese_assets.pipeline.registration import is_fits_file, scan_directory
from ese_assets.storage import images as images_db
from ese_assets.storage.engine import make_engine
from ese_assets_tests import faults
from ese_assets_tests.survey import NIGHTS, SMALL_SURVEY, make_workspace

REPO = Path(__file__).resolve().parents[1]
ESE = Path(sys.executable).with_name("ese")
#: Read commands: none of them may create a database.
READ_COMMANDS = (
    ["candidates"],
    ["candidates", "list", "--status", "all"],
    ["candidates", "show", "J000000+000000"],
    ["candidates", "runs"],
    ["detect"],
    ["detect", "--dry-run"],
    ["export", "--source-id", "J000000+000000"],
)


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a new user: none of the pipeline's variables set."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ESE_", "PIPELINE_", "MASTER_", "DAGSTER_"))
    }
    return {**env, **extra}


# ------------------------------------------------------------------- a database that is missing


def test_read_commands_on_a_missing_database_say_so_and_create_nothing(
    tmp_path, monkeypatch, capsys
):
    for name in list(os.environ):
        if name.startswith(("ESE_", "PIPELINE_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    for command in READ_COMMANDS:
        assert cli.main(command) == 2, command
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert f"{tmp_path}/data/products.sqlite3 does not exist" in err
        assert "PIPELINE_PRODUCTS_DB" in err and "--products-db" in err and "make demo" in err
    missing = tmp_path / "elsewhere" / "products.sqlite3"
    assert cli.main(["candidates", "--products-db", str(missing)]) == 2
    assert not (tmp_path / "data").exists() and not missing.parent.exists()

    empty = tmp_path / "empty.sqlite3"
    empty.touch()
    assert cli.main(["candidates", "list", "--products-db", str(empty)]) == 2
    assert "has no pipeline tables" in capsys.readouterr().err
    with sa.create_engine(f"sqlite:///{empty}").connect() as conn:
        assert sa.inspect(conn).get_table_names() == []  # still empty
    not_db = tmp_path / "catalog.csv"
    not_db.write_text("name,ra,dec\nA,1,2\n" * 200)
    assert cli.main(["detect", "--products-db", str(not_db)]) == 2
    assert "is not a products database" in capsys.readouterr().err


def test_the_ese_program_says_so_in_one_line(tmp_path):
    proc = subprocess.run(
        [str(ESE), "candidates"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_clean_env(),
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_empty_postgresql_schema_is_not_filled_by_a_read(postgres_url, capsys):
    assert cli.main(["candidates", "--products-db", postgres_url]) == 2
    assert "has no pipeline tables" in capsys.readouterr().err
    with make_engine(postgres_url).connect() as conn:
        assert sa.inspect(conn).get_table_names() == []


# --------------------------------------------------------------------------- what is a FITS file


def test_non_fits_files_are_ignored_not_rejected(engine, tmp_path, small_survey):
    images = sorted((small_survey / "incoming").glob("*.fits"))
    d = tmp_path / "incoming"
    d.mkdir()
    shutil.copy(images[0], d / images[0].name)
    shutil.copy(images[1], d / "exported_without_extension")  # FITS by its first bytes
    shutil.copy(images[2], d / "UPPER.FITS")
    for name in ("catalog.csv", "truth_sources.csv", "truth_images.csv"):
        shutil.copy(small_survey / name, d / name)
    faults.write_png(d / "quicklook.png")
    (d / "notes.fits").write_text("not an image, but named like one\n")
    (d / "observing.log").write_text("SIMPL\n")

    scan = scan_directory(engine, d, timezone="UTC", first_night=NIGHTS[0])
    assert sorted(Path(p).name for p in scan.registered) == [
        "UPPER.FITS",
        "exported_without_extension",
        images[0].name,
    ]
    assert [(Path(p).name, r) for p, r in scan.rejected] == [
        ("notes.fits", "not a FITS file (does not start with SIMPLE)")
    ]
    assert scan.ignored == 5
    names = {
        Path(p).name for p in images_db.file_states(engine, [str(p) for p in d.iterdir()])["path"]
    }
    assert names == {"UPPER.FITS", "exported_without_extension", images[0].name, "notes.fits"}
    assert not is_fits_file(d / "catalog.csv") and is_fits_file(d / "exported_without_extension")


# ------------------------------------------------------------- ese ingest: sub-directories, once


def _run_ese(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ESE), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def test_ingest_recursive_hint_and_rejections_once_and_visible(tmp_path, small_survey):
    archive = tmp_path / "archive"
    for fits in sorted((small_survey / "incoming").glob("*.fits")):
        night = f"{fits.name[4:8]}-{fits.name[8:10]}-{fits.name[10:12]}"  # img_YYYYMMDDT...
        (archive / night).mkdir(parents=True, exist_ok=True)
        shutil.copy(fits, archive / night / fits.name)
    faults.write_fits_like_garbage(archive / NIGHTS[1] / "broken.fits")
    shutil.copy(small_survey / "truth_sources.csv", archive / "truth_sources.csv")
    db = tmp_path / "products.sqlite3"
    home = tmp_path / "dagster_home"
    env = _clean_env(
        PIPELINE_PRODUCTS_DB=str(db),
        ESE_CATALOG=str(small_survey / "catalog.csv"),
        DAGSTER_HOME=str(home),
        ESE_PARTITION_START=NIGHTS[0],
    )

    flat = _run_ese(["ingest", str(archive)], env, tmp_path)
    assert flat.returncode == 0, flat.stderr
    assert "0 new images, 0 rejected" in flat.stdout and "1 other files ignored" in flat.stdout
    assert re.search(r"hint: .* sub-directories hold 13 .*use --recursive", flat.stdout)
    assert "0 runs, 0 failed" in flat.stdout

    deep = _run_ese(["ingest", str(archive), "--recursive"], env, tmp_path)
    assert deep.returncode == 0, deep.stderr
    output = deep.stdout + deep.stderr
    assert output.count("broken.fits") == 1, output  # each message once
    assert "rejected " + str(archive / NIGHTS[1] / "broken.fits") in deep.stdout
    assert "12 new images, 1 rejected" in deep.stdout and "3 runs, 0 failed" in deep.stdout
    assert "truth_sources" not in output and "hint:" not in output
    engine = make_engine(str(db))
    counts = images_db.image_counts_by_status(engine)
    assert {k: v for k, v in counts.items() if v} == {"measured": 12, "rejected": 1}

    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert len(runs) == 3 and {r.tags[PRODUCTS_DB_TAG] for r in runs} == {str(db)}
        records = instance.fetch_observations(dg.AssetKey("photometry"), limit=10).records
        assert len(records) == 1
        metadata = records[0].asset_observation.metadata
        assert metadata["files_rejected"].value == 1
        [row] = metadata["rejected_files"].value.records
        assert row.data["file"] == "broken.fits" and "corrupt" in row.data["reason"].lower()


# -------------------------------------------------------------------------------------- sensor


def test_sensor_reports_rejected_files_and_tags_runs(tmp_path, small_survey):
    settings = make_workspace(tmp_path, small_survey)
    incoming = Path(settings.incoming_dir)
    faults.write_fits_like_garbage(incoming / "no_night.fits")  # no readable time: no night
    (incoming / "observer_notes.txt").write_text("seeing good\n")
    defs = build_definitions(settings, bind_env=False)
    sensor = defs.resolve_sensor_def("incoming_images_sensor")
    with dg.instance_for_test() as instance:
        result = sensor(
            dg.build_sensor_context(
                instance=instance, resources=resources_from_settings(settings, bind_env=False)
            )
        )
    [observation] = result.asset_events
    assert observation.asset_key == dg.AssetKey("photometry")
    assert observation.metadata["files_rejected"].value == 1
    [row] = observation.metadata["rejected_files"].value.records
    assert row.data["file"] == "no_night.fits"
    assert len(result.run_requests) == 3
    assert {r.tags[PRODUCTS_DB_TAG] for r in result.run_requests} == {settings.products_db}
    rejected = images_db.rejected_images(make_engine(settings.products_db))
    assert [Path(p).name for p in rejected["path"]] == ["no_night.fits"]


def test_products_db_tag_hides_passwords():
    tag = products_db_tags("postgresql://ese:s3cret@db.example.org:5432/ese")[PRODUCTS_DB_TAG]
    assert "s3cret" not in tag and tag.startswith("postgresql://ese:***@db.example.org")
    assert products_db_tags("~/x.sqlite3")[PRODUCTS_DB_TAG] == str(Path.home() / "x.sqlite3")


# ---------------------------------------------------------------------------------------- demo


def test_demo_prints_next_commands_that_work(tmp_path, monkeypatch):
    out_dir = tmp_path / "demo"
    home = tmp_path / "dagster_home"
    for name in list(os.environ):
        if name.startswith(("ESE_", "PIPELINE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.chdir(REPO)
    printed: list[str] = []
    assert run_demo(out_dir, config=SMALL_SURVEY, print_=printed.append)

    env_file = out_dir / DEMO_ENV
    exports = dict(
        re.match(r"export (\w+)=(.*)", line).groups()
        for line in env_file.read_text().splitlines()
        if line.startswith("export")
    )
    assert exports == {
        "PIPELINE_PRODUCTS_DB": str(out_dir / "products.sqlite3"),
        "ESE_CATALOG": str(out_dir / "catalog.csv"),
        "ESE_INCOMING_DIR": str(out_dir / "incoming"),
        "DAGSTER_HOME": str(home),
        "ESE_PARTITION_START": NIGHTS[0],  # the survey's first night, not 2020
    }
    text = "\n".join(printed)
    sources = re.findall(r"^\s+source (\S+)", text, flags=re.MULTILINE)
    assert [Path(s).name for s in sources] == ["activate", DEMO_ENV]
    for name, value in exports.items():
        assert f"export {name}={value}" in text
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert {r.tags["dagster/partition"] for r in runs} == set(NIGHTS)
        assert {r.tags[PRODUCTS_DB_TAG] for r in runs} == {exports["PIPELINE_PRODUCTS_DB"]}

    # The printed commands, typed into a new shell in the checkout, work as printed.
    script = "; ".join(f"source {s}" for s in sources) + "; ese candidates list --status all"
    shell = subprocess.run(
        ["bash", "-c", f"set -e; {script}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_clean_env(),
        timeout=120,
    )
    assert shell.returncode == 0, shell.stderr
    assert "source_id" in shell.stdout.splitlines()[0]
    # `make ui` over the demo starts its partitions at the same night.
    make = subprocess.run(
        [
            "make",
            "-s",
            f"DEMO_DIR={out_dir}",
            "--eval",
            "show: ; @echo $$ESE_PARTITION_START",
            "show",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_clean_env(),
        timeout=60,
    )
    assert make.stdout.strip() == NIGHTS[0], make.stderr


def test_demo_failing_on_an_earlier_detection_run_says_how_to_undo_it(
    tmp_path, monkeypatch, capsys
):
    out_dir = tmp_path / "demo"
    for name in list(os.environ):
        if name.startswith(("ESE_", "PIPELINE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    printed: list[str] = []
    assert run_demo(out_dir, config=SMALL_SURVEY, print_=printed.append)
    db = ["--products-db", str(out_dir / "products.sqlite3")]
    noisy = ["detect", "--preset", "sensitive", "--min-dip-sigma", "2", "--min-obs", "3", *db]
    assert cli.main(noisy) == 0
    run_id = re.search(r"run (cli-\w+)", capsys.readouterr().err).group(1)

    printed.clear()
    assert not run_demo(out_dir, config=SMALL_SURVEY, print_=printed.append)
    text = "\n".join(printed)
    assert "DEMO FAILED" in text
    assert f"undo it with: ese candidates undo {run_id}" in text
    assert "ese demo --fresh" in text

    assert cli.main(["candidates", "undo", run_id, *db]) == 0
    assert run_demo(out_dir, config=SMALL_SURVEY, print_=printed.append)
