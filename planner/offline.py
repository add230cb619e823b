"""Offline teachers: which teachers may be read from a cache, what the cache holds, and what it costs.

Takes a checked ``Spec``, a stage and the planner's ``ModelCapture``s; gives, without importing torch:

- ``offline_problems``: why a teacher's signals cannot come from a cache in a stage (empty list = they can).
  The runtime (``runtime/cache.py``) applies the same rules, so planner and runtime never disagree.
- ``cache_temperature``: the temperature the cached top-k probabilities are taken at (the one of the stage's
  ``kl`` terms on the teacher's logits; they must agree and be constant).
- ``bytes_per_token`` / ``loaded_bytes``: disk bytes of one token's cached signals, and the bytes the runtime
  holds per micro-batch once it is read (logits packed as fp32 weights, ids and one scalar per token).
- ``stage_epochs``: passes the stage makes over its data, over which the one teacher pass is amortised.
- ``offline_price`` and ``comparison_notes``: the price of ``offline`` (teacher pass once, disk footprint,
  read traffic per step) and the plan notes comparing the best offline and online placements.

Rules (see docs/cost-model.md, "Offline teachers"): the teacher declares ``cache``; the stage has no
interventions (they run the teacher on changed inputs); the teacher is not an encoder (masked-LM batches are
masked anew every step, so its inputs are not fixed); no attention maps are read (s^2 per token); every term
reading the teacher's logits is ``kl(teacher.logits, ...)`` with only ``T`` (constant) and ``scale_t2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gkdlang.builtins import DTYPE_BYTES
from gkdlang.spec import ModelSpec, Node, Schedule, SignalNode, Spec, StageSpec
from planner.datasize import count_rows as count_data_rows
from planner.plan import ModelCapture

#: Bytes of one element per storage dtype.
STORE_BYTES = DTYPE_BYTES
#: Bytes of the tail mass per token (always fp32: it is 1 - sum of the stored values, small and exact).
TAIL_BYTES = 4
#: Bytes of the tail's sum of p log p per token (``tail: sampled``; fp32).
XLOGX_BYTES = 4
#: Token ids below this fit an int16 shifted by 2^15 (two bytes per id).
SHORT_VOCAB = 1 << 16
#: Kinds stored per token ([b, s, w]) or per example ([b, w]); attention maps are never cached.
TOKEN_KINDS = frozenset({"logits", "embeddings", "hidden", "query", "key", "value", "ffn"})
EXAMPLE_KINDS = frozenset({"task_logits"})
#: Option keys a cached ``kl`` term may carry.
CACHED_KL_OPTIONS = frozenset({"T", "scale_t2"})


def index_bytes(vocab: int) -> int:
    """Bytes per stored token id: 2 up to 65,536 tokens, else 4."""
    return 2 if vocab <= SHORT_VOCAB else 4


def cache_dir(spec_file: str, model: ModelSpec, base: Path | None = None) -> Path:
    """The cache directory of ``model``: its ``cache.path`` relative to the spec's directory unless absolute."""
    assert model.cache is not None
    path = Path(model.cache.path)
    return path if path.is_absolute() else (base if base is not None else Path(spec_file).parent) / path


# ---------------------------------------------------------------- eligibility


def _schedule_value(value) -> float | None:
    """A constant option value, or None when it changes over the stage."""
    if isinstance(value, Schedule):
        return value.value if value.kind == "constant" or value.end is None else None
    if isinstance(value, dict) and "value" in value:
        return _schedule_value(Schedule(**value))
    return float(value)


def _reads(node: Node, model: str) -> list[SignalNode]:
    if isinstance(node, SignalNode):
        return [node] if node.model == model else []
    return [s for child in node.inputs for s in _reads(child, model)]


def _logits_problems(stage: StageSpec, teacher: str) -> list[str]:
    problems = []
    for term in stage.loss:
        logits = [s for s in _reads(term.target, teacher) + _reads(term.pred, teacher) if s.kind == "logits"]
        if not logits:
            continue
        direct = isinstance(term.target, SignalNode) and term.target.model == teacher and term.target.kind == "logits"
        if term.fn != "kl" or not direct:
            problems.append(f"term '{term.id}' uses {teacher}.logits in {term.fn}"
                            f"{'' if direct else ' through a transform'}; a cache serves kl(teacher.logits, ...) only")
            continue
        extra = sorted(set(term.options) - CACHED_KL_OPTIONS)
        if extra:
            problems.append(f"term '{term.id}': option(s) {', '.join(extra)} are not supported on cached logits")
        if "T" in term.options and _schedule_value(term.options["T"]) is None:
            problems.append(f"term '{term.id}': T changes over the stage; cached probabilities need a constant T")
    temps = {t for t in _logits_temperatures(stage, teacher) if t is not None}
    if len(temps) > 1:
        problems.append(f"terms read {teacher}.logits at temperatures {sorted(temps)}; a cache holds one")
    return problems


def _logits_temperatures(stage: StageSpec, teacher: str) -> list[float | None]:
    out = []
    for term in stage.loss:
        t = term.target
        if isinstance(t, SignalNode) and t.model == teacher and t.kind == "logits" and term.fn == "kl":
            out.append(_schedule_value(term.options.get("T", 1.0)))
    return out


def offline_problems(spec: Spec, stage: StageSpec, teacher: str, capture: ModelCapture | None) -> list[str]:
    """Why ``teacher``'s signals in ``stage`` cannot be read from a cache; empty when they can."""
    model = spec.models[teacher]
    if model.cache is None:
        return [f"teacher '{teacher}' declares no cache"]
    problems = []
    if stage.interventions:
        kinds = ", ".join(sorted({iv.kind for iv in stage.interventions}))
        problems.append(f"stage '{stage.name}' has interventions ({kinds}) that run the teacher on changed inputs")
    if model.arch.is_encoder:
        problems.append(f"'{teacher}' is an encoder: masked-LM batches are masked anew every step, so its inputs "
                        f"are not fixed")
    if capture is not None:
        attention = sorted({p.kind for p in capture.points if p.kind not in TOKEN_KINDS | EXAMPLE_KINDS})
        if attention:
            problems.append(f"{', '.join(attention)} of '{teacher}' are not cached (s^2 values per token)")
    return problems + _logits_problems(stage, teacher)


def cache_temperature(stage: StageSpec, teacher: str) -> float:
    """The temperature the cache stores the teacher's probabilities at (1 when no term reads its logits)."""
    temps = [t for t in _logits_temperatures(stage, teacher) if t is not None]
    return temps[0] if temps else 1.0


# ---------------------------------------------------------------- sizes


def _width(model: ModelSpec, kind: str) -> int:
    a = model.arch
    return {"embeddings": a.hidden_size, "hidden": a.hidden_size, "query": a.num_heads * a.head_dim,
            "key": a.kv_dim, "value": a.kv_dim, "ffn": a.intermediate_size, "logits": a.vocab_size,
            "task_logits": model.head.num_labels or 2}[kind]


def bytes_per_token(model: ModelSpec, capture: ModelCapture) -> int:
    """Disk bytes of one token's cached signals (per-example signals not included: see ``bytes_per_example``)."""
    assert model.cache is not None
    d = STORE_BYTES[model.cache.dtype]
    total = 0
    for p in capture.points:
        if p.kind == "logits":
            total += logits_bytes_per_token(model)
        elif p.kind in TOKEN_KINDS:
            total += _width(model, p.kind) * d
    return total


def logits_bytes_per_token(model: ModelSpec) -> int:
    """Disk bytes of one token's cached logits: k (value, id) pairs and the tail mass, plus with
    ``tail: sampled`` the tail's sum of p log p and ``samples`` ids (SmolLM2 at the default k 32, 80 samples,
    fp16: 32 x 4 + 4 + 4 + 80 x 2 = 296)."""
    assert model.cache is not None
    c, ids = model.cache, index_bytes(model.arch.vocab_size)
    total = c.k * (STORE_BYTES[c.dtype] + ids) + TAIL_BYTES
    if c.tail == "sampled":
        total += XLOGX_BYTES + c.samples * ids
    return total


def bytes_per_example(model: ModelSpec, capture: ModelCapture) -> int:
    assert model.cache is not None
    d = STORE_BYTES[model.cache.dtype]
    return sum(_width(model, p.kind) * d for p in capture.points if p.kind in EXAMPLE_KINDS)


def packed_logits_width(k: int, tail: str, samples: int) -> int:
    """Values per token of cached logits as the loss reads them: ``tail: sampled`` 2 (k + samples) + 1 (weights,
    ids, sum p log p), ``tail: bucket`` 2k + 1 (probabilities, ids, tail mass); see runtime/cache.py."""
    return 2 * (k + (samples if tail == "sampled" else 0)) + 1


def loaded_bytes(model: ModelSpec, capture: ModelCapture, micro: int, seq: int) -> int:
    """Bytes of a micro-batch's cached signals once read: logits packed fp32 (J weights, J ids, one scalar;
    J = k + samples), the rest in fp32 (the loss kernels' dtype)."""
    assert model.cache is not None
    packed = packed_logits_width(model.cache.k, model.cache.tail, model.cache.samples)
    per_token = sum(packed * 4 if p.kind == "logits" else _width(model, p.kind) * 4
                    for p in capture.points if p.kind in TOKEN_KINDS)
    per_example = sum(_width(model, p.kind) * 4 for p in capture.points if p.kind in EXAMPLE_KINDS)
    return micro * (seq * per_token + per_example)


# ---------------------------------------------------------------- epochs and price


def count_rows(spec: Spec, stage: StageSpec, base: Path | None = None) -> int | None:
    """Examples of the stage's data (``planner.datasize``), relative to the spec file's directory by default."""
    return count_data_rows(spec.data[stage.data], base if base is not None else Path(spec.file).parent)


_ROWS: dict[tuple, int | None] = {}


def stage_epochs(spec: Spec, stage: StageSpec, base: Path | None = None) -> float:
    """Passes over the data: ``epochs`` when given, else steps x batch / examples; 1 when unknown (conservative:
    the cache then costs a full teacher pass, like online distillation)."""
    if stage.epochs is not None:
        return max(stage.epochs, 1.0)
    key = (spec.source_hash, spec.file, stage.data, str(base))
    if key not in _ROWS:  # the search asks again for every world size it tries
        _ROWS[key] = count_rows(spec, stage, base)
    rows = _ROWS[key]
    if rows is None or stage.steps is None or rows == 0:
        return 1.0
    return max(stage.steps * stage.batch / rows, 1.0)


@dataclass(frozen=True)
class OfflinePrice:
    """What serving a teacher from its cache costs in one stage."""

    teacher: str
    bytes_per_token: int
    tokens: int | None
    """Tokens in one pass over the data (upper bound: examples x seq_len); None = unknown at plan time."""
    disk_bytes: int | None
    build_s: float | None
    """One teacher pass over the data (predicted)."""
    read_bytes_per_step: int
    read_s_per_step: float
    epochs: float


def offline_price(spec: Spec, stage: StageSpec, model: ModelSpec, capture: ModelCapture, teacher_s_per_step: float,
                  tokens_per_step: int, read_bw: float, base: Path | None = None) -> OfflinePrice:
    """Price of the cache of ``model`` given the online teacher's predicted seconds per step."""
    seq = stage.seq_len or spec.data[stage.data].seq_len
    per_token = bytes_per_token(model, capture)
    rows = count_rows(spec, stage, base)
    tokens = rows * seq if rows is not None else None
    disk = tokens * per_token + rows * bytes_per_example(model, capture) if tokens is not None else None
    build = teacher_s_per_step * tokens / tokens_per_step if tokens is not None else None
    read = tokens_per_step * per_token + (tokens_per_step // seq) * bytes_per_example(model, capture)
    return OfflinePrice(model.name, per_token, tokens, disk, build, read, read / read_bw,
                        stage_epochs(spec, stage, base))
