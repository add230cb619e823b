"""The README's main job: the built-in example (examples/tiny.gkd) checked, planned, run and evaluated
through the real CLI, on a CPU, with no download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clitools import ROOT, gkdc


SPEC = ROOT / "examples" / "tiny.gkd"


def _run_demo(out: Path, max_steps: int | None) -> dict[str, dict]:
    plan = out / "plan.json"
    r = gkdc("plan", str(SPEC), "-o", str(plan))
    assert r.returncode == 0, r.stderr
    cap = ["--max-steps", str(max_steps)] if max_steps else []
    r = gkdc("run", str(plan), "--out", str(out), "--no-progress", *cap)
    assert r.returncode == 0, r.stderr
    for name in ("teacher", "small", "plain"):
        assert (out / "models" / name / "config.json").exists()
        assert (out / "models" / name / "model.safetensors").exists()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {m["stage"] for m in metrics} == {"teach", "distill", "baseline"}
    models = [str(out / "models" / n) for n in ("teacher", "small", "plain")]
    r = gkdc("eval", *models, "--data", str(ROOT / "examples/data/heldout.txt"), "--seq-len", "64",
             "--json", str(out / "eval.json"))
    assert r.returncode == 0, r.stderr
    return {row["model"]: row for row in json.loads((out / "eval.json").read_text())}


def test_demo_runs_end_to_end_and_saves_every_trained_model(tmp_path):
    results = _run_demo(tmp_path, max_steps=4)
    vocab = 146
    for row in results.values():
        assert row["metric"] == "perplexity"
        assert 1.0 < row["value"] < 10 * vocab  # finite and sane after 4 steps
        assert row["count"] > 1000


@pytest.mark.slow
def test_full_demo_distilled_student_beats_the_baseline(tmp_path):
    """The whole demo: the distilled 2-block student must be clearly better than the same student trained
    on the same tokens without a teacher, and the teacher better than both."""
    results = _run_demo(tmp_path, max_steps=None)
    teacher, small, plain = (results[n]["value"] for n in ("teacher", "small", "plain"))
    assert teacher < small < plain
    assert plain - small > 0.2, (small, plain)


def test_make_demo_runs_twice_in_a_row_and_prints_each_warning_once(tmp_path):
    """examples/demo.sh (what `make demo` runs) twice on the same folder: the second run starts again from scratch
    (--overwrite); check's warnings are printed once per run; every saved model is listed with its path."""
    import subprocess
    import sys

    from clitools import clean_env

    env = {**clean_env(), "GKDC": f"{sys.executable} -m gkdc", "OUT": str(tmp_path / "demo"), "MAX_STEPS": "1"}
    for attempt in (1, 2):
        r = subprocess.run(["bash", str(ROOT / "examples" / "demo.sh")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, f"attempt {attempt}: {r.stderr[-3000:]}"
        assert r.stderr.count("[no-teacher-signal]") == 2  # two teacherless stages, each warned about once
        assert ("--overwrite: removed the previous run's" in r.stderr) == (attempt == 2)
        for name in ("teacher", "small", "plain", "small-best"):
            assert f"{tmp_path / 'demo' / 'models' / name} " in r.stderr
        assert "the run's student: 'small' of stage distill" in r.stderr
    assert (tmp_path / "demo" / "student").resolve() == (tmp_path / "demo" / "models" / "small").resolve()
