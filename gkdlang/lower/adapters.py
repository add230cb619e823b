"""``adapter: lora(r: 8, alpha: 16, dropout: 0.05, targets: [q_proj, v_proj])`` on a student -> ``LoraSpec``."""

from __future__ import annotations

from gkdlang import ast
from gkdlang import builtins as B
from gkdlang.diagnostics import did_you_mean
from gkdlang.lora import DEFAULT_TARGETS, LINEARS, adapter_params
from gkdlang.lower.context import Lowerer
from gkdlang.lower.readers import check_arity, read_fraction, read_int, read_kwargs, read_num
from gkdlang.spec import ArchInfo, InitSpec, LoraSpec


def lower_adapter(lw: Lowerer, expr: ast.Expr, name: str, role: str, arch: ArchInfo, init: InitSpec) -> LoraSpec:
    if not (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "lora"):
        raise lw.err("type-mismatch", expr.span, "adapter is lora(r: <rank>, alpha: <scale>, dropout: <fraction>, "
                     "targets: [<module>, ...])")
    if role != "student":
        raise lw.err("bad-value", expr.span, f"adapter is a student option; '{name}' is a {role}",
                     "a teacher runs frozen as it is; declare the model as a student to train an adapter")
    if arch.family not in LINEARS:
        raise lw.err("bad-value", expr.span, f"LoRA targets of the {arch.family} family are not known "
                     f"(families: {', '.join(sorted(LINEARS))})")
    check_arity(lw, expr, 0, "lora")
    kw = read_kwargs(lw, expr, B.LORA_OPTIONS)
    fields: dict = {}
    if "r" in kw:
        fields["r"] = read_int(lw, kw["r"], "r", minimum=1)
    if "alpha" in kw:
        fields["alpha"] = read_num(lw, kw["alpha"], "alpha")
        if fields["alpha"] <= 0:
            raise lw.err("bad-value", kw["alpha"].span, "alpha must be positive")
    if "dropout" in kw:
        fields["dropout"] = read_fraction(lw, kw["dropout"], "dropout")
        if fields["dropout"] >= 1:
            raise lw.err("bad-value", kw["dropout"].span, "dropout must be below 1")
    targets = _targets(lw, kw["targets"], arch) if "targets" in kw else list(DEFAULT_TARGETS[arch.family])
    if init.kind == "random":
        lw.err("adapter-random-base", expr.span, f"student '{name}' starts from random weights, which a LoRA "
               "adapter leaves frozen: only the low-rank updates would learn",
               "give it weights: hf(\"<dir>\"), or init: copy(<model>)")
    r = fields.get("r", LoraSpec.model_fields["r"].default)
    return LoraSpec(targets=targets, params=adapter_params(arch, r, targets), **fields)


def _targets(lw: Lowerer, expr: ast.Expr, arch: ArchInfo) -> list[str]:
    known = list(LINEARS[arch.family])
    if not isinstance(expr, ast.List) or not expr.items:
        raise lw.err("type-mismatch", expr.span, f"targets is a list of module names, e.g. [{', '.join(known[:2])}]")
    out: list[str] = []
    for item in expr.items:
        value = item.id if isinstance(item, ast.Name) else item.value if isinstance(item, ast.String) else None
        if value not in known:
            raise lw.err("bad-value", item.span, f"'{value}' is not a LoRA target of {arch.family} blocks "
                         f"(targets: {', '.join(known)})", did_you_mean(str(value), known))
        if value in out:
            raise lw.err("duplicate-option", item.span, f"target '{value}' is given twice")
        out.append(value)
    return out


def check_adapters(lw: Lowerer) -> None:
    """A LoRA student keeps its embedding rows frozen, so it cannot have its vocabulary compressed."""
    for name, model in lw.models.items():
        if model.adapter is not None and model.vocab is not None:
            lw.err("conflicting-options", model.span, f"student '{name}' has a LoRA adapter and a compressed "
                   f"vocabulary ('{model.vocab}'): compression rewrites the embedding rows the adapter keeps frozen",
                   "drop one of them")
