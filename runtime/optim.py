"""Stage spec -> optimizer and LR schedule: torch optimizers over a module's trainable parameters (grouped by the
interventions that scale a group's LR) and the stage's warm-up / decay as a LambdaLR.

Kept as our own small functions rather than transformers' ``get_scheduler``: a group's factor depends on the
stage's progress (``progressive_lr``), which a named scheduler cannot express.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gkdlang.spec import LRScheduleSpec, OptimizerSpec
from runtime import interventions as ivs
from runtime.errors import RunError


def optimizer_groups(module: nn.Module, interventions: list[ivs.Base]) -> list[dict[str, Any]]:
    """Trainable parameters in groups: one per group an intervention names (with its LR factor over the
    stage's progress, and its own LR when it has one), the rest in a default group first."""
    claimed: dict[int, tuple[ivs.Base, str]] = {}
    for iv in interventions:
        student = getattr(module, "student", module)
        for name, params in iv.lr_groups(student):
            for p in params:
                claimed.setdefault(id(p), (iv, name))
    rest = [p for p in module.parameters() if p.requires_grad and id(p) not in claimed]
    groups: list[dict[str, Any]] = [{"params": rest, "scale": None}]
    by_name: dict[tuple[int, str], dict[str, Any]] = {}
    for p in module.parameters():
        if not p.requires_grad or id(p) not in claimed:
            continue
        iv, name = claimed[id(p)]
        group = by_name.get((id(iv), name))
        if group is None:
            scale = (lambda progress, iv=iv, name=name: iv.lr_scale(name, progress))
            group = by_name[(id(iv), name)] = {"params": [], "scale": scale, "lr": getattr(iv, "lr", None)}
            groups.append(group)
        group["params"].append(p)
    return [g for g in groups if g["params"]]


def build_optimizer(module: nn.Module | list[dict[str, Any]], spec: OptimizerSpec, stage: str) -> torch.optim.Optimizer:
    """A torch optimizer over the module's trainable parameters, or over ``optimizer_groups`` (a group's own
    ``lr`` replaces the stage's); DeepSpeed gets the instance: no op builds."""
    if isinstance(module, nn.Module):
        params: Any = [p for p in module.parameters() if p.requires_grad]
    else:
        params = [{"params": g["params"], **({"lr": g["lr"]} if g.get("lr") else {})} for g in module]
    if spec.name == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.betas[0], weight_decay=spec.weight_decay)
    raise RunError(
        f"stage '{stage}': optimizer '{spec.name}' has no torch implementation here; use adamw, adam or sgd"
    )


def lr_factor(step: int, total: int, spec: LRScheduleSpec, base_lr: float) -> float:
    """Multiplier of the base LR after ``step`` optimizer steps: linear warm-up, then constant/linear/cosine decay."""
    warmup = int(math.ceil(spec.warmup * total))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    floor = spec.min_lr / base_lr if base_lr > 0 else 0.0
    x = min(1.0, (step - warmup) / max(1, total - warmup))
    if spec.kind == "linear":
        return floor + (1 - floor) * (1 - x)
    if spec.kind == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * x))
    return 1.0


def build_lr_schedule(
    optimizer: torch.optim.Optimizer, spec: LRScheduleSpec, total: int, scales: list[Any] | None = None
) -> Any:
    """LambdaLR: the stage's warm-up/decay factor, times a group's factor at the step's progress when it has one
    (a pure function of the step, so a resumed run has the same rates)."""
    base = optimizer.param_groups[0]["lr"]
    scales = scales or [None] * len(optimizer.param_groups)

    def factor(scale):
        if scale is None:
            return lambda step: lr_factor(step, total, spec, base)
        return lambda step: lr_factor(step, total, spec, base) * scale(step / max(total, 1))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(s) for s in scales])
