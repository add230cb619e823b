"""Two "nodes" on this machine: two `gkdc run --node-rank 0/1` launchers meet on 127.0.0.1 (one CPU rank each,
gloo), train, checkpoint, are SIGKILLed after a checkpoint, resume, and end with the same student as a one-node
two-rank run of the same global batch (runtime/multinode.py, docs/runtime.md "Several nodes").

Three runs of two ranks (two-node, its resume, the one-node reference): measured on the shared 2-core machine at
load average ~6, 256 s wall and 147 s of CPU (user) for the whole test; most of it is the ranks' and launchers'
start-up (torch/DeepSpeed imports), not the 12 steps."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from clitools import ROOT, clean_env, gkdc, tiny_spec

STEPS = 12


def _free_port() -> int:
    """A port whose successor is free too (the ranks use it, the launchers it + 1)."""
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no two free ports in a row")


def _plan(tmp_path, name: str, cluster: str) -> dict:
    spec = tmp_path / f"{name}.gkd"
    spec.write_text(tiny_spec(steps=STEPS, cluster=cluster, stage="  save_every: 4\n"))
    r = gkdc("plan", str(spec), "-o", str(tmp_path / f"{name}.json"), "--allow-path", str(ROOT), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp_path / f"{name}.json").read_text())


def _nodes(plan, out, port: int, *extra: str) -> list[subprocess.Popen]:
    """Node 0 and node 1, each its own session (so a kill takes its ranks with it)."""
    return [subprocess.Popen([sys.executable, "-m", "gkdc", "run", str(plan), "--out", str(out), "--no-progress",
                              "--allow-path", str(ROOT), "--node-rank", str(r), "--master-addr", "127.0.0.1",
                              "--master-port", str(port), *extra],
                             cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True) for r in (0, 1)]


def _finish(procs, timeout: float = 300) -> list[str]:
    logs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        logs.append(f"exit {p.returncode}:\n{out[-3000:]}")
    return logs


def _progress(out) -> int:
    try:
        return json.loads((out / "checkpoints" / "progress.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.deepspeed
def test_two_nodes_on_loopback_resume_to_the_one_node_student(tmp_path):
    two = _plan(tmp_path, "two", "nodes: 2, gpus: 1 x cpu per node")
    one = _plan(tmp_path, "one", "gpus: 2 x cpu")
    assert two["world_size"] == one["world_size"] == 2 and two["spec"]["cluster"]["nodes"] == 2
    assert two["stages"][0]["placement"] == one["stages"][0]["placement"]  # the same global batch and layout

    out = tmp_path / "run2"
    procs = _nodes(tmp_path / "two.json", out, _free_port())
    deadline = time.monotonic() + 300
    while _progress(out) < 4 and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    killed_at = _progress(out)
    for p in procs:  # SIGKILL both launchers and their ranks
        os.killpg(p.pid, signal.SIGKILL)
    logs = _finish(procs)
    assert 4 <= killed_at < STEPS and not (out / "student").exists(), logs
    assert sorted(x.name for x in (out / "nodes").iterdir()) and (out / ".lock.node1").exists()

    procs = _nodes(tmp_path / "two.json", out, _free_port(), "--resume")
    logs = _finish(procs)
    assert all(p.returncode == 0 for p in procs), logs
    assert "resum" in logs[0].lower(), logs[0]
    assert sorted(x.name for x in (out / "ranks").glob("rank*.json")) == ["rank0.json", "rank1.json"]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert max(m["step"] for m in metrics if m.get("kind", "train") == "train") == STEPS

    ref = tmp_path / "run1"
    r = gkdc("run", str(tmp_path / "one.json"), "--out", str(ref), "--no-progress", "--allow-path", str(ROOT),
             timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = load_file(out / "student" / "model.safetensors"), load_file(ref / "student" / "model.safetensors")
    assert sorted(got) == sorted(want)
    for key in want:
        assert (got[key] - want[key]).abs().max().item() <= 1e-6, key
