"""The long fuzz run of the front end and planner, by hand: ``python bench/fuzz_long.py [CASES] [WORKERS] [SEED]``.

Same inputs as tests/test_fuzz.py's hostile-input property (tests/fuzz_inputs.py), drawn from ``random.Random``
with a fixed seed per worker so a run can be repeated; every input goes through ``check_source`` and, when it
checks, ``build_plan``. Prints cases per kind and outcome, cases per second, and each distinct crash (exception
type and the frame that raised it) with a reproducing input. Heavy: run it under the machine's heavy lock.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import random
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def worker(args: tuple[int, int]) -> tuple[collections.Counter, dict[str, tuple[int, str, str]]]:
    seed, n = args
    from fuzz_inputs import draw, exercise

    rng = random.Random(seed)
    outcomes: collections.Counter = collections.Counter()
    crashes: dict[str, tuple[int, str, str]] = {}
    for _ in range(n):
        kind, text = draw(rng)
        try:
            outcomes[(kind, exercise(text))] += 1
        except Exception as exc:  # noqa: BLE001 - counting crashes is the point
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            key = f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno}"
            count, example, message = crashes.get(key, (0, text, str(exc)[:200]))
            crashes[key] = (count + 1, example, message)
            outcomes[(kind, "CRASH")] += 1
    return outcomes, crashes


def main() -> int:
    total = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    first_seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1000  # another value: other inputs
    chunk = 2_000
    jobs = [(first_seed + i, min(chunk, total - i * chunk)) for i in range((total + chunk - 1) // chunk)]
    start = time.perf_counter()
    outcomes: collections.Counter = collections.Counter()
    crashes: dict[str, tuple[int, str, str]] = {}
    with mp.Pool(workers) as pool:
        for done, (out, crash) in enumerate(pool.imap_unordered(worker, jobs), 1):
            outcomes.update(out)
            for key, (count, example, message) in crash.items():
                old = crashes.get(key, (0, example, message))
                crashes[key] = (old[0] + count, old[1], old[2])
            if done % 10 == 0:
                print(f"{sum(outcomes.values()):,} cases, {sum(c for c, *_ in crashes.values())} crashes, "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    n = sum(outcomes.values())
    print(f"cases: {n:,} in {seconds:.0f} s ({n / seconds:.0f}/s, {workers} workers)")
    for (kind, outcome), count in sorted(outcomes.items()):
        print(f"  {kind:8} {outcome:13} {count:,}")
    print(f"crashes: {sum(c for c, *_ in crashes.values())} ({len(crashes)} distinct)")
    for key, (count, example, message) in sorted(crashes.items()):
        print(f"--- {key}: {count}x: {message}\n{example!r}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
