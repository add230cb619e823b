"""Loss kernels that compute what GKD's own code (GitHub aitsc/GLMKD at 8d6cf11) computes where a method's
reference computation has no equivalent among the general kernels: registered in ``runtime/losses.py``'s
``LOSSES`` like the others, each parity-tested against a transcription of GLMKD's code
(``tests/test_methods_parity.py``) and against a naive formula (``tests/test_glmkd_losses.py``).

Same conventions as ``runtime/losses.py``: ``fn(target, pred, *, mask=None, **options)``, the target detached
(unless ``target_grad``), fp32 arithmetic, a mask selecting nothing gives a zero still connected to ``pred``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.errors import RunError
from runtime.loss_helpers import _NEG, _f32, _masked_mean, _row_mask, _same_shape, _shape


def gated_mse(target: Tensor, pred: Tensor, *, mask: Tensor | None = None, margin: float = 0.0) -> Tensor:
    """Continuation-KD as GKD computes it (distill_model.py:2230-2245): each row's MSE (mean over the last dim)
    counts only when it exceeds ``margin``, otherwise 0; the mean over the selected rows, gated ones included.

    The gate is all-or-nothing per row (an example just above the margin adds its whole error), unlike
    ``hinge_mse``'s per-element hinge; its gradient is the MSE's on the rows that pass.
    """
    _same_shape("gated_mse", target, pred)
    if margin < 0:
        raise RunError(f"gated_mse: option margin must be >= 0, got {margin}")
    t, s = _f32(target, pred)
    per = ((s - t) ** 2).mean(-1) if s.dim() else (s - t) ** 2
    keep = _row_mask("gated_mse", mask, per.shape)
    gated = torch.where(per > margin, per, per.new_zeros(()))
    return _masked_mean(gated, keep)


# ---------------------------------------------------------------- CKD as the CKD authors' loss.py computes it


def _ckd_sets(name: str, target: Tensor, pred: Tensor, mask: Tensor | None,
              layers: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``[b, s, d]`` or stacked ``[b, s, L, d]`` -> sets ``[b, G, n, d]`` and each set's validity ``[b, G, n]``.

    Word relations (``layers`` false): per (example, layer) the set of s tokens, padded ones invalid. Layer
    relations (``layers`` true, needs a stack): per (example, position) the set of L states, all of them valid
    at a real position and none at a padded one (the authors' ``make_mask``).
    """
    if target.dim() not in (3, 4) or target.shape[:-1] != pred.shape[:-1]:
        raise RunError(f"{name}: target shape {_shape(target)} and pred shape {_shape(pred)} must be [b, s, d] or "
                       f"stacked [b, s, L, d] with equal leading dims")
    if layers and target.dim() != 4:
        raise RunError(f"{name}: layers: true relates the states of stacked layers; give stack([...]) inputs")
    t, s = _f32(target, pred)
    if t.dim() == 3:
        t, s = t[:, :, None], s[:, :, None]
    b, n_pos, n_layers = t.shape[:3]
    real = _row_mask(name, mask, torch.Size((b, n_pos)))
    real = torch.ones(b, n_pos, dtype=torch.bool, device=t.device) if real is None else real
    if layers:
        return t, s, real[:, :, None].expand(b, n_pos, n_layers)
    return t.transpose(1, 2), s.transpose(1, 2), real[:, None, :].expand(b, n_layers, n_pos)


def ckd_distance(target: Tensor, pred: Tensor, *, mask: Tensor | None = None, layers: bool = False) -> Tensor:
    """CKD's distance relation as its authors' ``loss.py`` computes it (``WR_Dist`` / ``LTR_Dist`` with
    ``distance='cos', lossfunc='kldiv'``, GKD's ``cite/ckd.py``): in each set, every item's cosine similarities
    to the others (itself and invalid items excluded) are softmaxed; KL(teacher || student) summed over every
    row and divided by the number of valid (item, item) pairs, the diagonal included.

    Word relations (``layers`` false) relate the tokens of each layer of ``[b, s, d]`` or of a stack ``[b, s, L, d]``
    (one mean over all layers); ``layers: true`` relates the L stacked states of each real position. An entry whose
    teacher probability is 0 adds 0 (torch 1.9's ``kl_div``, which GKD ran: newer torch gives NaN there).
    """
    t, s, valid = _ckd_sets("ckd_distance", target, pred, mask, layers)
    n = t.shape[-2]
    pairs = valid[..., :, None] & valid[..., None, :]
    live = pairs & ~torch.eye(n, dtype=torch.bool, device=t.device)

    def logits(x: Tensor) -> Tensor:
        x = F.normalize(x, p=2, dim=-1)
        return (x @ x.transpose(-1, -2)).masked_fill(~live, _NEG)

    log_p = F.log_softmax(logits(t), dim=-1)
    log_q = F.log_softmax(logits(s), dim=-1)
    p = log_p.exp()
    terms = torch.where(live & (p > 0), p * (log_p - log_q), log_q.new_zeros(()))
    return terms.sum() / pairs.sum().clamp_min(1)


def _window_index(n: int, window: int, device) -> Tensor:
    half = (window - 1) // 2
    return (torch.arange(n, device=device)[:, None] + torch.arange(-half, half + 1, device=device)).clamp(0, n - 1)


def ckd_angle(target: Tensor, pred: Tensor, *, mask: Tensor | None = None, window: int | None = None,
              layers: bool = False) -> Tensor:
    """CKD's angle relation as its authors' ``loss.py`` computes it (``WR_Angle_window`` / ``WR_Angle`` /
    ``LTR_Angle`` with ``l2loss``): the cosine of the angle at item i between items j and k,
    ``<n(x_j - x_i), n(x_k - x_i)>``; squared error summed over the counted triplets and divided by their number.

    Word relations with ``window`` (odd; CKD: 21): j and k range over the window centred on i (positions clamped
    to the row, padded neighbours included), a triplet counted when i is real; without a window every (i, j, k)
    of real tokens. ``layers: true``: every (i, j, k) of the stacked layers of a real position.
    """
    if window is not None and (window < 1 or window % 2 == 0):
        raise RunError(f"ckd_angle: option window must be odd (a window centred on each token), got {window}")
    if window is not None and layers:
        raise RunError("ckd_angle: window relates tokens; it does not apply with layers: true")
    t, s, valid = _ckd_sets("ckd_angle", target, pred, mask, layers)
    n = t.shape[-2]
    if window is not None:
        idx = _window_index(n, window, t.device)

        def angles(x: Tensor) -> Tensor:
            sub = F.normalize(x[..., :, None, :] - x[..., idx, :], p=2, dim=-1)  # [b, G, n, w, d]
            return sub @ sub.transpose(-1, -2)

        keep = valid[..., None, None].expand(*valid.shape, window, window)
    else:
        def angles(x: Tensor) -> Tensor:
            sub = F.normalize(x[..., None, :, :] - x[..., :, None, :], p=2, dim=-1)  # [.., i, j]: x_j - x_i
            return sub @ sub.transpose(-1, -2)

        keep = valid[..., :, None, None] & valid[..., None, :, None] & valid[..., None, None, :]
    diff = (angles(s) - angles(t)) ** 2
    return torch.where(keep, diff, diff.new_zeros(())).sum() / keep.sum().clamp_min(1)


# ---------------------------------------------------------------- MGSKD as its authors' loss.py computes it


def glmkd_span_lengths(n: int, rate: float, gen: torch.Generator) -> list[int]:
    """GKD's MGSKD spans (distill_model.py:1220-1228): ``int(n x rate)`` spans (the rate sets their number) of the
    whole padded row, of lengths 1 + floor(|N(0, 1)| share of n - count), the rounding deficit added to the last
    ones. Two guards GKD lacks: at least one span, and no deficit (possible only if every share is whole) adds
    nothing (GKD's ``a[0:] += 1`` would overrun the row)."""
    count = max(1, min(n, int(n * rate)))
    a = torch.randn(count, generator=gen).abs()
    a = (a / a.sum() * (n - count)).int() + 1
    deficit = n - int(a.sum())
    if deficit > 0:
        a[count - deficit:] += 1
    return a.tolist()


def _mgskd_pairs(x: Tensor, ext: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """Per relation head the scaled dot products ``[b, H, n, n]`` (masked pairs 0) and their masked softmax."""
    b, n, d = x.shape
    xh = x.reshape(b, n, heads, d // heads).permute(0, 2, 1, 3)
    scores = (xh @ xh.transpose(-1, -2)) / math.sqrt(d // heads) * ext
    return scores, F.softmax(scores + (1.0 - ext) * -10000.0, dim=-1) * ext


def _mgskd_angles(x: Tensor, anchors: Tensor, near: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
    """Angles ``[b, k1, k2, k2]`` at each anchor between its neighbours (whole vectors) and the triplets counted:
    anchor and both neighbours real, two different neighbours, the angle not exactly 0."""
    b, k1, k2 = near.shape
    d = x.shape[-1]
    a = x.gather(1, anchors[:, :, None].expand(b, k1, d))
    nb = x.gather(1, near.reshape(b, k1 * k2, 1).expand(b, k1 * k2, d)).reshape(b, k1, k2, d)
    sub = F.normalize(a[:, :, None, :] - nb, p=2, dim=-1)
    angle = sub @ sub.transpose(-1, -2)
    r_a = real.gather(1, anchors)[:, :, None, None]
    r_n = real.gather(1, near.reshape(b, -1)).reshape(b, k1, k2)
    keep = r_a & r_n[:, :, :, None] & r_n[:, :, None, :] & (angle != 0)
    keep = keep & ~torch.eye(k2, dtype=torch.bool, device=x.device)
    return torch.where(keep, angle, angle.new_zeros(())), keep


def _mgskd_token_phrase(t: Tensor, s: Tensor, real: Tensor, heads: int, k: int) -> Tensor:
    b, n, _ = s.shape
    ext = (real[:, :, None] & real[:, None, :]).float()[:, None].expand(b, heads, n, n)
    s_pair, _ = _mgskd_pairs(s, ext, heads)
    with torch.no_grad():
        t_pair, t_att = _mgskd_pairs(t, ext, heads)
        k1 = k2 = min(k, n)
        anchors = t_att.sum(2).sum(1).topk(k1, dim=1).indices
        local = t_att.sum(1) * (1 - torch.eye(n, device=t.device))
        near = local.topk(k2, dim=2).indices.gather(1, anchors[:, :, None].expand(b, k1, k2))
    loss_pair = ((s_pair - t_pair) ** 2).sum() / ext.sum().clamp_min(1)
    s_angle, s_keep = _mgskd_angles(s, anchors, near, real)
    t_angle, _ = _mgskd_angles(t, anchors, near, real)
    return loss_pair + F.smooth_l1_loss(s_angle, t_angle, reduction="sum") / s_keep.sum().clamp_min(1)


def _check_heads(name: str, heads: int, *widths: int) -> None:
    if heads < 1 or any(w % heads for w in widths):
        raise RunError(f"{name}: option heads={heads} does not divide the widths {', '.join(map(str, widths))}")


def mgskd_token(target: Tensor, pred: Tensor, *, mask: Tensor | None = None, heads: int = 64, top_k: int = 20,
                spans: float = 0.0, span_lengths: list[int] | None = None) -> Tensor:
    """MGSKD's token and span levels as its authors' ``TokenPhraseLoss`` computes them (GKD's ``cite/mgskd.py``):
    pair relations x_i . x_j / sqrt(d_h) per relation head, squared error summed over real pairs over their count
    (x heads); triplet angles at the ``top_k`` most attended anchors (the teacher's masked softmax of those scores,
    summed over heads and rows) between each anchor's ``top_k`` most attended positions, on whole vectors, smooth
    L1 summed over the counted triplets over their number (the student's count).

    ``spans`` > 0 gives the span level as GKD runs it: ``int(s x spans)`` contiguous spans of the whole padded row
    (``span_lengths``, drawn once per step by the runtime: ``glmkd_span_lengths``), each mean-pooled over all its
    positions, a span real when any of its positions is.
    """
    if target.dim() != 3 or target.shape[:2] != pred.shape[:2]:
        raise RunError(f"mgskd_token: target {_shape(target)} and pred {_shape(pred)} must be [b, s, d] with equal b, s")
    _check_heads("mgskd_token", heads, target.shape[-1], pred.shape[-1])
    if top_k < 2:
        raise RunError(f"mgskd_token: option top_k must be >= 2 (an angle needs two neighbours), got {top_k}")
    t, s = _f32(target, pred)
    real = _row_mask("mgskd_token", mask, t.shape[:2])
    real = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if real is None else real
    if spans > 0:
        if span_lengths is None or sum(span_lengths) != t.shape[1]:
            raise RunError(f"mgskd_token: spans need the step's span lengths over {t.shape[1]} positions")
        t = torch.stack([c.mean(1) for c in torch.split(t, span_lengths, dim=1)], 1)
        s = torch.stack([c.mean(1) for c in torch.split(s, span_lengths, dim=1)], 1)
        real = torch.stack([c.any(1) for c in torch.split(real, span_lengths, dim=1)], 1)
    return _mgskd_token_phrase(t, s, real, heads, top_k)


def mgskd_sample(target: Tensor, pred: Tensor, *, mask: Tensor | None = None, heads: int = 64) -> Tensor:
    """MGSKD's sample level as its authors' ``SampleLoss`` computes it: each example's states mean-pooled over its
    real tokens, per relation head the angles at example i between examples j and k of the batch, smooth L1 averaged
    over every one of the H x b x b x b entries (degenerate ones, 0 on both sides, included)."""
    if target.dim() != 3 or target.shape[:2] != pred.shape[:2]:
        raise RunError(f"mgskd_sample: target {_shape(target)} and pred {_shape(pred)} must be [b, s, d] with equal b, s")
    _check_heads("mgskd_sample", heads, target.shape[-1], pred.shape[-1])
    t, s = _f32(target, pred)
    real = _row_mask("mgskd_sample", mask, t.shape[:2])
    w = (torch.ones(t.shape[:2], device=t.device) if real is None else real.float())[..., None]

    def angles(x: Tensor) -> Tensor:
        pooled = (x * w).sum(1) / w.sum(1).clamp_min(1)
        ph = pooled.reshape(pooled.shape[0], heads, -1).permute(1, 0, 2)  # [H, b, d]
        sub = F.normalize(ph[:, None, :, :] - ph[:, :, None, :], p=2, dim=-1)  # [H, i, j]: x_j - x_i
        return sub @ sub.transpose(-1, -2)

    return F.smooth_l1_loss(angles(s), angles(t))


def step_span_lengths(seed: int, step: int, n: int, rate: float) -> list[int]:
    """The step's GKD-style span lengths, from (seed, step) alone: every ``mgskd_token(spans: ...)`` term of a
    step (each layer, teacher and student sides) pools the same spans, as GKD draws one segmentation per step."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2 ** 62))
    return glmkd_span_lengths(n, rate, gen)


# ---------------------------------------------------------------- LRC-BERT's COS-NCE as GKD computes it


def cos_nce(target: Tensor, pred: Tensor, *, mask: Tensor | None = None, gather: bool = False) -> Tensor:
    """LRC-BERT's COS-NCE as GKD computes it (distill_model.py:2087-2126): the angular distance
    g_ij = 1 - cos(s_i, t_j), averaged over the positions of ``[b, s, d]`` sequences (``[b, d]``: one position),
    between every student example i and teacher example j; per example ``1 - (sum_j g_ij - B g_ii) / (B - 1) / 2
    + g_ii`` (B teacher examples: 1 - the negatives' mean / 2 + 1.5 x the positive's), the mean over examples.

    GKD concatenates every mapped layer's positions into one mean and multiplies by the number of layers; the
    formula is linear in g, so that equals the sum of this kernel over the layers (one term per layer pair).
    ``mask`` (``[b, s]``) keeps the positions where both examples are real; GKD's command uses every position.
    ``gather`` takes the teacher examples of every data-parallel rank (GKD's ``--lrc_bert_gather_dp``).
    """
    from runtime.contrastive_losses import _gathered

    if target.shape[-1:] != pred.shape[-1:] or target.shape[:-1] != pred.shape[:-1] or pred.dim() not in (2, 3):
        raise RunError(f"cos_nce: target {_shape(target)} and pred {_shape(pred)} must be equal [b, d] or [b, s, d]")
    t, s = _f32(target, pred)
    if s.dim() == 2:
        t, s = t[:, None], s[:, None]
        mask = None if mask is None else mask[:, None]
    real = _row_mask("cos_nce", mask, s.shape[:2])
    keys, offset = (_gathered(t) if gather else (t, 0))
    key_real = None if real is None else (_gathered(real)[0] if gather else real)
    if keys.shape[0] < 2:
        raise RunError("cos_nce: needs at least 2 examples in the (global) batch: the others are the negatives")
    dots = torch.einsum("ipd,jpd->pij", s, keys)
    norms = s.norm(dim=-1).T[:, :, None] * keys.norm(dim=-1).T[:, None, :]
    cos = dots / norms.clamp_min(1e-30)
    if real is None:
        g = 1 - cos.mean(0)
    else:
        both = (real.T[:, :, None] & key_real.T[:, None, :]).to(cos.dtype)  # [s, b, B]
        g = 1 - (cos * both).sum(0) / both.sum(0).clamp_min(1)
    rows = torch.arange(g.shape[0], device=g.device)
    diag = g[rows, rows + offset]
    n = g.shape[1]
    return (1 - (g.sum(-1) - diag * n) / (n - 1) / 2 + diag).mean()
