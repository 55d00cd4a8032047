"""``ese demo``: simulate a month of images, run it through Dagster, compare with the truth."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import pandas as pd

from ese_assets.core.simulate import SurveyConfig, simulate_survey
from ese_assets.ingest import ingest_directory
from ese_assets.settings import Settings
from ese_assets.storage import candidates as candidates_db
from ese_assets.storage.engine import make_engine

#: The acceptance rule of the demo: these injected events must be found.
MIN_DEPTH = 0.30
MIN_EPOCHS_IN_EVENT = 15
MAX_STABLE_FLAGGED = 1


def demo_settings(out_dir: Path) -> Settings:
    base = Settings.from_env()
    return dataclasses.replace(
        base,
        data_dir=str(out_dir.parent),
        products_db=str(out_dir / "products.sqlite3"),
        catalog_path=str(out_dir / "catalog.csv"),
        incoming_dir=str(out_dir / "incoming"),
    )


def compare_with_truth(candidates: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """One row per injected ESE and per flagged non-ESE source, with what the pipeline said."""
    flagged = candidates.set_index("source_id")
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
    print_(f"\ncandidates ({len(candidates)}) next to the injected truth:")
    ok = print_report(compare_with_truth(candidates, truth), print_)
    print_(f"total {time.monotonic() - started:.0f} s. Open the UI on this instance: make ui")
    return ok
