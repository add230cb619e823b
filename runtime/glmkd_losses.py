"""Loss kernels that compute what GKD's own code (GitHub aitsc/GLMKD at 8d6cf11) computes where a method's
reference computation has no equivalent among the general kernels: registered in ``runtime/losses.py``'s
``LOSSES`` like the others, each parity-tested against a transcription of GLMKD's code
(``tests/test_methods_parity.py``) and against a naive formula (``tests/test_glmkd_losses.py``).

Same conventions as ``runtime/losses.py``: ``fn(target, pred, *, mask=None, **options)``, the target detached
(unless ``target_grad``), fp32 arithmetic, a mask selecting nothing gives a zero still connected to ``pred``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from runtime.errors import RunError
from runtime.loss_helpers import _f32, _masked_mean, _row_mask, _same_shape


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
