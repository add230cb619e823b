"""Plan -> a finished run: one rank in this process, several through DeepSpeed's launcher.

The launch command is built here from trusted parts (``launch_argv``); the plan's ``launch`` field is a record
for people and is never executed. The plan itself is verified (runtime.integrity) before anything starts.

``gkdc run`` calls ``run_plan``. With several ranks the launcher starts ``python -m runtime.worker`` per rank;
success is judged by the result file each rank writes (``ranks/rank<N>.json``), not only by the launcher's exit
status, because two-rank ZeRO-3 on CPU sometimes aborts at interpreter exit after training finished
(documented in docs/runtime.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from planner.plan import Plan
from runtime.errors import RunError
from runtime.locks import LOCK_ENV, LOCK_FILE, lock_or_refuse  # noqa: F401 (LOCK_FILE: re-exported)
from runtime.multinode import NodeOptions, Nodes, count as _count, parse_hostfile, write_hostfile


def run_plan(plan: Plan, plan_path: Path, out: Path, *, resume: bool = False, max_steps: int | None = None,
             trust_remote_code: bool = False, allow_pickle: bool = False, progress: bool = True,
             allowed_paths: tuple[str, ...] = (), overwrite: bool = False, nodes: NodeOptions | None = None) -> None:
    out = Path(out)
    nodes = nodes or NodeOptions()
    try:
        out.mkdir(parents=True, exist_ok=True)
        if nodes.rank is not None:  # one node of several: its own lock, ranks and checks (runtime.multinode)
            _run_node(plan, Path(plan_path), out, nodes, resume=resume, max_steps=max_steps, overwrite=overwrite,
                      trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, progress=progress,
                      allowed_paths=allowed_paths)
            return
        with run_folder_lock(out):
            if overwrite:  # under the lock: never another live run's files
                from runtime.rerun import clear_outputs

                removed = clear_outputs(out)
                if removed:
                    print(f"--overwrite: removed the previous run's {', '.join(removed)} from {out}", file=sys.stderr)
            _run_plan(plan, Path(plan_path), out, resume=resume, max_steps=max_steps,
                      trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, progress=progress,
                      allowed_paths=allowed_paths, hostfile=nodes.hostfile)
    except OSError as err:  # a full disk, a read-only folder: the file and the reason, not a traceback
        where = f" {err.filename}" if err.filename else f" under {out}"
        raise RunError(f"cannot write{where}: {err.strerror or err} (is the disk full or the folder "
                       "read-only?)") from err


@contextlib.contextmanager
def run_folder_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive OS lock (fcntl.flock, released by the kernel if this process dies) on ``out/.lock``
    for the whole run: a second run on the same folder is refused instead of writing the same files.
    fcntl rather than a library: the standard library's call is all it takes, and DeepSpeed needs POSIX anyway."""
    import fcntl

    path = out / LOCK_FILE
    fh = open(path, "a+", encoding="utf-8")
    try:
        lock_or_refuse(fh, fcntl.LOCK_EX, out)
        fh.seek(0)
        fh.truncate()
        token = f"pid {os.getpid()} on {socket.gethostname()} run {os.urandom(8).hex()}"
        fh.write(token + "\n")
        fh.flush()
        os.environ[LOCK_ENV] = token  # the ranks this run launches inherit it: the lock is theirs (runtime.worker)
        yield
    finally:
        os.environ.pop(LOCK_ENV, None)
        fh.close()  # closing the file releases the lock


def _run_plan(plan: Plan, plan_path: Path, out: Path, *, resume: bool, max_steps: int | None,
              trust_remote_code: bool, allow_pickle: bool, progress: bool, allowed_paths: tuple[str, ...],
              hostfile: Path | None = None) -> None:
    if plan.world_size == 1:
        from runtime.recipe import run

        _forget_inherited_rendezvous()
        result = run(plan, Path(plan_path), out, resume=resume, trust_remote_code=trust_remote_code,
                     allow_pickle=allow_pickle, max_steps=max_steps, progress=progress, allowed_paths=allowed_paths)
        _summary(out, result.student_dir)
        return
    from runtime.recipe import check_plan

    check_plan(plan, Path(plan_path), allowed_paths)  # before starting ranks: refuse an edited plan here, once
    argv = launch_argv(plan, Path(plan_path), out, resume=resume, max_steps=max_steps,
                       trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, progress=progress,
                       allowed_paths=allowed_paths, hostfile=hostfile, out_dir=out)
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
                   f"{proc.returncode}); see the messages above. Resume with: gkdc run {Path(plan_path).resolve()} "
                   f"--out {out.resolve()} --resume")


def _run_node(plan: Plan, plan_path: Path, out: Path, opts: NodeOptions, *, resume: bool, max_steps: int | None,
              overwrite: bool, trust_remote_code: bool, allow_pickle: bool, progress: bool,
              allowed_paths: tuple[str, ...]) -> None:
    """Node ``opts.rank`` of a multi-node plan: checks, then runtime.multinode.run_node starts its ranks."""
    from runtime.multinode import layout, run_node
    from runtime.recipe import check_plan

    nodes = layout(plan)
    if nodes.nodes == 1:
        raise RunError("--node-rank is for a plan of several nodes; this plan has one (plain `gkdc run` starts its "
                       "ranks)")
    if not 0 <= opts.rank < nodes.nodes:
        raise RunError(f"--node-rank {opts.rank} is outside the plan's {nodes.nodes} node(s) (0 to {nodes.nodes - 1})")
    if opts.hostfile is not None:
        nodes = parse_hostfile(opts.hostfile, nodes)
    check_plan(plan, plan_path, allowed_paths)
    if overwrite and opts.rank == 0:
        from runtime.rerun import clear_outputs

        removed = clear_outputs(out)
        if removed:
            print(f"--overwrite: removed the previous run's {', '.join(removed)} from {out}", file=sys.stderr)
    addr = opts.master_addr or (nodes.hosts[0] if nodes.hosts else "127.0.0.1")
    port = opts.master_port or _planned_port(plan.spec_hash)  # no free-port fallback: every node must agree
    argv = worker_argv(plan_path, out, resume=resume, max_steps=max_steps, trust_remote_code=trust_remote_code,
                       allow_pickle=allow_pickle, progress=progress, allowed_paths=allowed_paths)
    run_node(plan, plan_path, out, argv, nodes, opts.rank, addr, port, _env())
    if opts.rank == 0:
        _summary(out, out / "student")


RENDEZVOUS_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _forget_inherited_rendezvous() -> None:
    """A single-rank plan runs in this process: rendezvous variables inherited from a parent process (a test
    runner, a job script) name someone else's store, whose port is taken, so this process picks its own."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        for key in RENDEZVOUS_VARS:
            os.environ.pop(key, None)


def launch_argv(plan: Plan, plan_path: Path, out: Path, *, resume: bool, max_steps: int | None,
                trust_remote_code: bool, allow_pickle: bool, progress: bool,
                allowed_paths: tuple[str, ...] = (), hostfile: Path | None = None,
                out_dir: Path | None = None) -> list[str]:
    """The launch command, built here from trusted parts; the plan's ``launch`` field is a record for people
    and is never executed (a plan is input: anyone may have written it).

    Parts: this interpreter running DeepSpeed's launcher module (no PATH lookup), rank counts from the embedded
    cluster (validated integers), the hostfile next to the plan (multi-node), a master port derived from the
    spec hash (free-port fallback), and this runtime's own worker module with the plan, run directory and flags.
    """
    import importlib.util

    cluster = plan.spec.cluster
    nodes, per_node = _count(cluster.nodes, "nodes"), _count(cluster.gpus_per_node, "gpus per node")
    if nodes * per_node != plan.world_size:
        raise RunError(f"{plan_path}: world_size {plan.world_size} disagrees with its cluster ({nodes} node(s) x "
                       f"{per_node}); the plan was edited: re-run `gkdc plan`")
    if importlib.util.find_spec("deepspeed") is None:
        raise RunError("the deepspeed launcher is not installed in this environment (pip install deepspeed)")
    argv = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if nodes > 1:
        hostfile = Path(hostfile) if hostfile else Path(plan_path).with_name("hostfile")
        if not hostfile.is_file():
            template = write_hostfile(Path(out_dir or out) / "hostfile", Nodes(nodes, per_node))
            raise RunError(f"a {nodes}-node plan needs --node-rank R on each node (docs/runtime.md, several nodes), "
                           f"or --hostfile FILE for DeepSpeed's ssh launcher; a template with placeholder host "
                           f"names was written to {template}")
        parse_hostfile(hostfile, Nodes(nodes, per_node))
        argv += ["--hostfile", str(hostfile), "--num_nodes", str(nodes)]
    argv += ["--num_gpus", str(per_node), "--master_port", str(_master_port(plan.spec_hash)),
             "--module"] + worker_argv(plan_path, out, resume=resume, max_steps=max_steps,
                                       trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                                       progress=progress, allowed_paths=allowed_paths)[2:]
    return argv


def worker_argv(plan_path: Path, out: Path, *, resume: bool, max_steps: int | None, trust_remote_code: bool,
                allow_pickle: bool, progress: bool, allowed_paths: tuple[str, ...] = ()) -> list[str]:
    """``python -m runtime.worker PLAN OUT`` and the run's flags: one rank's command."""
    argv = [sys.executable, "-m", "runtime.worker", str(plan_path), str(out)]
    argv += ["--resume"] * resume + ["--trust-remote-code"] * trust_remote_code + ["--allow-pickle"] * allow_pickle
    argv += ["--no-progress"] * (not progress)
    for root in allowed_paths:
        argv += ["--allow-path", str(root)]
    if max_steps is not None:
        argv += ["--max-steps", str(int(max_steps))]
    return argv


def _planned_port(spec_hash: str) -> int:
    """The planner's port for this spec: 29500 + hash mod 1000."""
    from planner.build import master_port

    if not re.fullmatch(r"[0-9a-f]{8,128}", spec_hash or ""):
        raise RunError(f"the plan's spec_hash {spec_hash[:40]!r} is not a hex digest; re-run `gkdc plan`")
    return master_port(spec_hash)


def _master_port(spec_hash: str) -> int:
    """The planner's port for this spec unless something already listens there."""
    port = _planned_port(spec_hash)
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return port
        except OSError:
            pass
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    print(f"note: master port {port} is in use; using {free}", file=sys.stderr)
    return free


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}  # the launcher sets its own
    # ranks import this checkout's packages even when gkdc is not installed in site-packages
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _summary(out: Path, student: Path | None) -> None:
    metrics = out / "metrics.jsonl"
    last = None
    if metrics.exists():  # the last training record (evaluations are listed in the log as they happen)
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        last = next((r for r in reversed(lines) if r.get("kind", "train") == "train"), None)
    if last:
        print(f"finished: stage {last.get('stage')} step {last.get('step')} loss {last.get('total', float('nan')):.4f}",
              file=sys.stderr)
