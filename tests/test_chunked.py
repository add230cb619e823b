"""Chunked and fused logit kernels (runtime/chunked.py) against the dense autograd references, and gjsd against
a naive float64 formula of TRL's generalized JSD."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from runtime import losses as L
from runtime.chunked import HeadLogits
from runtime.errors import RunError

B, S, V, H = 3, 7, 53, 16


def rnd(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + sum(shape))
    return torch.randn(*shape, generator=g) * scale


def padded_mask():
    m = torch.ones(B, S, dtype=torch.bool)
    m[0, -3:] = False  # padding rows
    m[2, 4:] = False
    return m


def both(new, ref, target, pred):
    """(value, grad of pred) of ``new`` and ``ref`` on copies of pred."""
    out = []
    for fn in (new, ref):
        x = pred.clone().requires_grad_(True)
        value = fn(target, x)
        value.backward()
        out.append((value.detach(), x.grad))
    return out


def assert_close(a, b, rel=1e-5):
    (va, ga), (vb, gb) = a, b
    assert va.item() == pytest.approx(vb.item(), rel=rel, abs=1e-7)
    assert (ga - gb).abs().max().item() <= rel * gb.abs().max().item() + 1e-9


DISTS = [
    ("kl", {}, L.kl, L.dense_kl),
    ("kl reverse", {"reverse": True}, L.kl, L.dense_kl),
    ("kl no T^2", {"scale_t2": False}, L.kl, L.dense_kl),
    ("soft_ce", {}, L.soft_ce, L.dense_soft_ce),
    ("soft_ce T^2", {"scale_t2": True}, L.soft_ce, L.dense_soft_ce),
    ("jsd", {}, L.jsd, L.dense_jsd),
    ("gjsd 0", {"beta": 0.0}, L.gjsd, L.dense_gjsd),
    ("gjsd 0.3", {"beta": 0.3}, L.gjsd, L.dense_gjsd),
    ("gjsd 1", {"beta": 1.0}, L.gjsd, L.dense_gjsd),
]


@pytest.mark.parametrize("name,opts,new,ref", DISTS, ids=[d[0] for d in DISTS])
@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("chunk", [None, 4, 1])  # 4 does not divide the 21 rows
@pytest.mark.parametrize("masked", [False, True])
def test_distribution_kernels_match_dense(name, opts, new, ref, T, chunk, masked):
    t, s = rnd(B, S, V, scale=3), rnd(B, S, V, scale=3, seed=1)
    mask = padded_mask() if masked else None
    got = both(lambda a, b: new(a, b, mask=mask, T=T, chunk=chunk, **opts),
               lambda a, b: ref(a, b, mask=mask, T=T, **opts), t, s)
    assert_close(*got)


def test_padding_rows_get_no_gradient_and_ignore_their_values():
    t, s = rnd(B, S, V), rnd(B, S, V, seed=1)
    mask = padded_mask()
    s_junk = s.clone()
    s_junk[~mask] = 1e4  # whatever padded rows hold
    x = s_junk.clone().requires_grad_(True)
    value = L.kl(t, x, mask=mask, chunk=5)
    value.backward()
    assert x.grad[~mask].abs().max().item() == 0.0
    assert value.item() == pytest.approx(L.dense_kl(t, s, mask=mask).item(), rel=1e-5)


def test_empty_mask_gives_zero_connected_loss():
    x = rnd(B, S, V).requires_grad_(True)
    value = L.kl(rnd(B, S, V, seed=2), x, mask=torch.zeros(B, S, dtype=torch.bool))
    value.backward()
    assert value.item() == 0.0 and x.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("chunk", [None, 4])
def test_ce_matches_cross_entropy_with_ignore_index_and_mask(chunk):
    s = rnd(B, S, V, scale=2)
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(3))
    ids[1, 2] = -100
    mask = padded_mask()
    got = both(lambda a, b: L.ce(a, b, mask=mask, chunk=chunk), lambda a, b: L.dense_ce(a, b, mask=mask), ids, s)
    assert_close(*got)
    with pytest.raises(RunError, match="outside the 53 classes"):
        L.ce(torch.full((B, S), V), s)


@pytest.mark.parametrize("side", ["target", "both"])
def test_vocabulary_columns_selected_inside_the_kernel(side):
    cols = torch.randperm(V, generator=torch.Generator().manual_seed(4))[:20]
    t = rnd(B, S, V, scale=2)
    s = rnd(B, S, 20, seed=1) if side == "target" else rnd(B, S, V, seed=1)
    pred_cols = None if side == "target" else cols
    pick = lambda x, c: x if c is None else x.index_select(-1, c)  # noqa: E731
    got = both(lambda a, b: L.kl(a, b, T=2.0, target_cols=cols, pred_cols=pred_cols, chunk=3, mask=padded_mask()),
               lambda a, b: L.dense_kl(pick(a, cols), pick(b, pred_cols), T=2.0, mask=padded_mask()), t, s)
    assert_close(*got)
    if side == "both":  # unselected student columns get exactly zero gradient
        x = s.clone().requires_grad_(True)
        L.kl(t, x, target_cols=cols, pred_cols=cols).backward()
        rest = torch.ones(V, dtype=torch.bool)
        rest[cols] = False
        assert x.grad[..., rest].abs().max().item() == 0.0


def test_sampled_cached_kl_matches_buffered_reference():
    w, ids = torch.rand(B, S, 10), torch.randint(0, V, (B, S, 10))
    neg = torch.randn(B, S)
    got = both(lambda a, b: L.sampled_kl(w, ids, neg, b, 2.0, mask=padded_mask(), chunk=4),
               lambda a, b: L.dense_sampled_kl(w, ids, neg, b, 2.0, mask=padded_mask()), None, rnd(B, S, V))
    assert_close(*got)


@pytest.mark.parametrize("k", [8, V])
def test_bucket_sparse_kl_matches_dense_form(k):
    t = rnd(B, S, V, scale=3)
    top = L.topk_compress(t, k, 1.5)
    got = both(lambda a, b: L.sparse_kl(*top, b, 1.5, mask=padded_mask(), chunk=4),
               lambda a, b: L.dense_sparse_kl(*top, b, 1.5, mask=padded_mask()), None, rnd(B, S, V, seed=1))
    assert_close(*got)


@pytest.mark.parametrize("fn,ref,opts", [(L.kl, L.dense_kl, {}), (L.gjsd, L.dense_gjsd, {"beta": 0.3}),
                                         (L.soft_ce, L.dense_soft_ce, {}), (L.kl, L.dense_kl, {"reverse": True})])
@pytest.mark.parametrize("teacher_fused", [False, True])
def test_fused_head_matches_materialised_logits(fn, ref, opts, teacher_fused):
    h, w, b = rnd(B, S, H), rnd(V, H, scale=0.3, seed=1), rnd(V, seed=2)
    th, tw = rnd(B, S, H, seed=3), rnd(V, H, scale=0.3, seed=4)
    teacher = HeadLogits(th, tw) if teacher_fused else F.linear(th, tw)
    grads = []
    for fused in (True, False):
        params = [x.clone().requires_grad_(True) for x in (h, w, b)]
        pred = HeadLogits(*params) if fused else F.linear(*params)
        target = teacher if fused else F.linear(th, tw)
        value = (fn if fused else ref)(target, pred, mask=padded_mask(), T=2.0, **({"chunk": 4} if fused else {}),
                                       **opts)
        value.backward()
        grads.append([value.detach()] + [p.grad for p in params])
    for a, c in zip(*grads):
        assert (a - c).abs().max().item() <= 1e-5 * c.abs().max().item() + 1e-9


def test_fused_ce_and_column_selected_head():
    h, w = rnd(B, S, H), rnd(V, H, scale=0.3, seed=1)
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(5))
    cols = torch.arange(0, V, 3)
    t = rnd(B, S, V, seed=6)
    for new, ref in ((lambda p: L.ce(ids, p, chunk=4), lambda z: L.dense_ce(ids, z)),
                     (lambda p: L.kl(t, p, target_cols=cols, pred_cols=cols, chunk=4),
                      lambda z: L.dense_kl(t.index_select(-1, cols), z.index_select(-1, cols)))):
        a = [x.clone().requires_grad_(True) for x in (h, w)]
        c = [x.clone().requires_grad_(True) for x in (h, w)]
        va = new(HeadLogits(*a))
        vc = ref(F.linear(*c))
        (va + 0 * va).backward()
        vc.backward()
        assert va.item() == pytest.approx(vc.item(), rel=1e-5)
        for x, y in zip(a, c):
            assert (x.grad - y.grad).abs().max().item() <= 1e-5 * y.grad.abs().max().item() + 1e-9


def test_bf16_inputs_are_computed_in_fp32_and_give_bf16_gradients():
    t, s = rnd(B, S, V, scale=3).bfloat16(), rnd(B, S, V, scale=3, seed=1).bfloat16()
    x = s.clone().requires_grad_(True)
    value = L.kl(t, x, T=2.0)
    value.backward()
    assert value.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert value.item() == pytest.approx(L.dense_kl(t, s, T=2.0).item(), rel=1e-5)


def test_outer_gradient_scales_the_precomputed_gradient():
    t, s = rnd(B, S, V), rnd(B, S, V, seed=1)
    x = s.clone().requires_grad_(True)
    (3.0 * L.kl(t, x)).backward()
    y = s.clone().requires_grad_(True)
    (3.0 * L.dense_kl(t, y)).backward()
    # relative to the gradient's scale: fp32 sums in another order differ by ~1e-9 absolute on near-zero entries
    assert (x.grad - y.grad).abs().max().item() <= 1e-5 * y.grad.abs().max().item()
    assert not torch.allclose(x.grad, y.grad / 3.0, rtol=1e-3)  # the outer 3x is really applied
    h, w = rnd(B, S, H), rnd(V, H, scale=0.3, seed=2)
    fused = [p.clone().requires_grad_(True) for p in (h, w)]
    plain = [p.clone().requires_grad_(True) for p in (h, w)]
    (3.0 * L.kl(t, HeadLogits(*fused), chunk=4)).backward()
    (3.0 * L.dense_kl(t, F.linear(*plain))).backward()
    for a, b in zip(fused, plain):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- gjsd vs a naive float64 formula


def naive_gjsd(t, s, beta, T):
    """TRL's generalized_jsd_loss written with Python floats, per row, mean over rows."""
    total = 0.0
    rows = 0
    for tr, sr in zip(t.double().reshape(-1, t.shape[-1]).tolist(), s.double().reshape(-1, s.shape[-1]).tolist()):
        p = _softmax([v / T for v in tr])
        q = _softmax([v / T for v in sr])
        if beta == 0:
            value = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        elif beta == 1:
            value = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
        else:
            m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
            value = beta * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m)) + \
                (1 - beta) * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m))
        total += value
        rows += 1
    return total / rows


def _softmax(z):
    top = max(z)
    e = [math.exp(v - top) for v in z]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.9])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_gjsd_matches_naive_trl_formula(beta, T):
    t, s = rnd(2, 3, 17, scale=2), rnd(2, 3, 17, scale=2, seed=1)
    assert L.gjsd(t, s, beta=beta, T=T).item() == pytest.approx(naive_gjsd(t, s, beta, T), rel=1e-5)


def test_gjsd_half_is_jsd_and_endpoints_are_kl():
    t, s = rnd(B, S, V), rnd(B, S, V, seed=1)
    assert L.gjsd(t, s, beta=0.5).item() == pytest.approx(L.jsd(t, s).item(), rel=1e-6)
    assert L.gjsd(t, s, beta=0.0, T=2).item() == pytest.approx(L.kl(t, s, T=2, scale_t2=False).item(), rel=1e-6)
    assert L.gjsd(t, s, beta=1.0).item() == pytest.approx(L.kl(t, s, reverse=True).item(), rel=1e-6)


def test_gjsd_rejects_beta_outside_unit_interval():
    with pytest.raises(RunError, match=r"beta must be in \[0, 1\], got 1.5"):
        L.gjsd(rnd(2, 5), rnd(2, 5), beta=1.5)


# ---------------------------------------------------------------- the runtime's fused capture


def _tiny(model_type, tied, seed):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {"gpt2": {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 97, "n_positions": 32},
           "llama": {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "intermediate_size": 64, "vocab_size": 97, "max_position_embeddings": 32}}[model_type]
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, tie_word_embeddings=tied, **cfg))


@pytest.mark.parametrize("model_type,tied", [("gpt2", True), ("llama", False), ("llama", True)])
def test_fused_capture_gives_the_same_loss_and_gradients(model_type, tied):
    from planner.plan import CapturePoint, ModelCapture
    from runtime.adapters.capture import capture

    student, teacher = _tiny(model_type, tied, 0).eval(), _tiny(model_type, tied, 1).eval()  # no dropout
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["attention_mask"][1, 6:] = 0
    results = []
    for fused in (False, True):
        cap = lambda m: ModelCapture(model=m, points=[CapturePoint(kind="logits")], stop_after_layer=None,  # noqa
                                     needs_head=True, fused_head=fused)
        t = capture(teacher, batch, cap("t"), grad=False).logits
        s = capture(student, batch, cap("s"), grad=True).logits
        assert isinstance(s, HeadLogits) == fused and isinstance(t, HeadLogits) == fused
        student.zero_grad(set_to_none=True)
        value = L.kl(t, s, T=2.0, mask=batch["attention_mask"].bool()) + 0.5 * L.ce(ids, s)
        value.backward()
        results.append((value.item(), {n: p.grad.clone() for n, p in student.named_parameters()}))
    (plain, g_plain), (fused_value, g_fused) = results
    assert fused_value == pytest.approx(plain, rel=1e-5)
    for name, g in g_plain.items():
        assert (g_fused[name] - g).abs().max().item() <= 1e-5 * max(g.abs().max().item(), 1e-6), name


def test_loss_graph_hands_kernels_raw_logits_and_column_ids():
    from gkdlang.arch import arch_from_config
    from gkdlang.spec import LossTerm, SelectVocab, SignalNode, Span
    from runtime.lossgraph import LossGraph

    span = Span(file="t", line=1, col=1, end_line=1, end_col=1)
    keep = torch.tensor([3, 0, 7, 9, 11])
    picked = SelectVocab(inputs=[SignalNode(model="t", kind="logits")], vocab="v")
    term = LossTerm(id="kl", fn="kl", target=picked, pred=SignalNode(model="s", kind="logits"), span=span,
                    options={"T": 2.0})
    arch = arch_from_config({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 13})
    graph = LossGraph([term], {"t": arch, "s": arch}, keep_ids={"v": keep})
    t = rnd(2, 4, 13).bfloat16()
    h, w = rnd(2, 4, 8).bfloat16().requires_grad_(True), rnd(5, 8, seed=1).bfloat16().requires_grad_(True)
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4)}
    total, _ = graph({"t": {("logits", None): t}, "s": {("logits", None): HeadLogits(h, w)}}, batch, 0.0)
    total.backward()
    expect = L.dense_kl(t.index_select(-1, keep), F.linear(h, w), T=2.0)
    assert total.item() == pytest.approx(expect.item(), rel=1e-2)  # bf16 head, fp32 loss
    assert h.grad.dtype == torch.bfloat16 and w.grad is not None


TRAINABLE = [d for d in DISTS if d[0] in ("kl", "kl reverse", "soft_ce", "jsd", "gjsd 0.3", "gjsd 1")]


@pytest.mark.parametrize("name,opts,new,ref", TRAINABLE, ids=[d[0] for d in TRAINABLE])
@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("fused", [False, True])
def test_a_target_with_a_graph_gets_its_gradient_chunk_by_chunk(name, opts, new, ref, chunk, fused):
    """Inside ``target_grad()`` (a teacher-side learned map) the chunked kernels train the target as autograd
    through the dense formula does; outside it the target stays a constant."""
    t0, mask = rnd(B, S, V, scale=3), padded_mask()
    h, w = rnd(B, S, H, seed=2), rnd(V, H, seed=3) * 0.5
    grads = {}
    for kind, fn in (("chunked", lambda a, b: new(a, b, mask=mask, T=2.5, chunk=chunk, **opts)),
                     ("dense", lambda a, b: ref(a, b.materialise() if isinstance(b, HeadLogits) else b, mask=mask,
                                                T=2.5, **opts))):
        t = t0.clone().requires_grad_(True)
        hh = h.clone().requires_grad_(True)
        pred = HeadLogits(hh, w) if fused else F.linear(hh, w)
        with L.target_grad():
            fn(t, pred).backward()
        grads[kind] = (t.grad, hh.grad)
    (gt, gh), (rt, rh) = grads["chunked"], grads["dense"]
    assert gt is not None and rt is not None
    assert (gt - rt).abs().max().item() <= 1e-5 * rt.abs().max().item()
    assert (gh - rh).abs().max().item() <= 1e-5 * rh.abs().max().item()
    assert gt[0, -3:].abs().max().item() == 0.0  # padding rows train nothing
    t = t0.clone().requires_grad_(True)
    new(t, F.linear(h, w).requires_grad_(True), mask=mask, T=2.5, chunk=chunk, **opts).backward()
    assert t.grad is None  # no target_grad: the target is a constant, as before


def test_target_gradient_with_selected_columns_lands_on_those_columns():
    keep = torch.tensor([3, 0, 7, 9, 11, 20, 40])
    t0, s = rnd(B, S, V, scale=3), rnd(B, S, len(keep), scale=3, seed=1)
    out = []
    for fn in (lambda a, b: L.kl(a, b, T=2.0, target_cols=keep, chunk=4),
               lambda a, b: L.dense_kl(a.index_select(-1, keep), b, T=2.0)):
        t = t0.clone().requires_grad_(True)
        with L.target_grad():
            fn(t, s.clone().requires_grad_(True)).backward()
        out.append(t.grad)
    assert (out[0] - out[1]).abs().max().item() <= 1e-5 * out[1].abs().max().item()
    others = torch.ones(V, dtype=torch.bool)
    others[keep] = False
    assert out[0][..., others].abs().max().item() == 0.0


def test_loss_graph_trains_a_teacher_side_map_feeding_a_chunked_kernel():
    """A KL whose target is a learned map of the teacher's states (the loss graph's trainable target) runs the
    chunked kernel and still trains the map, exactly as the dense formula does."""
    from gkdlang.arch import arch_from_config
    from gkdlang.spec import LossTerm, Project, SignalNode, Span
    from runtime.lossgraph import LossGraph

    span = Span(file="t", line=1, col=1, end_line=1, end_col=1)
    target = Project(inputs=[SignalNode(model="t", kind="hidden", layer=1)], module="t_map", dim_in=8, dim_out=13)
    term = LossTerm(id="kl", fn="kl", target=target, pred=SignalNode(model="s", kind="logits"), span=span,
                    options={"T": 2.0})
    arch = arch_from_config({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 13})
    graph = LossGraph([term], {"t": arch, "s": arch})
    th, s = rnd(2, 4, 8, seed=4), rnd(2, 4, 13, seed=5)
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4)}
    total, _ = graph({"t": {("hidden", 1): th}, "s": {("logits", None): s.clone().requires_grad_(True)}}, batch, 0.0)
    total.backward()
    proj = graph.projections["t_map"]
    got = [p.grad.clone() for p in proj.parameters()]
    assert all(g is not None and g.abs().max().item() > 0 for g in got)
    for p in proj.parameters():
        p.grad = None
    with L.target_grad():
        L.dense_kl(proj(th), s, T=2.0).backward()
    for g, p in zip(got, proj.parameters()):
        assert (g - p.grad).abs().max().item() <= 1e-5 * p.grad.abs().max().item()
