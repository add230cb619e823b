"""GKD-specific loss kernels (runtime/glmkd_losses.py) against naive formulas written here, value and gradient."""

from __future__ import annotations

import pytest
import torch

from runtime import losses as L
from runtime.errors import RunError


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("margin", [0.0, 0.8, 1.5, 100.0])
def test_gated_mse_matches_naive(margin):
    t, s = rnd(5, 3), rnd(5, 3, seed=1).requires_grad_(True)
    got = L.LOSSES["gated_mse"](t, s, margin=margin)
    rows = [float(((s[i].detach() - t[i]) ** 2).mean()) for i in range(5)]
    want = sum(r for r in rows if r > margin) / 5
    assert float(got) == pytest.approx(want, rel=1e-6, abs=1e-9)
    got.backward()
    for i, r in enumerate(rows):  # the gradient of a row that passes is the MSE's, of one that does not 0
        expect = 2 * (s[i] - t[i]).detach() / 3 / 5 if r > margin else torch.zeros(3)
        torch.testing.assert_close(s.grad[i], expect)


def test_gated_mse_mask_and_errors():
    t, s = rnd(4, 6, 3), rnd(4, 6, 3, seed=1)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(2)) > 0.4
    per = ((s - t) ** 2).mean(-1)
    want = torch.where(per > 0.5, per, torch.zeros(()))[mask].mean()
    assert float(L.LOSSES["gated_mse"](t, s, mask=mask, margin=0.5)) == pytest.approx(float(want), rel=1e-6)
    zero = L.LOSSES["gated_mse"](t, s.requires_grad_(True), mask=torch.zeros(4, 6, dtype=torch.bool))
    assert float(zero) == 0.0 and zero.requires_grad
    with pytest.raises(RunError, match="margin must be >= 0"):
        L.LOSSES["gated_mse"](t, s, margin=-1.0)
    with pytest.raises(RunError, match="shape"):
        L.LOSSES["gated_mse"](t, s[:, :2], margin=1.0)


def _ckd_dist_loop(t, s, real):
    """Per example and layer: for each real token i, KL over the other real tokens j of softmax(cos(x_i, x_j));
    summed, over the number of real (i, j) pairs (the diagonal included), as the CKD authors' WR_Dist."""
    total, pairs = 0.0, 0
    for b in range(t.shape[0]):
        for layer in range(t.shape[2]):
            idx = [i for i in range(t.shape[1]) if real[b, i]]
            pairs += len(idx) ** 2
            for i in idx:
                others = [j for j in idx if j != i]
                if not others:
                    continue
                ct = torch.stack([torch.cosine_similarity(t[b, i, layer], t[b, j, layer], dim=0) for j in others])
                cs = torch.stack([torch.cosine_similarity(s[b, i, layer], s[b, j, layer], dim=0) for j in others])
                p, log_q = torch.softmax(ct, 0), torch.log_softmax(cs, 0)
                total += float((p * (p.log() - log_q)).sum())
    return total / pairs


def _ckd_angle_window_loop(t, s, real, w):
    """Per example, layer and real token i: over the window j, k (clamped positions), squared error of
    cos(x_j - x_i, x_k - x_i) (0 where a difference is 0), over the number of counted triplets."""
    n, h = t.shape[1], (w - 1) // 2
    total, count = 0.0, 0

    def ang(x, i, j, k):
        a, c = x[j] - x[i], x[k] - x[i]
        return 0.0 if float(a.norm()) == 0 or float(c.norm()) == 0 else float(a @ c / a.norm() / c.norm())

    for b in range(t.shape[0]):
        for layer in range(t.shape[2]):
            for i in range(n):
                if not real[b, i]:
                    continue
                win = [min(max(i + o, 0), n - 1) for o in range(-h, h + 1)]
                for j in win:
                    for k in win:
                        total += (ang(s[b, :, layer], i, j, k) - ang(t[b, :, layer], i, j, k)) ** 2
                        count += 1
    return total / count


def test_ckd_relations_match_loops():
    t, s = rnd(2, 5, 3, 6), rnd(2, 5, 3, 4, seed=1)
    real = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert float(L.LOSSES["ckd_distance"](t, s, mask=real)) == pytest.approx(_ckd_dist_loop(t, s, real), rel=1e-5)
    assert float(L.LOSSES["ckd_angle"](t, s, mask=real, window=3)) == pytest.approx(
        _ckd_angle_window_loop(t, s, real, 3), rel=1e-5)
    # layers: true relates the 3 stacked states of each real position: the same loops on the transposed sets
    tl, sl = t.transpose(1, 2), s.transpose(1, 2)  # [b, L, s, d]: the L "tokens" of a position are its layers
    per_pos = [_ckd_dist_loop(tl[b:b + 1, :, p][:, :, None], sl[b:b + 1, :, p][:, :, None],
                              torch.ones(1, 3, dtype=torch.bool)) for b in range(2) for p in range(5) if real[b, p]]
    assert float(L.LOSSES["ckd_distance"](t, s, mask=real, layers=True)) == pytest.approx(
        sum(per_pos) / len(per_pos), rel=1e-5)


def test_ckd_relations_gradients_are_finite_with_padding_and_lone_tokens():
    t, s = rnd(2, 4, 3, 6), rnd(2, 4, 3, 4, seed=1).requires_grad_(True)
    real = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)  # one real token: no pair to relate
    value = sum(L.LOSSES[n](t, s, mask=real, **kw) for n, kw in
                (("ckd_distance", {}), ("ckd_distance", {"layers": True}), ("ckd_angle", {"window": 3}),
                 ("ckd_angle", {}), ("ckd_angle", {"layers": True})))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all() and float(s.grad.abs().sum()) > 0
    # a padded position is in no relation, except as a windowed neighbour (the authors' clamped window keeps it)
    s.grad = None
    sum(L.LOSSES[n](t, s, mask=real, **kw) for n, kw in (("ckd_distance", {}), ("ckd_angle", {}),
                                                          ("ckd_angle", {"layers": True}))).backward()
    assert float(s.grad[:, 3].abs().sum()) == 0
    with pytest.raises(RunError, match="window must be odd"):
        L.LOSSES["ckd_angle"](t, s, window=4)
    with pytest.raises(RunError, match="stack"):
        L.LOSSES["ckd_distance"](t[:, :, 0], s[:, :, 0], layers=True)


def test_cos_nce_matches_loops():
    """Per student example i: g_ij = 1 - mean over positions of cos(s_i, t_j); 1 - (sum_j g_ij - b g_ii) / (b - 1)
    / 2 + g_ii; the mean over i."""
    t, s = rnd(4, 3, 5), rnd(4, 3, 5, seed=1)
    b = 4
    g = [[1 - sum(float(torch.cosine_similarity(s[i, p], t[j, p], dim=0)) for p in range(3)) / 3 for j in range(b)]
         for i in range(b)]
    want = sum(1 - (sum(g[i]) - b * g[i][i]) / (b - 1) / 2 + g[i][i] for i in range(b)) / b
    assert float(L.LOSSES["cos_nce"](t, s)) == pytest.approx(want, rel=1e-5)
    pooled = L.LOSSES["cos_nce"](t[:, 0], s[:, 0].requires_grad_(True))
    pooled.backward()
    with pytest.raises(RunError, match="at least 2"):
        L.LOSSES["cos_nce"](t[:1], s[:1])
