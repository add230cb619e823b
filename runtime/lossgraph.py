"""A stage's LossTerms + model architectures -> an nn.Module computing the weighted total loss from captured signals.

Each term compares a target node tree with a prediction node tree. Leaves are ``SignalNode``s (a captured
tensor of a model, or the batch's ``labels``/``tokens``); inner ``OpNode``s are transforms. Learned
transforms (projections) are submodules keyed by ``OpNode.module``, so terms that share a key share
weights, and the student engine trains and checkpoints them with the student. Weights and kernel options
may be schedules, evaluated at the stage's progress; gates switch terms on and off (progressive unlocking,
random groups re-drawn each step or epoch from a seed, so a resumed run draws the same groups).

Random ops (``choose``: RAIL-KD's layer subset; ``spans``: MGSKD's segmentation) draw from a generator
seeded by (seed, op, step or epoch), so they need no saved state. ``interchanged`` evaluates its subtree on
the counterfactual pass of an ``interchange`` intervention (signals stored under ``model@id``). Terms given
per-example ``row_weights`` (``weigh``, ``select_teacher``) are computed per example and averaged as
``(1/b) sum_i w_i * loss_i``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from gkdlang.arch import ArchInfo
from gkdlang.spec import (
    Anneal,
    Attend,
    Choose,
    Concat,
    Interchanged,
    LossTerm,
    Mean,
    Node,
    Normalize,
    OpNode,
    Pool,
    Project,
    Relation,
    Schedule,
    SelectVocab,
    SignalNode,
    Spans,
    Stack,
    ZeroPad,
)
from runtime.errors import RunError
from runtime import transforms as T
from runtime.chunked import HeadLogits
from runtime.glmkd_losses import step_span_lengths
from runtime.losses import LOSSES, check_options, get_loss, loss_options, target_grad

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


def _chat_restricted(mask: torch.Tensor | None, batch: Mapping[str, torch.Tensor], pred: Any) -> torch.Tensor | None:
    """Chat data (``loss_mask``, runtime/chat.py): a per-token term ([b, s, ...] or attention [b, H, s, s]) reads
    only the positions that predict an assistant token, whatever its own mask; other terms are unchanged."""
    keep = batch.get("loss_mask")
    if keep is None or pred.dim() < 3 or pred.shape[0] != keep.shape[0]:
        return mask
    s = keep.shape[1]
    if not (pred.dim() == 3 and pred.shape[1] == s) and not (pred.dim() == 4 and pred.shape[2] == s):
        return mask
    return keep if mask is None else mask & keep


MASKS: dict[str, Callable[[Mapping[str, torch.Tensor]], torch.Tensor]] = {
    "not pad": _mask_not_pad,
    "masked": _mask_masked,
    "cls": _mask_cls,
    "not special": _mask_not_special,
}
"""``LossTerm.mask`` name -> [batch, seq] bool tensor of the query positions that count."""


# ---------------------------------------------------------------- shapes (for projection sizes)


def _value(v: Any, progress: float, step: int = 0, epoch: int = 0) -> Any:
    """A plain option value at ``progress`` (and ``step`` / ``epoch``, which ``stairs`` schedules count)."""
    return v.at(progress, step=step, epoch=epoch) if isinstance(v, Schedule) else v


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

def node_width(node: Node, dims: Mapping[str, ArchInfo]) -> int | None:
    """Last-axis width of a node's value, or None when it is not a feature vector (attention maps, ...)."""
    if isinstance(node, SignalNode):
        if node.model is None or node.kind not in _WIDTH_OF_KIND:
            return None
        return _WIDTH_OF_KIND[node.kind](dims[node.model])
    if isinstance(node, Project):
        return node.dim_out
    widths = [node_width(x, dims) for x in node.inputs]
    if isinstance(node, Concat):
        return sum(widths) if all(w is not None for w in widths) else None
    if isinstance(node, Relation):
        return None
    return widths[0] if widths else None


# ---------------------------------------------------------------- the graph


@dataclass(frozen=True)
class _Ctx:
    """What op kernels may read besides their inputs."""

    batch: Mapping[str, torch.Tensor]
    progress: float
    term: LossTerm
    step: int = 0
    epoch: int = 0


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
        self._trainable_targets = {t.id for t in self.terms if _trains_target(t.target)}
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
        if node.op not in OPS and node.op not in LAZY_OPS:
            known = ", ".join(sorted([*OPS, *LAZY_OPS]))
            raise RunError(f"loss term '{term.id}': unknown transform '{node.op}' (known: {known})")
        for child in node.inputs:
            self._add_projections(term, child, other)
        if not isinstance(node, Project):
            return
        key = node.module or f"{term.id}/{node.op}"
        d_in = node.dim_in
        d_out = node_width(node, self.dims) or node_width(other, self.dims)
        if d_in is None or d_out is None:
            raise RunError(f"loss term '{term.id}': cannot infer the size of projection '{key}'")
        if _module_key(key) in self.projections:
            return  # shared key: one module, several uses
        self.projections[_module_key(key)] = T.Projection(d_in, d_out, bias=node.bias)

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
        *,
        step: int = 0,
        epoch: int = 0,
        row_weights: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted total of the active terms, and each term's weighted value (one host sync for all).

        ``step``/``epoch`` drive the random ops; ``row_weights`` maps a term id to per-example weights ``[b]``.
        """
        if active is None:
            active = self.active_terms(progress, step=step, epoch=epoch)
        row_weights = row_weights or {}
        parts: dict[str, torch.Tensor] = {}
        for term in self.terms:
            weight = float(term.weight.at(progress, step=step, epoch=epoch))
            if term.id not in active or weight == 0.0:
                continue
            with target_grad(term.id in self._trainable_targets):
                value = self.term_value(term, signals, batch, progress, step=step, epoch=epoch,
                                        rows=row_weights.get(term.id))
            parts[term.id] = weight * value
        if not parts:
            zero = next(self.parameters(), None)
            device = zero.device if zero is not None else batch["input_ids"].device
            return torch.zeros((), device=device, requires_grad=True), {}
        values = torch.stack(list(parts.values()))
        total = values.sum()
        return total, dict(zip(parts, values.detach().float().cpu().tolist()))

    def term_value(
        self,
        term: LossTerm,
        signals: Signals,
        batch: Mapping[str, torch.Tensor],
        progress: float,
        *,
        step: int = 0,
        epoch: int = 0,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One term's unweighted kernel value (``rows``: per-example weights, see the module docstring); any
        kernel or transform error is re-raised naming the term."""
        ctx = _Ctx(batch=batch, progress=progress, term=term, step=step, epoch=epoch)
        try:
            if rows is not None:
                return (rows.to(torch.float32) * self.per_example(term, signals, ctx)).mean()
            return self._term_value(term, signals, ctx)
        except RunError as err:
            if str(err).startswith("loss term"):
                raise
            raise RunError(f"loss term '{term.id}' ({term.fn}): {err}") from None
        except (RuntimeError, ValueError, TypeError) as err:
            raise RunError(f"loss term '{term.id}' ({term.fn}): {err}") from err

    def _operands(self, term: LossTerm, signals: Signals, ctx: _Ctx) -> tuple[Any, torch.Tensor, Any, dict]:
        batch = ctx.batch
        options = {k: _value(v, ctx.progress, ctx.step, ctx.epoch) for k, v in term.options.items()}
        target = self._logit_operand(term, "target", term.target, signals, ctx, options)
        pred = self._logit_operand(term, "pred", term.pred, signals, ctx, options)
        mask = _chat_restricted(MASKS[term.mask](batch) if term.mask is not None else None, batch, pred)
        if (pred.dim() == 4 and "key_mask" not in options and term.id in self._key_masked
                and pred.shape[-1] == batch["attention_mask"].shape[-1]):  # (relations of pooled spans have none)
            # attention-shaped signals: padded keys never count, whatever the query mask
            options["key_mask"] = batch["attention_mask"].bool()
        if term.fn == "mgskd_token" and options.get("spans", 0) > 0:  # GKD's spans: one segmentation per step
            options["span_lengths"] = step_span_lengths(self.seed, ctx.step, pred.shape[1], float(options["spans"]))
        return target, pred, mask, options

    def _logit_operand(self, term: LossTerm, role: str, node: Node, signals: Signals, ctx: _Ctx, options: dict) -> Any:
        """A term's operand; logits read by a chunked kernel (runtime/chunked.py) stay in the model's dtype, or as
        the fused head, and a column selection over them becomes the kernel's ``{role}_cols`` option, so that no
        fp32 or column-selected copy of the logits is made."""
        if term.fn not in _CHUNKED or not _is_logits(node, select=f"{role}_cols" in loss_options(term.fn)):
            return self._eval(node, signals, ctx)
        if isinstance(node, SignalNode):
            return self._signal(node, signals, ctx, raw=True)
        options[f"{role}_cols"] = self._kept_columns(node, ctx)
        return self._signal(node.inputs[0], signals, ctx, raw=True)

    def _kept_columns(self, node: SelectVocab, ctx: _Ctx) -> torch.Tensor:
        keep = self.keep_ids.get(node.vocab)
        if keep is None:
            raise RunError(f"loss term '{ctx.term.id}': select_vocab needs the kept rows of vocab '{node.vocab}'")
        return torch.as_tensor(keep, dtype=torch.long)

    def _term_value(self, term: LossTerm, signals: Signals, ctx: _Ctx) -> torch.Tensor:
        target, pred, mask, options = self._operands(term, signals, ctx)
        return _averaged(term, LOSSES[term.fn](target, pred, mask=mask, **options), mask, options.get("key_mask"), pred)

    def per_example(self, term: LossTerm, signals: Signals, ctx: _Ctx) -> torch.Tensor:
        """``[b]``: the term's kernel on each example alone (every operand sliced on its batch dim)."""
        if term.fn in _BATCH_COUPLED:
            raise RunError(f"loss term '{term.id}': {term.fn} compares examples with each other, so it cannot be "
                           "weighed per example")
        target, pred, mask, options = self._operands(term, signals, ctx)
        b = pred.shape[0]
        def one(x, i):
            if isinstance(x, HeadLogits):
                return x.rows(i)
            return x[i:i + 1] if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == b else x

        values = [
            _averaged(term, LOSSES[term.fn](one(target, i), one(pred, i), mask=one(mask, i),
                                            **{k: one(v, i) for k, v in options.items()}), one(mask, i),
                      one(options.get("key_mask"), i), one(pred, i))
            for i in range(b)
        ]
        return torch.stack(values)

    def _eval(self, node: Node, signals: Signals, ctx: _Ctx) -> torch.Tensor:
        if isinstance(node, SignalNode):
            return self._signal(node, signals, ctx)
        if node.op in LAZY_OPS:  # they decide which inputs to evaluate, and on which signals
            return LAZY_OPS[node.op](self, node, signals, ctx)
        inputs = [self._eval(x, signals, ctx) for x in node.inputs]
        return OPS[node.op](self, node, inputs, ctx)

    def _signal(self, node: SignalNode, signals: Signals, ctx: _Ctx, raw: bool = False) -> torch.Tensor:
        if node.model is None:
            return ctx.batch[node.kind]
        try:
            value = signals[node.model][(node.kind, node.layer)]
        except KeyError:
            where = f"{node.kind}[{node.layer}]" if node.layer is not None else node.kind
            raise RunError(
                f"loss term '{ctx.term.id}': signal {node.model}.{where} was not captured (plan and loss disagree)"
            ) from None
        if raw:
            return value
        if isinstance(value, HeadLogits):
            raise RunError(f"loss term '{ctx.term.id}': {node.model}.logits were planned fused (never materialised) "
                           f"but this term reads them through a transform; re-run `gkdc plan`")
        # kernels compute in fp32 whatever precision the model ran in
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value


def _in_window(term: LossTerm, progress: float) -> bool:
    gate = term.gate
    return gate.active_from <= progress and (progress < gate.active_until or gate.active_until >= 1.0)


def _averaged(term: LossTerm, value: torch.Tensor, mask: torch.Tensor | None, key_mask: torch.Tensor | None = None,
              pred: Any = None) -> torch.Tensor:
    """``average: all_positions`` (GKD's): the kept positions' mean times kept / all, so that the positions the mask
    leaves out count 0 in a mean over every position; ``kept`` (the default) leaves the kernel's mean as it is.
    An element loss over attention-shaped ``[b, H, s, s]`` inputs also leaves out padded keys: then kept counts the
    (query, key) pairs, so padded keys add 0 to a mean over every pair (GKD's TinyBERT attention MSE)."""
    if term.average != "all_positions":
        return value
    elementwise = key_mask is not None and term.fn not in _DISTRIBUTION and getattr(pred, "dim", lambda: 0)() == 4
    if elementwise:
        rows = (mask if mask is not None else torch.ones_like(key_mask)).bool()
        kept = (rows.sum(1).to(torch.float32) * key_mask.bool().sum(1).to(torch.float32)).sum()
        return value * (kept / (rows.shape[0] * rows.shape[1] * key_mask.shape[1]))
    if mask is None or mask.numel() == 0:
        return value
    return value * (mask.sum().to(torch.float32) / mask.numel())


#: kernels whose key mask drops keys from each row's distribution (a row still counts once), not elements
_DISTRIBUTION = frozenset({"kl", "soft_ce", "jsd", "gjsd"})


def _trains_target(node: Node) -> bool:
    """A target built by a learned map or by attention over the student's states keeps its graph: GKD trains a
    teacher-side projection (MT-BERT, RAIL-KD, Universal-KD) and ALP-KD's attention weights through the target."""
    if isinstance(node, SignalNode):
        return False
    return node.module is not None or node.op == "attend" or any(_trains_target(x) for x in node.inputs)


def _module_key(key: str) -> str:
    # ModuleDict keys cannot contain "."
    return key.replace(".", "_")


# ---------------------------------------------------------------- op kernels

OpFn = Callable[[LossGraph, OpNode, list[torch.Tensor], _Ctx], torch.Tensor]


def _op_project(graph: LossGraph, node: Project, xs: list[torch.Tensor], ctx: _Ctx) -> torch.Tensor:
    module = graph.projections[_module_key(node.module or f"{ctx.term.id}/{node.op}")]
    return module(xs[0]).float()


def _op_relation(graph: LossGraph, node: Relation, xs: list[torch.Tensor], ctx: _Ctx) -> torch.Tensor:
    mask = ctx.batch["attention_mask"].bool()
    if node.padded or (xs[0].dim() == 3 and xs[0].shape[1] != mask.shape[1]):  # pooled spans: every position real
        mask = None
    return T.relation(xs[0], node.heads, mask, softmax=node.softmax)


def _op_pool(graph: LossGraph, node: Pool, xs: list[torch.Tensor], ctx: _Ctx) -> torch.Tensor:
    return T.pool(xs[0], node.how, ctx.batch["attention_mask"].bool())


def _op_normalize(graph: LossGraph, node: Normalize, xs: list[torch.Tensor], ctx: _Ctx) -> torch.Tensor:
    return T.normalize(xs[0])


def _op_zero_pad(graph: LossGraph, node: ZeroPad, xs: list[torch.Tensor], ctx: _Ctx) -> torch.Tensor:
    real = ctx.batch["attention_mask"].bool()
    if xs[0].dim() < 2 or tuple(xs[0].shape[:2]) != tuple(real.shape):
        raise RunError(f"zero_pad: input {list(xs[0].shape)} is not per token of the batch {list(real.shape)}")
    return xs[0] * real.reshape(*real.shape, *([1] * (xs[0].dim() - 2))).to(xs[0].dtype)


def _op_select_vocab(graph: LossGraph, node: SelectVocab, xs: list[torch.Tensor], ctx: _Ctx) -> torch.Tensor:
    return T.select_vocab(xs[0], graph._kept_columns(node, ctx))


def _op_mean(graph: LossGraph, node: Mean, xs: list[torch.Tensor], ctx: _Ctx) -> torch.Tensor:
    return T.mean(xs)


def _op_concat(graph: LossGraph, node: Concat, xs: list[torch.Tensor], ctx: _Ctx) -> torch.Tensor:
    return T.concat(xs)


def _op_attend(graph: LossGraph, node: Attend, xs: list[torch.Tensor], ctx: _Ctx) -> torch.Tensor:
    return T.attend(xs[0], xs[1:])


def _op_stack(graph: LossGraph, node: Stack, xs: list[torch.Tensor], ctx: _Ctx) -> torch.Tensor:
    return T.stack(xs, axis=node.axis)


def span_segmentation(seed: int, step: int, batch: Mapping[str, torch.Tensor], max_fraction: float) -> list[tuple[int, int]]:
    """The step's span segmentation: over the shortest example's real positions, from (seed, step) alone, so
    every ``spans`` op of a step (teacher and student sides) pools the same spans, and a resumed run too."""
    length = int(batch["attention_mask"].sum(dim=1).min())
    return T.span_bounds(length, max_fraction, random.Random(f"{seed}:spans:{step}"))


def _op_spans(graph: LossGraph, node: Spans, xs: list[torch.Tensor], ctx: _Ctx) -> torch.Tensor:
    bounds = span_segmentation(graph.seed, ctx.step, ctx.batch, node.max_fraction)
    return T.spans(xs[0], bounds, ctx.batch["attention_mask"].bool())


def _op_anneal(graph: LossGraph, node: Anneal, xs: list[torch.Tensor], ctx: _Ctx) -> torch.Tensor:
    return T.anneal(xs[0], float(node.phi.at(ctx.progress, step=ctx.step, epoch=ctx.epoch)))


OPS: dict[str, OpFn] = {
    "project": _op_project,
    "relation": _op_relation,
    "pool": _op_pool,
    "normalize": _op_normalize,
    "select_vocab": _op_select_vocab,
    "mean": _op_mean,
    "concat": _op_concat,
    "attend": _op_attend,
    "anneal": _op_anneal,
    "stack": _op_stack,
    "spans": _op_spans,
    "zero_pad": _op_zero_pad,
}
"""``OpNode.op`` -> kernel; a kernel gets the op (its typed fields), the evaluated inputs and the context."""


def chosen_index(seed: int, group: str, k: int, index: int, every: str, n: int, step: int, epoch: int) -> int:
    """Which of ``n`` inputs a ``choose`` op picks: item ``index`` of the group's ascending ``k``-subset,
    drawn per ``every`` period from (seed, group, period), so the ops of one group agree and a resume too."""
    period = epoch if every == "epoch" else step
    rng = random.Random(f"{seed}:{group}:{period}")
    return T.choose_indices(n, k, rng)[index]


def _lazy_choose(graph: LossGraph, node: Choose, signals: Signals, ctx: _Ctx) -> torch.Tensor:
    i = chosen_index(graph.seed, node.group, node.k, node.index, node.every, len(node.inputs), ctx.step, ctx.epoch)
    return graph._eval(node.inputs[i], signals, ctx)  # only the chosen layer is computed


class _Counterfactual(Mapping):
    """Signals of the counterfactual pass ``id``: model name -> what was captured under ``model@id``."""

    def __init__(self, signals: Signals, ident: str) -> None:
        self.signals, self.ident = signals, ident

    def __getitem__(self, model: str):
        key = f"{model}@{self.ident}"
        if key not in self.signals:
            raise RunError(f"interchange '{self.ident}': model '{model}' ran no counterfactual pass")
        return self.signals[key]

    def __iter__(self):
        return iter(k.split("@")[0] for k in self.signals if k.endswith(f"@{self.ident}"))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _lazy_interchanged(graph: LossGraph, node: Interchanged, signals: Signals, ctx: _Ctx) -> torch.Tensor:
    return graph._eval(node.inputs[0], _Counterfactual(signals, node.intervention), ctx)


LAZY_OPS: dict[str, Callable[[LossGraph, OpNode, Signals, _Ctx], torch.Tensor]] = {
    "choose": _lazy_choose,
    "interchanged": _lazy_interchanged,
}
"""Ops that evaluate their own inputs: ``choose`` computes only the chosen one; ``interchanged`` reads the
counterfactual pass of its intervention."""

_CHUNKED = frozenset({"kl", "soft_ce", "jsd", "gjsd", "skew_kl", "skew_rkl", "ce", "cached_kl", "cached_kl_bucket"})
"""Kernels that take logits in the model's dtype (or a fused head) and upcast one chunk of rows at a time."""


def _is_logits(node: Node, select: bool) -> bool:
    """A bare ``logits`` signal, or (``select``) a vocabulary column selection of one."""
    if isinstance(node, SignalNode):
        return node.model is not None and node.kind == "logits"
    return select and node.op == "select_vocab" and len(node.inputs) == 1 and _is_logits(node.inputs[0], False)


_BATCH_COUPLED = frozenset({"nce", "mgskd_sample", "cos_nce"})
"""Kernels whose value for one example depends on the others (no per-example weights)."""
