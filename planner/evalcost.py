"""Held-out evaluation as the planner sees it: how many examples a data ``split`` holds out (the one rule the
runtime's split uses too), and what the stage's evaluations cost beside its training.

Cost model: one evaluation runs, per held-out example, one forward of the student for its own metric, one more
for the distillation loss, and one of each teacher; a training step runs per example a forward and a backward
(about 3 forwards) of the student and a forward of each teacher. The evaluations' share of the stage's compute
is therefore about ``evals x held x (2 + t) / (steps x batch x (3 + t))`` with ``t`` the teachers' cost relative
to the student's. Eval runs under ``torch.no_grad`` on the training micro-batch, so it allocates no activations
beyond one forward's (below the training step's peak): memory is not charged. Time is reported when the share
is above ``NEGLIGIBLE`` and not charged either way (the planner's step time is per optimizer step).
"""

from __future__ import annotations

import math

NEGLIGIBLE = 0.05
"""Share of a stage's compute under which its evaluations go unmentioned."""


def held_out(n: int, fraction: float | None) -> int:
    """Examples (rows, or packed blocks) of ``n`` that a ``split`` of ``fraction`` holds out: round(n x fraction),
    at least one when there is a split; the run refuses a split that leaves no training example."""
    if not fraction or n <= 0:
        return 0
    return min(n, max(1, round(n * fraction)))


def evaluations(total_steps: int, eval_every: int | None) -> int:
    """Evaluations of a stage: one every ``eval_every`` steps and one at its end (never two at the same step)."""
    if total_steps <= 0:
        return 1
    every = eval_every or total_steps
    return total_steps // every + (0 if total_steps % every == 0 else 1)


def eval_share(total_steps: int, batch: int, held: int, eval_every: int | None, teacher_ratio: float) -> float:
    """The evaluations' share of the stage's forward/backward compute (module docstring)."""
    if held <= 0 or total_steps <= 0:
        return 0.0
    evals = evaluations(total_steps, eval_every)
    return evals * held * (2 + teacher_ratio) / (total_steps * batch * (3 + teacher_ratio))


def eval_note(stage: str, total_steps: int, batch: int, held: int, eval_every: int | None,
              teacher_ratio: float) -> str | None:
    """A plan note when the evaluations cost more than ``NEGLIGIBLE`` of the stage's compute, else None."""
    share = eval_share(total_steps, batch, held, eval_every, teacher_ratio)
    if share < NEGLIGIBLE:
        return None
    evals = evaluations(total_steps, eval_every)
    return (f"stage '{stage}': {evals} evaluation(s) of {held} held-out examples add about {math.ceil(share * 100)}% "
            f"to its compute (not in the step time); raise eval_every or lower the data's split to cut it")
