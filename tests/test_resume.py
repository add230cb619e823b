"""Resume after SIGKILL: a run killed at a random step and resumed ends with exactly the uninterrupted weights."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_recipe import load, make_plan, records, student_tensors

REPO = Path(__file__).resolve().parents[1]
STEPS = (6, 4)  # two stages, so a kill may land in either one or at the hand-off

# Slows each step down so the parent can kill the worker mid-run; otherwise the worker is the real one.
DRIVER = """
import sys, time
import runtime.metrics as metrics
_log = metrics.MetricsLogger.log_step
def _slow(self, record, step):
    _log(self, record, step)
    time.sleep(0.25)
metrics.MetricsLogger.log_step = _slow
from runtime.worker import main
sys.exit(main(sys.argv[1:]))
"""


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}}
    env["PYTHONPATH"] = str(REPO)
    return env


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _kill_at(plan_path: Path, out: Path, kill_after: int, extra_delay: float) -> int:
    """Start the worker, SIGKILL it ``extra_delay`` s after its ``kill_after``-th step was logged; returns its status."""
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(plan_path), str(out), "--no-progress"],
        cwd=plan_path.parent, env=_clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while _lines(out / "metrics.jsonl") < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(extra_delay)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"worker ended before the kill: {proc.returncode} {err.decode()[-2000:]}"
    return proc.returncode


@pytest.mark.deepspeed
@pytest.mark.parametrize("packed, split", [(False, None), (True, None), (False, 0.25)],
                         ids=["padded", "packed", "evaluated"])
def test_sigkill_at_random_step_then_resume_matches_uninterrupted(tmp_path, packed, split):
    from runtime.recipe import run

    seed = int(os.environ.get("GKDC_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    kill_after = rng.randint(1, sum(STEPS) - 2)
    delay = rng.uniform(0.0, 0.25)
    print(f"seed {seed}: kill after step {kill_after} + {delay:.3f} s")

    evaluation = {"split": split, "eval_every": 2, "keep_best": "loss"} if split else {}
    ref_plan = make_plan(tmp_path / "ref", steps=STEPS, save_every=2, packed=packed, **evaluation)
    run(load(ref_plan), ref_plan, tmp_path / "ref" / "out", resume=False, progress=False)

    plan_path = make_plan(tmp_path / "killed", steps=STEPS, save_every=2, packed=packed, **evaluation)
    out = tmp_path / "killed" / "out"
    _kill_at(plan_path, out, kill_after, delay)
    assert not (out / "student").exists()
    result = run(load(plan_path), plan_path, out, resume=True, progress=False)

    expected, got = student_tensors(tmp_path / "ref" / "out"), student_tensors(out)
    assert expected.keys() == got.keys()
    for key in expected:
        assert got[key].dtype == torch.float32
        assert torch.equal(expected[key], got[key]), f"{key} differs after resume (seed {seed})"
    # the metrics file tells one uninterrupted story with the same losses
    ref_all, every = records(tmp_path / "ref" / "out"), records(out)
    assert [(r["kind"], r["stage"], r["step"]) for r in every] == [(r["kind"], r["stage"], r["step"]) for r in ref_all]
    drop = ("seconds", "step_seconds", "tokens_per_second")  # wall-clock figures differ between runs
    assert [{k: v for k, v in r.items() if k not in drop} for r in every if r["kind"] == "eval"] == \
        [{k: v for k, v in r.items() if k not in drop} for r in ref_all if r["kind"] == "eval"]
    if split:
        assert json.loads((out / "best" / "stage-1.json").read_text()) == \
            json.loads((tmp_path / "ref" / "out" / "best" / "stage-1.json").read_text())
    ref_recs, recs = [r for r in ref_all if r["kind"] == "train"], [r for r in every if r["kind"] == "train"]
    assert [r["grad_norm"] for r in recs] == [r["grad_norm"] for r in ref_recs]
    assert [r["total"] for r in recs] == [r["total"] for r in ref_recs]
    assert [r["lr"] for r in recs] == [r["lr"] for r in ref_recs]
    assert [r["tokens"] for r in recs] == [r["tokens"] for r in ref_recs]
    if packed:  # every position of a packed block is real
        assert all(r["tokens"] == r["positions"] for r in recs)
    else:
        assert any(r["tokens"] < r["positions"] for r in recs)
    assert result.stages[-1].steps == STEPS[-1]
    # only the newest engine checkpoint is kept
    assert not list((out / "checkpoints").glob("stage*-step*"))
    progress = json.loads((out / "checkpoints" / "progress.json").read_text())
    assert progress["done"] and progress["stage"] == 1
