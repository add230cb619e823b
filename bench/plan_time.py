"""Wall time of `gkdc plan` on the 100B spec (target < 1 s), and where the time goes.

Prints the median of N fresh `python -m gkdc plan specs/gkd-100b.gkd -o <tmp>` processes against the target,
and, in this process, the median time of each phase after imports: parse + check (gkdlang.lower) and planning
(planner.build: graph, parameter counts, placement search over every candidate, DeepSpeed configs).

    .venv/bin/python bench/plan_time.py [--runs 5] [spec]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 1.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", type=Path, default=ROOT / "specs" / "gkd-100b.gkd")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    out = Path(tempfile.mkdtemp()) / "plan.json"
    cmd = [sys.executable, "-m", "gkdc", "plan", str(args.spec), "-o", str(out)]
    subprocess.run(cmd, cwd=ROOT, capture_output=True)  # warm caches once
    walls = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            print(proc.stderr)
            return 1
    from gkdc import __version__
    from gkdlang.lower import check_file
    from planner.build import build_plan

    check_t, plan_t = [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        spec = check_file(args.spec).spec
        t1 = time.perf_counter()
        build_plan(spec, gkdc_version=__version__, spec_path=str(args.spec))
        plan_t.append(time.perf_counter() - t1)
        check_t.append(t1 - t0)
    wall = statistics.median(walls)
    print(f"gkdc plan {args.spec.name}: median {wall:.3f}s over {args.runs} runs; target {TARGET_S:.1f}s; "
          f"ratio {wall / TARGET_S:.2f}")
    print(f"  in process: check {statistics.median(check_t) * 1e3:.0f} ms, plan {statistics.median(plan_t) * 1e3:.0f} ms "
          f"(the rest is Python start-up and imports)")
    return 0 if wall < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
