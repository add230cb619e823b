"""Loss kernels that compute what GKD's own code (GitHub aitsc/GLMKD at 8d6cf11) computes where a method's
reference computation has no equivalent among the general kernels: registered in ``runtime/losses.py``'s
``LOSSES`` like the others, each parity-tested against a transcription of GLMKD's code
(``tests/test_methods_parity.py``) and against a naive formula (``tests/test_glmkd_losses.py``).

Same conventions as ``runtime/losses.py``: ``fn(target, pred, *, mask=None, **options)``, the target detached
(unless ``target_grad``), fp32 arithmetic, a mask selecting nothing gives a zero still connected to ``pred``.
"""

from __future__ import annotations

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
