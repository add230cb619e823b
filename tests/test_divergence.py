"""Diverged-but-finite weights are never checkpointed (runtime.divergence): the last checkpoint written before the
run went bad is the one kept, and the documented recovery resumes from it."""

from __future__ import annotations

import contextlib
import io

import pytest

from test_recipe import make_plan

from gkdc import cli


def _cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(list(argv))
    return code, err.getvalue()


def _poison(monkeypatch, at_step: int, value: float):
    """After step ``at_step + 1`` one weight becomes ``value`` (finite): the loss of that step was fine."""
    import torch

    from runtime import recipe

    real = recipe.train_step

    def poisoned(env, live, batches, step):
        result = real(env, live, batches, step)
        if step == at_step:
            with torch.no_grad():
                next(live.engine.module.parameters()).view(-1)[0] = value
        return result

    monkeypatch.setattr(recipe, "train_step", poisoned)


def test_finite_but_diverged_weights_are_not_written_and_the_last_good_checkpoint_is_kept(tmp_path, monkeypatch):
    from runtime.checkpoint import read_progress

    _poison(monkeypatch, at_step=3, value=3.4e5)  # issue 14's run: max |w| 336,663 where it is ~1
    plan_path = make_plan(tmp_path, steps=(8,), save_every=2)
    code, err = _cli("run", str(plan_path), "--out", str(tmp_path / "out"), "--no-progress")
    assert code == 1 and "step 4: the trained weights diverged (largest |w| 3.4e+05" in err, err
    assert "this checkpoint was not written, the last good checkpoint (stage0:2) is kept" in err
    progress = read_progress(tmp_path / "out")
    assert progress.step == 2 and (tmp_path / "out" / "checkpoints" / progress.tag).is_dir()
    # the recovery the message names: resume from stage0:2 (here the cause, the poisoning, is gone)
    monkeypatch.undo()
    code, err = _cli("run", str(plan_path), "--out", str(tmp_path / "out"), "--resume", "--no-progress")
    assert code == 0, err
    assert read_progress(tmp_path / "out").done


def test_healthy_growth_is_not_called_divergence(tmp_path, monkeypatch):
    from runtime.checkpoint import read_progress

    _poison(monkeypatch, at_step=1, value=20.0)  # trained weights peak at ~10-30: below the bound
    plan_path = make_plan(tmp_path, steps=(4,), save_every=2)
    code, err = _cli("run", str(plan_path), "--out", str(tmp_path / "out"), "--no-progress")
    assert code == 0, err
    assert read_progress(tmp_path / "out").done


def test_the_bound_is_relative_to_the_stage_start():
    import torch
    from torch import nn

    from runtime import divergence
    from runtime.errors import RunError

    class Engine(nn.Module):  # what divergence reads of a DeepSpeed engine: .module.parameters()
        def __init__(self, scale: float):
            super().__init__()
            self.module = nn.Linear(4, 4)
            with torch.no_grad():
                self.module.weight.fill_(scale)

    big = Engine(50.0)  # a model that starts with large weights may grow to 100x them
    assert divergence.note_start(big) == 50.0
    with torch.no_grad():
        big.module.weight.fill_(4000.0)
    divergence.check(big, "s", 2, "kept")
    with torch.no_grad():
        big.module.weight.fill_(6000.0)
    with pytest.raises(RunError, match="diverged"):
        divergence.check(big, "s", 4, "kept")
    tiny = Engine(1e-3)  # a tiny init grows freely up to MIN_DIVERGED
    divergence.note_start(tiny)
    with torch.no_grad():
        tiny.module.weight.fill_(999.0)
    divergence.check(tiny, "s", 2, "kept")
    with torch.no_grad():
        tiny.module.weight[0, 0] = float("nan")
    with pytest.raises(RunError, match="not finite"):
        divergence.check(tiny, "s", 4, "kept")
