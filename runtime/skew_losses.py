"""DistiLLM's skew divergences (Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language
Models", eqs. 4-5), p the teacher's and q the student's softmax(x / T), ``alpha`` in [0, 1] (default 0.1):

- ``skew_kl``  = KL(p || alpha p + (1 - alpha) q)    (alpha 0: forward KL; 1: zero)
- ``skew_rkl`` = KL(q || alpha q + (1 - alpha) p)    (alpha 0: reverse KL; 1: zero)

Sum over the vocabulary, mean over the rows that count (the mask: on-policy stages pass the generated tokens only),
no T^2 unless ``scale_t2``. The gradient flows through the mixture too, as DistiLLM's code does (its mixture is
built from the student's live softmax). Row kernels in runtime/chunked.py's form ``(x, y, extra) -> (row loss,
d row / d x)``: a chunk keeps the two fp32 operands and three more of the chunk's size (q, p, the mixture), as
``gjsd`` does, and never a ``[rows, V]`` fp32 tensor.

Gradients in closed form, with u_k the derivative of the row loss w.r.t. q_k and the softmax Jacobian giving
d row / d x_j = q_j (u_j - sum_k q_k u_k):

- skew_kl:  u_k = -(1 - alpha) p_k / m_k
- skew_rkl: u_k = log q_k - log m_k + 1 - alpha q_k / m_k   (the constant 1 cancels)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from runtime.chunked import _TINY, HeadLogits, _log_softmax_
from runtime.errors import RunError
from runtime.loss_helpers import _distribution

Logits = Tensor | HeadLogits


def _check_alpha(name: str, alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise RunError(f"{name}: option alpha must be in [0, 1], got {alpha}")
    return alpha


def _log(a: float) -> float:
    return math.log(a) if a > 0 else -math.inf


def _skew_rows(first: Tensor, second: Tensor, a: float) -> Tensor:
    """Differentiable row loss KL(f || a f + (1 - a) s), f and s the softmaxes of the logits ``first`` and
    ``second``: the kernels' ``target_rows`` (skew_kl: f = p; skew_rkl: f = q)."""
    lf, ls = torch.log_softmax(first, -1), torch.log_softmax(second, -1)
    lm = torch.logaddexp(lf + _log(a), ls + _log(1.0 - a))
    return (lf.exp() * (lf - lm)).sum(-1)


def skew_kl_kernel(alpha: float) -> Callable:
    """Row kernel of KL(p || m), m = alpha p + (1 - alpha) q."""
    a = _check_alpha("skew_kl", alpha)

    def kernel(x: Tensor, y: Tensor, extra) -> tuple[Tensor, Tensor]:
        q = _log_softmax_(x)
        p = _log_softmax_(y)
        m = torch.mul(p, a).add_(q, alpha=1.0 - a).clamp_min_(_TINY)
        y.sub_(torch.log(m, out=x))  # log p - log m (log q is not needed again: x is reused)
        row = y.mul_(p).sum(-1)
        u = p.div_(m).mul_(-(1.0 - a))
        del m
        mean_u = torch.mul(q, u, out=x).sum(-1, keepdim=True)
        return row, u.sub_(mean_u).mul_(q)

    kernel.target_rows = lambda x, y: _skew_rows(y, x, a)  # KL(p || m): the teacher's side first
    return kernel


def skew_rkl_kernel(alpha: float) -> Callable:
    """Row kernel of KL(q || m), m = alpha q + (1 - alpha) p."""
    a = _check_alpha("skew_rkl", alpha)

    def kernel(x: Tensor, y: Tensor, extra) -> tuple[Tensor, Tensor]:
        q = _log_softmax_(x)
        p = _log_softmax_(y)
        m = torch.mul(q, a).add_(p, alpha=1.0 - a).clamp_min_(_TINY)
        del p
        x.sub_(torch.log(m, out=y))  # log q - log m
        row = torch.mul(q, x, out=y).sum(-1)
        x.sub_(m.reciprocal_().mul_(q).mul_(a))  # u (less its constant 1)
        del m
        mean_u = torch.mul(q, x, out=y).sum(-1, keepdim=True)
        return row, x.sub_(mean_u).mul_(q)

    kernel.target_rows = lambda x, y: _skew_rows(x, y, a)  # KL(q || m): the student's side first
    return kernel


def skew_kl(target: Logits, pred: Logits, *, mask: Tensor | None = None, alpha: float = 0.1, T: float = 1.0,
            scale_t2: bool = False, target_cols: Tensor | None = None, pred_cols: Tensor | None = None,
            chunk: int | None = None) -> Tensor:
    """DistiLLM's skew KL: KL(p || alpha p + (1 - alpha) q) per row, mean over the rows that count."""
    return _distribution("skew_kl", skew_kl_kernel(alpha), target, pred, mask, T, T * T if scale_t2 else 1.0,
                         target_cols, pred_cols, chunk)


def skew_rkl(target: Logits, pred: Logits, *, mask: Tensor | None = None, alpha: float = 0.1, T: float = 1.0,
             scale_t2: bool = False, target_cols: Tensor | None = None, pred_cols: Tensor | None = None,
             chunk: int | None = None) -> Tensor:
    """DistiLLM's skew reverse KL: KL(q || alpha q + (1 - alpha) p) per row, mean over the rows that count."""
    return _distribution("skew_rkl", skew_rkl_kernel(alpha), target, pred, mask, T, T * T if scale_t2 else 1.0,
                         target_cols, pred_cols, chunk)
