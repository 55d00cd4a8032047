"""``ese demo``: simulate a month of images, run it through Dagster, compare with the truth.

The demo's night partitions start at the survey's first night. At the end it writes
``<out dir>/demo.env`` (the ``export`` lines that point ``ese`` and ``make ui`` at the demo) and
prints them with the next commands to type.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

from ese_assets.core.candidates import EXPIRED_STATUS
from ese_assets.core.nights import night_of_mjd
from ese_assets.core.simulate import SurveyConfig, simulate_survey
from ese_assets.ingest import ingest_directory
from ese_assets.settings import Settings
from ese_assets.storage import candidate_history as history_db
from ese_assets.storage import candidates as candidates_db
from ese_assets.storage.engine import make_engine

#: The file ``ese demo`` writes into its output directory: ``export`` lines for a shell (the
#: Makefile reads ESE_PARTITION_START from it for ``make ui``).
DEMO_ENV = "demo.env"
#: Dagster run ids (UUIDs); other run ids are detection runs outside Dagster or undos.
_DAGSTER_RUN = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

#: The acceptance rule of the demo: these injected events must be found.
MIN_DEPTH = 0.30
MIN_EPOCHS_IN_EVENT = 15
MAX_STABLE_FLAGGED = 1


def first_night(out_dir: Path, timezone: str) -> str:
    """The night of the survey's first image (``truth_images.csv``)."""
    mjd = pd.read_csv(out_dir / "truth_images.csv", usecols=["mjd"])["mjd"].min()
    return night_of_mjd(float(mjd), timezone)


def demo_settings(out_dir: Path) -> Settings:
    """Settings of the demo survey in ``out_dir``: its database, catalog and incoming directory;
    partitions from its first night."""
    base = Settings.from_env()
    return dataclasses.replace(
        base,
        data_dir=str(out_dir.parent),
        products_db=str(out_dir / "products.sqlite3"),
        catalog_path=str(out_dir / "catalog.csv"),
        incoming_dir=str(out_dir / "incoming"),
        partition_start=first_night(out_dir, base.timezone),
    )


def demo_exports(settings: Settings) -> dict[str, str]:
    """The environment that points ``ese``, the API and ``make ui`` at the demo."""
    return {
        "PIPELINE_PRODUCTS_DB": settings.products_db,
        "ESE_CATALOG": str(settings.catalog_path),
        "ESE_INCOMING_DIR": settings.incoming_dir,
        "DAGSTER_HOME": os.environ.get("DAGSTER_HOME")
        or str(Path(settings.data_dir) / "dagster_home"),
        "ESE_PARTITION_START": settings.partition_start,
    }


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def write_demo_env(out_dir: Path, settings: Settings) -> Path:
    """Write :data:`DEMO_ENV` (``export NAME=value`` lines, quoted for a POSIX shell)."""
    lines = [
        "# Written by `ese demo`: point `ese`, the Python API and `make ui` at the demo.",
        f"# Use: source {_shown(out_dir / DEMO_ENV)}",
        *(f"export {k}={shlex.quote(v)}" for k, v in demo_exports(settings).items()),
    ]
    path = out_dir / DEMO_ENV
    path.write_text("\n".join(lines) + "\n")
    return path


def next_steps(env_file: Path) -> list[str]:
    """What to type after the demo (printed at its end; the README shows the same)."""
    activate = Path(sys.prefix) / "bin" / "activate"
    steps = ["Next, in your shell:"]
    if sys.prefix != sys.base_prefix and activate.exists():
        steps.append(f"  source {_shown(activate)}    # puts `ese` on the PATH")
    steps += [
        f"  source {_shown(env_file)}    # the exports below",
        "  ese candidates list",
        "  make ui                       # the Dagster UI over this demo",
        f"Exports (in {_shown(env_file)}):",
        *(f"  {line}" for line in env_file.read_text().splitlines() if line.startswith("export")),
    ]
    return steps


def _failure_hints(settings: Settings) -> list[str]:
    """Why a demo over an existing database may fail, and what to do."""
    runs = history_db.detection_runs(make_engine(settings.products_db), limit=1000)
    outside = ~runs["run_id"].str.match(_DAGSTER_RUN) & ~runs["run_id"].str.startswith("undo-")
    manual = runs[outside & (runs["created"] > 0)]
    hints = []
    for run in manual.itertuples(index=False):
        hints.append(
            f"hint: detection run {run.run_id} (`ese detect` or the API) created "
            f"{run.created} candidates in this database; undo it with: "
            f"ese candidates undo {run.run_id}"
        )
    hints.append(
        "hint: to start over from a fresh simulation: ese demo --fresh "
        f"(deletes {_shown(Path(settings.products_db).parent)})"
    )
    return hints


def compare_with_truth(candidates: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """One row per injected ESE and per flagged non-ESE source, with what the pipeline said.

    Flagged: a candidate that is not expired (open, or dismissed by a person)."""
    current = candidates[candidates["status"] != EXPIRED_STATUS]
    flagged = current.drop_duplicates("source_id").set_index("source_id")
    rows = truth.assign(flagged=truth["name"].isin(flagged.index))
    rows = rows[(rows["kind"] == "ese") | rows["flagged"]].copy()
    rows["significance"] = rows["name"].map(flagged["significance"])
    rows["flag_type"] = rows["name"].map(flagged["flag_type"])
    rows["required"] = (
        (rows["kind"] == "ese")
        & (rows["ese_depth"] >= MIN_DEPTH)
        & (rows["ese_epochs_in_event"] >= MIN_EPOCHS_IN_EVENT)
    )
    return rows.sort_values(["kind", "name"]).reset_index(drop=True)


def print_report(report: pd.DataFrame, print_=print) -> bool:
    cols = [
        "name",
        "kind",
        "mean_flux_mjy",
        "ese_depth",
        "ese_duration_days",
        "ese_epochs_in_event",
        "required",
        "flagged",
        "significance",
        "flag_type",
    ]
    with pd.option_context(
        "display.width", 200, "display.max_columns", 20, "display.float_format", "{:.2f}".format
    ):
        print_(report[cols].to_string(index=False))
    missed = report[report["required"] & ~report["flagged"]]
    stable = report[(report["kind"] == "stable") & report["flagged"]]
    n_required = int(report["required"].sum())
    print_(
        f"\nrequired ESEs (depth >= {MIN_DEPTH:.0%}, >= {MIN_EPOCHS_IN_EVENT} epochs in event): "
        f"{n_required - len(missed)}/{n_required} flagged; "
        f"stable sources flagged: {len(stable)} (allowed {MAX_STABLE_FLAGGED})"
    )
    ok = missed.empty and len(stable) <= MAX_STABLE_FLAGGED
    print_("DEMO PASSED" if ok else "DEMO FAILED")
    return ok


def run_demo(
    out_dir: str | Path, *, fresh: bool = False, config: SurveyConfig | None = None, print_=print
) -> bool:
    out_dir = Path(out_dir).expanduser().resolve()
    if fresh and out_dir.exists():
        shutil.rmtree(out_dir)
    started = time.monotonic()
    if not (out_dir / "truth_sources.csv").exists():
        print_(f"simulating a survey into {out_dir} ...")
        simulate_survey(config or SurveyConfig(), out_dir)
        print_(f"  done in {time.monotonic() - started:.0f} s")
    settings = demo_settings(out_dir)
    print_(f"ingesting {settings.incoming_dir} through the Dagster instance ...")
    ingest_directory(settings, settings.incoming_dir, progress=print_)
    candidates = candidates_db.candidates(make_engine(settings.products_db))
    truth = pd.read_csv(out_dir / "truth_sources.csv")
    n_current = int((candidates["status"] != EXPIRED_STATUS).sum())
    print_(f"\ncandidates ({n_current}) next to the injected truth:")
    ok = print_report(compare_with_truth(candidates, truth), print_)
    if not ok:
        for hint in _failure_hints(settings):
            print_(hint)
    env_file = write_demo_env(out_dir, settings)
    print_(f"total {time.monotonic() - started:.0f} s.")
    for line in next_steps(env_file):
        print_(line)
    return ok
