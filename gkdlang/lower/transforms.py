"""Transforms: project, relation, pool, normalize, select, attend, anneal, concat, mean, align, stack, spans."""

from __future__ import annotations

from dataclasses import replace

from gkdlang import ast
from gkdlang import builtins as B
from gkdlang.diagnostics import did_you_mean
from gkdlang.spec import (Anneal, Attend, Concat, Mean, Normalize, Pool, Project, Relation, SelectVocab, Spans, Stack,
                          ZeroPad)
from gkdlang.values import Feat, Item, ItemSet, LayerMap, PerModel, Symbol
from gkdlang.lower.context import Lowerer, Scope, default_of, describe, fill_projection
from gkdlang.lower.readers import (
    check_arity,
    items_of,
    read_bool,
    read_fraction,
    read_int,
    read_items,
    read_kwargs,
    read_model_arg,
    read_option,
)
from gkdlang.lower.losses import pair_items


def lower_transform(lw: Lowerer, e: ast.Call, name: str, scope: Scope) -> ItemSet | PerModel:
    if not e.args:
        raise lw.err("bad-arity", e.span, f"{name}(...) needs a signal")
    kw = read_kwargs(lw, e, B.TRANSFORMS[name])
    value = lw.ev(e.args[0], scope)
    if isinstance(value, PerModel) and name not in ("mean", "concat"):  # one transform (and module) per model
        return PerModel(TRANSFORMS[name](lw, e, items_of(lw, v, e.args[0], name), kw, scope) for v in value)
    xs = items_of(lw, value, e.args[0], name)
    return TRANSFORMS[name](lw, e, xs, kw, scope)


def project(lw: Lowerer, e, xs: ItemSet, kw, scope) -> ItemSet:
    check_arity(lw, e, 1, "project")
    out = None
    if "to" in kw:
        out = lw.models[read_model_arg(lw, kw["to"], scope, "to")].arch.hidden_size
    if "dim" in kw:
        out = read_int(lw, kw["dim"], "dim", minimum=1, scope=scope)
    shared = read_bool(lw, kw["shared"], "shared") if "shared" in kw else True
    extra = {"bias": read_bool(lw, kw["bias"], "bias", scope)} if "bias" in kw else {}
    key = lw.new_module("project")
    items = []
    for it in xs.items:
        if it.feat.kind not in ("hidden", "qkv", "pooled") or it.feat.dim is None:
            raise lw.err("type-mismatch", e.args[0].span, f"project() maps hidden-state-like signals, not "
                         f"{it.feat.kind}")
        module = key if shared else f"{key}.{it.layer}"
        node = Project(inputs=[it.node], dim_in=it.feat.dim, dim_out=out, module=module, **extra)
        items.append(replace(it, node=node, feat=replace(it.feat, dim=out)))
    return replace(xs, items=tuple(items))


def relation(lw: Lowerer, e, xs: ItemSet, kw, scope) -> ItemSet:
    check_arity(lw, e, 1, "relation")
    items = []
    for it in xs.items:
        if it.feat.kind not in ("hidden", "qkv") or it.feat.dim is None:
            raise lw.err("type-mismatch", e.args[0].span, f"relation() takes hidden states or query/key/value, "
                         f"not {it.feat.kind}")
        heads = read_int(lw, kw["heads"], "heads", minimum=1, scope=scope) if "heads" in kw else None
        heads = heads or default_heads(lw, it)
        if it.feat.dim % heads:
            raise lw.err("relation-heads", (kw.get("heads") or e).span,
                         f"{heads} relation heads do not divide width {it.feat.dim} of {describe(it)}")
        softmax = read_bool(lw, kw["softmax"], "softmax", scope) if "softmax" in kw else True
        extra = {"padded": read_bool(lw, kw["padded"], "padded", scope)} if "padded" in kw else {}
        node = Relation(inputs=[it.node], heads=heads, softmax=softmax, **extra)
        items.append(replace(it, node=node, feat=Feat("relation", heads=heads, probs=softmax)))
    return replace(xs, items=tuple(items))


def default_heads(lw: Lowerer, it: Item) -> int:
    a = lw.models[it.model].arch
    return a.num_heads if it.feat.dim % a.num_heads == 0 else 1


def pool(lw: Lowerer, e, xs: ItemSet, kw, scope) -> ItemSet:
    how = "mean"
    if len(e.args) > 1:
        how_v = lw.ev(e.args[1], scope)
        how = how_v.name if isinstance(how_v, Symbol) else None
    elif "how" in kw:
        how_v = lw.ev(kw["how"], scope)
        how = how_v.name if isinstance(how_v, Symbol) else None
    if how not in B.POOLS:
        raise lw.err("bad-value", e.span, "pool(x, mean|cls|max|mean_all)")
    items = []
    for it in xs.items:
        if it.feat.kind not in ("hidden", "qkv"):
            raise lw.err("type-mismatch", e.args[0].span, f"pool() takes hidden states, not {it.feat.kind}")
        node = Pool(inputs=[it.node], how=how)
        items.append(replace(it, node=node, feat=Feat("pooled", dim=it.feat.dim)))
    return replace(xs, items=tuple(items))


def normalize(lw: Lowerer, e, xs: ItemSet, kw, scope) -> ItemSet:
    check_arity(lw, e, 1, "normalize")
    items = tuple(replace(it, node=Normalize(inputs=[it.node])) for it in xs.items)
    return replace(xs, items=items)


def zero_pad(lw: Lowerer, e, xs: ItemSet, kw, scope) -> ItemSet:
    """zero_pad(x): x with its padded positions set to 0 (GKD's convention before a loss over every position)."""
    check_arity(lw, e, 1, "zero_pad")
    for it in xs.items:
        if it.feat.kind not in ("hidden", "qkv", "ffn", "logits"):
            raise lw.err("type-mismatch", e.args[0].span, f"zero_pad() takes per-token signals, not {it.feat.kind}")
    return replace(xs, items=tuple(replace(it, node=ZeroPad(inputs=[it.node])) for it in xs.items))


def select(lw: Lowerer, e, xs: ItemSet, kw, scope) -> ItemSet:
    check_arity(lw, e, 1, "select")
    if "vocab" not in kw or not isinstance(kw["vocab"], ast.Name) or kw["vocab"].id not in lw.vocabs:
        raise lw.err("type-mismatch", e.span, "select(logits, vocab: <name of a vocab block>)",
                     did_you_mean(getattr(kw.get("vocab"), "id", ""), lw.vocabs))
    name = kw["vocab"].id
    items = []
    for it in xs.items:
        if it.feat.kind != "logits":
            raise lw.err("type-mismatch", e.args[0].span, "select() takes logits")
        items.append(replace(it, node=SelectVocab(inputs=[it.node], vocab=name),
                             feat=replace(it.feat, vocab=f"vocab:{name}")))
    return replace(xs, items=tuple(items))


def attend(lw: Lowerer, e, xs: ItemSet, kw, scope) -> ItemSet:
    """attend(<teacher layers>, <student query>): per student item, ALP-KD's attention over teacher layers."""
    check_arity(lw, e, 2, "attend")
    query = read_items(lw, e.args[1], scope, "attend")
    for it in (*xs.items, *query.items):
        if it.feat.kind not in ("hidden", "qkv", "pooled"):
            raise lw.err("type-mismatch", e.span, f"attend() takes hidden states, not {it.feat.kind}")
    t_dim = xs.items[0].feat.dim
    if t_dim is not None:  # an open projection of the query takes the teacher's width
        query = replace(query, items=tuple(fill_projection(q, t_dim) if q.feat.dim is None else q
                                           for q in query.items))
    q_dim = query.items[0].feat.dim
    if t_dim != q_dim:
        raise lw.err("dim-mismatch", e.span, f"attend() needs equal widths: {t_dim} (teacher layers) vs "
                     f"{q_dim} (query)", "project the query: attend(t.hidden, project(s.hidden))")
    first = xs.items[0]
    items = tuple(Item(Attend(inputs=[q.node, *(t.node for t in xs.items)]), first.feat,
                       first.model, q.layer, e.span) for q in query.items)
    return ItemSet(items, layered=query.layered, span=e.span)


def anneal(lw: Lowerer, e, xs: ItemSet, kw, scope) -> ItemSet:
    """anneal(x, phi: linear(0, 1)): Annealing-KD's target ``phi * x``, phi following a schedule."""
    check_arity(lw, e, 1, "anneal")
    if "phi" not in kw:
        raise lw.err("missing-option", e.span, "anneal() needs 'phi', e.g. anneal(x, phi: linear(0.1, 1))")
    phi = read_option(lw, kw["phi"], "phi", "schedule", scope)
    items = tuple(replace(it, node=Anneal(inputs=[it.node], phi=phi))
                  for it in xs.items)
    return replace(xs, items=items)


def concat(lw: Lowerer, e, xs: ItemSet, kw, scope) -> ItemSet:
    return reduce_layers(lw, e, xs, "concat")


def mean(lw: Lowerer, e, xs: ItemSet, kw, scope) -> ItemSet:
    return reduce_layers(lw, e, xs, "mean")


def reduce_layers(lw: Lowerer, e, xs: ItemSet, op: str) -> ItemSet:
    check_arity(lw, e, 1, op)
    feats = {(it.feat.kind, it.feat.dim) for it in xs.items}
    if len(feats) != 1:
        raise lw.err("shape-mismatch", e.span, f"{op}() needs signals of one kind and width")
    kind, dim = feats.pop()
    out_dim = dim * len(xs.items) if op == "concat" and dim else dim
    node = (Concat if op == "concat" else Mean)(inputs=[it.node for it in xs.items])
    first = xs.items[0]
    return ItemSet((Item(node, replace(first.feat, dim=out_dim), first.model, None, e.span),), span=e.span)


def align(lw: Lowerer, e, xs: ItemSet, kw, scope) -> ItemSet:
    """align(t.hidden, s.hidden, map: uniform): the teacher items a layer map pairs with each student item."""
    check_arity(lw, e, 2, "align")
    ys = read_items(lw, e.args[1], scope, "align")
    if "map" not in kw:
        raise lw.err("missing-option", e.span, "align() needs map: uniform, skip, last, first or pairs(...)")
    lmap = lw.ev(kw["map"], scope)
    if not isinstance(lmap, LayerMap):
        raise lw.err("bad-layer-map", kw["map"].span, "map is uniform, skip, last, first or pairs(...)")
    items = tuple(replace(t, layer=p.layer) for t, p in pair_items(lw, e, xs, ys, lmap))
    return ItemSet(items, layered=True, span=e.span)


def stack(lw: Lowerer, e, xs: ItemSet, kw, scope) -> ItemSet:
    """stack(x): items stacked on a new axis [b, s, n, h]; relation losses then relate the n items (CKD)."""
    check_arity(lw, e, 1, "stack")
    feats = {(it.feat.kind, it.feat.dim) for it in xs.items}
    if len(feats) != 1 or xs.items[0].feat.kind not in ("hidden", "qkv"):
        raise lw.err("shape-mismatch", e.span, "stack() needs hidden states of one width")
    first = xs.items[0]
    node = Stack(inputs=[it.node for it in xs.items])
    feat = replace(first.feat, items=len(xs.items))
    return ItemSet((Item(node, feat, first.model, None, e.span),), span=e.span)


def spans(lw: Lowerer, e, xs: ItemSet, kw, scope) -> ItemSet:
    """spans(x, max: 40%): mean-pooled random contiguous spans of positions (MGSKD's span level)."""
    check_arity(lw, e, 1, "spans")
    longest = read_fraction(lw, kw["max"], "max", scope) if "max" in kw else default_of(Spans, "max_fraction")
    if longest <= 0:
        raise lw.err("bad-value", kw["max"].span, "max must be above 0%")
    items = []
    for it in xs.items:
        if it.feat.kind not in ("hidden", "qkv"):
            raise lw.err("type-mismatch", e.args[0].span, f"spans() takes hidden states, not {it.feat.kind}")
        items.append(replace(it, node=Spans(inputs=[it.node], max_fraction=longest)))
    return replace(xs, items=tuple(items))


#: transform name (builtins.TRANSFORMS) -> lowering; each takes (lw, call, input items, keyword args, scope)
TRANSFORMS = {
    "project": project, "relation": relation, "pool": pool, "normalize": normalize, "select": select,
    "attend": attend, "anneal": anneal, "concat": concat, "mean": mean, "align": align, "stack": stack, "zero_pad": zero_pad,
    "spans": spans,
}
