"""Smoke test of benchmarks/injection_recovery.py: its quick mode runs end to end on a small
population and prints the false-candidate table, the recall grid and the targets."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "injection_recovery.py"


def _load():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("injection_recovery", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_quick_mode_prints_rates_recall_and_targets(capsys):
    bench = _load()
    code = bench.main(
        ["--quick", "--cadences", "sparse", "--n-stable", "400", "--simulations", "800"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "false candidates per 1e4 sources per year" in out
    for population in ("stable", "red", "outlier"):
        assert f"\n{population} " in out
    assert "recall % (seed / eta-V / ours)" in out
    assert out.count("S/N 10") >= 1 and "0.80   180d" in out
    assert "summary of targets:" in out
    assert "stable <= 1 per 1e4 per yr" in out


def test_simulator_populations_as_documented():
    """The benchmark's populations: red-noise rms and outlier factors as documented, gains
    common to every source of an image, 1 % bad images."""
    import numpy as np

    bench = _load()
    rng = np.random.default_rng(0)
    cadence = bench.make_cadence("daily", rng, True)
    gains = bench.image_gains(20_000, rng)
    bad = np.abs(gains - 1.0) > 0.09
    assert 0.005 < bad.mean() < 0.015
    assert abs(np.std(gains[~bad]) - 0.025) < 0.002
    kinds = np.array(["stable"] * 30 + ["outlier"] * 10)
    table, _ = bench.simulate(cadence, np.ones(cadence.mjd.size), rng, kinds=kinds)
    flux = table["flux_peak"].to_numpy().reshape(40, -1)
    err = table["flux_peak_err"].to_numpy().reshape(40, -1)
    pulls = (flux - np.median(flux, axis=1, keepdims=True)) / err
    # Stable: true noise 0.9 or 1.1 x the quoted error; outliers: one epoch 20-50 % off.
    assert np.all(np.abs(np.std(pulls[:30], axis=1) - 1.0) < 0.2)
    # The outlier epoch: 20-50 % off, i.e. at least 2 quoted errors even at S/N 10, and the
    # source's largest deviation.
    rel = np.abs(flux[30:] / np.median(flux[30:], axis=1, keepdims=True) - 1.0)
    assert (rel.max(axis=1) > 0.15).all()
    assert (np.abs(pulls[30:]).max(axis=1) > 2.0).all()
