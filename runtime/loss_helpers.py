"""Shared pieces of the loss kernels (runtime/losses.py, runtime/relation_losses.py, runtime/skew_losses.py): shape
checks, masks and masked means, the fp32 upcast, the ``target_grad`` context under which a loss target keeps its
graph, and the driver of the chunked distribution kernels."""

from __future__ import annotations

import collections.abc
import contextlib
import contextvars

import torch
from torch import Tensor

from runtime.chunked import chunked_loss, row_weights
from runtime.errors import RunError

_NEG = torch.finfo(torch.float32).min
"""Finite stand-in for -inf on masked logits, so a row whose keys are all masked stays finite."""


# ---------------------------------------------------------------- shared helpers


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _same_shape(name: str, target: Tensor, pred: Tensor) -> None:
    if target.shape != pred.shape:
        raise RunError(f"{name}: target shape {_shape(target)} and pred shape {_shape(pred)} differ")


_TARGET_GRAD: contextvars.ContextVar[bool] = contextvars.ContextVar("gkdc_target_grad", default=False)


@contextlib.contextmanager
def target_grad(keep: bool = True) -> collections.abc.Iterator[None]:
    """Within it the kernels keep the target's graph: a target computed by learned maps (a teacher-side
    projection) or by attention over the student's own states trains them, as GKD's code trains them."""
    token = _TARGET_GRAD.set(keep)
    try:
        yield
    finally:
        _TARGET_GRAD.reset(token)


def _f32(target: Tensor, pred: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 target, detached unless inside ``target_grad()``, and fp32 pred."""
    return (target if _TARGET_GRAD.get() else target.detach()).float(), pred.float()


def _row_mask(name: str, mask: Tensor | None, rows: torch.Size) -> Tensor | None:
    """The position mask as a bool tensor of shape ``rows`` (None = every row counts)."""
    if mask is None:
        return None
    mask = mask.to(torch.bool)
    if mask.shape == rows:
        return mask
    if len(rows) == 3 and mask.shape == (rows[0], rows[2]):  # [b, s] over [b, H, s] query rows
        return mask[:, None, :].expand(rows)
    raise RunError(f"{name}: mask shape {_shape(mask)} does not fit positions {list(rows)}")


def _key_mask(name: str, key_mask: Tensor | None, shape: torch.Size) -> Tensor | None:
    """A ``[b, s]`` key mask broadcast over an attention-shaped ``[b, H, s, s]`` tensor."""
    if key_mask is None:
        return None
    if len(shape) != 4 or key_mask.shape != (shape[0], shape[3]):
        raise RunError(
            f"{name}: key_mask shape {_shape(key_mask)} needs an attention-shaped [b, H, s, s] input "
            f"with matching b and s, got {list(shape)}"
        )
    return key_mask.to(torch.bool)[:, None, None, :]


def _masked_mean(values: Tensor, keep: Tensor | None) -> Tensor:
    """Mean of ``values`` where ``keep``; zero (still connected to the graph) when nothing is kept."""
    if keep is None:
        return values.mean() if values.numel() else values.sum()
    keep = keep.expand_as(values)
    total = torch.where(keep, values, values.new_zeros(())).sum()
    return total / keep.sum().clamp_min(1)


def _check_choice(name: str, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise RunError(f"{name}: option {key}={value!r} is not one of {', '.join(allowed)}")


def _distribution(name: str, kernel, target, pred, mask: Tensor | None, T: float, scale: float,
                  target_cols: Tensor | None, pred_cols: Tensor | None, chunk: int | None) -> Tensor:
    """A row kernel of runtime/chunked.py over logits (or a fused head): masked mean over rows, times ``scale``."""
    if T <= 0:
        raise RunError(f"{name}: option T must be > 0, got {T}")
    plain = target_cols is None and pred_cols is None
    if tuple(target.shape[:-1]) != tuple(pred.shape[:-1]) or (plain and tuple(target.shape) != tuple(pred.shape)):
        raise RunError(f"{name}: target shape {_shape(target)} and pred shape {_shape(pred)} differ")
    rows = tuple(pred.shape[:-1])
    weights = row_weights(rows, _row_mask(name, mask, torch.Size(rows)), scale, pred.device)
    cols = [None if c is None else torch.as_tensor(c, dtype=torch.long, device=pred.device)
            for c in (target_cols, pred_cols)]
    try:
        return chunked_loss(kernel, pred, target, row_w=weights, T=float(T), target_cols=cols[0], pred_cols=cols[1],
                            chunk=chunk, target_grad=_TARGET_GRAD.get())
    except RunError as err:
        raise RunError(f"{name}: {err}") from None
