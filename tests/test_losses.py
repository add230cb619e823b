"""Parity tests: every loss kernel against a naive float64 reference written here with loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import losses as L
from runtime.errors import RunError

B, S, V, D = 3, 6, 11, 8


def rnd(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g) * scale


def token_mask(b=B, s=S):
    m = torch.ones(b, s, dtype=torch.bool)
    m[0, -2:] = False
    m[2, 3:] = False
    return m


def softmax_row(row, T=1.0):
    z = [v / T for v in row]
    top = max(z)
    e = [math.exp(v - top) for v in z]
    tot = sum(e)
    return [v / tot for v in e]


def rows_of(x, mask):
    """(row values as float64 lists) for every kept row of a [..., n] tensor with a mask over [...]."""
    flat = x.double().reshape(-1, x.shape[-1]).tolist()
    keep = [True] * len(flat) if mask is None else mask.reshape(-1).tolist()
    return [r for r, k in zip(flat, keep) if k]


def naive_mean(values):
    return sum(values) / len(values) if values else 0.0


def naive_kl_rows(p_rows, q_rows):
    return [sum(p * math.log(p / q) for p, q in zip(pr, qr) if p > 0) for pr, qr in zip(p_rows, q_rows)]


def grad_check(fn, target, pred, **kw):
    """Run the loss with grads on both sides; the target must get none, pred a finite one."""
    target = target.clone().requires_grad_(True)
    pred = pred.clone().requires_grad_(True)
    out = fn(target, pred, **kw)
    out.backward()
    assert out.dim() == 0 and out.dtype == torch.float32
    assert target.grad is None
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    return out


# ---------------------------------------------------------------- kl / soft_ce / jsd


@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("use_mask", [False, True])
def test_kl_logits_matches_naive(T, use_mask):
    t, s = rnd(B, S, V, scale=3), rnd(B, S, V, scale=3, seed=1)
    mask = token_mask() if use_mask else None
    p = [softmax_row(r, T) for r in rows_of(t, mask)]
    q = [softmax_row(r, T) for r in rows_of(s, mask)]
    expect = naive_mean(naive_kl_rows(p, q)) * T * T
    got = grad_check(L.kl, t, s, mask=mask, T=T)
    assert got.item() == pytest.approx(expect, rel=1e-5)
    # without T^2 and reversed
    assert L.kl(t, s, mask=mask, T=T, scale_t2=False).item() == pytest.approx(expect / T / T, rel=1e-5)
    rev = naive_mean(naive_kl_rows(q, p)) * T * T
    assert L.kl(t, s, mask=mask, T=T, reverse=True).item() == pytest.approx(rev, rel=1e-5)


def test_kl_reverse_gradient_reaches_pred_only():
    grad_check(L.kl, rnd(B, V), rnd(B, V, seed=3), reverse=True, T=2.0)


def test_kl_task_logits_with_example_mask():
    t, s = rnd(4, 3), rnd(4, 3, seed=2)
    mask = torch.tensor([True, False, True, True])
    expect = naive_mean(naive_kl_rows([softmax_row(r) for r in rows_of(t, mask)],
                                      [softmax_row(r) for r in rows_of(s, mask)]))
    assert L.kl(t, s, mask=mask).item() == pytest.approx(expect, rel=1e-5)


def attention_probs(b, h, s, key_mask, seed):
    scores = rnd(b, h, s, s, scale=2, seed=seed)
    scores = scores.masked_fill(~key_mask[:, None, None, :], -1e9)
    return torch.softmax(scores, dim=-1)


def naive_attention_kl(p, q, mask, key_mask):
    """KL per (b, head, query) row over real keys, mean over kept query rows."""
    b, h, s, _ = p.shape
    vals = []
    for bi, hi, i in itertools.product(range(b), range(h), range(s)):
        if not mask[bi, i]:
            continue
        row = 0.0
        for j in range(s):
            pj, qj = p[bi, hi, i, j].item(), q[bi, hi, i, j].item()
            if key_mask[bi, j] and pj > 0:
                row += pj * math.log(pj / qj)
        vals.append(row)
    return naive_mean(vals)


def test_kl_attention_probs_masks_rows_and_keys():
    km = token_mask()
    p, q = attention_probs(B, 2, S, km, 4), attention_probs(B, 2, S, km, 5)
    rows = km.clone()
    rows[1, 0] = False  # a query mask that differs from the key mask
    got = grad_check(L.kl, p, q, mask=rows, inputs="probs", key_mask=km)
    assert got.item() == pytest.approx(naive_attention_kl(p.double(), q.double(), rows, km), rel=1e-4)
    # log-probabilities give the same number
    lp = L.kl(p.log(), q.log(), mask=rows, inputs="log_probs", key_mask=km)
    assert lp.item() == pytest.approx(got.item(), rel=1e-4)


def test_kl_attention_scores_logits_exclude_padded_keys():
    km = token_mask()
    t, s = rnd(B, 2, S, S, seed=6), rnd(B, 2, S, S, seed=7)
    got = L.kl(t, s, mask=km, key_mask=km)
    # reference: softmax over the real keys only
    p = torch.softmax(t.double().masked_fill(~km[:, None, None, :], -math.inf), -1)
    q = torch.softmax(s.double().masked_fill(~km[:, None, None, :], -math.inf), -1)
    assert got.item() == pytest.approx(naive_attention_kl(p, q, km, km), rel=1e-5)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_soft_ce_matches_naive(T):
    t, s = rnd(B, S, V, scale=2), rnd(B, S, V, scale=2, seed=1)
    mask = token_mask()
    vals = []
    for tr, sr in zip(rows_of(t, mask), rows_of(s, mask)):
        p, q = softmax_row(tr, T), softmax_row(sr, T)
        vals.append(-sum(pi * math.log(qi) for pi, qi in zip(p, q)))
    got = grad_check(L.soft_ce, t, s, mask=mask, T=T)
    assert got.item() == pytest.approx(naive_mean(vals), rel=1e-5)
    assert L.soft_ce(t, s, mask=mask, T=T, scale_t2=True).item() == pytest.approx(naive_mean(vals) * T * T, rel=1e-5)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_jsd_matches_naive(T):
    t, s = rnd(B, S, V, scale=2), rnd(B, S, V, scale=2, seed=1)
    mask = token_mask()
    vals = []
    for tr, sr in zip(rows_of(t, mask), rows_of(s, mask)):
        p, q = softmax_row(tr, T), softmax_row(sr, T)
        m = [(a + b) / 2 for a, b in zip(p, q)]
        vals.append(0.5 * sum(a * math.log(a / c) for a, c in zip(p, m))
                    + 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m)))
    got = grad_check(L.jsd, t, s, mask=mask, T=T)
    assert got.item() == pytest.approx(naive_mean(vals), rel=1e-5)


def test_kl_bf16_inputs_accumulate_in_fp32():
    t, s = rnd(B, S, 64, scale=4).bfloat16(), rnd(B, S, 64, scale=4, seed=1).bfloat16()
    p = [softmax_row(r, 2.0) for r in rows_of(t, None)]
    q = [softmax_row(r, 2.0) for r in rows_of(s, None)]
    got = grad_check(L.kl, t, s, T=2.0)
    assert got.item() == pytest.approx(naive_mean(naive_kl_rows(p, q)) * 4, rel=1e-4)


def test_kl_identical_inputs_is_zero():
    x = rnd(B, S, V)
    assert L.kl(x, x.clone(), T=3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_temperature_on_probs_is_rejected():
    p = torch.softmax(rnd(2, V), -1)
    with pytest.raises(RunError, match="T=2"):
        L.kl(p, p, inputs="probs", T=2.0)
    with pytest.raises(RunError, match="inputs"):
        L.kl(p, p, inputs="prob")


# ---------------------------------------------------------------- ce


def test_ce_matches_naive_with_ignore_and_mask():
    logits = rnd(B, S, V, scale=2)
    tgt = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    tgt[1, 2] = -100
    mask = token_mask()
    vals = []
    for bi, i in itertools.product(range(B), range(S)):
        if tgt[bi, i] == -100 or not mask[bi, i]:
            continue
        q = softmax_row(logits[bi, i].double().tolist())
        vals.append(-math.log(q[tgt[bi, i]]))
    got = grad_check_ce(logits, tgt, mask)
    assert got.item() == pytest.approx(naive_mean(vals), rel=1e-5)


def grad_check_ce(logits, tgt, mask):
    pred = logits.clone().requires_grad_(True)
    out = L.ce(tgt, pred, mask=mask)
    out.backward()
    assert torch.isfinite(pred.grad).all()
    return out


def test_ce_classification_and_shape_error():
    logits = rnd(4, 3)
    labels = torch.tensor([0, 2, 1, -100])
    expect = naive_mean([-math.log(softmax_row(logits[i].double().tolist())[labels[i]]) for i in range(3)])
    assert L.ce(labels, logits).item() == pytest.approx(expect, rel=1e-5)
    with pytest.raises(RunError, match=r"\[5\].*\[4, 3\]"):
        L.ce(torch.zeros(5, dtype=torch.long), logits)


# ---------------------------------------------------------------- regression losses


def elements(t, s, mask):
    """(target, pred) float64 pairs of every element in a kept row."""
    out = []
    for tr, sr in zip(rows_of(t, mask), rows_of(s, mask)):
        out.extend(zip(tr, sr))
    return out


def test_mse_matches_naive():
    t, s = rnd(B, S, D), rnd(B, S, D, seed=1)
    mask = token_mask()
    expect = naive_mean([(b - a) ** 2 for a, b in elements(t, s, mask)])
    assert grad_check(L.mse, t, s, mask=mask).item() == pytest.approx(expect, rel=1e-5)


def test_mse_attention_scores_excludes_padded_keys():
    km = token_mask()
    t, s = rnd(B, 2, S, S), rnd(B, 2, S, S, seed=1)
    vals = [(s[b, h, i, j].item() - t[b, h, i, j].item()) ** 2
            for b, h, i, j in itertools.product(range(B), range(2), range(S), range(S)) if km[b, i] and km[b, j]]
    assert L.mse(t, s, mask=km, key_mask=km).item() == pytest.approx(naive_mean(vals), rel=1e-5)


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_smooth_l1_matches_naive(beta):
    t, s = rnd(B, S, D, scale=2), rnd(B, S, D, scale=2, seed=1)
    mask = token_mask()

    def huber(a, b):
        d = abs(b - a)
        return 0.5 * d * d / beta if d < beta else d - 0.5 * beta

    expect = naive_mean([huber(a, b) for a, b in elements(t, s, mask)])
    assert grad_check(L.smooth_l1, t, s, mask=mask, beta=beta).item() == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_hinge_mse_matches_naive(margin):
    t, s = rnd(B, S, D), rnd(B, S, D, seed=1)
    mask = token_mask()
    expect = naive_mean([max(0.0, abs(b - a) - margin) ** 2 for a, b in elements(t, s, mask)])
    assert grad_check(L.hinge_mse, t, s, mask=mask, margin=margin).item() == pytest.approx(expect, rel=1e-5)
    if margin == 0.0:
        assert L.hinge_mse(t, s, mask=mask).item() == pytest.approx(L.mse(t, s, mask=mask).item(), rel=1e-6)


def test_sse_matches_naive():
    t, s = rnd(5, D), rnd(5, D, seed=1)
    mask = torch.tensor([True, True, False, True, True])
    expect = naive_mean([sum((b - a) ** 2 for a, b in zip(tr, sr)) for tr, sr in zip(rows_of(t, mask), rows_of(s, mask))])
    assert grad_check(L.sse, t, s, mask=mask).item() == pytest.approx(expect, rel=1e-5)


def test_cos_matches_naive_dot_over_norms():
    t, s = rnd(B, S, D), rnd(B, S, D, seed=1)
    mask = token_mask()
    vals = []
    for tr, sr in zip(rows_of(t, mask), rows_of(s, mask)):
        dot = sum(a * b for a, b in zip(tr, sr))
        vals.append(1 - dot / (math.sqrt(sum(a * a for a in tr)) * math.sqrt(sum(b * b for b in sr))))
    assert grad_check(L.cos, t, s, mask=mask).item() == pytest.approx(naive_mean(vals), rel=1e-5)


def test_regression_bf16_inputs():
    t, s = rnd(B, S, D).bfloat16(), rnd(B, S, D, seed=1).bfloat16()
    expect = naive_mean([(b - a) ** 2 for a, b in elements(t, s, None)])
    assert grad_check(L.mse, t, s).item() == pytest.approx(expect, rel=1e-5)


# ---------------------------------------------------------------- contrastive


@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_nce_matches_naive(similarity):
    t, s = rnd(5, D), rnd(5, D, seed=1)
    mask = torch.tensor([True, True, False, True, True])
    tau = 0.2
    kept = [i for i in range(5) if mask[i]]

    def sim(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        if similarity == "dot":
            return dot
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    tl, sl = t.double().tolist(), s.double().tolist()
    vals = []
    for i in kept:
        scores = [sim(sl[i], tl[j]) / tau for j in kept]
        lse = math.log(sum(math.exp(v) for v in scores))
        vals.append(lse - sim(sl[i], tl[i]) / tau)
    got = grad_check(L.nce, t, s, mask=mask, tau=tau, similarity=similarity)
    assert got.item() == pytest.approx(naive_mean(vals), rel=1e-5)


def test_nce_rejects_token_inputs():
    with pytest.raises(RunError, match="pool first"):
        L.nce(rnd(2, 3, D), rnd(2, 3, D))


# ---------------------------------------------------------------- relations


def naive_dist(x, i, j):
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(x[i], x[j])))


def naive_distance_loss(t, s, mask, window, beta=1.0):
    vals = []
    for b in range(t.shape[0]):
        tl, sl = t[b].double().tolist(), s[b].double().tolist()
        n = len(tl)
        pairs = [(i, j) for i in range(n) for j in range(n)
                 if i != j and mask[b, i] and mask[b, j] and (window is None or abs(i - j) <= window // 2)]
        if not pairs:
            continue
        mt = naive_mean([naive_dist(tl, i, j) for i, j in pairs])
        ms = naive_mean([naive_dist(sl, i, j) for i, j in pairs])
        for i, j in pairs:
            d = abs(naive_dist(sl, i, j) / ms - naive_dist(tl, i, j) / mt)
            vals.append(0.5 * d * d / beta if d < beta else d - 0.5 * beta)
    return naive_mean(vals)


@pytest.mark.parametrize("window", [None, 3])
def test_distance_matches_naive(window):
    t, s = rnd(B, S, D), rnd(B, S, 5, seed=1)  # widths may differ
    mask = token_mask()
    got = grad_check(L.distance, t, s, mask=mask, window=window)
    assert got.item() == pytest.approx(naive_distance_loss(t, s, mask, window), rel=1e-4)


def test_distance_sample_level():
    t, s = rnd(6, D), rnd(6, 4, seed=1)
    got = L.distance(t, s)
    assert got.item() == pytest.approx(naive_distance_loss(t[None], s[None], torch.ones(1, 6, dtype=torch.bool), None), rel=1e-4)


def naive_cos_angle(x, a, p, q):
    u = [x[p][k] - x[a][k] for k in range(len(x[a]))]
    v = [x[q][k] - x[a][k] for k in range(len(x[a]))]
    dot = sum(m * n for m, n in zip(u, v))
    return dot / (math.sqrt(sum(m * m for m in u)) * math.sqrt(sum(n * n for n in v)))


def naive_attention(x, real, heads):
    """att[h][i][j]: softmax over the real keys j of x_i . x_j / sqrt(d_h) in relation head h (real queries i)."""
    d = len(x[0]) // heads
    att = []
    for h in range(heads):
        part = [row[h * d:(h + 1) * d] for row in x]
        rows = {}
        for i in real:
            logits = {j: sum(a * b for a, b in zip(part[i], part[j])) / math.sqrt(d) for j in real}
            top = max(logits.values())
            z = sum(math.exp(v - top) for v in logits.values())
            rows[i] = {j: math.exp(v - top) / z for j, v in logits.items()}
        att.append(rows)
    return att


def naive_angle_loss(t, s, mask, window=None, topk=None, beta=1.0, heads=1):
    vals = []
    for b in range(t.shape[0]):
        tl, sl = t[b].double().tolist(), s[b].double().tolist()
        n = len(tl)
        real = [j for j in range(n) if mask[b, j]]
        anchors = real
        if topk is not None:  # MGSKD: the k most attended tokens of the teacher, each with the k it attends to most
            att = naive_attention(tl, real, heads)
            received = {j: sum(att[h][i][j] for h in range(heads) for i in real) for j in real}
            anchors = sorted(real, key=lambda j: -received[j])[:topk]
        for a in anchors:
            cand = [j for j in real if j != a]
            if window is not None:
                cand = [j for j in cand if abs(j - a) <= window // 2]
            if topk is not None:
                cand = sorted(cand, key=lambda j: -sum(att[h][a][j] for h in range(heads)))[:topk]
            for p in cand:
                for q in cand:
                    if p == q:
                        continue
                    d = abs(naive_cos_angle(sl, a, p, q) - naive_cos_angle(tl, a, p, q))
                    vals.append(0.5 * d * d / beta if d < beta else d - 0.5 * beta)
    return naive_mean(vals)


@pytest.mark.parametrize("window,topk,heads", [(None, None, None), (3, None, None), (None, 3, None), (None, 3, 2),
                                              (None, 2, 4)])
def test_angle_matches_naive(window, topk, heads):
    t, s = rnd(B, S, D), rnd(B, S, 5, seed=1)
    mask = token_mask()
    got = grad_check(L.angle, t, s, mask=mask, window=window, topk=topk, beta=0.5, heads=heads)
    want = naive_angle_loss(t, s, mask, window, topk, beta=0.5, heads=heads or 1)
    assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_angle_top_k_picks_the_most_attended_tokens_not_the_nearest():
    # token 0 is far from everything but, with a large norm along the shared direction, every query attends to it
    t = torch.zeros(1, 4, 2)
    t[0, :, 0] = torch.tensor([6.0, 1.0, 1.1, 0.9])
    t[0, :, 1] = torch.tensor([0.0, 0.3, -0.2, 0.1])
    keep = torch.ones(1, 4, dtype=torch.bool)
    anchors, ok, ids, valid = L.attended_triplets(t, keep, 2, 1)
    assert ok.all() and anchors[0, 0] == 0  # the most attended point is an anchor
    assert bool(valid.all()) and (ids[0] == 0).any()  # and the others attend to it most


def test_relations_are_zero_for_scaled_rotated_copies():
    t = rnd(2, S, D)
    q, _ = torch.linalg.qr(rnd(D, D, seed=9))
    s = 3.0 * t @ q + 1.5  # distances scale, angles are unchanged
    assert L.distance(t, s).item() == pytest.approx(0.0, abs=1e-6)
    assert L.angle(t, s).item() == pytest.approx(0.0, abs=1e-6)


def test_relation_option_errors():
    with pytest.raises(RunError, match="window and topk"):
        L.angle(rnd(1, 4, D), rnd(1, 4, D), window=3, topk=2)
    with pytest.raises(RunError, match=r"\[1, 4, 8\].*\[1, 5, 8\]"):
        L.distance(rnd(1, 4, D), rnd(1, 5, D))


# ---------------------------------------------------------------- sparse teacher


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_sparse_kl_equals_dense_kl_at_full_k(T):
    t, s = rnd(B, S, V, scale=3), rnd(B, S, V, scale=3, seed=1)
    mask = token_mask()
    top = L.topk_compress(t, V, T)
    assert torch.all(top.tail_mass < 1e-6)
    dense = L.kl(t, s, mask=mask, T=T)
    pred = s.clone().requires_grad_(True)
    sparse = L.sparse_kl(*top, pred, T, mask=mask)
    sparse.backward()
    assert torch.isfinite(pred.grad).all()
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5)


def test_sparse_kl_bucket_form_matches_naive_and_bounds_dense():
    t, s = rnd(B, S, V, scale=4), rnd(B, S, V, scale=3, seed=1)
    k, T = 4, 1.5
    top = L.topk_compress(t, k, T)
    vals = []
    for tr, sr in zip(rows_of(t, None), rows_of(s, None)):
        p, q = softmax_row(tr, T), softmax_row(sr, T)
        ids = sorted(range(V), key=lambda i: -p[i])[:k]
        p_tail = 1 - sum(p[i] for i in ids)
        q_tail = 1 - sum(q[i] for i in ids)
        vals.append(sum(p[i] * math.log(p[i] / q[i]) for i in ids) + p_tail * math.log(p_tail / q_tail))
    got = L.sparse_kl(*top, s, T)
    assert got.item() == pytest.approx(naive_mean(vals) * T * T, rel=1e-4)
    assert got.item() <= L.kl(t, s, T=T).item() + 1e-6


def test_sparse_kl_close_to_dense_for_peaked_teacher():
    t, s = rnd(B, S, 50, scale=8), rnd(B, S, 50, scale=2, seed=1)
    dense = L.kl(t, s).item()
    sparse = L.sparse_kl(*L.topk_compress(t, 10), s).item()
    assert sparse == pytest.approx(dense, rel=0.05)
    assert L.compute_loss("sparse_kl", L.topk_compress(t, 10), s).item() == pytest.approx(sparse)


def test_topk_compress_rejects_bad_k():
    with pytest.raises(RunError, match="1..11"):
        L.topk_compress(rnd(2, V), 0)


# ---------------------------------------------------------------- shared behaviour


SAME_SHAPE = ["kl", "soft_ce", "jsd", "mse", "smooth_l1", "hinge_mse", "sse", "cos", "nce"]


@pytest.mark.parametrize("name", SAME_SHAPE)
def test_shape_mismatch_names_both_shapes(name):
    with pytest.raises(RunError, match=r"target shape \[4, 8\] and pred shape \[4, 6\]"):
        L.LOSSES[name](rnd(4, 8), rnd(4, 6))


@pytest.mark.parametrize("name", SAME_SHAPE)
def test_empty_mask_gives_zero_and_finite_grad(name):
    mask = torch.zeros(4, dtype=torch.bool)
    out = grad_check(L.LOSSES[name], rnd(4, 8), rnd(4, 8, seed=1), mask=mask)
    assert out.item() == 0.0


def test_bad_mask_shape_is_named():
    with pytest.raises(RunError, match=r"mask shape \[3, 5\]"):
        L.mse(rnd(B, S, D), rnd(B, S, D), mask=torch.ones(3, 5, dtype=torch.bool))


def test_registry_lookup_and_options():
    assert set(L.LOSSES) >= {"kl", "soft_ce", "ce", "mse", "smooth_l1", "cos", "jsd", "nce", "sse",
                             "hinge_mse", "angle", "distance", "sparse_kl"}
    with pytest.raises(RunError, match="did you mean 'kl'"):
        L.get_loss("kll")
    assert {"T", "scale_t2", "reverse", "inputs", "key_mask"} <= L.loss_options("kl")
    with pytest.raises(RunError, match="no option 'temp'"):
        L.check_options("kl", {"temp": 2.0})
    with pytest.raises(RunError, match="did you mean 'margin'"):
        L.compute_loss("hinge_mse", rnd(2, 3), rnd(2, 3), margn=0.1)
    got = L.compute_loss("kl", rnd(2, V), rnd(2, V, seed=1), T=2.0)
    assert got.item() == pytest.approx(L.kl(rnd(2, V), rnd(2, V, seed=1), T=2.0).item())


# ---------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, V), T=st.floats(0.5, 4.0), seed=st.integers(0, 1000))
def test_sparse_kl_is_between_zero_and_dense_kl(k, T, seed):
    t, s = rnd(2, 3, V, scale=3, seed=seed), rnd(2, 3, V, scale=3, seed=seed + 1)
    dense = L.kl(t, s, T=T).item()
    sparse = L.sparse_kl(*L.topk_compress(t, k, T), s, T).item()
    assert -1e-6 <= sparse <= dense + 1e-5 * max(1.0, dense)
    assert L.jsd(t, s, T=T).item() <= math.log(2) + 1e-6
