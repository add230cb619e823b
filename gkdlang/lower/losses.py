"""Loss terms and pairing: the arguments of a loss call paired by layer map, shapes checked, terms built."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from gkdlang import ast
from gkdlang import builtins as B
from gkdlang.diagnostics import did_you_mean
from gkdlang.spec import LossTerm, SelectVocab
from gkdlang.values import Item, ItemSet, LayerMap, Objective, PerModel, Symbol, Term
from gkdlang.lower.context import (Lowerer, Scope, default_of, describe, feat_group, fill_projection, fmt_number,
                                   vocab_label)
from gkdlang.lower.readers import items_of, read_kwargs, read_option, read_symbol_value, vocab_space


def check_relation_pair(lw: Lowerer, e: ast.Call, fn: str, t: Item, p: Item, rel,
                        heads: int | None) -> tuple[Item, Item]:
    """distance/angle relate items within each model: widths may differ, the related axis may not."""
    if t.feat.items != p.feat.items:
        raise lw.err("layer-count-mismatch", e.span, f"{fn} relates {t.feat.items or 'positions'} items of the "
                     f"target with {p.feat.items or 'positions'} of the prediction",
                     "stack as many items on both sides, e.g. stack(align(t.hidden, s.hidden, map: uniform))",
                     related=rel)
    if heads is not None:
        span = next(k.span for k in e.kwargs if k.key.name == "heads")
        for it in (t, p):
            if it.feat.dim is not None and it.feat.dim % heads:
                raise lw.err("relation-heads", span, f"{heads} relation heads do not divide width "
                             f"{it.feat.dim} of {describe(it)}", related=rel)
    return t, p


def check_ckd_relation(lw: Lowerer, e: ast.Call, fn: str, t: Item, options: dict) -> None:
    """ckd_distance / ckd_angle: layers: true relates a stack's layers; a window is odd (centred on a token)."""
    if fn not in ("ckd_distance", "ckd_angle"):
        return
    if options.get("layers") and not t.feat.items:
        raise lw.err("type-mismatch", e.span, f"{fn}(..., layers: true) relates stacked layers",
                     "stack both sides: stack([t.embeddings, align(t.hidden, s.hidden, map: uniform)])")
    window = options.get("window")
    if window is not None and (window % 2 == 0 or options.get("layers")):
        span = next(k.span for k in e.kwargs if k.key.name == "window")
        raise lw.err("bad-value", span, f"{fn}'s window is odd (centred on each token) and relates tokens "
                     f"(not with layers: true), got {window}")


def lower_loss(lw: Lowerer, e: ast.Call, fn: str, scope: Scope) -> Objective:
    if len(e.args) != 2:
        raise lw.err("bad-arity", e.span, f"{fn}(target, prediction) takes two signals, got {len(e.args)}")
    target_value = lw.ev(e.args[0], scope)
    targets = list(target_value) if isinstance(target_value, PerModel) else [target_value]
    pred_value = lw.ev(e.args[1], scope)
    if isinstance(pred_value, PerModel):
        raise lw.err("type-mismatch", e.args[1].span, f"the prediction of {fn} is one student's signal, not a "
                     "list of models' (a list of teachers goes in the first argument)")
    pred = items_of(lw, pred_value, e.args[1], fn)
    spec_opts = dict(B.LOSSES[fn].options, map="map", average="symbol")
    kw = read_kwargs(lw, e, spec_opts)
    options: dict[str, Any] = {}
    for key, kind in B.LOSSES[fn].options.items():
        if key in kw:
            options[key] = read_option(lw, kw[key], key, kind, scope)
    if "T" in options:
        t = options["T"]
        if min(t.value, t.end if t.end is not None else t.value, t.after if t.after is not None else t.value) <= 0:
            raise lw.err("bad-temperature", kw["T"].span, f"temperature must be positive, got {fmt_number(t.value)}")
    if fn == "gjsd" and "beta" in options and not 0 <= options["beta"] <= 1:
        raise lw.err("bad-value", kw["beta"].span, f"gjsd's beta is in [0, 1] (0 = forward KL, 1 = reverse KL), got "
                     f"{fmt_number(options['beta'])}")
    average = read_symbol_value(lw, kw.get("average"), "average", B.LOSS_AVERAGES, scope,
                                default_of(LossTerm, "average"))
    layer_map = None
    if "map" in kw:
        layer_map = lw.ev(kw["map"], scope)
        if isinstance(layer_map, Symbol) or not isinstance(layer_map, LayerMap):
            raise lw.err("bad-layer-map", kw["map"].span, "map is uniform, skip, last, first or pairs(...)",
                         did_you_mean(getattr(layer_map, "name", ""), B.LAYER_MAPS))
    terms: list[Term] = []
    for value in targets:  # a list of teachers: the terms of each, in list order
        pairs = pair_items(lw, e, items_of(lw, value, e.args[0], fn), pred, layer_map)
        terms.extend(replace(lower_term(lw, e, fn, t, p, options, scope.method), average=average)
                     for t, p in pairs)
    return Objective(tuple(terms))


def pair_items(lw: Lowerer, e: ast.Call, target: ItemSet, pred: ItemSet,
               lmap: LayerMap | None) -> list[tuple[Item, Item]]:
    if lmap is None:
        if len(target.items) != len(pred.items):
            hint = "add map: uniform (or skip, last, pairs(...))" if target.layered and pred.layered else None
            raise lw.err("layer-count-mismatch", e.span, f"{len(target.items)} target layers vs "
                         f"{len(pred.items)} prediction layers", hint)
        return list(zip(target.items, pred.items))
    if not (target.layered and pred.layered):
        raise lw.err("bad-layer-map", lmap.span, "a layer map pairs layered signals (hidden, attn_*, ...)")
    t_model, s_model = target.items[0].model, pred.items[0].model
    lt, ls = lw.models[t_model].arch.num_layers, lw.models[s_model].arch.num_layers
    by_layer = {it.layer: it for it in target.items}
    out = []
    for p in pred.items:
        j = map_layer(lw, lmap, p.layer, ls, lt, e)
        if j is None:
            continue
        if j not in by_layer:
            raise lw.err("bad-layer-map", lmap.span, f"map sends student layer {p.layer} to teacher layer {j}, "
                         "which the target signal does not include")
        out.append((by_layer[j], p))
    if not out:
        raise lw.err("bad-layer-map", lmap.span, "the layer map pairs no layers")
    return out


def map_layer(lw: Lowerer, lmap: LayerMap, j: int, ls: int, lt: int, e: ast.Call) -> int | None:
    if lmap.kind in ("uniform", "skip", "last") and lt < ls:
        raise lw.err("bad-layer-map", lmap.span, f"map {lmap.kind} needs a teacher at least as deep as the "
                     f"student ({lt} < {ls} layers)")
    if lmap.kind == "uniform" or lmap.kind == "skip":
        if lt % ls:
            raise lw.err("bad-layer-map", lmap.span, f"map {lmap.kind} needs teacher layers ({lt}) to be a "
                         f"multiple of student layers ({ls})", "use pairs(...) for an explicit map")
        if lmap.kind == "skip" and j == ls - 1:
            return None
        return (j + 1) * (lt // ls) - 1
    if lmap.kind == "last":
        return lt - ls + j
    if lmap.kind == "first":
        if j >= lt:
            raise lw.err("bad-layer-map", lmap.span, f"map first: teacher has only {lt} layers")
        return j
    table = dict(lmap.pairs)
    for s, t in lmap.pairs:
        if not (0 <= s < ls and 0 <= t < lt):
            raise lw.err("layer-out-of-range", lmap.span, f"pair ({s}, {t}) is outside student 0..{ls - 1} / "
                         f"teacher 0..{lt - 1}")
    return table.get(j)


def lower_term(lw: Lowerer, e: ast.Call, fn: str, t: Item, p: Item, options: dict, method: str | None = None) -> Term:
    loss = B.LOSSES[fn]
    p_model = lw.models.get(p.model) if p.model else None
    if p_model is None or p_model.role == "teacher":
        t_model = lw.models.get(t.model) if t.model else None
        if t_model is not None and t_model.role != "teacher":
            raise lw.err("no-gradient", e.args[1].span, f"the prediction (second argument) of {fn} must be a "
                         f"student signal; swap the arguments: {fn}(teacher, student)")
        raise lw.err("no-gradient", e.span, f"{fn} compares no student signal, so it trains nothing")
    t, p = check_pair(lw, e, fn, t, p, method, options)
    kind = feat_group(t.feat.kind)
    if kind not in {feat_group(k) for k in loss.accepts}:
        raise lw.err("type-mismatch", e.span, f"{fn} does not compare {t.feat.kind} signals",
                     f"{fn} takes: {', '.join(sorted(loss.accepts))}")
    options = dict(options)
    if fn in B.DISTRIBUTION_LOSSES and t.feat.probs:
        options["inputs"] = "probs"
    if fn in B.DISTRIBUTION_LOSSES and t.feat.kind == "attn" and not t.feat.probs:
        options["inputs"] = "logits"
    return Term(fn=fn, target=t, pred=p, options=options, span=e.span)


def check_pair(lw: Lowerer, e: ast.Call, fn: str, t: Item, p: Item, method: str | None = None,
               options: dict | None = None) -> tuple[Item, Item]:
    rel = [(e.args[0].span, f"target: {describe(t)}"), (e.args[1].span, f"prediction: {describe(p)}")]
    strict = B.STRICT_METHODS.get((method or "").split(".")[0])
    tk, pk = t.feat.kind, p.feat.kind
    if fn == "ce":
        ok = (tk, pk) in (("labels", "task_logits"), ("tokens", "logits"))
        if not ok:
            raise lw.err("shape-mismatch", e.span, f"ce compares labels with task_logits or tokens with logits, "
                         f"not {tk} with {pk}", related=rel)
        return t, p
    if feat_group(tk) != feat_group(pk):
        raise lw.err("shape-mismatch", e.span, f"{fn} compares {tk} with {pk}", related=rel)
    if tk == "attn" or tk == "relation":
        if t.feat.heads != p.feat.heads:
            what = "attention" if tk == "attn" else "relation"
            if strict:
                raise lw.err(strict[0], e.span, f"{what} heads differ: {t.feat.heads} (teacher) vs "
                             f"{p.feat.heads} (student) in {method}", strict[1], related=rel)
            raise lw.err("head-mismatch", e.span, f"{what} heads differ: {t.feat.heads} (target) vs "
                         f"{p.feat.heads} (prediction)", "compare relations with equal heads instead: "
                         "relation(x.query[i], heads: N) on both sides (MiniLMv2)", related=rel)
        return t, p
    if tk == "logits":
        if t.feat.vocab != p.feat.vocab:
            t = auto_select(lw, t, p, e, rel)
        return t, p
    if tk == "task_logits":
        if t.feat.classes != p.feat.classes:
            raise lw.err("shape-mismatch", e.span, f"task heads differ: {t.feat.classes} vs {p.feat.classes} "
                         "labels", related=rel)
        return t, p
    if fn in B.RELATION_LOSSES:
        check_ckd_relation(lw, e, fn, t, options or {})
        return check_relation_pair(lw, e, fn, t, p, rel, (options or {}).get("heads"))
    if p.feat.dim is None and t.feat.dim is not None:
        p = fill_projection(p, t.feat.dim)
    if t.feat.dim is None and p.feat.dim is not None:
        t = fill_projection(t, p.feat.dim)
    if t.feat.dim != p.feat.dim and strict:
        raise lw.err(strict[0], e.span, f"widths differ: {t.feat.dim} (teacher) vs {p.feat.dim} (student) "
                     f"in {method}", strict[1], related=rel)
    if t.feat.dim != p.feat.dim and fn == "cos":
        raise lw.err("cosine-width", e.span, f"cosine between vectors of different widths: {t.feat.dim} "
                     f"(target) vs {p.feat.dim} (prediction)", "DistilBERT's cosine loss needs the teacher's "
                     "hidden size in the student (it starts from the teacher's layers); otherwise compare "
                     f"cos(..., project({describe(p)})) explicitly", related=rel)
    if t.feat.dim != p.feat.dim:
        raise lw.err("dim-mismatch", e.span, f"widths differ: {t.feat.dim} (target) vs {p.feat.dim} "
                     f"(prediction)", f"project the student side: {fn}(..., project({describe(p)}))",
                     related=rel)
    return t, p


def auto_select(lw: Lowerer, t: Item, p: Item, e: ast.Call, rel) -> Item:
    """Teacher logits over the full vocabulary vs a compressed student: reduce to the kept columns (GLMD)."""
    vocab = p.feat.vocab or ""
    if vocab.startswith("vocab:"):
        spec = lw.vocabs[vocab[len("vocab:"):]]
        if vocab_space(lw, spec.source) == t.feat.vocab:
            node = SelectVocab(inputs=[t.node], vocab=spec.name)
            return replace(t, node=node, feat=replace(t.feat, vocab=vocab))
    raise lw.err("vocab-mismatch", e.span, f"logits over different vocabularies ({vocab_label(t.feat.vocab)} "
                 f"vs {vocab_label(p.feat.vocab)})", "distill between models sharing a tokenizer, or declare "
                 "a vocab block mapping the student's vocabulary", related=rel)
