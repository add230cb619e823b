"""Plan -> a finished run: one rank in this process, several through the plan's ``deepspeed`` launch command.

``gkdc run`` calls ``run_plan``. With several ranks the launcher starts ``python -m runtime.worker`` per rank;
success is judged by the result file each rank writes (``ranks/rank<N>.json``), not only by the launcher's exit
status, because two-rank ZeRO-3 on CPU sometimes aborts at interpreter exit after training finished
(documented in docs/runtime.md).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from planner.plan import Plan
from runtime.errors import RunError


def run_plan(plan: Plan, plan_path: Path, out: Path, *, resume: bool = False, max_steps: int | None = None,
             trust_remote_code: bool = False, allow_pickle: bool = False, progress: bool = True) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if plan.world_size == 1:
        from runtime.recipe import run

        _forget_inherited_rendezvous()
        result = run(plan, Path(plan_path), out, resume=resume, trust_remote_code=trust_remote_code,
                     allow_pickle=allow_pickle, max_steps=max_steps, progress=progress)
        _summary(out, result.student_dir)
        return
    argv = launch_argv(plan, Path(plan_path), out, resume=resume, max_steps=max_steps,
                       trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, progress=progress)
    for stale in (out / "ranks").glob("rank*.json"):
        stale.unlink()
    print("launching: " + " ".join(argv), file=sys.stderr)
    proc = subprocess.run(argv, env=_env())
    done = sorted((out / "ranks").glob("rank*.json"))
    if len(done) == plan.world_size:
        if proc.returncode != 0:
            print(f"note: the launcher exited with status {proc.returncode} after every rank finished "
                  "(a known exit-time abort of multi-rank ZeRO-3 on CPU); results are complete", file=sys.stderr)
        _summary(out, out / "student")
        return
    raise RunError(f"the run failed: {len(done)} of {plan.world_size} ranks finished (launcher exit status "
                   f"{proc.returncode}); see the messages above. Resume with: gkdc run {plan_path} --out {out} --resume")


RENDEZVOUS_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _forget_inherited_rendezvous() -> None:
    """A single-rank plan runs in this process: rendezvous variables inherited from a parent process (a test
    runner, a job script) name someone else's store, whose port is taken, so this process picks its own."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        for key in RENDEZVOUS_VARS:
            os.environ.pop(key, None)


def launch_argv(plan: Plan, plan_path: Path, out: Path, *, resume: bool, max_steps: int | None,
                trust_remote_code: bool, allow_pickle: bool, progress: bool) -> list[str]:
    """The plan's launch command with this plan file, the run directory and the run's flags."""
    argv = list(plan.launch)
    if "runtime.worker" not in argv:
        raise RunError("the plan's launch command does not start runtime.worker; re-plan the spec")
    at = argv.index("runtime.worker") + 1
    argv[at:at + 1] = [str(plan_path)]
    exe = shutil.which(argv[0]) or str(Path(sys.executable).with_name(argv[0]))
    if not Path(exe).exists():
        raise RunError(f"'{argv[0]}' is not installed in this environment (pip install deepspeed)")
    argv[0] = exe
    _free_master_port(argv)
    argv.append(str(out))
    argv += ["--resume"] * resume + ["--trust-remote-code"] * trust_remote_code + ["--allow-pickle"] * allow_pickle
    argv += ["--no-progress"] * (not progress)
    if max_steps is not None:
        argv += ["--max-steps", str(max_steps)]
    return argv


def _free_master_port(argv: list[str]) -> None:
    """Keep the plan's master port unless something already listens there; then take a free one."""
    if "--master_port" not in argv:
        return
    at = argv.index("--master_port") + 1
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", int(argv[at])))
            return
        except OSError:
            pass
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    print(f"note: master port {argv[at]} is in use; using {port}", file=sys.stderr)
    argv[at] = str(port)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}  # the launcher sets its own
    # ranks import this checkout's packages even when gkdc is not installed in site-packages
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _summary(out: Path, student: Path | None) -> None:
    metrics = out / "metrics.jsonl"
    last = None
    if metrics.exists():
        lines = [line for line in metrics.read_text().splitlines() if line.strip()]
        last = json.loads(lines[-1]) if lines else None
    if last:
        print(f"finished: stage {last.get('stage')} step {last.get('step')} loss {last.get('total', float('nan')):.4f}",
              file=sys.stderr)
    if student is not None and Path(student).exists():
        print(f"student saved to {student}", file=sys.stderr)
