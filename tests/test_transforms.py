"""Parity tests: every transform against a naive float64 reference written here with loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from runtime import losses as L
from runtime import transforms as X
from runtime.errors import RunError

B, S, W = 2, 5, 12


def rnd(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g) * scale


def pad_mask():
    m = torch.ones(B, S, dtype=torch.bool)
    m[1, 3:] = False
    return m


# ---------------------------------------------------------------- projection


def test_projection_is_an_affine_map_with_gradients():
    proj = X.Projection(W, 7)
    x = rnd(B, S, W)
    y = proj(x)
    w, b = proj.linear.weight.double(), proj.linear.bias.double()
    for bi, i, o in itertools.product(range(B), range(S), range(7)):
        expect = sum(w[o, k].item() * x[bi, i, k].item() for k in range(W)) + b[o].item()
        assert y[bi, i, o].item() == pytest.approx(expect, abs=1e-5)
    y.sum().backward()
    assert proj.linear.weight.grad is not None
    assert proj(x.bfloat16()).dtype == torch.float32


def test_projection_without_bias_is_linear():
    proj = X.Projection(W, 7, bias=False)
    x = rnd(B, S, W)
    assert proj.linear.bias is None
    assert torch.allclose(proj(x), x @ proj.linear.weight.T)
    assert torch.allclose(proj(-x), -proj(x))


def test_projection_rejects_wrong_width():
    with pytest.raises(RunError, match="width 5.*d_in=12"):
        X.Projection(W, 7)(rnd(B, S, 5))


# ---------------------------------------------------------------- relation


def naive_relation(x, heads, mask):
    b, s, w = x.shape
    d = w // heads
    out = torch.zeros(b, heads, s, s, dtype=torch.float64)
    for bi, h, i in itertools.product(range(b), range(heads), range(s)):
        keys = [j for j in range(s) if mask is None or mask[bi, j]]
        scores = {}
        for j in keys:
            qi = x[bi, i, h * d:(h + 1) * d].double()
            kj = x[bi, j, h * d:(h + 1) * d].double()
            scores[j] = sum(qi[k].item() * kj[k].item() for k in range(d)) / math.sqrt(d)
        top = max(scores.values())
        tot = sum(math.exp(v - top) for v in scores.values())
        for j in keys:
            out[bi, h, i, j] = math.exp(scores[j] - top) / tot
    return out


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("use_mask", [False, True])
def test_relation_matches_naive(heads, use_mask):
    x = rnd(B, S, W, scale=2)
    mask = pad_mask() if use_mask else None
    probs = X.relation(x, heads, mask)
    assert probs.shape == (B, heads, S, S)
    assert torch.allclose(probs.double(), naive_relation(x, heads, mask), atol=1e-6)
    logp = X.relation(x, heads, mask, log=True)
    assert torch.allclose(logp.exp(), probs, atol=1e-7)


def test_relation_feeds_kl_for_minilmv2():
    """MiniLMv2: teacher and student widths differ, relation heads make the shapes agree."""
    mask = pad_mask()
    t = X.relation(rnd(B, S, 24), 4, mask, log=True)
    s = X.relation(rnd(B, S, W, seed=1).requires_grad_(True), 4, mask, log=True)
    loss = L.kl(t, s, mask=mask, inputs="log_probs", key_mask=mask)
    assert torch.isfinite(loss) and loss.item() > 0


def test_relation_shape_errors():
    with pytest.raises(RunError, match="width 12 is not divisible by heads=5"):
        X.relation(rnd(B, S, W), 5)
    with pytest.raises(RunError, match=r"mask shape \[2, 4\]"):
        X.relation(rnd(B, S, W), 3, torch.ones(2, 4, dtype=torch.bool))


def test_relation_all_padded_row_stays_finite():
    mask = torch.zeros(B, S, dtype=torch.bool)
    assert torch.isfinite(X.relation(rnd(B, S, W), 2, mask)).all()


# ---------------------------------------------------------------- pool / normalize / select / concat / mean


@pytest.mark.parametrize("how", ["mean", "max", "cls"])
def test_pool_matches_naive(how):
    x, mask = rnd(B, S, W), pad_mask()
    got = X.pool(x, how, mask)
    for bi, k in itertools.product(range(B), range(W)):
        col = [x[bi, i, k].item() for i in range(S) if mask[bi, i]]
        expect = {"mean": sum(col) / len(col), "max": max(col), "cls": x[bi, 0, k].item()}[how]
        assert got[bi, k].item() == pytest.approx(expect, abs=1e-6)


def test_pool_errors():
    with pytest.raises(RunError, match="how='sum'"):
        X.pool(rnd(B, S, W), "sum")
    with pytest.raises(RunError, match=r"\[batch, seq, hidden\]"):
        X.pool(rnd(B, W), "mean")


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_normalize_matches_naive(p):
    x = rnd(B, S, W)
    got = X.normalize(x, p=p)
    for bi, i in itertools.product(range(B), range(S)):
        norm = sum(abs(v) ** p for v in x[bi, i].tolist()) ** (1 / p)
        for k in range(W):
            assert got[bi, i, k].item() == pytest.approx(x[bi, i, k].item() / norm, abs=1e-6)


def test_select_vocab_keeps_columns_in_order():
    logits = rnd(B, S, 10)
    keep = [7, 0, 3]
    got = X.select_vocab(logits, keep)
    for c, v in enumerate(keep):
        assert torch.equal(got[..., c], logits[..., v])
    with pytest.raises(RunError, match="10 columns"):
        X.select_vocab(logits, [0, 10])


def test_concat_and_mean():
    a, b = rnd(B, 3), rnd(B, 4, seed=1)
    got = X.concat([a, b])
    assert torch.equal(got[:, :3], a) and torch.equal(got[:, 3:], b)
    with pytest.raises(RunError, match=r"\[2, 3\], \[3, 4\]"):
        X.concat([a, rnd(3, 4)])
    c = rnd(B, 3, seed=2)
    m = X.mean([a, c])
    for i, j in itertools.product(range(B), range(3)):
        assert m[i, j].item() == pytest.approx((a[i, j].item() + c[i, j].item()) / 2, abs=1e-7)
    with pytest.raises(RunError, match="differ"):
        X.mean([a, b])


# ---------------------------------------------------------------- attend / anneal


def test_attend_matches_naive_alp_kd():
    s = rnd(B, S, W)
    ts = [rnd(B, S, W, seed=k + 1) for k in range(3)]
    got = X.attend(s, ts)
    for bi, i in itertools.product(range(B), range(S)):
        dots = [sum(s[bi, i, k].item() * t[bi, i, k].item() for k in range(W)) for t in ts]
        top = max(dots)
        alpha = [math.exp(d - top) for d in dots]
        alpha = [a / sum(alpha) for a in alpha]
        for k in range(W):
            expect = sum(a * t[bi, i, k].item() for a, t in zip(alpha, ts))
            assert got[bi, i, k].item() == pytest.approx(expect, abs=1e-5)
    assert torch.allclose(X.attend(s, torch.stack(ts)), got)


def test_attend_shape_error_names_both():
    with pytest.raises(RunError, match=r"\[2, 2, 5, 8\].*\[2, 5, 12\]"):
        X.attend(rnd(B, S, W), [rnd(B, S, 8), rnd(B, S, 8, seed=1)])


def test_anneal_and_loss_gradient_reaches_student_only():
    t = rnd(B, S, W).requires_grad_(True)
    s = rnd(B, S, W, seed=1).requires_grad_(True)
    target = X.anneal(t, 1 / 7)
    assert torch.allclose(target, t / 7)
    L.mse(target, s).backward()
    assert t.grad is None and s.grad is not None

