"""A stage's held-out evaluation: ``eval_every`` and ``keep_best`` checked against its data's ``split`` and its
student (an LM or a classifier), lowered into ``StageSpec.eval_every`` / ``StageSpec.keep_best``."""

from __future__ import annotations

from typing import Any

from gkdlang import ast
from gkdlang.diagnostics import did_you_mean
from gkdlang.lower.context import Lowerer
from gkdlang.spec import KeepBest

#: metric -> whether larger is better
BETTER_LARGER = {"loss": False, "perplexity": False, "accuracy": True, "distill": False}


def lower_evaluation(lw: Lowerer, opts: dict[str, ast.Expr], fields: dict[str, Any], data: str,
                     students: list[str], has_interventions: bool, reads_teacher: bool) -> None:
    """Check that the stage has held-out data for ``eval_every`` / ``keep_best``; lower ``keep_best``."""
    wanted = [k for k in ("eval_every", "keep_best") if k in opts]
    if not wanted or data not in lw.data:
        return
    if lw.data[data].split is None or lw.data[data].split == 0:
        key = wanted[0]
        lw.err("no-held-out", opts[key].span, f"{key} evaluates held-out data, but data '{data}' holds none out",
               f"add a split to data '{data}', e.g. split: 5%")
        return
    if "keep_best" not in opts:
        return
    expr = opts["keep_best"]
    classifier = any(lw.models[s].head.kind == "classify" for s in students if s in lw.models)
    default = ("accuracy" if lw.data[data].label is not None else "distill") if classifier else "loss"
    if isinstance(expr, ast.Bool):
        metric = default if expr.value else None
    elif isinstance(expr, ast.Name) and expr.id in KeepBest.options:
        metric = expr.id
    else:
        got = expr.id if isinstance(expr, ast.Name) else "that"
        lw.err("bad-value", expr.span, f"keep_best is true or a held-out metric: {', '.join(KeepBest.options)}",
               did_you_mean(got, KeepBest.options))
        return
    if metric is None:
        return
    if metric == "accuracy" and not classifier:
        lw.err("bad-value", expr.span, "keep_best: accuracy needs a classifier student (head: classify)",
               "use keep_best: loss (or perplexity) for a language model")
        return
    if metric in ("accuracy", "loss") and classifier and lw.data[data].label is None:
        lw.err("bad-value", expr.span, f"keep_best: {metric} of a classifier needs labels, and data '{data}' has none",
               "give the data a label column, or use keep_best: distill")
        return
    if metric == "perplexity" and classifier:
        lw.err("bad-value", expr.span, "keep_best: perplexity is a language model's; this student is a classifier",
               "use keep_best: accuracy or loss")
        return
    if metric == "distill" and (has_interventions or not reads_teacher):
        why = "its interventions change the forward pass" if has_interventions else "its loss reads no teacher"
        lw.err("bad-value", expr.span, f"keep_best: distill is not measured for this stage ({why})",
               f"use keep_best: {default}")
        return
    fields["keep_best"] = KeepBest(metric=metric, mode="max" if BETTER_LARGER[metric] else "min", span=expr.span)
