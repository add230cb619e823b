"""DIITO's interchange intervention (``interchange``): a second forward of teacher and student in which some
positions' states at aligned blocks are the next example's. Split out of ``runtime/interventions.py``.

Two readings, chosen by the Spec (``positions``, ``blocks``):

- gkdc's earlier one (``positions: same, blocks: aligned``): one set of ``round(fraction x n)`` real positions per
  example, each taking the source example's state at the same position, at the one aligned teacher block;
- the DIITO authors' code as GKD runs it (``positions: independent, blocks: group``; GitHub aitsc/GLMKD 8d6cf11,
  ``distill_model.py`` ``DIITO.prepare_interchange_mask``, taken by GKD from frankaging/Causal-Distill): per
  example ``int(fraction x min(n_i, n_src))`` consecutive positions from a start drawn in ``[0, n_i - count]`` take
  the source's states from its own span, whose start is drawn independently in ``[0, n_src - count]``, at every
  teacher block of the group mapped to the student block.
"""

from __future__ import annotations

import random
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from gkdlang import spec as S
from gkdlang.spec import Interchanged, Node, SignalNode
from planner.plan import CapturePoint, ModelCapture
from runtime.adapters import adapter_for, capture
from runtime.errors import RunError
from runtime.intervention_base import Base, Setup, Signals, StepInfo, _first, _generator, _hidden_point, _unwrap, \
    _with_first
from runtime.intervention_kernels import interchange_positions


def independent_spans(attention: Tensor, fraction: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(target, source)`` ``[b, s]`` bool masks, the DIITO authors' consecutive interchange (GKD's): example i's
    span and its source's (example i + 1, the batch rolled by one) have ``int(fraction x min(n_i, n_{i+1}))``
    positions each (n: the real lengths), their starts drawn independently; a span may be empty. Row-major order
    pairs them: the k-th target position of a row takes the k-th source position's state."""
    lengths = attention.bool().sum(-1).cpu()
    src_lengths = torch.roll(lengths, shifts=-1, dims=0)
    b, s = attention.shape
    target = torch.zeros(b, s, dtype=torch.bool)
    source = torch.zeros(b, s, dtype=torch.bool)
    for i in range(b):
        n, n_src = int(lengths[i]), int(src_lengths[i])
        count = int(min(n, n_src) * fraction)
        start = int(torch.randint(0, n - count + 1, (1,), generator=gen))
        src_start = int(torch.randint(0, n_src - count + 1, (1,), generator=gen))
        target[i, start:start + count] = True
        source[i, src_start:src_start + count] = True
    return target.to(attention.device), source.to(attention.device)


def interchanged_states(h: Tensor, source_states: Tensor, target: Tensor, source: Tensor) -> Tensor:
    """``h`` with its ``target`` positions replaced by the next example's states at its ``source`` positions
    (the k-th of a row's target positions takes the k-th of its source positions); ``source_states`` keep
    their graph."""
    rolled = torch.roll(source_states, shifts=-1, dims=0).to(h.dtype)
    if target is source:
        return torch.where(target[..., None], rolled, h)
    out = h.clone()
    out[target] = rolled[source]
    return out


@contextmanager
def _output_edit(block: nn.Module, edit: Callable[[Tensor], Tensor]) -> Iterator[None]:
    handle = block.register_forward_hook(lambda m, args, out: _with_first(out, edit(_first(out))))
    try:
        yield
    finally:
        handle.remove()


class Interchange(Base):
    """DIITO: a second forward of teacher and student in which, at one aligned block pair (drawn per step),
    some positions' states are the next example's (batch rolled by one): see the module docstring.

    The source states come from the first pass (the student's keep their graph, so the counterfactual loss
    trains the source pass too). The counterfactual signals are stored under ``model@id``.
    """

    kind = "interchange"

    def __init__(self, *, ident: str, teacher: str, student: str, pairs: list[tuple[int, int]], fraction: float,
                 way: str, pass_points: dict[str, list[CapturePoint]], seed: int, positions: str = "same",
                 blocks: str = "aligned") -> None:
        """``pairs``: aligned (student block, teacher block); ``pass_points``: per model, the signals the loss
        reads from the counterfactual pass; ``positions`` / ``blocks``: the reading (module docstring)."""
        super().__init__(seed=seed)
        self.ident, self.teacher, self.student, self.pairs = ident, teacher, student, list(pairs)
        self.fraction, self.way, self.pass_points = fraction, way, dict(pass_points)
        self.independent, self.group = positions == "independent", blocks == "group"
        if not self.pairs:
            raise RunError(f"interchange '{self.ident}': no aligned layer pair")
        if self.independent and way != "consecutive":
            raise RunError(f"interchange '{self.ident}': positions: independent needs way: consecutive")

    def teacher_blocks(self, pair: tuple[int, int]) -> list[int]:
        """The teacher blocks replaced for ``pair``: its own, or (``blocks: group``) every block after the previous
        pair's teacher block up to it."""
        if not self.group:
            return [pair[1]]
        below = [t for _, t in self.pairs if t < pair[1]]
        return list(range(max(below) + 1 if below else 0, pair[1] + 1))

    def extra_points(self) -> dict[str, list[CapturePoint]]:
        teacher = sorted({t for pair in self.pairs for t in self.teacher_blocks(pair)})
        points = {self.teacher: [_hidden_point(t) for t in teacher],
                  self.student: [_hidden_point(s) for s, _ in self.pairs]}
        for model, extra in self.pass_points.items():
            points.setdefault(model, []).extend(extra)
        return points

    def pair(self, step: int) -> tuple[int, int]:
        return random.Random(f"{self.seed}:{self.ident}:pair:{step}").choice(self.pairs)

    def masks(self, batch: Mapping[str, Tensor], info: StepInfo) -> tuple[Tensor, Tensor]:
        """``(target, source)`` positions of the step (the same tensor twice for ``positions: same``)."""
        gen = _generator(self.seed, self.ident, info.step, info.micro, info.rank)
        if self.independent:
            return independent_spans(batch["attention_mask"], self.fraction, gen)
        where = interchange_positions(batch["attention_mask"], self.fraction, self.way, gen, batch.get("tokens"))
        return where, where

    def positions(self, batch: Mapping[str, Tensor], info: StepInfo) -> Tensor:
        return self.masks(batch, info)[0]

    def _pass(self, model_name: str, model: nn.Module, layers: list[int], batch: dict[str, Tensor],
              signals: Signals, info: StepInfo, grad: bool) -> Any:
        target, source = self.masks(batch, info)
        hf = _unwrap(model)
        blocks = adapter_for(hf).layers(hf)
        points = self.pass_points.get(model_name, [])
        kinds = {p.kind for p in points}
        wanted = ModelCapture(model=model_name, points=points, stop_after_layer=None,
                              needs_head=bool(kinds & {"logits", "task_logits"}),
                              eager_attention_layers=sorted({p.layer for p in points
                                                             if p.kind in ("attn_scores", "attn_probs")}))
        with ExitStack() as stack:
            for layer in layers:
                states = signals[model_name][("hidden", layer)]
                stack.enter_context(_output_edit(blocks[layer], lambda h, states=states:
                                                 interchanged_states(h, states, target, source)))
            return capture(model, batch, wanted, grad=grad)

    def teacher_passes(self, teachers: Mapping[str, nn.Module], batch: dict[str, Tensor], signals: Signals,
                       info: StepInfo) -> dict[str, Any]:
        if self.teacher not in self.pass_points:
            return {}
        layers = self.teacher_blocks(self.pair(info.step))
        return {f"{self.teacher}@{self.ident}": self._pass(self.teacher, teachers[self.teacher], layers, batch,
                                                           signals, info, grad=False)}

    def student_passes(self, name: str, student: nn.Module, batch: dict[str, Tensor], signals: Signals,
                       info: StepInfo) -> dict[str, Any]:
        if name != self.student or name not in self.pass_points:
            return {}
        s_layer, _ = self.pair(info.step)
        return {f"{name}@{self.ident}": self._pass(name, student, [s_layer], batch, signals, info, grad=True)}


def _interchanged_leaves(node: Node, ident: str, inside: bool = False) -> list[SignalNode]:
    if isinstance(node, SignalNode):
        return [node] if inside else []
    inside = inside or (isinstance(node, Interchanged) and node.intervention == ident)
    return [leaf for child in node.inputs for leaf in _interchanged_leaves(child, ident, inside)]


def build_interchange(iv: S.Interchange, setup: Setup) -> Interchange:
    leaves: dict[str, dict[tuple[str, int | None], CapturePoint]] = {}
    for term in setup.stage.loss:
        for side in (term.target, term.pred):
            for node in _interchanged_leaves(side, iv.id):
                if node.model is not None:
                    leaves.setdefault(node.model, {})[(node.kind, node.layer)] = CapturePoint(kind=node.kind,
                                                                                             layer=node.layer)
    return Interchange(ident=iv.id, teacher=iv.teacher, student=iv.student, pairs=[(s, t) for s, t in iv.layers],
                       fraction=iv.fraction, way=iv.way, positions=iv.positions, blocks=iv.blocks,
                       pass_points={m: list(points.values()) for m, points in leaves.items()}, seed=setup.seed)
