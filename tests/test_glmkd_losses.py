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
    rows = [float(((s[i] - t[i]) ** 2).mean()) for i in range(5)]
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
