"""Placement declarations -> the pins of each stage (``PlacementPin``), checked before any stage is lowered.

``placement { ... }`` pins choices for every stage, ``placement <stage> { ... }`` for one (its keys win over the
global block's). ``micro_batch`` and ``checkpointing`` become the stage's ``micro_batch`` /
``activation_checkpointing`` fields, so every check that reads those sees the pin (and points at it); the rest
become the stage's ``PlacementPin`` with the span of every pinned key, for the planner's located errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gkdlang import ast
from gkdlang import builtins as B
from gkdlang.diagnostics import did_you_mean
from gkdlang.spec import PlacementPin, Span
from gkdlang.lower.context import Lowerer, Skip
from gkdlang.lower.readers import read_block, read_bool, read_int

#: pin key -> StageSpec field it sets (the others go to PlacementPin)
STAGE_FIELDS = {"micro_batch": "micro_batch", "checkpointing": "activation_checkpointing"}


@dataclass
class PinDraft:
    """The checked keys of one placement declaration (or of the merge of two)."""

    span: Span
    values: dict[str, Any] = field(default_factory=dict)
    """``zero``, ``offload_optimizer``, ``offload_params``, ``micro_batch``, ``checkpointing``, ``teacher <name>``."""
    exprs: dict[str, ast.Expr] = field(default_factory=dict)
    """The value expression of each key (its span is where a stage check points)."""


def lower_placements(lw: Lowerer, decls: list[ast.PlacementDecl], stages: list[str]) -> dict[str | None, PinDraft]:
    """Each declaration's checked pins, keyed by stage name (None: every stage)."""
    out: dict[str | None, PinDraft] = {}
    first: dict[str | None, ast.PlacementDecl] = {}
    for decl in decls:
        target = decl.stage.name if decl.stage is not None else None
        if target in first:
            what = f"stage '{target}'" if target else "every stage"
            lw.err("duplicate-definition", decl.span, f"a second placement block for {what}",
                   "merge the two blocks", related=[(first[target].span, "first placement block")])
            continue
        first[target] = decl
        if target is not None and target not in stages:
            lw.guard(lambda: (_ for _ in ()).throw(lw.unknown("unknown-stage", decl.stage.span, target, stages)))
            continue
        draft = lw.guard(lower_placement, lw, decl)
        if draft is not None:
            out[target] = draft
    return out


def lower_placement(lw: Lowerer, decl: ast.PlacementDecl) -> PinDraft:
    draft = PinDraft(span=decl.span)
    plain = ast.Block(decl.options.span, tuple(e for e in decl.options.entries if isinstance(e, ast.Entry)))
    opts = read_block(lw, plain, B.PLACEMENT_KEYS, "placement")
    readers = {
        "zero": lambda e: _zero(lw, e),
        "offload_optimizer": lambda e: _symbol(lw, e, "offload_optimizer", B.OFFLOAD_TARGETS),
        "offload_params": lambda e: _symbol(lw, e, "offload_params", B.OFFLOAD_TARGETS),
        "micro_batch": lambda e: read_int(lw, e, "micro_batch", 1),
        "checkpointing": lambda e: read_bool(lw, e, "checkpointing"),
    }
    for key, expr in opts.items():
        value = lw.guard(readers[key], expr)
        if value is not None:
            draft.values[key], draft.exprs[key] = value, expr
    for entry in decl.options.entries:
        if isinstance(entry, ast.TeacherEntry):
            key = f"teacher {entry.teacher.name}"
            if key in draft.values:
                lw.err("duplicate-option", entry.teacher.span, f"'{key}' is given twice")
                continue
            value = lw.guard(_teacher, lw, entry)
            if value is not None:
                draft.values[key], draft.exprs[key] = value, entry.value
    _check_offloads(lw, draft)
    return draft


def _zero(lw: Lowerer, expr: ast.Expr) -> int:
    stage = read_int(lw, expr, "zero")
    if stage not in (0, 1, 2, 3):
        raise lw.err("bad-value", expr.span, f"zero is a ZeRO stage: 0, 1, 2 or 3, not {stage}")
    return stage


def _symbol(lw: Lowerer, expr: ast.Expr, key: str, allowed: tuple[str, ...]) -> str:
    if isinstance(expr, ast.Name) and expr.id in allowed:
        return expr.id
    got = expr.id if isinstance(expr, ast.Name) else ""
    raise lw.err("bad-value", expr.span, f"{key} is one of {', '.join(allowed)}",
                 did_you_mean(got, allowed) or f"{key}: {' | '.join(allowed)}")


def _teacher(lw: Lowerer, entry: ast.TeacherEntry) -> str:
    name = entry.teacher.name
    if name not in lw.models:
        raise lw.unknown("unknown-model", entry.teacher.span, name, lw.models)
    if lw.models[name].role == "student":
        raise lw.err("type-mismatch", entry.teacher.span, f"'{name}' is a student: only teachers (and assistants "
                     f"where they teach) have a placement strategy", "pin a student's placement with zero, "
                     "offload_optimizer, offload_params, micro_batch and checkpointing")
    value = entry.value
    strategy = value.id if isinstance(value, ast.Name) else ""
    strategy = B.TEACHER_STRATEGY_ALIASES.get(strategy, strategy)
    if strategy == "separate":
        raise lw.err("bad-value", value.span, "separate (teachers on their own ranks) is modelled by the planner "
                     "but gkdc's runtime does not run it", f"strategies: {', '.join(B.TEACHER_STRATEGIES)}")
    if strategy not in B.TEACHER_STRATEGIES:
        raise lw.err("bad-value", value.span, f"a teacher's placement is one of {', '.join(B.TEACHER_STRATEGIES)}",
                     did_you_mean(strategy, [*B.TEACHER_STRATEGIES, *B.TEACHER_STRATEGY_ALIASES])
                     or f"strategies: {', '.join(B.TEACHER_STRATEGIES)}")
    return strategy


def _check_offloads(lw: Lowerer, draft: PinDraft) -> None:
    """Combinations DeepSpeed (and the planner's memory model) cannot run, whatever the cluster."""
    zero, opt, par = (draft.values.get(k) for k in ("zero", "offload_optimizer", "offload_params"))
    if opt not in (None, "none") and zero == 0:
        lw.err("conflicting-options", draft.exprs["offload_optimizer"].span, "optimizer offload needs ZeRO 1, 2 or 3",
               "pin zero: 1 or more, or drop offload_optimizer", related=[(draft.exprs["zero"].span, "zero: 0")])
    if par not in (None, "none"):
        if zero is not None and zero != 3:
            lw.err("conflicting-options", draft.exprs["offload_params"].span, "parameter offload needs ZeRO-3",
                   "pin zero: 3, or drop offload_params", related=[(draft.exprs["zero"].span, f"zero: {zero}")])
        if opt in (None, "none"):
            lw.err("conflicting-options", draft.exprs["offload_params"].span, "parameter offload needs the "
                   "optimizer offloaded as well (DeepSpeed's ZeRO-Infinity layout, the one gkdc plans)",
                   f"add offload_optimizer: {par}")


# ---------------------------------------------------------------- per stage


def stage_draft(pins: dict[str | None, PinDraft], stage: str) -> PinDraft | None:
    """The global block's pins overridden key by key by the stage's own block."""
    common, own = pins.get(None), pins.get(stage)
    if common is None or own is None:
        return own or common
    return PinDraft(span=own.span, values={**common.values, **own.values}, exprs={**common.exprs, **own.exprs})


def merge_stage_fields(lw: Lowerer, draft: PinDraft | None, opts: dict[str, ast.Expr],
                       fields: dict[str, Any]) -> None:
    """Put pinned ``micro_batch`` / ``checkpointing`` into the stage's fields (and ``opts``, so checks point at the
    pin); the same key in the stage block with another value is ``conflicting-options``."""
    if draft is None:
        return
    for key, name in STAGE_FIELDS.items():
        if key not in draft.values:
            continue
        if name in opts and name in fields and fields[name] != draft.values[key]:
            lw.err("conflicting-options", draft.exprs[key].span, f"the placement pins {key} {draft.values[key]} "
                   f"but the stage sets {name} {fields[name]}", "keep one of them",
                   related=[(opts[name].span, f"{name} in the stage")])
            raise Skip()
        fields[name] = draft.values[key]
        opts.setdefault(name, draft.exprs[key])


def stage_pin(lw: Lowerer, draft: PinDraft | None, stage_opts: dict[str, ast.Expr], stage: str,
              teachers: list[str], own: bool) -> PlacementPin | None:
    """The stage's ``PlacementPin``: the placement's keys and the stage block's own micro_batch /
    activation_checkpointing (pins as well), each with its span; None when nothing is pinned."""
    spans: dict[str, Span] = {}
    for key, name in STAGE_FIELDS.items():
        if name in stage_opts:
            spans[key] = stage_opts[name].span
    values = draft.values if draft is not None else {}
    pinned_teachers = {}
    for key, value in values.items():
        if key.startswith("teacher "):
            name = key.split(" ", 1)[1]
            if name not in teachers:
                if own:  # a stage's own block naming a teacher the stage does not read
                    lw.err("bad-value", draft.exprs[key].span, f"stage '{stage}' reads no signal of '{name}', so "
                           f"it has no placement to pin", f"teachers of '{stage}': {', '.join(teachers) or 'none'}")
                continue
            pinned_teachers[name] = value
        spans[key] = draft.exprs[key].span
    if not spans:
        return None
    span = draft.span if draft is not None else next(iter(spans.values()))
    return PlacementPin(zero_stage=values.get("zero"), offload_optimizer=values.get("offload_optimizer"),
                        offload_params=values.get("offload_params"), teachers=pinned_teachers, spans=spans, span=span)
