"""planner.graph: signal graph shape, sharing, pruning per stage, liveness, byte counts and DOT export."""

from __future__ import annotations

import shutil

import pytest

from gkdlang.arch import arch_from_config
from gkdlang.spec import (ClusterSpec, DataSpec, LossTerm, ModelSpec, Pool, Project, ReplaceLayers, SelectVocab, Schedule, SignalNode,
                          Span, Spec, StageSpec)
from planner.graph import GraphRenderError, SignalKey, build_graph, numel, render, to_dot

SPAN = Span(file="t.gkd", line=1, col=1, end_line=1, end_col=1)


def bert(name: str, role: str, layers: int, hidden: int = 64, heads: int = 4, **kw) -> ModelSpec:
    cfg = {"model_type": "bert", "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
           "intermediate_size": 2 * hidden, "vocab_size": 1000, "max_position_embeddings": 64}
    return ModelSpec(name=name, role=role, source_kind="catalog" if role == "teacher" else "derived",
                     source="x" if role == "teacher" else None, arch=arch_from_config(cfg),
                     frozen=role == "teacher", span=SPAN, **kw)


def sig(model: str | None, kind: str, layer: int | None = None) -> SignalNode:
    return SignalNode(model=model, kind=kind, layer=layer)


def term(tid: str, fn: str, target, pred, **kw) -> LossTerm:
    return LossTerm(id=tid, fn=fn, target=target, pred=pred, span=SPAN, **kw)


def project(node, d_in=32, d_out=64, module="fit") -> Project:
    return Project(inputs=[node], dim_in=d_in, dim_out=d_out, module=module)


def stage(name: str, loss: list[LossTerm], teachers=("t",), students=("s",), **kw) -> StageSpec:
    return StageSpec(name=name, data="corpus", steps=10, batch=8, loss=loss, students=list(students),
                     teachers=list(teachers), span=SPAN, **kw)


def make_spec(stages: list[StageSpec], models: list[ModelSpec] | None = None, **cluster) -> Spec:
    models = models or [bert("t", "teacher", 6), bert("s", "student", 2, hidden=32)]
    data = DataSpec(name="corpus", format="text", paths=["x.txt"], seq_len=16, span=SPAN)
    return Spec(file="t.gkd", source_hash="0" * 64, models={m.name: m for m in models}, data={"corpus": data},
                stages=stages, cluster=ClusterSpec(span=SPAN, **cluster))


def tinybert_terms() -> list[LossTerm]:
    """TinyBERT-like: hidden map 2 <- 6 (uniform, k=3) with a shared projection, attention on each group's last."""
    out = []
    for j, i in ((0, 2), (1, 5)):
        out.append(term(f"hid{j}", "mse", sig("t", "hidden", i), project(sig("s", "hidden", j))))
        out.append(term(f"att{j}", "mse", sig("t", "attn_scores", i), sig("s", "attn_scores", j)))
    return out


def by_model(captures):
    return {c.model: c for c in captures}


# ---------------------------------------------------------------- pruning


def test_tinybert_prunes_teacher_to_deepest_used_block():
    spec = make_spec([stage("general", tinybert_terms()[:2])])  # only layer 2 of the 6-block teacher
    caps = by_model(build_graph(spec).captures("general"))
    assert caps["t"].stop_after_layer == 2
    assert caps["t"].needs_head is False
    assert [(p.kind, p.layer) for p in caps["t"].points] == [("attn_scores", 2), ("hidden", 2)]


def test_full_tinybert_teacher_runs_to_last_mapped_block_without_head():
    spec = make_spec([stage("general", tinybert_terms())])
    caps = build_graph(spec).captures("general")
    assert [c.model for c in caps] == ["s", "t"]  # students first
    t, s = by_model(caps)["t"], by_model(caps)["s"]
    assert t.stop_after_layer == 5 and not t.needs_head
    assert s.stop_after_layer is None  # a trained student always runs fully
    assert not s.needs_head


def test_eager_attention_only_where_consumed():
    terms = tinybert_terms()[:2] + [
        term("q", "mse", sig("t", "query", 4), project(sig("s", "query", 1), module="q")),
    ]
    caps = by_model(build_graph(make_spec([stage("g", terms)])).captures("g"))
    assert caps["t"].eager_attention_layers == [2]  # query[4] needs no eager attention
    assert caps["s"].eager_attention_layers == [0]
    assert caps["t"].stop_after_layer == 4


def test_logits_kd_needs_head_and_runs_whole_teacher():
    kd = term("kd", "kl", sig("t", "logits"), sig("s", "logits"), options={"T": Schedule(value=2.0)})
    caps = by_model(build_graph(make_spec([stage("kd", [kd])])).captures("kd"))
    assert caps["t"].needs_head and caps["t"].stop_after_layer is None
    assert caps["s"].needs_head


def test_data_targets_are_not_captures_and_unused_teachers_are_reported():
    models = [bert("t", "teacher", 6), bert("u", "teacher", 4), bert("s", "student", 2, hidden=32)]
    ce = term("ce", "ce", sig(None, "tokens"), sig("s", "logits"))
    hid = term("h", "mse", sig("t", "hidden", 1), project(sig("s", "hidden", 0)))
    sg = build_graph(make_spec([stage("a", [ce, hid], teachers=("t", "u"))], models))
    assert [c.model for c in sg.captures("a")] == ["s", "t"]
    assert all(p.kind != "tokens" for c in sg.captures("a") for p in c.points)
    assert sg.unused_teachers("a") == ["u"]
    assert "data:tokens" in sg.graph


def test_embeddings_only_teacher_stops_after_block_zero():
    emb = term("e", "mse", sig("t", "embeddings"), project(sig("s", "embeddings")))
    caps = by_model(build_graph(make_spec([stage("a", [emb])])).captures("a"))
    assert caps["t"].stop_after_layer == 0


def test_intervention_model_is_loaded_whole_without_points():
    ce = term("ce", "ce", sig(None, "labels"), sig("s", "logits"))
    iv = ReplaceLayers(models=["s", "t"], teacher="t", student="s", groups=[[0], [1]], p=Schedule(value=0.5), span=SPAN)
    sg = build_graph(make_spec([stage("a", [ce], interventions=[iv])]))
    t = by_model(sg.captures("a"))["t"]
    assert t.points == [] and t.stop_after_layer is None and not t.needs_head
    assert sg.unused_teachers("a") == []


def test_pruning_is_per_stage():
    kd = term("kd", "kl", sig("t", "logits"), sig("s", "logits"))
    sg = build_graph(make_spec([stage("general", tinybert_terms()[:2]), stage("task", [kd], after=["general"])]))
    assert by_model(sg.captures("general"))["t"].stop_after_layer == 2
    assert by_model(sg.captures("task"))["t"].points[0].kind == "logits"
    assert [str(k) for k in sg.captured_signals("task")] == ["s.logits", "t.logits"]


# ---------------------------------------------------------------- structure and sharing


def test_shared_signal_is_one_node_with_several_consumers():
    a = term("a", "mse", sig("t", "hidden", 5), project(sig("s", "hidden", 1)))
    b = term("b", "cos", sig("t", "hidden", 5), project(sig("s", "hidden", 1)))
    sg = build_graph(make_spec([stage("x", [a, b])]))
    key = SignalKey("t", "hidden", 5)
    assert sg.consumers(key) == ["x:a", "x:b"]
    # the identical projection subtree (same module key) is one op node too
    ops = [n for n, d in sg.graph.nodes(data=True) if d["type"] == "op"]
    assert len(ops) == 1 and sg.graph.nodes[ops[0]]["learned"]
    assert sg.learned_modules("x") == {"fit": 32 * 64 + 64}
    assert len(sg.captured_signals("x")) == 2


def test_block_chain_edges():
    sg = build_graph(make_spec([stage("g", tinybert_terms())]))
    g = sg.graph
    assert g.has_edge("sig:t.embeddings", "sig:t.hidden[0]")
    assert g.has_edge("sig:t.hidden[4]", "sig:t.hidden[5]")
    assert g.has_edge("sig:t.hidden[1]", "sig:t.attn_scores[2]")  # block 2 reads block 1's output
    assert g.nodes["sig:t.hidden[5]"]["shape"] == ("b", "s", 64)
    assert g.nodes["sig:t.attn_scores[5]"]["shape"] == ("b", 4, "s", "s")
    assert g.nodes["sig:t.hidden[5]"]["bytes_per_token"] == 64 * 2  # bf16 by default
    assert g.nodes["sig:t.attn_scores[5]"]["bytes_per_token"] is None
    assert g.has_edge("term:g:hid0", "stage:g")


def test_head_depends_on_last_block():
    kd = term("kd", "kl", sig("t", "logits"), sig("s", "logits"))
    g = build_graph(make_spec([stage("kd", [kd])])).graph
    assert g.has_edge("sig:t.hidden[5]", "sig:t.logits")
    assert g.has_edge("sig:s.hidden[1]", "sig:s.logits")


# ---------------------------------------------------------------- liveness and bytes


def test_last_use_is_the_last_reading_term():
    terms = tinybert_terms() + [term("again", "cos", sig("t", "hidden", 2), project(sig("s", "hidden", 0)))]
    last = build_graph(make_spec([stage("g", terms)])).last_use("g")
    assert last[SignalKey("t", "hidden", 2)] == "again"
    assert last[SignalKey("t", "hidden", 5)] == "hid1"
    assert last[SignalKey("t", "attn_scores", 2)] == "att0"
    assert all(k.model is not None for k in last)


def test_signal_bytes_per_model():
    sg = build_graph(make_spec([stage("g", tinybert_terms())]))
    b, s = 4, 16
    teacher = 2 * (b * s * 64 * 2) + 2 * (b * 4 * s * s * 2)  # hidden[2], hidden[5], attn_scores[2], attn_scores[5]
    student = 2 * (b * s * 32 * 2) + 2 * (b * 4 * s * s * 2)
    assert sg.signal_bytes("g", b, s) == {"s": student, "t": teacher}
    assert numel(("b", 4, "s", "s"), 2, 3) == 72


# ---------------------------------------------------------------- DOT


def test_dot_has_clusters_stage_and_collapsed_blocks(tmp_path):
    sg = build_graph(make_spec([stage("general", tinybert_terms())]))
    dot = to_dot(sg)
    assert dot.startswith("digraph gkd {") and dot.rstrip().endswith("}")
    assert "subgraph cluster_t " in dot and "subgraph cluster_s " in dot
    assert '"stage:general"' in dot
    assert '"sig:t.hidden[3]"' not in dot  # unread block outputs are collapsed ...
    assert "blocks 3..4" in dot  # ... into one labelled edge
    assert dot == to_dot(build_graph(make_spec([stage("general", tinybert_terms())])))  # deterministic
    out = render(sg, tmp_path / "g.dot")
    assert out.read_text() == dot


def test_render_errors_are_clear(tmp_path, monkeypatch):
    sg = build_graph(make_spec([stage("general", tinybert_terms())]))
    with pytest.raises(GraphRenderError, match="use .dot"):
        render(sg, tmp_path / "g.txt")
    monkeypatch.setattr(shutil, "which", lambda _: None)
    with pytest.raises(GraphRenderError, match="Graphviz"):
        render(sg, tmp_path / "g.svg")


# ---------------------------------------------------------------- fused heads


def gpt2(name: str, role: str, layers: int) -> ModelSpec:
    cfg = {"model_type": "gpt2", "n_layer": layers, "n_embd": 64, "n_head": 4, "vocab_size": 1000}
    return ModelSpec(name=name, role=role, source_kind="catalog" if role == "teacher" else "derived",
                     source="x" if role == "teacher" else None, arch=arch_from_config(cfg),
                     frozen=role == "teacher", span=SPAN)


def _fusable(loss, models=None, **kw):
    models = models or [gpt2("t", "teacher", 4), gpt2("s", "student", 2)]
    return build_graph(make_spec([stage("a", loss, **kw)], models)).fusable_heads("a")


def test_heads_read_only_by_chunked_losses_are_fusable():
    kl = term("kl", "kl", sig("t", "logits"), sig("s", "logits"))
    ce = term("ce", "ce", sig(None, "tokens"), sig("s", "logits"))
    assert _fusable([kl, ce]) == {"t", "s"}
    picked = SelectVocab(inputs=[sig("t", "logits")], vocab="v")
    assert _fusable([term("g", "gjsd", picked, sig("s", "logits"))]) == {"t", "s"}


def test_heads_read_by_other_kernels_transforms_or_interventions_are_not():
    mse = term("m", "mse", sig("t", "logits"), sig("s", "logits"))
    kl = term("kl", "kl", sig("t", "logits"), sig("s", "logits"))
    assert _fusable([kl, mse]) == frozenset()
    pooled = Pool(inputs=[sig("s", "logits")], how="mean")
    assert _fusable([term("kl", "kl", sig("t", "logits"), pooled)]) == {"t"}
    iv = ReplaceLayers(models=["s", "t"], teacher="t", student="s", groups=[[0, 1], [2, 3]], p=Schedule(value=0.5),
                       span=SPAN)
    assert _fusable([kl], interventions=[iv]) == frozenset()
    # BERT's MLM head is a transform then a decoder: not one linear layer over the base model's output
    assert _fusable([kl], models=[bert("t", "teacher", 6), bert("s", "student", 2, hidden=32)]) == frozenset()


def test_logit_losses_per_model():
    from planner.graph import logit_losses

    kl = term("kl", "kl", sig("t", "logits"), sig("s", "logits"))
    ce = term("ce", "ce", sig(None, "tokens"), sig("s", "logits"))
    assert logit_losses(stage("a", [kl, ce])) == {"t": ("kl",), "s": ("kl", "ce")}


# ---------------------------------------------------------------- the graph class (planner/digraph.py)


def test_digraph_agrees_with_networkx():
    """The signal graph's own DiGraph answers reachability, successors and attributes as networkx does."""
    import networkx as nx

    from planner.digraph import ancestors, descendants

    terms = tinybert_terms() + [term("kd", "kl", sig("t", "logits"), sig("s", "logits"))]
    ours = build_graph(make_spec([stage("g", terms)])).graph
    ref = ours.to_networkx()
    assert sorted(ours.edges()) == sorted(ref.edges()) and len(ours) == ref.number_of_nodes() > 20
    for node in ours:
        assert ancestors(ours, node) == nx.ancestors(ref, node)
        assert descendants(ours, node) == nx.descendants(ref, node)
        assert set(ours.successors(node)) == set(ref.successors(node))
        assert set(ours.predecessors(node)) == set(ref.predecessors(node))
        assert ours.nodes[node] == ref.nodes[node]
    u, v = next(iter(ours.edges()))
    assert ours.edges[u, v] == ref.edges[u, v] and ours.has_edge(u, v) and not ours.has_edge(v, u)
    with pytest.raises(KeyError):
        ancestors(ours, "no-such-node")
