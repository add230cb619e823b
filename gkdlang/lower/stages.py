"""Stages: order, keys, duration, optimizer and learning-rate schedule, loss terms and intervention checks."""

from __future__ import annotations

from typing import Any, Callable

from gkdlang import ast
from gkdlang import builtins as B
from gkdlang.diagnostics import did_you_mean
from gkdlang.spec import Interchange, Intervention, LossTerm, LRScheduleSpec, OptimizerSpec, Perturb, StageSpec, Weigh
from gkdlang.values import Objective, Symbol
from gkdlang.lower.context import Lowerer, Scope, Skip, describe, kind_of, node_models
from gkdlang.lower.evaluation import lower_evaluation
from gkdlang.lower.generation import lower_generate
from gkdlang.lower.placement import PinDraft, merge_stage_fields, stage_draft, stage_pin
from gkdlang.lower.readers import (
    check_arity,
    read_block,
    read_bool,
    read_data_name,
    read_fraction,
    read_int,
    read_kwargs,
    not_executed,
    read_num,
)


def lower_stages(lw: Lowerer, decls: list[ast.StageDecl],
                 pins: dict[str | None, PinDraft] | None = None) -> list[StageSpec]:
    by_name = {d.name.name: d for d in decls}
    lowered: dict[str, StageSpec] = {}
    for decl in decls:
        stage = lw.guard(lower_stage, lw, decl, pins or {})
        if stage is not None:
            lowered.setdefault(decl.name.name, stage)
    for decl in decls:
        for dep in decl.after:
            if dep.name not in by_name:
                lw.guard(lambda: (_ for _ in ()).throw(
                    lw.unknown("unknown-stage", dep.span, dep.name, by_name)))
    return [lowered[n] for n in stage_order(lw, decls, by_name) if n in lowered]


def stage_order(lw: Lowerer, decls, by_name) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join(path[path.index(name):] + (name,))
            lw.err("stage-cycle", by_name[name].name.span, f"stage dependencies form a cycle: {cycle}")
            return
        state[name] = 1
        for dep in by_name[name].after:
            if dep.name in by_name:
                visit(dep.name, path + (name,))
        state[name] = 2
        order.append(name)

    for d in decls:
        visit(d.name.name, ())
    return order


def lower_stage(lw: Lowerer, decl: ast.StageDecl, pins: dict[str | None, PinDraft] | None = None) -> StageSpec:
    # every key is read under its own guard so that one bad value does not hide the errors of the others
    errors_before = len(lw.d.errors)
    opts = read_block(lw, decl.options, B.STAGE_KEYS, "stage")
    own_opts = dict(opts)  # the stage block's own keys (a placement block may add micro_batch / checkpointing)
    draft = stage_draft(pins or {}, decl.name.name)
    for key in ("data", "loss"):
        if key not in opts and not near_miss(decl.options, key):
            lw.err("missing-option", decl.options.span, f"stage '{decl.name.name}' needs '{key}'")
    data = lw.guard(read_data_name, lw, opts["data"]) if "data" in opts else None
    fields: dict[str, Any] = lw.guard(lower_duration, lw, decl, opts) or {}
    not_executed(lw, opts, "stage")
    for key in ("batch", "micro_batch", "seq_len", "eval_every", "save_every"):
        if key in opts:
            value = lw.guard(read_int, lw, opts[key], key, 1)
            if value is not None and key in ("batch", "micro_batch", "seq_len") and value > MAX_SIZES[key]:
                lw.err("bad-value", opts[key].span, f"{key} {value:,} is larger than gkdc plans for "
                       f"(at most {MAX_SIZES[key]:,})")
                value = None
            if value is not None:
                fields[key] = value
    if "activation_checkpointing" in opts:
        value = lw.guard(read_bool, lw, opts["activation_checkpointing"], "activation_checkpointing")
        if value is not None:
            fields["activation_checkpointing"] = value
    lw.guard(merge_stage_fields, lw, draft, opts, fields)
    if "micro_batch" in fields and fields["micro_batch"] > fields.get("batch", 32):
        lw.err("bad-value", opts["micro_batch"].span, "micro_batch is larger than the global batch")
    readers = {"optimizer": lambda e: lower_optimizer(lw, e), "schedule": lambda e: lower_lr_schedule(lw, e)}
    for key, read in readers.items():
        if key in opts:
            value = lw.guard(read, opts[key])
            if value is not None:
                fields[key] = value
    objective = lw.guard(lower_objective, lw, opts["loss"]) if "loss" in opts else None
    staged = lw.guard(stage_terms, lw, objective, decl, data) if objective is not None else None
    if len(lw.d.errors) > errors_before or staged is None or data is None:
        raise Skip()
    terms, students, teachers = staged
    fields.update(lw.guard(stage_interventions, lw, objective, opts, fields, data) or {})
    if len(lw.d.errors) > errors_before:
        raise Skip()
    teachers += [m for iv in objective.interventions for m in iv.models
                 if m not in students and m not in teachers and lw.models[m].role != "student"]
    check_positions(lw, decl, opts, fields, data, [*students, *teachers])
    lower_evaluation(lw, opts, fields, data, students, bool(objective.interventions), bool(teachers))
    if "generate" in opts:
        generate = lw.guard(lower_generate, lw, opts["generate"], students, teachers, terms, data,
                            fields.get("seq_len"))
        if generate is not None:
            fields["generate"] = generate
    pin = stage_pin(lw, draft, own_opts, decl.name.name, teachers, own=decl.name.name in (pins or {}))
    if len(lw.d.errors) > errors_before:
        raise Skip()
    return StageSpec(name=decl.name.name, after=[a.name for a in decl.after], data=data, loss=terms,
                     interventions=list(objective.interventions), students=students, teachers=teachers,
                     pin=pin, span=decl.span, **fields)


#: largest batch (examples per optimizer step), micro-batch and sequence length a plan may have: far beyond any
#: real run, and small enough that every planning phase stays bounded
MAX_SIZES = {"batch": 10**7, "micro_batch": 2**16, "seq_len": 2**20}


def check_positions(lw: Lowerer, decl: ast.StageDecl, opts: dict[str, ast.Expr], fields: dict[str, Any], data: str,
                    models: list[str]) -> None:
    """The stage's sequence length fits every model it runs (the runtime refuses a longer one after loading)."""
    if data not in lw.data:
        return
    seq = fields.get("seq_len") or lw.data[data].seq_len
    known = [m for m in models if m in lw.models]
    if not known:
        return
    shortest = min(known, key=lambda m: lw.models[m].arch.max_positions)
    limit = lw.models[shortest].arch.max_positions
    if seq <= limit:
        return
    if "seq_len" not in opts and not ddecl_has(lw, data):
        fields["seq_len"] = limit  # the default 512 is longer than the models: the stage runs at their length
        return
    if "seq_len" in opts:
        span = opts["seq_len"].span
    else:
        ddecl = lw.data_decls.get(data)
        entry = next((e for e in (ddecl.options.entries if ddecl and ddecl.options else ()) if e.key.name == "seq_len"),
                     None)
        span = entry.value.span if entry is not None else (ddecl.span if ddecl else decl.span)
    raise lw.err("bad-value", span, f"seq_len {seq} is longer than model '{shortest}' accepts ({limit} positions)",
                 f"use seq_len: {limit} or less")


def ddecl_has(lw: Lowerer, data: str) -> bool:
    ddecl = lw.data_decls.get(data)
    return bool(ddecl and ddecl.options and any(e.key.name == "seq_len" for e in ddecl.options.entries))


def lower_duration(lw: Lowerer, decl: ast.StageDecl, opts: dict[str, ast.Expr]) -> dict[str, Any]:
    if "steps" in opts and "epochs" in opts:
        raise lw.err("conflicting-options", opts["epochs"].span, "give either steps or epochs, not both")
    if "steps" in opts:
        return {"steps": read_int(lw, opts["steps"], "steps", minimum=1)}
    if "epochs" in opts:
        epochs = read_num(lw, opts["epochs"], "epochs")
        if epochs <= 0:
            raise lw.err("bad-duration", opts["epochs"].span, "epochs must be positive")
        return {"epochs": epochs}
    if near_miss(decl.options, "steps") or near_miss(decl.options, "epochs"):
        raise Skip()  # a misspelt key, already reported as unknown-option with a did-you-mean
    raise lw.err("bad-duration", decl.options.span, f"stage '{decl.name.name}' needs steps or epochs")


def lower_objective(lw: Lowerer, expr: ast.Expr) -> Objective:
    objective = lw.ev(expr, Scope(lw.lets))
    if isinstance(objective, Symbol):
        raise lw.unknown_value(objective)
    if not isinstance(objective, Objective):
        raise lw.err("type-mismatch", expr.span, f"loss must be a loss expression, e.g. "
                     f"kl(teacher.logits, student.logits, T: 2), not {kind_of(objective)}")
    return objective


def near_miss(block: ast.Block | None, key: str) -> bool:
    """True if the block has an unknown key that looks like ``key`` (a typo reported on its own)."""
    if block is None:
        return False
    return any(e.key.name != key and did_you_mean(e.key.name, [key]) for e in block.entries)


def stage_terms(lw: Lowerer, objective: Objective, decl: ast.StageDecl, data: str):
    students: list[str] = []
    teachers: list[str] = []
    terms: list[LossTerm] = []
    ids: dict[str, int] = {}
    has_labels = lw.data[data].label is not None if data in lw.data else True
    for term in objective.terms:
        for side in (term.target, term.pred):
            if side.feat.kind == "labels" and not has_labels:
                raise lw.err("no-labels", side.span, f"loss reads labels but data '{data}' has no label "
                             "column", "add `label: <column>` to the data block")
        for m in node_models(term.pred.node):
            if m not in students:
                students.append(m)
        for m in node_models(term.target.node):
            if m not in teachers:
                teachers.append(m)
        base = f"{term.method + '/' if term.method else ''}{term.fn}[{describe(term.pred)}<-{describe(term.target)}]"
        n = ids.get(base, 0)
        ids[base] = n + 1
        terms.append(LossTerm(id=base if n == 0 else f"{base}#{n}", fn=term.fn, target=term.target.node,
                              pred=term.pred.node, options=term.options, mask=term.mask, average=term.average,
                              weight=term.weight,
                              gate=term.gate, method=term.method, span=term.span))
    teachers = [t for t in teachers if t not in students]
    if not terms:
        raise lw.err("missing-option", decl.options.span, f"stage '{decl.name.name}' has no loss term")
    uses_teacher = any(lw.models[m].role != "student" for iv in objective.interventions for m in iv.models
                       if m not in students)
    if not teachers and not uses_teacher:
        lw.d.report("no-teacher-signal", decl.name.span, f"stage '{decl.name.name}' reads no teacher signal: "
                    "it trains the student on the data alone", "fine for a warm-up or fine-tuning stage; "
                    "distillation needs a teacher signal as the first argument of a loss")
    return terms, students, teachers


def stage_interventions(lw: Lowerer, objective: Objective, opts: dict[str, ast.Expr], fields: dict[str, Any],
                        data: str) -> dict[str, Any]:
    """Checks of interventions against each other and the stage's keys; returns forced stage fields."""
    ivs = objective.interventions
    forced: dict[str, Any] = {}
    rewriting = [iv for iv in ivs if iv.rewrites_forward]
    if len(rewriting) > 1:
        a, b = rewriting[0], rewriting[1]
        raise lw.err("incompatible-methods", b.span, f"{b.kind} and {a.kind} both rewrite the student's "
                     "forward pass; one stage can run only one of them", "split them into two stages",
                     related=[(a.span, f"{a.kind} is here")])
    ranks = lw.cluster.nodes * lw.cluster.gpus_per_node if lw.cluster else 1
    batch = fields.get("batch", 32)
    for iv in ivs:
        check = STAGE_CHECKS.get(type(iv))
        if check is not None:
            forced.update(check(lw, iv, opts, fields, ranks, batch, data) or {})
    return forced


def check_interchange(lw: Lowerer, iv: Interchange, opts, fields, ranks: int, batch: int, data: str) -> dict[str, Any]:
    # DIITO backpropagates through the swapped states; recomputing them under checkpointing breaks that
    if fields.get("activation_checkpointing") is True:
        raise lw.err("interchange-checkpointing", opts["activation_checkpointing"].span,
                     "interchange (DIITO) cannot run with activation checkpointing: the swapped states must "
                     "stay in the graph", "remove `activation_checkpointing: true` from this stage",
                     related=[(iv.span, "interchange is here")])
    return {"activation_checkpointing": False}


def check_perturb(lw: Lowerer, iv: Perturb, opts, fields, ranks: int, batch: int, data: str) -> dict[str, Any]:
    # pass 1's gradients are discarded, which accumulated micro-batch gradients cannot survive
    micro = fields.get("micro_batch")
    if micro is not None and micro * ranks < batch:
        raise lw.err("perturb-accumulation", opts["micro_batch"].span,
                     f"gradient perturbation needs one micro-batch per step, but micro_batch {micro} x "
                     f"{ranks} rank{'s' if ranks != 1 else ''} < batch {batch} means gradient accumulation",
                     f"set micro_batch: {batch // ranks} (or remove it and let the planner choose)",
                     related=[(iv.span, "perturb is here")])
    return {"grad_accum_allowed": False}


def check_weigh(lw: Lowerer, iv: Weigh, opts, fields, ranks: int, batch: int, data: str) -> None:
    if iv.needs_labels and data in lw.data and lw.data[data].label is None:
        raise lw.err("no-labels", iv.span, f"weigh(by: teacher_ce) needs labels but data '{data}' has none",
                     "add `label: <column>` to the data block")
    n = len(iv.units)
    if not iv.hard:
        return
    micro = fields.get("micro_batch")
    per_rank = micro if micro is not None else batch // max(ranks, 1)
    if per_rank < n:
        where = opts["micro_batch"].span if micro is not None else (opts.get("batch") or opts["loss"]).span
        what = f"micro_batch {micro}" if micro is not None else f"batch {batch} over {ranks} ranks"
        raise lw.err("batch-too-small", where, f"hard selection splits each micro-batch across {n} teachers, "
                     f"but {what} leaves {per_rank} example{'s' if per_rank != 1 else ''} per rank",
                     f"use at least {n} examples per rank and micro-batch", related=[(iv.span, "weigh is here")])


#: intervention class -> its check against the stage's keys (and the stage fields it forces)
STAGE_CHECKS: dict[type[Intervention], Callable[..., dict[str, Any] | None]] = {
    Interchange: check_interchange, Perturb: check_perturb, Weigh: check_weigh,
}


def _named_call(lw: Lowerer, expr: ast.Expr, expected: str) -> ast.Call:
    """``name`` or ``name(...)`` as a call (``adamw`` means ``adamw()``); anything else is ``type-mismatch``."""
    if isinstance(expr, ast.Name):
        expr = ast.Call(expr.span, expr, (), ())
    if not (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name)):
        raise lw.err("type-mismatch", expr.span, expected)
    return expr


def lower_optimizer(lw: Lowerer, expr: ast.Expr) -> OptimizerSpec:
    expr = _named_call(lw, expr, "optimizer is adamw(lr: ..., betas: (..), weight_decay: ..)")
    name = expr.func.id
    if name == "lamb":  # GKD's optimizer: refused rather than silently trained with another
        raise lw.err("unknown-function", expr.func.span, "optimizer 'lamb' is not implemented by gkdc's runtime",
                     f"optimizers: {', '.join(B.OPTIMIZERS)} (adamw with a larger lr is the usual stand-in)")
    if name not in B.OPTIMIZERS:
        raise lw.err("unknown-function", expr.func.span, f"unknown optimizer '{name}'",
                     did_you_mean(name, B.OPTIMIZERS) or f"optimizers: {', '.join(B.OPTIMIZERS)}")
    check_arity(lw, expr, 0, name)
    kw = read_kwargs(lw, expr, B.OPTIMIZER_KEYS)
    fields: dict[str, Any] = {"name": name}
    for key in ("lr", "eps", "weight_decay"):
        if key in kw:
            fields[key] = read_num(lw, kw[key], key)
            if fields[key] < 0 or (key == "lr" and fields[key] == 0):
                raise lw.err("bad-value", kw[key].span, f"{key} must be positive")
    if "betas" in kw:
        betas = kw["betas"]
        if not isinstance(betas, ast.Tuple) or len(betas.items) != 2:
            raise lw.err("type-mismatch", betas.span, "betas is a pair: (0.9, 0.98)")
        pair = tuple(read_num(lw, b, "betas") for b in betas.items)
        if not all(0 <= b < 1 for b in pair):
            raise lw.err("bad-value", betas.span, "betas must lie in [0, 1)")
        fields["betas"] = pair
    return OptimizerSpec(**fields)


def lower_lr_schedule(lw: Lowerer, expr: ast.Expr) -> LRScheduleSpec:
    expr = _named_call(lw, expr, "schedule is constant, linear(warmup: 5%) or cosine(...)")
    name = expr.func.id
    if name not in B.LR_SCHEDULES:
        raise lw.err("unknown-function", expr.func.span, f"unknown learning-rate schedule '{name}'",
                     did_you_mean(name, B.LR_SCHEDULES) or f"schedules: {', '.join(B.LR_SCHEDULES)}")
    check_arity(lw, expr, 0, name)
    kw = read_kwargs(lw, expr, B.LR_SCHEDULE_KEYS)
    fields: dict[str, Any] = {"kind": name}
    if "warmup" in kw:
        fields["warmup"] = read_fraction(lw, kw["warmup"], "warmup")
    if "min_lr" in kw:
        fields["min_lr"] = read_num(lw, kw["min_lr"], "min_lr")
    return LRScheduleSpec(**fields)
