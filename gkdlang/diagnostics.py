"""Diagnostics: the code registry, a collector shared by all phases, and text/json/github renderers.

Every message a user can get from ``gkdc check`` or ``gkdc plan`` has a kebab-case code registered in
``CODES`` (the docs table in docs/diagnostics.md is generated from it and tested against it). Phases report
``(code, span, message, hint)`` and go on; only syntax errors stop a phase.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Iterable, Literal

from gkdlang.spec import Span

Severity = Literal["error", "warning", "note"]

#: code -> (severity, one-line description for the docs)
CODES: dict[str, tuple[Severity, str]] = {
    # files and syntax
    "file-not-found": ("error", "A spec file that does not exist or cannot be read."),
    "syntax-unexpected-token": ("error", "A token that cannot appear here; the message lists what was expected."),
    "syntax-unexpected-char": ("error", "A character that starts no token of the language."),
    "syntax-unexpected-eof": ("error", "The file ends inside a declaration (an unclosed brace or bracket)."),
    "bad-number": ("error", "A number with a unit that does not fit where it is used (e.g. `40GB` as a step count)."),
    "bad-string": ("error", "A string literal with an invalid escape."),
    "nesting-too-deep": ("error", "An expression nested more than 100 levels deep, brackets nested deeper, or a flat sum "
                         "or product of more than 400 operands (split it with `let`)."),
    "set-syntax": ("error", "A `--set` that is not PATH=VALUE, or whose value is not one expression of the language."),
    "set-target": ("error", "A `--set` path that names no value of the spec (no such stage, model, data, let, or "
                            "keyword argument to change)."),
    "spec-too-large": ("error", "A spec file over 8 MiB characters (a 5 MB spec checks in seconds); split it, or "
                               "move repeated parts into methods."),
    # names
    "unknown-name": ("error", "A name that is not a declared model, data source, constant or parameter."),
    "unknown-model": ("error", "A model name that no `teacher`/`student` declaration defines."),
    "unknown-data": ("error", "A data source name that no `data` declaration defines."),
    "unknown-stage": ("error", "A stage named in `after` that does not exist."),
    "unknown-method": ("error", "A method that neither the spec nor a `use`d library defines."),
    "unknown-function": ("error", "A function name the language does not provide."),
    "unknown-signal": ("error", "A signal name that models do not have (e.g. `hiddens`)."),
    "unknown-option": ("error", "A block key or keyword argument that the construct does not take."),
    "unknown-library": ("error", "A `use`d library that gkdc's standard library does not contain."),
    "unknown-mask": ("error", "A `where` mask that is not one of pad, masked, cls, special."),
    "duplicate-definition": ("error", "Two declarations with the same name."),
    "duplicate-option": ("error", "The same key twice in one block or call."),
    "unused-definition": ("warning", "A model or data source declared but never used."),
    "not-executed": ("warning", "A key the checker accepts but `gkdc run` does not execute yet: it has no effect on "
                                "the run (no key is in this state today)."),
    "device-mismatch": ("warning", "`gkdc run` of a plan made for GPUs on a machine with none (or for CPU ranks on one "
                                   "with GPUs): it runs, but the plan's memory and time figures are not this machine's."),
    "no-prompts": ("error", "A generating stage (`generate: on_policy(...)`) whose `prompts` names no data source, or "
                   "data with no example usable as a prompt."),
    "cannot-generate": ("error", "A generating stage whose student cannot sample (a masked LM, a classifier, no LM "
                        "head), whose teacher cannot score generated tokens (cached, masked LM), or, with `seq_kd`, "
                        "whose teacher cannot sample."),
    "bad-hostfile": ("error", "`gkdc run --hostfile` of a file that is not DeepSpeed's `host slots=N` lines, or whose "
                     "hosts or slots do not match the plan's nodes and gpus per node (`file:line:col`)."),
    "run-folder-not-shared": ("error", "A multi-node `gkdc run` whose `--out` is not one folder every node sees: node 0 "
                              "did not find every node's token file there in time (or a node did not find node 0's)."),
    "no-held-out": ("error", "`eval_every` or `keep_best` on a stage whose data has no `split` (nothing held out)."),
    # models
    "model-source": ("error", "A model source that is neither a local directory with config.json nor a catalog model."),
    "bad-config": ("error", "A config.json gkdc cannot read (invalid JSON or unsupported architecture)."),
    "bad-override": ("error", "A derived model whose overrides are inconsistent (e.g. hidden not divisible by heads)."),
    "no-student": ("error", "The spec declares no student model."),
    "missing-option": ("error", "A required key is missing from a block (e.g. a stage without `data` or `loss`)."),
    "conflicting-options": ("error", "Keys that exclude each other (e.g. both `steps` and `epochs`)."),
    "bad-value": ("error", "A value of the right type outside its valid range."),
    "type-mismatch": ("error", "A value of the wrong kind (e.g. a number where a signal is expected)."),
    "bad-arity": ("error", "A call with missing or extra positional arguments."),
    # signals, shapes, losses
    "layer-out-of-range": ("error", "A layer index beyond the real architecture's layer count."),
    "bad-index": ("error", "An index that is not an integer, a slice with step 0, or an index on a non-layered signal."),
    "dim-mismatch": ("error", "Two sides of a loss with different widths and no projection."),
    "head-mismatch": ("error", "Attention maps compared across different head counts with no head map."),
    "vocab-mismatch": ("error", "Logits over different vocabularies compared with no vocabulary map."),
    "shape-mismatch": ("error", "Two sides of a loss of different signal kinds (e.g. hidden states vs logits)."),
    "layer-count-mismatch": ("error", "Layer lists of different lengths paired with no layer map."),
    "bad-layer-map": ("error", "A layer map that cannot pair the two models (e.g. a teacher shallower than its student)."),
    "relation-heads": ("error", "A relation head count that does not divide the signal's width."),
    "no-gradient": ("error", "A loss term with no student signal: it cannot train anything."),
    "no-teacher-signal": ("warning", "A stage whose loss reads no teacher signal (plain supervised training)."),
    "bad-temperature": ("error", "A temperature that is zero or negative."),
    "negative-weight": ("error", "A loss weight below zero."),
    "bad-weight": ("error", "A weight expression gkdc cannot represent (e.g. a schedule times a schedule)."),
    "no-labels": ("error", "A loss on `labels` in a stage whose data has no label column."),
    "no-task-head": ("error", "`task_logits` of a model without a classification head."),
    "method-recursion": ("error", "A method that calls itself."),
    # vocab, stages, cluster
    "vocab-too-large": ("error", "A vocabulary keep larger than the model's vocabulary."),
    "vocab-target": ("error", "Vocabulary compression declared for a model that is not a student."),
    "vocab-remap-random": ("error", "A student ranking its own vocabulary remaps dropped tokens by its own embeddings, "
                           "but starts from random weights (remap by a pretrained model's, or use unk)."),
    "stage-cycle": ("error", "Stages whose `after` dependencies form a cycle."),
    "no-stages": ("error", "The spec declares no stage."),
    "bad-duration": ("error", "A stage with neither `steps` nor `epochs`, or a non-positive duration."),
    "incompatible-methods": ("error", "Constructs that cannot run together: two that rewrite the student's forward pass "
                             "in one stage, or a term in two sampling groups."),
    "cosine-width": ("error", "A cosine loss between hidden states of different widths (DistilBERT needs equal sizes)."),
    "no-bottleneck-teacher": ("error", "MobileBERT transfer from a teacher that is not an inverted-bottleneck model "
                              "with the student's hidden size and heads."),
    "interchange-checkpointing": ("error", "DIITO's interchange in a stage with activation checkpointing forced on."),
    "perturb-accumulation": ("error", "Gradient perturbation (LRC-BERT) in a stage whose micro-batch forces "
                             "gradient accumulation."),
    "batch-too-small": ("error", "Hard per-teacher selection (Uncertainty) with a per-rank micro-batch smaller than "
                        "the number of teachers."),
    "data-not-found": ("warning", "A data path that matches no file at check time (it must exist before `gkdc run`)."),
    "missing-weights": ("error", "A local teacher folder whose safetensors lack a head the spec reads (e.g. a BertModel "
                        "folder, no MLM head, read for logits): it would train against a random head."),
    "family-not-runnable": ("warning", "A model of a family the planner knows but the runtime cannot train yet (opt, bloom, "
                            "glm): `gkdc plan` works, `gkdc run` refuses it."),
    "bad-path": ("error", "A data or cache path that is empty, holds a NUL, or is too long (4,096 characters, 255 per name)."),
    "path-outside-root": ("error", "A data or cache path that resolves outside the spec's project and every `--allow-path` "
                          "folder (see docs/security.md)."),
    "data-is-directory": ("error", "A data path that names a folder; name its files with a glob."),
    "unknown-gpu": ("error", "A device name that the hardware catalog does not contain."),
    "plan-infeasible": ("error", "No placement fits the cluster's memory; the message names the resource that does not "
                        "fit (GPU or host memory, per rank or per node), the best attempt per rank and what would fit."),
    "pin-does-not-fit": ("error", "A pinned placement (`placement { ... }`) that does not fit; the message names the "
                         "resource, the per-rank breakdown and the placement the planner would pick."),
    "pin-unavailable": ("error", "A pinned choice this cluster or stage cannot run (NVMe offload without `nvme`, "
                        "`offline` for a teacher without a usable cache)."),
    "adapter-random-base": ("warning", "A LoRA student (`adapter: lora(...)`) whose own weights start random: the "
                            "adapter keeps them frozen, so only its low-rank updates would learn."),
    "bad-chat-data": ("error", "A `chat(...)` file row that is not a conversation: not JSON, no `messages` list of "
                      "`{role, content}` turns, or no assistant turn (the message names the file and line)."),
    "no-chat-template": ("error", "Chat data read by a student whose tokenizer folder has no chat template "
                         "(`chat_template.jinja` or `tokenizer_config.json`'s `chat_template`)."),
    "packing-unsupported": ("error", "`packing: true` on data that a stage cannot pack (labels, sentence pairs, a "
                            "masked LM, or a per-sequence signal)."),
    "no-cpu-memory": ("warning", "The cluster gives no `cpu_memory`: host memory was not checked; the message states "
                      "what the plan needs per node."),
    "gpus-per-node": ("warning", "A cluster of several `nodes` whose `gpus` does not say `per node`: the count is per "
                      "node (`nodes: 2, gpus: 8 x A100-40GB` is 16 ranks); write `8 x A100-40GB per node` to say so."),
}


@dataclass(frozen=True)
class Diagnostic:
    code: str
    message: str
    span: Span | None
    hint: str | None = None
    related: tuple[tuple[Span, str], ...] = ()
    """Other positions worth showing (e.g. the other side of a mismatched loss)."""

    @property
    def severity(self) -> Severity:
        return CODES[self.code][0]


@dataclass
class Collector:
    """Collects diagnostics from every phase; never raises."""

    items: list[Diagnostic] = field(default_factory=list)

    def report(self, code: str, span: Span | None, message: str, hint: str | None = None,
               related: Iterable[tuple[Span, str]] = ()) -> None:
        if code not in CODES:  # a programming error, not a user error
            raise KeyError(f"unregistered diagnostic code {code!r}")
        self.items.append(Diagnostic(code, message, span, hint, tuple(related)))

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.items if d.severity == "error"]

    def has_errors(self) -> bool:
        return any(d.severity == "error" for d in self.items)

    def sorted(self) -> list[Diagnostic]:
        def key(d: Diagnostic):
            s = d.span
            return (s.file, s.line, s.col) if s else ("", 0, 0)

        return sorted(self.items, key=key)


def closest(name: str, candidates: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The candidate most like ``name`` (difflib ratio at least ``cutoff``), or None: the one matcher behind
    every did-you-mean of gkdc (checker, model catalog, hardware catalog, runtime registries)."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=cutoff)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """``"did you mean 'x'?"`` for the closest candidate, or None."""
    match = closest(name, candidates)
    return f"did you mean '{match}'?" if match else None


# ---------------------------------------------------------------- rendering


def render_text(diags: Iterable[Diagnostic], sources: dict[str, str]) -> str:
    """``file:line:col: error: message  [code]`` with the source line, a caret and the hint."""
    out: list[str] = []
    for d in diags:
        s = d.span
        where = f"{s.file}:{s.line}:{s.col}: " if s else ""
        out.append(f"{where}{d.severity}: {d.message}  [{d.code}]")
        if s is not None:
            out.extend(_excerpt(s, sources.get(s.file)))
        for rel_span, rel_msg in d.related:
            out.append(f"  {rel_span.file}:{rel_span.line}:{rel_span.col}: note: {rel_msg}")
            out.extend(_excerpt(rel_span, sources.get(rel_span.file)))
        if d.hint:
            out.append(f"  = help: {d.hint}")
    return "\n".join(out)


def _excerpt(span: Span, text: str | None) -> list[str]:
    if text is None:
        return []
    lines = text.splitlines()
    if not 1 <= span.line <= len(lines):
        return []
    line = lines[span.line - 1].replace("\t", " ")
    width = span.end_col - span.col if span.end_line == span.line else len(line) - span.col + 1
    gutter = f"{span.line:>4} | "
    return [gutter + line, " " * (len(gutter) + span.col - 1) + "^" * max(1, width)]


def to_json(diags: Iterable[Diagnostic]) -> list[dict]:
    out = []
    for d in diags:
        item = {"code": d.code, "severity": d.severity, "message": d.message, "hint": d.hint}
        if d.span is not None:
            item.update(file=d.span.file, line=d.span.line, col=d.span.col,
                        end_line=d.span.end_line, end_col=d.span.end_col)
        item["related"] = [{"file": s.file, "line": s.line, "col": s.col, "message": m} for s, m in d.related]
        out.append(item)
    return out


def render_json(diags: Iterable[Diagnostic]) -> str:
    return json.dumps(to_json(diags), indent=2)


def render_github(diags: Iterable[Diagnostic]) -> str:
    """GitHub Actions workflow commands: ``::error file=F,line=L,col=C,title=code::message``."""
    out = []
    for d in diags:
        level = {"error": "error", "warning": "warning", "note": "notice"}[d.severity]
        msg = d.message + (f" ({d.hint})" if d.hint else "")
        msg = msg.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
        if d.span:
            out.append(f"::{level} file={d.span.file},line={d.span.line},col={d.span.col},"
                       f"endLine={d.span.end_line},endColumn={d.span.end_col},title={d.code}::{msg}")
        else:
            out.append(f"::{level} title={d.code}::{msg}")
    return "\n".join(out)


# ---------------------------------------------------------------- docs/diagnostics.md

_DOC_HEAD = """# gkdc diagnostics

<!-- Generated from gkdlang/diagnostics.py by `python -m gkdlang.diagnostics --markdown > docs/diagnostics.md`;
     tests/test_docs.py fails when this file is out of sync. Do not edit by hand. -->

Every message of `gkdc check`, `gkdc fmt` and `gkdc plan` carries one of these codes. The text format prints
`file:line:col: severity: message  [code]`, the source line with a caret under the construct, related positions
as notes and a `= help:` hint; `--format json` gives the same fields as objects and `--format github` prints
GitHub Actions annotations. Errors make `gkdc check` exit 1; warnings alone leave it at 0.
Syntax errors stop at the first one; every other check goes on and reports all problems of a file in one run.
"""


def markdown() -> str:
    """The diagnostics reference (docs/diagnostics.md): a table of every code, severity and description."""
    rows = [f"| `{code}` | {severity} | {text} |" for code, (severity, text) in CODES.items()]
    return _DOC_HEAD + "\n| code | severity | description |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m gkdlang.diagnostics", description="The diagnostic registry.")
    parser.add_argument("--markdown", action="store_true", help="print docs/diagnostics.md")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(), end="")
    else:
        for code, (severity, text) in CODES.items():
            print(f"{code:<26} {severity:<8} {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
