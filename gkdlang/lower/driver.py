"""The lowering driver: the passes run in order over a parsed module, giving the checked Spec.

Order: duplicates, ``use``, ``let`` and ``method``, models (bases first), data, vocab, cluster, placements
(``placement`` blocks: pins per stage), stages (whose
loss expressions run the expression, method, combinator, intervention, transform and loss passes), final
checks. A construct that fails is reported and skipped (``Skip``), so checking goes on with the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydantic

from gkdlang import ast
from gkdlang.diagnostics import Collector, Diagnostic
from gkdlang.digest import spec_hash
from gkdlang.lower.context import Lowerer, MethodDef
from gkdlang.lower.declarations import (
    check_duplicates,
    final_checks,
    lower_cluster,
    lower_data,
    lower_let,
    lower_model,
    lower_use,
    lower_vocab,
    models_in_dependency_order,
)
from gkdlang.lower.expressions import EXPRESSIONS
from gkdlang.lower.placement import lower_placements
from gkdlang.lower.stages import lower_stages
from gkdlang.overrides import OverrideError, apply_overrides
from gkdlang.overrides import sources as override_sources
from gkdlang.parser import ParseError, no_gc, parse
from gkdlang.paths import check_paths
from gkdlang.spec import Span, Spec


@dataclass
class CheckResult:
    spec: Spec | None
    diagnostics: list[Diagnostic]
    sources: dict[str, str]
    module: ast.Module | None = None

    @property
    def ok(self) -> bool:
        return self.spec is not None and not any(d.severity == "error" for d in self.diagnostics)


def check_file(path: str | Path, *, display_name: str | None = None,
               allowed_paths: tuple[str | Path, ...] | list = (), overrides: tuple[str, ...] | list = ()) -> CheckResult:
    path = Path(path)
    name = display_name or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        span = Span(file=name, line=1, col=1, end_line=1, end_col=1)
        d = Diagnostic("syntax-unexpected-char", f"file is not UTF-8 (byte {exc.start})", span)
        return CheckResult(None, [d], {})
    return check_source(text, name, base_dir=path.parent, allowed_paths=allowed_paths, overrides=overrides)


def check_source(text: str, file: str = "<input>", *, base_dir: str | Path | None = None,
                 allowed_paths: tuple[str | Path, ...] | list = (), overrides: tuple[str, ...] | list = ()) -> CheckResult:
    """Parse and lower a spec text; never raises for bad input. ``allowed_paths``: folders beside the spec's project
    where data and cache paths may point (gkdlang.paths, ``--allow-path``). ``overrides``: ``--set PATH=VALUE``
    texts applied to the parsed module before any check (gkdlang.overrides), recorded in the Spec and its hash."""
    sources = {file: text, **override_sources(overrides)}
    try:
        module = apply_overrides(parse(text, file), overrides)
    except (ParseError, OverrideError) as exc:
        return CheckResult(None, [exc.diagnostic], sources)
    refused = check_paths(module, Path(base_dir or "."), allowed_paths)
    if refused:  # the path rule runs before any pass reads a file: a refused path never reaches the file system
        return CheckResult(None, sorted(refused, key=lambda d: (d.span.line, d.span.col)), sources, module)
    diags = Collector()
    lw = Lowerer(module, text, file, Path(base_dir or "."), diags, sources, EXPRESSIONS)
    with no_gc():  # the AST stays alive throughout: collections would rescan it (gkdlang.parser.no_gc)
        spec = lower_module(lw)
    if spec is not None and overrides:
        spec = spec.model_copy(update={"overrides": list(overrides),
                                       "source_hash": spec_hash(text, spec.uses, list(overrides))})
    return CheckResult(spec if not diags.has_errors() else None, diags.sorted(), sources, module)


def lower_module(lw: Lowerer) -> Spec | None:
    decls = lw.module.decls
    check_duplicates(lw, decls)
    for decl in decls:
        if isinstance(decl, ast.Use):
            lw.guard(lower_use, lw, decl)
    for decl in decls:
        if isinstance(decl, ast.LetDecl):
            lw.guard(lower_let, lw, decl)
        elif isinstance(decl, ast.MethodDecl):
            lw.methods.setdefault(decl.name.name, MethodDef(decl.name.name, decl, lw.lets))
    for decl in models_in_dependency_order(lw, decls):
        lw.guard(lower_model, lw, decl)
    for decl in decls:
        if isinstance(decl, ast.DataDecl):
            # recorded before lowering so a data source that fails is not also reported as unknown
            lw.data_decls.setdefault(decl.name.name, decl)
            lw.guard(lower_data, lw, decl)
    for decl in decls:
        if isinstance(decl, ast.VocabDecl):
            lw.guard(lower_vocab, lw, decl)
    cluster = lw.cluster = lower_cluster(lw, next((d for d in decls if isinstance(d, ast.ClusterDecl)), None))
    stage_decls = [d for d in decls if isinstance(d, ast.StageDecl)]
    pins = lower_placements(lw, [d for d in decls if isinstance(d, ast.PlacementDecl)],
                            [d.name.name for d in stage_decls])
    stages = lower_stages(lw, stage_decls, pins)
    final_checks(lw, decls, stages)
    if lw.d.has_errors() or cluster is None:
        return None
    try:
        return Spec(file=lw.file, source_hash=spec_hash(lw.text, sorted(lw.libraries)),
                    models=lw.models, data=lw.data, vocabs=lw.vocabs, stages=stages, cluster=cluster,
                    uses=sorted(lw.libraries))
    except pydantic.ValidationError as exc:  # a gap between checks and the model: report, never crash
        lw.err("bad-value", None, f"internal consistency check failed: {exc.errors()[0]['msg']}")
        return None
