"""The narrow interface every lowering pass shares: the ``Lowerer`` (diagnostics, evaluation, the spec's names
so far), ``Scope``/``MethodDef``, ``Skip`` and the small pure helpers on values.

A pass is a module of functions ``f(lw: Lowerer, ...)``; it reads and records declarations through ``lw``,
reports through ``lw.err`` (which returns ``Skip`` to raise, dropping only the construct being lowered) and
evaluates sub-expressions through ``lw.ev``. Passes never import the expression interpreter: ``lw.ev``
dispatches through the table of evaluators the driver hands in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from pydantic import BaseModel

from gkdlang import ast
from gkdlang import builtins as B
from gkdlang.diagnostics import Collector, did_you_mean
from gkdlang.spec import (
    ClusterSpec,
    DataSpec,
    ModelSpec,
    OpNode,
    Project,
    Schedule,
    SignalNode,
    Span,
    VocabSpec,
)
from gkdlang.values import (
    DataRef,
    Item,
    ItemSet,
    LayerMap,
    ModelRef,
    NumVal,
    Objective,
    PerModel,
    Symbol,
    Trigger,
)


#: one evaluator per AST expression class
Evaluator = Callable[["Lowerer", Any, "Scope"], Any]


class Skip(Exception):
    """A diagnostic was reported; abandon the construct being lowered."""


@dataclass(frozen=True)
class MethodDef:
    qualname: str
    decl: ast.MethodDecl
    lets: dict[str, Any]


@dataclass(frozen=True)
class Scope:
    values: dict[str, Any]
    stack: tuple[str, ...] = ()
    method: str | None = None


class Lowerer:
    """State of one lowering: what has been declared so far, the diagnostics, and ``ev``."""

    def __init__(self, module: ast.Module, text: str, file: str, base_dir: Path, diags: Collector,
                 sources: dict[str, str], evaluators: Mapping[type, Evaluator]):
        self.module, self.text, self.file, self.base_dir = module, text, file, base_dir
        self.d, self.sources = diags, sources
        self.evaluators = evaluators
        self.models: dict[str, ModelSpec] = {}
        self.model_decls: dict[str, ast.ModelDecl] = {}
        self.data: dict[str, DataSpec] = {}
        self.data_decls: dict[str, ast.DataDecl] = {}
        self.vocabs: dict[str, VocabSpec] = {}
        self.lets: dict[str, Any] = {}
        self.methods: dict[str, MethodDef] = {}
        self.libraries: dict[str, dict[str, MethodDef]] = {}
        self.used: set[str] = set()
        self.cluster: ClusterSpec | None = None
        self._module_ids = 0
        self._group_ids = 0

    def err(self, code: str, span: Span | None, msg: str, hint: str | None = None, related=()) -> Skip:
        self.d.report(code, span, msg, hint, related)
        return Skip()

    def ev(self, expr: ast.Expr, scope: Scope) -> Any:
        return self.evaluators[type(expr)](self, expr, scope)

    def guard(self, fn: Callable, *args) -> Any:
        """``fn(*args)``, or None if it reported and raised ``Skip``."""
        try:
            return fn(*args)
        except Skip:
            return None

    def new_group(self, prefix: str) -> str:
        self._group_ids += 1
        return f"{prefix}{self._group_ids}"

    def new_module(self, prefix: str) -> str:
        self._module_ids += 1
        return f"{prefix}{self._module_ids}"

    def unknown(self, code: str, span: Span, name: str, known) -> Skip:
        what = {"unknown-model": "model", "unknown-data": "data source", "unknown-stage": "stage"}[code]
        return self.err(code, span, f"unknown {what} '{name}'", did_you_mean(name, known))

    def unknown_value(self, sym: Symbol) -> Skip:
        known = [*self.models, *self.data, *self.lets, *B.TARGETS, *B.LAYER_MAPS]
        return self.err("unknown-name", sym.span, f"unknown name '{sym.name}'", did_you_mean(sym.name, known))


# ---------------------------------------------------------------- pure helpers on values

VECTOR_KINDS = frozenset({"hidden", "qkv", "ffn"})


def default_of(model: type[BaseModel], field: str) -> Any:
    """The default a Spec class declares for ``field`` (declared once there; the checker reads it)."""
    return model.model_fields[field].get_default(call_default_factory=True)


def fill_projection(it: Item, dim: int) -> Item:
    node = it.node
    if isinstance(node, Project) and node.dim_out is None:
        node = node.model_copy(update={"dim_out": dim})
    return replace(it, node=node, feat=replace(it.feat, dim=dim))


def node_models(node) -> list[str]:
    """Models whose signals a node tree reads, in first-use order."""
    if isinstance(node, SignalNode):
        return [node.model] if node.model else []
    out: list[str] = []
    for child in node.inputs:
        out.extend(m for m in node_models(child) if m not in out)
    return out


def feat_group(kind: str) -> str:
    return "vector" if kind in VECTOR_KINDS else kind


def describe(it: Item) -> str:
    node = it.node
    ops = []
    while isinstance(node, OpNode):
        ops.append(node.op)
        node = node.inputs[0]
    layer = f"[{node.layer}]" if node.layer is not None else ""
    base = f"{node.model}.{node.kind}{layer}" if node.model else node.kind
    for op in ops:
        base = f"{op}({base})"
    return base


def kind_of(v: Any) -> str:
    return {ModelRef: "a model", DataRef: "a data source", Objective: "a loss expression", ItemSet: "a signal",
            NumVal: "a number", Schedule: "a schedule", str: "a string", bool: "a boolean", LayerMap: "a layer map",
            list: "a list", tuple: "a tuple", MethodDef: "a method", Trigger: "a trigger",
            PerModel: "a signal of each model of a list"}.get(type(v), type(v).__name__)


def fmt_number(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


def vocab_label(space: str | None) -> str:
    if space is None:
        return "?"
    if space.startswith("vocab:"):
        return f"compressed vocabulary '{space[6:]}'"
    parts = space.split(":")
    return f"{parts[0]} vocabulary of {parts[1]} tokens"
