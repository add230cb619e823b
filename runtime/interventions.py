"""Stage interventions: what a method does beyond signals and losses, one class per ``Intervention.kind``.

Takes a stage's checked ``Intervention``s (typed Spec classes, ``gkdlang.spec``) and gives objects the recipe
calls at fixed points of every step. Each class takes flat constructor arguments (names, numbers, term ids);
``build`` translates a Spec intervention into them (``BUILDERS``), so no component reads a spec object. Each
class overrides only the call points it needs:

- ``gate``: change the set of active terms (``drop``: DGKD's per-step teacher dropping);
- ``student_context``: change the student's forward (``replace_layers``: Theseus module replacement);
- ``teacher_passes`` / ``student_passes``: extra forward passes whose signals the loss reads under
  ``model@id`` (``interchange``: DIITO's counterfactual pass);
- ``row_weights``: per-example weights of grouped terms (``weigh``: MT-BERT, Uncertainty; ``select_teacher``:
  RL-KD's agent);
- ``extra_loss``: losses of the intervention's own parameters (``select_teacher``: the REINFORCE loss);
- ``lr_scale``: per-parameter-group learning-rate factors (``progressive_lr``: MobileBERT);
- ``two_passes``: run the whole student loss twice (``perturb``: LRC-BERT's gradient perturbation);
- ``observe``: the step's logged loss values, after the optimizer step (``plateau``: SID's unlocking when the
  current layer's loss stops improving).

Every random draw comes from a generator seeded by (stage seed, intervention, step[, micro-batch, rank]), so
a resumed run draws exactly what an uninterrupted one did. The one learned part (the RL agent) is an
``nn.Module`` the recipe puts inside the student engine, so DeepSpeed trains and checkpoints it with the
student (its reward baseline is a buffer, saved with it).
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkdlang import spec as S
from gkdlang.spec import ModelSpec, Node, Schedule, SignalNode, StageSpec
from planner.plan import CapturePoint, ModelCapture
from runtime.adapters import adapter_for
from runtime.errors import RunError
from runtime.intervention_base import (  # noqa: F401 (StepInfo, ...: part of this module's interface)
    Base,
    Setup,
    Signals,
    StepInfo,
    _classes,
    _first,
    _generator,
    _hidden_point,
    _unwrap,
    _with_first,
)
from runtime.intervention_kernels import (  # noqa: F401 (entropy, ...: part of this module's interface)
    entropy,
    entropy_weights,
    teacher_ce_weights,
    interchange_positions,
    perturbation,
    f64_bits,
    bits_f64,
)
from runtime.diito import Interchange, build_interchange
from runtime.rl_agent import GlmkdSelectTeacher

def _leaves(node: Node) -> list[SignalNode]:
    if isinstance(node, SignalNode):
        return [node]
    return [leaf for child in node.inputs for leaf in _leaves(child)]


def _terms_of(stage: StageSpec, group: str) -> list[str]:
    return [t.id for t in stage.loss if t.gate.group == group]


# ================================================================ drop (DGKD)


class Drop(Base):
    """Each step the group's terms are left out with probability p; one joint draw per step decides every drop
    group of the stage, so that when all are dropped one (drawn) is kept (``min_kept: 1``; ``0``: none, GKD's DGKD)."""

    kind = "drop"

    def __init__(self, *, group: str, terms: set[str], stage_groups: list[tuple[str, float]], min_kept: int,
                 seed: int) -> None:
        """``stage_groups``: (group, p) of every drop group of the stage (one joint draw decides them all)."""
        super().__init__(seed=seed)
        self.group, self.terms, self.min_kept = group, set(terms), min_kept
        self.stage_groups = sorted(stage_groups)

    def dropped(self, step: int) -> set[str]:
        """Drop groups of the stage left out at ``step``."""
        rng = random.Random(f"{self.seed}:drop:{step}")
        out = {g for g, p in self.stage_groups if rng.random() < p}
        kept = len(self.stage_groups) - len(out)
        if kept < self.min_kept:
            out -= set(rng.sample(sorted(out), min(len(out), self.min_kept - kept)))
        return out

    def gate(self, active: set[str], info: StepInfo) -> set[str]:
        return active - self.terms if self.group in self.dropped(info.step) else active


# ================================================================ weigh (MT-BERT, Uncertainty)


class Weigh(Base):
    """Per-teacher, per-example weights of each unit's terms (``by: teacher_ce`` or ``student_entropy``)."""

    kind = "weigh"

    def __init__(self, *, by: str, hard: bool, units: list[tuple[str, str]], terms: dict[str, list[str]],
                 student: str, head: str, classes: int, seed: int) -> None:
        """``units``: (group, teacher) from the smallest teacher; ``terms``: group -> term ids; ``head``: the
        student signal whose entropy weighs (``task_logits`` or ``logits``, of ``classes`` classes)."""
        super().__init__(seed=seed)
        self.by, self.hard, self.units, self.terms = by, hard, list(units), dict(terms)
        self.student, self.head, self.classes = student, head, classes

    def extra_points(self) -> dict[str, list[CapturePoint]]:
        if self.by == "teacher_ce":
            return {t: [CapturePoint(kind="task_logits")] for _, t in self.units}
        return {self.student: [CapturePoint(kind=self.head)]}

    def weights(self, signals: Signals, batch: Mapping[str, Tensor]) -> Tensor:
        """``[n_units, b]``."""
        if self.by == "teacher_ce":
            if "labels" not in batch:
                raise RunError("weigh(by: teacher_ce) needs labelled data (the batch has no labels)")
            return torch.stack([teacher_ce_weights(signals[t][("task_logits", None)], batch["labels"])
                                for _, t in self.units])
        logits = signals[self.student][(self.head, None)]
        mask = batch["attention_mask"].bool() if logits.dim() == 3 else None
        h = entropy(logits, mask)
        if self.hard and h.shape[0] < len(self.units):
            raise RunError(f"weigh(hard: true) splits each micro-batch across {len(self.units)} teachers but the "
                           f"micro-batch has {h.shape[0]} example(s); raise micro_batch")
        return entropy_weights(h, len(self.units), self.classes, self.hard)

    def row_weights(self, signals: Signals, batch: Mapping[str, Tensor], info: StepInfo) -> dict[str, Tensor]:
        w = self.weights(signals, batch)
        return {term: w[i] for i, (group, _) in enumerate(self.units) for term in self.terms[group]}


# ================================================================ select_teacher (RL-KD)


class SelectTeacher(Base):
    """RL-KD: a two-layer policy keeps or skips each teacher per example (Bernoulli); trained by REINFORCE.

    State: the state model's (or the student's) [CLS] state of its last block, and every teacher's soft
    labels. Kept teachers' terms of example i get weight ``a_ij / max(1, sum_j a_ij)`` (the average over the
    kept teachers). Reward: ``-CE(label_i, student_i)`` (``ce``), minus the kept teachers' mean KL to the
    student (``ce_kl``); advantage against a running-mean baseline (momentum 0.9); policy loss
    ``-mean_i adv_i * sum_j log pi(a_ij | state_i)``.
    """

    kind = "select_teacher"
    HIDDEN = 128
    MOMENTUM = 0.9

    def __init__(self, *, group: str, units: list[tuple[str, str]], terms: dict[str, list[str]], student: str,
                 state_model: str, state_layer: int, width: int, reward: str, lr: float | None, seed: int) -> None:
        """``state_model``'s block ``state_layer`` gives the [CLS] state; ``width``: the agent's input (that
        state and every teacher's soft labels); ``lr``: the agent's learning rate (None: the stage's)."""
        super().__init__(seed=seed)
        self.group, self.units, self.terms, self.student = group, list(units), dict(terms), student
        self.state_model, self.state_layer, self.reward, self.lr = state_model, state_layer, reward, lr
        with torch.random.fork_rng(devices=[]):  # its init depends on the stage seed only, not on what ran before
            torch.manual_seed(_generator(self.seed, self.group, "init").initial_seed())
            self.agent = nn.Sequential(nn.Linear(width, self.HIDDEN), nn.Tanh(),
                                       nn.Linear(self.HIDDEN, len(self.units)))
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("seen", torch.zeros(()))
        self._episode: tuple[Tensor, Tensor] | None = None

    def extra_points(self) -> dict[str, list[CapturePoint]]:
        points: dict[str, list[CapturePoint]] = {t: [CapturePoint(kind="task_logits")] for _, t in self.units}
        points.setdefault(self.state_model, []).append(_hidden_point(self.state_layer))
        points.setdefault(self.student, []).append(CapturePoint(kind="task_logits"))
        return points

    def state(self, signals: Signals) -> Tensor:
        cls = signals[self.state_model][("hidden", self.state_layer)][:, 0]
        soft = [F.softmax(signals[t][("task_logits", None)].float(), dim=-1) for _, t in self.units]
        return torch.cat([cls.float(), *soft], dim=-1).detach()

    def row_weights(self, signals: Signals, batch: Mapping[str, Tensor], info: StepInfo) -> dict[str, Tensor]:
        logits = self.agent(self.state(signals).to(self.agent[0].weight.dtype)).float()
        probs = torch.sigmoid(logits)
        gen = _generator(self.seed, self.group, info.step, info.micro, info.rank)
        actions = (torch.rand(probs.shape, generator=gen).to(probs.device) < probs.detach()).float()
        log_pi = -F.binary_cross_entropy_with_logits(logits, actions, reduction="none")
        self._episode = (actions, log_pi)
        share = actions / actions.sum(-1, keepdim=True).clamp_min(1)
        return {term: share[:, i] for i, (group, _) in enumerate(self.units) for term in self.terms[group]}

    def rewards(self, signals: Signals, batch: Mapping[str, Tensor], actions: Tensor) -> Tensor:
        student = signals[self.student][("task_logits", None)].detach().float()
        if "labels" not in batch:
            raise RunError("select_teacher's reward needs labelled data (the batch has no labels)")
        r = -F.cross_entropy(student, batch["labels"].long(), ignore_index=-100, reduction="none")
        if self.reward == "ce_kl":
            log_q = F.log_softmax(student, dim=-1)
            kls = torch.stack([
                F.kl_div(log_q, F.log_softmax(signals[t][("task_logits", None)].float(), -1), log_target=True,
                         reduction="none").sum(-1)
                for _, t in self.units], dim=-1)
            r = r - (kls * actions).sum(-1) / actions.sum(-1).clamp_min(1)
        return r

    def extra_loss(self, signals: Signals, batch: Mapping[str, Tensor], info: StepInfo) -> dict[str, Tensor]:
        if self._episode is None:
            return {}
        actions, log_pi = self._episode
        self._episode = None
        r = self.rewards(signals, batch, actions)
        mean = _all_ranks_mean(r.mean())
        with torch.no_grad():  # the baseline is the running mean of the reward *before* this batch
            baseline = self.baseline.clone() if self.seen > 0 else mean
            self.baseline.copy_(self.MOMENTUM * baseline + (1 - self.MOMENTUM) * mean if self.seen > 0 else mean)
            self.seen.add_(1)
        advantage = (r - baseline).detach()
        return {f"{self.group}/policy": -(advantage[:, None] * log_pi).sum(-1).mean()}

    def lr_groups(self, student: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
        return [(f"{self.group}/agent", list(self.agent.parameters()))]


def _all_ranks_mean(x: Tensor) -> Tensor:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x.detach()  # one rank: no collective, and no deepspeed import
    from runtime.engine import all_ranks_mean  # collectives live in the engine

    return all_ranks_mean(x)


# ================================================================ replace_layers (Theseus)


class _Chain(nn.Module):
    """Teacher blocks run in sequence in place of one student block (same call arguments, same output form)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = blocks  # a plain list: the teacher's blocks must not become the student's parameters

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs.pop("hidden_states")
        dtype = h.dtype
        out: Any = h
        for block in self.blocks:
            weight = next(block.parameters())
            out = block(h.to(weight.dtype), *args[1:], **kwargs)
            h = _first(out)
        return _with_first(out, h.to(dtype))


class ReplaceLayers(Base):
    """Theseus: each step, student block j keeps its place with probability p (a schedule); otherwise the
    frozen teacher blocks ``groups[j]`` run in its place. The teacher never runs a forward of its own."""

    kind = "replace_layers"

    def __init__(self, *, teacher: str, groups: list[list[int]], p: Schedule, seed: int) -> None:
        """``groups[j]``: the teacher blocks student block j stands for; ``p``: the keep probability (a value
        schedule over the stage's progress)."""
        super().__init__(seed=seed)
        self.teacher, self.groups, self.p = teacher, [list(g) for g in groups], p
        self._teacher_blocks: list[nn.Module] | None = None

    def built_models(self) -> set[str]:
        return {self.teacher}

    def attach(self, teacher: nn.Module) -> None:
        """Give the built, frozen teacher (a plain module: its blocks run inside the student's forward)."""
        hf = _unwrap(teacher)
        if hf is not teacher:
            raise RunError(f"replace_layers: teacher '{self.teacher}' is sharded by the plan, but its blocks run "
                           "inside the student's forward; plan it replicated (more GPU memory per rank)")
        self._teacher_blocks = list(adapter_for(hf).layers(hf))

    def replaced(self, step: int, progress: float) -> list[int]:
        """Student blocks replaced by their teacher group at ``step`` (one draw per block)."""
        p = float(self.p.at(progress))
        rng = random.Random(f"{self.seed}:replace_layers:{step}")
        return [j for j in range(len(self.groups)) if not rng.random() < p]

    @contextmanager
    def student_context(self, student: nn.Module, info: StepInfo) -> Iterator[None]:
        if self._teacher_blocks is None:
            raise RunError(f"replace_layers: teacher '{self.teacher}' was not attached")
        hf = _unwrap(student)
        blocks = adapter_for(hf).layers(hf)
        saved = {}
        try:
            for j in self.replaced(info.step, info.progress):
                saved[j] = blocks[j]
                blocks[j] = _Chain([self._teacher_blocks[i] for i in self.groups[j]])
            yield
        finally:
            for j, block in saved.items():
                blocks[j] = block


# ================================================================ interchange (DIITO)


# ================================================================ perturb (LRC-BERT)


@contextmanager
def _input_edit(block: nn.Module, edit: Callable[[Tensor], Tensor]) -> Iterator[None]:
    def hook(module, args, kwargs):
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs, hidden_states=edit(kwargs["hidden_states"]))
        return args, kwargs

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class Perturb(Base):
    """LRC-BERT: pass 1 computes the stage loss and its gradient g w.r.t. the student's embedding output e
    (only w.r.t. e: no weight gradient is kept); pass 2 recomputes every term with ``e + eps * g / ||g||``
    and its loss is the one trained."""

    kind = "perturb"

    def __init__(self, *, eps: float, norm: str, seed: int) -> None:
        super().__init__(seed=seed)
        self.eps, self.norm = eps, norm

    def two_passes(self, student: nn.Module, run: Callable[[], tuple[Tensor, dict[str, float]]]):
        hf = _unwrap(student)
        block0 = adapter_for(hf).layers(hf)[0]
        seen: list[Tensor] = []

        def record(e: Tensor) -> Tensor:
            seen.append(e)
            return e

        with _input_edit(block0, record):
            loss, _ = run()
        e = seen[0]
        grad = None
        if loss.requires_grad and e.requires_grad:
            (grad,) = torch.autograd.grad(loss, e, allow_unused=True)
        delta = perturbation(grad, e, self.eps, self.norm)
        with _input_edit(block0, lambda x: x + delta):
            return run()


# ================================================================ progressive_lr (MobileBERT)


class ProgressiveLR(Base):
    """While block ``layer`` of a window is transferred, the blocks below it (and the embeddings) train at
    ``below_lr`` times the learning rate; the block itself, the blocks above and everything else at 1."""

    kind = "progressive_lr"

    def __init__(self, *, below: float, windows: list[tuple[float, float, int]], seed: int) -> None:
        """``windows``: (start, until, layer) in stage progress; ``below``: the factor of the blocks below."""
        super().__init__(seed=seed)
        self.below, self.windows = below, list(windows)

    def current_layer(self, progress: float) -> int | None:
        for start, until, layer in self.windows:
            if start <= progress < until or (until >= 1.0 and progress >= start):
                return layer
        return None

    def lr_groups(self, student: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
        hf = _unwrap(student)
        adapter = adapter_for(hf)
        groups = [("embeddings", [p for p in adapter.embeddings_module(hf).parameters() if p.requires_grad])]
        for i, block in enumerate(adapter.layers(hf)):
            groups.append((f"block{i}", [p for p in block.parameters() if p.requires_grad]))
        return groups

    def lr_scale(self, group: str, progress: float) -> float:
        layer = self.current_layer(progress)
        if layer is None:
            return 1.0
        index = -1 if group == "embeddings" else int(group.removeprefix("block"))
        return self.below if index < layer else 1.0


# ================================================================ plateau (SID)


class Plateau(Base):
    """progressive(x, until: plateau(patience, min_delta, window, on)): layer group i+1 unlocks when group i's
    running loss stops improving.

    Every ``window`` optimizer steps the mean of the window's observations is compared with the best window
    so far; an observation is the sum of the current group's watched terms (``on``, else all of them), each
    unweighted (the logged value divided by the term's weight), averaged over data-parallel ranks so every
    rank decides the same. A mean below ``best - min_delta`` becomes the new best and resets the count of bad
    windows; otherwise the count grows, and at ``patience`` the next group unlocks (best and count start over).
    ``deadlines[i]`` (from ``over``) forces unlock i+1 at that progress at the latest. Once the last group
    has plateaued (``current == n``) the progressive terms stop and the ``then`` terms run.

    The state is an int64 buffer (floats stored as their float64 bits, so no precision cast touches them) of
    this module, which sits in the student engine: DeepSpeed checkpoints it with the student, and a resumed
    run continues from the same window, best value and count.
    """

    kind = "plateau"
    CURRENT, BAD, COUNT, BEST, SUM = range(5)

    def __init__(self, *, ident: str, groups: list[set[str]], then: set[str], watch: list[list[str]],
                 weights: Mapping[str, Schedule], patience: int, window: int, min_delta: float, exclusive: bool,
                 deadlines: list[float] | None, seed: int) -> None:
        """``groups``: the term ids of each layer group in unlock order; ``watch[i]``: those of group i whose
        running loss is watched; ``weights``: term id -> weight schedule (observations are unweighted)."""
        super().__init__(seed=seed)
        self.ident, self.groups, self.then, self.watch = ident, list(groups), set(then), list(watch)
        self.weights, self.patience, self.window, self.min_delta = dict(weights), patience, window, min_delta
        self.exclusive, self.deadlines = exclusive, deadlines
        if not self.groups or any(not w for w in self.watch):
            raise RunError(f"plateau '{self.ident}': a layer group has no watched term")
        state = torch.zeros(5, dtype=torch.int64)
        state[self.BEST] = f64_bits(math.inf)
        state[self.SUM] = f64_bits(0.0)
        self.register_buffer("state", state)

    # ------------------------------------------------------------ state

    def current(self, progress: float | None = None) -> int:
        """The unlocked group (``len(groups)``: all done), taking the deadlines into account."""
        k = int(self.state[self.CURRENT])
        if self.deadlines is not None and progress is not None:
            k = max(k, sum(1 for d in self.deadlines if progress >= d))
        return min(k, len(self.groups))

    def _start_group(self, k: int) -> None:
        self.state[self.CURRENT] = k
        self.state[self.BAD] = 0
        self.state[self.COUNT] = 0
        self.state[self.BEST] = f64_bits(math.inf)
        self.state[self.SUM] = f64_bits(0.0)

    def describe(self) -> dict[str, float]:
        return {"current": int(self.state[self.CURRENT]), "bad": int(self.state[self.BAD]),
                "count": int(self.state[self.COUNT]), "best": bits_f64(self.state[self.BEST]),
                "sum": bits_f64(self.state[self.SUM])}

    # ------------------------------------------------------------ call points

    def gate(self, active: set[str], info: StepInfo) -> set[str]:
        k = self.current(info.progress)
        n = len(self.groups)
        off = set() if k == n else set(self.then)
        for i, terms in enumerate(self.groups):
            if k == n or i > k or (self.exclusive and i < k):
                off |= terms
        return active - off

    def observe(self, values: Mapping[str, float], info: StepInfo) -> None:
        k = self.current(info.progress)
        if k > int(self.state[self.CURRENT]):  # a deadline passed: that group starts now
            self._start_group(k)
        if k >= len(self.groups):
            return
        seen = []
        for term in self.watch[k]:
            weight = float(self.weights[term].at(info.progress, step=info.step, epoch=info.epoch))
            if term in values and weight != 0.0:
                seen.append(values[term] / weight)
        if not seen:  # the group's terms did not run this step (nothing to learn from)
            return
        x = float(_all_ranks_mean(torch.tensor([sum(seen)], dtype=torch.float64, device=self.state.device)))
        count = int(self.state[self.COUNT]) + 1
        total = bits_f64(self.state[self.SUM]) + x
        if count < self.window:
            self.state[self.COUNT], self.state[self.SUM] = count, f64_bits(total)
            return
        mean, best = total / count, bits_f64(self.state[self.BEST])
        self.state[self.COUNT], self.state[self.SUM] = 0, f64_bits(0.0)
        if mean < best - self.min_delta:
            self.state[self.BEST], self.state[self.BAD] = f64_bits(mean), 0
            return
        bad = int(self.state[self.BAD]) + 1
        if bad >= self.patience:
            self._start_group(k + 1)
        else:
            self.state[self.BAD] = bad


# ================================================================ builders: Spec intervention -> component


def _units(iv: S.Weigh | S.SelectTeacher, setup: Setup) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    units = [(u.group, u.teacher) for u in iv.units]
    return units, {g: _terms_of(setup.stage, g) for g, _ in units}


def _build_drop(iv: S.Drop, setup: Setup) -> Drop:
    drops = [i for i in setup.stage.interventions if isinstance(i, S.Drop)]
    # one joint draw decides every drop group of the stage, so they must agree on the rescue: the largest
    return Drop(group=iv.group, terms=set(_terms_of(setup.stage, iv.group)),
                stage_groups=[(i.group, i.p) for i in drops], min_kept=max(i.min_kept for i in drops), seed=setup.seed)


def _build_weigh(iv: S.Weigh, setup: Setup) -> Weigh:
    units, terms = _units(iv, setup)
    student = iv.student or setup.stage.students[0]
    head = "task_logits" if iv.by == "teacher_ce" or (iv.entropy_of or "task_logits") == "task_logits" else "logits"
    return Weigh(by=iv.by, hard=iv.hard, units=units, terms=terms, student=student, head=head,
                 classes=_classes(setup, student, head), seed=setup.seed)


def _build_select_teacher(iv: S.SelectTeacher, setup: Setup) -> SelectTeacher | GlmkdSelectTeacher:
    units, terms = _units(iv, setup)
    student = setup.stage.students[0]
    state_model = iv.state_model or student
    arch = setup.models[state_model].arch
    built = {"reinforce": ("running mean of the reward", "two-layer MLP owned by the student wrapper"),
             "glmkd": ("none", "sigmoid of two summed linear maps owned by the student wrapper")}[iv.policy]
    if (iv.baseline, iv.agent) != built:
        raise RunError(f"stage '{setup.stage.name}': select_teacher(policy: {iv.policy}) builds an agent '{built[1]}' "
                       f"with baseline '{built[0]}', not the plan's '{iv.agent}' with '{iv.baseline}'")
    if iv.policy == "glmkd":
        return GlmkdSelectTeacher(group=iv.group, units=units, terms=terms, student=student, state_model=state_model,
                                  state_layer=int(arch.num_layers) - 1, width=int(arch.hidden_size),
                                  classes=_classes(setup, student, "task_logits"), weight=_group_weight(iv, setup),
                                  lr=iv.lr, seed=setup.seed)
    width = int(arch.hidden_size) + sum(_classes(setup, t, "task_logits") for _, t in units)
    return SelectTeacher(group=iv.group, units=units, terms=terms, student=student, state_model=state_model,
                         state_layer=int(arch.num_layers) - 1, width=width, reward=iv.reward, lr=iv.lr,
                         seed=setup.seed)


def _group_weight(iv: S.SelectTeacher, setup: Setup) -> float:
    """The one constant weight of the selected terms (GKD scales its policy loss with them by rl_kd_alpha)."""
    groups = {u.group for u in iv.units}
    weights = {t.weight for t in setup.stage.loss if t.gate.group in groups}
    if len(weights) != 1 or next(iter(weights)).kind != "constant":
        raise RunError(f"stage '{setup.stage.name}': select_teacher(policy: glmkd) scales its policy loss by the "
                       f"weight of the selected terms, which must be one constant (got {len(weights)} weights)")
    return next(iter(weights)).value


def _build_replace_layers(iv: S.ReplaceLayers, setup: Setup) -> ReplaceLayers:
    return ReplaceLayers(teacher=iv.teacher, groups=iv.groups, p=iv.p, seed=setup.seed)


def _trained(iv: S.Perturb | S.ProgressiveLR, setup: Setup) -> None:
    """The component acts on the student the stage trains; the Spec names it, so check they agree."""
    if iv.model not in setup.stage.students:
        raise RunError(f"stage '{setup.stage.name}': {iv.kind} acts on '{iv.model}', which the stage does not train "
                       f"(it trains {', '.join(setup.stage.students)})")


def _build_perturb(iv: S.Perturb, setup: Setup) -> Perturb:
    _trained(iv, setup)
    return Perturb(eps=iv.eps, norm=iv.norm, seed=setup.seed)


def _build_progressive_lr(iv: S.ProgressiveLR, setup: Setup) -> ProgressiveLR:
    _trained(iv, setup)
    return ProgressiveLR(below=iv.below_lr, windows=[(w.start, w.until, w.layer) for w in iv.windows], seed=setup.seed)


def _build_plateau(iv: S.Plateau, setup: Setup) -> Plateau:
    groups = [set(_terms_of(setup.stage, g)) for g in iv.groups]
    terms = {t.id: t for t in setup.stage.loss}
    watch = [[i for i in sorted(g) if iv.on is None or terms[i].fn == iv.on] for g in groups]
    return Plateau(ident=iv.id, groups=groups, then=set(_terms_of(setup.stage, iv.then)) if iv.then else set(),
                   watch=watch, weights={i: terms[i].weight for i in terms}, patience=iv.patience, window=iv.window,
                   min_delta=iv.min_delta, exclusive=iv.exclusive, deadlines=iv.deadlines, seed=setup.seed)


BUILDERS: dict[type[S.Intervention], Callable[[Any, Setup], Base]] = {
    S.Drop: _build_drop, S.Weigh: _build_weigh, S.SelectTeacher: _build_select_teacher,
    S.ReplaceLayers: _build_replace_layers, S.Interchange: build_interchange, S.Perturb: _build_perturb,
    S.ProgressiveLR: _build_progressive_lr, S.Plateau: _build_plateau,
}
"""Spec intervention class -> the builder of its runtime component."""

INTERVENTIONS: dict[str, type[Base]] = {
    cls.kind: cls for cls in (Drop, Weigh, SelectTeacher, ReplaceLayers, Interchange, Perturb, ProgressiveLR,
                               Plateau)
}
"""``Intervention.kind`` -> its runtime class."""


def build(stage: StageSpec, models: Mapping[str, ModelSpec], seed: int, lr: float) -> list[Base]:
    """The runtime objects of a stage's interventions, in Spec order; RunError for a kind with no builder."""
    setup = Setup(stage=stage, models=models, seed=seed, lr=lr)
    out = []
    for iv in stage.interventions:
        builder = BUILDERS.get(type(iv))
        if builder is None:
            raise RunError(f"stage '{stage.name}': intervention '{iv.kind}' has no runtime implementation "
                           f"(known: {', '.join(sorted(INTERVENTIONS))})")
        out.append(builder(iv, setup))
    return out


def with_points(wanted: ModelCapture, extra: list[CapturePoint]) -> ModelCapture:
    """``wanted`` also capturing ``extra``: the head when a head signal is added, deep enough for every block."""
    have = {(p.kind, p.layer) for p in wanted.points}
    added = [p for p in dict.fromkeys(extra) if (p.kind, p.layer) not in have]
    if not added:
        return wanted
    points = [*wanted.points, *added]
    needs_head = wanted.needs_head or any(p.kind in ("logits", "task_logits") for p in added)
    stop = wanted.stop_after_layer
    if stop is not None:
        stop = None if needs_head else max([stop, *(p.layer for p in added if p.layer is not None)])
    if not wanted.points and not needs_head:  # a model the plan runs whole (no points): stop after the deepest
        stop = max((p.layer for p in added if p.layer is not None), default=None)
    eager = sorted({*wanted.eager_attention_layers, *(p.layer for p in added if p.kind in ("attn_scores", "attn_probs"))})
    return wanted.model_copy(update={"points": points, "needs_head": needs_head, "stop_after_layer": stop,
                                     "eager_attention_layers": eager})
