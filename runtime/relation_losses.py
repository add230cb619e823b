"""Relation losses of CKD and MGSKD: ``distance`` (pairwise distances) and ``angle`` (triplet angles) between the
teacher's and the student's sets of points, with their pair / triplet selection (windows, attended triplets)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.errors import RunError
from runtime.loss_helpers import _f32, _masked_mean, _row_mask, _shape
from runtime.transforms import relation


def _as_sets(
    name: str, target: Tensor, pred: Tensor, mask: Tensor | None, heads: int | None = None, center: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Views as ``[B, n, d]`` sets of points plus a ``[B, n]`` mask.

    A ``[n, d]`` input is one set; ``[b, s, d]`` is one set of s tokens per example; ``[b, s, L, d]`` (``stack``)
    is one set of L layer states per position, and a ``[b, s]`` mask then selects positions. ``heads``
    splits each side's features into that many relation heads, each a set of its own (MGSKD). Only the
    point layout must agree: teacher and student widths may differ, since relations compare ``n x n``
    structures.
    """
    if target.dim() not in (2, 3, 4) or target.shape[:-1] != pred.shape[:-1]:
        raise RunError(
            f"{name}: target shape {_shape(target)} and pred shape {_shape(pred)} must be [b, s, d], "
            f"[b, s, L, d] or [n, d] with equal leading dims"
        )
    t, s = _f32(target, pred)
    if t.dim() == 2:
        t, s = t[None], s[None]
        mask = None if mask is None else mask[None]
    if t.dim() == 4:
        keep = _row_mask(name, mask, t.shape[:2])
        b, n_pos, n = t.shape[:3]
        keep = None if keep is None else keep.reshape(-1, 1).expand(b * n_pos, n)
        t, s = t.reshape(b * n_pos, n, -1), s.reshape(b * n_pos, n, -1)
    else:
        keep = _row_mask(name, mask, t.shape[:2])
    keep = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if keep is None else keep
    if heads is not None:
        t, s, keep = _split_heads(name, t, heads), _split_heads(name, s, heads), keep.repeat_interleave(heads, 0)
    if center:
        t, s = _centred(t), _centred(s)
    return t, s, keep


def _centred(x: Tensor) -> Tensor:
    """Centring changes no distance or angle but keeps the Gram-matrix identities below well conditioned."""
    return x - x.mean(dim=1, keepdim=True)


def _split_heads(name: str, x: Tensor, heads: int) -> Tensor:
    """``[B, n, d] -> [B * heads, n, d / heads]``: each relation head is a set of its own."""
    B, n, d = x.shape
    if heads < 1 or d % heads:
        raise RunError(f"{name}: option heads={heads} does not divide the width {d}")
    return x.reshape(B, n, heads, d // heads).permute(0, 2, 1, 3).reshape(B * heads, n, d // heads)


def _pair_dist(x: Tensor) -> Tensor:
    """Euclidean distances ``[b, n, n]`` from the Gram matrix (no ``[b, n, n, d]`` intermediate)."""
    gram = x @ x.transpose(1, 2)
    sq = gram.diagonal(dim1=1, dim2=2)
    # clamp before sqrt: exact zeros (the diagonal) would give an infinite gradient
    return (sq[:, :, None] + sq[:, None, :] - 2 * gram).clamp_min(1e-12).sqrt()


def _window_pairs(keep: Tensor, window: int | None) -> Tensor:
    """Valid (i, j) pairs ``[b, n, n]``: both kept, i != j, |i - j| <= window // 2 when a window is set."""
    n = keep.shape[1]
    idx = torch.arange(n, device=keep.device)
    gap = (idx[:, None] - idx[None, :]).abs()
    near = gap > 0
    if window is not None:
        near = near & (gap <= window // 2)
    return keep[:, :, None] & keep[:, None, :] & near


def _normalised(dist: Tensor, pairs: Tensor) -> Tensor:
    """Distances divided by their mean over the example's valid pairs (RKD's scale invariance)."""
    total = torch.where(pairs, dist, dist.new_zeros(())).sum(dim=(1, 2), keepdim=True)
    mean = total / pairs.sum(dim=(1, 2), keepdim=True).clamp_min(1)
    return dist / mean.clamp_min(1e-12)


def _check_window(name: str, window: int | None, topk: int | None = None) -> None:
    if window is not None and window < 2:
        raise RunError(f"{name}: option window must be >= 2, got {window}")
    if topk is not None and topk < 2:
        raise RunError(f"{name}: option topk must be >= 2 (an angle needs two neighbours), got {topk}")
    if window is not None and topk is not None:
        raise RunError(f"{name}: options window and topk exclude each other; give one")


def distance(
    target: Tensor,
    pred: Tensor,
    *,
    mask: Tensor | None = None,
    window: int | None = None,
    beta: float = 1.0,
    heads: int | None = None,
) -> Tensor:
    """Pair-distance relation loss (CKD word relation, RKD distance).

    Per example, the Euclidean distances between every two kept points (tokens of ``[b, s, d]``, or
    examples of a ``[n, d]`` batch) are divided by their mean; the loss is smooth-L1 (``beta``) between
    the teacher's and the student's normalised distances, mean over pairs. ``window`` (CKD: 21) keeps
    only pairs at most ``window // 2`` positions apart; ``heads`` relates each of that many feature slices
    separately (MGSKD's relation heads). See ``_as_sets`` for the accepted shapes.
    """
    _check_window("distance", window)
    t, s, keep = _as_sets("distance", target, pred, mask, heads)
    pairs = _window_pairs(keep, window)
    d_t = _normalised(_pair_dist(t), pairs)
    d_s = _normalised(_pair_dist(s), pairs)
    return _masked_mean(F.smooth_l1_loss(d_s, d_t, beta=beta, reduction="none"), pairs)


def _neighbours(keep: Tensor, window: int | None) -> tuple[Tensor, Tensor]:
    """Per anchor, the candidate neighbour ids ``[b, n, m]`` and whether each is valid: all points by default, or
    the ``window // 2`` positions on each side (CKD)."""
    b, n = keep.shape
    idx = torch.arange(n, device=keep.device)
    if window is None:
        ids = idx.expand(b, n, n)
    else:
        half = window // 2
        offsets = torch.cat([torch.arange(-half, 0), torch.arange(1, half + 1)]).to(keep.device)
        ids = idx[:, None] + offsets[None, :]
        inside = (ids >= 0) & (ids < n)
        ids = ids.clamp(0, n - 1).expand(b, n, len(offsets))
    valid = torch.gather(keep[:, None, :].expand(b, n, n), 2, ids) & (ids != idx[None, :, None])
    if window is not None:
        valid = valid & inside[None]
    return ids, valid


def attended_triplets(x: Tensor, keep: Tensor, k: int, heads: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MGSKD's triplets (Liu et al. 2022): anchors are the ``k`` most attended points, and each anchor's
    neighbours the ``k`` points it attends to most, in the self-attention of ``x`` itself.

    ``x`` ``[B, n, d]`` (the teacher's states) is split into ``heads`` relation heads; per head the attention is
    ``softmax_j(x_i . x_j / sqrt(d / heads))`` over kept keys, with kept queries only. A point's global score is
    the attention it receives, summed over heads and queries; anchor a's local score of j is the attention from
    a to j summed over heads (j != a). Returns (anchor ids ``[B, k1]``, anchor valid, neighbour ids
    ``[B, k1, k2]``, neighbour valid) with k1 = k2 = min(k, n).
    """
    B, n, d = x.shape
    if heads < 1 or d % heads:
        raise RunError(f"angle: option heads={heads} does not divide the width {d}")
    pair = keep[:, None, :, None] & keep[:, None, None, :]
    # MiniLM's self-relation is this per-head attention; padded queries attend to nothing
    probs = relation(x.detach(), heads, keep) * pair  # [B, H, n, n]
    m = min(k, n)
    global_score = probs.sum(dim=(1, 2)).masked_fill(~keep, -math.inf)  # [B, n]: attention received
    top, anchors = global_score.topk(m, dim=-1)
    anchor_ok = top.isfinite()
    local = probs.sum(1)  # [B, n, n]: attention from row to column
    local = local.masked_fill(~keep[:, None, :], -math.inf)
    local = local.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device)[None], -math.inf)
    rows = torch.gather(local, 1, anchors[..., None].expand(B, m, n))  # [B, k1, n]
    near, ids = rows.topk(m, dim=-1)
    return anchors, anchor_ok, ids, near.isfinite()


def _angles(x: Tensor, ids: Tensor, anchors: Tensor | None = None) -> Tensor:
    """cos of the angle at anchor a between neighbours p and q, ``[b, A, m, m]``, via the Gram matrix.

    (x_p - x_a).(x_q - x_a) = G_pq - G_ap - G_aq + G_aa, so no ``[b, n, m, d]`` difference tensor is built.
    ``anchors`` ``[b, A]`` picks the anchors (default: every point, A = n); ``ids`` ``[b, A, m]`` their neighbours.
    """
    b, n_anchor, m = ids.shape
    gram = x @ x.transpose(1, 2)
    bi = torch.arange(b, device=x.device)[:, None, None]
    if anchors is None:
        anchors = torch.arange(n_anchor, device=x.device)[None, :].expand(b, n_anchor)
    g_diag = gram.diagonal(dim1=1, dim2=2)
    g_aa = torch.gather(g_diag, 1, anchors)[:, :, None]
    g_ap = gram[bi, anchors[:, :, None], ids]
    g_pp = gram[bi, ids, ids]
    g_pq = gram[bi[..., None], ids[..., :, None], ids[..., None, :]]
    dots = g_pq - g_ap[..., :, None] - g_ap[..., None, :] + g_aa[..., None]
    sq = (g_pp - 2 * g_ap + g_aa).clamp_min(1e-12)
    return dots / (sq[..., :, None] * sq[..., None, :]).sqrt()


def angle(
    target: Tensor,
    pred: Tensor,
    *,
    mask: Tensor | None = None,
    window: int | None = None,
    topk: int | None = None,
    beta: float = 1.0,
    heads: int | None = None,
    top_k: int | None = None,
) -> Tensor:
    """Triplet-angle relation loss (CKD, MGSKD, RKD angle).

    For an anchor a and two distinct neighbours p, q the cosine of the angle p-a-q is computed on each side;
    the loss is smooth-L1 (``beta``) between teacher and student cosines, mean over triplets. By default every
    kept point is an anchor and its neighbours are all kept points (O(n^3) memory per example), or the points
    within ``window // 2`` of it (CKD); ``heads`` then relates each of that many feature slices separately
    (MGSKD's sample level). ``topk`` (the language's ``top_k``) gives MGSKD's token- and span-level triplets
    (``attended_triplets``): the k most attended points of the *teacher* are the anchors, and the k points each
    anchor attends to most its neighbours, with the attention over ``heads`` relation heads (default 1); the
    angles of those triplets are taken on the whole vectors of both sides.
    """
    if top_k is not None:
        if topk is not None and topk != top_k:
            raise RunError(f"angle: options topk={topk} and top_k={top_k} disagree; give one")
        topk = top_k
    _check_window("angle", window, topk)
    if topk is not None:
        raw_t, raw_s, keep = _as_sets("angle", target, pred, mask, None, center=False)
        anchors, anchor_ok, ids, valid = attended_triplets(raw_t, keep, topk, heads or 1)
        t, s = _centred(raw_t), _centred(raw_s)
        a_t, a_s = _angles(t, ids, anchors), _angles(s, ids, anchors)
        anchor_ok = anchor_ok & torch.gather(keep, 1, anchors)
    else:
        t, s, keep = _as_sets("angle", target, pred, mask, heads)
        ids, valid = _neighbours(keep, window)
        a_t, a_s = _angles(t, ids), _angles(s, ids)
        anchor_ok = keep
    m = ids.shape[-1]
    distinct = ~torch.eye(m, dtype=torch.bool, device=ids.device)
    triplets = anchor_ok[:, :, None, None] & valid[..., :, None] & valid[..., None, :] & distinct
    return _masked_mean(F.smooth_l1_loss(a_s, a_t, beta=beta, reduction="none"), triplets)
