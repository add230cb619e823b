"""Combinators (len, progressive, choose), weight and option schedules, triggers and explicit layer maps."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from gkdlang import ast
from gkdlang import builtins as B
from gkdlang.diagnostics import did_you_mean
from gkdlang.spec import Choose, Gate, LRWindow, Plateau, ProgressiveLR, Schedule
from gkdlang.values import Item, ItemSet, LayerMap, NumVal, Objective, Symbol, Term, Trigger
from gkdlang.lower.context import Lowerer, Scope, kind_of, node_models
from gkdlang.lower.readers import (
    check_arity,
    read_bool,
    read_every,
    read_fraction,
    read_int,
    read_items,
    read_kwargs,
    read_num,
    read_objective_arg,
    read_plain_number,
)


def lower_schedule(lw: Lowerer, e: ast.Call, name: str, scope: Scope) -> Schedule:
    if name == "stairs":
        return lower_stairs(lw, e, scope)
    if len(e.args) != 2:
        raise lw.err("bad-arity", e.span, f"{name}(start, end, start: 0%, until: 100%) takes two values")
    a, b = (read_plain_number(lw, x, scope) for x in e.args)
    kw = read_kwargs(lw, e, {"start": "fraction", "until": "fraction", "at": "fraction", "then": "number"})
    start = read_fraction(lw, kw["start"], "start", scope) if "start" in kw else 0.0
    until = read_fraction(lw, kw["until"], "until", scope) if "until" in kw else 1.0
    if "at" in kw:
        start = until = read_fraction(lw, kw["at"], "at", scope)
    if until < start:
        raise lw.err("bad-value", e.span, "a schedule must end after it starts")
    after = read_plain_number(lw, kw["then"], scope) if "then" in kw else None
    return Schedule(kind=name, value=a, end=b, start=start, until=until, after=after)


def lower_stairs(lw: Lowerer, e: ast.Call, scope: Scope) -> Schedule:
    """stairs(a, b, levels: n, every: epoch): a to b in n equal steps, one per epoch (step, n-th of the stage)."""
    if len(e.args) != 2:
        raise lw.err("bad-arity", e.span, "stairs(start, end, levels: n, every: epoch) takes two values")
    a, b = (read_plain_number(lw, x, scope) for x in e.args)
    kw = read_kwargs(lw, e, {"levels": "int", "every": "symbol"})
    if "levels" not in kw:
        raise lw.err("missing-option", e.span, "stairs(...) needs levels: <how many values>")
    levels = read_int(lw, kw["levels"], "levels", minimum=1, scope=scope)
    every = read_stairs_every(lw, kw, scope)
    return Schedule(kind="stairs", value=a, end=b, levels=levels, every=every)


def read_stairs_every(lw: Lowerer, kw: dict, scope: Scope) -> str:
    """stairs' period: step, epoch, or stage (n equal parts of the stage's steps, GKD's Annealing-KD stair)."""
    if "every" not in kw:
        return "epoch"
    v = lw.ev(kw["every"], scope)
    if not isinstance(v, Symbol) or v.name not in (*B.EVERY, "stage"):
        raise lw.err("bad-value", kw["every"].span, "every is step, epoch or stage")
    return v.name


def lower_pairs(lw: Lowerer, e: ast.Call, scope: Scope) -> LayerMap:
    pairs = []
    for arg in e.args:
        v = lw.ev(arg, scope)
        if not (isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, NumVal) for x in v)):
            raise lw.err("type-mismatch", arg.span, "pairs((student_layer, teacher_layer), ...)")
        pairs.append((int(v[0].value), int(v[1].value)))
    if not pairs:
        raise lw.err("bad-arity", e.span, "pairs(...) needs at least one (student, teacher) pair")
    return LayerMap("pairs", tuple(pairs), e.span)


def lower_len(lw: Lowerer, e: ast.Call, scope: Scope) -> NumVal:
    """len(x): how many items a list has (a list of teachers, of loss expressions, ...)."""
    check_arity(lw, e, 1, "len")
    read_kwargs(lw, e, {})
    v = lw.ev(e.args[0], scope)
    if not isinstance(v, list):
        raise lw.err("type-mismatch", e.args[0].span, f"len() takes a list, not {kind_of(v)}")
    return NumVal(float(len(v)), None, e.span)


def progressive(lw: Lowerer, e: ast.Call, scope: Scope) -> Objective:
    """progressive(objective, over: 80%): the terms of the i-th of n student layers count from i/n * over.

    ``exclusive: true`` ends each layer's window where the next one starts (MobileBERT's layer-by-layer
    transfer); ``below_lr: f`` adds a ``progressive_lr`` intervention: while block l is transferred, the
    blocks below it train at f times the learning rate (0 freezes them). ``until: plateau(...)`` unlocks
    the next layer when the current one's running loss stops improving (SID), through a ``plateau``
    intervention; ``over`` is then a deadline. ``then: y``: the terms of ``y`` replace the progressive
    terms once every layer has been unlocked (and, with ``until``, the last one has plateaued).
    """
    check_arity(lw, e, 1, "progressive")
    obj = read_objective_arg(lw, e.args[0], scope, "progressive")
    kw = read_kwargs(lw, e, B.COMBINATORS["progressive"])
    over = read_fraction(lw, kw["over"], "over", scope) if "over" in kw else 1.0
    exclusive = read_bool(lw, kw["exclusive"], "exclusive", scope) if "exclusive" in kw else False
    keys: list[Any] = []
    for i, t in enumerate(obj.terms):  # terms of one student layer unlock together
        key = ("layer", t.pred.layer) if t.pred.layer is not None else ("term", i)
        if key not in keys:
            keys.append(key)
    if "kept" in kw:
        return progressive_kept(lw, e, kw, obj, keys, scope)
    if "only_then" in kw:
        raise lw.err("missing-option", kw["only_then"].span, "only_then belongs to progressive(..., kept: f): "
                     "GKD's equal parts (with over, then: y already replaces the progressive terms)")
    n = len(keys)
    start = {k: round(over * i / n, 12) for i, k in enumerate(keys)}
    until = {k: (round(over * (i + 1) / n, 12) if i + 1 < n else 1.0) for i, k in enumerate(keys)}
    then = read_objective_arg(lw, kw["then"], scope, "progressive(then: ...)") if "then" in kw else None
    if "until" in kw:
        if "below_lr" in kw:
            raise lw.err("conflicting-options", kw["below_lr"].span, "below_lr needs the fixed layer windows "
                         "of over; with until: plateau(...) the windows are only known while training",
                         related=[(kw["until"].span, "until is here")])
        return progressive_until(lw, e, kw, obj, keys, then, exclusive, over if "over" in kw else None, scope)
    terms = []
    for i, t in enumerate(obj.terms):
        key = ("layer", t.pred.layer) if t.pred.layer is not None else ("term", i)
        update = {"active_from": start[key]}
        if exclusive:
            update["active_until"] = until[key]
        if then is not None:  # the final phase replaces the progressive terms
            update["active_until"] = min(update.get("active_until", 1.0), over) if over < 1.0 else 1.0
        terms.append(replace(t, gate=t.gate.model_copy(update=update)))
    interventions = obj.interventions
    if then is not None:
        if over >= 1.0:
            raise lw.err("bad-value", kw["then"].span, "progressive(..., then: y) needs over below 100% (y "
                         "starts at over) or until: plateau(...)")
        terms += [replace(t, gate=t.gate.model_copy(update={"active_from": max(t.gate.active_from, over)}))
                  for t in then.terms]
        interventions += then.interventions
    if "below_lr" in kw:
        interventions += (progressive_lr(lw, e, kw["below_lr"], obj, keys, start, until, scope),)
    return Objective(tuple(terms), interventions)


def progressive_kept(lw: Lowerer, e: ast.Call, kw: dict, obj: Objective, keys: list, scope: Scope) -> Objective:
    """progressive(x, kept: f, then: y): GKD's MobileBERT stages. The stage is cut into n + 1 equal parts (n layers
    of the student); in part j layer j's terms count at full weight, the layers below it and the terms of no layer
    (the embeddings) at f times, the layers above not at all; in the last part every term counts at full weight,
    and so do the terms of ``y``. Each part starts just past its boundary (progress > j / (n + 1)), as GKD moves to
    the next stage after the step that reaches it. A term kept at f and at full weight is written as two terms
    (one weight schedule each). ``only_then: true``: the last part counts the terms of ``y`` alone (GKD's SID)."""
    if "only_then" in kw and "then" not in kw:
        raise lw.err("missing-option", kw["only_then"].span, "only_then needs then: <the last part's loss>")
    for key in ("over", "exclusive", "below_lr", "until"):
        if key in kw:
            raise lw.err("conflicting-options", kw[key].span, f"progressive(kept: ...) fixes its own stages (n + 1 "
                         f"equal parts); it takes no {key}", related=[(kw["kept"].span, "kept is here")])
    kept = read_num(lw, kw["kept"], "kept", scope)
    last = 0.0 if ("only_then" in kw and read_bool(lw, kw["only_then"], "only_then", scope)) else 1.0
    if not 0 <= kept <= 1:
        raise lw.err("bad-value", kw["kept"].span, "kept is a loss-weight factor between 0 and 1")
    layers = [k for k in keys if k[0] == "layer"]
    n = len(layers)
    if not n:
        raise lw.err("type-mismatch", e.span, "progressive(..., kept: f) needs layered terms of the student")
    bound = [j / (n + 1) for j in range(n + 1)]  # part j is (bound[j], bound[j + 1]]; the last part starts past bound[n]

    def sched(value: float, end: float, start: float, until: float, after: float) -> Schedule:
        return Schedule(kind="step", value=value, end=end, start=start, until=until, after=after)

    terms: list[Term] = []
    for t in obj.terms:
        if t.pred.layer is None:  # no layer (the embeddings): kept until the last part
            terms.append(t.scaled(sched(kept, kept, 0.0, bound[n], last)))
            continue
        j = layers.index(("layer", t.pred.layer))
        first = sched(1.0, 1.0, 0.0, bound[1], 0.0) if j == 0 else sched(0.0, 1.0, bound[j], bound[j + 1], 0.0)
        terms.append(t.scaled(first))
        terms.append(t.scaled(sched(0.0, kept, bound[j + 1], bound[n], last)))
    interventions = obj.interventions
    if "then" in kw:
        then = read_objective_arg(lw, kw["then"], scope, "progressive(then: ...)")
        terms += [t.scaled(Schedule(kind="step", value=0.0, end=1.0, start=bound[n], until=bound[n]))
                  for t in then.terms]
        interventions += then.interventions
    return Objective(tuple(terms), interventions)


def lower_trigger(lw: Lowerer, e: ast.Call, name: str, scope: Scope) -> Trigger:
    """plateau(patience: 3, min_delta: 0, window: 10, on: <loss>): the watched running loss stops improving."""
    check_arity(lw, e, 0, name)
    kw = read_kwargs(lw, e, B.TRIGGERS[name])
    params = {}  # what is not given keeps the Plateau intervention's default
    if "patience" in kw:
        params["patience"] = read_int(lw, kw["patience"], "patience", minimum=1, scope=scope)
    if "window" in kw:
        params["window"] = read_int(lw, kw["window"], "window", minimum=1, scope=scope)
    if "min_delta" in kw:
        params["min_delta"] = read_num(lw, kw["min_delta"], "min_delta", scope)
        if params["min_delta"] < 0:
            raise lw.err("bad-value", kw["min_delta"].span, "min_delta must not be negative")
    if "on" in kw:
        v = lw.ev(kw["on"], scope)
        if not isinstance(v, Symbol) or v.name not in B.LOSSES:
            raise lw.err("bad-value", kw["on"].span, "on names the loss whose running value is watched "
                         f"(one of {', '.join(B.LOSSES)})", did_you_mean(getattr(v, "name", ""), B.LOSSES))
        params["on"] = v.name
    return Trigger(name, params, e.span)


def progressive_until(lw: Lowerer, e: ast.Call, kw: dict, obj: Objective, keys: list, then: Objective | None,
                      exclusive: bool, deadline: float | None, scope: Scope) -> Objective:
    trigger = lw.ev(kw["until"], scope)
    if isinstance(trigger, Symbol):
        raise lw.unknown_value(trigger)
    if not isinstance(trigger, Trigger):
        raise lw.err("type-mismatch", kw["until"].span, f"until is a trigger such as plateau(patience: 3), "
                     f"not {kind_of(trigger)}")
    pid = lw.new_group("plateau")
    labels = [f"{pid}/{i}" for i in range(len(keys))]
    by_key = {}
    for i, t in enumerate(obj.terms):
        key = ("layer", t.pred.layer) if t.pred.layer is not None else ("term", i)
        by_key.setdefault(key, []).append(t)
    terms: list[Term] = []
    for key, label in zip(keys, labels):
        group = tuple(by_key[key])
        on = trigger.params.get("on")
        if on is not None and not any(t.fn == on for t in group):
            raise lw.err("bad-value", trigger.span, f"plateau(on: {on}) watches a loss that layer group "
                         f"{labels.index(label)} of progressive(...) does not have",
                         f"its losses: {', '.join(sorted({t.fn for t in group}))}")
        terms.extend(grouped(lw, e, group, Gate(group=label)))
    interventions = obj.interventions
    then_label = None
    if then is not None:
        then_label = f"{pid}/then"
        terms.extend(grouped(lw, e, then.terms, Gate(group=then_label)))
        interventions += then.interventions
    students = sorted({m for t in obj.terms for m in node_models(t.pred.node)})
    n = len(keys)
    deadlines = None if deadline is None else [round(deadline * i / n, 12) for i in range(1, n + 1)]
    iv = Plateau(models=students, span=e.span, id=pid, groups=labels, then=then_label, exclusive=exclusive,
                 **trigger.params, deadlines=deadlines)
    return Objective(tuple(terms), interventions + (iv,))


def progressive_lr(lw: Lowerer, e: ast.Call, expr: ast.Expr, obj: Objective, keys, start, until,
                   scope: Scope) -> ProgressiveLR:
    factor = read_num(lw, expr, "below_lr", scope)
    if not 0 <= factor <= 1:
        raise lw.err("bad-value", expr.span, "below_lr is a learning-rate factor between 0 (frozen) and 1")
    students = sorted({t.pred.model for t in obj.terms if t.pred.model})
    windows = [LRWindow(start=start[k], until=until[k], layer=k[1]) for k in keys if k[0] == "layer"]
    if len(students) != 1 or not windows:
        raise lw.err("type-mismatch", e.span, "progressive(..., below_lr: f) needs layered terms of one student")
    return ProgressiveLR(models=students, span=e.span, model=students[0], below_lr=factor, windows=windows)


def choose(lw: Lowerer, e: ast.Call, scope: Scope) -> Any:
    """choose(x, k, every: epoch): k random items of a layered signal, or k random terms of a loss."""
    check_arity(lw, e, 2, "choose")
    kw = read_kwargs(lw, e, B.COMBINATORS["choose"])
    count = lw.ev(e.args[1], scope)  # a number, or a signal whose item count is taken (as many as)
    k = len(count.items) if isinstance(count, ItemSet) else read_int(lw, e.args[1], "choose", minimum=1, scope=scope)
    every = read_every(lw, kw, scope, "epoch")
    value = lw.ev(e.args[0], scope)
    if isinstance(value, Objective) and value.terms:
        if k > len(value.terms):
            raise lw.err("bad-value", e.args[1].span, f"choose {k} of {len(value.terms)} terms")
        group = lw.new_group("choose")
        gate = Gate(group=group, choose=k, every=every)
        return Objective(grouped(lw, e, value.terms, gate), value.interventions)
    xs = read_items(lw, e.args[0], scope, "choose")
    if k > len(xs.items):
        raise lw.err("bad-value", e.args[1].span, f"choose {k} of {len(xs.items)} items")
    if len({(it.feat.kind, it.feat.dim) for it in xs.items}) != 1:
        raise lw.err("shape-mismatch", e.span, "choose() needs items of one kind and width")
    group = lw.new_group("choose")
    inputs = [it.node for it in xs.items]
    first = xs.items[0]
    # item i is the i-th smallest of the k indices drawn, so a layered pairing keeps the depth order
    items = tuple(Item(Choose(inputs=inputs, group=group, k=k, index=i, every=every), first.feat, first.model, i,
                       e.span) for i in range(k))
    return ItemSet(items, layered=True, span=e.span)


def grouped(lw: Lowerer, e: ast.Call, terms: tuple[Term, ...], gate: Gate) -> tuple[Term, ...]:
    """Put terms in one sampling group; a term holds one group only (Gate.group)."""
    for t in terms:
        if t.gate.group is not None:
            raise lw.err("incompatible-methods", e.span, f"a term of this expression is already in sampling "
                         f"group '{t.gate.group}': terms can be chosen, dropped or weighed by one construct",
                         "apply the constructs to different terms",
                         related=[(t.span, f"term already grouped by '{t.gate.group}'")])
    return tuple(replace(t, gate=t.gate.model_copy(update={"group": gate.group, "choose": gate.choose,
                                                           "every": gate.every})) for t in terms)


#: combinator name (builtins.COMBINATORS) -> lowering of its call
COMBINATORS = {"len": lower_len, "progressive": progressive, "choose": choose}
