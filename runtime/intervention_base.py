"""What every stage intervention shares: the step it is at (``StepInfo``), what it is built from (``Setup``),
its seeded generators and the no-op call points (``Base``). Split out of ``runtime/interventions.py`` so that
interventions kept in their own modules (``runtime/rl_agent.py``) subclass ``Base`` without an import circle;
``runtime/interventions.py`` re-exports these names.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, ContextManager, Mapping

import torch
from torch import Tensor, nn

from gkdlang.spec import ModelSpec, StageSpec
from planner.plan import CapturePoint

Signals = Mapping[str, Mapping[tuple[str, int | None], Tensor]]


@dataclass(frozen=True)
class StepInfo:
    """Where training is: what every intervention may read at a step."""

    step: int
    epoch: int
    progress: float
    micro: int = 0
    rank: int = 0


@dataclass(frozen=True)
class Setup:
    """What interventions are built from: the stage, the spec's models, the stage seed and base LR."""

    stage: StageSpec
    models: Mapping[str, ModelSpec]
    seed: int
    lr: float


def _generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (sha512 of their text: stable across processes, unlike hash())."""
    return torch.Generator().manual_seed(random.Random(":".join(map(str, parts))).getrandbits(63))


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "config") else model


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_first(output: Any, first: Tensor) -> Any:
    return (first, *output[1:]) if isinstance(output, (tuple, list)) else first


def _hidden_point(layer: int) -> CapturePoint:
    return CapturePoint(kind="hidden", layer=layer)


class Base(nn.Module):
    """No-op defaults for every call point; subclasses override what their method needs."""

    kind: ClassVar[str] = ""

    def __init__(self, *, seed: int) -> None:
        super().__init__()
        self.seed = seed

    def built_models(self) -> set[str]:
        """Models the stage must build although the plan captures nothing from them (no forward of their own)."""
        return set()

    def extra_points(self) -> dict[str, list[CapturePoint]]:
        """Signals the first pass must capture besides the plan's, per model."""
        return {}

    def gate(self, active: set[str], info: StepInfo) -> set[str]:
        return active

    def student_context(self, student: nn.Module, info: StepInfo) -> ContextManager:
        return nullcontext()

    def teacher_passes(self, teachers: Mapping[str, nn.Module], batch: dict[str, Tensor], signals: Signals,
                       info: StepInfo) -> dict[str, Any]:
        return {}

    def student_passes(self, name: str, student: nn.Module, batch: dict[str, Tensor], signals: Signals,
                       info: StepInfo) -> dict[str, Any]:
        return {}

    def row_weights(self, signals: Signals, batch: Mapping[str, Tensor], info: StepInfo) -> dict[str, Tensor]:
        return {}

    def extra_loss(self, signals: Signals, batch: Mapping[str, Tensor], info: StepInfo) -> dict[str, Tensor]:
        return {}

    def lr_groups(self, student: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
        """Named parameter groups this intervention sets learning-rate factors for (see ``lr_scale``)."""
        return []

    def lr_scale(self, group: str, progress: float) -> float:
        return 1.0

    def observe(self, values: Mapping[str, float], info: StepInfo) -> None:
        """The step's weighted term values (mean over its micro-batches, this rank), after the optimizer step."""


def _classes(setup: Setup, model: str, head: str) -> int:
    spec = setup.models[model]  # builders only
    if head == "logits":
        return int(spec.arch.vocab_size)
    return int(spec.head.num_labels or spec.arch.config.get("num_labels") or 2)
