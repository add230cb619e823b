"""Transform kernels: captured signals -> the tensors the losses compare (``OpNode.op`` names them).

Plain functions for stateless transforms (``relation``, ``pool``, ``normalize``, ``select_vocab``,
``concat``, ``mean``, ``attend``, ``anneal``, ``stack``, ``spans``; called by the op kernels of
``runtime/lossgraph.py``) and ``Projection``, the one
learned transform (TinyBERT's ``fit_dense``; the caller shares one instance between ops with the same
``OpNode.module`` key). Shapes follow docs/internals.md: token signals ``[b, s, h]``, masks ``[b, s]``
bool with True = real token. Transforms keep the input dtype; the losses accumulate in fp32.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.errors import RunError


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


class Projection(nn.Module):
    """Linear(d_in -> d_out) mapping student features into the teacher's width (TinyBERT fit_dense)."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.linear = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d_in:
            raise RunError(f"project: input width {x.shape[-1]} (shape {_shape(x)}) is not d_in={self.d_in}")
        # the projection's weights stay fp32 while signals may be bf16: compute in the weight dtype
        return self.linear(x.to(self.linear.weight.dtype))


def relation(x: Tensor, heads: int, mask: Tensor | None = None, *, log: bool = False, softmax: bool = True) -> Tensor:
    """MiniLM / MiniLMv2 self-relation: ``softmax(X_r X_r^T / sqrt(d_r))`` per relation head.

    ``x`` ``[b, s, width]`` is split into ``heads`` heads of ``d_r = width / heads``; padded keys
    (``mask`` False) get probability 0. Returns ``[b, heads, s, s]`` probabilities, or log-probabilities
    with ``log=True`` (then ``kl(..., inputs="log_probs")`` avoids a log of a rounded probability).
    ``softmax=False`` returns the scaled scores ``X_r X_r^T / sqrt(d_r)`` themselves, 0 wherever the query or
    the key is padded (MGSKD's pair-wise token relations).
    """
    if x.dim() != 3:
        raise RunError(f"relation: input must be [batch, seq, width], got {_shape(x)}")
    b, s, width = x.shape
    if heads < 1 or width % heads:
        raise RunError(f"relation: width {width} is not divisible by heads={heads}")
    d_r = width // heads
    xr = x.float().reshape(b, s, heads, d_r).transpose(1, 2)
    scores = xr @ xr.transpose(-1, -2) / math.sqrt(d_r)
    if mask is not None and mask.shape != (b, s):
        raise RunError(f"relation: mask shape {_shape(mask)} does not match input {_shape(x)}")
    if not softmax:
        if mask is None:
            return scores
        pair = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]
        return scores * pair
    if mask is not None:
        # a finite fill keeps a row with no real key finite (uniform) instead of NaN
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    out = F.log_softmax(scores, dim=-1)
    return out if log else out.exp()


def _check_mask(name: str, x: Tensor, mask: Tensor | None) -> Tensor | None:
    if mask is None:
        return None
    if mask.shape != x.shape[:2]:
        raise RunError(f"{name}: mask shape {_shape(mask)} does not match input {_shape(x)} (needs [b, s])")
    return mask.bool()


def pool(x: Tensor, how: str = "mean", mask: Tensor | None = None) -> Tensor:
    """``[b, s, h] -> [b, h]``: mean or max over the real tokens, or the first ([CLS]) token."""
    if x.dim() != 3:
        raise RunError(f"pool: input must be [batch, seq, hidden], got {_shape(x)}")
    keep = _check_mask("pool", x, mask)
    if how == "cls":
        return x[:, 0]
    if how == "mean_all":  # every position, padded ones included (GKD's RAIL-KD)
        return x.mean(dim=1)
    if how == "mean":
        if keep is None:
            return x.mean(dim=1)
        w = keep[..., None].to(x.dtype)
        return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)
    if how == "max":
        if keep is None:
            return x.amax(dim=1)
        return x.masked_fill(~keep[..., None], torch.finfo(x.dtype).min).amax(dim=1)
    raise RunError(f"pool: option how={how!r} is not one of mean, cls, max, mean_all")


def normalize(x: Tensor, p: float = 2.0, eps: float = 1e-12) -> Tensor:
    """Scale the last dim to unit p-norm (PKD, RAIL-KD)."""
    return F.normalize(x, p=p, dim=-1, eps=eps)


def select_vocab(logits: Tensor, keep_ids: Tensor | Sequence[int]) -> Tensor:
    """Keep the vocabulary columns ``keep_ids`` of ``[..., V]`` logits, in that order (GLMD)."""
    ids = torch.as_tensor(keep_ids, dtype=torch.long, device=logits.device)
    if ids.dim() != 1:
        raise RunError(f"select_vocab: keep_ids must be 1-D, got shape {_shape(ids)}")
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= logits.shape[-1]):
        raise RunError(
            f"select_vocab: keep_ids span {int(ids.min())}..{int(ids.max())} but the logits have "
            f"{logits.shape[-1]} columns"
        )
    return logits.index_select(-1, ids)


def concat(xs: Sequence[Tensor], dim: int = -1) -> Tensor:
    """Join signals along ``dim`` (RAIL-KD concatenates pooled layers); the other dims must agree."""
    if not xs:
        raise RunError("concat: needs at least one input")
    rest = [tuple(s for i, s in enumerate(x.shape) if i != dim % x.dim()) for x in xs]
    if len(set(rest)) > 1:
        raise RunError(f"concat: input shapes {', '.join(_shape(x) for x in xs)} differ outside dim {dim}")
    return torch.cat(list(xs), dim=dim)


def mean(xs: Sequence[Tensor]) -> Tensor:
    """Elementwise mean of same-shaped signals (TMKD averages teachers)."""
    if not xs:
        raise RunError("mean: needs at least one input")
    if len({tuple(x.shape) for x in xs}) > 1:
        raise RunError(f"mean: input shapes {', '.join(_shape(x) for x in xs)} differ")
    return torch.stack(list(xs)).mean(dim=0)


def attend(student_h: Tensor, teacher_hs: Sequence[Tensor] | Tensor) -> Tensor:
    """ALP-KD / Universal-KD: per row, attend over teacher layers and return ``sum_l alpha_l * t_l``.

    ``alpha = softmax_l(<s, t_l>)`` from unscaled dot products over the last dim, as in ALP-KD. ``student_h``
    is ``[..., d]`` (tokens ``[b, s, d]`` or pooled ``[b, d]``); ``teacher_hs`` a list of tensors of that shape
    or a stacked ``[L, ...]``. Widths must agree (project first). The result depends on ``student_h`` through
    alpha; as a loss target it keeps its graph (the loss graph's ``target_grad``), so alpha trains the student as
    in GKD's code.
    """
    ts = torch.stack(list(teacher_hs)) if not isinstance(teacher_hs, Tensor) else teacher_hs
    if ts.dim() != student_h.dim() + 1 or ts.shape[1:] != student_h.shape:
        raise RunError(
            f"attend: teacher layers shape {_shape(ts)} must be [L, *student] with student shape "
            f"{_shape(student_h)}"
        )
    scores = (student_h.float()[None] * ts.float()).sum(-1)
    alpha = F.softmax(scores, dim=0)
    return (alpha[..., None] * ts.float()).sum(0).to(student_h.dtype)


def stack(xs: Sequence[Tensor], axis: int = -2) -> Tensor:
    """Stack same-shaped signals on a new axis: ``L x [b, s, h] -> [b, s, L, h]`` with ``axis=-2`` (CKD's
    layer-transforming relations then relate the L states of each position)."""
    if not xs:
        raise RunError("stack: needs at least one input")
    if len({tuple(x.shape) for x in xs}) > 1:
        raise RunError(f"stack: input shapes {', '.join(_shape(x) for x in xs)} differ")
    return torch.stack(list(xs), dim=axis)


def span_bounds(length: int, max_fraction: float, rng: random.Random) -> list[tuple[int, int]]:
    """A random segmentation of positions ``0..length-1`` into contiguous spans (MGSKD's span level).

    Span lengths are drawn uniformly from ``1..max(1, floor(max_fraction * length))`` until the positions are
    covered (the last span is cut at ``length``). ``rng`` decides: callers seed it per step so that every
    ``spans`` op of one step uses the same segmentation.
    """
    if length < 1:
        raise RunError(f"spans: a sequence needs at least one real position, got length {length}")
    longest = max(1, int(math.floor(max_fraction * length)))
    bounds, start = [], 0
    while start < length:
        end = min(length, start + rng.randint(1, longest))
        bounds.append((start, end))
        start = end
    return bounds


def spans(x: Tensor, bounds: Sequence[tuple[int, int]], mask: Tensor | None = None) -> Tensor:
    """``[b, s, h] -> [b, n, h]``: mean of the (real) positions of each span ``[start, end)``."""
    if x.dim() != 3:
        raise RunError(f"spans: input must be [batch, seq, hidden], got {_shape(x)}")
    keep = _check_mask("spans", x, mask)
    if not bounds or bounds[-1][1] > x.shape[1]:
        raise RunError(f"spans: span bounds {list(bounds)[-1:]} do not fit sequence length {x.shape[1]}")
    assign = torch.zeros(len(bounds), x.shape[1], dtype=x.dtype, device=x.device)
    for i, (start, end) in enumerate(bounds):
        assign[i, start:end] = 1
    w = assign[None].expand(x.shape[0], -1, -1)
    if keep is not None:
        w = w * keep[:, None, :].to(x.dtype)
    return (w @ x) / w.sum(-1, keepdim=True).clamp_min(1)


def choose_indices(n: int, k: int, rng: random.Random) -> list[int]:
    """``k`` distinct indices of ``0..n-1`` drawn by ``rng``, ascending (RAIL-KD keeps the depth order)."""
    if not 1 <= k <= n:
        raise RunError(f"choose: cannot choose {k} of {n} items")
    return sorted(rng.sample(range(n), k))


def anneal(t: Tensor, phi: float) -> Tensor:
    """Annealing-KD / Continuation-KD target ``phi * t`` (phi grows to 1 over the stage)."""
    return t * phi
