"""Wall time of `gkdc check` per shipped spec against baselines timed in the same run, interleaved run by run.

Takes: optional spec paths (default specs/*.gkd), `--runs N`, `--no-plan` (skip the planner's feasibility check),
`--against REV` (also time the same specs with gkdc as of git revision REV, exported to a temporary folder).
Gives: per spec the median of a fresh `python -m gkdc check` process, the median of the floor (a fresh interpreter
importing only gkdc's third-party front-end libraries, pydantic and lark), the ratio check / floor, the ratio to the
0.5 s target scaled by this machine's speed (the floor measured here vs FLOOR_QUIET_S measured on a quiet machine),
and with `--against` the ratio new / old. Runs are interleaved (floor, check, old check, floor, ...) so a noisy
machine slows all of them alike. Exit status 1 when a spec misses the scaled target. Run from the repository root:
`.venv/bin/python bench/check_time.py [--against main]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 0.5
#: the floor (interpreter + `import pydantic, lark`) on a quiet machine: the fastest of 15 runs on the 2-core dev box
FLOOR_QUIET_S = 0.110
FLOOR_CMD = [sys.executable, "-c", "import pydantic, pydantic.main, lark"]


def _env(src: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed gkdc has its bytecode compiled: time that case
    return env


def _once(cmd: list[str], src: Path) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=src, capture_output=True, text=True, env=_env(src))
    return time.perf_counter() - start, proc


def _check_cmd(spec: Path, no_plan: bool) -> list[str]:
    return [sys.executable, "-m", "gkdc", "check", *(["--no-plan"] if no_plan else []), str(spec.resolve())]


def _export(rev: str) -> Path:
    """gkdc's tree at ``rev`` in a temporary folder (git archive: no worktree bookkeeping left behind)."""
    out = Path(tempfile.mkdtemp(prefix="gkdc-check-time-"))
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def time_spec(spec: Path, runs: int, no_plan: bool, old: Path | None) -> dict:
    """Medians of the floor, the check and (with ``old``) the old check, interleaved; the new check's status."""
    cmd = _check_cmd(spec, no_plan)
    floor, new, prev, proc = [], [], [], None
    for _ in range(runs):
        floor.append(_once(FLOOR_CMD, ROOT)[0])
        t, proc = _once(cmd, ROOT)
        new.append(t)
        if old is not None:
            prev.append(_once(cmd, old)[0])
    tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    tail = f"Traceback: {tail}" if "Traceback" in proc.stderr else tail
    return {"floor": statistics.median(floor), "check": statistics.median(new),
            "old": statistics.median(prev) if prev else None, "rc": proc.returncode, "tail": tail}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-plan", action="store_true")
    parser.add_argument("--against", metavar="REV", help="also time gkdc as of this git revision")
    args = parser.parse_args(argv)
    specs = args.specs or sorted((ROOT / "specs").glob("*.gkd"))
    old = _export(args.against) if args.against else None
    for src in filter(None, (ROOT, old)):  # compile bytecode and warm lark's grammar cache once
        _once(_check_cmd(specs[0], False), src)
    print(f"{'spec':<16} {'check':>7} {'floor':>7} {'chk/flr':>7} {'target':>7} {'ratio':>6}"
          + (f" {'old':>7} {'new/old':>7}" if old else "") + "  mode")
    missed = 0
    for spec in specs:
        r = time_spec(spec, args.runs, args.no_plan, old)
        if r["rc"] not in (0, 1) or "Traceback" in r["tail"]:
            print(f"{spec.stem:<16} failed (exit {r['rc']}): {r['tail']}")
            missed += 1
            continue
        # the target holds on a quiet machine; on a busy one it stretches as much as the floor does
        target = TARGET_S * max(1.0, r["floor"] / FLOOR_QUIET_S)
        ratio = r["check"] / target
        missed += ratio > 1
        line = (f"{spec.stem:<16} {r['check']:>6.3f}s {r['floor']:>6.3f}s {r['check'] / r['floor']:>7.2f} "
                f"{target:>6.3f}s {ratio:>6.2f}")
        if old:
            line += f" {r['old']:>6.3f}s {r['check'] / r['old']:>7.2f}"
        print(f"{line}  check{' --no-plan' if args.no_plan else ''}  exit {r['rc']}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
