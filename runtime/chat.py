"""Chat rows -> token ids and the assistant-token mask, rendered with the tokenizer's own chat template.

The API other runtime modules reuse (``runtime.data`` for training data, on-policy generation for prompts):

- ``conversation(tokenizer, messages)`` -> ``Rendered``: the ids of the whole conversation and ``assistant``, 1 on
  every token of an assistant turn (the tokens a loss reads), 0 on system / user tokens and the template's
  role headers;
- ``prompt_ids(tokenizer, messages)``: the ids of a prompt ending with the template's generation prompt (the
  assistant header), for a model to continue;
- ``encode_rows(ds, data, tokenizer, seq_len)`` -> a ``datasets.Dataset`` of ``input_ids``, ``special_mask``
  and ``target_mask`` (``runtime.data.tokenize`` wraps it for chat data); ``runtime.data.collate`` turns it into next-token targets on assistant tokens only (``tokens``, -100 elsewhere)
  and ``loss_mask`` (the positions that predict an assistant token), which ``runtime.lossgraph`` applies to every
  per-token loss term: the CE term and the distillation terms on logits read the same positions.

How the assistant span is found. Where the template marks it (``{% generation %}``), transformers'
``apply_chat_template(..., return_assistant_tokens_mask=True)`` gives the mask: the template's author said which
characters are the assistant's. Most templates (SmolLM2's, Llama's, Qwen's) have no such tags; then the span of
assistant turn ``i`` is found by prefix difference on the rendered text: it starts where the rendering of turns
``< i`` with the generation prompt ends and stops where the rendering of turns ``<= i`` ends, less trailing
whitespace (so it holds the turn's content and its end-of-turn token, never the assistant header nor the newline
ChatML writes after ``<|im_end|>``, as generation-tagged templates mark it); a token counts when it overlaps a span
(transformers' own rule). Both renderings must be prefixes of the whole conversation's text; a template that
rewrites earlier turns (e.g. one that drops past reasoning) is refused with a named error rather than given a
wrong mask. Characters, not tokens, are compared, so a token that merges across a boundary cannot shift a span.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gkdlang.chat import ASSISTANT, has_generation_tags, row_problem
from gkdlang.spec import DataSpec
from runtime.errors import RunError

if TYPE_CHECKING:
    import datasets


@dataclass(frozen=True)
class Rendered:
    ids: list[int]
    assistant: list[int]
    """1 on the tokens of assistant turns (content and end-of-turn token), 0 elsewhere."""


def template_of(tokenizer: Any, owner: str) -> str:
    """The tokenizer's chat template, or a RunError naming the model (checked at ``gkdc check`` for local folders)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str) or not template.strip():
        raise RunError(f"chat data needs a chat template, and the tokenizer of {owner} has none; use a tokenizer "
                       f"folder with chat_template.jinja (or tokenizer_config.json's chat_template)")
    return template


def _text(tokenizer: Any, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(whole text, character spans of the assistant turns) by prefix difference (module docstring)."""
    full = _text(tokenizer, messages)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != ASSISTANT:
            continue
        before, through = _text(tokenizer, messages[:i], generation_prompt=True), _text(tokenizer, messages[: i + 1])
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise RunError(f"the chat template does not render assistant turn {i} as a continuation of the turns "
                           f"before it (it rewrites earlier text), so its tokens cannot be found; use a template "
                           f"with {{% generation %}} tags")
        # the separator a template writes after the end-of-turn token (ChatML's newline) is the next turn's lead-in
        spans.append((len(before), len(before) + len(full[len(before):len(through)].rstrip())))
    return full, spans


def conversation(tokenizer: Any, messages: list[dict], template: str | None = None) -> Rendered:
    """The conversation's ids and assistant mask (module docstring: which method and why)."""
    template = template if template is not None else template_of(tokenizer, "the student")
    if has_generation_tags(template):
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return Rendered(list(enc["input_ids"]), list(enc["assistant_masks"]))
    full, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start < b and end > a for a, b in spans)) for start, end in enc["offset_mapping"]]
    return Rendered(list(enc["input_ids"]), mask)


def prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """The ids of ``messages`` followed by the generation prompt (the assistant header): what a model continues."""
    return list(tokenizer(_text(tokenizer, messages, generation_prompt=True), add_special_tokens=False)["input_ids"])


def check_rows(data: DataSpec, ds: datasets.Dataset) -> None:
    """Every row is a conversation (``gkdlang.chat.row_problem``), else a RunError naming the row."""
    for i, turns in enumerate(ds[data.messages]):
        problem = row_problem({data.messages: turns}, data.messages)
        if problem:
            raise RunError(f"data '{data.name}': row {i} {problem}")


def encode_rows(ds: datasets.Dataset, data: DataSpec, tokenizer: Any, seq_len: int, *, owner: str) -> datasets.Dataset:
    """One example per conversation, truncated to ``seq_len`` (never packed), with ``target_mask``: the assistant
    tokens (every token when the data sets ``assistant_only: false``)."""
    template = template_of(tokenizer, owner)
    check_rows(data, ds)
    special = frozenset(tokenizer.all_special_ids)

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"input_ids": [], "special_mask": [], "target_mask": []}
        for turns in batch[data.messages]:
            turns = [{"role": t["role"], "content": t["content"]} for t in turns]
            r = conversation(tokenizer, turns, template)
            ids = r.ids[:seq_len]
            out["input_ids"].append(ids)
            # role headers and end-of-turn tokens are the template's: "not special" keeps the text tokens
            out["special_mask"].append([int(t in special) for t in ids])
            out["target_mask"].append(r.assistant[:seq_len] if data.assistant_only else [1] * len(ids))
        return out

    return ds.map(encode, batched=True, remove_columns=ds.column_names)

