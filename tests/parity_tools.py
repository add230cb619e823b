"""Helpers shared by the method tests (tests/test_methods_parity.py, test_methods_parity_agents.py,
test_methods_run.py): the (variant, pad) tables of a method whose default differs from GLMKD's, the tiny-model
spec lines, and a run that crashes after a checkpoint and resumes, judged against the uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest


def padded_differs(reason):
    """Agrees without padding; with padding a strict xfail stating the difference."""
    return pytest.mark.parametrize("pad", [pytest.param("padded", marks=pytest.mark.xfail(strict=True, reason=reason)),
                                           "unpadded"])


def glmkd_variants(default: str, glmkd: str, reason: str, *, padded_only: bool = False):
    """Parametrizes ``variant, pad``: the GLMKD variant ``glmkd`` agrees with the transcription with and without
    padding; the ``default`` is a strict xfail stating the difference, on both (or, ``padded_only``, only with
    padding: without it the two agree)."""
    differs = pytest.mark.xfail(strict=True, reason=reason)
    return pytest.mark.parametrize("variant,pad", [
        pytest.param(default, "padded", marks=differs),
        pytest.param(default, "unpadded", marks=() if padded_only else differs),
        (glmkd, "padded"), (glmkd, "unpadded")])


def header(family: str) -> str:
    return (f'data sst2 = jsonl("sst2.jsonl") {{ text: sentence, label: label, seq_len: 12 }}\n'
            f'data corpus = text("corpus.txt") {{ seq_len: 12 }}\n')


def teacher(name: str, family: str, layers: int = 4, head: str = "classify(2)") -> str:
    return f'teacher {name} = hf("{family}{layers}") {{ head: {head}, init: random }}\n'


def rl_kd_resume_spec(loss: str) -> str:
    """Three BERT teachers (bert, base, and the state model semantic) and a 2-block student: a 5-step stage
    ``select`` of micro-batches, checkpointed every 2 steps, training ``loss``."""
    text = header("bert") + teacher("bert", "bert") + teacher("base", "bert", 2) + teacher("semantic", "bert", 2, "none")
    return text + f"""use rl_kd
student small = like(bert) {{ layers: 2, head: classify(2), init: copy(bert, layers: [0, 2]) }}
stage select {{ data: sst2, steps: 5, batch: 8, micro_batch: 4, save_every: 2,
  loss: {loss} }}
"""


def crash_and_resume(workdir: Path, monkeypatch, text: str, name: str, crash_after: int):
    """Run ``text`` straight, then again crashing at step ``crash_after + 1`` and resuming from the checkpoint.

    Returns (straight run dir, resumed run dir, the resumed run's result)."""
    from gkdlang.lower import check_file
    from planner.build import build_plan
    from runtime import recipe
    from runtime.errors import RunError

    path = workdir / f"{name}.gkd"
    path.write_text(text)
    spec = check_file(path).spec
    outs = {}
    for arm in ("straight", "crashed"):
        plan_path = workdir / f"{name}-{arm}.json"
        plan_path.write_text(build_plan(spec, gkdc_version="t", spec_path=str(path)).model_dump_json())
        outs[arm] = (plan_path, workdir / f"{name}-{arm}")
    plan_path, out = outs["straight"]
    recipe.run(recipe.Plan.model_validate_json(plan_path.read_text()), plan_path, out, resume=False, progress=False)
    real_step = recipe.train_step

    def crash(env, live, batches, step):
        if step == crash_after:
            raise RunError("simulated crash")
        return real_step(env, live, batches, step)

    plan_path, out = outs["crashed"]
    plan = recipe.Plan.model_validate_json(plan_path.read_text())
    monkeypatch.setattr(recipe, "train_step", crash)
    with pytest.raises(RunError, match="simulated crash"):
        recipe.run(plan, plan_path, out, resume=False, progress=False)
    monkeypatch.setattr(recipe, "train_step", real_step)
    return outs["straight"][1], out, recipe.run(plan, plan_path, out, resume=True, progress=False)


def resumes_exactly(workdir: Path, monkeypatch, text: str, name: str, crash_after: int,
                    resumed_from: str) -> tuple[Path, Path]:
    """``crash_and_resume``, checked: the resumed run restarts at ``resumed_from`` and ends with the uninterrupted
    run's student, tensor for tensor. Returns (straight run dir, resumed run dir)."""
    import torch
    from test_recipe import student_tensors

    straight_dir, out, result = crash_and_resume(workdir, monkeypatch, text, name, crash_after=crash_after)
    assert result.resumed_from == resumed_from
    straight, resumed = student_tensors(straight_dir), student_tensors(out)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    return straight_dir, out
