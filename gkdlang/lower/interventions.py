"""Interventions: replace_layers, interchange, perturb, drop, weigh and select_teacher."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from gkdlang import ast
from gkdlang import builtins as B
from gkdlang.spec import (
    Drop,
    Gate,
    Interchange,
    Interchanged,
    Perturb,
    ReplaceLayers,
    SelectTeacher,
    Unit,
    Weigh,
)
from gkdlang.values import Item, LayerMap, Objective, Term
from gkdlang.lower.context import Lowerer, Scope, default_of, node_models
from gkdlang.lower.readers import (
    check_arity,
    read_bool,
    read_fraction,
    read_int,
    read_kwargs,
    read_num,
    read_objective_arg,
    read_probability,
    read_role_model,
    read_symbol_value,
)
from gkdlang.lower.losses import map_layer
from gkdlang.lower.combinators import grouped


def replace_layers(lw: Lowerer, e: ast.Call, scope: Scope) -> Objective:
    """replace_layers(t, s, p: schedule): Theseus. Student block j stands for teacher blocks j*k..(j+1)*k-1."""
    check_arity(lw, e, 2, "replace_layers")
    kw = read_kwargs(lw, e, B.INTERVENTIONS["replace_layers"].options)
    t = read_role_model(lw, e.args[0], ("teacher", "assistant"), "replace_layers' first argument", scope)
    s = read_role_model(lw, e.args[1], ("student", "assistant"), "replace_layers' second argument", scope)
    ta, sa = lw.models[t].arch, lw.models[s].arch
    rel = [(e.args[0].span, f"teacher '{t}': {ta.num_layers} x {ta.hidden_size}"),
           (e.args[1].span, f"student '{s}': {sa.num_layers} x {sa.hidden_size}")]
    if ta.num_layers < sa.num_layers or ta.num_layers % sa.num_layers:
        raise lw.err("bad-layer-map", e.span, f"replace_layers groups the teacher's {ta.num_layers} blocks into "
                     f"{sa.num_layers} equal modules: the teacher's depth must be a multiple of the student's",
                     related=rel)
    if ta.hidden_size != sa.hidden_size:
        raise lw.err("dim-mismatch", e.span, f"replace_layers runs teacher and student blocks in one residual "
                     f"stream: widths {ta.hidden_size} and {sa.hidden_size} differ", related=rel)
    p = read_probability(lw, kw.get("p"), "p", scope, e)
    k = ta.num_layers // sa.num_layers
    groups = [list(range(j * k, (j + 1) * k)) for j in range(sa.num_layers)]
    iv = ReplaceLayers(models=[t, s], span=e.span, teacher=t, student=s, groups=groups, p=p)
    return Objective((), (iv,))


def interchange(lw: Lowerer, e: ast.Call, scope: Scope) -> Objective:
    """interchange(objective, fraction: 30%, map: uniform, way: consecutive): DIITO's counterfactual terms."""
    check_arity(lw, e, 1, "interchange")
    obj = read_objective_arg(lw, e.args[0], scope, "interchange")
    kw = read_kwargs(lw, e, B.INTERVENTIONS["interchange"].options)
    fraction = read_fraction(lw, kw["fraction"], "fraction", scope) if "fraction" in kw else default_of(Interchange, "fraction")
    if fraction <= 0:
        raise lw.err("bad-value", kw["fraction"].span, "fraction must be above 0%")
    way = read_symbol_value(lw, kw.get("way"), "way", B.INTERCHANGE_WAYS, scope, "consecutive")
    positions = read_symbol_value(lw, kw.get("positions"), "positions", B.INTERCHANGE_POSITIONS, scope, "same")
    blocks = read_symbol_value(lw, kw.get("blocks"), "blocks", B.INTERCHANGE_BLOCKS, scope, "aligned")
    if positions == "independent" and way != "consecutive":
        raise lw.err("conflicting-options", kw["positions"].span, "positions: independent draws a span in each "
                     "example and in its source: use way: consecutive")
    teachers = sorted({m for t in obj.terms for m in node_models(t.target.node)})
    students = sorted({m for t in obj.terms for m in node_models(t.pred.node)})
    if len(teachers) != 1 or len(students) != 1:
        raise lw.err("type-mismatch", e.args[0].span, "interchange(...) takes terms between one teacher and one "
                     f"student (got teachers {teachers or 'none'}, students {students or 'none'})")
    t, s = teachers[0], students[0]
    lmap = lw.ev(kw["map"], scope) if "map" in kw else LayerMap("uniform", span=e.span)
    if not isinstance(lmap, LayerMap):
        raise lw.err("bad-layer-map", kw["map"].span, "map is uniform, skip, last, first or pairs(...)")
    lt, ls = lw.models[t].arch.num_layers, lw.models[s].arch.num_layers
    layers = [[j, i] for j in range(ls) if (i := map_layer(lw, lmap, j, ls, lt, e)) is not None]
    group = lw.new_group("interchange")
    terms = tuple(replace(term, target=interchanged(term.target, group),
                          pred=interchanged(term.pred, group)) for term in obj.terms)
    iv = Interchange(models=[t, s], span=e.span, id=group, teacher=t, student=s, layers=layers, fraction=fraction,
                     way=way, positions=positions, blocks=blocks, **interchange_meaning(positions, blocks))
    return Objective(terms, obj.interventions + (iv,))


def interchange_meaning(positions: str, blocks: str) -> dict[str, str]:
    """The Spec's ``meaning`` where the reading is not the default one (the default text is left out)."""
    if (positions, blocks) == ("same", "aligned"):
        return {}
    span = ("int(fraction x the shorter of the example's and the source's real lengths) consecutive positions take "
            "the source's states from a span of its own (the two starts drawn independently)"
            if positions == "independent" else "the states of `fraction` of the token positions are the source "
            "example's at the same positions")
    where = ("at a student block drawn per step and every teacher block of its group" if blocks == "group"
             else "at an aligned layer pair [student, teacher] drawn per step")
    return {"meaning": f"a second forward of both models in which {span}, {where}; ops 'interchanged' read that pass"}


def interchanged(it: Item, group: str) -> Item:
    return replace(it, node=Interchanged(inputs=[it.node], intervention=group))


def perturb(lw: Lowerer, e: ast.Call, scope: Scope) -> Objective:
    """perturb(s, eps: 1e-5): LRC-BERT gradient perturbation of the student's embedding output."""
    check_arity(lw, e, 1, "perturb")
    kw = read_kwargs(lw, e, B.INTERVENTIONS["perturb"].options)
    s = read_role_model(lw, e.args[0], ("student", "assistant"), "perturb's argument", scope)
    eps = read_num(lw, kw["eps"], "eps", scope) if "eps" in kw else default_of(Perturb, "eps")
    if eps <= 0:
        raise lw.err("bad-value", kw["eps"].span, "eps must be positive")
    norm = read_symbol_value(lw, kw.get("norm"), "norm", B.PERTURB_NORMS, scope, default_of(Perturb, "norm"))
    iv = Perturb(models=[s], span=e.span, model=s, eps=eps, norm=norm)
    return Objective((), (iv,))


def drop(lw: Lowerer, e: ast.Call, scope: Scope) -> Objective:
    """drop(objective, p: 25%): DGKD; the terms are left out together with probability p each step."""
    check_arity(lw, e, 1, "drop")
    obj = read_objective_arg(lw, e.args[0], scope, "drop")
    kw = read_kwargs(lw, e, B.INTERVENTIONS["drop"].options)
    p = read_fraction(lw, kw["p"], "p", scope) if "p" in kw else default_of(Drop, "p")
    if p >= 1:
        raise lw.err("bad-value", kw["p"].span, "p below 100%: a unit dropped at every step never trains")
    # min_kept: 0 lets a step drop every group (GKD's DGKD); 1, the default, keeps one drawn at random
    min_kept = read_int(lw, kw["min_kept"], "min_kept", 0, scope) if "min_kept" in kw else default_of(Drop, "min_kept")
    if "per" in kw:  # per: teacher -- each teacher's terms form a drop unit of their own (DGKD)
        read_symbol_value(lw, kw["per"], "per", ("teacher",), scope, "teacher")
        out = Objective()
        for part, _ in per_teacher(lw, obj):
            one = drop_group(lw, e, part, p, min_kept)
            out = Objective(out.terms + one.terms, out.interventions + one.interventions)
        return out
    return drop_group(lw, e, obj, p, min_kept)


def drop_group(lw: Lowerer, e: ast.Call, obj: Objective, p: float, min_kept: int) -> Objective:
    group = lw.new_group("drop")
    terms = grouped(lw, e, obj.terms, Gate(group=group, every="step"))
    teachers = sorted({m for t in obj.terms for m in node_models(t.target.node)})
    meaning = default_of(Drop, "meaning")
    if min_kept != 1:
        meaning = meaning.split("; ")[0] + "; " + (
            f"if every drop group of the stage is dropped, {min_kept} drawn at random are kept" if min_kept
            else "every group may be dropped at once")
    iv = Drop(models=teachers, span=e.span, group=group, p=p, min_kept=min_kept, meaning=meaning)
    return Objective(terms, obj.interventions + (iv,))


def per_teacher(lw: Lowerer, obj: Objective) -> list[tuple[Objective, str]]:
    """The terms of ``obj`` split by the teacher they read (first-appearance order), each with that teacher;
    teacher-free terms and terms reading two teachers are a type-mismatch."""
    groups: dict[str, list[Term]] = {}
    for t in obj.terms:
        models = node_models(t.target.node)
        if len(models) != 1:
            raise lw.err("type-mismatch", t.span, "split per teacher: each term must read exactly one teacher")
        groups.setdefault(models[0], []).append(t)
    return [(Objective(tuple(ts), obj.interventions if i == 0 else ()), teacher)
            for i, (teacher, ts) in enumerate(groups.items())]


def units_of(lw: Lowerer, e: ast.Call, scope: Scope, fname: str) -> list[tuple[Objective, str]]:
    """The per-teacher units of weigh([...]) / select_teacher([...]): loss expressions reading one teacher each."""
    value = lw.ev(e.args[0], scope)
    if isinstance(value, Objective):  # one expression over a list of teachers: one unit per teacher
        value = per_teacher(lw, value)
        if len(value) < 2:
            raise lw.err("type-mismatch", e.args[0].span, f"{fname}(x) needs x to read at least two teachers "
                         "(e.g. a loss over a list of teachers), or a list of loss expressions")
        return value
    if not isinstance(value, list) or len(value) < 2:
        raise lw.err("type-mismatch", e.args[0].span, f"{fname}([...]) takes a list of at least two loss "
                     "expressions, one per teacher, or one loss expression over a list of teachers")
    units = []
    spans = e.args[0].items if isinstance(e.args[0], ast.List) else (e.args[0],) * len(value)
    for obj, expr in zip(value, spans):
        teachers = sorted({m for t in getattr(obj, "terms", ()) for m in node_models(t.target.node)})
        if not isinstance(obj, Objective) or len(teachers) != 1:
            raise lw.err("type-mismatch", expr.span, f"each unit of {fname}([...]) is a loss expression "
                         "reading exactly one teacher")
        units.append((obj, teachers[0]))
    if len({t for _, t in units}) != len(units):
        raise lw.err("bad-value", e.args[0].span, f"two units of {fname}([...]) read the same teacher")
    return units


def unit_terms(lw: Lowerer, e: ast.Call, units, prefix: str) -> tuple[str, tuple[Term, ...], list[Unit]]:
    group = lw.new_group(prefix)
    terms: list[Term] = []
    table = []
    for i, (obj, teacher) in enumerate(units):
        name = f"{group}/{i}"
        terms.extend(grouped(lw, e, obj.terms, Gate(group=name)))
        table.append(Unit(group=name, teacher=teacher))
    return group, tuple(terms), table


def weigh(lw: Lowerer, e: ast.Call, scope: Scope) -> Objective:
    """weigh([unit, ...], by: teacher_ce | student_entropy, hard: false): per-teacher, per-example weights."""
    check_arity(lw, e, 1, "weigh")
    kw = read_kwargs(lw, e, B.INTERVENTIONS["weigh"].options)
    if "by" not in kw:
        raise lw.err("missing-option", e.span, "weigh([...]) needs by: teacher_ce or by: student_entropy")
    by = read_symbol_value(lw, kw["by"], "by", B.WEIGH_BY, scope, "")
    hard = read_bool(lw, kw["hard"], "hard", scope) if "hard" in kw else default_of(Weigh, "hard")
    if hard and by != "student_entropy":
        raise lw.err("conflicting-options", kw["hard"].span, "hard selection splits the batch by student "
                     "entropy: use by: student_entropy")
    units = units_of(lw, e, scope, "weigh")
    group, terms, table = unit_terms(lw, e, units, "weigh")
    params: dict[str, Any] = {"group": group, "by": by, "hard": hard, "units": table}  # Weigh's fields
    if by == "teacher_ce":
        for _, teacher in units:  # the weight needs each teacher's own loss on the gold labels
            if lw.models[teacher].head.kind != "classify":
                raise lw.err("no-task-head", e.span, f"weigh(by: teacher_ce) needs the CE of teacher "
                             f"'{teacher}' on the labels, so a classification head",
                             f"add `head: classify(<labels>)` to '{teacher}'")
        params.update(weight="1 / (1 + CE(labels, teacher task_logits)) per example", needs_labels=True)
    else:
        students = sorted({m for t in terms for m in node_models(t.pred.node)})
        params.update(student=students[0] if students else None, min_micro_batch=len(units) if hard else 1,
                      entropy_of="task_logits" if students and lw.models[students[0]].head.kind == "classify"
                      else "logits")
        params["weight"] = ("examples sorted by student entropy are split into len(units) equal slices; unit i "
                            "(teachers listed from smallest to largest) gets slice i" if hard else
                            "unit weights from the student's prediction entropy per example")
    iv = Weigh(models=[t for _, t in units], span=e.span, **params)
    interventions = tuple(i for obj, _ in units for i in obj.interventions)
    return Objective(terms, interventions + (iv,))


def select_teacher(lw: Lowerer, e: ast.Call, scope: Scope) -> Objective:
    """select_teacher([unit, ...], policy: reinforce, state: m, reward: ce, lr: x): RL-KD's agent."""
    check_arity(lw, e, 1, "select_teacher")
    kw = read_kwargs(lw, e, B.INTERVENTIONS["select_teacher"].options)
    policy = read_symbol_value(lw, kw.get("policy"), "policy", B.POLICIES, scope,
                               default_of(SelectTeacher, "policy"))
    reward = read_symbol_value(lw, kw.get("reward"), "reward", B.REWARDS, scope,
                               default_of(SelectTeacher, "reward"))
    state = read_role_model(lw, kw["state"], ("teacher",), "state", scope) if "state" in kw else None
    lr = read_num(lw, kw["lr"], "lr", scope) if "lr" in kw else None
    if lr is not None and lr <= 0:
        raise lw.err("bad-value", kw["lr"].span, "lr must be positive")
    units = units_of(lw, e, scope, "select_teacher")
    if state is not None and state in {t for _, t in units}:
        raise lw.err("bad-value", kw["state"].span, f"the state model '{state}' only encodes inputs for the "
                     "agent; it cannot also be a selectable teacher")
    group, terms, table = unit_terms(lw, e, units, "select")
    models = [t for _, t in units] + ([state] if state else [])
    cls = "[CLS] state of state_model" if state else "student [CLS] state"
    params: dict[str, Any] = {
        "state": [cls, "each teacher's soft labels"],
        "reward_meaning": "-CE(labels, student)" if reward == "ce" else "-(CE + KL to the kept teachers)"}
    if policy == "glmkd":
        glmkd_policy_checks(lw, e, kw, reward, units)
        params = {"state": [cls, "each teacher's CE on the labels", "each teacher's task logits"],
                  "reward_meaning": "-mean CE(labels, student) at the next step, for this step's selection",
                  "baseline": "none", "agent": "sigmoid of two summed linear maps owned by the student wrapper"}
    iv = SelectTeacher(models=models, span=e.span, group=group, policy=policy, units=table, state_model=state,
                       reward=reward, lr=lr, **params)
    interventions = tuple(i for obj, _ in units for i in obj.interventions)
    return Objective(terms, interventions + (iv,))


def glmkd_policy_checks(lw: Lowerer, e: ast.Call, kw, reward: str, units) -> None:
    """GKD's agent reads each teacher's CE on the gold labels (so classification heads) and has reward -CE only."""
    if reward != "ce":
        raise lw.err("conflicting-options", kw["reward"].span, "policy: glmkd has GKD's reward -CE(labels, "
                     "student) only: use reward: ce")
    for _, teacher in units:
        if lw.models[teacher].head.kind != "classify":
            raise lw.err("no-task-head", e.span, f"select_teacher(policy: glmkd) reads the CE of teacher "
                         f"'{teacher}' on the labels, so a classification head",
                         f"add `head: classify(<labels>)` to '{teacher}'")


#: intervention name (builtins.INTERVENTIONS) -> lowering of its call
INTERVENTIONS = {
    "replace_layers": replace_layers, "interchange": interchange, "perturb": perturb, "drop": drop,
    "weigh": weigh, "select_teacher": select_teacher,
}
