"""Row-chunked logit losses: (student logits, or its final hidden states and head; teacher logits, head or
sparse cached targets) -> a 0-dim fp32 loss whose gradient is computed chunk by chunk in the forward pass.

Why our own kernels: autograd through ``log_softmax`` + elementwise terms keeps ~25 bytes per logit element
alive (fp32 copies of both sides, both log-softmax outputs, the terms and two fp32 gradients). Here a chunk of
rows (tokens) at a time is upcast to fp32, its per-row loss and its gradient w.r.t. the student's logits are
computed in closed form, and the gradient is written into one buffer in the student logits' dtype, the tensor
autograd hands on to the head's backward anyway. The loss's own working set is a few chunk-sized fp32
tensors (``CHUNK_ELEMENTS`` elements each), whatever the number of rows: no ``[rows, V]`` fp32 tensor exists.

The fused form (``HeadLogits``) never materialises the student's logits at all: a chunk of the final hidden
states goes through the head (``h @ W.T + b``), the chunk's logit gradient goes straight on into the hidden
states' and the head weight's gradients (``g @ W`` and ``g.T @ h``, accumulated in fp32), and backward only
scales what the forward computed. A teacher given as ``HeadLogits`` forms its logits chunk by chunk the same
way (no gradient).

A target that carries a graph (a teacher-side learned map, ``losses.target_grad``) gets its gradient chunk by
chunk too: each chunk's row loss is recomputed differentiably (the kernel's ``target_rows``) on that chunk's
fp32 copies and ``torch.autograd.grad`` gives the chunk's target gradient, written into one buffer in the
target's dtype; only a chunk's worth of autograd state exists at a time.

Every row kernel is ``(x, y, extra) -> (row loss [c], d loss / d x [c, K])`` with ``x`` the student's fp32
logits / T (overwritten), ``y`` the teacher's (or None). Rows weigh ``mask / count`` (times T^2 where
asked); columns may be selected (GLMD's compressed vocabulary) on either side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from runtime.errors import RunError

CHUNK_ELEMENTS = 1 << 21
"""fp32 elements of one chunk operand (8 MiB): rows per chunk = CHUNK_ELEMENTS // V (at least 1). Small enough
that a chunk's 4-5 fp32 temporaries stay in the last-level cache of a CPU socket and far below the gradient
buffer; large enough that per-chunk overhead (a few kernel launches) is negligible at V >= 4k."""

_NEG = torch.finfo(torch.float32).min
_TINY = torch.finfo(torch.float32).tiny


class HeadLogits(NamedTuple):
    """Logits ``hidden @ weight.T + bias`` that were never materialised (the fused path)."""

    hidden: Tensor
    """``[..., H]`` final hidden states (after the model's final norm): the head's input."""
    weight: Tensor
    """``[V, H]`` the output layer (lm_head, tied or not)."""
    bias: Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size([*self.hidden.shape[:-1], self.weight.shape[0]])

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def dim(self) -> int:
        return self.hidden.dim()

    def rows(self, i: int) -> "HeadLogits":
        """Example ``i`` alone (per-example weighted terms)."""
        return HeadLogits(self.hidden[i:i + 1], self.weight, self.bias)

    def materialise(self) -> Tensor:
        """The dense logits (references and tests only)."""
        return torch.nn.functional.linear(self.hidden, self.weight, self.bias)


def chunk_rows(width: int, chunk: int | None = None) -> int:
    return max(1, chunk if chunk is not None else CHUNK_ELEMENTS // max(1, width))


# ---------------------------------------------------------------- row kernels


def _log_softmax_(x: Tensor) -> Tensor:
    """x <- log softmax(x) in place; returns softmax(x) (one new tensor)."""
    x.sub_(x.amax(-1, keepdim=True))
    q = x.exp()
    total = q.sum(-1, keepdim=True)
    x.sub_(total.log())
    q.div_(total)
    return q


def _forward_kl(x: Tensor, y: Tensor, extra) -> tuple[Tensor, Tensor]:
    """KL(p || q): rows sum p (log p - log q); gradient q - p."""
    q = _log_softmax_(x)
    p = _log_softmax_(y)
    y.sub_(x).mul_(p)  # p (log p - log q); p = 0 gives 0 (logits are clamped finite)
    row = y.sum(-1)
    return row, q.sub_(p)


def _reverse_kl(x: Tensor, y: Tensor, extra) -> tuple[Tensor, Tensor]:
    """KL(q || p): rows sum q r with r = log q - log p; gradient q (r - row)."""
    q = _log_softmax_(x)
    _log_softmax_(y)
    x.sub_(y)  # r
    row = torch.mul(q, x, out=y).sum(-1)
    return row, x.sub_(row[:, None]).mul_(q)


def _soft_ce(x: Tensor, y: Tensor, extra) -> tuple[Tensor, Tensor]:
    """-sum p log q; gradient q - p."""
    q = _log_softmax_(x)
    _log_softmax_(y)
    p = y.exp_()
    row = -(x.mul_(p).sum(-1))
    return row, q.sub_(p)


def _mixture_jsd(beta: float) -> Callable:
    """TRL's generalized JSD for 0 < beta < 1: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.

    d/dq_k = (1 - beta) (log q_k - log m_k) =: (1 - beta) u_k, so the logit gradient is (1 - beta) q (u - sum q u).
    """

    def kernel(x: Tensor, y: Tensor, extra) -> tuple[Tensor, Tensor]:
        q = _log_softmax_(x)
        p = _log_softmax_(y)
        log_m = torch.mul(p, beta).add_(q, alpha=1.0 - beta).clamp_min_(_TINY).log_()
        row_p = y.sub_(log_m).mul_(p).sum(-1)
        x.sub_(log_m)  # u
        row_q = torch.mul(q, x, out=log_m).sum(-1)
        grad = x.sub_(row_q[:, None]).mul_(q).mul_(1.0 - beta)
        return beta * row_p + (1.0 - beta) * row_q, grad

    kernel.target_rows = _rows_mixture(beta)
    return kernel


def _hard_ce(x: Tensor, y: Tensor | None, ids: Tensor) -> tuple[Tensor, Tensor]:
    """logsumexp(x) - x[id]; gradient softmax(x) - onehot(id). ``ids`` already valid (ignored rows weigh 0)."""
    picked = x.gather(-1, ids[:, None])[:, 0]
    top = x.amax(-1, keepdim=True)
    x.sub_(top).exp_()
    total = x.sum(-1, keepdim=True)
    row = top[:, 0] + total[:, 0].log() - picked
    x.div_(total)
    x.scatter_add_(-1, ids[:, None], torch.full_like(picked[:, None], -1.0))
    return row, x


def _weighted_nll(x: Tensor, y: Tensor | None, extra) -> tuple[Tensor, Tensor]:
    """sum_j w_j (logsumexp(x) - x[id_j]) (+ a per-row constant); gradient (sum w) softmax(x) - scatter(w)."""
    ids, w, const = extra
    picked = x.gather(-1, ids)
    top = x.amax(-1, keepdim=True)
    x.sub_(top).exp_()
    total = x.sum(-1, keepdim=True)
    lse = top + total.log()
    row = (w * (lse - picked)).sum(-1) + const
    x.mul_(w.sum(-1, keepdim=True) / total)
    x.scatter_add_(-1, ids, -w)
    return row, x


def gjsd_kernel(beta: float) -> Callable:
    """The row kernel of ``gjsd(beta)`` exactly as TRL branches: 0 is forward KL, 1 reverse KL."""
    if not 0.0 <= beta <= 1.0:
        raise RunError(f"gjsd: option beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return _forward_kl
    if beta == 1.0:
        return _reverse_kl
    return _mixture_jsd(beta)


def _rows_kl(x: Tensor, y: Tensor) -> Tensor:
    lq, lp = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _rows_kl_reverse(x: Tensor, y: Tensor) -> Tensor:
    lq, lp = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
    return (lq.exp() * (lq - lp)).sum(-1)


def _rows_soft_ce(x: Tensor, y: Tensor) -> Tensor:
    return -(torch.softmax(y, -1) * torch.log_softmax(x, -1)).sum(-1)


def _rows_mixture(beta: float) -> Callable:
    def rows(x: Tensor, y: Tensor) -> Tensor:
        lq, lp = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log(1.0 - beta))
        return beta * (lp.exp() * (lp - lm)).sum(-1) + (1.0 - beta) * (lq.exp() * (lq - lm)).sum(-1)

    return rows


# the differentiable row loss of each teacher-reading kernel (x, y fp32 logits / T): a target with a graph
_forward_kl.target_rows = _rows_kl
_reverse_kl.target_rows = _rows_kl_reverse
_soft_ce.target_rows = _rows_soft_ce


KERNELS: dict[str, Callable] = {
    "kl": _forward_kl,
    "kl_reverse": _reverse_kl,
    "soft_ce": _soft_ce,
    "jsd": _mixture_jsd(0.5),
}


# ---------------------------------------------------------------- sides


@dataclass
class _Side:
    """One operand of a chunked loss: dense logits or a head, optional column selection, upcast per chunk."""

    value: Tensor | HeadLogits
    cols: Tensor | None = None
    T: float = 1.0
    weight: Tensor | None = field(default=None, init=False)
    """The head weight (fused), column-selected."""
    bias: Tensor | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.value, HeadLogits):
            w, b = self.value.weight, self.value.bias
            if self.cols is not None:
                w = w.index_select(0, self.cols)
                b = None if b is None else b.index_select(0, self.cols)
            self.weight, self.bias = w, b

    @property
    def flat(self) -> Tensor:
        v = self.value.hidden if isinstance(self.value, HeadLogits) else self.value
        return v.reshape(-1, v.shape[-1])

    @property
    def width(self) -> int:
        if isinstance(self.value, HeadLogits):
            return self.weight.shape[0]
        return self.value.shape[-1] if self.cols is None else len(self.cols)

    def chunk(self, rows: Tensor, r0: int, r1: int) -> Tensor:
        """fp32 logits / T of rows r0..r1 (a fresh tensor the kernel may overwrite), clamped finite."""
        part = rows[r0:r1]
        if isinstance(self.value, HeadLogits):
            z = torch.nn.functional.linear(part, self.weight.detach(), None if self.bias is None else self.bias.detach())
        else:
            z = part if self.cols is None else part.index_select(-1, self.cols)
        # a head's fresh fp32 output is ours already; anything else is copied (the kernels overwrite it)
        z = z.detach().to(torch.float32, copy=not (isinstance(self.value, HeadLogits) and z.dtype == torch.float32))
        if self.T != 1.0:
            z.div_(self.T)
        return z.clamp_(min=_NEG)


# ---------------------------------------------------------------- the driver


def _target_grad_rows(kernel: Callable, target: _Side, x_rows: Tensor, pred: _Side, y_rows: Tensor, r0: int,
                      r1: int, w: Tensor) -> Tensor:
    """d loss / d target logits of rows r0..r1 (fp32, the target's selected columns), by autograd on the chunk."""
    with torch.enable_grad():
        y = target.chunk(y_rows, r0, r1).requires_grad_()
        row = kernel.target_rows(pred.chunk(x_rows, r0, r1), y)
        (g,) = torch.autograd.grad((row * w).sum(), y)
    return g.div_(target.T)


def _run(pred: _Side, target: _Side | None, kernel: Callable, extra_rows, row_w: Tensor, chunk: int | None,
         grad_pred: bool, grad_target: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(loss, grad of the pred rows or hidden states, fp32 grads of the head weight and bias, grad of the target
    rows) over all rows, by chunks."""
    x_rows = pred.flat
    y_rows = target.flat if target is not None else None
    n, width = x_rows.shape[0], pred.width
    step = chunk_rows(width, chunk)
    fused = isinstance(pred.value, HeadLogits)
    total = torch.zeros((), dtype=torch.float32, device=x_rows.device)
    grad = g_w = g_b = None
    if grad_pred:
        if fused:
            grad = torch.empty_like(x_rows)
            g_w = torch.zeros(pred.weight.shape, dtype=torch.float32, device=x_rows.device)
            g_b = None if pred.bias is None else torch.zeros(pred.bias.shape, dtype=torch.float32, device=x_rows.device)
        else:
            dense = pred.value
            # unselected columns get no gradient: zeros; otherwise every element is written
            grad = (torch.zeros if pred.cols is not None else torch.empty)(n, dense.shape[-1], dtype=dense.dtype,
                                                                           device=dense.device)
    grad_t = None
    if grad_target:
        dense_t = target.value
        grad_t = (torch.zeros if target.cols is not None else torch.empty)(n, dense_t.shape[-1], dtype=dense_t.dtype,
                                                                           device=dense_t.device)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        w = row_w[r0:r1]
        if grad_target:
            g_t = _target_grad_rows(kernel, target, x_rows, pred, y_rows, r0, r1, w)
            if target.cols is not None:
                grad_t[r0:r1].index_copy_(-1, target.cols, g_t.to(grad_t.dtype))
            else:
                grad_t[r0:r1] = g_t
            del g_t
        x = pred.chunk(x_rows, r0, r1)
        y = target.chunk(y_rows, r0, r1) if target is not None else None
        row, g = kernel(x, y, extra_rows(r0, r1) if extra_rows is not None else None)
        total += (row * w).sum()
        if not grad_pred:
            del x, y, g, row
            continue
        g.mul_((w / pred.T)[:, None])
        if fused:
            gw = g.to(pred.weight.dtype)
            grad[r0:r1] = gw @ pred.weight.detach()
            g_w.addmm_(g.T, x_rows[r0:r1].detach().to(torch.float32))
            if g_b is not None:
                g_b += g.sum(0)
        elif pred.cols is not None:
            grad[r0:r1].index_copy_(-1, pred.cols, g.to(grad.dtype))
        else:
            grad[r0:r1] = g
        del x, y, g, row  # before the next chunk's operands exist
    return total, grad, (g_w, g_b), grad_t


class _ChunkedDense(torch.autograd.Function):
    """Loss over dense student logits; the gradient buffer (pred dtype) is filled in forward."""

    @staticmethod
    def forward(ctx, z: Tensor, t: Tensor | None, job: "_Job") -> Tensor:
        total, grad, _, grad_t = _run(job.pred, job.target, job.kernel, job.extra, job.row_w, job.chunk, job.grad,
                                      job.grad_target)
        ctx.grad, ctx.grad_t = grad, grad_t
        ctx.shape, ctx.t_shape = z.shape, None if t is None else t.shape
        return total

    @staticmethod
    def backward(ctx, g: Tensor):
        (grad, grad_t), ctx.grad, ctx.grad_t = (ctx.grad, ctx.grad_t), None, None
        return _scaled(grad, g, ctx.shape), _scaled(grad_t, g, ctx.t_shape), None


class _ChunkedHead(torch.autograd.Function):
    """Loss over a student head (hidden states, weight, bias) whose logits are formed one chunk at a time."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, b: Tensor | None, t: Tensor | None, job: "_Job") -> Tensor:
        total, g_h, (g_w, g_b), grad_t = _run(job.pred, job.target, job.kernel, job.extra, job.row_w, job.chunk,
                                              job.grad, job.grad_target)
        ctx.grads = (g_h, g_w, g_b)
        ctx.grad_t, ctx.t_shape = grad_t, None if t is None else t.shape
        ctx.meta = (h.shape, w.dtype, job.pred.cols, w.shape, None if b is None else (b.dtype, b.shape))
        return total

    @staticmethod
    def backward(ctx, g: Tensor):
        (g_h, g_w, g_b), ctx.grads = ctx.grads, (None, None, None)
        grad_t, ctx.grad_t = _scaled(ctx.grad_t, g, ctx.t_shape), None
        if g_h is None:
            return None, None, None, grad_t, None
        h_shape, w_dtype, cols, w_shape, b_meta = ctx.meta
        scale = None if _is_one(g) else g
        if scale is not None:
            g_h.mul_(scale.to(g_h.dtype))
            g_w.mul_(scale)
            if g_b is not None:
                g_b.mul_(scale)
        if cols is not None:  # only the selected rows of the head get a gradient
            full = torch.zeros(w_shape, dtype=torch.float32, device=g_w.device)
            g_w = full.index_copy_(0, cols, g_w)
            if g_b is not None:
                g_b = torch.zeros(b_meta[1], dtype=torch.float32, device=g_b.device).index_copy_(0, cols, g_b)
        return (g_h.view(h_shape), g_w.to(w_dtype),
                None if g_b is None else g_b.to(b_meta[0]), grad_t, None)


def _scaled(grad: Tensor | None, g: Tensor, shape) -> Tensor | None:
    """A gradient computed in forward, times the incoming one, in its tensor's shape."""
    if grad is None:
        return None
    if not _is_one(g):
        grad.mul_(g.to(grad.dtype))
    return grad.view(shape)


def _is_one(g: Tensor) -> bool:
    """Whether the incoming gradient is exactly 1 (then the precomputed one is used as is); read only on CPU, where
    it costs no device sync (on a GPU scaling the buffer is cheaper than waiting for the value)."""
    return g.device.type == "cpu" and g.numel() == 1 and float(g) == 1.0


@dataclass
class _Job:
    pred: _Side
    target: _Side | None
    kernel: Callable
    extra: Callable | None
    row_w: Tensor
    chunk: int | None
    grad: bool
    grad_target: bool = False


def row_weights(rows: tuple[int, ...], mask: Tensor | None, scale: float, device) -> Tensor:
    """fp32 ``[n]`` weights of a masked mean over rows, times ``scale`` (0 rows selected: all zero)."""
    if mask is None:
        n = math.prod(rows)
        return torch.full((n,), scale / max(1, n), dtype=torch.float32, device=device)
    keep = mask.reshape(-1).to(torch.float32)
    return keep * (scale / keep.sum().clamp_min(1))


def chunked_loss(kernel: Callable, pred: Tensor | HeadLogits, target: Tensor | HeadLogits | None, *,
                 row_w: Tensor, T: float = 1.0, pred_cols: Tensor | None = None, target_cols: Tensor | None = None,
                 extra: Callable | None = None, chunk: int | None = None, target_grad: bool = False) -> Tensor:
    """sum_rows row_w * kernel row loss, with the gradient computed in this forward (see the module docstring).

    ``target_grad``: a dense target that requires grad gets its gradient as well (else it is treated as constant).
    """
    p_side = _Side(pred, pred_cols, T)
    t_side = None if target is None else _Side(target, target_cols, T)
    if t_side is not None and t_side.width != p_side.width:
        raise RunError(f"teacher width {t_side.width} and student width {p_side.width} differ (select the "
                       "teacher's columns of a compressed vocabulary)")
    keep_t = target_grad and isinstance(target, Tensor) and target.requires_grad and torch.is_grad_enabled()
    if keep_t and getattr(kernel, "target_rows", None) is None:
        raise RunError("this kernel cannot train its target (no differentiable row form)")
    t_in = target if keep_t else None
    if isinstance(pred, HeadLogits):
        params = [pred.hidden, pred.weight] + ([pred.bias] if pred.bias is not None else [])
        needs = torch.is_grad_enabled() and any(t.requires_grad for t in params)
        job = _Job(p_side, t_side, kernel, extra, row_w, chunk, needs, keep_t)
        return _ChunkedHead.apply(pred.hidden, pred.weight, pred.bias, t_in, job)
    needs = torch.is_grad_enabled() and pred.requires_grad
    job = _Job(p_side, t_side, kernel, extra, row_w, chunk, needs, keep_t)
    return _ChunkedDense.apply(pred, t_in, job)
