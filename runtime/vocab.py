"""GLMD vocabulary compression: token frequencies -> kept rows -> old-to-new id map -> a smaller student.

Takes a ``VocabSpec`` (how many rows to keep, protected words, remap rule), the full tokenizer, token ids of
the ranking corpus and the teacher's word embeddings. Gives a ``VocabMap`` (kept ids in new-row order and a
``[V_full]`` old -> new map), ``compress_student`` which shrinks a student's input embedding and LM head to
the kept rows in place, and ``load_compressed``, the documented loader of a saved compressed student.

Order of kept rows (GLMD): the tokenizer's special tokens, then the tokens of the protected words (each word
alone and after a space, so BPE tokenizers keep both forms), then the rest by descending corpus frequency,
ties by lower id. Removed tokens map to the kept token whose teacher embedding is closest: ``nearest`` = the
largest dot product, ``cosine``, ``euclidean``; or all to ``[UNK]`` with ``unk``.

With compression the student reads remapped input ids (``VocabMap.remap_inputs``), and teacher logits are
reduced to the kept columns (``VocabMap.select_teacher``) so both softmaxes run over the kept set only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gkdlang.spec import VocabSpec
from runtime.errors import RunError

VOCAB_FILE = "gkdc_vocab.json"
FORMAT = "gkdc-vocab"
VERSION = 1
_CHUNK = 1024
"""Removed tokens scored per matrix product (bounds memory at CHUNK x kept floats)."""


# ---------------------------------------------------------------- ranking


def token_frequencies(token_id_lists: Iterable[Sequence[int] | Tensor], vocab_size: int) -> Tensor:
    """``[vocab_size]`` int64 counts of each token id over all sequences."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids in token_id_lists:
        t = torch.as_tensor(ids, dtype=torch.long).flatten()
        if t.numel() == 0:
            continue
        if int(t.min()) < 0 or int(t.max()) >= vocab_size:
            raise RunError(
                f"vocab: token id {int(t.max()) if int(t.max()) >= vocab_size else int(t.min())} is outside the "
                f"full vocabulary of {vocab_size} rows; does the ranking data use the vocab source's tokenizer?"
            )
        counts += torch.bincount(t, minlength=vocab_size)
    return counts


def _word_ids(tokenizer: Any, word: str) -> list[int]:
    ids: list[int] = []
    for form in (word, " " + word):
        ids.extend(tokenizer(form, add_special_tokens=False)["input_ids"])
    return ids


def _unique(ids: Iterable[int], size: int) -> list[int]:
    seen: set[int] = set()
    out: list[int] = []
    for i in ids:
        if 0 <= i < size and i not in seen:
            seen.add(i)
            out.append(int(i))
    return out


def choose_kept(vocab: VocabSpec, tokenizer: Any, freqs: Tensor | Sequence[int]) -> list[int]:
    """Exactly ``min(vocab.keep_rows, full size)`` old ids in new-row order: specials, protected, by frequency."""
    counts = torch.as_tensor(freqs, dtype=torch.long)
    size = int(counts.numel())
    if size != vocab.full_size:
        raise RunError(
            f"vocab '{vocab.name}': the ranking counts cover {size} ids but '{vocab.source}' has "
            f"{vocab.full_size} rows (full_size)"
        )
    keep = min(vocab.keep_rows, size)
    protected = _unique(sorted(tokenizer.all_special_ids), size)  # by id: stable across transformers versions
    specials = len(protected)
    for word in vocab.protect:
        protected = _unique([*protected, *_word_ids(tokenizer, word)], size)
    if len(protected) > keep:
        raise RunError(
            f"vocab '{vocab.name}': {specials} special tokens and the protected words need {len(protected)} rows "
            f"but keep is {keep}; raise keep or shorten protect"
        )
    # sort of (-count, id): descending frequency, ties by the lower id
    values = counts.tolist()
    order = sorted(range(size), key=lambda i: (-values[i], i))
    return _unique([*protected, *order], size)[:keep]


# ---------------------------------------------------------------- the map


@dataclass(frozen=True)
class VocabMap:
    """Kept rows of a compressed vocabulary and where every full-vocabulary id goes."""

    name: str
    """VocabSpec name (the student's compressed vocabulary)."""
    remap: str
    """Rule that mapped removed tokens: nearest, cosine, euclidean or unk."""
    kept_ids: Tensor
    """``[K]`` int64: new row -> old id."""
    old_to_new: Tensor
    """``[V_full]`` int64: old id -> new row (kept: its own row; removed: the row it is remapped to)."""

    @property
    def size(self) -> int:
        """Rows of the compressed vocabulary."""
        return int(self.kept_ids.numel())

    @property
    def full_size(self) -> int:
        return int(self.old_to_new.numel())

    def remap_inputs(self, ids: Tensor) -> Tensor:
        """Full-vocabulary input ids -> compressed ids (same shape and device)."""
        return self.old_to_new.to(ids.device)[ids]

    def select_teacher(self, logits: Tensor) -> Tensor:
        """``[..., V_full]`` teacher logits -> ``[..., K]`` kept columns in new-row order."""
        return logits.index_select(-1, self.kept_ids.to(logits.device))

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "name": self.name,
                "remap": self.remap,
                "kept_ids": self.kept_ids.tolist(),
                "old_to_new": self.old_to_new.tolist(),
            }
        )

    @classmethod
    def from_json(cls, text: str, where: str = VOCAB_FILE) -> VocabMap:
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT or raw.get("version") != VERSION:
                raise ValueError(f"not a {FORMAT} v{VERSION} file")
            kept = torch.tensor(raw["kept_ids"], dtype=torch.long)
            old_to_new = torch.tensor(raw["old_to_new"], dtype=torch.long)
            vmap = cls(name=str(raw["name"]), remap=str(raw["remap"]), kept_ids=kept, old_to_new=old_to_new)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RunError(f"{where} is not a valid vocabulary map: {exc}") from None
        _check_map(vmap, where)
        return vmap


def _check_map(vmap: VocabMap, where: str) -> None:
    k, v = vmap.size, vmap.full_size
    kept_ok = k > 0 and int(vmap.kept_ids.min()) >= 0 and int(vmap.kept_ids.max()) < v
    rows_ok = v > 0 and int(vmap.old_to_new.min()) >= 0 and int(vmap.old_to_new.max()) < k
    if not (kept_ok and rows_ok) or not torch.equal(vmap.old_to_new[vmap.kept_ids], torch.arange(k)):
        raise RunError(f"{where}: kept_ids and old_to_new are inconsistent (a corrupted or hand-edited file?)")


def _scores(removed: Tensor, kept: Tensor, rule: str) -> Tensor:
    """``[r, K]`` similarity (higher = closer) of removed rows to kept rows under ``rule``."""
    if rule == "cosine":
        removed, kept = nn.functional.normalize(removed, dim=-1), nn.functional.normalize(kept, dim=-1)
    if rule == "euclidean":
        return -torch.cdist(removed, kept)
    return removed @ kept.T


def _nearest(emb: Tensor, kept: Tensor, removed: Tensor, rule: str) -> Tensor:
    table = emb.float()
    kept_rows = table[kept]
    out = torch.empty(removed.numel(), dtype=torch.long)
    for lo in range(0, removed.numel(), _CHUNK):
        chunk = table[removed[lo : lo + _CHUNK]]
        out[lo : lo + _CHUNK] = _scores(chunk, kept_rows, rule).argmax(dim=-1)  # ties: the lower new row
    return out


def build_vocab_map(
    vocab: VocabSpec, kept: list[int], teacher_embeddings: Tensor | None, unk_id: int | None
) -> VocabMap:
    """The old -> new map of ``kept`` (new-row order), removed ids remapped by ``vocab.remap``."""
    full = vocab.full_size
    kept_t = torch.tensor(kept, dtype=torch.long)
    if kept_t.numel() == 0 or len(set(kept)) != len(kept) or int(kept_t.min()) < 0 or int(kept_t.max()) >= full:
        raise RunError(f"vocab '{vocab.name}': kept ids must be distinct ids in 0..{full - 1}")
    old_to_new = torch.full((full,), -1, dtype=torch.long)
    old_to_new[kept_t] = torch.arange(kept_t.numel())
    removed = (old_to_new < 0).nonzero().flatten()
    if removed.numel():
        old_to_new[removed] = _remap_removed(vocab, kept_t, removed, teacher_embeddings, unk_id, old_to_new)
    return VocabMap(name=vocab.name, remap=vocab.remap, kept_ids=kept_t, old_to_new=old_to_new)


def _remap_removed(
    vocab: VocabSpec, kept: Tensor, removed: Tensor, emb: Tensor | None, unk_id: int | None, old_to_new: Tensor
) -> Tensor:
    if vocab.remap == "unk":
        if unk_id is None or not 0 <= unk_id < vocab.full_size or int(old_to_new[unk_id]) < 0:
            raise RunError(
                f"vocab '{vocab.name}': remap unk needs the tokenizer's unk token among the kept rows; "
                f"this tokenizer has {'none' if unk_id is None else 'it removed'}; use remap nearest"
            )
        return torch.full_like(removed, int(old_to_new[unk_id]))
    if emb is None:
        raise RunError(f"vocab '{vocab.name}': remap {vocab.remap} needs the word embeddings of '{vocab.source}'")
    if emb.dim() != 2 or emb.shape[0] < vocab.full_size:
        raise RunError(
            f"vocab '{vocab.name}': the embeddings of '{vocab.source}' have shape {tuple(emb.shape)}, "
            f"fewer than full_size={vocab.full_size} rows"
        )
    return _nearest(emb.detach().cpu(), kept, removed, vocab.remap)


# ---------------------------------------------------------------- applying it to a student


def vocab_params(model: nn.Module, rows: int) -> list[nn.Parameter]:
    """Distinct parameters of ``rows`` vocabulary rows: input embedding, LM head weight/bias and their ties
    (a ZeRO-3 parameter by its full shape; its ``data`` is an empty placeholder)."""
    found: list[Any] = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        found += [head.weight, getattr(head, "bias", None)]
    named = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(model, "_tied_weights_keys", None) or {}
    pairs = tied.items() if isinstance(tied, dict) else ((k, None) for k in tied)
    for key, target in pairs:
        found += [named.get(key), named.get(target) if target else None]
    out: dict[int, nn.Parameter] = {}
    for p in found:
        shape = tuple(getattr(p, "ds_shape", p.shape)) if p is not None else ()
        if len(shape) >= 1 and shape[0] == rows:
            out.setdefault(id(p), p)
    return list(out.values())


def compress_student(model: nn.Module, vmap: VocabMap) -> None:
    """Shrink ``model``'s input embedding and LM head (tied or not) to the kept rows, in place.

    Row ``i`` of every vocabulary-indexed tensor becomes the old row ``kept_ids[i]``; tied tensors stay tied
    because each distinct parameter is sliced once. ``model.config.vocab_size`` becomes ``vmap.size``.
    """
    emb = model.get_input_embeddings()
    if emb.weight.shape[0] != vmap.full_size:
        raise RunError(
            f"vocab '{vmap.name}': the student has {emb.weight.shape[0]} embedding rows but the vocabulary "
            f"has {vmap.full_size}; compress a student that still has the full vocabulary"
        )
    with torch.no_grad():
        for param in vocab_params(model, vmap.full_size):
            param.data = param.data.index_select(0, vmap.kept_ids.to(param.device)).contiguous()
    emb.num_embeddings = vmap.size
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "out_features"):
        head.out_features = vmap.size
    model.config.vocab_size = vmap.size
    if hasattr(model, "vocab_size"):
        model.vocab_size = vmap.size


# ---------------------------------------------------------------- loading a saved compressed student


class CompressedTokenizer:
    """The full tokenizer of a compressed student, giving compressed ids; everything else is delegated.

    ``__call__``/``encode`` return ids already remapped to the student's rows; ``decode`` maps rows back.
    """

    def __init__(self, tokenizer: Any, vmap: VocabMap) -> None:
        self.tokenizer = tokenizer
        self.vocab_map = vmap

    def _remap(self, ids: Any) -> Any:
        if isinstance(ids, Tensor):
            return self.vocab_map.remap_inputs(ids)
        if isinstance(ids, (list, tuple)):
            return [self._remap(i) for i in ids]
        return int(self.vocab_map.old_to_new[int(ids)])

    def _unmap(self, ids: Any) -> Any:
        t = torch.as_tensor(ids, dtype=torch.long)
        return self.vocab_map.kept_ids[t].tolist()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        enc = self.tokenizer(*args, **kwargs)
        enc["input_ids"] = self._remap(enc["input_ids"])
        return enc

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        return self._remap(self.tokenizer.encode(*args, **kwargs))

    def decode(self, ids: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(self._unmap(ids), **kwargs)

    def batch_decode(self, rows: Any, **kwargs: Any) -> list[str]:
        return [self.decode(r, **kwargs) for r in rows]

    @property
    def pad_token_id(self) -> int | None:
        pad = self.tokenizer.pad_token_id
        return None if pad is None else int(self.vocab_map.old_to_new[pad])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def _auto_for(architectures: list[str]) -> Any:
    import transformers as tf

    name = architectures[0] if architectures else ""
    for suffix, auto in (
        ("ForSequenceClassification", tf.AutoModelForSequenceClassification),
        ("ForMaskedLM", tf.AutoModelForMaskedLM),
        ("ForCausalLM", tf.AutoModelForCausalLM),
        ("LMHeadModel", tf.AutoModelForCausalLM),
    ):
        if name.endswith(suffix):
            return auto
    return tf.AutoModel


def load_compressed(directory: str | Path) -> tuple[nn.Module, CompressedTokenizer]:
    """Load a student saved with vocabulary compression: (model, tokenizer giving remapped ids)."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(directory)
    vocab_file = path / VOCAB_FILE
    if not vocab_file.is_file():
        raise RunError(f"{path} has no {VOCAB_FILE}: not a compressed student; load it with transformers' AutoModel")
    vmap = VocabMap.from_json(vocab_file.read_text(encoding="utf-8"), str(vocab_file))
    try:
        config = AutoConfig.from_pretrained(str(path))
        model = _auto_for(list(config.architectures or [])).from_pretrained(str(path), use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot load the compressed student in {path}: {exc}") from None
    rows = model.get_input_embeddings().weight.shape[0]
    if rows != vmap.size:
        raise RunError(f"{path}: the model has {rows} embedding rows but {VOCAB_FILE} keeps {vmap.size}")
    return model, CompressedTokenizer(tokenizer, vmap)
