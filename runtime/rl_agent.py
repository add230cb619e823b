"""RL-KD's teacher selector as GKD's code runs it (``select_teacher(policy: glmkd)``; GitHub aitsc/GLMKD 8d6cf11,
``multi_teacher_model.py`` ``RL_KD``, readme `## RL-KD` 2), beside gkdc's REINFORCE agent
(``runtime/interventions.py`` ``SelectTeacher``).

GKD's agent differs from a textbook REINFORCE agent in three ways, kept here on purpose (docs/methods/rl_kd.md):
its update multiplies the probability pi of the taken actions (not log pi) by the reward, it has no baseline,
and it updates one call late: the policy loss of a call scores the *previous* call's state and selection with the
current weights, rewarded by the current batch's student CE (the student having learnt from that selection).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from planner.plan import CapturePoint
from runtime.errors import RunError
from runtime.intervention_base import Base, Signals, StepInfo, _generator, _hidden_point


class GlmkdSelectTeacher(Base):
    """GKD's RL-KD agent: ``p = sigmoid(W_1 [cls; CE_1 .. CE_n] + W_2 [z_1 .. z_n])`` per example (cls: the state
    model's [CLS] state of its last block, CE_j: teacher j's CE on the labels, z_j: its task logits, padded or cut
    to the student's classes as GKD does); teacher j is kept for example i when a uniform draw is below p_ij, and
    its terms get weight ``a_ij / n`` (GKD's mean over (example, teacher) of the kept losses). Policy loss:
    ``-weight * reward * sum pi`` over the previous call's (example, teacher) pairs, ``pi = p a + (1 - p)(1 - a)``
    at the current weights, ``reward = -mean CE(labels, student)`` of the current call, detached; ``weight`` is the
    group's loss weight (GKD adds this loss inside the term it scales by rl_kd_alpha).
    """

    kind = "select_teacher"

    def __init__(self, *, group: str, units: list[tuple[str, str]], terms: dict[str, list[str]], student: str,
                 state_model: str, state_layer: int, width: int, classes: int, weight: float,
                 lr: float | None, seed: int) -> None:
        """``width``: the state model's hidden size; ``classes``: the student's (every teacher's logits are padded
        with 0 or cut to it); ``lr``: the agent's learning rate (None: the stage's, as in GKD)."""
        super().__init__(seed=seed)
        self.group, self.units, self.terms, self.student = group, list(units), dict(terms), student
        self.state_model, self.state_layer, self.classes, self.weight, self.lr = (
            state_model, state_layer, classes, weight, lr)
        n = len(self.units)
        with torch.random.fork_rng(devices=[]):  # its init depends on the stage seed only, not on what ran before
            torch.manual_seed(_generator(self.seed, self.group, "init").initial_seed())
            self.agent_state = nn.Linear(width + n, n)
            self.agent_soft = nn.Linear(classes * n, n)
        self._now: tuple[Tensor, Tensor, Tensor] | None = None
        self._last: tuple[Tensor, Tensor, Tensor] | None = None
        """The previous call's (state, logits, selection), saved with the student (``get_extra_state``) so a
        resumed run makes the update an uninterrupted one makes (a restarted GKD run loses it)."""

    def get_extra_state(self) -> dict[str, Tensor]:
        if self._last is None:
            return {}
        return {name: x.detach().cpu() for name, x in zip(("state", "logits", "select"), self._last)}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        device = self.agent_state.weight.device
        self._last = (tuple(state[k].to(device) for k in ("state", "logits", "select"))  # type: ignore[assignment]
                      if state else None)

    def extra_points(self) -> dict[str, list[CapturePoint]]:
        points: dict[str, list[CapturePoint]] = {t: [CapturePoint(kind="task_logits")] for _, t in self.units}
        points.setdefault(self.state_model, []).append(_hidden_point(self.state_layer))
        points.setdefault(self.student, []).append(CapturePoint(kind="task_logits"))
        return points

    def _labels(self, batch: Mapping[str, Tensor]) -> Tensor:
        if "labels" not in batch:
            raise RunError("select_teacher(policy: glmkd) reads the teachers' and the student's CE on the labels "
                           "(the batch has no labels)")
        return batch["labels"].long()

    def state(self, signals: Signals, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The agent's two inputs: ``[b, width + n]`` ([CLS], each teacher's CE) and ``[b, classes x n]``."""
        labels = self._labels(batch)
        cls = signals[self.state_model][("hidden", self.state_layer)][:, 0].float()
        ces, logits = [], []
        for _, t in self.units:
            z = signals[t][("task_logits", None)].float()
            ces.append(F.cross_entropy(z, labels, ignore_index=-100, reduction="none")[:, None])
            extra = self.classes - z.shape[-1]
            logits.append(F.pad(z, (0, extra)) if extra > 0 else z[:, :self.classes])
        return torch.cat([cls, *ces], -1).detach(), torch.cat(logits, -1).detach()

    def probs(self, state: Tensor, logits: Tensor) -> Tensor:
        dtype = self.agent_state.weight.dtype
        return torch.sigmoid((self.agent_state(state.to(dtype)) + self.agent_soft(logits.to(dtype))).float())

    def row_weights(self, signals: Signals, batch: Mapping[str, Tensor], info: StepInfo) -> dict[str, Tensor]:
        state, logits = self.state(signals, batch)
        with torch.no_grad():
            p = self.probs(state, logits)
        gen = _generator(self.seed, self.group, info.step, info.micro, info.rank)
        select = (torch.rand(p.shape, generator=gen).to(p.device) < p).float()
        self._now = (state, logits, select)
        share = select / len(self.units)
        return {term: share[:, i] for i, (group, _) in enumerate(self.units) for term in self.terms[group]}

    def extra_loss(self, signals: Signals, batch: Mapping[str, Tensor], info: StepInfo) -> dict[str, Tensor]:
        now, self._now = self._now, None
        if now is None:
            return {}
        last, self._last = self._last, now
        if last is None:  # GKD's first call: nothing to score yet
            return {}
        state, logits, select = last
        p = self.probs(state, logits)
        pi = p * select + (1 - p) * (1 - select)
        student = signals[self.student][("task_logits", None)].detach().float()
        reward = -F.cross_entropy(student, self._labels(batch), ignore_index=-100)
        return {f"{self.group}/policy": -self.weight * pi.sum() * reward}

    def lr_groups(self, student: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
        return [(f"{self.group}/agent", [*self.agent_state.parameters(), *self.agent_soft.parameters()])]
