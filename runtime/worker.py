"""Entry point of one launcher-started rank: ``python -m runtime.worker PLAN OUT [--resume] [--max-steps N]``.

The ``deepspeed`` launcher starts one such process per rank (it passes ``--local_rank=N`` and sets RANK,
WORLD_SIZE, MASTER_ADDR/PORT); each reads the plan and runs the recipe. User errors print one line on
stderr and exit with status 2, never a traceback.

The run folder is locked as under ``gkdc run`` (runtime.launch.run_folder_lock): a rank that ``gkdc run``
launched verifies that the lock is held by its own run (``GKDC_RUN_LOCK``); a rank started directly (a
hand-written ``deepspeed ... --module runtime.worker``) holds ``out/.lock`` shared, so no ``gkdc run`` can take
the folder meanwhile, and ``out/.lock.rank<N>`` exclusively, so a second direct launch on the folder is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

from runtime.errors import RunError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m runtime.worker", description=__doc__.splitlines()[0])
    parser.add_argument("plan", type=Path, help="plan.json written by `gkdc plan`")
    parser.add_argument("out", type=Path, help="output directory (checkpoints, metrics, student)")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    parser.add_argument("--max-steps", type=int, default=None, help="cap every stage's optimizer steps")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--allow-pickle", action="store_true")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--allow-path", action="append", default=[], dest="allow_path")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_plan(path: Path):
    """Read and validate a plan file, translating pydantic's errors into a RunError."""
    from pydantic import ValidationError

    from planner.plan import Plan

    try:
        return Plan.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise RunError(f"plan file {path} does not exist") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise RunError(f"{path} is not a valid gkdc plan: {where}: {first['msg']} ({err.error_count()} error(s))") from None


@contextlib.contextmanager
def rank_lock(out: Path, rank: int) -> Iterator[None]:
    """Hold or verify the run folder's lock for one rank (module docstring); RunError when another run has it."""
    import fcntl

    from runtime.locks import LOCK_ENV, LOCK_FILE, LOCK_FILE_ENV, lock_or_refuse

    token = os.environ.get(LOCK_ENV)
    if token:  # launched by `gkdc run`, which holds the lock (.lock, or .lock.node<R>) exclusively for the run
        lock = out / os.environ.get(LOCK_FILE_ENV, LOCK_FILE)
        try:
            holder = lock.read_text(encoding="utf-8").strip()
        except OSError:
            holder = ""
        if holder != token or not _held(lock):
            raise RunError(f"{out} is not locked by the gkdc run that started this rank ({token}; the lock file "
                           f"names {holder or 'nobody'}); choose another --out")
        yield
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        shared = open(out / LOCK_FILE, "a+", encoding="utf-8")
        mine = open(out / f"{LOCK_FILE}.rank{rank}", "a+", encoding="utf-8")
    except OSError as err:  # a read-only or full folder: the reason, not a traceback
        raise RunError(f"cannot lock the run folder {out}: {err.strerror or err}") from None
    try:
        for fh, mode in ((shared, fcntl.LOCK_SH), (mine, fcntl.LOCK_EX)):
            lock_or_refuse(fh, mode, out)
        mine.seek(0)
        mine.truncate()
        mine.write(f"rank {rank}, pid {os.getpid()}, started directly\n")
        mine.flush()
        yield
    finally:
        mine.close()
        shared.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from runtime.recipe import run

        plan = load_plan(args.plan)
        with rank_lock(args.out, _rank()):
            _run(run, plan, args)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _held(path: Path) -> bool:
    """Whether some process holds ``path`` exclusively (a shared lock cannot be had without waiting)."""
    import fcntl

    with open(path, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False  # taken, and released as the file closes


def _rank() -> int:
    value = os.environ.get("RANK", "0")
    return int(value) if value.isdigit() else 0


def _run(run, plan, args: argparse.Namespace) -> None:
    run(plan, args.plan, args.out, resume=args.resume, trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle, max_steps=args.max_steps, progress=not args.no_progress,
        allowed_paths=tuple(args.allow_path))


if __name__ == "__main__":
    sys.exit(main())
