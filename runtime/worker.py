"""Entry point of one launcher-started rank: ``python -m runtime.worker PLAN OUT [--resume] [--max-steps N]``.

The ``deepspeed`` launcher starts one such process per rank (it passes ``--local_rank=N`` and sets RANK,
WORLD_SIZE, MASTER_ADDR/PORT); each reads the plan and runs the recipe. User errors print one line on
stderr and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from runtime.recipe import run

        plan = load_plan(args.plan)
        run(
            plan,
            args.plan,
            args.out,
            resume=args.resume,
            trust_remote_code=args.trust_remote_code,
            allow_pickle=args.allow_pickle,
            max_steps=args.max_steps,
            progress=not args.no_progress,
            allowed_paths=tuple(args.allow_path),
        )
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
