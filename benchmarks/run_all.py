"""Run every benchmark script in sequence, each in its own Python process, at its default size.

Run: ``.venv/bin/python benchmarks/run_all.py [--skip NAME ...] [--only NAME ...]``. Extra
arguments after ``--`` are passed to every script (e.g. ``-- --repeat 1``). Exits non-zero if
any script failed, after running the others.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: In order: cheapest and most basic first.
SCRIPTS = (
    "bench_photometry",
    "bench_workers",
    "bench_noise_correlation",
    "bench_variability",
    "bench_incremental",
    "bench_nightly_bins",
    "bench_ese_template",
    "bench_calibration",
    "bench_ingest_end_to_end",
    "bench_recompute",
)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, help="run only these scripts")
    parser.add_argument("--skip", nargs="+", choices=SCRIPTS, default=[], help="skip these scripts")
    return parser.parse_args(own), extra


def run_script(name: str, extra: list[str]) -> tuple[int, float]:
    """Run one script with this interpreter, output streamed; returns (exit code, seconds)."""
    start = time.perf_counter()
    code = subprocess.call(
        [sys.executable, "-u", str(HERE / f"{name}.py"), *extra], cwd=HERE.parent
    )
    return code, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    names = [n for n in (args.only or SCRIPTS) if n not in args.skip]
    results = []
    for name in names:
        code, seconds = run_script(name, extra)
        results.append((name, code, seconds))
        print(flush=True)
    print("summary:")
    for name, code, seconds in results:
        print(f"  {name:<26} {'ok' if code == 0 else f'FAILED (exit {code})':<18} {seconds:6.1f} s")
    return 0 if all(code == 0 for _, code, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
