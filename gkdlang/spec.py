"""The checked Spec: what a .gkd file means, resolved against real architectures (pydantic, frozen).

Produced by ``gkdlang.lower`` from the AST; consumed by the planner. Every object keeps the source span
of the construct it came from so later phases can still point at the user's line. Method calls are
inlined and layer maps expanded here: a stage's loss is a flat list of weighted terms, each comparing
one target node with one prediction node.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from gkdlang.arch import ArchInfo

SCHEMA_VERSION = 1


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Span(Frozen):
    """A source range, 1-based lines and columns."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


# ---------------------------------------------------------------- schedules


class Schedule(Frozen):
    """A number that may change over a stage: constant, or interpolated between two values.

    ``start``/``until`` are fractions of the stage's total steps; before ``start`` the value is
    ``value``, after ``until`` it is ``end``. ``stairs`` goes from ``value`` to ``end`` in ``levels`` equal
    steps, one per ``every`` period (epoch or optimizer step) from the stage's start, then stays at ``end``.
    """

    kind: Literal["constant", "linear", "cosine", "step", "stairs"] = "constant"
    value: float
    end: float | None = None
    start: float = 0.0
    until: float = 1.0
    levels: int | None = None
    """stairs: how many distinct values (period k has level min(k, levels - 1))."""
    every: Literal["step", "epoch", "stage"] | None = None
    """stairs: the period that moves to the next level (``stage``: each n-th of the stage's steps)."""

    def at(self, frac: float, *, step: int = 0, epoch: int = 0) -> float:
        """Value at training progress ``frac`` in [0, 1] (``stairs``: at optimizer step ``step`` / epoch ``epoch``)."""
        import math

        if self.kind == "constant" or self.end is None:
            return self.value
        if self.kind == "stairs":
            levels = max(int(self.levels or 1), 1)
            if levels == 1:
                return self.end
            if self.every == "stage":  # GKD's Annealing-KD: level floor(frac * n); the epsilon absorbs 6/7*7 = 5.999..
                k = min(math.floor(frac * levels + 1e-9), levels - 1)
            else:
                k = min(epoch if self.every == "epoch" else step, levels - 1)
            return self.value + (self.end - self.value) * k / (levels - 1)
        if frac <= self.start:
            return self.value
        if frac >= self.until:
            return self.end
        x = (frac - self.start) / max(self.until - self.start, 1e-12)
        if self.kind == "linear":
            return self.value + (self.end - self.value) * x
        if self.kind == "cosine":
            return self.end + (self.value - self.end) * 0.5 * (1 + math.cos(math.pi * x))
        return self.value  # "step": jumps at ``until``


# ---------------------------------------------------------------- models


class InitSpec(Frozen):
    """How a student's weights start: random, or copied from another model."""

    kind: Literal["random", "copy", "pretrained"] = "pretrained"
    """pretrained: the source's weights (hub/local); random: its architecture only; copy: layers of ``source``.
    A derived (``like``) model has no weights of its own: it is random or copy."""
    source: str | None = None
    """Model to copy from (kind == "copy")."""
    layers: list[int] | None = None
    """Source layers copied into student layers 0..n-1; None = first n."""


class HeadSpec(Frozen):
    """Output head: language-model logits, or a sequence-classification head."""

    kind: Literal["lm", "classify", "none"] = "lm"
    num_labels: int | None = None


class CacheSpec(Frozen):
    """An offline teacher: its signals are computed once (``gkdc cache``) and read from disk while training."""

    kind: Literal["topk"] = "topk"
    """Logits are kept as the top-k probabilities, their token ids and the remaining (tail) mass."""
    k: int = 32
    tail: Literal["sampled", "bucket"] = "sampled"
    """How the mass outside the top k is kept: ``sampled`` = its exact x log x sum plus ``samples`` token ids
    drawn from the teacher's tail distribution (an unbiased KL and gradient); ``bucket`` = one bucket (a lower
    bound on the KL, exact only at k = V)."""
    samples: int = 80
    """Token ids drawn per token from the tail (``tail: sampled``; 0 with ``tail: bucket``)."""
    seed: int = 0
    """Seed of the tail samples (per example: a cache is reproducible whatever the shard or rank split)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp16"
    """Storage dtype of probabilities and of every other cached signal."""
    path: str
    """Cache directory, relative to the spec file's directory unless absolute (default ``cache/<teacher>``)."""


class ModelSpec(Frozen):
    name: str
    role: Literal["teacher", "student", "assistant"]
    """assistant: a model trained in one stage and teacher in a later one (TAKD)."""
    source_kind: Literal["hub", "local", "catalog", "derived"]
    source: str | None
    """Hub id, local directory or catalog key; None for derived models."""
    base: str | None = None
    """Name of the model a derived model is ``like``."""
    overrides: dict[str, int] = Field(default_factory=dict)
    arch: ArchInfo
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    frozen: bool = True
    init: InitSpec = InitSpec()
    head: HeadSpec = HeadSpec()
    vocab: str | None = None
    """Name of the vocab compression applied to this (student) model."""
    cache: CacheSpec | None = None
    """Offline teacher cache (``cache: topk(...)``); None = the teacher runs during training."""
    span: Span


# ---------------------------------------------------------------- data


class DataSpec(Frozen):
    name: str
    format: Literal["text", "jsonl", "json", "parquet", "csv"]
    paths: list[str]
    """Glob patterns, relative to the spec file's directory unless absolute."""
    text: str = "text"
    """Column holding the text (jsonl/json/parquet/csv)."""
    pair: str | None = None
    """Second text column for sentence-pair tasks."""
    label: str | None = None
    """Label column; None for unlabelled corpora."""
    seq_len: int = 512
    split: float | None = None
    """Fraction held out for evaluation, if any."""
    span: Span


# ---------------------------------------------------------------- vocabulary compression


class VocabSpec(Frozen):
    """GLMD frequency-based vocabulary compression of a student's embedding and output rows."""

    name: str
    """Name of the compressed vocabulary (conventionally the student's name)."""
    source: str
    """Model whose tokenizer and embeddings define the full vocabulary."""
    full_size: int
    keep_fraction: float | None
    keep_rows: int
    """Rows kept, rounded up to a multiple of ``multiple``."""
    multiple: int = 128
    rank_data: str
    """Data source whose token frequencies rank the vocabulary."""
    protect: list[str] = Field(default_factory=list)
    """Words kept first (after special tokens), e.g. label words."""
    remap: Literal["nearest", "cosine", "euclidean", "unk"] = "nearest"
    span: Span


# ---------------------------------------------------------------- loss graph

SignalKind = Literal[
    "logits",
    "task_logits",
    "embeddings",
    "hidden",
    "attn_scores",
    "attn_probs",
    "query",
    "key",
    "value",
    "ffn",
    "labels",
    "tokens",
]
"""logits: LM head; task_logits: classification head; embeddings: embedding output (HF hidden_states[0]);
hidden[i]: output of block i; attn_scores[i]/attn_probs[i]: pre/post-softmax attention of block i
[batch, heads, seq, seq]; query/key/value[i]: per-head projections [batch, heads, seq, head_dim];
ffn[i]: FFN inner activation; labels/tokens: targets from the data (no model)."""

LAYERED_KINDS: frozenset[str] = frozenset({"hidden", "attn_scores", "attn_probs", "query", "key", "value", "ffn"})


class SignalNode(Frozen):
    node: Literal["signal"] = "signal"
    model: str | None
    """Model name; None for data targets (labels, tokens)."""
    kind: SignalKind
    layer: int | None = None
    """Non-negative block index for layered kinds."""


class OpNode(Frozen):
    """A transform: project, relation, pool, normalize, select_vocab, mean, concat, attend, ..."""

    node: Literal["op"] = "op"
    op: str
    inputs: list["Node"]
    params: dict[str, Any] = Field(default_factory=dict)
    module: str | None = None
    """Key of the learned module (projection) owning this op's parameters; shared ops share a key."""


Node = Annotated[Union[SignalNode, OpNode], Field(discriminator="node")]
OpNode.model_rebuild()


class Gate(Frozen):
    """When a term is active: progressive unlocking and random per-epoch choice (RAIL-KD, SID)."""

    active_from: float = 0.0
    """Fraction of the stage after which the term counts."""
    active_until: float = 1.0
    group: str | None = None
    """Terms sharing a group are sampled: ``choose`` of them are active each ``every``."""
    choose: int | None = None
    every: Literal["step", "epoch"] | None = None


class LossTerm(Frozen):
    id: str
    """Stable, readable id used in metrics, e.g. ``tinybert.intermediate/mse[s3<-t11]``."""
    fn: str
    """Loss kernel name: kl, soft_ce, ce, mse, cos, jsd, smooth_l1, nce, ..."""
    target: Node
    pred: Node
    options: dict[str, Schedule | float | int | str | bool] = Field(default_factory=dict)
    """Kernel options, e.g. ``T`` (a Schedule), ``scale_t2``, ``reverse``."""
    mask: str | None = None
    """Token mask: "not pad", "masked", "cls", "not special", ... None = every position."""
    weight: Schedule = Schedule(value=1.0)
    gate: Gate = Gate()
    method: str | None = None
    """Method the term came from (for reports), e.g. ``tinybert.intermediate``."""
    span: Span


class Intervention(Frozen):
    """Runtime behaviour beyond signals and losses (Theseus replacement, DIITO interchange, ...)."""

    kind: str
    models: list[str]
    params: dict[str, Any] = Field(default_factory=dict)
    span: Span


# ---------------------------------------------------------------- stages and cluster


class OptimizerSpec(Frozen):
    name: Literal["adamw", "adam", "sgd", "lamb"] = "adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0


class LRScheduleSpec(Frozen):
    kind: Literal["constant", "linear", "cosine"] = "constant"
    warmup: float = 0.0
    """Warm-up as a fraction of the stage's steps."""
    min_lr: float = 0.0


class StageSpec(Frozen):
    name: str
    after: list[str] = Field(default_factory=list)
    data: str
    steps: int | None = None
    epochs: float | None = None
    batch: int = 32
    """Global batch size in sequences."""
    micro_batch: int | None = None
    """Forced micro-batch per rank; None lets the planner choose."""
    seq_len: int | None = None
    """Overrides the data source's seq_len."""
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: LRScheduleSpec = LRScheduleSpec()
    loss: list[LossTerm]
    interventions: list[Intervention] = Field(default_factory=list)
    students: list[str]
    """Models trained in this stage (usually one)."""
    teachers: list[str]
    """Models whose signals are read (frozen in this stage)."""
    activation_checkpointing: bool | None = None
    """Forced on/off; None lets the planner choose."""
    grad_accum_allowed: bool = True
    """False when a term forbids gradient accumulation (e.g. LRC-BERT gradient perturbation)."""
    eval_every: int | None = None
    save_every: int | None = None
    span: Span


class ClusterSpec(Frozen):
    nodes: int = 1
    gpus_per_node: int = 1
    gpu: str = "cpu"
    """Key into the planner's hardware catalog, e.g. ``A100-40GB``; ``cpu`` for CPU-only runs."""
    gpu_memory: int | None = None
    """Bytes per device; None = the catalog's figure."""
    cpu_memory: int | None = None
    """Bytes of host memory per node."""
    nvme: int | None = None
    """Bytes of NVMe per node available for offload; None = no NVMe offload."""
    precision: Literal["fp32", "bf16", "fp16"] | None = None
    """Training precision; None = bf16 on GPUs that support it, fp32 on CPU."""
    span: Span


class Spec(Frozen):
    schema_version: int = SCHEMA_VERSION
    file: str
    source_hash: str
    """sha256 of the spec text and every ``use``d library file."""
    models: dict[str, ModelSpec]
    data: dict[str, DataSpec]
    vocabs: dict[str, VocabSpec] = Field(default_factory=dict)
    stages: list[StageSpec]
    """In execution order (a topological order of ``after``)."""
    cluster: ClusterSpec
    uses: list[str] = Field(default_factory=list)
