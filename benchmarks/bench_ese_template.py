"""Speed of the ESE template fit (core.ese_template) on 10^4 sources x 365 nightly bins, against
the window statistics of the seed's dip rule (core.variability.variability_metrics) on the same
bins, measured in the same run.

Run: ``.venv/bin/python benchmarks/bench_ese_template.py [--sources N] [--nights M]``.

Figures: the template fit of every source (bank scan, one night left out and rescan, refinement
and DRW null for the sources above the pre-threshold), the false-alarm calibration with
``--simulations`` null lightcurves, and the baseline. The population holds 5 % red-noise
variables and 1 % lens events, so the refinement and the DRW run on a realistic share.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    add_common_arguments,
    fmt_ratio,
    fmt_seconds,
    print_header,
    print_table,
    time_call,
)

from ese_assets.core import ese_template as et
from ese_assets.core.lens import ese_lightcurve
from ese_assets.core.variability import variability_metrics


def population(n: int, m: int, rng: np.random.Generator) -> et.LightcurveMatrix:
    t = 60000.3 + np.arange(float(m))
    base = rng.uniform(5.0, 500.0, n)
    err = (base / rng.uniform(10.0, 200.0, n))[:, None] * np.ones((1, m))
    model = np.ones((n, m))
    n_red, n_ese = n // 20, n // 100
    x = 0.05 * rng.standard_normal(n_red)
    tau = rng.uniform(30.0, 300.0, n_red)
    for j in range(m):  # damped random walk, 5 % rms
        a = np.exp(-1.0 / tau)
        x = a * x + 0.05 * np.sqrt(1 - a * a) * rng.standard_normal(n_red)
        model[:n_red, j] += x
    for i in range(n_red, n_red + n_ese):
        model[i] = ese_lightcurve(t, rng.uniform(t[0], t[-1]), rng.uniform(14, 180), 0.3)
    flux = base[:, None] * model + err * rng.standard_normal(err.shape)
    ids = np.array([f"s{i:06d}" for i in range(n)], dtype=object)
    return et.LightcurveMatrix(ids, t, flux, err, base)


def main(argv: list[str] | None = None) -> int:
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--sources", type=int, default=10_000)
    parser.add_argument("--nights", type=int, default=365)
    parser.add_argument("--simulations", type=int, default=et.DEFAULT_N_SIMULATIONS)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    matrix = population(args.sources, args.nights, rng)
    print_header(
        f"ESE template fit: {args.sources} sources x {args.nights} nightly bins",
        ["baseline: the seed's window statistics (median, robust std, dip scan) on the same bins"],
    )
    present = np.isfinite(matrix.flux)
    long = pd.DataFrame(
        {
            "source_id": np.repeat(matrix.source_ids, args.nights),
            "mjd": np.tile(matrix.t_mjd, args.sources),
            "flux_mjy": matrix.flux.ravel(),
            "flux_err_mjy": matrix.err.ravel(),
        }
    )[present.ravel()]
    base = time_call(lambda: variability_metrics(long), repeat=args.repeat, max_seconds=60)
    score = time_call(lambda: et.score_lightcurves(matrix), repeat=1)
    scores = score.value
    cal = time_call(
        lambda: et.calibrate_false_alarms(matrix, scores, n_simulations=args.simulations),
        repeat=1,
    )
    redo = int((scores["dchi2_first"] >= et.PRE_THRESHOLD).sum())
    rows = [
        ("seed window statistics (baseline)", fmt_seconds(base.median), "1.00x"),
        (
            f"template fit ({redo} sources refined)",
            fmt_seconds(score.median),
            fmt_ratio(score.median / base.median),
        ),
        (
            f"false-alarm calibration ({args.simulations} nulls)",
            fmt_seconds(cal.median),
            fmt_ratio(cal.median / base.median),
        ),
        (
            "template fit + calibration",
            fmt_seconds(score.median + cal.median),
            fmt_ratio((score.median + cal.median) / base.median),
        ),
    ]
    print_table(["step", "time", "vs baseline"], rows)
    c = cal.value
    print(
        f"thresholds: dchi2_const >= {c.threshold_const:.1f}, ese_stat >= {c.threshold_ese:.1f}; "
        f"expected false candidates {c.expected_false(args.sources):.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
