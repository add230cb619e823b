"""On-policy distillation (issue 17), the runtime half: DistiLLM's skew losses and the generated-token losses
against naive float64 formulas, ..."""

from __future__ import annotations

import math

import pytest
import torch

from runtime import losses as L
from runtime.errors import RunError


def rnd(*shape, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _softmax(z):
    top = max(z)
    e = [math.exp(v - top) for v in z]
    return [v / sum(e) for v in e]


def naive(kind, t, s, mask, alpha=0.1, beta=0.5, T=1.0):
    """The divergence per kept row from Python floats (the papers' formulas), mean over kept rows."""
    total, rows = 0.0, 0
    flat_t = t.double().reshape(-1, t.shape[-1]).tolist()
    flat_s = s.double().reshape(-1, s.shape[-1]).tolist()
    for tr, sr, keep in zip(flat_t, flat_s, mask.reshape(-1).tolist()):
        if not keep:
            continue
        p, q = _softmax([v / T for v in tr]), _softmax([v / T for v in sr])
        if kind == "skew_kl":  # KL(p || a p + (1 - a) q)
            total += sum(pi * math.log(pi / (alpha * pi + (1 - alpha) * qi)) for pi, qi in zip(p, q))
        elif kind == "skew_rkl":  # KL(q || a q + (1 - a) p)
            total += sum(qi * math.log(qi / (alpha * qi + (1 - alpha) * pi)) for pi, qi in zip(p, q))
        elif kind == "rkl" or (kind == "gjsd" and beta == 1):  # TRL branches at its endpoints
            total += sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
        elif kind == "gjsd" and beta == 0:
            total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        else:  # TRL's generalized JSD
            m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
            total += beta * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m)) + \
                (1 - beta) * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m))
        rows += 1
    return total / rows


def naive_grad(kind, t, s, mask, **opts):
    """d loss / d student logits by autograd through the float64 formula written with torch ops."""
    x = s.double().clone().requires_grad_(True)
    T = opts.get("T", 1.0)
    lq, lp = torch.log_softmax(x / T, -1), torch.log_softmax(t.double() / T, -1)
    a = opts.get("alpha", 0.1)
    if kind == "skew_kl":
        lm = torch.log(a * lp.exp() + (1 - a) * lq.exp())
        rows = (lp.exp() * (lp - lm)).sum(-1)
    else:
        lm = torch.log(a * lq.exp() + (1 - a) * lp.exp())
        rows = (lq.exp() * (lq - lm)).sum(-1)
    keep = mask.double()
    ((rows * keep).sum() / keep.sum()).backward()
    return x.grad.float()


def padded_mask(b, s):
    """Generated-token masks: each row keeps a different run (prompt before it, padding after it)."""
    m = torch.zeros(b, s, dtype=torch.bool)
    m[0, 2:5] = True
    m[1, 1:] = True
    m[2, 4:6] = True
    return m


@pytest.mark.parametrize("kind", ["skew_kl", "skew_rkl"])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.0])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [None, 2])
def test_skew_losses_match_the_naive_formula_with_padding(kind, alpha, T, chunk):
    b, s, v = 3, 7, 29
    t, x = rnd(b, s, v, seed=1), rnd(b, s, v, seed=2)
    mask = padded_mask(b, s)
    # padded rows hold garbage: they must not count
    x[~mask] = 1e4
    pred = x.clone().requires_grad_(True)
    value = L.LOSSES[kind](t, pred, mask=mask, alpha=alpha, T=T, chunk=chunk)
    assert value.item() == pytest.approx(naive(kind, t, x, mask, alpha=alpha, T=T), rel=1e-5)
    value.backward()
    want = naive_grad(kind, t, x, mask, alpha=alpha, T=T)
    assert torch.allclose(pred.grad, want, rtol=1e-5, atol=1e-7)
    assert (pred.grad[~mask] == 0).all()


def test_skew_endpoints_are_the_plain_divergences():
    t, s = rnd(4, 11, seed=3), rnd(4, 11, seed=4)
    assert L.skew_kl(t, s, alpha=0.0).item() == pytest.approx(L.kl(t, s, scale_t2=False).item(), rel=1e-6)
    assert L.skew_rkl(t, s, alpha=0.0).item() == pytest.approx(L.kl(t, s, reverse=True).item(), rel=1e-6)
    assert abs(L.skew_kl(t, s, alpha=1.0).item()) < 1e-6 and abs(L.skew_rkl(t, s, alpha=1.0).item()) < 1e-6


def test_skew_losses_take_a_fused_head_and_refuse_a_bad_alpha():
    from runtime.chunked import HeadLogits

    h, w, t = rnd(2, 5, 8, seed=5), rnd(13, 8, seed=6, scale=0.5), rnd(2, 5, 13, seed=7)
    fused = L.skew_rkl(t, HeadLogits(h, w), alpha=0.2)
    assert fused.item() == pytest.approx(L.skew_rkl(t, h @ w.T, alpha=0.2).item(), rel=1e-5)
    with pytest.raises(RunError, match=r"alpha must be in \[0, 1\], got 1.5"):
        L.skew_kl(t, h @ w.T, alpha=1.5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_gjsd_and_reverse_kl_on_generated_token_masks(beta):
    b, s, v = 3, 7, 31
    t, x = rnd(b, s, v, seed=8), rnd(b, s, v, seed=9)
    mask = padded_mask(b, s)
    x[~mask] = -1e4
    assert L.gjsd(t, x, mask=mask, beta=beta).item() == pytest.approx(naive("gjsd", t, x, mask, beta=beta), rel=1e-5)
    assert L.kl(t, x, mask=mask, reverse=True, scale_t2=False).item() == pytest.approx(naive("rkl", t, x, mask),
                                                                                         rel=1e-5)
