"""Loss kernels: (target, pred, mask, options) -> 0-dim fp32 tensor, registered by name in ``LOSSES``.

Every kernel has the signature ``fn(target, pred, *, mask=None, **options)``. ``target`` is the teacher side
(or the data targets) and is always detached: gradients reach ``pred`` only. ``mask`` is a bool tensor over
positions (``[b, s]`` for token signals, ``[b]`` for per-example ones) selecting the positions that count;
for attention-shaped ``[b, H, s, s]`` inputs a ``[b, s]`` mask selects query rows of every head, and the
``key_mask`` option (``[b, s]``, True = real token) excludes padded keys. All arithmetic is done in fp32,
whatever the input dtype (bf16 logits over a large vocabulary lose too much in a bf16 softmax).

Reductions (a "row" is one position: one token of ``[b, s, x]``, one example of ``[b, x]``, one
(example, head, query) of ``[b, H, s, s]``):

- distribution losses (``kl``, ``soft_ce``, ``jsd``, ``gjsd``, ``sparse_kl``): sum over the last dim, mean over rows;
- element losses (``mse``, ``smooth_l1``, ``hinge_mse``): mean over selected elements;
- ``sse``: sum over the last dim, mean over rows (per-example SSE, independent of batch size);
- ``cos``: mean over rows of ``1 - cos``; ``ce``: mean over rows whose target is not ``ignore_index``;
- ``nce``: mean over anchors; ``distance`` / ``angle``: mean over selected pairs / triplets.

A mask that selects nothing gives a zero loss that is still connected to ``pred`` (no NaN).

Logit losses (``kl``, ``soft_ce``, ``jsd``, ``gjsd``, ``ce``, ``sampled_kl``, ``sparse_kl``) run the row-chunked
kernels of ``runtime/chunked.py`` (gradient computed chunk by chunk in the forward pass, no ``[rows, V]`` fp32
tensor; the student side may be a fused ``HeadLogits``); the autograd formulas they replace are kept as
``dense_*`` (the references of tests and ``bench/loss_memory.py``) and still serve probabilities, log-probs and
key-masked attention maps.
``topk_compress`` / ``sparse_kl`` let a teacher's logits be stored as top-k probabilities plus a tail bucket;
``sampled_kl`` reads a teacher kept as sparse (id, weight) pairs with its exact negative entropy (offline caches).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gkdlang.diagnostics import closest
from runtime.chunked import (KERNELS, HeadLogits, _hard_ce, _log_softmax_ as _log_softmax_inplace, _weighted_nll,
                             chunked_loss, gjsd_kernel, row_weights)
from runtime.errors import RunError
from runtime.loss_helpers import (_NEG, _TARGET_GRAD, _check_choice, _distribution, _f32, _key_mask,  # noqa: F401
                                  _masked_mean, _row_mask, _same_shape, _shape, target_grad)
from runtime.contrastive_losses import nce  # noqa: F401 (re-exported)
from runtime.relation_losses import angle, attended_triplets, distance  # noqa: F401 (re-exported)
from runtime import glmkd_losses as G
from runtime.skew_losses import skew_kl, skew_rkl

LossFn = Callable[..., Tensor]
# ---------------------------------------------------------------- distributions


def _log_dist(name: str, x: Tensor, inputs: str, T: float, keys: Tensor | None) -> Tensor:
    """Log-probabilities over the last dim from logits (with temperature), probs or log-probs."""
    _check_choice(name, "inputs", inputs, ("logits", "probs", "log_probs"))
    if T <= 0:
        raise RunError(f"{name}: option T must be > 0, got {T}")
    if inputs != "logits" and T != 1:
        raise RunError(f"{name}: option T={T} applies to inputs='logits' only (inputs={inputs!r})")
    if inputs == "logits":
        x = x / T
        if keys is not None:
            x = x.masked_fill(~keys, _NEG)
        return F.log_softmax(x, dim=-1)
    # clamps keep log(0) and -inf finite: their gradients would otherwise turn 0 * inf into NaN
    if inputs == "probs":
        return x.clamp_min(torch.finfo(torch.float32).tiny).log()
    return x.clamp_min(_NEG)


def _kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Elementwise p * (log p - log q), with 0 where p == 0 (so padded keys with p = q = 0 add nothing)."""
    p = log_p.exp()
    live, zero = p > 0, p.new_zeros(())
    # the inner wheres keep the discarded branch finite, so its (zero) gradient is not 0 * inf
    return torch.where(live, p * (torch.where(live, log_p, zero) - torch.where(live, log_q, zero)), zero)


def _row_reduce(terms: Tensor, keys: Tensor | None, rows: Tensor | None) -> Tensor:
    if keys is not None:
        terms = torch.where(keys, terms, terms.new_zeros(()))
    return _masked_mean(terms.sum(-1), rows)


def _log_dists(name: str, target: Tensor, pred: Tensor, mask: Tensor | None, key_mask: Tensor | None, T: float,
               inputs: str) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(log p, log q, key mask, row mask) of a distribution loss: both sides at temperature T, in fp32."""
    _same_shape(name, target, pred)
    t, s = _f32(target, pred)
    keys = _key_mask(name, key_mask, t.shape)
    rows = _row_mask(name, mask, t.shape[:-1])
    return _log_dist(name, t, inputs, T, keys), _log_dist(name, s, inputs, T, keys), keys, rows


def dense_kl(
    target: Tensor,
    pred: Tensor,
    *,
    mask: Tensor | None = None,
    T: float = 1.0,
    scale_t2: bool = True,
    reverse: bool = False,
    inputs: str = "logits",
    key_mask: Tensor | None = None,
) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)) per row, mean over rows, times T^2 if ``scale_t2``.

    ``reverse=True`` gives KL(s || t). ``inputs`` says what both tensors hold: ``logits``, ``probs`` or
    ``log_probs`` (attention probabilities and relation matrices, T must be 1).
    """
    log_p, log_q, keys, rows = _log_dists("kl", target, pred, mask, key_mask, T, inputs)
    terms = _kl_terms(log_q, log_p) if reverse else _kl_terms(log_p, log_q)
    return _row_reduce(terms, keys, rows) * (T * T if scale_t2 else 1.0)


def dense_soft_ce(
    target: Tensor,
    pred: Tensor,
    *,
    mask: Tensor | None = None,
    T: float = 1.0,
    scale_t2: bool = False,
    inputs: str = "logits",
    key_mask: Tensor | None = None,
) -> Tensor:
    """-sum softmax(t/T) * log_softmax(s/T) per row, mean over rows (times T^2 if ``scale_t2``)."""
    log_p, log_q, keys, rows = _log_dists("soft_ce", target, pred, mask, key_mask, T, inputs)
    p = log_p.exp()
    live, zero = p > 0, p.new_zeros(())
    terms = torch.where(live, -p * torch.where(live, log_q, zero), zero)
    return _row_reduce(terms, keys, rows) * (T * T if scale_t2 else 1.0)


def dense_jsd(
    target: Tensor,
    pred: Tensor,
    *,
    mask: Tensor | None = None,
    T: float = 1.0,
    scale_t2: bool = False,
    inputs: str = "logits",
    key_mask: Tensor | None = None,
) -> Tensor:
    """Jensen-Shannon divergence 0.5 KL(p||m) + 0.5 KL(q||m), m = (p + q) / 2, per row, mean over rows."""
    log_p, log_q, keys, rows = _log_dists("jsd", target, pred, mask, key_mask, T, inputs)
    # log m computed in log space: avoids log(0) where both p and q underflow
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    terms = 0.5 * _kl_terms(log_p, log_m) + 0.5 * _kl_terms(log_q, log_m)
    return _row_reduce(terms, keys, rows) * (T * T if scale_t2 else 1.0)


def dense_ce(target: Tensor, pred: Tensor, *, mask: Tensor | None = None, ignore_index: int = -100) -> Tensor:
    """Hard cross-entropy of ``pred`` logits ``[b, C]`` / ``[b, s, V]`` against integer ``target``
    ``[b]`` / ``[b, s]``; rows whose target is ``ignore_index`` (or outside ``mask``) do not count."""
    if target.shape != pred.shape[:-1]:
        raise RunError(
            f"ce: target shape {_shape(target)} must equal pred shape {_shape(pred)} without its last dim"
        )
    if target.is_floating_point():
        raise RunError(f"ce: target must hold integer class ids, got dtype {target.dtype}")
    t = target.detach().long()
    rows = t != ignore_index
    given = _row_mask("ce", mask, t.shape)
    if given is not None:
        rows = rows & given
    per_row = F.cross_entropy(
        pred.float().reshape(-1, pred.shape[-1]), t.reshape(-1), ignore_index=ignore_index, reduction="none"
    )
    return _masked_mean(per_row.reshape(t.shape), rows)


def dense_gjsd(
    target: Tensor,
    pred: Tensor,
    *,
    mask: Tensor | None = None,
    beta: float = 0.5,
    T: float = 1.0,
    scale_t2: bool = False,
    inputs: str = "logits",
    key_mask: Tensor | None = None,
) -> Tensor:
    """TRL's generalized JSD (``GKDTrainer.generalized_jsd_loss``) written with autograd: the reference of ``gjsd``."""
    if not 0.0 <= beta <= 1.0:
        raise RunError(f"gjsd: option beta must be in [0, 1], got {beta}")
    log_p, log_q, keys, rows = _log_dists("gjsd", target, pred, mask, key_mask, T, inputs)
    if beta == 0.0:
        terms = _kl_terms(log_p, log_q)
    elif beta == 1.0:
        terms = _kl_terms(log_q, log_p)
    else:
        log_m = torch.logaddexp(log_q + math.log(1.0 - beta), log_p + math.log(beta))
        terms = beta * _kl_terms(log_p, log_m) + (1.0 - beta) * _kl_terms(log_q, log_m)
    return _row_reduce(terms, keys, rows) * (T * T if scale_t2 else 1.0)


# ---------------------------------------------------------------- chunked logit losses (runtime/chunked.py)

Logits = Tensor | HeadLogits


def _chunkable(name: str, pred: Logits, inputs: str, key_mask: Tensor | None) -> bool:
    """Logits without a key mask run chunked; probabilities and attention maps take the dense kernel."""
    if inputs == "logits" and key_mask is None:
        return True
    if isinstance(pred, HeadLogits):
        raise RunError(f"{name}: a fused head gives logits, not inputs={inputs!r} or a key mask")
    return False


def _selected(x: Logits, cols: Tensor | None) -> Logits:
    if cols is None or isinstance(x, HeadLogits):
        return x
    return x.index_select(-1, cols.to(x.device))


def _dense_args(target: Logits, pred: Logits, target_cols, pred_cols) -> tuple[Tensor, Tensor]:
    if isinstance(target, HeadLogits):
        target = target.materialise()
    return _selected(target, target_cols), _selected(pred, pred_cols)


def kl(
    target: Logits,
    pred: Logits,
    *,
    mask: Tensor | None = None,
    T: float = 1.0,
    scale_t2: bool = True,
    reverse: bool = False,
    inputs: str = "logits",
    key_mask: Tensor | None = None,
    target_cols: Tensor | None = None,
    pred_cols: Tensor | None = None,
    chunk: int | None = None,
    mask_keys: bool = True,
    probs_as_logits: bool = False,
) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)) per row, mean over rows, times T^2 if ``scale_t2``.

    ``mask_keys=False`` lets padded keys of attention-shaped inputs count (GKD's MiniLM / MiniLMv2);
    ``probs_as_logits`` softmaxes probabilities once more as if logits (GKD's MiniLM bug). ``reverse=True`` gives KL(s || t). ``inputs`` says what both tensors hold: ``logits`` (chunked kernel,
    runtime/chunked.py), ``probs`` or ``log_probs`` (attention probabilities and relation matrices, T must be 1:
    ``dense_kl``). ``target_cols`` / ``pred_cols`` select vocabulary columns inside the kernel (GLMD's
    compressed vocabulary); ``chunk`` overrides the rows per chunk.
    """
    key_mask, inputs = (key_mask if mask_keys else None), ("logits" if probs_as_logits else inputs)
    if not _chunkable("kl", pred, inputs, key_mask):
        t, s = _dense_args(target, pred, target_cols, pred_cols)
        return dense_kl(t, s, mask=mask, T=T, scale_t2=scale_t2, reverse=reverse, inputs=inputs, key_mask=key_mask)
    kernel = KERNELS["kl_reverse" if reverse else "kl"]
    return _distribution("kl", kernel, target, pred, mask, T, T * T if scale_t2 else 1.0, target_cols, pred_cols,
                         chunk)


def soft_ce(
    target: Logits,
    pred: Logits,
    *,
    mask: Tensor | None = None,
    T: float = 1.0,
    scale_t2: bool = False,
    inputs: str = "logits",
    key_mask: Tensor | None = None,
    target_cols: Tensor | None = None,
    pred_cols: Tensor | None = None,
    chunk: int | None = None,
) -> Tensor:
    """-sum softmax(t/T) * log_softmax(s/T) per row, mean over rows (times T^2 if ``scale_t2``); chunked on logits."""
    if not _chunkable("soft_ce", pred, inputs, key_mask):
        t, s = _dense_args(target, pred, target_cols, pred_cols)
        return dense_soft_ce(t, s, mask=mask, T=T, scale_t2=scale_t2, inputs=inputs, key_mask=key_mask)
    return _distribution("soft_ce", KERNELS["soft_ce"], target, pred, mask, T, T * T if scale_t2 else 1.0,
                         target_cols, pred_cols, chunk)


def jsd(
    target: Logits,
    pred: Logits,
    *,
    mask: Tensor | None = None,
    T: float = 1.0,
    scale_t2: bool = False,
    inputs: str = "logits",
    key_mask: Tensor | None = None,
    target_cols: Tensor | None = None,
    pred_cols: Tensor | None = None,
    chunk: int | None = None,
) -> Tensor:
    """Jensen-Shannon divergence 0.5 KL(p||m) + 0.5 KL(q||m), m = (p + q) / 2, per row, mean over rows."""
    if not _chunkable("jsd", pred, inputs, key_mask):
        t, s = _dense_args(target, pred, target_cols, pred_cols)
        return dense_jsd(t, s, mask=mask, T=T, scale_t2=scale_t2, inputs=inputs, key_mask=key_mask)
    return _distribution("jsd", KERNELS["jsd"], target, pred, mask, T, T * T if scale_t2 else 1.0, target_cols,
                         pred_cols, chunk)


def gjsd(
    target: Logits,
    pred: Logits,
    *,
    mask: Tensor | None = None,
    beta: float = 0.5,
    T: float = 1.0,
    scale_t2: bool = False,
    inputs: str = "logits",
    key_mask: Tensor | None = None,
    target_cols: Tensor | None = None,
    pred_cols: Tensor | None = None,
    chunk: int | None = None,
) -> Tensor:
    """Generalized JSD with TRL's parameterisation (``GKDTrainer.generalized_jsd_loss``), p the teacher's and q the
    student's softmax(x / T): ``beta`` 0 is KL(p || q) (forward), 1 is KL(q || p) (reverse), and in between
    beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q (so, as in TRL, the value does not
    tend to the endpoints' KL as beta tends to 0 or 1). Sum over the vocabulary, mean over the rows that count
    (TRL's ``batchmean`` with labels); no T^2 unless ``scale_t2``."""
    kernel = gjsd_kernel(float(beta))
    if not _chunkable("gjsd", pred, inputs, key_mask):
        t, s = _dense_args(target, pred, target_cols, pred_cols)
        return dense_gjsd(t, s, mask=mask, beta=beta, T=T, scale_t2=scale_t2, inputs=inputs, key_mask=key_mask)
    return _distribution("gjsd", kernel, target, pred, mask, T, T * T if scale_t2 else 1.0, target_cols, pred_cols,
                         chunk)


def ce(target: Tensor, pred: Logits, *, mask: Tensor | None = None, ignore_index: int = -100,
       chunk: int | None = None) -> Tensor:
    """Hard cross-entropy of ``pred`` logits ``[b, C]`` / ``[b, s, V]`` against integer ``target``
    ``[b]`` / ``[b, s]``; rows whose target is ``ignore_index`` (or outside ``mask``) do not count. Chunked."""
    if tuple(target.shape) != tuple(pred.shape[:-1]):
        raise RunError(
            f"ce: target shape {_shape(target)} must equal pred shape {_shape(pred)} without its last dim"
        )
    if target.is_floating_point():
        raise RunError(f"ce: target must hold integer class ids, got dtype {target.dtype}")
    t = target.detach().long().reshape(-1)
    keep = t != ignore_index
    given = _row_mask("ce", mask, target.shape)
    if given is not None:
        keep = keep & given.reshape(-1)
    vocab = pred.shape[-1]
    bad = keep & ((t < 0) | (t >= vocab))
    if bool(bad.any()):
        raise RunError(f"ce: target id {int(t[bad][0])} is outside the {vocab} classes of pred")
    ids = torch.where(keep, t, torch.zeros_like(t))
    weights = row_weights(tuple(target.shape), keep, 1.0, pred.device)
    return chunked_loss(_hard_ce, pred, None, row_w=weights, extra=lambda r0, r1: ids[r0:r1], chunk=chunk)


# ---------------------------------------------------------------- regression


def _element_keep(name: str, shape: torch.Size, mask: Tensor | None, key_mask: Tensor | None) -> Tensor | None:
    rows = _row_mask(name, mask, shape[:-1])
    keys = _key_mask(name, key_mask, shape)
    keep = None if rows is None else rows[..., None]
    if keys is not None:
        keep = keys if keep is None else keep & keys
    return keep


def mse(target: Tensor, pred: Tensor, *, mask: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
    """Mean squared error over the selected elements."""
    _same_shape("mse", target, pred)
    t, s = _f32(target, pred)
    return _masked_mean((s - t) ** 2, _element_keep("mse", t.shape, mask, key_mask))


def smooth_l1(
    target: Tensor,
    pred: Tensor,
    *,
    mask: Tensor | None = None,
    beta: float = 1.0,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Huber-style smooth L1 (quadratic below ``beta``) over the selected elements."""
    _same_shape("smooth_l1", target, pred)
    t, s = _f32(target, pred)
    values = F.smooth_l1_loss(s, t, beta=beta, reduction="none")
    return _masked_mean(values, _element_keep("smooth_l1", t.shape, mask, key_mask))


def hinge_mse(
    target: Tensor,
    pred: Tensor,
    *,
    mask: Tensor | None = None,
    margin: float = 0.0,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Continuation-KD's margin MSE: mean of max(0, |s - t| - margin)^2 over the selected elements.

    Differences inside the margin cost nothing, so early in training (large margin) the student fits
    only the teacher's coarse shape; the margin schedule and the phi-annealed target (``anneal``) come
    from the caller. ``margin=0`` is exactly ``mse``.
    """
    _same_shape("hinge_mse", target, pred)
    if margin < 0:
        raise RunError(f"hinge_mse: option margin must be >= 0, got {margin}")
    t, s = _f32(target, pred)
    values = F.relu((s - t).abs() - margin) ** 2
    return _masked_mean(values, _element_keep("hinge_mse", t.shape, mask, key_mask))


def sse(target: Tensor, pred: Tensor, *, mask: Tensor | None = None, total: bool = False) -> Tensor:
    """RAIL-KD's sum of squared errors: sum over the last dim, mean over rows (``total``: summed over the rows too,
    as GKD's RAIL-KD sums over its micro-batch)."""
    _same_shape("sse", target, pred)
    t, s = _f32(target, pred)
    keep = _row_mask("sse", mask, t.shape[:-1])
    per = ((s - t) ** 2).sum(-1)
    return (per if keep is None else torch.where(keep, per, per.new_zeros(()))).sum() if total else _masked_mean(per, keep)


def cos(target: Tensor, pred: Tensor, *, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """1 - cosine similarity along the last dim, mean over rows (DistilBERT's hidden-state loss)."""
    _same_shape("cos", target, pred)
    t, s = _f32(target, pred)
    return _masked_mean(1 - F.cosine_similarity(s, t, dim=-1, eps=eps), _row_mask("cos", mask, t.shape[:-1]))


# ---------------------------------------------------------------- sparse teacher distributions


class TopK(NamedTuple):
    """A teacher distribution kept as its top-k probabilities (at temperature T) plus the rest's mass."""

    values: Tensor
    """``[..., k]`` fp32 probabilities, descending."""
    indices: Tensor
    """``[..., k]`` vocabulary ids of ``values``."""
    tail_mass: Tensor
    """``[...]`` 1 - sum(values): probability of every other token together."""


def topk_compress(teacher_logits: Tensor, k: int, T: float = 1.0) -> TopK:
    """Keep the ``k`` most probable tokens of softmax(teacher_logits / T) and the remaining mass."""
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise RunError(f"topk_compress: k must be in 1..{vocab} (the vocabulary size), got {k}")
    probs = F.softmax(teacher_logits.detach().float() / T, dim=-1)
    values, indices = probs.topk(k, dim=-1)
    # the tail summed from its own entries: 1 - sum(top-k) cancels in fp32 (a tail of 8e-8 came out 0, and the
    # bucket KL then exceeded the dense KL it bounds from below)
    return TopK(values, indices, probs.scatter(-1, indices, 0.0).sum(-1))


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012)."""
    near = x > -math.log(2)
    # each branch gets an input that is safe for it, so the unused branch has a finite gradient
    a = torch.log(-torch.expm1(torch.where(near, x, x.new_full((), -1.0)).clamp_max(-1e-30)))
    b = torch.log1p(-torch.exp(torch.where(near, x.new_full((), -1.0), x)))
    return torch.where(near, a, b)


def dense_sparse_kl(
    topk_values: Tensor,
    topk_indices: Tensor,
    tail_mass: Tensor,
    pred_logits: Tensor,
    T: float = 1.0,
    *,
    mask: Tensor | None = None,
    scale_t2: bool = True,
) -> Tensor:
    """KL from a top-k teacher to the student's full softmax(pred_logits / T), bucket form.

    The teacher is a distribution over k + 1 outcomes: its k kept tokens and one "tail" bucket holding
    ``tail_mass``. The student's softmax is coarse-grained the same way (its tail = the mass of every
    token outside the teacher's top k), and the KL is taken between the two (k + 1)-outcome
    distributions: sum_i p_i log(p_i / q_i) + p_tail log(p_tail / q_tail). With k = V the tail is empty
    and this is exactly the dense ``kl``; otherwise it is a lower bound on it (coarse-graining never
    increases KL), tight when the teacher's tail is small. ``T`` must be the one given to
    ``topk_compress``. Mean over rows, times T^2 if ``scale_t2``.
    """
    if topk_values.shape != topk_indices.shape or topk_values.shape[:-1] != pred_logits.shape[:-1]:
        raise RunError(
            f"sparse_kl: top-k values {_shape(topk_values)}, indices {_shape(topk_indices)} and pred shape "
            f"{_shape(pred_logits)} must agree on all but the last dim"
        )
    if tail_mass.shape != topk_values.shape[:-1]:
        raise RunError(f"sparse_kl: tail_mass shape {_shape(tail_mass)} must be {list(topk_values.shape[:-1])}")
    p = topk_values.detach().float()
    p_tail = tail_mass.detach().float()
    log_q_all = F.log_softmax(pred_logits.float() / T, dim=-1)
    log_q = log_q_all.gather(-1, topk_indices.detach().long())
    live_tail = p_tail > 0
    # the student's tail summed over its own tokens: 1 - (its mass on the top k) cancels in fp32 when that mass is
    # close to 1. An empty tail (k = V) is left out of the graph (its log mass would be -inf).
    top = torch.zeros_like(log_q_all, dtype=torch.bool).scatter_(-1, topk_indices.detach().long(), True)
    tail_lse = torch.logsumexp(log_q_all.masked_fill(top & live_tail[..., None], -math.inf), dim=-1)
    log_q_tail = torch.where(live_tail, tail_lse, p_tail.new_full((), -1.0))
    head = _kl_terms(p.clamp_min(1e-30).log().masked_fill(p <= 0, -math.inf), log_q).sum(-1)
    tail = _kl_terms(p_tail.clamp_min(1e-30).log().masked_fill(~live_tail, -math.inf), log_q_tail)
    rows = _row_mask("sparse_kl", mask, p.shape[:-1])
    return _masked_mean(head + tail, rows) * (T * T if scale_t2 else 1.0)


def _bucket_rows(x: Tensor, y: Tensor | None, extra) -> tuple[Tensor, Tensor]:
    """Row kernel of the bucket-form KL (see ``dense_sparse_kl``). With Q the student's mass on the teacher's top
    k (ids distinct), q_T = 1 - Q and P the teacher's: d loss / d x_j = q_j (P - (p_T / q_T) Q) off the top and
    q_j (P + p_T) - p_j on it."""
    ids, p, p_tail = extra
    q = _log_softmax_inplace(x)
    log_q = x.gather(-1, ids)
    live = p_tail > 0
    q_top = q.gather(-1, ids)
    # q_T summed over the tail's own tokens (in place: the top ids zeroed, then restored), not 1 - Q, which
    # cancels in fp32 when the student's top-k mass Q is close to 1
    q_tail = q.scatter_(-1, ids, 0.0).sum(-1)
    q.scatter_(-1, ids, q_top)
    log_q_tail = torch.where(live, q_tail.clamp_min(torch.finfo(torch.float32).tiny).log(), p_tail.new_zeros(()))
    head = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - log_q), p.new_zeros(())).sum(-1)
    tail = torch.where(live, p_tail * (p_tail.clamp_min(1e-30).log() - log_q_tail), p_tail.new_zeros(()))
    ratio = torch.where(live, p_tail / log_q_tail.exp(), p_tail.new_zeros(()))
    # on the top ids (p_T / q_T) q_j (1 - Q) is exactly p_T q_j: written so, nothing large has to cancel
    grad = q.mul_((p.sum(-1) - ratio * q_top.sum(-1))[:, None])
    grad.scatter_(-1, ids, q_top * (p.sum(-1) + p_tail)[:, None] - p)
    return head + tail, grad


def sparse_kl(
    topk_values: Tensor,
    topk_indices: Tensor,
    tail_mass: Tensor,
    pred_logits: Logits,
    T: float = 1.0,
    *,
    mask: Tensor | None = None,
    scale_t2: bool = True,
    chunk: int | None = None,
) -> Tensor:
    """KL from a top-k teacher to the student's full softmax(pred_logits / T), bucket form, chunked over rows:
    the value and gradient of ``dense_sparse_kl`` (see there) without a V-sized fp32 tensor."""
    if tuple(topk_values.shape) != tuple(topk_indices.shape) or \
            tuple(topk_values.shape[:-1]) != tuple(pred_logits.shape[:-1]):
        raise RunError(
            f"sparse_kl: top-k values {_shape(topk_values)}, indices {_shape(topk_indices)} and pred shape "
            f"{_shape(pred_logits)} must agree on all but the last dim"
        )
    if tail_mass.shape != topk_values.shape[:-1]:
        raise RunError(f"sparse_kl: tail_mass shape {_shape(tail_mass)} must be {list(topk_values.shape[:-1])}")
    k = topk_values.shape[-1]
    p = topk_values.detach().float().reshape(-1, k)
    ids = topk_indices.detach().long().reshape(-1, k)
    tail = tail_mass.detach().float().reshape(-1)
    lead = tuple(pred_logits.shape[:-1])
    rows = row_weights(lead, _row_mask("sparse_kl", mask, torch.Size(lead)), T * T if scale_t2 else 1.0,
                       pred_logits.device)
    return chunked_loss(_bucket_rows, pred_logits, None, row_w=rows, T=float(T), chunk=chunk,
                        extra=lambda r0, r1: (ids[r0:r1], p[r0:r1], tail[r0:r1]))


_FREE_BUFFERS: dict[tuple, list[Tensor]] = {}
"""V-sized fp32 work buffers of ``_WeightedNLL``, reused across steps: a fresh 100 MB tensor costs more in page
faults than the arithmetic done in it. A buffer is taken by a forward and given back by its backward, after
which it is only the gradient flowing into the op that made the logits (the student's head), consumed before any
later forward. Logits that are a leaf or retain their gradient would keep the buffer as ``.grad``: they get a
buffer of their own."""


def _take_buffer(like: Tensor) -> Tensor:
    free = _FREE_BUFFERS.get((tuple(like.shape), like.device))
    return free.pop() if free else torch.empty(like.shape, dtype=torch.float32, device=like.device)


def _give_back(buf: Tensor) -> None:
    free = _FREE_BUFFERS.setdefault((tuple(buf.shape), buf.device), [])
    if len(free) < 2:
        free.append(buf)


class _WeightedNLL(torch.autograd.Function):
    """Per row: sum_j w_j * (logsumexp(x) - x[ids_j]) with x = z / T, without a dense V-sized teacher tensor.

    One V-sized work buffer per call (no other V-sized tensor is allocated): forward leaves exp(x - max x) in it,
    backward turns it in place into ((sum_j w_j) softmax(x) - scatter(w)) * g / T, the gradient of
    -sum_j w_j log q_j w.r.t. z. Autograd through log_softmax + gather allocates four V-sized tensors.
    """

    @staticmethod
    def forward(ctx, z: Tensor, ids: Tensor, w: Tensor, T: float, pooled: bool) -> Tensor:
        ctx.pooled = pooled
        buf = _take_buffer(z) if ctx.pooled else torch.empty(z.shape, dtype=torch.float32, device=z.device)
        x = z.detach()
        if T != 1.0:
            torch.div(x, T, out=buf)
            x = buf
        top = x.amax(-1, keepdim=True)
        picked = x.gather(-1, ids)  # before buf (which may hold x) is overwritten
        torch.sub(x, top, out=buf)
        buf.exp_()
        total = buf.sum(-1, keepdim=True)
        lse = top.float() + total.log()
        rows = (w * (lse - picked.float())).sum(-1)
        ctx.save_for_backward(buf, total, ids, w)
        ctx.T, ctx.z_dtype = T, z.dtype
        ctx.mark_non_differentiable(ids)
        return rows

    @staticmethod
    def backward(ctx, g: Tensor):
        buf, total, ids, w = ctx.saved_tensors
        scale = (g / ctx.T)[..., None]
        buf.mul_(scale * w.sum(-1, keepdim=True) / total)  # softmax(x) * sum(w) * g / T
        buf.scatter_add_(-1, ids, -(w * scale))
        grad = buf.to(ctx.z_dtype)
        if ctx.pooled:
            _give_back(buf)  # read by the head's backward before any later forward takes it
        return grad, None, None, None, None


def _poolable(logits: Tensor) -> bool:
    """Whether the gradient of ``logits`` flows on into the op that made them (not kept as some tensor's .grad)."""
    base = logits._base if logits._base is not None else logits
    return not (logits.is_leaf or base.is_leaf or logits.retains_grad or base.retains_grad)


def dense_sampled_kl(
    weights: Tensor,
    ids: Tensor,
    neg_entropy: Tensor,
    pred_logits: Tensor,
    T: float = 1.0,
    *,
    mask: Tensor | None = None,
    scale_t2: bool = True,
) -> Tensor:
    """KL from a teacher kept as sparse (token id, weight) pairs plus its exact negative entropy.

    Per row, ``weights`` [..., J] on ``ids`` [..., J] are a sparse target whose expectation is the teacher's
    p = softmax(t / T) (its top-k probabilities, then tail samples drawn from p_tail / tail_mass weighing
    tail_mass / m each; ids may repeat), and ``neg_entropy`` [...] is sum_i p_i log p_i. The row's value
    neg_entropy - sum_j w_j log q_j, q = softmax(pred_logits / T), is an unbiased estimate of KL(p || q), and
    its gradient w.r.t. the student's logits, ((sum_j w_j) q - w) / T, of the dense gradient (q - p) / T. With
    every token listed at its probability (k = V) it is the dense ``kl`` exactly. Mean over rows, times T^2 if
    ``scale_t2``.
    """
    if T <= 0:
        raise RunError(f"sampled_kl: option T must be > 0, got {T}")
    if weights.shape != ids.shape or weights.shape[:-1] != pred_logits.shape[:-1] or \
            neg_entropy.shape != weights.shape[:-1]:
        raise RunError(
            f"sampled_kl: weights {_shape(weights)}, ids {_shape(ids)}, neg_entropy {_shape(neg_entropy)} and pred "
            f"shape {_shape(pred_logits)} must agree on all but the last dim"
        )
    vocab = pred_logits.shape[-1]
    lead = pred_logits.shape[:-1]
    z = pred_logits.reshape(-1, vocab)
    w = weights.detach().float().reshape(-1, weights.shape[-1])
    ids_flat = ids.detach().long().reshape(-1, ids.shape[-1])
    nll = _WeightedNLL.apply(z, ids_flat, w, float(T), _poolable(pred_logits)).reshape(lead)
    rows = _row_mask("sampled_kl", mask, lead)
    return _masked_mean(neg_entropy.detach().float() + nll, rows) * (T * T if scale_t2 else 1.0)


def sampled_kl(
    weights: Tensor,
    ids: Tensor,
    neg_entropy: Tensor,
    pred_logits: Logits,
    T: float = 1.0,
    *,
    mask: Tensor | None = None,
    scale_t2: bool = True,
    chunk: int | None = None,
) -> Tensor:
    """KL from a teacher kept as sparse (token id, weight) pairs plus its exact negative entropy, chunked over rows.

    The same value and gradient as ``dense_sampled_kl`` (see there), with no V-sized buffer beyond the gradient
    of the student's logits (or none at all for a fused head).
    """
    if T <= 0:
        raise RunError(f"sampled_kl: option T must be > 0, got {T}")
    lead = tuple(pred_logits.shape[:-1])
    if tuple(weights.shape) != tuple(ids.shape) or tuple(weights.shape[:-1]) != lead or \
            tuple(neg_entropy.shape) != tuple(weights.shape[:-1]):
        raise RunError(
            f"sampled_kl: weights {_shape(weights)}, ids {_shape(ids)}, neg_entropy {_shape(neg_entropy)} and pred "
            f"shape {_shape(pred_logits)} must agree on all but the last dim"
        )
    w = weights.detach().float().reshape(-1, weights.shape[-1])
    ids_flat = ids.detach().long().reshape(-1, ids.shape[-1])
    const = neg_entropy.detach().float().reshape(-1)
    rows = row_weights(lead, _row_mask("sampled_kl", mask, torch.Size(lead)), T * T if scale_t2 else 1.0,
                       pred_logits.device)
    return chunked_loss(_weighted_nll, pred_logits, None, row_w=rows, T=float(T), chunk=chunk,
                        extra=lambda r0, r1: (ids_flat[r0:r1], w[r0:r1], const[r0:r1]))


def _sparse_kl_entry(
    target: TopK, pred: Tensor, *, mask: Tensor | None = None, T: float = 1.0, scale_t2: bool = True
) -> Tensor:
    """Registry form of ``sparse_kl``: the target is the ``TopK`` from ``topk_compress``."""
    if not isinstance(target, tuple) or len(target) != 3:
        raise RunError("sparse_kl: target must be the (values, indices, tail_mass) from topk_compress")
    values, indices, tail = target
    return sparse_kl(values, indices, tail, pred, T, mask=mask, scale_t2=scale_t2)


# ---------------------------------------------------------------- registry

LOSSES: dict[str, LossFn] = {
    "kl": kl,
    "soft_ce": soft_ce,
    "ce": ce,
    "mse": mse,
    "smooth_l1": smooth_l1,
    "cos": cos,
    "jsd": jsd,
    "gjsd": gjsd,
    "skew_kl": skew_kl,
    "skew_rkl": skew_rkl,
    "nce": nce,
    "sse": sse,
    "hinge_mse": hinge_mse,
    "angle": angle,
    "distance": distance,
    "sparse_kl": _sparse_kl_entry,
    "gated_mse": G.gated_mse,
    "ckd_distance": G.ckd_distance,
    "ckd_angle": G.ckd_angle,
    "mgskd_token": G.mgskd_token,
    "mgskd_sample": G.mgskd_sample,
    "cos_nce": G.cos_nce,
}


def _did_you_mean(word: str, choices) -> str:
    close = closest(word, choices)
    return f"; did you mean {close!r}?" if close else ""


def get_loss(name: str) -> LossFn:
    """The kernel registered as ``name``, or a RunError naming the closest known loss."""
    if name not in LOSSES:
        raise RunError(f"unknown loss {name!r}{_did_you_mean(name, LOSSES)} (known: {', '.join(sorted(LOSSES))})")
    return LOSSES[name]


def loss_options(name: str) -> frozenset[str]:
    """Option names the kernel ``name`` accepts (besides target, pred and mask)."""
    params = inspect.signature(get_loss(name)).parameters
    return frozenset(p for p, v in params.items() if v.kind is v.KEYWORD_ONLY and p != "mask")


def check_options(name: str, options) -> None:
    """Fail before training if a loss term passes an option its kernel does not take."""
    accepted = loss_options(name)
    for key in options:
        if key not in accepted:
            raise RunError(
                f"loss {name!r} has no option {key!r}{_did_you_mean(key, accepted)} "
                f"(options: {', '.join(sorted(accepted)) or 'none'})"
            )


def compute_loss(name: str, target, pred: Tensor, *, mask: Tensor | None = None, **options) -> Tensor:
    """Look up ``name``, check ``options`` and run the kernel."""
    check_options(name, options)
    return get_loss(name)(target, pred, mask=mask, **options)
