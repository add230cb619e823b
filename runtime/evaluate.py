"""Saved model folders + held-out data -> perplexity (language models) or accuracy (classifiers).

Used by ``gkdc eval``: it reads only Hugging Face folders (as ``gkdc run`` saves them under
``<run>/models/<name>``), so it evaluates any compatible model, distilled or not, the same way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.errors import RunError


@dataclass(frozen=True)
class EvalResult:
    model: str
    metric: str
    """perplexity | mlm_perplexity | accuracy"""
    value: float
    count: int
    """Tokens (perplexity) or examples (accuracy) scored."""
    parameters: int
    embedding_parameters: int
    note: str = ""


def _load(folder: Path):
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

    from runtime.vocab import load_compressed

    transformers.utils.logging.disable_progress_bar()
    if not (folder / "config.json").exists():
        raise RunError(f"{folder} is not a saved model (no config.json)")
    if (folder / "gkdc_vocab.json").exists():
        model, tokenizer = load_compressed(folder)
        return model.eval(), tokenizer, "compressed vocabulary"
    from transformers import AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    arch = (config.architectures or [""])[0]
    cls = (AutoModelForSequenceClassification if "SequenceClassification" in arch
           else AutoModelForMaskedLM if "MaskedLM" in arch or config.model_type in ("bert", "roberta")
           else AutoModelForCausalLM)
    if not list(folder.glob("*.safetensors")):  # .bin weights are pickles: they could run code when loaded
        raise RunError(f"{folder} has no safetensors weights; gkdc eval loads no pickle (.bin) files")
    try:
        model = cls.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise RunError(f"{folder}: transformers cannot load it: {str(exc).splitlines()[0]}") from None
    return model.eval(), AutoTokenizer.from_pretrained(folder), ""


def _lines(path: Path, limit: int | None) -> list[str]:
    try:
        lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"cannot read {path}: {exc}") from None
    if not lines:
        raise RunError(f"{path} has no text")
    return lines[:limit] if limit else lines


def evaluate(folder: Path, text: Path, *, seq_len: int = 128, batch: int = 16, limit: int | None = None,
             label: str = "label", text_field: str = "sentence") -> EvalResult:
    model, tokenizer, note = _load(Path(folder))
    params = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    if getattr(model.config, "architectures", None) and "SequenceClassification" in model.config.architectures[0]:
        value, count = _accuracy(model, tokenizer, text, seq_len, batch, limit, label, text_field)
        return EvalResult(Path(folder).name, "accuracy", value, count, params, emb, note)
    lines = _lines(Path(text), limit)
    masked = model.config.model_type in ("bert", "roberta")
    nll, count = (_mlm_nll if masked else _causal_nll)(model, tokenizer, lines, seq_len, batch)
    metric = "mlm_perplexity" if masked else "perplexity"
    return EvalResult(Path(folder).name, metric, math.exp(nll / max(count, 1)), count, params, emb, note)


def _batches(tokenizer, lines: list[str], seq_len: int, batch: int):
    for i in range(0, len(lines), batch):
        enc = tokenizer(lines[i:i + batch], truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
        yield enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def _causal_nll(model, tokenizer, lines, seq_len, batch) -> tuple[float, int]:
    total, count = 0.0, 0
    for ids, mask in _batches(tokenizer, lines, seq_len, batch):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((target != -100).sum())
    return total, count


@torch.no_grad()
def _mlm_nll(model, tokenizer, lines, seq_len, batch) -> tuple[float, int]:
    """Masked-LM perplexity with a deterministic mask: every 7th real token, offset by the batch index."""
    total, count = 0.0, 0
    for b, (ids, mask) in enumerate(_batches(tokenizer, lines, seq_len, batch)):
        pos = torch.arange(ids.size(1)).unsqueeze(0).expand_as(ids)
        chosen = ((pos + b) % 7 == 0) & (mask == 1)
        inputs = ids.masked_fill(chosen, tokenizer.mask_token_id)
        logits = model(input_ids=inputs, attention_mask=mask).logits.float()
        target = ids.masked_fill(~chosen, -100)
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                         ignore_index=-100, reduction="sum"))
        count += int(chosen.sum())
    return total, count


@torch.no_grad()
def _accuracy(model, tokenizer, path, seq_len, batch, limit, label, text_field) -> tuple[float, int]:
    rows = [json.loads(x) for x in _lines(Path(path), limit)]
    if any(label not in r or text_field not in r for r in rows):
        raise RunError(f"{path}: every row needs '{text_field}' and '{label}' for accuracy")
    names = sorted({r[label] for r in rows}, key=str)
    to_id = {n: (n if isinstance(n, int) else i) for i, n in enumerate(names)}
    right = 0
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        enc = tokenizer([r[text_field] for r in chunk], truncation=True, max_length=seq_len, padding=True,
                        return_tensors="pt")
        pred = model(**enc).logits.argmax(-1)
        right += sum(int(p) == to_id[r[label]] for p, r in zip(pred.tolist(), chunk))
    return right / len(rows), len(rows)
