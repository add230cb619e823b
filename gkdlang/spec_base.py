"""The Spec's base classes: frozen pydantic models, source spans and schedules (split from gkdlang/spec.py to
keep modules under the size limit; gkdlang.spec re-exports every name here)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_serializer


def _omit_defaults(out, defaults: dict):
    """A dump without the given fields where they hold their default: fields added for GKD's variants
    (``Schedule.after``, ``Relation.padded``) leave the plans and goldens of specs that do not use them unchanged."""
    if isinstance(out, dict):
        for key, default in defaults.items():
            if key in out and out[key] == default:
                del out[key]
    return out


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Span(Frozen):
    """A source range, 1-based lines and columns."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


# ---------------------------------------------------------------- schedules


class Schedule(Frozen):
    """A number that may change over a stage: constant, or interpolated between two values.

    ``start``/``until`` are fractions of the stage's total steps; before ``start`` the value is
    ``value``, after ``until`` it is ``end``. ``stairs`` goes from ``value`` to ``end`` in ``levels`` equal
    steps, one per ``every`` period (epoch or optimizer step) from the stage's start, then stays at ``end``.
    """

    kind: Literal["constant", "linear", "cosine", "step", "stairs"] = "constant"
    value: float
    end: float | None = None
    start: float = 0.0
    until: float = 1.0
    levels: int | None = None
    """stairs: how many distinct values (period k has level min(k, levels - 1))."""
    every: Literal["step", "epoch", "stage"] | None = None
    """stairs: the period that moves to the next level (``stage``: each n-th of the stage's steps)."""
    after: float | None = None
    """linear / cosine / step: the value once progress is past ``until`` (``then:``; None = ``end``), as GKD's
    Continuation-KD weights jump to 0 / 1 after 66.6% of the stage."""

    @model_serializer(mode="wrap")
    def _drop_unset_after(self, handler):
        """``after`` is written only when set, so plans and goldens of schedules without it are unchanged."""
        return _omit_defaults(handler(self), {"after": None})

    def at(self, frac: float, *, step: int = 0, epoch: int = 0) -> float:
        """Value at training progress ``frac`` in [0, 1] (``stairs``: at optimizer step ``step`` / epoch ``epoch``)."""
        import math

        if self.kind == "constant" or self.end is None:
            return self.value
        if self.kind == "stairs":
            levels = max(int(self.levels or 1), 1)
            if levels == 1:
                return self.end
            if self.every == "stage":  # GKD's Annealing-KD: level floor(frac * n); the epsilon absorbs 6/7*7 = 5.999..
                k = min(math.floor(frac * levels + 1e-9), levels - 1)
            else:
                k = min(epoch if self.every == "epoch" else step, levels - 1)
            return self.value + (self.end - self.value) * k / (levels - 1)
        if self.kind == "step" and self.after is not None:  # three parts: value, end in (start, until], after
            return self.value if frac <= self.start else (self.end if frac <= self.until else self.after)
        if frac <= self.start:
            return self.value
        if frac > self.until and self.after is not None:
            return self.after
        if frac >= self.until:
            return self.end
        x = (frac - self.start) / max(self.until - self.start, 1e-12)
        if self.kind == "linear":
            return self.value + (self.end - self.value) * x
        if self.kind == "cosine":
            return self.end + (self.value - self.end) * 0.5 * (1 + math.cos(math.pi * x))
        return self.value  # "step": jumps at ``until``
