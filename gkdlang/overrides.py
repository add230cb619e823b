"""AST + ``--set PATH=VALUE`` texts -> the AST with those values in place (before any check runs).

An override is applied to the parsed module, so the checker checks an overridden value exactly as if the spec
said it, and reports a problem at the override's own position: ``<--set 1>:1:col`` (the first ``--set``, the
column inside its text). Paths:

- ``stage.NAME.KEY``, ``data.NAME.KEY``, ``vocab.NAME.KEY``: a key of that declaration's block (replaced, or
  added when the block does not have it); ``steps`` and ``epochs`` replace each other;
- ``teacher.NAME.KEY`` (or ``student.``, ``assistant.``, ``model.`` for any role): a key of a model's block;
- ``data.NAME``, ``teacher.NAME`` (...): the declaration's source, ``text("other.txt")``, ``hf("models/x")``;
- ``cluster.KEY``; ``placement.KEY`` (the pins of every stage) and ``placement.STAGE.KEY``;
- ``let.NAME``: the value of a ``let``;
- one more ``.ARG`` after a key whose value is a call sets that keyword argument:
  ``stage.distill.optimizer.lr=1e-4`` turns ``adamw(lr: 4e-4)`` into ``adamw(lr: 1e-4)``.

The value is one expression of the language (``100``, ``64GiB``, ``cosine(warmup: 5%)``, ``"data/x.txt"``).
A path that names nothing is the error ``set-target``; text that is not ``PATH=VALUE`` is ``set-syntax``.
"""

from __future__ import annotations

import dataclasses
import re

from gkdlang import ast
from gkdlang.diagnostics import Diagnostic, did_you_mean
from gkdlang.spec import Span

#: ``let _=`` is how a value is parsed: as the value of a one-line let, padded so its columns are the override's
_LET = "let _="
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
MODEL_ROLES = ("teacher", "student", "assistant")
KINDS = ("stage", "data", "vocab", *MODEL_ROLES, "model", "cluster", "placement", "let")
#: keys that exclude each other in one block: setting one drops the other (``--set stage.x.steps=100`` on a stage
#: that gives ``epochs`` trains 100 steps, as the user asked, instead of reporting conflicting-options)
EXCLUSIVE = {"stage": {"steps": "epochs", "epochs": "steps"}}


class OverrideError(Exception):
    def __init__(self, diagnostic: Diagnostic):
        super().__init__(diagnostic.message)
        self.diagnostic = diagnostic


def label(index: int) -> str:
    """The file name an override's positions carry: ``<--set 1>`` for the first."""
    return f"<--set {index}>"


def sources(overrides: list[str] | tuple[str, ...]) -> dict[str, str]:
    """The override texts by label, for rendering their diagnostics with a caret."""
    return {label(i): text for i, text in enumerate(overrides, 1)}


def apply_overrides(module: ast.Module, overrides: list[str] | tuple[str, ...]) -> ast.Module:
    """``module`` with every override applied in order (a later one wins); raises OverrideError on the first bad one."""
    for i, text in enumerate(overrides, 1):
        module = _apply(module, text, label(i))
    return module


# ---------------------------------------------------------------- one override


def _span(file: str, start: int, end: int) -> Span:
    """Columns ``start``..``end`` (0-based, end exclusive) of the one-line override text."""
    return Span(file=file, line=1, col=start + 1, end_line=1, end_col=max(end, start + 1) + 1)


def _apply(module: ast.Module, text: str, file: str) -> ast.Module:
    path_text, eq, value_text = text.partition("=")
    if not eq or not path_text.strip() or "\n" in text:
        raise OverrideError(Diagnostic("set-syntax", f"--set takes PATH=VALUE, got {text[:80]!r}",
                                       _span(file, 0, len(text)), "e.g. --set stage.train.steps=100"))
    if not _PATH.fullmatch(path_text):
        raise OverrideError(Diagnostic("set-syntax", f"'{path_text[:80]}' is not a dotted path of names",
                                       _span(file, 0, len(path_text)),
                                       "e.g. stage.NAME.KEY, data.NAME.KEY, cluster.KEY or let.NAME"))
    parts, starts = path_text.split("."), [m.start() for m in re.finditer(r"[^.]+", path_text)]
    idents = [ast.Ident(_span(file, s, s + len(p)), p) for p, s in zip(parts, starts)]
    target = _Target(module, idents, file, _span(file, 0, len(path_text)))
    if len(path_text) + 1 < len(_LET):  # shorter than the shortest path that names a value (``let.x``)
        raise target.fail(f"'{path_text}' names no value", None,
                          "write stage.NAME.KEY, data.NAME.KEY, teacher.NAME.KEY, cluster.KEY or let.NAME")
    value = _parse_value(value_text, len(path_text) + 1, file)
    return target.apply(value, _span(file, 0, len(text)))


def _parse_value(text: str, offset: int, file: str) -> ast.Expr:
    """``text`` (starting at 0-based column ``offset`` of the override) as one expression, with its own columns."""
    from gkdlang.parser import ParseError, parse

    if not text.strip():
        raise OverrideError(Diagnostic("set-syntax", "--set gives no value after '='", _span(file, offset, offset),
                                       "e.g. --set stage.train.steps=100"))
    try:
        module = parse(_LET + " " * (offset - len(_LET)) + text, file)
    except ParseError as exc:
        d = exc.diagnostic
        if "expected a declaration" in d.message:  # the value parsed, then more text followed it
            d = dataclasses.replace(d, message=d.message.split(";")[0] + " after the value; a --set value is one "
                                    "expression", hint="quote the whole PATH=VALUE for the shell")
        raise OverrideError(d) from None
    if len(module.decls) != 1:
        extra = module.decls[1].span
        raise OverrideError(Diagnostic("set-syntax", "a --set value is one expression, not declarations", extra,
                                       "quote the whole PATH=VALUE for the shell, and set one value per --set"))
    return module.decls[0].value


@dataclasses.dataclass
class _Target:
    """What an override's path names in a module; ``apply`` gives the module with the new value there."""

    module: ast.Module
    path: list[ast.Ident]
    file: str
    span: Span

    def fail(self, message: str, at: ast.Ident | None = None, hint: str | None = None) -> OverrideError:
        return OverrideError(Diagnostic("set-target", message, at.span if at is not None else self.span, hint))

    def apply(self, value: ast.Expr, whole: Span) -> ast.Module:
        kind, rest = self.path[0], self.path[1:]
        if kind.name not in KINDS:
            raise self.fail(f"--set cannot change '{kind.name}'", kind,
                            did_you_mean(kind.name, KINDS) or f"a path starts with one of: {', '.join(KINDS)}")
        if kind.name == "let":
            return self._set_let(rest, value)
        named = kind.name not in ("cluster", "placement") or (kind.name == "placement" and len(rest) > 1)
        if len(rest) == 1 and kind.name in ("data", *MODEL_ROLES, "model"):
            return self._set_source(kind, rest[0], value, whole)
        if not rest or (named and len(rest) < 2):
            form = f"{kind.name}.KEY" if not named else f"{kind.name}.NAME.KEY"
            raise self.fail(f"'{'.'.join(i.name for i in self.path)}' names no value; write {form}", kind)
        decls = list(self.module.decls)
        index = self._find(kind, rest[0] if named else None, decls, whole)
        keys = rest[1:] if named else rest
        decl = decls[index] if index < len(decls) else self._new_decl(kind, rest[0] if named else None, whole)
        block = _block(decl) or ast.Block(whole, ())
        block = _without(block, EXCLUSIVE.get(kind.name, {}).get(keys[0].name)) if len(keys) == 1 else block
        new = dataclasses.replace(decl, options=self._set_entry(block, keys, value, whole))
        decls[index:index + 1] = [new]
        return dataclasses.replace(self.module, decls=tuple(decls))

    # ------------------------------------------------------------ finding the declaration

    def _find(self, kind: ast.Ident, name: ast.Ident | None, decls: list, whole: Span) -> int:
        """Index of the declaration the path names; ``len(decls)`` for a cluster / placement block to be added."""
        want = {"stage": ast.StageDecl, "data": ast.DataDecl, "vocab": ast.VocabDecl, "cluster": ast.ClusterDecl,
                "placement": ast.PlacementDecl}.get(kind.name, ast.ModelDecl)
        found = [i for i, d in enumerate(decls) if isinstance(d, want) and self._matches(kind.name, d, name)]
        if found:
            return found[0]
        if kind.name == "cluster" or kind.name == "placement":
            if name is not None and name.name not in {d.name.name for d in decls if isinstance(d, ast.StageDecl)}:
                stages = [d.name.name for d in decls if isinstance(d, ast.StageDecl)]
                raise self.fail(f"the spec has no stage '{name.name}' to pin", name,
                                did_you_mean(name.name, stages) or f"stages: {', '.join(stages) or 'none'}")
            return len(decls)
        pool = [d for d in decls if isinstance(d, want) and (kind.name not in MODEL_ROLES or d.role == kind.name)]
        names = [d.name.name for d in pool]
        raise self.fail(f"the spec has no {kind.name} '{name.name}'", name,
                        did_you_mean(name.name, names) or f"{kind.name}s: {', '.join(names) or 'none'}")

    @staticmethod
    def _matches(kind: str, decl, name: ast.Ident | None) -> bool:
        if kind == "cluster":
            return True
        if kind == "placement":
            return (decl.stage.name if decl.stage is not None else None) == (name.name if name else None)
        if kind in MODEL_ROLES and decl.role != kind:
            return False
        return decl.name.name == name.name

    @staticmethod
    def _new_decl(kind: ast.Ident, name: ast.Ident | None, whole: Span):
        block = ast.Block(whole, ())
        if kind.name == "cluster":
            return ast.ClusterDecl(whole, block)
        return ast.PlacementDecl(whole, name, block)

    # ------------------------------------------------------------ the value

    def _set_entry(self, block: ast.Block, keys: list[ast.Ident], value: ast.Expr, whole: Span) -> ast.Block:
        key, args = keys[0], keys[1:]
        entries = list(block.entries)
        at = next((i for i, e in enumerate(entries) if isinstance(e, ast.Entry) and e.key.name == key.name), None)
        if args:
            if at is None:
                raise self.fail(f"there is no '{key.name}' to set '{args[0].name}' in", key,
                                f"set the whole value: --set {'.'.join(i.name for i in self.path[:-len(args)])}=...")
            value = self._set_kwarg(entries[at].value, key, args, value, whole)
        return dataclasses.replace(block, entries=_put(entries, at, ast.Entry(whole, key, value)))

    def _set_kwarg(self, call, owner: ast.Ident, args: list[ast.Ident], value: ast.Expr, whole: Span) -> ast.Expr:
        if not isinstance(call, ast.Call):
            raise self.fail(f"'{owner.name}' is not a call with keyword arguments, so it has no '{args[0].name}'",
                            args[0], f"set the whole value: --set "
                                     f"{'.'.join(i.name for i in self.path[:-len(args)])}=...")
        arg = args[0]
        kwargs = list(call.kwargs)
        at = next((i for i, k in enumerate(kwargs) if k.key.name == arg.name), None)
        if len(args) > 1:
            if at is None:
                raise self.fail(f"there is no '{arg.name}' to set '{args[1].name}' in", arg)
            value = self._set_kwarg(kwargs[at].value, arg, args[1:], value, whole)
        return dataclasses.replace(call, kwargs=_put(kwargs, at, ast.Kwarg(whole, arg, value)))

    def _set_source(self, kind: ast.Ident, name: ast.Ident, value: ast.Expr, whole: Span) -> ast.Module:
        """``data.NAME=text("x.txt")`` / ``teacher.NAME=hf("dir")``: the declaration's source expression."""
        decls = list(self.module.decls)
        index = self._find(kind, name, decls, whole)
        decls[index] = dataclasses.replace(decls[index], source=value)
        return dataclasses.replace(self.module, decls=tuple(decls))

    def _set_let(self, rest: list[ast.Ident], value: ast.Expr) -> ast.Module:
        if len(rest) != 1:
            raise self.fail("write let.NAME=VALUE", self.path[0])
        lets = [d for d in self.module.decls if isinstance(d, ast.LetDecl)]
        found = [d for d in lets if d.name.name == rest[0].name]
        if not found:
            names = [d.name.name for d in lets]
            raise self.fail(f"the spec has no let '{rest[0].name}'", rest[0],
                            did_you_mean(rest[0].name, names) or f"lets: {', '.join(names) or 'none'}")
        decls = tuple(dataclasses.replace(d, value=value) if d is found[0] else d for d in self.module.decls)
        return dataclasses.replace(self.module, decls=decls)


def _block(decl) -> ast.Block | None:
    return decl.options


def _without(block: ast.Block, key: str | None) -> ast.Block:
    if key is None:
        return block
    kept = tuple(e for e in block.entries if not (isinstance(e, ast.Entry) and e.key.name == key))
    return dataclasses.replace(block, entries=kept)


def _put(items: list, at: int | None, new) -> tuple:
    """``items`` with ``new`` at index ``at`` (replacing what is there), or appended when ``at`` is None."""
    if at is None:
        items.append(new)
    else:
        items[at] = new
    return tuple(items)
