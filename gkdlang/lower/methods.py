"""Method inlining: binding a call's arguments and evaluating a method body in its own scope."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from gkdlang import ast
from gkdlang.diagnostics import closest, did_you_mean
from gkdlang.values import Objective
from gkdlang.digest import STDLIB
from gkdlang.lower.context import Lowerer, MethodDef, Scope, Skip


#: deepest chain of methods calling methods (the standard library nests 4); each level is several Python frames
MAX_CALL_DEPTH = 32


def call_method(lw: Lowerer, m: MethodDef, e: ast.Call, scope: Scope) -> Objective:
    if len(scope.stack) >= MAX_CALL_DEPTH:
        chain = " -> ".join(scope.stack[:3] + ("...",) + scope.stack[-2:] + (m.qualname,))
        raise lw.err("nesting-too-deep", e.span, f"methods call each other more than {MAX_CALL_DEPTH} deep ({chain})",
                     "call the inner methods directly from a shallower one")
    if m.qualname in scope.stack:
        raise lw.err("method-recursion", e.span, f"method '{m.qualname}' calls itself "
                     f"({' -> '.join(scope.stack + (m.qualname,))})")
    params = m.decl.params
    if len(e.args) > len(params):
        raise lw.err("bad-arity", e.span, f"'{m.qualname}' takes {len(params)} arguments, got {len(e.args)}")
    bound: dict[str, Any] = {}
    for p, a in zip(params, e.args):
        bound[p.name.name] = lw.ev(a, scope)
    names = [p.name.name for p in params]
    for kw in e.kwargs:
        key = kw.key.name
        if key not in names:
            raise lw.err("unknown-option", kw.key.span, f"'{m.qualname}' has no parameter '{key}'",
                         did_you_mean(key, names) or f"parameters: {', '.join(names)}")
        if key in bound:
            raise lw.err("duplicate-option", kw.key.span, f"parameter '{key}' given twice")
        bound[key] = lw.ev(kw.value, scope)
    inner = Scope(dict(m.lets), scope.stack + (m.qualname,), m.qualname)
    for p in params:
        if p.name.name not in bound:
            if p.default is None:
                raise lw.err("bad-arity", e.span, f"'{m.qualname}' needs argument '{p.name.name}'")
            bound[p.name.name] = lw.ev(p.default, Scope({**m.lets, **bound}, inner.stack, m.qualname))
    inner.values.update(bound)
    try:
        result = lw.ev(m.decl.body, inner)
    except Skip:
        # point at the call site too, so an error inside a library method is traceable to the user's line
        if lw.d.items and lw.d.items[-1].span and lw.d.items[-1].span.file != e.span.file:
            last = lw.d.items[-1]
            lw.d.items[-1] = replace(last, related=last.related + ((e.span, f"in call of '{m.qualname}'"),))
        raise
    if not isinstance(result, Objective):
        raise lw.err("type-mismatch", m.decl.body.span, f"method '{m.qualname}' must return a loss expression")
    return Objective(tuple(t if t.method else replace(t, method=m.qualname) for t in result.terms),
                     result.interventions)


def stdlib_methods() -> dict[str, list[str]]:
    """method name -> libraries defining it, by a scan of the stdlib texts (only used for error hints)."""
    out: dict[str, list[str]] = {}
    for file in sorted(STDLIB.glob("*.gkd")):
        for m in re.finditer(r"^method\s+([A-Za-z_]\w*)", file.read_text(encoding="utf-8"), re.M):
            out.setdefault(m.group(1), []).append(file.stem)
    return out


def stdlib_hint(name: str, used: dict) -> str | None:
    """For a method that a library not yet ``use``d defines: which ``use`` line brings it in."""
    methods = stdlib_methods()
    close = closest(name, methods)
    if not close:
        return None
    lib = methods[close][0]
    call = close if close == lib else f"{lib}.{close}"
    if lib in used:
        return f"did you mean '{call}'?"
    return f"did you mean '{call}'? add `use {lib}` to load it from the standard library"
