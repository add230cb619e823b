"""The expression interpreter: one evaluator per AST node type, and the call dispatch to the other passes."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

from gkdlang import ast
from gkdlang import builtins as B
from gkdlang.diagnostics import did_you_mean
from gkdlang.spec import ModelSpec, Pool, Schedule, SignalNode, Span
from gkdlang.values import (
    DataRef,
    Feat,
    Item,
    ItemSet,
    LayerMap,
    ModelRef,
    NumVal,
    Objective,
    PerModel,
    Symbol,
    WeightError,
    mul_schedules,
)
from gkdlang.lower.context import Lowerer, MethodDef, Scope, Skip, fmt_number, kind_of
from gkdlang.lower.readers import number_value, out_of_range, read_index_int, vocab_space
from gkdlang.lower.methods import call_method, stdlib_hint
from gkdlang.lower.losses import lower_loss
from gkdlang.lower.transforms import lower_transform
from gkdlang.lower.combinators import COMBINATORS, lower_pairs, lower_schedule, lower_trigger
from gkdlang.lower.interventions import INTERVENTIONS

SIGNAL_FEAT_KIND = {
    "embeddings": "hidden", "hidden": "hidden", "attn_scores": "attn", "attn_probs": "attn", "query": "qkv",
    "key": "qkv", "value": "qkv", "ffn": "qkv", "logits": "logits", "task_logits": "task_logits",
}


def ev_number(lw: Lowerer, e: ast.Number, scope: Scope) -> NumVal:
    v = number_value(e.text)
    if not math.isfinite(v.value):  # 1e400: every later int() or comparison would misbehave
        raise lw.err("bad-number", e.span, f"number {e.text} is too large")
    return NumVal(v.value, v.unit, e.span)


def ev_string(lw: Lowerer, e: ast.String, scope: Scope) -> str:
    return e.value


def ev_bool(lw: Lowerer, e: ast.Bool, scope: Scope) -> bool:
    return e.value


def ev_hwspec(lw: Lowerer, e: ast.HwSpec, scope: Scope) -> Any:
    raise lw.err("type-mismatch", e.span, "a device spec like '8 x A100-40GB' belongs in the cluster block")


def ev_tuple(lw: Lowerer, e: ast.Tuple, scope: Scope) -> tuple:
    return tuple(lw.ev(x, scope) for x in e.items)


def ev_list(lw: Lowerer, e: ast.List, scope: Scope) -> list:
    return [lw.ev(x, scope) for x in e.items]


def ev_name(lw: Lowerer, e: ast.Name, scope: Scope) -> Any:
    n = e.id
    if n in scope.values:
        return scope.values[n]
    if n in lw.lets:
        return lw.lets[n]
    if n in lw.models:
        lw.used.add(n)
        return ModelRef(n)
    if n in lw.model_decls:
        raise Skip()  # declared but failed to resolve: already reported
    if n in lw.data or n in lw.data_decls:
        lw.used.add(n)
        return DataRef(n)
    if n in B.TARGETS:
        feat = Feat(kind=n)
        return ItemSet((Item(SignalNode(model=None, kind=n), feat, None, None, e.span),), span=e.span)
    if n in B.LAYER_MAPS and n != "pairs":
        return LayerMap(n, span=e.span)
    return Symbol(n, e.span)


def ev_attr(lw: Lowerer, e: ast.Attr, scope: Scope) -> Any:
    if isinstance(e.obj, ast.Name) and e.obj.id in lw.libraries and e.obj.id not in scope.values:
        lib = lw.libraries[e.obj.id]
        if e.name.name not in lib:
            raise lw.err("unknown-method", e.name.span, f"library '{e.obj.id}' has no method '{e.name.name}'",
                         did_you_mean(e.name.name, lib) or f"it has: {', '.join(sorted(lib))}")
        return lib[e.name.name]
    obj = lw.ev(e.obj, scope)
    if isinstance(obj, Symbol):
        raise lw.unknown_value(obj)
    if isinstance(obj, list) and obj and all(isinstance(m, ModelRef) for m in obj):
        names = [m.name for m in obj]
        if len(set(names)) != len(names):
            raise lw.err("bad-value", e.obj.span, f"a list of models names '{next(n for n in names if names.count(n) > 1)}' twice")
        return PerModel(signal(lw, m.name, e.name, e.span) for m in obj)  # one signal per model of the list
    if not isinstance(obj, ModelRef):
        raise lw.err("type-mismatch", e.obj.span, f"'.{e.name.name}' needs a model on its left")
    return signal(lw, obj.name, e.name, e.span)


def signal(lw: Lowerer, model: str, attr: ast.Ident, span: Span) -> ItemSet:
    kind = attr.name
    if kind not in B.SIGNALS:
        raise lw.err("unknown-signal", attr.span, f"models have no signal '{kind}'",
                     did_you_mean(kind, B.SIGNALS) or f"signals: {', '.join(B.SIGNALS)}")
    spec = lw.models[model]
    layered = B.SIGNALS[kind][0]
    if not layered:
        return ItemSet((signal_item(lw, spec, kind, None, span),), span=span)
    items = tuple(signal_item(lw, spec, kind, i, span) for i in range(spec.arch.num_layers))
    return ItemSet(items, layered=True, span=span)


def signal_item(lw: Lowerer, spec: ModelSpec, kind: str, layer: int | None, span: Span) -> Item:
    a = spec.arch
    if kind == "cls":
        node = Pool(inputs=[SignalNode(model=spec.name, kind="hidden", layer=layer)], how="cls")
        return Item(node, Feat("pooled", dim=a.hidden_size), spec.name, layer, span)
    node = SignalNode(model=spec.name, kind=kind, layer=layer)
    fk = SIGNAL_FEAT_KIND[kind]
    if fk == "hidden":
        feat = Feat("hidden", dim=a.hidden_size)
    elif fk == "attn":
        feat = Feat("attn", heads=a.num_heads, probs=kind == "attn_probs")
    elif kind == "query":
        feat = Feat("qkv", dim=a.num_heads * a.head_dim)
    elif kind in ("key", "value"):
        feat = Feat("qkv", dim=a.num_kv_heads * a.head_dim)
    elif kind == "ffn":
        feat = Feat("qkv", dim=a.intermediate_size)
    elif kind == "logits":
        if spec.head.kind != "lm":
            raise lw.err("no-task-head", span, f"'{spec.name}' has a {spec.head.kind} head, not an LM head")
        feat = Feat("logits", vocab=vocab_space(lw, spec.name))
    else:  # task_logits
        if spec.head.kind != "classify":
            raise lw.err("no-task-head", span, f"'{spec.name}.task_logits' needs a classification head",
                         f"add `head: classify(<labels>)` to the declaration of '{spec.name}'")
        feat = Feat("task_logits", classes=spec.head.num_labels)
    return Item(node, feat, spec.name, layer, span)


def ev_index(lw: Lowerer, e: ast.Index, scope: Scope) -> ItemSet:
    base = lw.ev(e.obj, scope)
    if isinstance(base, PerModel):
        return PerModel(index_items(lw, e, b, scope) for b in base)
    return index_items(lw, e, base, scope)


def index_items(lw: Lowerer, e: ast.Index, base: Any, scope: Scope) -> ItemSet:
    if isinstance(base, Symbol):
        raise lw.unknown_value(base)
    if not (isinstance(base, ItemSet) and base.layered):
        raise lw.err("bad-index", e.span, "only layered signals (hidden, attn_scores, attn_probs, "
                     "query, key, value, ffn, cls) take a layer index")
    n = len(base.items)
    model = base.items[0].model
    chosen: list[int] = []
    for item in e.items:
        chosen.extend(layer_indices(lw, item, n, model, scope))
    if not chosen:  # an empty slice would pair nothing and hide the mistake
        raise lw.err("bad-index", e.span, f"this index selects no layer of '{model}' ({n} layers)")
    items = tuple(base.items[i] for i in chosen)
    return ItemSet(items, layered=True, span=e.span)


def layer_indices(lw: Lowerer, item, n: int, model: str | None, scope: Scope) -> list[int]:
    if isinstance(item, ast.Star):
        return list(range(n))
    if isinstance(item, ast.Slice):
        parts = [None if x is None else read_index_int(lw, x, scope) for x in (item.start, item.stop, item.step)]
        if parts[2] == 0:
            raise lw.err("bad-index", item.span, "slice step cannot be zero")
        for p, x in zip(parts[:2], (item.start, item.stop)):
            if p is not None and not -n <= p <= n:
                raise out_of_range(lw, x.span, p, n, model)
        return list(range(n))[slice(*parts)]
    i = read_index_int(lw, item, scope)
    if not -n <= i < n:
        raise out_of_range(lw, item.span, i, n, model)
    return [i % n]


def ev_neg(lw: Lowerer, e: ast.Neg, scope: Scope) -> NumVal:
    v = lw.ev(e.operand, scope)
    if not isinstance(v, NumVal):
        raise lw.err("type-mismatch", e.span, "only numbers can be negated")
    return NumVal(-v.value, v.unit, e.span)


def ev_binop(lw: Lowerer, e: ast.BinOp, scope: Scope) -> Any:
    left, right = lw.ev(e.left, scope), lw.ev(e.right, scope)
    for side in (left, right):
        if isinstance(side, Symbol):
            raise lw.unknown_value(side)
    if isinstance(left, NumVal) and isinstance(right, NumVal):
        return arith(lw, e, left, right)
    if e.op == "+" and isinstance(left, Objective) and isinstance(right, Objective):
        return Objective(left.terms + right.terms, left.interventions + right.interventions)
    weight_span = e.right.span
    if e.op == "*" and isinstance(right, Objective):
        left, right, weight_span = right, left, e.left.span
    if e.op in ("*", "/") and isinstance(left, Objective):
        weight = weight_of(lw, right, weight_span)
        if e.op == "/":
            if weight.kind != "constant" or weight.value == 0:
                raise lw.err("bad-weight", e.right.span, "an objective can only be divided by a non-zero number")
            weight = Schedule(value=1.0 / weight.value)
        try:
            return Objective(tuple(t.scaled(weight) for t in left.terms), left.interventions)
        except WeightError as exc:
            raise lw.err("bad-weight", e.span, str(exc))
    if isinstance(left, Schedule) or isinstance(right, Schedule):
        return schedule_arith(lw, e, left, right)
    raise lw.err("type-mismatch", e.span, f"'{e.op}' cannot combine {kind_of(left)} and {kind_of(right)}")


def arith(lw: Lowerer, e: ast.BinOp, a: NumVal, b: NumVal) -> NumVal:
    if e.op == "/" and b.value == 0:
        raise lw.err("bad-value", e.right.span, "division by zero")
    ops = {"+": a.value + b.value, "-": a.value - b.value, "*": a.value * b.value,
           "/": a.value / b.value if b.value else 0.0}
    if e.op == "^":
        try:
            value = a.value ** b.value
        except (OverflowError, ZeroDivisionError):
            raise lw.err("bad-value", e.span, "number too large or undefined (0 to a negative power)")
        if not isinstance(value, float) or not math.isfinite(value):  # (-8) ^ 0.5 is complex
            raise lw.err("bad-value", e.span, "power has no real finite value")
        return NumVal(value, None, e.span)
    if not math.isfinite(ops[e.op]):
        raise lw.err("bad-value", e.span, "number too large")
    return NumVal(ops[e.op], a.unit if a.unit == b.unit else None, e.span)


def schedule_arith(lw: Lowerer, e: ast.BinOp, a: Any, b: Any) -> Schedule:
    if e.op != "*":
        raise lw.err("bad-weight", e.span, f"'{e.op}' with a schedule: only multiplication by a number works")
    try:
        return mul_schedules(weight_of(lw, a, e.left.span), weight_of(lw, b, e.right.span))
    except WeightError as exc:
        raise lw.err("bad-weight", e.span, str(exc))


def weight_of(lw: Lowerer, v: Any, span: Span) -> Schedule:
    if isinstance(v, NumVal) and v.unit is None:
        if v.value < 0:
            raise lw.err("negative-weight", span, f"loss weight {fmt_number(v.value)} is negative")
        return Schedule(value=v.value)
    if isinstance(v, NumVal) and v.unit == "percent":
        return Schedule(value=v.value)
    if isinstance(v, Schedule):
        if min(v.value, v.end if v.end is not None else v.value, v.after if v.after is not None else v.value) < 0:
            raise lw.err("negative-weight", span, "a weight schedule goes below zero")
        return v
    raise lw.err("type-mismatch", span, f"a loss weight must be a number or a schedule, not {kind_of(v)}")


def ev_where(lw: Lowerer, e: ast.Where, scope: Scope) -> Objective:
    obj = lw.ev(e.expr, scope)
    if not isinstance(obj, Objective):
        raise lw.err("type-mismatch", e.span, "'where' applies to a loss expression")
    parts = []
    for atom in e.mask:
        if atom.name.name not in B.MASKS:
            raise lw.err("unknown-mask", atom.name.span, f"unknown mask '{atom.name.name}'",
                         did_you_mean(atom.name.name, B.MASKS) or f"masks: {', '.join(B.MASKS)}")
        parts.append(("not " if atom.negated else "") + atom.name.name)
    mask = " and ".join(parts)
    return Objective(tuple(t if t.mask else replace(t, mask=mask) for t in obj.terms), obj.interventions)


def ev_call(lw: Lowerer, e: ast.Call, scope: Scope) -> Any:
    if isinstance(e.func, ast.Name) and e.func.id not in scope.values:
        name = e.func.id
        for applies, lower in CALL_RULES:
            if applies(lw, name):
                return lower(lw, e, name, scope)
        candidates = [*B.LOSSES, *B.TRANSFORMS, *B.SCHEDULES, *B.TRIGGERS, *lw.methods, "pairs", *B.COMBINATORS,
                      *B.INTERVENTIONS,
                      *(lib for lib in lw.libraries if lib in lw.libraries[lib])]
        hint = did_you_mean(name, candidates) or stdlib_hint(name, lw.libraries)
        if name in lw.libraries:
            hint = f"library '{name}' has no method '{name}'; it has: {', '.join(sorted(lw.libraries[name]))}"
        raise lw.err("unknown-method" if name not in ("hf", "like") else "type-mismatch", e.func.span,
                     f"unknown function or method '{name}'", hint)
    target = lw.ev(e.func, scope)
    if isinstance(target, MethodDef):
        return call_method(lw, target, e, scope)
    raise lw.err("type-mismatch", e.func.span, "only functions and methods can be called")


#: how a call of a bare name is lowered: the first rule whose test accepts the name wins (a user's method
#: therefore cannot shadow a builtin loss, transform, schedule, trigger or pairs)
CALL_RULES: tuple[tuple[Callable[[Lowerer, str], bool], Callable[[Lowerer, ast.Call, str, Scope], Any]], ...] = (
    (lambda lw, name: name in B.LOSSES, lower_loss),
    (lambda lw, name: name in B.TRANSFORMS, lower_transform),
    (lambda lw, name: name in B.SCHEDULES, lower_schedule),
    (lambda lw, name: name in B.TRIGGERS, lower_trigger),
    (lambda lw, name: name == "pairs", lambda lw, e, name, scope: lower_pairs(lw, e, scope)),
    (lambda lw, name: name in lw.methods, lambda lw, e, name, scope: call_method(lw, lw.methods[name], e, scope)),
    (lambda lw, name: name in lw.libraries and name in lw.libraries[name],  # `use x` with a method x: x(...)
     lambda lw, e, name, scope: call_method(lw, lw.libraries[name][name], e, scope)),
    (lambda lw, name: name in B.COMBINATORS, lambda lw, e, name, scope: COMBINATORS[name](lw, e, scope)),
    (lambda lw, name: name in B.INTERVENTIONS, lambda lw, e, name, scope: INTERVENTIONS[name](lw, e, scope)),
)

#: AST expression class -> evaluator (the table ``Lowerer.ev`` dispatches through)
EXPRESSIONS: dict[type, Callable[[Lowerer, Any, Scope], Any]] = {
    ast.Number: ev_number, ast.String: ev_string, ast.Bool: ev_bool, ast.HwSpec: ev_hwspec, ast.Tuple: ev_tuple,
    ast.List: ev_list, ast.Name: ev_name, ast.Attr: ev_attr, ast.Index: ev_index, ast.Neg: ev_neg,
    ast.BinOp: ev_binop, ast.Where: ev_where, ast.Call: ev_call,
}
