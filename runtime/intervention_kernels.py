"""The tensor arithmetic of the stage interventions, free of any model or Spec: per-example weights
(MT-BERT, Uncertainty), interchange positions (DIITO), the gradient perturbation (LRC-BERT) and the float64
bit packing of the plateau state (SID). Each has a formula test in tests/test_methods_formula.py."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.errors import RunError


def entropy(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-example prediction entropy ``[b]``; token logits ``[b, s, V]`` average their (masked) positions."""
    logp = F.log_softmax(logits.detach().float(), dim=-1)
    h = -(logp.exp() * logp).sum(-1)
    if h.dim() == 1:
        return h
    w = torch.ones_like(h) if mask is None else mask.to(h.dtype)
    return (h * w).sum(-1) / w.sum(-1).clamp_min(1)


def entropy_weights(h: Tensor, n_units: int, classes: int, hard: bool) -> Tensor:
    """``[n_units, b]`` weights from student entropies ``h`` (units listed from smallest to largest teacher).

    hard: examples sorted by entropy are split into ``n_units`` near-equal slices, unit i takes slice i (the
    most uncertain go to the last unit). soft: the entropy normalised by ``log(classes)`` places each example
    on [0, n_units - 1]; the two nearest units share it linearly (two units: ``1 - h``, ``h``).
    """
    b = h.shape[0]
    w = h.new_zeros(n_units, b)
    if hard:
        order = torch.argsort(h, stable=True)
        for i, part in enumerate(torch.tensor_split(order, n_units)):
            w[i, part] = 1.0
        return w
    x = (h / math.log(max(classes, 2))).clamp(0, 1) * (n_units - 1)
    units = torch.arange(n_units, dtype=h.dtype, device=h.device)[:, None]
    return (1 - (x[None, :] - units).abs()).clamp_min(0)


def teacher_ce_weights(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """MT-BERT: ``1 / (1 + CE(label_i, teacher_i))`` per example (unlabelled rows: CE 0, weight 1)."""
    ce = F.cross_entropy(teacher_logits.detach().float(), labels.long(), ignore_index=-100, reduction="none")
    return 1.0 / (1.0 + ce)


def interchange_positions(attention: Tensor, fraction: float, way: str, gen: torch.Generator,
                          tokens: Tensor | None = None) -> Tensor:
    """``[b, s]`` bool: the positions of each example whose states are taken from the source example.

    ``consecutive``: one span of ``max(1, round(fraction * n_i))`` of the example's n_i real positions;
    ``random``: that many real positions anywhere; ``masked``: the masked-LM positions (``tokens != -100``).
    """
    b, s = attention.shape
    out = torch.zeros(b, s, dtype=torch.bool)
    real = attention.bool().cpu()
    for i in range(b):
        where = real[i].nonzero().flatten()
        n = len(where)
        if n == 0:
            continue
        count = max(1, round(fraction * n))
        if way == "consecutive":
            start = int(torch.randint(0, n - count + 1, (1,), generator=gen))
            out[i, where[start:start + count]] = True
        elif way == "random":
            out[i, where[torch.randperm(n, generator=gen)[:count]]] = True
        elif way == "masked":
            if tokens is None:
                raise RunError("interchange(way: masked) needs masked-LM targets in the batch")
            out[i] = tokens[i].cpu() != -100
        else:
            raise RunError(f"interchange: way '{way}' is not one of consecutive, random, masked")
    return out.to(attention.device)


def perturbation(grad: Tensor | None, like: Tensor, eps: float, norm: str = "batch") -> Tensor:
    """``eps * g / ||g||_2``: the norm of the whole micro-batch's embedding gradient (``norm="batch"``) or of each
    position's (``norm="token"``, GKD's ``F.normalize(g, p=2, dim=-1)``). Zero where there is no gradient, and for
    a gradient that is not finite (GKD skips the perturbation then)."""
    if grad is None or not bool(torch.isfinite(grad).all()):
        return torch.zeros_like(like)
    g = grad.float()
    if norm == "token":
        return (eps * F.normalize(g, p=2, dim=-1)).detach().to(like.dtype)
    if norm != "batch":
        raise RunError(f"perturb: norm '{norm}' is not one of batch, token")
    return (eps * g / g.norm().clamp_min(1e-12)).detach().to(like.dtype)


def f64_bits(x: float) -> int:
    return int(torch.tensor(x, dtype=torch.float64).view(torch.int64))


def bits_f64(bits: Tensor) -> float:
    return float(bits.detach().cpu().clone().view(torch.float64))
