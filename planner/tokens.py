"""Spec + stage -> packing decision and tokens per step: what the data pipeline really delivers to the models.

Packing (``runtime.data.pack``) concatenates a stage's documents, each followed by the tokenizer's EOS token,
and cuts the stream into ``seq_len`` blocks: every position of every sequence is a real token. Attention does
not cross documents: the runtime gives each block position ids that restart at every document, and
transformers' causal masks turn them into a block-diagonal mask (``masking_utils.find_packed_sequence_indices``).
That mechanism exists for causal models only, so packing needs every model of the stage to be causal, and it
is the default exactly where it changes nothing but the waste: unlabelled single-text data, and no signal,
mask or construct that reads a sequence as one example (``cls``, ``task_logits``, ``pool``, ``spans``,
``where cls``, ``interchange``).

Unpacked data is truncated to ``seq_len`` and padded to the longest sequence of each micro-batch. Where the
student's tokenizer is a local ``tokenizer.json``, the planner tokenises the documents (all of them up to
``MAX_COUNTED_CHARS`` of text, else an even sample of about that much) with the ``tokenizers`` library the runtime's fast tokenizer runs
on, so it knows the real tokens per step and the padded width the models run; without one it says it assumed
full sequences.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from gkdlang.spec import DataSpec, ModelSpec, OpNode, SignalNode, Spec, StageSpec

#: Characters tokenised at plan time; a larger corpus is sampled evenly down to about this much (the Rust tokenizer
#: reads a few MB/s on one core, so planning stays well under a second; the padded figures are expectations anyway).
MAX_COUNTED_CHARS = 1_000_000
#: Documents per chunk the runtime packs at once; a chunk's last partial block is dropped (runtime.data.pack).
PACK_CHUNK_DOCS = 10_000
#: Signals that describe a whole sequence, so a packed block (several documents) would change their meaning.
SEQUENCE_SIGNALS = frozenset({"cls", "task_logits", "labels"})
SEQUENCE_OPS = frozenset({"pool", "spans"})


@dataclass(frozen=True)
class PackingChoice:
    packed: bool
    why: str
    """One sentence: why the stage's data is (not) packed."""
    problem: str | None = None
    """Set when the data asks for ``packing: true`` but the stage cannot pack (a ``packing-unsupported`` error)."""


def packing_choice(spec: Spec, stage: StageSpec) -> PackingChoice:
    """Whether ``stage`` packs its data: the data's ``packing`` key, else the default (module docstring)."""
    data = spec.data[stage.data]
    blocker = _blocker(spec, stage, data)
    if data.packing is False:
        return PackingChoice(False, f"data '{data.name}' sets packing: false")
    if data.packing is True:
        if blocker:
            return PackingChoice(False, blocker, problem=f"data '{data.name}' asks for packing but stage "
                                 f"'{stage.name}' cannot pack it: {blocker}")
        return PackingChoice(True, f"data '{data.name}' sets packing: true")
    if blocker:
        return PackingChoice(False, f"not packed: {blocker}")
    return PackingChoice(True, "packed by default: causal models reading per-token signals of unlabelled text")


def _blocker(spec: Spec, stage: StageSpec, data: DataSpec) -> str | None:
    if stage.generate is not None:
        return "the stage trains on generated sequences, one per prompt (generate: on_policy)"
    if data.format == "chat":
        return (f"data '{data.name}' is chat data: one conversation per row (packing would need a mask per "
                f"conversation inside each block)")
    if data.label or data.pair:
        return f"data '{data.name}' has {'labels' if data.label else 'sentence pairs'}: one example per row"
    encoders = [m for m in [*stage.students, *stage.teachers] if spec.models[m].arch.is_encoder]
    if encoders:
        return (f"'{encoders[0]}' is a masked LM: transformers builds block-diagonal masks for causal models only, "
                f"so its documents would attend to each other")
    for term in stage.loss:
        if "cls" in (term.mask or "").split(" and "):
            return f"term '{term.id}' reads position 0 of each sequence (where cls)"
        found = _sequence_level(term.target) or _sequence_level(term.pred)
        if found:
            return f"term '{term.id}' reads {found}, a per-sequence signal"
    if any(iv.kind == "interchange" for iv in stage.interventions):
        return "interchange swaps spans between whole examples"
    return None


def _sequence_level(node) -> str | None:
    if isinstance(node, SignalNode):
        return node.kind if node.kind in SEQUENCE_SIGNALS else None
    if isinstance(node, OpNode):
        if node.op in SEQUENCE_OPS:
            how = getattr(node, "how", None)
            return f"{node.op}(..., {how})" if how else f"{node.op}(...)"
        return next((found for child in node.inputs if (found := _sequence_level(child))), None)
    return None


# ---------------------------------------------------------------- document lengths at plan time


@dataclass(frozen=True)
class Lengths:
    """Token counts of documents as the runtime's tokenizer makes them (special tokens included, no EOS)."""

    counts: list[int]
    total_docs: int
    """Documents in the files (``counts`` is all of them or an even sample)."""

    @property
    def complete(self) -> bool:
        return len(self.counts) == self.total_docs


def tokenizer_file(spec: Spec, model: ModelSpec, spec_dir: Path) -> Path | None:
    """The ``tokenizer.json`` of a model's local folder (a derived model uses its base's), if there is one."""
    seen = set()
    while model.source_kind == "derived" and model.base in spec.models and model.base not in seen:
        seen.add(model.name)
        model = spec.models[model.base]
    if model.source_kind != "local" or not model.source:
        return None
    path = Path(model.source)
    path = (path if path.is_absolute() else spec_dir / path) / "tokenizer.json"
    return path if path.is_file() else None


def document_lengths(spec: Spec, stage: StageSpec, spec_dir: Path) -> Lengths | None:
    """Token counts of the stage's documents (text and jsonl sources), or None when no tokenizer is local."""
    data = spec.data[stage.data]
    student = spec.models[stage.students[0]] if stage.students else None
    path = tokenizer_file(spec, student, spec_dir) if student is not None else None
    if path is None or data.format not in ("text", "jsonl", "chat"):
        return None
    docs = _documents(data, spec_dir) if data.format != "chat" else _conversations(data, spec_dir, path.parent)
    if not docs:
        return None
    step = max(1, math.ceil(sum(map(len, docs)) / MAX_COUNTED_CHARS))
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        # a rendered conversation holds its special tokens as text: tokenised as transformers' apply_chat_template
        # does it, without adding any
        counts = [len(e.ids) for e in tok.encode_batch(docs[::step], add_special_tokens=data.format != "chat")]
    except Exception:  # a tokenizer file the Rust library cannot read: the figures fall back to full sequences
        return None
    return Lengths(counts, len(docs))


def _conversations(data: DataSpec, spec_dir: Path, folder: Path) -> list[str]:
    """Chat rows rendered with the tokenizer folder's chat template (gkdlang.chat.render), as the runtime renders
    them; [] when there is no template or a row is not a conversation (the checker reports those)."""
    from gkdlang import chat

    template = chat.template_in(folder)
    if template is None:
        return []
    special = _special_tokens(folder)
    out = []
    for row in _json_rows(data, spec_dir):
        if chat.row_problem(row, data.messages):
            return []
        turns = [{"role": t["role"], "content": t["content"]} for t in row[data.messages]]
        try:
            out.append(chat.render(template, turns, special=special))
        except chat.TemplateError:
            return []
    return out


def _special_tokens(folder: Path) -> dict[str, str]:
    """``bos_token``, ``eos_token``, ... as strings (what transformers passes a template)."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    out = {}
    for key, value in config.items():
        value = value.get("content") if isinstance(value, dict) else value
        if key.endswith("_token") and isinstance(value, str):
            out[key] = value
    return out


def _json_rows(data: DataSpec, spec_dir: Path) -> list:
    from planner.datasize import MAX_COUNTED_BYTES, _glob

    files = sorted({f for pattern in data.paths for f in _glob(pattern, spec_dir)})
    if not files or sum(f.stat().st_size for f in files) > MAX_COUNTED_BYTES:
        return []
    rows = []
    for f in files:
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    return []
    return rows


def _documents(data: DataSpec, spec_dir: Path) -> list[str]:
    from planner.datasize import MAX_COUNTED_BYTES, _glob

    files = sorted({f for pattern in data.paths for f in _glob(pattern, spec_dir)})
    if not files or sum(f.stat().st_size for f in files) > MAX_COUNTED_BYTES:
        return []
    out: list[str] = []
    for f in files:
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            if data.format == "text":
                out.append(line)
                continue
            try:
                value = json.loads(line).get(data.text)
            except (json.JSONDecodeError, AttributeError):
                return []
            if isinstance(value, str):
                out.append(value)
    return out


# ---------------------------------------------------------------- tokens per step


@dataclass(frozen=True)
class StepTokens:
    real: float
    """Real tokens per optimizer step over all ranks (document tokens and EOS separators, no padding)."""
    computed: float
    """Positions the models run per step over all ranks (real tokens plus padding)."""
    source: str


def step_tokens(batch: int, micro: int, seq_len: int, packed: bool, lengths: Lengths | None) -> StepTokens:
    """Expected tokens of one optimizer step: ``batch`` sequences in micro-batches of ``micro`` per rank."""
    full = float(batch * seq_len)
    if packed:
        return StepTokens(full, full, "packed: every position of every block is a document token or an EOS")
    if lengths is None or not lengths.counts:
        return StepTokens(full, full, "no local tokenizer at plan time: assumed every sequence fills seq_len")
    clipped = sorted(min(n, seq_len) for n in lengths.counts)
    real = batch * sum(clipped) / len(clipped)
    computed = batch * expected_max(clipped, micro)
    how = "all" if lengths.complete else f"an even sample of {len(lengths.counts):,} of"
    return StepTokens(real, computed, f"{how} {lengths.total_docs:,} documents tokenised at plan time; "
                      f"each micro-batch is padded to its longest sequence")


def expected_max(sorted_counts: list[int], m: int) -> float:
    """E[max of ``m`` draws] from the empirical distribution: the padded width of a micro-batch of ``m``."""
    n = len(sorted_counts)
    total, below = 0.0, 0.0
    i = 0
    while i < n:
        j = i
        while j < n and sorted_counts[j] == sorted_counts[i]:
            j += 1
        cdf = (j / n) ** m
        total += sorted_counts[i] * (cdf - below)
        below = cdf
        i = j
    return total


def packed_blocks(lengths: Lengths, seq_len: int) -> int | None:
    """Blocks ``runtime.data.pack`` makes from every document (None unless all were counted)."""
    if not lengths.complete:
        return None
    blocks = 0
    for start in range(0, len(lengths.counts), PACK_CHUNK_DOCS):
        blocks += sum(n + 1 for n in lengths.counts[start:start + PACK_CHUNK_DOCS]) // seq_len
    return blocks
