"""A stage's ``generate: on_policy(...)``: read into ``StageSpec.generate`` and checked against the stage.

Checks (each a located, coded error): the prompts name a data source with examples usable as prompts
(``no-prompts``); the student can sample (a causal LM with an LM head) and, with ``seq_kd``, so can the teacher
(``cannot-generate``); every teacher can score the generated ids, so it runs live on the student's vocabulary
(``vocab-mismatch``; a compressed student vocabulary is refused: its ids are rows of the kept subset, which the
teacher's embedding does not index); the sampling settings lie in their ranges (``bad-value``); every loss term
reads per-token signals that exist for generated tokens (``type-mismatch``: no labels, no classifier logits).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gkdlang import ast
from gkdlang.diagnostics import did_you_mean
from gkdlang.spec import GenerateSpec, LossTerm, Node, OpNode, SignalNode
from gkdlang.lower.context import Lowerer, Scope, fmt_number
from gkdlang.lower.readers import check_arity, read_bool, read_fraction, read_int, read_kwargs, read_num, read_strings, vocab_space

#: ``on_policy(...)`` keywords -> kinds of value (``lambda`` is the user's word; the Spec field is ``lmbda``)
GENERATE_KEYS = {"prompts": "data", "lambda": "fraction", "seq_kd": "bool", "max_new_tokens": "int",
                 "temperature": "number", "top_p": "number", "top_k": "int", "stop": "strings"}
GENERATORS = ("on_policy",)
#: signal kinds a generated sequence does not have: no label, no classification head over it
NOT_PER_TOKEN = {"labels": "labels from the data", "task_logits": "classification-head logits"}
#: rows read at check time to find one usable prompt (a larger file is read by the runtime)
MAX_PROMPT_ROWS = 20_000


def lower_generate(lw: Lowerer, expr: ast.Expr, students: list[str], teachers: list[str],
                   terms: list[LossTerm], data: str, seq_len: int | None) -> GenerateSpec:
    if isinstance(expr, ast.Name):
        expr = ast.Call(expr.span, expr, (), ())
    if not (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name)):
        raise lw.err("type-mismatch", expr.span, "generate is on_policy(prompts: <data>, lambda: ..., ...)")
    if expr.func.id not in GENERATORS:
        raise lw.err("unknown-function", expr.func.span, f"unknown generator '{expr.func.id}'",
                     did_you_mean(expr.func.id, GENERATORS) or f"generators: {', '.join(GENERATORS)}")
    check_arity(lw, expr, 0, expr.func.id)
    kw = read_kwargs(lw, expr, GENERATE_KEYS)
    if "prompts" not in kw:
        raise lw.err("no-prompts", expr.span, "on_policy(...) needs prompts: the data source whose examples the "
                     "student continues", f"e.g. on_policy(prompts: {next(iter(lw.data), 'chat_prompts')})")
    fields: dict[str, Any] = {"prompts": read_prompts(lw, kw["prompts"])}
    if "lambda" in kw:
        fields["lmbda"] = read_fraction(lw, kw["lambda"], "lambda")
    if "seq_kd" in kw:
        fields["seq_kd"] = read_bool(lw, kw["seq_kd"], "seq_kd")
    if "max_new_tokens" in kw:
        fields["max_new_tokens"] = read_int(lw, kw["max_new_tokens"], "max_new_tokens", minimum=1)
    if "temperature" in kw:
        fields["temperature"] = _in_range(lw, kw["temperature"], "temperature", lambda v: v > 0, "must be positive")
    if "top_p" in kw:
        fields["top_p"] = _in_range(lw, kw["top_p"], "top_p", lambda v: 0 < v <= 1, "lies in (0, 1]")
    if "top_k" in kw:
        fields["top_k"] = read_int(lw, kw["top_k"], "top_k", minimum=0)
    if "stop" in kw:
        fields["stop"] = read_strings(lw, kw["stop"], "stop")
        if any(not s for s in fields["stop"]):
            raise lw.err("bad-value", kw["stop"].span, "a stop string must not be empty")
    spec = GenerateSpec(span=expr.span, **fields)
    check_terms(lw, expr, terms)
    check_models(lw, spec, expr, students, teachers)
    check_length(lw, spec, kw.get("max_new_tokens", expr), [*students, *teachers], data, seq_len)
    return spec


def check_length(lw: Lowerer, spec: GenerateSpec, where: ast.Expr, models: list[str], data: str,
                 seq_len: int | None) -> None:
    """A prompt (its data's seq_len) plus max_new_tokens fits every model's positions (planner.generation)."""
    if spec.prompts not in lw.data or not models:
        return
    prompt = seq_len if spec.prompts == data and seq_len else lw.data[spec.prompts].seq_len
    shortest = min(models, key=lambda m: lw.models[m].arch.max_positions)
    limit = lw.models[shortest].arch.max_positions
    if prompt + spec.max_new_tokens > limit:
        raise lw.err("bad-value", where.span, f"a prompt of {prompt} positions (the seq_len of data "
                     f"'{spec.prompts}') plus max_new_tokens {spec.max_new_tokens} is longer than model '{shortest}' "
                     f"accepts ({limit} positions)", f"use max_new_tokens: {max(limit - prompt, 1)} or less, or "
                     "a shorter seq_len for the prompts")


def _in_range(lw: Lowerer, expr: ast.Expr, key: str, ok, what: str) -> float:
    value = read_num(lw, expr, key, Scope(lw.lets))
    if not ok(value):
        raise lw.err("bad-value", expr.span, f"{key} {what}, got {fmt_number(value)}")
    return value


def read_prompts(lw: Lowerer, expr: ast.Expr) -> str:
    """The prompts' data source, with at least one example usable as a prompt (where its files can be read)."""
    if not isinstance(expr, ast.Name) or expr.id not in lw.data_decls:
        got = expr.id if isinstance(expr, ast.Name) else None
        raise lw.err("no-prompts", expr.span, f"prompts names no data source{f' ({got!r})' if got else ''}",
                     (did_you_mean(got, lw.data) if got else None) or
                     (f"data sources: {', '.join(lw.data)}" if lw.data else "declare one: data p = chat(\"...\")"))
    lw.used.add(expr.id)
    data = lw.data.get(expr.id)
    if data is None:  # its declaration has its own error
        return expr.id
    files = [p for pattern in data.paths for p in _matches(lw, pattern)]
    if not files:
        return expr.id  # data-not-found already says so; the runtime reads them
    if data.format in ("chat", "text", "jsonl") and not any(_has_prompt(p, data) for p in files):
        what = ("no conversation has a turn before its last assistant turn" if data.format == "chat"
                else f"no example has text in '{data.text}'" if data.format == "jsonl" else "every line is blank")
        raise lw.err("no-prompts", expr.span, f"data '{data.name}' has no example usable as a prompt: {what}",
                     "prompts are what the student continues: chat conversations (the turns before the answer) "
                     "or lines of text")
    return expr.id


def _matches(lw: Lowerer, pattern: str) -> list[Path]:
    full = Path(pattern) if Path(pattern).is_absolute() else lw.base_dir / pattern
    return sorted(p for p in full.parent.glob(full.name) if p.is_file()) if full.parent.is_dir() else []


def _has_prompt(path: Path, data) -> bool:
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if number > MAX_PROMPT_ROWS:
                return True  # not read further at check time (like bad-chat-data's row limit)
            if not line.strip():
                continue
            if data.format == "text":
                return True
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # bad-chat-data / the runtime's reader report it
            if data.format == "jsonl" and isinstance(row, dict) and str(row.get(data.text) or "").strip():
                return True
            if data.format == "chat" and isinstance(row, dict) and isinstance(row.get(data.messages), list):
                roles = [t.get("role") for t in row[data.messages] if isinstance(t, dict)]
                if "assistant" in roles and _prompt_turns(roles) > 0:
                    return True
    return False


def _prompt_turns(roles: list[Any]) -> int:
    """Turns before the last assistant turn (the prompt of a conversation)."""
    return len(roles) - 1 - roles[::-1].index("assistant")


def check_models(lw: Lowerer, spec: GenerateSpec, expr: ast.Call, students: list[str], teachers: list[str]) -> None:
    """The student samples, every teacher scores the sampled ids, and with seq_kd the teacher samples too."""
    for name in students:
        model = lw.models[name]
        why = _why_not_generator(model)
        if why:
            raise lw.err("cannot-generate", expr.span, f"on-policy generation needs a student that samples text, "
                         f"and '{name}' {why}", "generate with a causal language model (head: lm), or train this "
                         "stage teacher-forced (remove generate:)", related=[(model.span, f"'{name}' is declared here")])
        if model.vocab:
            raise lw.err("vocab-mismatch", expr.span, f"student '{name}' has a compressed vocabulary "
                         f"('{model.vocab}'): its samples are ids of the kept rows, which a teacher cannot score",
                         "train a compressed student teacher-forced, or generate before compressing",
                         related=[(lw.vocabs[model.vocab].span, "the vocab block is here")]
                         if model.vocab in lw.vocabs else [])
    student = students[0] if students else None
    if spec.seq_kd and spec.lmbda < 1 and not teachers:
        raise lw.err("cannot-generate", expr.span, "seq_kd: a teacher generates on the steps the student does not, "
                     "but this stage reads no teacher", "read a teacher in the loss, or remove seq_kd")
    for name in teachers:
        model = lw.models[name]
        if model.cache is not None:
            raise lw.err("cannot-generate", expr.span, f"teacher '{name}' is read from its cache (offline): it "
                         "cannot score tokens generated during the run", "remove cache: from the teacher",
                         related=[(model.span, f"'{name}' is declared here")])
        if model.arch.is_encoder:
            raise lw.err("cannot-generate", expr.span, f"teacher '{name}' is a masked LM: its logits do not "
                         "score the next token of a generation", "use a causal teacher",
                         related=[(model.span, f"'{name}' is declared here")])
        if student is not None and vocab_space(lw, name) != vocab_space(lw, student):
            raise lw.err("vocab-mismatch", expr.span, f"teacher '{name}' and student '{student}' have different "
                         "vocabularies: the teacher cannot score the student's generated ids",
                         "generate with a student that shares the teacher's tokenizer",
                         related=[(model.span, f"'{name}' is declared here")])
        if spec.seq_kd and spec.lmbda < 1:
            why = _why_not_generator(model)
            if why:
                raise lw.err("cannot-generate", expr.span, f"seq_kd: the teacher generates on the other steps, "
                             f"and '{name}' {why}", "remove seq_kd, or use a causal teacher with an LM head",
                             related=[(model.span, f"'{name}' is declared here")])


def _why_not_generator(model) -> str | None:
    if model.arch.is_encoder:
        return f"is a masked LM ({model.arch.model_type}), not a causal one"
    if model.head.kind != "lm":
        return "has a classification head" if model.head.kind == "classify" else "has no LM head (head: none)"
    return None


def check_terms(lw: Lowerer, expr: ast.Call, terms: list[LossTerm]) -> None:
    """Every term reads per-token signals that generated tokens have (logits, hidden states, ... of the models)."""
    for term in terms:
        for node in (term.target, term.pred):
            for sig in _signals(node):
                if sig.kind in NOT_PER_TOKEN:
                    raise lw.err("type-mismatch", term.span, f"a generating stage trains on generated tokens, "
                                 f"which have no {NOT_PER_TOKEN[sig.kind]} ({sig.kind}), read by {term.id}",
                                 "use per-token signals (logits, hidden states) or train this term in a "
                                 "teacher-forced stage", related=[(expr.span, "generate is here")])


def _signals(node: Node) -> list[SignalNode]:
    if isinstance(node, SignalNode):
        return [node]
    assert isinstance(node, OpNode)
    return [s for i in node.inputs for s in _signals(i)]
