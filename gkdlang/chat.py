"""Chat data facts without torch or transformers: a conversation's shape, a tokenizer folder's chat template, and
the template rendered to text (the checker and the planner use these; the runtime checks rows with the same code).

A chat row is a JSON object whose ``messages`` column (the data block's ``messages`` key) is a list of turns,
each ``{"role": "system" | "user" | "assistant" | ..., "content": "<text>"}``, with at least one ``assistant``
turn (the tokens the loss reads). Templates are rendered the way transformers renders them
(``apply_chat_template``: a sandboxed jinja2 environment with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension, ``raise_exception`` and ``tojson``), so the planner counts the tokens the runtime
makes; ``{% generation %}`` blocks render their body.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

#: the role whose turns are trained on
ASSISTANT = "assistant"
#: rows checked at check time per file (a larger file is checked by the runtime before training)
MAX_CHECKED_ROWS = 20_000


class TemplateError(Exception):
    """A chat template that jinja2 cannot compile or that raises while rendering."""


def row_problem(row: Any, column: str) -> str | None:
    """Why ``row`` (a parsed JSON line) is not a conversation, or None when it is one."""
    if not isinstance(row, dict):
        return "is not a JSON object"
    if column not in row:
        return f"has no '{column}' field (fields: {', '.join(map(str, row)) or 'none'})"
    turns = row[column]
    if not isinstance(turns, list) or not turns:
        return f"'{column}' is not a non-empty list of messages"
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            return f"message {i} of '{column}' has no string 'role'"
        if not isinstance(turn.get("content"), str):
            return f"message {i} ({turn['role']}) of '{column}' has no string 'content'"
    if not any(t["role"] == ASSISTANT for t in turns):
        return f"'{column}' has no assistant message (the loss reads assistant tokens only)"
    return None


def file_problems(path: Path, column: str, limit: int = MAX_CHECKED_ROWS) -> list[tuple[int, str]]:
    """(line number, problem) of the first bad rows of a JSONL chat file (at most 3; the first ``limit`` rows)."""
    out: list[tuple[int, str]] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if number > limit or len(out) >= 3:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                out.append((number, f"is not valid JSON ({exc.msg})"))
                continue
            problem = row_problem(row, column)
            if problem:
                out.append((number, problem))
    return out


def template_in(folder: Path) -> str | None:
    """The chat template a tokenizer folder holds (``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template``: a string or a list of named templates, of which ``default``), or None."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        return None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value.strip() else None


def has_generation_tags(template: str) -> bool:
    """Whether the template marks its assistant spans itself (``{% generation %}``), which transformers'
    ``return_assistant_tokens_mask`` reads."""
    import re

    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


@lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # transformers' AssistantTracker, minus the span bookkeeping
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"the chat template does not compile: {exc}") from None


def render(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False,
           special: dict[str, str] | None = None) -> str:
    """The conversation as the template writes it (``special``: bos_token / eos_token, as transformers passes)."""
    import jinja2

    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          **(special or {}))
    except jinja2.TemplateError as exc:
        raise TemplateError(f"the chat template fails on a conversation: {exc}") from None
