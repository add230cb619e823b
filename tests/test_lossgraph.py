"""LossGraph on fixed tensors: totals equal the hand-computed sum of kernel calls; schedules, masks, gates."""

from __future__ import annotations

import pydantic
import pytest
import torch

from gkdlang.arch import arch_from_config
from gkdlang.spec import Gate, LossTerm, Normalize, OpNode, Pool, Project, Relation, Schedule, SelectVocab, SignalNode, Span
from runtime import losses as L
from runtime import transforms as T
from runtime.errors import RunError
from runtime.lossgraph import LossGraph

SPAN = Span(file="t.gkd", line=1, col=1, end_line=1, end_col=2)
B, S, V = 2, 6, 11


def _gpt2(width: int, heads: int = 2) -> object:
    return arch_from_config({"model_type": "gpt2", "n_layer": 2, "n_embd": width, "n_head": heads, "vocab_size": V})


DIMS = {"t": _gpt2(32), "s": _gpt2(16)}


def sig(model, kind, layer=None):
    return SignalNode(model=model, kind=kind, layer=layer)


def term(id_, fn, target, pred, **kw):
    return LossTerm(id=id_, fn=fn, target=target, pred=pred, span=SPAN, **kw)


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(0)
    attn = torch.ones(B, S, dtype=torch.long)
    attn[1, 4:] = 0
    tokens = torch.randint(0, V, (B, S), generator=g)
    tokens[:, 0] = -100
    batch = {
        "input_ids": torch.randint(0, V, (B, S), generator=g),
        "attention_mask": attn,
        "tokens": tokens,
        "labels": torch.tensor([0, 1]),
        "special_mask": torch.zeros(B, S, dtype=torch.bool),
    }
    signals = {
        "t": {
            ("logits", None): torch.randn(B, S, V, generator=g),
            ("hidden", 1): torch.randn(B, S, 32, generator=g),
            ("attn_scores", 1): torch.randn(B, 2, S, S, generator=g),
        },
        "s": {
            ("logits", None): torch.randn(B, S, V, generator=g, requires_grad=True),
            ("hidden", 0): torch.randn(B, S, 16, generator=g, requires_grad=True),
            ("attn_scores", 1): torch.randn(B, 2, S, S, generator=g),
        },
    }
    return signals, batch


def test_total_equals_sum_of_kernel_calls(data):
    signals, batch = data
    proj = Project(inputs=[sig("s", "hidden", 0)], dim_in=16, module="fit_dense")  # out: the target's width
    terms = [
        term("kd", "kl", sig("t", "logits"), sig("s", "logits"), mask="not pad",
             options={"T": Schedule(kind="linear", value=4.0, end=2.0)}, weight=Schedule(value=0.5)),
        term("hid", "mse", sig("t", "hidden", 1), proj, weight=Schedule(kind="linear", value=1.0, end=0.0)),
        term("hard", "ce", sig(None, "tokens"), sig("s", "logits"), weight=Schedule(value=2.0)),
        term("att", "mse", sig("t", "attn_scores", 1), sig("s", "attn_scores", 1), mask="not pad"),
        term("pooled", "cos", Pool(inputs=[sig("t", "hidden", 1)], how="mean"),
             Normalize(inputs=[Pool(inputs=[proj], how="mean")])),
    ]
    graph = LossGraph(terms, DIMS)
    assert list(graph.projections) == ["fit_dense"]  # shared key: one module
    progress = 0.25
    total, parts = graph(signals, batch, progress)

    t, s = signals["t"], signals["s"]
    pad = batch["attention_mask"].bool()
    projected = graph.projections["fit_dense"](s[("hidden", 0)])
    expected = {
        "kd": 0.5 * L.kl(t[("logits", None)], s[("logits", None)], mask=pad, T=3.5),
        "hid": 0.75 * L.mse(t[("hidden", 1)], projected),
        "hard": 2.0 * L.ce(batch["tokens"], s[("logits", None)]),
        "att": L.mse(t[("attn_scores", 1)], s[("attn_scores", 1)], mask=pad, key_mask=pad),
        "pooled": L.cos(T.pool(t[("hidden", 1)], "mean", pad), T.normalize(T.pool(projected, "mean", pad))),
    }
    assert set(parts) == set(expected)
    for key, value in expected.items():
        assert parts[key] == pytest.approx(value.item(), rel=1e-5), key
    assert total.item() == pytest.approx(sum(v.item() for v in expected.values()), rel=1e-5)
    total.backward()
    assert graph.projections["fit_dense"].linear.weight.grad.abs().sum() > 0
    assert s[("logits", None)].grad is not None


def test_masks_change_the_value(data):
    signals, batch = data
    terms = [term(f"m{m}", "kl", sig("t", "logits"), sig("s", "logits"), mask=m)
             for m in ("not pad", "masked", "cls", "not special")]
    graph = LossGraph(terms, DIMS)
    _, parts = graph(signals, batch, 0.0)
    tl, sl = signals["t"][("logits", None)], signals["s"][("logits", None)]
    cls = torch.zeros(B, S, dtype=torch.bool)
    cls[:, 0] = True
    assert parts["mcls"] == pytest.approx(L.kl(tl, sl, mask=cls).item(), rel=1e-5)
    assert parts["mmasked"] == pytest.approx(L.kl(tl, sl, mask=batch["tokens"] != -100).item(), rel=1e-5)
    assert parts["mnot pad"] != parts["mcls"]


def test_time_gates_and_zero_weight_skip(data):
    signals, batch = data
    terms = [
        term("early", "mse", sig("t", "hidden", 1), sig("t", "hidden", 1), gate=Gate(active_until=0.5)),
        term("late", "kl", sig("t", "logits"), sig("s", "logits"), gate=Gate(active_from=0.5)),
        term("fading", "kl", sig("t", "logits"), sig("s", "logits"), weight=Schedule(kind="linear", value=1, end=0)),
    ]
    graph = LossGraph(terms, DIMS)
    assert graph.active_terms(0.2) == {"early", "fading"}
    assert graph.active_terms(0.7) == {"late", "fading"}
    assert graph.active_terms(1.0) == {"late", "fading"}
    _, parts = graph(signals, batch, 1.0)
    assert set(parts) == {"late"}  # fading has weight 0 at the end: not computed


def test_random_groups_are_deterministic_per_epoch():
    gate = Gate(group="rail", choose=1, every="epoch")
    terms = [term(f"l{i}", "mse", sig("t", "hidden", 1), sig("t", "hidden", 1), gate=gate) for i in range(4)]
    a, b = LossGraph(terms, DIMS, seed=3), LossGraph(terms, DIMS, seed=3)
    draws = [a.active_terms(0.1, step=s, epoch=e) for e in range(8) for s in (0, 5)]
    assert all(len(d) == 1 for d in draws)
    assert draws == [b.active_terms(0.9, step=s, epoch=e) for e in range(8) for s in (0, 5)]
    assert a.active_terms(0.1, step=0, epoch=2) == a.active_terms(0.1, step=7, epoch=2)  # same epoch, same draw
    assert len({frozenset(d) for d in draws}) > 1  # re-drawn across epochs


def test_errors_name_the_term(data):
    signals, batch = data
    with pytest.raises(RunError, match=r"loss term 'x'.*did you mean 'kl'"):
        LossGraph([term("x", "kll", sig("t", "logits"), sig("s", "logits"))], DIMS)
    with pytest.raises(RunError, match=r"loss term 'y'.*unknown mask"):
        LossGraph([term("y", "kl", sig("t", "logits"), sig("s", "logits"), mask="odd")], DIMS)
    with pytest.raises(pydantic.ValidationError, match=r"squash"):  # an op the Spec does not know is not a node
        term("z", "mse", sig("t", "hidden", 1), OpNode(op="squash", inputs=[sig("s", "hidden", 0)]))
    graph = LossGraph([term("w", "mse", sig("t", "hidden", 0), sig("s", "hidden", 0))], DIMS)
    with pytest.raises(RunError, match=r"loss term 'w'.*t\.hidden\[0\] was not captured"):
        graph(signals, batch, 0.0)
    graph = LossGraph([term("v", "mse", sig("t", "hidden", 1), sig("s", "hidden", 0))], DIMS)
    with pytest.raises(RunError, match=r"loss term 'v'"):
        graph(signals, batch, 0.0)


def test_relation_and_select_vocab_ops_match_the_transforms(data):
    signals, batch = data
    keep = torch.tensor([0, 3, 5, 7])
    signals["s"][("logits", None)] = signals["s"][("logits", None)].detach()[..., :4]
    rel = lambda m, layer: Relation(inputs=[sig(m, "hidden", layer)], heads=4)  # noqa: E731
    terms = [
        term("rel", "kl", rel("t", 1), rel("s", 0), options={"inputs": "probs"}, mask="not pad"),
        term("vc", "kl", SelectVocab(inputs=[sig("t", "logits")], vocab="s"),
             sig("s", "logits"), options={"T": 2.0}),
    ]
    graph = LossGraph(terms, DIMS, keep_ids={"s": keep})
    _, parts = graph(signals, batch, 0.0)
    pad = batch["attention_mask"].bool()
    r_t = T.relation(signals["t"][("hidden", 1)], 4, pad)
    r_s = T.relation(signals["s"][("hidden", 0)], 4, pad)
    assert parts["rel"] == pytest.approx(L.kl(r_t, r_s, mask=pad, inputs="probs", key_mask=pad).item(), rel=1e-5)
    expected = L.kl(signals["t"][("logits", None)][..., keep], signals["s"][("logits", None)], T=2.0)
    assert parts["vc"] == pytest.approx(expected.item(), rel=1e-5)
    missing = LossGraph(terms[1:], DIMS)
    with pytest.raises(RunError, match="loss term 'vc'.*kept rows of vocab 's'"):
        missing(signals, batch, 0.0)


def test_average_all_positions_counts_masked_out_positions_as_zero_in_batch_and_per_example_values():
    """``average: all_positions`` (GKD's): sum over the kept positions / every position, for the batch value and
    for each example alone (weighted terms); the default ``kept`` averages over the kept positions."""
    from gkdlang.arch import arch_from_config
    from gkdlang.spec import LossTerm, SignalNode, Span
    from runtime.lossgraph import LossGraph, _Ctx

    span = Span(file="t", line=1, col=1, end_line=1, end_col=1)
    arch = arch_from_config({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 13})
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": mask}
    sq = ((s - t) ** 2).mean(-1) * mask  # [b, s] per-position MSE, masked-out positions 0
    for average, want, want_rows in (("kept", sq.sum() / mask.sum(), sq.sum(1) / mask.sum(1)),
                                     ("all_positions", sq.sum() / mask.numel(), sq.sum(1) / 5)):
        term = LossTerm(id="m", fn="mse", target=SignalNode(model="t", kind="hidden", layer=0),
                        pred=SignalNode(model="s", kind="hidden", layer=0), mask="not pad", average=average,
                        span=span)
        graph = LossGraph([term], {"t": arch, "s": arch})
        signals = {"t": {("hidden", 0): t}, "s": {("hidden", 0): s}}
        assert graph.term_value(term, signals, batch, 0.0).item() == pytest.approx(want.item(), rel=1e-6)
        rows = graph.per_example(term, signals, _Ctx(batch=batch, progress=0.0, term=term, step=0, epoch=0))
        assert torch.allclose(rows, want_rows, rtol=1e-6)
