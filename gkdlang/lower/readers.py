"""Value readers: option blocks, keyword arguments and literal values read from the AST with their checks."""

from __future__ import annotations

from typing import Any

from gkdlang import ast
from gkdlang import builtins as B
from gkdlang.diagnostics import did_you_mean
from gkdlang.spec import Schedule, Span
from gkdlang.values import ItemSet, ModelRef, NumVal, Objective, Symbol
from gkdlang.lower.context import Lowerer, Scope, Skip, fmt_number, kind_of

_COUNT_UNITS = {"k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
_BYTE_UNITS = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def number_value(text: str) -> NumVal:
    """A number literal's value and unit: 5e-4, 80%, 7B (a count), 40GB / 64GiB (bytes)."""
    for suffix, factor in sorted(_BYTE_UNITS.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return NumVal(float(text[: -len(suffix)]) * factor, "bytes")
    if text.endswith("%"):
        return NumVal(float(text[:-1]) / 100.0, "percent")
    if text[-1] in _COUNT_UNITS:
        return NumVal(float(text[:-1]) * _COUNT_UNITS[text[-1]], None)
    return NumVal(float(text), None)


def vocab_space(lw: Lowerer, model: str) -> str:
    spec = lw.models[model]
    if spec.vocab:
        return f"vocab:{spec.vocab}"
    while spec.base is not None and "vocab" not in spec.overrides:
        spec = lw.models[spec.base]
    return f"{spec.arch.model_type}:{spec.arch.vocab_size}:{spec.name if 'vocab' in spec.overrides else ''}"


def out_of_range(lw: Lowerer, span: Span, i: int, n: int, model: str | None) -> Skip:
    who = f"'{model}'" if model else "the model"
    return lw.err("layer-out-of-range", span, f"layer {i} is out of range: {who} has {n} layers "
                  f"(valid: 0..{n - 1} or -{n}..-1)")


def read_index_int(lw: Lowerer, expr: ast.Expr, scope: Scope) -> int:
    v = lw.ev(expr, scope)
    if not isinstance(v, NumVal) or v.unit is not None or v.value != int(v.value):
        raise lw.err("bad-index", expr.span, "a layer index must be an integer")
    return int(v.value)


def read_objective_arg(lw: Lowerer, expr: ast.Expr, scope: Scope, fname: str) -> Objective:
    obj = lw.ev(expr, scope)
    if isinstance(obj, Symbol):
        raise lw.unknown_value(obj)
    if not isinstance(obj, Objective) or not obj.terms:
        raise lw.err("type-mismatch", expr.span, f"{fname}(...) takes a loss expression, not {kind_of(obj)}")
    return obj


def read_every(lw: Lowerer, kw: dict, scope: Scope, default: str) -> str:
    if "every" not in kw:
        return default
    v = lw.ev(kw["every"], scope)
    if not isinstance(v, Symbol) or v.name not in B.EVERY:
        raise lw.err("bad-value", kw["every"].span, "every is step or epoch")
    return v.name


def read_model_arg(lw: Lowerer, expr: ast.Expr, scope: Scope, what: str) -> str:
    """A model given by name or through a method parameter."""
    v = lw.ev(expr, scope)
    if isinstance(v, Symbol):
        raise lw.unknown("unknown-model", expr.span, v.name, lw.models)
    if not isinstance(v, ModelRef):
        raise lw.err("type-mismatch", expr.span, f"{what} is a model, not {kind_of(v)}")
    return v.name


def read_role_model(lw: Lowerer, expr: ast.Expr, roles: tuple[str, ...], what: str, scope: Scope) -> str:
    name = read_model_arg(lw, expr, scope, what)
    if lw.models[name].role not in roles:
        code = "no-gradient" if "teacher" not in roles else "type-mismatch"
        raise lw.err(code, expr.span, f"{what} must be a {' or '.join(roles)}, and '{name}' is a "
                     f"{lw.models[name].role}")
    return name


def read_probability(lw: Lowerer, expr: ast.Expr | None, key: str, scope: Scope, e: ast.Call) -> Schedule:
    if expr is None:
        raise lw.err("missing-option", e.span, f"{key} is required, e.g. {key}: linear(0.3, 1, until: 66%)")
    p = read_option(lw, expr, key, "schedule", scope)
    if p.kind == "stairs":
        raise lw.err("bad-value", expr.span, f"{key} follows the stage's progress: use linear, cosine or step "
                     "(stairs schedules count epochs or steps and apply to loss options and weights)")
    if not all(0 <= v <= 1 for v in (p.value, p.end if p.end is not None else p.value,
                                     p.after if p.after is not None else p.value)):
        raise lw.err("bad-value", expr.span, f"{key} is a probability between 0 and 1")
    return p


def read_symbol_value(lw: Lowerer, expr: ast.Expr | None, key: str, allowed, scope: Scope, default: str) -> str:
    if expr is None:
        return default
    v = lw.ev(expr, scope)
    if not isinstance(v, Symbol) or v.name not in allowed:
        raise lw.err("bad-value", expr.span, f"{key} is one of {', '.join(allowed)}",
                     did_you_mean(getattr(v, "name", ""), allowed))
    return v.name


def read_items(lw: Lowerer, expr: ast.Expr, scope: Scope, what: str) -> ItemSet:
    return items_of(lw, lw.ev(expr, scope), expr, what)


def items_of(lw: Lowerer, v: Any, expr: ast.Expr, what: str) -> ItemSet:
    if isinstance(v, Symbol):
        raise lw.unknown_value(v)
    if isinstance(v, list) and v and all(isinstance(x, ItemSet) for x in v):
        return ItemSet(tuple(i for s in v for i in s.items), layered=all(s.layered for s in v), span=expr.span)
    if not isinstance(v, ItemSet):
        raise lw.err("type-mismatch", expr.span, f"{what} needs a signal, got {kind_of(v)}")
    return v


def read_block(lw: Lowerer, block: ast.Block | None, keys: dict[str, str], what: str) -> dict[str, ast.Expr]:
    out: dict[str, ast.Expr] = {}
    if block is None:
        return out
    for entry in block.entries:
        k = entry.key.name
        if k not in keys:
            lw.err("unknown-option", entry.key.span, f"unknown {what} option '{k}'",
                   did_you_mean(k, keys) or f"{what} options: {', '.join(keys)}")
        elif k in out:
            lw.err("duplicate-option", entry.key.span, f"'{k}' is given twice")
        else:
            out[k] = entry.value
    return out


def read_kwargs(lw: Lowerer, e: ast.Call, keys: dict[str, str]) -> dict[str, ast.Expr]:
    out: dict[str, ast.Expr] = {}
    fname = e.func.id if isinstance(e.func, ast.Name) else "call"
    for kw in e.kwargs:
        k = kw.key.name
        if k not in keys:
            raise lw.err("unknown-option", kw.key.span, f"{fname}() has no option '{k}'",
                         did_you_mean(k, keys) or (f"options: {', '.join(keys)}" if keys else "it takes none"))
        if k in out:
            raise lw.err("duplicate-option", kw.key.span, f"'{k}' is given twice")
        out[k] = kw.value
    return out


def check_arity(lw: Lowerer, e: ast.Call, n: int, name: str) -> None:
    if len(e.args) != n:
        raise lw.err("bad-arity", e.span, f"{name}() takes {n} positional argument{'s' if n != 1 else ''}, "
                     f"got {len(e.args)}")


def read_option(lw: Lowerer, expr: ast.Expr, key: str, kind: str, scope: Scope) -> Any:
    if kind == "schedule":
        v = lw.ev(expr, scope)
        if isinstance(v, NumVal) and v.unit is None:
            return Schedule(value=v.value)
        if isinstance(v, Schedule):
            return v
        raise lw.err("type-mismatch", expr.span, f"{key} is a number or a schedule like linear(20, 1)")
    if kind == "bool":
        return read_bool(lw, expr, key, scope)
    if kind == "int":
        return read_int(lw, expr, key, minimum=1, scope=scope)
    if kind == "fraction":
        return read_fraction(lw, expr, key, scope)
    value = read_num(lw, expr, key, scope)
    if value < 0:
        raise lw.err("bad-value", expr.span, f"{key} must not be negative")
    return value


def read_plain_number(lw: Lowerer, expr: ast.Expr, scope: Scope) -> float:
    v = lw.ev(expr, scope)
    if isinstance(v, Symbol):
        raise lw.unknown_value(v)
    if not isinstance(v, NumVal) or v.unit == "bytes":
        raise lw.err("type-mismatch", expr.span, f"expected a number, got {kind_of(v)}")
    return v.value


def read_num(lw: Lowerer, expr: ast.Expr, key: str, scope: Scope | None = None) -> float:
    v = lw.ev(expr, scope or Scope(lw.lets))
    if isinstance(v, Symbol):
        raise lw.unknown_value(v)
    if not isinstance(v, NumVal):
        raise lw.err("type-mismatch", expr.span, f"{key} must be a number, got {kind_of(v)}")
    if v.unit is not None:
        raise lw.err("bad-number", expr.span, f"{key} takes a plain number, not {v.unit}")
    return v.value


def read_int(lw: Lowerer, expr: ast.Expr, key: str, minimum: int | None = None, scope: Scope | None = None) -> int:
    v = read_num(lw, expr, key, scope)
    if v != int(v):
        raise lw.err("bad-number", expr.span, f"{key} must be a whole number, got {fmt_number(v)}")
    if minimum is not None and v < minimum:
        raise lw.err("bad-value", expr.span, f"{key} must be at least {minimum}, got {fmt_number(v)}")
    return int(v)


def read_fraction(lw: Lowerer, expr: ast.Expr, key: str, scope: Scope | None = None) -> float:
    v = lw.ev(expr, scope or Scope(lw.lets))
    if not isinstance(v, NumVal) or v.unit == "bytes":
        raise lw.err("type-mismatch", expr.span, f"{key} is a fraction like 5% or 0.05")
    if not 0 <= v.value <= 1:
        raise lw.err("bad-value", expr.span, f"{key} must lie between 0% and 100%")
    return v.value


def read_bytes(lw: Lowerer, expr: ast.Expr, key: str) -> int:
    v = lw.ev(expr, Scope(lw.lets))
    if not isinstance(v, NumVal) or v.unit != "bytes":
        raise lw.err("bad-number", expr.span, f"{key} is a size like 512GB or 64GiB")
    if v.value <= 0:
        raise lw.err("bad-value", expr.span, f"{key} must be a positive size, got {fmt_number(v.value)} bytes")
    return int(v.value)


def read_bool(lw: Lowerer, expr: ast.Expr, key: str, scope: Scope | None = None) -> bool:
    v = lw.ev(expr, scope or Scope(lw.lets))
    if not isinstance(v, bool):
        raise lw.err("type-mismatch", expr.span, f"{key} is true or false")
    return v


def read_string(lw: Lowerer, expr: ast.Expr, key: str) -> str:
    v = lw.ev(expr, Scope(lw.lets))
    if not isinstance(v, str):
        raise lw.err("type-mismatch", expr.span, f"{key} takes a string in double quotes")
    return v


def read_strings(lw: Lowerer, expr: ast.Expr, key: str) -> list[str]:
    v = lw.ev(expr, Scope(lw.lets))
    if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
        raise lw.err("type-mismatch", expr.span, f'{key} is a list of strings: ["yes", "no"]')
    return v


def read_symbol(lw: Lowerer, expr: ast.Expr, key: str, allowed) -> str:
    if isinstance(expr, ast.Name) and expr.id in allowed:
        return expr.id
    got = expr.id if isinstance(expr, ast.Name) else "that"
    raise lw.err("bad-value", expr.span, f"{key} is one of {', '.join(allowed)}", did_you_mean(got, allowed))


def read_column(lw: Lowerer, expr: ast.Expr, key: str) -> str:
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.String):
        return expr.value
    raise lw.err("type-mismatch", expr.span, f"{key} names a column")


def read_layer_list(lw: Lowerer, expr: ast.Expr, n: int, call: ast.Call, model: str | None = None) -> list[int]:
    if not isinstance(expr, ast.List):
        raise lw.err("type-mismatch", expr.span, "layers is a list: [0, 2, 4]")
    out = []
    for item in expr.items:
        i = read_index_int(lw, item, Scope(lw.lets))
        if not -n <= i < n:
            raise out_of_range(lw, item.span, i, n, model)
        out.append(i % n)
    return out


def read_model_name(lw: Lowerer, expr: ast.Expr) -> str:
    if isinstance(expr, ast.Name) and expr.id in lw.models:
        lw.used.add(expr.id)
        return expr.id
    if isinstance(expr, ast.Name) and expr.id in lw.model_decls:
        raise Skip()
    if not isinstance(expr, ast.Name):
        raise lw.err("type-mismatch", expr.span, "a model name is expected here (written without quotes)",
                     f"e.g. {next(iter(lw.models), 'teacher')}")
    raise lw.unknown("unknown-model", expr.span, expr.id, lw.models)


def read_data_name(lw: Lowerer, expr: ast.Expr) -> str:
    if isinstance(expr, ast.Name) and expr.id in lw.data:
        lw.used.add(expr.id)
        return expr.id
    if isinstance(expr, ast.Name) and expr.id in lw.data_decls:
        lw.used.add(expr.id)
        raise Skip()
    name = expr.id if isinstance(expr, ast.Name) else "?"
    raise lw.unknown("unknown-data", expr.span, name, lw.data)


def not_executed(lw: Lowerer, opts: dict[str, ast.Expr], what: str) -> None:
    """Warn about accepted keys the runtime does not execute yet (builtins.NOT_EXECUTED)."""
    for key, missing in B.NOT_EXECUTED.items():
        if key in opts:
            lw.d.report("not-executed", opts[key].span, f"{what} key '{key}' is checked but not executed yet: {missing}",
                        "remove it to silence this warning")
