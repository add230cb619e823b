"""A stage's LossTerms + model architectures -> an nn.Module computing the weighted total loss from captured signals.

Each term compares a target node tree with a prediction node tree. Leaves are ``SignalNode``s (a captured
tensor of a model, or the batch's ``labels``/``tokens``); inner ``OpNode``s are transforms. Learned
transforms (projections) are submodules keyed by ``OpNode.module``, so terms that share a key share
weights, and the student engine trains and checkpoints them with the student. Weights and kernel options
may be schedules, evaluated at the stage's progress; gates switch terms on and off (progressive unlocking,
random groups re-drawn each step or epoch from a seed, so a resumed run draws the same groups).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from gkdlang.arch import ArchInfo
from gkdlang.spec import LossTerm, Node, OpNode, Schedule, SignalNode
from runtime.errors import RunError
from runtime import transforms as T
from runtime.losses import LOSSES, check_options, get_loss, loss_options

Signals = Mapping[str, Mapping[tuple[str, int | None], torch.Tensor]]
"""Model name -> {(kind, layer): tensor} as captured by the adapters."""

DATA_KINDS = frozenset({"labels", "tokens"})


# ---------------------------------------------------------------- masks


def _mask_not_pad(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return batch["attention_mask"].bool()


def _mask_masked(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    # positions with a token target: MLM-masked positions (or, for causal data, every predicted position)
    return batch["tokens"] != -100


def _mask_cls(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    mask[:, 0] = True
    return mask


def _mask_not_special(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return batch["attention_mask"].bool() & ~batch["special_mask"].bool()


MASKS: dict[str, Callable[[Mapping[str, torch.Tensor]], torch.Tensor]] = {
    "not pad": _mask_not_pad,
    "masked": _mask_masked,
    "cls": _mask_cls,
    "not special": _mask_not_special,
}
"""``LossTerm.mask`` name -> [batch, seq] bool tensor of the query positions that count."""


# ---------------------------------------------------------------- shapes (for projection sizes)


def _value(v: Any, progress: float) -> Any:
    """A plain option value at ``progress``: schedules (objects or their JSON dicts) are evaluated."""
    if isinstance(v, Schedule):
        return v.at(progress)
    if isinstance(v, dict) and "value" in v and set(v) <= set(Schedule.model_fields):
        return Schedule(**v).at(progress)
    return v


_WIDTH_OF_KIND: dict[str, Callable[[ArchInfo], int]] = {
    "embeddings": lambda a: a.hidden_size,
    "hidden": lambda a: a.hidden_size,
    "query": lambda a: a.num_heads * a.head_dim,
    "key": lambda a: a.kv_dim,
    "value": lambda a: a.kv_dim,
    "ffn": lambda a: a.intermediate_size,
    "logits": lambda a: a.vocab_size,
    "task_logits": lambda a: int(a.config.get("num_labels") or len(a.config.get("id2label") or {}) or 2),
}

_PROJECT_DIM_KEYS = ("dim", "out", "out_dim", "to")


def node_width(node: Node, dims: Mapping[str, ArchInfo]) -> int | None:
    """Last-axis width of a node's value, or None when it is not a feature vector (attention maps, ...)."""
    if isinstance(node, SignalNode):
        if node.model is None or node.kind not in _WIDTH_OF_KIND:
            return None
        return _WIDTH_OF_KIND[node.kind](dims[node.model])
    if node.op == "project":
        return next((int(node.params[k]) for k in _PROJECT_DIM_KEYS if k in node.params), None)
    widths = [node_width(x, dims) for x in node.inputs]
    if node.op == "concat":
        return sum(widths) if all(w is not None for w in widths) else None
    if node.op in ("relation", "attend_scores"):
        return None
    return widths[0] if widths else None


def _first_model(node: Node) -> str | None:
    if isinstance(node, SignalNode):
        return node.model
    return next((m for m in map(_first_model, node.inputs) if m is not None), None)


# ---------------------------------------------------------------- the graph


@dataclass(frozen=True)
class _Ctx:
    """What op kernels may read besides their inputs."""

    batch: Mapping[str, torch.Tensor]
    progress: float
    term: LossTerm


class LossGraph(nn.Module):
    """The loss of one stage; owns the learned projections of its terms."""

    def __init__(
        self,
        terms: list[LossTerm],
        dims: dict[str, ArchInfo],
        *,
        keep_ids: Mapping[str, torch.Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        """``dims``: architecture per model name; ``keep_ids``: kept vocabulary rows per vocab name (select_vocab)."""
        super().__init__()
        self.terms = list(terms)
        self.dims = dict(dims)
        self.keep_ids = dict(keep_ids or {})
        self.seed = seed
        self.projections = nn.ModuleDict()
        self._key_masked = {t.id for t in self.terms if t.fn in LOSSES and "key_mask" in loss_options(t.fn)}
        for term in self.terms:
            self._check_term(term)
            self._add_projections(term, term.pred, term.target)
            self._add_projections(term, term.target, term.pred)

    # ------------------------------------------------------------ construction

    def _check_term(self, term: LossTerm) -> None:
        try:
            get_loss(term.fn)
            check_options(term.fn, term.options)
        except RunError as err:
            raise RunError(f"loss term '{term.id}': {err}") from None
        if term.mask is not None and term.mask not in MASKS:
            raise RunError(f"loss term '{term.id}': unknown mask '{term.mask}' (known: {', '.join(MASKS)})")

    def _add_projections(self, term: LossTerm, node: Node, other: Node) -> None:
        if isinstance(node, SignalNode):
            return
        if node.op not in OPS:
            known = ", ".join(sorted(OPS))
            raise RunError(f"loss term '{term.id}': unknown transform '{node.op}' (known: {known})")
        for child in node.inputs:
            self._add_projections(term, child, other)
        if node.op not in ("project", "linear"):
            return
        key = node.module or f"{term.id}/{node.op}"
        d_in = int(node.params["in"]) if node.params.get("in") else node_width(node.inputs[0], self.dims)
        d_out = node_width(node, self.dims) or node_width(other, self.dims)
        if d_in is None or d_out is None:
            raise RunError(f"loss term '{term.id}': cannot infer the size of projection '{key}'")
        if _module_key(key) in self.projections:
            return  # shared key: one module, several uses
        self.projections[_module_key(key)] = T.Projection(d_in, d_out)

    # ------------------------------------------------------------ gates

    def active_terms(self, progress: float, *, step: int = 0, epoch: int = 0) -> set[str]:
        """Ids of the terms that count at ``progress``; random groups are drawn per ``step`` or ``epoch``."""
        live = {t.id for t in self.terms if _in_window(t, progress)}
        groups: dict[str, list[LossTerm]] = {}
        for term in self.terms:
            if term.gate.group is not None:
                groups.setdefault(term.gate.group, []).append(term)
        for name, members in groups.items():
            gate = members[0].gate
            choose = gate.choose if gate.choose is not None else len(members)
            period = epoch if gate.every == "epoch" else step
            # a str seed hashes deterministically (sha512), unlike hash() which is salted per process
            rng = random.Random(f"{self.seed}:{name}:{period}")
            chosen = {m.id for m in rng.sample(members, min(choose, len(members)))}
            live -= {m.id for m in members} - chosen
        return live

    # ------------------------------------------------------------ forward

    def forward(
        self,
        signals: Signals,
        batch: Mapping[str, torch.Tensor],
        progress: float,
        active: set[str] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted total of the active terms, and each term's weighted value (one host sync for all)."""
        if active is None:
            active = self.active_terms(progress)
        parts: dict[str, torch.Tensor] = {}
        for term in self.terms:
            weight = float(term.weight.at(progress))
            if term.id not in active or weight == 0.0:
                continue
            parts[term.id] = weight * self.term_value(term, signals, batch, progress)
        if not parts:
            zero = next(self.parameters(), None)
            device = zero.device if zero is not None else batch["input_ids"].device
            return torch.zeros((), device=device, requires_grad=True), {}
        values = torch.stack(list(parts.values()))
        total = values.sum()
        return total, dict(zip(parts, values.detach().float().cpu().tolist()))

    def term_value(
        self, term: LossTerm, signals: Signals, batch: Mapping[str, torch.Tensor], progress: float
    ) -> torch.Tensor:
        """One term's unweighted kernel value; any kernel or transform error is re-raised naming the term."""
        try:
            return self._term_value(term, signals, batch, progress)
        except RunError as err:
            if str(err).startswith("loss term"):
                raise
            raise RunError(f"loss term '{term.id}' ({term.fn}): {err}") from None
        except (RuntimeError, ValueError, TypeError) as err:
            raise RunError(f"loss term '{term.id}' ({term.fn}): {err}") from err

    def _term_value(
        self, term: LossTerm, signals: Signals, batch: Mapping[str, torch.Tensor], progress: float
    ) -> torch.Tensor:
        ctx = _Ctx(batch=batch, progress=progress, term=term)
        target = self._eval(term.target, signals, ctx)
        pred = self._eval(term.pred, signals, ctx)
        mask = MASKS[term.mask](batch) if term.mask is not None else None
        options = {k: _value(v, progress) for k, v in term.options.items()}
        if pred.dim() == 4 and "key_mask" not in options and term.id in self._key_masked:
            # attention-shaped signals: padded keys never count, whatever the query mask
            options["key_mask"] = batch["attention_mask"].bool()
        return LOSSES[term.fn](target, pred, mask=mask, **options)

    def _eval(self, node: Node, signals: Signals, ctx: _Ctx) -> torch.Tensor:
        if isinstance(node, SignalNode):
            return self._signal(node, signals, ctx)
        inputs = [self._eval(x, signals, ctx) for x in node.inputs]
        params = {k: _value(v, ctx.progress) for k, v in node.params.items()}
        return OPS[node.op](self, node, inputs, params, ctx)

    def _signal(self, node: SignalNode, signals: Signals, ctx: _Ctx) -> torch.Tensor:
        if node.model is None:
            return ctx.batch[node.kind]
        try:
            value = signals[node.model][(node.kind, node.layer)]
        except KeyError:
            where = f"{node.kind}[{node.layer}]" if node.layer is not None else node.kind
            raise RunError(
                f"loss term '{ctx.term.id}': signal {node.model}.{where} was not captured (plan and loss disagree)"
            ) from None
        # kernels compute in fp32 whatever precision the model ran in
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value


def _in_window(term: LossTerm, progress: float) -> bool:
    gate = term.gate
    return gate.active_from <= progress and (progress < gate.active_until or gate.active_until >= 1.0)


def _module_key(key: str) -> str:
    # ModuleDict keys cannot contain "."
    return key.replace(".", "_")


# ---------------------------------------------------------------- op kernels

OpFn = Callable[[LossGraph, OpNode, list[torch.Tensor], dict[str, Any], _Ctx], torch.Tensor]


def _op_project(graph: LossGraph, node: OpNode, xs: list[torch.Tensor], params: dict[str, Any], ctx: _Ctx) -> torch.Tensor:
    module = graph.projections[_module_key(node.module or f"{ctx.term.id}/{node.op}")]
    return module(xs[0]).float()


def _heads(graph: LossGraph, node: OpNode, params: dict[str, Any]) -> int:
    if "heads" in params:
        return int(params["heads"])
    model = _first_model(node)
    return graph.dims[model].num_heads if model is not None else 1


def _op_relation(graph: LossGraph, node: OpNode, xs: list[torch.Tensor], params: dict[str, Any], ctx: _Ctx) -> torch.Tensor:
    mask = ctx.batch["attention_mask"].bool()
    return T.relation(xs[0], _heads(graph, node, params), mask, log=bool(params.get("log", False)))


def _op_pool(graph: LossGraph, node: OpNode, xs: list[torch.Tensor], params: dict[str, Any], ctx: _Ctx) -> torch.Tensor:
    return T.pool(xs[0], params.get("how", "mean"), ctx.batch["attention_mask"].bool())


def _op_normalize(graph: LossGraph, node: OpNode, xs: list[torch.Tensor], params: dict[str, Any], ctx: _Ctx) -> torch.Tensor:
    return T.normalize(xs[0], p=float(params.get("p", 2.0)))


def _op_select_vocab(
    graph: LossGraph, node: OpNode, xs: list[torch.Tensor], params: dict[str, Any], ctx: _Ctx
) -> torch.Tensor:
    if "keep_ids" in params:
        return T.select_vocab(xs[0], params["keep_ids"])
    name = params.get("vocab")
    keep = graph.keep_ids.get(name) if name is not None else next(iter(graph.keep_ids.values()), None)
    if keep is None:
        raise RunError(f"loss term '{ctx.term.id}': select_vocab needs the kept rows of vocab '{name}'")
    return T.select_vocab(xs[0], keep)


def _op_mean(graph: LossGraph, node: OpNode, xs: list[torch.Tensor], params: dict[str, Any], ctx: _Ctx) -> torch.Tensor:
    return T.mean(xs)


def _op_concat(graph: LossGraph, node: OpNode, xs: list[torch.Tensor], params: dict[str, Any], ctx: _Ctx) -> torch.Tensor:
    return T.concat(xs, dim=int(params.get("dim", -1)))


def _op_attend(graph: LossGraph, node: OpNode, xs: list[torch.Tensor], params: dict[str, Any], ctx: _Ctx) -> torch.Tensor:
    return T.attend(xs[0], xs[1:])


def _op_anneal(graph: LossGraph, node: OpNode, xs: list[torch.Tensor], params: dict[str, Any], ctx: _Ctx) -> torch.Tensor:
    return T.anneal(xs[0], float(params.get("phi", 1.0)))


OPS: dict[str, OpFn] = {
    "project": _op_project,
    "linear": _op_project,
    "relation": _op_relation,
    "pool": _op_pool,
    "normalize": _op_normalize,
    "select_vocab": _op_select_vocab,
    "mean": _op_mean,
    "concat": _op_concat,
    "attend": _op_attend,
    "anneal": _op_anneal,
}
"""``OpNode.op`` -> kernel; kernels get the evaluated inputs, the op's params at the current progress and the batch."""
