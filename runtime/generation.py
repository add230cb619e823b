"""Sampling inside a run (on-policy distillation, issue 17): prompts -> continuations -> a training batch.

- ``prompt_rows(data, base_dir, tokenizer, max_len)``: the token ids of every prompt of a data source: chat data
  is the conversation up to its last assistant turn, rendered with the tokenizer's chat template and its
  generation prompt (``runtime.chat.prompt_ids``); text data is each example (its last ``max_len`` tokens).
- ``sample(model, prompts, settings, tokenizer, seed=..., synced=...)``: one batched ``generate`` (transformers:
  KV cache, temperature / top-p / top-k, EOS and stop strings) on left-padded prompts, the model in eval mode
  under ``no_grad`` and put back in its mode after, the sampler's RNG seeded from ``seed`` inside
  ``torch.random.fork_rng`` (the run's own RNG stream is untouched, so dropout and resume stay exact).
  ``synced=True`` (a ZeRO-3 partitioned model) keeps every rank stepping until all are done, as each layer's
  forward gathers its shards collectively.
- ``batch_of(generated, pad_id)``: the sequences right-padded as ``runtime.data.collate`` pads chat rows, with
  ``tokens`` = the generated tokens as next-token targets (-100 elsewhere) and ``loss_mask`` = the positions that
  predict a generated token: the mechanism chat data uses for assistant-only loss (runtime/lossgraph.py's
  ``_chat_restricted``), so every per-token term reads the generated tokens only, never the prompt nor padding.

Why transformers' ``generate`` and not our own loop: it already does the cache, the logits processors, stop
strings and ZeRO-3's synced stepping for every family we load.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gkdlang.chat import ASSISTANT
from gkdlang.spec import DataSpec, GenerateSpec
from runtime.errors import RunError

IGNORE = -100


def prompt_rows(data: DataSpec, base_dir: Path, tokenizer: Any, max_len: int) -> list[list[int]]:
    """The prompts of ``data`` as token ids, each at most ``max_len`` tokens (the last ones: what is continued)."""
    from runtime import chat, data as D

    rows = D.load_texts(data, base_dir)
    out = []
    if data.format == "chat":
        chat.template_of(tokenizer, "the student")
        chat.check_rows(data, rows)
        for turns in rows[data.messages]:
            turns = [{"role": t["role"], "content": t["content"]} for t in turns]
            last = max(i for i, t in enumerate(turns) if t["role"] == ASSISTANT)
            out.append(chat.prompt_ids(tokenizer, turns[:last]))
    else:
        column = "text" if data.format == "text" else data.text
        out = [list(tokenizer(text)["input_ids"]) for text in rows[column]]
    out = [ids[-max_len:] for ids in out if ids]
    if not out:
        raise RunError(f"data '{data.name}': no prompt holds a token")
    return out


@dataclass
class Generated:
    """Continuations of a batch of prompts."""

    prompts: list[list[int]]
    continuations: list[list[int]]
    """Generated ids per row, through the end token when one was produced (no padding)."""
    logits: Tensor | None
    """``[b, n, V]`` the generating model's raw logits at each generated position (``keep_logits``), else None."""
    seconds: float

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.continuations]


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise RunError("generation needs a pad or EOS token in the student's tokenizer")
    return int(pad)


def _left_padded(prompts: list[list[int]], pad: int, device) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _cut(row: list[int], eos: set[int], pad: int) -> list[int]:
    """A continuation through its first end token; without one, less the padding ``generate`` wrote after a
    stop string (or at the end of a batch whose other rows ran longer)."""
    for i, t in enumerate(row):
        if t in eos:
            return row[:i + 1]
    while row and row[-1] == pad:
        row = row[:-1]
    return row


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if ids is not None else tokenizer.eos_token_id
    ids = ids if isinstance(ids, (list, tuple)) else [ids]
    return {int(i) for i in ids if i is not None}


def sample(model: nn.Module, prompts: list[list[int]], settings: GenerateSpec, tokenizer: Any, *, seed: int,
           synced: bool = False, keep_logits: bool = False) -> Generated:
    """Continue ``prompts`` with ``model`` (module docstring); deterministic in ``seed``."""
    if not hasattr(model, "generate"):
        raise RunError(f"model {type(model).__name__} cannot generate (no generate method)")
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    # a stop string that is one token of the vocabulary (ChatML's <|im_end|>) ends a row as EOS does; longer ones
    # go through transformers' stop-string matcher
    vocab = tokenizer.get_vocab()
    eos = _eos_ids(model, tokenizer) | {int(vocab[s]) for s in settings.stop if s in vocab}
    stop_strings = [s for s in settings.stop if s not in vocab]
    ids, mask = _left_padded(prompts, pad, device)
    options: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "pad_token_id": pad,
                               "eos_token_id": sorted(eos) or None, "use_cache": True, "synced_gpus": synced,
                               "return_dict_in_generate": True, "output_logits": keep_logits}
    if settings.temperature > 0:
        options.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                       top_k=settings.top_k or None)
    else:
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stop_strings:
        options.update(stop_strings=stop_strings, tokenizer=tokenizer)
    devices = [device] if device.type == "cuda" else []
    training = model.training
    started = time.perf_counter()
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices, device_type=device.type):
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=mask, **options)
    finally:
        model.train(training)
    new = out.sequences[:, ids.shape[1]:].tolist()
    continuations = [_cut(row, eos, pad) for row in new]
    logits = torch.stack(out.logits, 1).float() if keep_logits and out.logits else None
    return Generated(prompts, continuations, logits, time.perf_counter() - started)


def batch_of(gen: Generated, pad: int, device) -> dict[str, Tensor]:
    """Prompt + continuation per row, right-padded, with ``tokens`` and ``loss_mask`` on the generated tokens."""
    rows = [p + c for p, c in zip(gen.prompts, gen.continuations)]
    width = max(2, max(len(r) for r in rows))
    b = len(rows)
    ids = torch.full((b, width), pad, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    tokens = torch.full((b, width), IGNORE, dtype=torch.long)
    for r, (p, c) in enumerate(zip(gen.prompts, gen.continuations)):
        n = len(p) + len(c)
        ids[r, :n] = torch.tensor(p + c, dtype=torch.long)
        attention[r, :n] = 1
        if c:  # position i predicts token i + 1: the positions len(p) - 1 .. n - 2 predict the continuation
            tokens[r, len(p) - 1:n - 1] = torch.tensor(c, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": attention, "special_mask": attention == 0, "tokens": tokens,
             "loss_mask": tokens != IGNORE}
    return {k: v.to(device) for k, v in batch.items()}


def generated_rows(logits: Tensor, lengths: list[int]) -> Tensor:
    """``[n, V]`` the rows of ``[b, N, V]`` per-step logits that belong to generated tokens, in the row-major order
    of ``batch_of``'s ``loss_mask``."""
    keep = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)
    for r, n in enumerate(lengths):
        keep[r, :n] = True
    return logits[keep]
