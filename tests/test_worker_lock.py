"""runtime.worker started directly takes the run folder's lock, and one that `gkdc run` started verifies it
(issue 14: two runs on one --out must not both proceed, whatever starts them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_recipe import make_plan

ROOT = Path(__file__).resolve().parents[1]
HOLD = {
    "gkdc-run": "from runtime.launch import run_folder_lock as lock\nctx = lock(out)",
    "direct-worker": "from runtime.worker import rank_lock\nctx = rank_lock(out, 0)",
}


def _holder(out: Path, kind: str) -> subprocess.Popen:
    code = ("import sys, time\nfrom pathlib import Path\nout = Path(sys.argv[1])\n" + HOLD[kind] +
            "\nwith ctx:\n    print('held', flush=True)\n    time.sleep(120)\n")
    env = {k: v for k, v in os.environ.items() if k != "GKDC_RUN_LOCK"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("kind", sorted(HOLD))
def test_a_direct_worker_is_refused_on_a_folder_another_run_holds(tmp_path, capsys, monkeypatch, kind):
    from runtime.worker import main

    monkeypatch.delenv("GKDC_RUN_LOCK", raising=False)
    monkeypatch.setenv("RANK", "0")
    plan = make_plan(tmp_path, steps=(1,))
    out = tmp_path / "out"
    out.mkdir()
    holder = _holder(out, kind)
    try:
        assert main([str(plan), str(out), "--no-progress"]) == 2
        assert "is in use by another gkdc run" in capsys.readouterr().err
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_gkdc_run_is_refused_while_a_direct_worker_holds_the_folder(tmp_path):
    from clitools import gkdc

    plan = make_plan(tmp_path, steps=(1,))
    out = tmp_path / "out"
    out.mkdir()
    holder = _holder(out, "direct-worker")
    try:
        proc = gkdc("run", str(plan), "--out", str(out), "--no-progress", timeout=300)
        assert proc.returncode == 1 and "is in use by another gkdc run" in proc.stderr, proc.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_launched_rank_verifies_its_runs_lock(tmp_path, capsys, monkeypatch):
    from runtime.launch import LOCK_ENV, run_folder_lock
    from runtime.worker import main

    plan = make_plan(tmp_path, steps=(1,))
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv(LOCK_ENV, "pid 1 on elsewhere run 0123")  # a token no lock of this folder carries
    assert main([str(plan), str(out), "--no-progress"]) == 2
    assert "is not locked by the gkdc run that started this rank" in capsys.readouterr().err
    with run_folder_lock(out):  # what `gkdc run` holds while its ranks run (and hands them through the env)
        assert os.environ[LOCK_ENV] in (out / ".lock").read_text()
        assert main([str(plan), str(out), "--no-progress"]) == 0
    assert LOCK_ENV not in os.environ and (out / "student").is_dir()
