"""Wall time of `gkdc check` per shipped spec: a fresh `python -m gkdc` process each run, median of 5.

Takes: optional spec paths (default specs/*.gkd), `--runs N`, `--no-plan` (skip the planner's feasibility check).
Gives: one line per spec with the median, the target (0.5 s) and the ratio median/target; exit status 1 when a
spec misses the target. Without `--no-plan` a spec the planner cannot handle yet is timed with `--no-plan` and
marked so. Run from the repository root: `.venv/bin/python bench/check_time.py`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 0.5


def time_check(spec: Path, runs: int, no_plan: bool) -> tuple[float, int, str]:
    """(median seconds, exit status, stderr tail) of `gkdc check` on one spec."""
    cmd = [sys.executable, "-m", "gkdc", "check", *(["--no-plan"] if no_plan else []), str(spec)]
    times, proc = [], None
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times), proc.returncode, proc.stderr.strip().splitlines()[-1:][0] if proc.stderr else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-plan", action="store_true")
    args = parser.parse_args(argv)
    specs = args.specs or sorted((ROOT / "specs").glob("*.gkd"))
    subprocess.run([sys.executable, "-m", "gkdc", "check", "--no-plan", str(specs[0])], cwd=ROOT,
                   capture_output=True)  # warm the OS file cache and lark's grammar cache once
    print(f"{'spec':<16} {'median':>8} {'target':>8} {'ratio':>6}  mode")
    missed = 0
    for spec in specs:
        no_plan = args.no_plan
        median, rc, tail = time_check(spec, args.runs, no_plan)
        if rc not in (0, 1) or "Traceback" in tail or "Error" in tail:
            no_plan = True  # the planner crashed (not yet available): time the front end alone
            median, rc, tail = time_check(spec, args.runs, no_plan)
        ratio = median / TARGET_S
        missed += ratio > 1
        mode = "check --no-plan" + (" (planner unavailable)" if no_plan and not args.no_plan else "")
        mode = mode if no_plan else "check"
        print(f"{spec.stem:<16} {median:>7.3f}s {TARGET_S:>7.2f}s {ratio:>6.2f}  {mode}  exit {rc}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
