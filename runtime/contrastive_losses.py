"""Contrastive loss: ``nce`` (InfoNCE of each student row against its teacher row, the other rows, optionally
gathered from every rank, as negatives)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.errors import RunError
from runtime.loss_helpers import _NEG, _check_choice, _f32, _masked_mean, _row_mask, _same_shape, _shape


def nce(
    target: Tensor,
    pred: Tensor,
    *,
    mask: Tensor | None = None,
    tau: float = 0.1,
    similarity: str = "cos",
    gather: bool = False,
) -> Tensor:
    """In-batch contrastive loss (InfoNCE; with ``similarity="cos"`` the COS-NCE of LRC-BERT).

    Inputs ``[b, d]``. For student example i the positive is teacher example i, the negatives are the
    other teacher examples of the batch: ``-log softmax_j(sim(s_i, t_j) / tau)[i]``, mean over anchors.
    ``mask`` ``[b]`` drops examples both as anchors and as negatives. ``gather=True`` takes the negatives
    from the teacher examples of every data-parallel rank (LRC-BERT's global batch); on one rank it is
    the same as ``False``.
    """
    _same_shape("nce", target, pred)
    if pred.dim() != 2:
        raise RunError(f"nce: inputs must be [batch, dim] (pool first), got {_shape(pred)}")
    _check_choice("nce", "similarity", similarity, ("cos", "dot"))
    if tau <= 0:
        raise RunError(f"nce: option tau must be > 0, got {tau}")
    t, s = _f32(target, pred)
    if similarity == "cos":
        t, s = F.normalize(t, dim=-1), F.normalize(s, dim=-1)
    rows = _row_mask("nce", mask, t.shape[:1])
    keys, offset = t, 0
    key_rows = rows
    if gather:
        keys, offset = _gathered(t)
        key_rows = None if rows is None else _gathered(rows)[0]
    scores = s @ keys.T / tau
    if key_rows is not None:
        scores = scores.masked_fill(~key_rows[None, :], _NEG)
    positives = torch.arange(len(s), device=s.device) + offset
    per_anchor = F.cross_entropy(scores, positives, reduction="none")
    return _masked_mean(per_anchor, rows)


def _gathered(x: Tensor) -> tuple[Tensor, int]:
    """``x`` of every data-parallel rank concatenated along dim 0, and where this rank's rows start.

    Only the teacher side (no gradient) is gathered; every rank has the same micro-batch size.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts), dist.get_rank() * x.shape[0]
