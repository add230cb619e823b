"""AST of the .gkd language: frozen dataclasses, every node with its source span.

Built bottom-up by ``gkdlang.parser``; read by ``gkdlang.lower`` (-> Spec) and ``gkdlang.fmt`` (-> text).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Union

from gkdlang.spec import Span


@dataclass(frozen=True)
class Node:
    span: Span = field(compare=False, repr=False)


# ---------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Ident(Node):
    name: str


@dataclass(frozen=True)
class Number(Node):
    text: str
    """The literal as written (``150k``, ``5%``, ``40GB``); gkdlang.lower interprets the unit."""


@dataclass(frozen=True)
class String(Node):
    value: str


@dataclass(frozen=True)
class Bool(Node):
    value: bool


@dataclass(frozen=True)
class Name(Node):
    id: str


@dataclass(frozen=True)
class HwSpec(Node):
    count: int
    device: str
    per_node: bool = False
    """Written ``8 x A100-40GB per node`` (the count is per node either way; this says so)."""


@dataclass(frozen=True)
class Attr(Node):
    obj: "Expr"
    name: Ident


@dataclass(frozen=True)
class Slice(Node):
    start: "Expr | None"
    stop: "Expr | None"
    step: "Expr | None"


@dataclass(frozen=True)
class Star(Node):
    pass


@dataclass(frozen=True)
class Index(Node):
    obj: "Expr"
    items: tuple["Expr | Slice | Star", ...]
    """One item for ``x[i]``, ``x[a:b]``, ``x[*]``; several for ``x[1, 3, 5]``."""


@dataclass(frozen=True)
class Kwarg(Node):
    key: Ident
    value: "Expr"


@dataclass(frozen=True)
class Call(Node):
    func: "Expr"
    args: tuple["Expr", ...]
    kwargs: tuple[Kwarg, ...]


@dataclass(frozen=True)
class BinOp(Node):
    op: str
    """One of ``+ - * / ^``."""
    left: "Expr"
    right: "Expr"


@dataclass(frozen=True)
class Neg(Node):
    operand: "Expr"


@dataclass(frozen=True)
class Tuple(Node):
    items: tuple["Expr", ...]


@dataclass(frozen=True)
class List(Node):
    items: tuple["Expr", ...]


@dataclass(frozen=True)
class MaskAtom(Node):
    negated: bool
    name: Ident


@dataclass(frozen=True)
class Where(Node):
    expr: "Expr"
    mask: tuple[MaskAtom, ...]
    """Conjunction of mask atoms: ``where not pad and not special``."""


Expr = Union[Number, String, Bool, Name, HwSpec, Attr, Index, Call, BinOp, Neg, Tuple, List, Where]


# ---------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Entry(Node):
    key: Ident
    value: Expr


@dataclass(frozen=True)
class Block(Node):
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class Use(Node):
    modules: tuple[tuple[Ident, ...], ...]
    """Dotted module paths: ``use tinybert, methods.minilm``."""


@dataclass(frozen=True)
class ModelDecl(Node):
    role: str
    name: Ident
    source: Expr
    options: Block | None


@dataclass(frozen=True)
class DataDecl(Node):
    name: Ident
    source: Expr
    options: Block | None


@dataclass(frozen=True)
class VocabDecl(Node):
    name: Ident
    base: Ident
    options: Block


@dataclass(frozen=True)
class Param(Node):
    name: Ident
    default: Expr | None


@dataclass(frozen=True)
class MethodDecl(Node):
    name: Ident
    params: tuple[Param, ...]
    body: Expr


@dataclass(frozen=True)
class StageDecl(Node):
    name: Ident
    after: tuple[Ident, ...]
    options: Block


@dataclass(frozen=True)
class ClusterDecl(Node):
    options: Block


@dataclass(frozen=True)
class TeacherEntry(Node):
    """``teacher <name>: <strategy>`` in a placement block."""

    teacher: Ident
    value: Expr

    @property
    def key(self) -> Ident:
        """The entry's key as written (``teacher bert``), so that blocks print and report uniformly."""
        return Ident(self.teacher.span, f"teacher {self.teacher.name}")


@dataclass(frozen=True)
class PlacementDecl(Node):
    """``placement [stage] { ... }``: pinned placement choices for every stage (no name) or for one."""

    stage: Ident | None
    options: Block
    """Entries are ``Entry`` (zero, offloads, micro_batch, checkpointing) or ``TeacherEntry``."""


@dataclass(frozen=True)
class LetDecl(Node):
    name: Ident
    value: Expr


Decl = Union[Use, ModelDecl, DataDecl, VocabDecl, MethodDecl, StageDecl, ClusterDecl, PlacementDecl, LetDecl]


@dataclass(frozen=True)
class Module(Node):
    decls: tuple[Decl, ...]
    file: str = ""


# ---------------------------------------------------------------- dumping (golden tests)


def dump(node: Any, indent: int = 0) -> str:
    """A stable, span-free, indented text form of an AST (used by golden tests)."""
    pad = "  " * indent
    if isinstance(node, tuple):
        if not node:
            return pad + "[]"
        return "\n".join(dump(item, indent) for item in node)
    if not is_dataclass(node):
        return pad + repr(node)
    scalars, children = [], []
    for f in fields(node):
        if f.name in ("span", "file"):
            continue
        value = getattr(node, f.name)
        if isinstance(value, Ident):
            scalars.append(f"{f.name}={value.name}")
        elif is_dataclass(value) or (isinstance(value, tuple) and value and is_dataclass(value[0])):
            children.append((f.name, value))
        elif isinstance(value, tuple) and value and isinstance(value[0], tuple):
            scalars.append(f"{f.name}=" + ",".join(".".join(i.name for i in path) for path in value))
        else:
            scalars.append(f"{f.name}={value!r}")
    head = pad + type(node).__name__ + ("(" + ", ".join(scalars) + ")" if scalars else "")
    lines = [head]
    for name, value in children:
        lines.append(f"{pad}  .{name}:")
        lines.append(dump(value, indent + 2))
    return "\n".join(lines)
