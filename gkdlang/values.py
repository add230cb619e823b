"""Values of the spec interpreter: what an expression evaluates to while lowering AST -> Spec.

A signal expression evaluates to an ``ItemSet``: an ordered list of ``Item``s, one per layer, each holding the
Spec ``Node`` that computes it and its ``Feat`` (what kind of tensor it is and its width), so losses can pair
layers and check shapes before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from gkdlang.spec import Gate, Intervention, Node, Schedule, Span


@dataclass(frozen=True)
class NumVal:
    """A number with its unit as written: count (``150k``), percent (``5%``) or bytes (``40GB``)."""

    value: float
    unit: str | None = None
    """None, "percent" or "bytes"."""
    span: Span | None = None


@dataclass(frozen=True)
class ModelRef:
    name: str


@dataclass(frozen=True)
class DataRef:
    name: str


@dataclass(frozen=True)
class Symbol:
    """A bare word with meaning only in context: ``uniform``, ``mean``, ``bf16``, ``epoch``, ``lm`` ..."""

    name: str
    span: Span | None = None


@dataclass(frozen=True)
class CallVal:
    """A call of a context-interpreted function kept unevaluated: ``cosine(warmup: 5%)``, ``classify(5)``."""

    func: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    span: Span | None = None


@dataclass(frozen=True)
class Trigger:
    """A condition the runtime evaluates while training: ``plateau(patience: 3, min_delta: 0, window: 10, on: cos)``
    (the watched loss stops improving). Used by ``progressive(x, until: ...)``."""

    kind: str
    params: dict[str, Any]
    span: Span | None = None


@dataclass(frozen=True)
class LayerMap:
    kind: str
    """uniform | last | skip | first | pairs"""
    pairs: tuple[tuple[int, int], ...] = ()
    span: Span | None = None


@dataclass(frozen=True)
class Feat:
    """What a tensor is: decides which losses and transforms apply and what must match."""

    kind: str
    """hidden | attn | qkv | ffn | logits | task_logits | relation | pooled | labels | tokens"""
    dim: int | None = None
    """Width of the last dimension (hidden, qkv, ffn, pooled); None = inferred later (projection)."""
    heads: int | None = None
    """Head count for attention maps and relations."""
    vocab: str | None = None
    """Vocabulary space of logits (models sharing a tokenizer share it)."""
    classes: int | None = None
    """Label count of task logits."""
    probs: bool = False
    """Already a probability distribution over the last dim (attn_probs, relations)."""
    items: int | None = None
    """Number of stacked items (``stack``): relation losses relate them, so both sides need as many."""


@dataclass(frozen=True)
class Item:
    node: Node
    feat: Feat
    model: str | None
    """Model whose signal the item derives from (None: data targets)."""
    layer: int | None
    span: Span


@dataclass(frozen=True)
class ItemSet:
    items: tuple[Item, ...]
    layered: bool = False
    """Came from a layered signal (hidden, attn_*, query/key/value, ffn)."""
    span: Span | None = None


class PerModel(list):
    """One value per model of a list of models (``ts.task_logits`` with ``ts = [a, b, c]``): transforms map over it,
    a loss with it as the target gives one set of terms per model, ``mean``/``concat`` reduce across it."""


@dataclass(frozen=True)
class Term:
    fn: str
    target: Item
    pred: Item
    options: dict[str, Any]
    span: Span
    mask: str | None = None
    average: str = "kept"
    weight: Schedule = field(default_factory=lambda: Schedule(value=1.0))
    gate: Gate = field(default_factory=Gate)
    method: str | None = None

    def scaled(self, factor: Schedule) -> "Term":
        return replace(self, weight=mul_schedules(self.weight, factor))


@dataclass(frozen=True)
class Objective:
    """A weighted sum of loss terms plus interventions (what a stage's ``loss:`` evaluates to)."""

    terms: tuple[Term, ...] = ()
    interventions: tuple[Intervention, ...] = ()


class WeightError(ValueError):
    pass


def mul_schedules(a: Schedule, b: Schedule) -> Schedule:
    """Product of two weights; one of them must be constant (a schedule times a schedule is not linear)."""
    if a.kind == "constant" or a.end is None:
        a, b = b, a
    if b.kind != "constant" and b.end is not None:
        raise WeightError("a weight schedule multiplied by another schedule")
    k = b.value
    return a.model_copy(update={"value": a.value * k, "end": None if a.end is None else a.end * k,
                                "after": None if a.after is None else a.after * k})
