"""DataSpec -> tokenised examples, a deterministic resumable rank-aware sampler, and padded batches.

Takes a checked ``DataSpec`` (format, glob patterns, column names, seq_len) and the student's tokenizer.
Gives ``load_texts`` (a ``datasets.Dataset`` of the raw columns), ``tokenize`` (a ``TokenizedData``: one
example per row, truncated and padded, or packed), ``ResumableSampler`` (which examples each rank reads at each
optimizer step) and ``collate`` (tensors).

Packing (``tokenize(..., packed=True)``, decided by the plan: ``planner.tokens``): every document is tokenised
whole and followed by the tokenizer's EOS token; the stream of each chunk of ``PACK_CHUNK_DOCS`` documents is
cut into ``seq_len`` blocks (the chunk's last partial block is dropped, as Hugging Face's ``run_clm`` does).
Each block carries ``position_ids`` that restart at 0 at every document start and at the block's start; the
models get them *instead of* an attention mask, and transformers' causal masks turn restarting positions into
a block-diagonal mask (``masking_utils.find_packed_sequence_indices``): no token attends across a document
boundary, and the next-token target of a document's last position (its EOS) is ignored.

File formats (paths are globs relative to the spec's directory unless absolute):

- ``text``: one example per non-empty line of each file (blank lines are skipped); the column is ``text``.
- ``jsonl`` / ``json``: one JSON object per line / a JSON array (or HF-style JSON) of objects.
- ``parquet`` and ``csv`` (with a header row).
- ``chat``: JSONL conversations (a ``messages`` list of role/content turns), rendered with the tokenizer's chat
  template by ``runtime.chat``; the loss reads assistant tokens only (``target_mask`` -> ``tokens`` and
  ``loss_mask`` in ``collate``). Never packed: one conversation per row, truncated to ``seq_len``.

Problems in the files are found before training and named: a pattern matching no file, an empty file,
bytes that are not UTF-8 (file and byte offset), a JSON line that does not parse (file and line), a missing
text/pair/label column (with the columns present).
"""

from __future__ import annotations

import codecs
import glob
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gkdlang.spec import DataSpec
from planner.tokens import PACK_CHUNK_DOCS  # the planner counts packed blocks the same way
from runtime.errors import RunError

if TYPE_CHECKING:
    import datasets

    from runtime.vocab import VocabMap

IGNORE = -100
"""Target value of positions no loss reads (HF convention)."""
_BUILDERS = {"text": "text", "jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv", "chat": "json"}
_CHUNK = 1 << 20


# ---------------------------------------------------------------- files


def _files(data: DataSpec, base_dir: Path) -> list[Path]:
    found: list[Path] = []
    for pattern in data.paths:
        full = pattern if Path(pattern).is_absolute() else str(base_dir / pattern)
        matches = sorted(Path(p) for p in glob.glob(full, recursive=True) if Path(p).is_file())
        if not matches:
            raise RunError(f"data '{data.name}': no file matches '{pattern}' (looked for {full})")
        found.extend(m for m in matches if m not in found)
    return found


def _check_utf8(data: DataSpec, path: Path) -> None:
    """Raise naming the byte offset of the first byte sequence that is not UTF-8; also reject blank files."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, blank = 0, True
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            # exc.start counts from the bytes the decoder still holds (a split character) plus this chunk
            held = len(decoder.getstate()[0])
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                raise RunError(
                    f"data '{data.name}': {path} is not UTF-8 text: invalid byte at offset "
                    f"{offset - held + exc.start} ({exc.reason}); re-encode the file as UTF-8"
                ) from None
            if not chunk:
                break
            blank = blank and not text.strip()
            offset += len(chunk)
    if blank:
        raise RunError(f"data '{data.name}': {path} is empty (only whitespace)")


def _check_jsonl(data: DataSpec, path: Path) -> None:
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RunError(f"data '{data.name}': {path} line {number} is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise RunError(f"data '{data.name}': {path} line {number} is not a JSON object")


def _check_file(data: DataSpec, path: Path) -> None:
    if path.stat().st_size == 0:
        raise RunError(f"data '{data.name}': {path} is empty")
    if data.format != "parquet":
        _check_utf8(data, path)
    if data.format in ("jsonl", "chat"):
        _check_jsonl(data, path)


def _columns_needed(data: DataSpec) -> list[tuple[str, str]]:
    """(spec key, column name) pairs every row must have."""
    if data.format == "chat":
        return [("messages", data.messages)]
    need = [("text", data.text)]
    need += [("pair", data.pair)] if data.pair else []
    need += [("label", data.label)] if data.label else []
    return need


def _check_columns(data: DataSpec, ds: datasets.Dataset, files: list[Path]) -> None:
    present = list(ds.column_names)
    for key, column in _columns_needed(data):
        if column not in present:
            raise RunError(
                f"data '{data.name}': column '{column}' ({key} = \"{column}\") is not in {', '.join(map(str, files))}; "
                f"columns present: {', '.join(present) or 'none'}"
            )


def load_texts(data: DataSpec, base_dir: Path) -> datasets.Dataset:
    """The raw rows of ``data`` as a ``datasets.Dataset`` (every file checked first, see module docstring)."""
    import datasets

    if data.format == "text" and (data.pair or data.label):
        raise RunError(f"data '{data.name}': format text has one column; use jsonl/csv/parquet for pair or label")
    files = _files(data, Path(base_dir))
    for path in files:
        _check_file(data, path)
    try:
        ds = datasets.load_dataset(_BUILDERS[data.format], data_files=[str(p) for p in files], split="train")
    except Exception as exc:  # datasets wraps parser errors in its own generic types
        names = ", ".join(map(str, files))
        raise RunError(f"data '{data.name}': cannot read {data.format} files {names}: {exc}") from None
    if data.format == "text":
        ds = ds.filter(lambda row: bool(row["text"].strip()))
    _check_columns(data, ds, files)
    if len(ds) == 0:
        raise RunError(f"data '{data.name}': the files hold no examples")
    return ds


# ---------------------------------------------------------------- tokenising


@dataclass(frozen=True)
class TokenizedData:
    """Tokenised examples plus what ``collate`` needs to batch them."""

    dataset: Any
    """``datasets.Dataset`` with ``input_ids``, ``special_mask`` [, ``token_type_ids``] [, ``label``]."""
    label_names: tuple[str, ...] | None
    """Label id -> original string label (string labels are numbered in sorted order); None otherwise."""
    pad_id: int
    mask_token_id: int | None
    """``[MASK]`` id for masked-LM batches; None for causal models (and tokenizers without one)."""
    causal: bool
    mlm_probability: float
    vocab_size: int
    """Full tokenizer vocabulary: random MLM replacements are drawn below it."""
    vocab_map: VocabMap | None = None
    packed: bool = False
    """Rows are packed ``seq_len`` blocks with ``position_ids`` (see the module docstring)."""

    def __len__(self) -> int:
        return len(self.dataset)

    def examples(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        columns = self.dataset[list(indices)]
        return [dict(zip(columns, values)) for values in zip(*columns.values())]

    def collate(self, indices: Sequence[int], seed_for_step: int) -> dict[str, Tensor]:
        """The padded batch of ``indices`` with this data's padding, masking and vocabulary map."""
        return collate(
            self.examples(indices),
            self.pad_id,
            causal=self.causal,
            mask_token_id=self.mask_token_id,
            seed_for_step=seed_for_step,
            mlm_probability=self.mlm_probability,
            vocab_size=self.vocab_size,
            vocab_map=self.vocab_map,
        )


def _label_map(
    data: DataSpec, values: list[Any], num_labels: int | None
) -> tuple[dict[Any, int], tuple[str, ...] | None]:
    """Label value -> id; string labels are numbered in sorted order."""
    bad = next((i for i, v in enumerate(values) if v is None or isinstance(v, (list, dict))), None)
    if bad is not None:
        raise RunError(f"data '{data.name}': row {bad} has no usable value in label column '{data.label}'")
    if all(isinstance(v, str) for v in values):
        names = tuple(sorted(set(values)))
        if num_labels is not None and len(names) > num_labels:
            raise RunError(
                f"data '{data.name}': label column '{data.label}' has {len(names)} distinct labels "
                f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}) but the classify head has "
                f"num_labels {num_labels}"
            )
        return {name: i for i, name in enumerate(names)}, names
    if not all(isinstance(v, (int, bool)) or (isinstance(v, float) and v.is_integer()) for v in values):
        raise RunError(
            f"data '{data.name}': label column '{data.label}' mixes types or holds fractional numbers; "
            f"labels must be class names or integer ids (regression is not supported)"
        )
    ids = {v: int(v) for v in set(values)}
    out = sorted(v for v in ids.values() if v < 0 or (num_labels is not None and v >= num_labels))
    if out:
        valid = f"0..{num_labels - 1} (num_labels {num_labels})" if num_labels is not None else "0 or more"
        raise RunError(f"data '{data.name}': label {out[-1]} in column '{data.label}' is outside {valid}")
    return ids, None


def _check_texts(data: DataSpec, ds: datasets.Dataset) -> None:
    if data.format == "chat":  # conversations: runtime.chat.check_rows
        return
    for key, column in _columns_needed(data)[: 2 if data.pair else 1]:
        bad = next((i for i, v in enumerate(ds[column]) if not isinstance(v, str)), None)
        if bad is not None:
            raise RunError(f"data '{data.name}': row {bad} of column '{column}' ({key}) is not a string")


def _encode_fn(data: DataSpec, tokenizer: Any, seq_len: int, labels: dict[Any, int] | None) -> Any:
    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        pairs = batch[data.pair] if data.pair else None
        # pairs always get segment ids (models without them ignore the key); single texts: the tokenizer decides
        enc = tokenizer(
            batch[data.text],
            pairs,
            truncation=True,
            max_length=seq_len,
            return_special_tokens_mask=True,
            return_token_type_ids=True if data.pair else None,
        )
        out = {"input_ids": enc["input_ids"], "special_mask": enc["special_tokens_mask"]}
        if "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"]
        if labels is not None:
            out["label"] = [labels[v] for v in batch[data.label]]
        return out

    return encode


def tokenize(
    ds: datasets.Dataset,
    data: DataSpec,
    tokenizer: Any,
    seq_len: int,
    *,
    causal: bool,
    mlm_probability: float = 0.15,
    vocab_map: VocabMap | None = None,
    num_labels: int | None = None,
    max_positions: int | None = None,
    packed: bool = False,
) -> TokenizedData:
    """Tokenise ``ds`` (truncated to ``seq_len``, pairs joined by the tokenizer's template, labels to ids), or
    with ``packed`` concatenate its documents into ``seq_len`` blocks (module docstring).

    ``max_positions``: the longest sequence the models accept; a larger ``seq_len`` is an error. Unlabelled
    rows that tokenise to nothing are dropped; a labelled one is an error.
    """
    if max_positions is not None and seq_len > max_positions:
        raise RunError(
            f"data '{data.name}': seq_len {seq_len} is longer than the model accepts ({max_positions} positions); "
            f"lower seq_len"
        )
    if not 0.0 < mlm_probability < 1.0:
        raise RunError(f"data '{data.name}': mlm_probability must be in (0, 1), got {mlm_probability}")
    _check_texts(data, ds)
    if data.format == "chat":
        if packed:
            raise RunError(f"data '{data.name}': chat data is never packed (the plan should not have packed it)")
        from runtime.chat import encode_rows

        return TokenizedData(dataset=encode_rows(ds, data, tokenizer, seq_len, owner="the stage's student"),
                             label_names=None, pad_id=int(tokenizer.pad_token_id), mask_token_id=None, causal=True,
                             mlm_probability=mlm_probability, vocab_size=len(tokenizer), vocab_map=vocab_map)
    if packed:
        return _tokenize_packed(ds, data, tokenizer, seq_len, causal=causal, vocab_map=vocab_map)
    labels, names = (None, None)
    if data.label:
        labels, names = _label_map(data, list(ds[data.label]), num_labels)
    enc = ds.map(_encode_fn(data, tokenizer, seq_len, labels), batched=True, remove_columns=ds.column_names)
    enc = _drop_empty(data, enc)
    mask_id = None if causal else tokenizer.mask_token_id
    return TokenizedData(
        dataset=enc,
        label_names=names,
        pad_id=int(tokenizer.pad_token_id),
        mask_token_id=mask_id,
        causal=causal,
        mlm_probability=mlm_probability,
        vocab_size=len(tokenizer),
        vocab_map=vocab_map,
    )


def _tokenize_packed(ds: datasets.Dataset, data: DataSpec, tokenizer: Any, seq_len: int, *, causal: bool,
                     vocab_map: VocabMap | None) -> TokenizedData:
    if not causal or data.label or data.pair:
        raise RunError(f"data '{data.name}': packing needs unlabelled single-text data read by causal models "
                       f"(the plan should not have packed it); set packing: false")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise RunError(f"data '{data.name}': packing separates documents by the EOS token, and this tokenizer "
                       f"has none; add one or set packing: false")

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        enc = tokenizer(batch[data.text], return_special_tokens_mask=True, verbose=False)
        # a tokenizer whose template already ends documents with EOS keeps its own
        ends = [bool(ids) and ids[-1] == eos for ids in enc["input_ids"]]
        return {"input_ids": [ids + [eos] * (not end) for ids, end in zip(enc["input_ids"], ends)],
                "special_mask": [mask + [1] * (not end) for mask, end in zip(enc["special_tokens_mask"], ends)]}

    docs = ds.map(encode, batched=True, remove_columns=ds.column_names)
    blocks = docs.map(_pack_fn(seq_len), batched=True, batch_size=PACK_CHUNK_DOCS, remove_columns=docs.column_names)
    if len(blocks) == 0:
        raise RunError(f"data '{data.name}': its {len(docs)} documents hold fewer than seq_len {seq_len} tokens; "
                       f"lower seq_len or set packing: false")
    return TokenizedData(dataset=blocks, label_names=None, pad_id=int(tokenizer.pad_token_id), mask_token_id=None,
                         causal=True, mlm_probability=0.15, vocab_size=len(tokenizer), vocab_map=vocab_map,
                         packed=True)


def _pack_fn(seq_len: int) -> Any:
    def pack(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        ids = [t for doc in batch["input_ids"] for t in doc]
        special = [t for doc in batch["special_mask"] for t in doc]
        starts = [i == 0 for doc in batch["input_ids"] for i in range(len(doc))]
        n = len(ids) // seq_len * seq_len  # the chunk's last partial block is dropped
        out: dict[str, list[Any]] = {"input_ids": [], "special_mask": [], "position_ids": []}
        for b in range(0, n, seq_len):
            out["input_ids"].append(ids[b : b + seq_len])
            out["special_mask"].append(special[b : b + seq_len])
            out["position_ids"].append(_restarting_positions(starts[b : b + seq_len]))
        return out

    return pack


def _restarting_positions(starts: list[bool]) -> list[int]:
    """0 at the block's first position and at every document start, counting up in between."""
    out, pos = [], 0
    for i, start in enumerate(starts):
        pos = 0 if (start or i == 0) else pos + 1
        out.append(pos)
    return out


def _drop_empty(data: DataSpec, enc: datasets.Dataset) -> datasets.Dataset:
    empty = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) == 0]
    if not empty:
        return enc
    if data.label:
        raise RunError(f"data '{data.name}': row {empty[0]} has a label but its text tokenises to nothing")
    return enc.filter(lambda row: len(row["input_ids"]) > 0)


def split_eval(td: TokenizedData, fraction: float, seed: int) -> tuple[TokenizedData, TokenizedData]:
    """(train, eval): a seeded random ``fraction`` of the examples held out (``split`` in the data block)."""
    n = len(td)
    held = int(round(n * fraction))
    if not 0 < held < n:
        raise RunError(f"split {fraction} of {n} examples leaves an empty train or eval part; change split")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return (
        replace(td, dataset=td.dataset.select(sorted(order[held:]))),
        replace(td, dataset=td.dataset.select(sorted(order[:held]))),
    )


# ---------------------------------------------------------------- sampling


def _mix(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (Python's hash of ints is not salted, but be explicit)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 % (1 << 64)
    return h % (1 << 63)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Seed of one micro-batch's MLM masking: same step, micro-batch and rank -> same masks on resume."""
    return _mix(seed, step, micro, rank)


class ResumableSampler:
    """Which examples each rank reads at each optimizer step; deterministic in (seed, step), resumable.

    Step ``k`` reads the global batch ``perm_e[p*G:(p+1)*G]`` of epoch ``e = k // steps_per_epoch``
    (``p = k % steps_per_epoch``; a partial last batch is dropped) where ``perm_e`` is a seeded permutation.
    Rank ``r`` takes the ``r``-th of ``world`` equal slices and splits it into ``accum`` micro-batches. The
    global batch of a step does not depend on the world size, so a run resumes on another number of ranks.
    """

    def __init__(self, n: int, global_batch: int, micro_batch: int, rank: int, world: int, seed: int) -> None:
        if world < 1 or not 0 <= rank < world:
            raise RunError(f"sampler: rank {rank} is outside a world of {world}")
        if micro_batch < 1 or global_batch % (micro_batch * world) != 0:
            raise RunError(
                f"batch {global_batch} is not a multiple of micro_batch {micro_batch} x {world} ranks; "
                f"change batch or micro_batch"
            )
        if n < global_batch:
            raise RunError(f"the data has {n} examples, fewer than one batch ({global_batch}); lower batch")
        self.n, self.global_batch, self.micro_batch = n, global_batch, micro_batch
        self.rank, self.world, self.seed = rank, world, seed
        self.accum = global_batch // (micro_batch * world)
        self.steps_per_epoch = n // global_batch
        self._next = 0
        self._perm: tuple[int, Tensor] | None = None

    def _permutation(self, epoch: int) -> Tensor:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(_mix(self.seed, epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=gen))
        return self._perm[1]

    def step_indices(self, step: int) -> list[int]:
        """The global batch of optimizer step ``step`` (all ranks)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        return perm[pos * self.global_batch : (pos + 1) * self.global_batch].tolist()

    def step_micro_batches(self, step: int) -> list[list[int]]:
        """This rank's ``accum`` micro-batches of step ``step``."""
        share = self.global_batch // self.world
        mine = self.step_indices(step)[self.rank * share : (self.rank + 1) * share]
        return [mine[i : i + self.micro_batch] for i in range(0, share, self.micro_batch)]

    def micro_batches(self, start_step: int | None = None) -> Iterator[list[int]]:
        """Endless micro-batches from ``start_step`` (default: where the state says), ``accum`` per step.

        The state advances to step ``k + 1`` when the last micro-batch of step ``k`` is handed out, so a
        checkpoint taken after optimizer step ``k`` resumes at ``k + 1``.
        """
        step = self._next if start_step is None else start_step
        while True:
            batches = self.step_micro_batches(step)
            for i, batch in enumerate(batches):
                if i == len(batches) - 1:
                    self._next = step + 1
                yield batch
            step += 1

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n, "global_batch": self.global_batch, "seed": self.seed, "step": self._next}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("n", "global_batch", "seed"):
            if state.get(key) != getattr(self, key):
                raise RunError(
                    f"cannot resume: the checkpoint's sampler has {key}={state.get(key)} but this run has "
                    f"{getattr(self, key)} (the data or batch changed); start a new run or restore them"
                )
        self._next = int(state["step"])


# ---------------------------------------------------------------- batching


def _pad(rows: list[list[int]], width: int, value: int) -> Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _causal_targets(ids: Tensor, attention: Tensor) -> Tensor:
    tokens = torch.full_like(ids, IGNORE)
    tokens[:, :-1] = ids[:, 1:]
    # no target where the next position is padding, and none at the last position
    tokens[:, :-1][attention[:, 1:] == 0] = IGNORE
    return tokens


def _mask_tokens(
    ids: Tensor, candidates: Tensor, mask_id: int, seed: int, p: float, vocab_size: int | None
) -> tuple[Tensor, Tensor]:
    """BERT masking: choose ``p`` of the candidates; 80% -> [MASK], 10% -> random token, 10% kept."""
    gen = torch.Generator().manual_seed(int(seed) % (1 << 63))
    chosen = (torch.rand(ids.shape, generator=gen) < p) & candidates
    action = torch.rand(ids.shape, generator=gen)
    if vocab_size:
        pool = torch.randint(vocab_size, ids.shape, generator=gen)
    else:  # no vocabulary size given: draw replacements from the batch's own ordinary tokens
        real = ids[candidates] if bool(candidates.any()) else ids.flatten()
        pool = real[torch.randint(real.numel(), ids.shape, generator=gen)]
    tokens = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    out = ids.clone()
    out[chosen & (action < 0.8)] = mask_id
    swap = chosen & (action >= 0.8) & (action < 0.9)
    out[swap] = pool[swap]
    return out, tokens


def collate(
    examples: list[dict[str, Any]],
    pad_id: int,
    *,
    causal: bool,
    mask_token_id: int | None,
    seed_for_step: int,
    mlm_probability: float = 0.15,
    vocab_size: int | None = None,
    vocab_map: VocabMap | None = None,
) -> dict[str, Tensor]:
    """Pad ``examples`` (right) into tensors.

    Gives ``input_ids``, ``attention_mask``, ``special_mask`` (bool, pads included), ``token_type_ids`` when
    the examples have them, ``position_ids`` for packed blocks, ``loss_mask`` for chat rows (the positions whose
    next token is an assistant token: every per-token loss reads only them), ``labels`` [b] when labelled, and ``tokens`` [b, s]: next-token targets (causal,
    -100 on padding and the last position) or masked-LM targets (the original id at masked positions, else
    -100; ``input_ids`` then holds the masked input). Masking is a pure function of ``seed_for_step``.
    With ``vocab_map``, ``student_input_ids`` holds the remapped input and ``tokens`` are in the compressed
    vocabulary (the student's rows and the teacher's selected columns).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e["input_ids"]) for e in examples)
    ids = _pad([e["input_ids"] for e in examples], width, pad_id)
    attention = _pad([[1] * len(e["input_ids"]) for e in examples], width, 0)
    special = _pad([e["special_mask"] for e in examples], width, 1).bool()
    batch: dict[str, Tensor] = {"attention_mask": attention, "special_mask": special}
    if "token_type_ids" in examples[0]:
        batch["token_type_ids"] = _pad([e["token_type_ids"] for e in examples], width, 0)
    if "label" in examples[0]:
        batch["labels"] = torch.tensor([int(e["label"]) for e in examples], dtype=torch.long)
    if "position_ids" in examples[0]:  # packed blocks: no target across a document boundary
        batch["position_ids"] = _pad([e["position_ids"] for e in examples], width, 0)
    if causal:
        tokens = _causal_targets(ids, attention)
        if "position_ids" in batch:
            tokens[:, :-1][batch["position_ids"][:, 1:] == 0] = IGNORE
        if "target_mask" in examples[0]:  # chat: only assistant tokens are targets, and only they count in any loss
            trained = _pad([e["target_mask"] for e in examples], width, 0)
            tokens[:, :-1][trained[:, 1:] == 0] = IGNORE
            batch["loss_mask"] = tokens != IGNORE
    elif mask_token_id is not None:
        ids, tokens = _mask_tokens(ids, ~special, mask_token_id, seed_for_step, mlm_probability, vocab_size)
    else:
        tokens = torch.full_like(ids, IGNORE)
    batch["input_ids"], batch["tokens"] = ids, tokens
    if vocab_map is not None:
        batch["student_input_ids"] = vocab_map.remap_inputs(ids)
        keep = tokens != IGNORE
        batch["tokens"] = torch.where(keep, vocab_map.remap_inputs(tokens.clamp(min=0)), tokens)
    return batch
