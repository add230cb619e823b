"""The checked Spec: what a .gkd file means, resolved against real architectures (pydantic, frozen).

Produced by ``gkdlang.lower`` from the AST; consumed by the planner. Every object keeps the source span
of the construct it came from so later phases can still point at the user's line. Method calls are
inlined and layer maps expanded here: a stage's loss is a flat list of weighted terms, each comparing
one target node with one prediction node.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, model_serializer

from gkdlang.arch import ArchInfo

SCHEMA_VERSION = 2


from gkdlang.spec_base import Frozen, Schedule, Span, _omit_defaults  # noqa: F401  (re-exported)


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


class LoraSpec(Frozen):
    """A LoRA adapter on a student (``adapter: lora(...)``, peft): its own weights stay frozen, low-rank updates
    ``B @ A`` (scaled by ``alpha / r``) of the ``targets`` modules of every block are trained."""

    kind: Literal["lora"] = "lora"
    r: int = 8
    """Rank of each update."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by ``alpha / r`` (peft's ``lora_alpha``)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (peft's ``lora_dropout``)."""
    targets: list[str]
    """Module names (gkdlang.lora.LINEARS of the family); the family's peft default when the spec gives none."""
    params: int
    """Trainable parameters of the adapter (gkdlang.lora.adapter_params): what the planner prices."""


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
    adapter: LoraSpec | None = None
    """A LoRA student (``adapter: lora(...)``): only the adapter trains; None = every weight trains."""
    span: Span


# ---------------------------------------------------------------- data


class DataSpec(Frozen):
    name: str
    format: Literal["text", "jsonl", "json", "parquet", "csv", "chat"]
    """``chat``: JSONL conversations rendered with the student tokenizer's chat template (runtime/chat.py)."""
    paths: list[str]
    """Glob patterns, relative to the spec file's directory unless absolute."""
    text: str = "text"
    """Column holding the text (jsonl/json/parquet/csv)."""
    pair: str | None = None
    """Second text column for sentence-pair tasks."""
    label: str | None = None
    """Label column; None for unlabelled corpora."""
    messages: str = "messages"
    """Chat data: the column holding each row's list of ``{role, content}`` turns."""
    assistant_only: bool = True
    """Chat data: every per-token loss reads only the positions that predict an assistant token (False: all)."""
    seq_len: int = 512
    split: float | None = None
    """Fraction held out for evaluation, if any."""
    packing: bool | None = None
    """Concatenate documents and cut them into ``seq_len`` blocks; None: the planner decides per stage
    (``planner.tokens.packing_choice``: packed where every model is causal and every signal is per token)."""
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
    """A transform of its inputs; one subclass per op (the ``op`` field tells them apart in JSON).

    Adding a transform: a subclass here (its fields are its arguments, each with its default), the lowering
    function in ``gkdlang/lower/transforms.py``, the kernel in ``runtime/lossgraph.py`` (see docs/internals.md).
    """

    node: Literal["op"] = "op"
    op: str
    inputs: list["Node"]
    module: str | None = None
    """Key of the learned module owning this op's parameters (``project``); shared ops share a key."""

    transform: ClassVar[str | None] = None
    """The language's transform that lowers to this op (None: an op the checker inserts)."""
    options: ClassVar[dict[str, str]] = {}
    """The transform's keyword options -> kind of value (read by the checker through builtins.TRANSFORMS)."""


class Project(OpNode):
    """A learned linear map (one module per ``module`` key; ``shared: false`` gives each layer its own)."""

    op: Literal["project"] = "project"
    dim_in: int
    dim_out: int | None = None
    """None until the loss it feeds fixes it (the other side's width)."""
    bias: bool = True
    """False: a map without bias (GKD's Universal-KD and LRC-BERT maps)."""

    def param_count(self) -> int:
        """Weights (and bias) of the linear map (0 while ``dim_out`` is open)."""
        if self.dim_out is None:
            return 0
        return self.dim_in * self.dim_out + (self.dim_out if self.bias else 0)

    transform: ClassVar[str | None] = "project"
    options: ClassVar[dict[str, str]] = {"to": "model", "dim": "int", "shared": "bool", "bias": "bool"}

    @model_serializer(mode="wrap")
    def _drop_default_bias(self, handler):
        return _omit_defaults(handler(self), {"bias": True})


class Relation(OpNode):
    """Scaled dot products of each position with every other, per head (MiniLM): ``[b, heads, s, s]``."""

    op: Literal["relation"] = "relation"
    heads: int
    softmax: bool = True
    """False: the raw scaled scores (compared as logits)."""
    padded: bool = False
    """True: padded positions take part like real ones (GKD's MiniLM / MiniLMv2: no mask on the relations)."""

    transform: ClassVar[str | None] = "relation"
    options: ClassVar[dict[str, str]] = {"heads": "int", "softmax": "bool", "padded": "bool"}

    @model_serializer(mode="wrap")
    def _drop_default_padded(self, handler):
        return _omit_defaults(handler(self), {"padded": False})


class Pool(OpNode):
    """One vector per example: the mean over real positions, position 0 (``cls``), the maximum, or the mean over
    every position, padded ones included (``mean_all``: GKD's RAIL-KD)."""

    op: Literal["pool"] = "pool"
    how: Literal["mean", "cls", "max", "mean_all"] = "mean"

    transform: ClassVar[str | None] = "pool"
    options: ClassVar[dict[str, str]] = {"how": "symbol"}


class Normalize(OpNode):
    """L2-normalised along the feature dim."""

    op: Literal["normalize"] = "normalize"

    transform: ClassVar[str | None] = "normalize"
    options: ClassVar[dict[str, str]] = {}


class ZeroPad(OpNode):
    """Its input with every padded position set to 0 (GKD multiplies its states by the pad mask: DistilBERT)."""

    op: Literal["zero_pad"] = "zero_pad"

    transform: ClassVar[str | None] = "zero_pad"
    options: ClassVar[dict[str, str]] = {}


class SelectVocab(OpNode):
    """Teacher logits reduced to the rows a vocab block keeps (GLMD)."""

    op: Literal["select_vocab"] = "select_vocab"
    vocab: str
    """Name of the vocab block whose kept rows are selected."""

    transform: ClassVar[str | None] = "select"
    options: ClassVar[dict[str, str]] = {"vocab": "name"}


class Choose(OpNode):
    """Item ``index`` of ``k`` inputs drawn at random per ``every`` period (RAIL-KD); one draw per ``group``."""

    op: Literal["choose"] = "choose"
    group: str
    k: int
    index: int
    every: Literal["step", "epoch"] = "epoch"
    order: Literal["ascending"] = "ascending"
    """The drawn indices are sorted, so a layered pairing keeps the depth order."""


class Attend(OpNode):
    """ALP-KD: input 0 (the student query) attends over inputs 1.. (teacher layers)."""

    op: Literal["attend"] = "attend"

    transform: ClassVar[str | None] = "attend"
    options: ClassVar[dict[str, str]] = {}


class Anneal(OpNode):
    """Annealing-KD's target ``phi * x``."""

    op: Literal["anneal"] = "anneal"
    phi: Schedule

    transform: ClassVar[str | None] = "anneal"
    options: ClassVar[dict[str, str]] = {"phi": "schedule"}


class Concat(OpNode):
    """The inputs concatenated along the feature dim."""

    op: Literal["concat"] = "concat"

    transform: ClassVar[str | None] = "concat"
    options: ClassVar[dict[str, str]] = {}


class Mean(OpNode):
    """The element-wise mean of the inputs."""

    op: Literal["mean"] = "mean"

    transform: ClassVar[str | None] = "mean"
    options: ClassVar[dict[str, str]] = {}


class Stack(OpNode):
    """The inputs stacked on a new axis ``[b, s, n, h]`` (CKD's relations over layers)."""

    op: Literal["stack"] = "stack"
    axis: int = -2

    transform: ClassVar[str | None] = "stack"
    options: ClassVar[dict[str, str]] = {}


class Spans(OpNode):
    """Mean-pooled random contiguous spans of positions (MGSKD's span level)."""

    op: Literal["spans"] = "spans"
    max_fraction: float = 0.4
    """Longest span as a fraction of the real length."""
    pool: Literal["mean"] = "mean"
    segmentation: Literal["drawn once per step, shared by every spans() op of the stage"] = (
        "drawn once per step, shared by every spans() op of the stage")

    transform: ClassVar[str | None] = "spans"
    options: ClassVar[dict[str, str]] = {"max": "fraction"}


class Interchanged(OpNode):
    """Its input read from the counterfactual pass of interchange ``intervention`` (DIITO)."""

    op: Literal["interchanged"] = "interchanged"
    intervention: str


#: every op a Spec can hold: the transforms in the order the docs list them, then the ops the checker inserts
OP_TYPES: tuple[type[OpNode], ...] = (Project, Relation, Pool, Normalize, SelectVocab, Concat, Mean, Attend, Anneal,
                                      Stack, Spans, ZeroPad, Choose, Interchanged)
Op = Annotated[Union[OP_TYPES], Field(discriminator="op")]
Node = Annotated[Union[SignalNode, Op], Field(discriminator="node")]
for _op in (OpNode, *OP_TYPES):
    _op.model_rebuild()


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
    average: Literal["kept", "all_positions"] = "kept"
    """How a masked term averages: over the positions its mask keeps, or (``all_positions``, GKD's convention)
    over every position, the masked-out ones counting 0: the kept mean times kept / all positions."""
    weight: Schedule = Schedule(value=1.0)
    gate: Gate = Gate()
    method: str | None = None
    """Method the term came from (for reports), e.g. ``tinybert.intermediate``."""
    span: Span


# ---------------------------------------------------------------- interventions


class Intervention(Frozen):
    """Runtime behaviour beyond signals and losses; one subclass per ``kind`` (the field tells them apart).

    Each subclass declares the construct's language options (``options``: keyword -> kind of value, read by
    the checker through ``gkdlang.builtins.INTERVENTIONS``), its defaults (its fields'), and the fields the
    runtime component is built from (``runtime/interventions.py``). Fields typed as one-value ``Literal``s
    state a fixed behaviour of the runtime in the plan, for its readers.
    """

    kind: str
    models: list[str]
    """Models the intervention runs or reads (the planner builds them)."""
    span: Span

    options: ClassVar[dict[str, str]] = {}
    rewrites_forward: ClassVar[bool] = False
    """Changes how the student's forward/backward pass runs; two of these cannot share a stage."""
    doc: ClassVar[str] = ""


class ReplaceLayers(Intervention):
    kind: Literal["replace_layers"] = "replace_layers"
    teacher: str
    student: str
    groups: list[list[int]]
    """groups[j]: the teacher blocks student block j stands for."""
    p: Schedule
    """Probability that a student block keeps its place, per step."""
    every: Literal["step"] = "step"
    draw: Literal["per student block"] = "per student block"
    teacher_frozen: Literal[True] = True
    teacher_forward: Literal[False] = False
    meaning: str = ("each step, student block j replaces teacher blocks groups[j] with probability p (else the "
                    "frozen teacher blocks run in its place); embeddings and head are the student's")

    options: ClassVar[dict[str, str]] = {"p": "schedule"}
    rewrites_forward: ClassVar[bool] = True
    doc: ClassVar[str] = "Theseus module replacement: teacher block groups swapped for student blocks"


class Interchange(Intervention):
    kind: Literal["interchange"] = "interchange"
    id: str
    teacher: str
    student: str
    layers: list[list[int]]
    """Aligned [student block, teacher block] pairs; one is drawn per step."""
    layer_choice: Literal["one pair at random per step"] = "one pair at random per step"
    fraction: float = 0.3
    """Share of each example's real positions whose states are swapped."""
    way: Literal["consecutive", "random", "masked"] = "consecutive"
    source: Literal["next example in the batch (roll by one)"] = "next example in the batch (roll by one)"
    positions: Literal["same", "independent"] = "same"
    """``same``: a position takes the source's state at the same position (round(fraction x n) real positions);
    ``independent`` (DIITO's authors' code, GKD's): int(fraction x the shorter of the two examples' lengths)
    positions, the span's start in the example and in the source drawn independently (way: consecutive)."""
    blocks: Literal["aligned", "group"] = "aligned"
    """``aligned``: the teacher's aligned block only; ``group`` (GKD's): every teacher block mapped to the student
    block, from the block after the previous pair's teacher block up to the aligned one."""
    meaning: str = ("a second forward of both models in which the states of `fraction` of the token positions "
                    "(contiguous when way is consecutive) at an aligned layer pair [student, teacher] are "
                    "replaced by the source example's; ops 'interchanged' read that pass")

    options: ClassVar[dict[str, str]] = {"fraction": "fraction", "map": "map", "way": "symbol", "positions": "symbol",
                                         "blocks": "symbol"}

    @model_serializer(mode="wrap")
    def _drop_default_reading(self, handler):
        return _omit_defaults(handler(self), {"positions": "same", "blocks": "aligned"})
    rewrites_forward: ClassVar[bool] = True
    doc: ClassVar[str] = "DIITO interchange intervention: a second pass with swapped token-span states"


class Perturb(Intervention):
    kind: Literal["perturb"] = "perturb"
    model: str
    on: Literal["embeddings"] = "embeddings"
    eps: float = 1e-5
    direction: Literal["gradient"] = "gradient"
    norm: Literal["batch", "token"] = "batch"
    """What the gradient's L2 norm is taken over: the whole micro-batch, or each position (GKD)."""
    passes: Literal[2] = 2
    first_pass_grads: Literal["discarded"] = "discarded"
    grad_accumulation: Literal[False] = False
    meaning: str = ("pass 1 computes the stage loss and its gradient g w.r.t. the embedding output e; pass 2 "
                    "recomputes every term with e + eps * g / ||g|| (norm: batch, the L2 norm of the whole "
                    "micro-batch's g; norm: token, of each position's g, as GKD's F.normalize(g, dim=-1)); a "
                    "non-finite g perturbs nothing; only pass 2's gradients update the weights")

    options: ClassVar[dict[str, str]] = {"eps": "number", "norm": "symbol"}
    rewrites_forward: ClassVar[bool] = True
    doc: ClassVar[str] = "LRC-BERT gradient perturbation of the student's embeddings: two passes per step"


class Drop(Intervention):
    kind: Literal["drop"] = "drop"
    group: str
    p: float = 0.25
    every: Literal["step"] = "step"
    min_kept: int = 1
    """When every drop group of the stage is drawn, this many (drawn) are kept (``0``: every group may drop at
    once, GKD's DGKD; a stage's drop groups share one draw, so the runtime takes their largest value)."""
    meaning: str = ("each step the group's terms are left out together with probability p, independently of "
                    "other drop groups; if every drop group of the stage is dropped, one drawn at random is kept")

    options: ClassVar[dict[str, str]] = {"p": "fraction", "per": "symbol", "min_kept": "int"}
    doc: ClassVar[str] = ("DGKD: each group of terms dropped with probability p per step (per: teacher, one group "
                          "per teacher)")


class Unit(Frozen):
    """One teacher's terms (its sampling group) in weigh / select_teacher."""

    group: str
    teacher: str


class Weigh(Intervention):
    kind: Literal["weigh"] = "weigh"
    group: str
    by: Literal["teacher_ce", "student_entropy"]
    hard: bool = False
    units: list[Unit]
    """Units listed from the smallest to the largest teacher."""
    needs_labels: bool = False
    student: str | None = None
    """by: student_entropy: the student whose prediction entropy weighs the units."""
    min_micro_batch: int = 1
    entropy_of: Literal["task_logits", "logits"] | None = None
    weight: str
    """How a unit's per-example weight is computed, in words."""

    options: ClassVar[dict[str, str]] = {"by": "symbol", "hard": "bool"}
    doc: ClassVar[str] = "per-teacher weights from teacher CE (MT-BERT) or student entropy (Uncertainty)"


class SelectTeacher(Intervention):
    kind: Literal["select_teacher"] = "select_teacher"
    group: str
    policy: Literal["reinforce", "glmkd"] = "reinforce"
    """``glmkd``: GKD's agent (one step late, pi instead of log pi, no baseline; runtime/rl_agent.py)."""
    units: list[Unit]
    state_model: str | None = None
    """Model whose [CLS] state the agent reads; None: the student."""
    state: list[str]
    action: Literal["keep or skip each unit per example (Bernoulli per teacher)"] = (
        "keep or skip each unit per example (Bernoulli per teacher)")
    reward: Literal["ce", "ce_kl"] = "ce"
    reward_meaning: str
    baseline: Literal["running mean of the reward", "none"] = "running mean of the reward"
    lr: float | None = None
    """The agent's learning rate; None: the stage's."""
    agent: Literal["two-layer MLP owned by the student wrapper",
                   "sigmoid of two summed linear maps owned by the student wrapper"] = (
        "two-layer MLP owned by the student wrapper")

    options: ClassVar[dict[str, str]] = {"policy": "symbol", "state": "model", "reward": "symbol", "lr": "number"}
    doc: ClassVar[str] = "RL-KD: a REINFORCE agent picks the teachers of each example"


class LRWindow(Frozen):
    start: float
    until: float
    layer: int


class ProgressiveLR(Intervention):
    """progressive(..., below_lr: f): lowered by the ``progressive`` combinator, not a construct of its own."""

    kind: Literal["progressive_lr"] = "progressive_lr"
    model: str
    below_lr: float
    windows: list[LRWindow]
    meaning: str = ("during each window only `layer` trains at the full learning rate; blocks below it train "
                    "at below_lr times it (0: frozen)")


class Plateau(Intervention):
    """progressive(..., until: plateau(...)): lowered by the ``progressive`` combinator."""

    kind: Literal["plateau"] = "plateau"
    id: str
    groups: list[str]
    then: str | None = None
    exclusive: bool = False
    patience: int = 3
    window: int = 10
    min_delta: float = 0.0
    on: str | None = None
    """The loss function whose terms are watched; None: every term of the group."""
    deadlines: list[float] | None = None
    meaning: str = ("group 0 is unlocked first; after every `window` optimizer steps the mean (over the window, "
                    "and over data-parallel ranks) of the unweighted values of the current group's watched terms "
                    "(`on`, or all of them) is compared with its best so far: an improvement of more than "
                    "min_delta resets the count, anything else adds one; after `patience` windows without "
                    "improvement the next group unlocks (previous ones stay on unless exclusive). After the last "
                    "group plateaus the progressive terms stop and the `then` group starts. deadlines[i]: the "
                    "progress at which unlock i+1 happens at the latest (None: none)")

    options: ClassVar[dict[str, str]] = {"patience": "int", "min_delta": "number", "window": "int", "on": "symbol"}
    """The options of the trigger ``plateau(...)`` (``builtins.TRIGGERS``)."""


#: the constructs a user writes (``weigh(...)``, ...), in the order the docs list them
INTERVENTION_CONSTRUCTS: tuple[type[Intervention], ...] = (ReplaceLayers, Interchange, Perturb, Drop, Weigh,
                                                          SelectTeacher)
#: every intervention a Spec can hold: the constructs, then those the ``progressive`` combinator lowers to
INTERVENTION_TYPES: tuple[type[Intervention], ...] = (*INTERVENTION_CONSTRUCTS, ProgressiveLR, Plateau)
AnyIntervention = Annotated[Union[INTERVENTION_TYPES], Field(discriminator="kind")]


# ---------------------------------------------------------------- stages and cluster


class OptimizerSpec(Frozen):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0


class LRScheduleSpec(Frozen):
    kind: Literal["constant", "linear", "cosine"] = "constant"
    warmup: float = 0.0
    """Warm-up as a fraction of the stage's steps."""
    min_lr: float = 0.0


TeacherStrategy = Literal["replicated", "sharded", "tensor_parallel", "cpu_offload", "nvme_offload", "offline"]
"""How a teacher is placed: a whole copy per rank, ZeRO-3 shards, shards offloaded to host memory or NVMe, or
read from its cache (``offline``). The planner's ``separate`` (teachers on their own ranks) is not run, so not here."""


class PlacementPin(Frozen):
    """The placement choices a spec pins (``placement [stage] { ... }``); None leaves a choice to the planner.

    ``micro_batch`` and ``activation_checkpointing`` are pinned through the stage's fields of the same names
    (so every check that reads them sees the pin); their spans are kept here with the others.
    """

    zero_stage: Literal[0, 1, 2, 3] | None = None
    offload_optimizer: Literal["none", "cpu", "nvme"] | None = None
    offload_params: Literal["none", "cpu", "nvme"] | None = None
    teachers: dict[str, TeacherStrategy] = Field(default_factory=dict)
    spans: dict[str, Span] = Field(default_factory=dict)
    """Where each pinned key was written: ``zero``, ``offload_optimizer``, ``offload_params``, ``micro_batch``,
    ``checkpointing`` or ``teacher <name>``."""
    span: Span


class KeepBest(Frozen):
    """``keep_best: <metric>``: the student's weights at its best held-out evaluation are kept (saved beside the
    final ones as ``models/<name>-best``); the stage still hands its last weights on."""

    metric: Literal["loss", "perplexity", "accuracy", "distill"]
    """``loss``: the student's own held-out loss (next-token / masked-LM cross-entropy, or the classifier's
    cross-entropy on labels); ``perplexity``: exp of the LM loss; ``accuracy``: a classifier's; ``distill``: the
    stage's distillation loss on held-out data."""
    mode: Literal["min", "max"]
    """``max`` for accuracy, ``min`` otherwise (derived from the metric)."""
    span: Span

    options: ClassVar[tuple[str, ...]] = ("loss", "perplexity", "accuracy", "distill")


class GenerateSpec(Frozen):
    """``generate: on_policy(...)``: the stage trains on sequences generated during the run (Agarwal et al. 2024;
    TRL's GKD trainer): with probability ``lmbda`` per optimizer step the student samples continuations of the
    stage's prompts and the loss reads only the generated tokens; otherwise the batch is the prompt data itself
    (teacher-forced), or, with ``seq_kd``, continuations the teacher generates (sequence-level KD)."""

    prompts: str
    """Name of the data source whose examples are the prompts (chat data: the conversation up to the last
    assistant turn; text data: each example)."""
    lmbda: float = 1.0
    """Fraction of optimizer steps whose batch the student generates (1: always on-policy; 0: never)."""
    seq_kd: bool = False
    """On the other steps, the teacher generates the continuations (sequence-level KD) instead of the data's."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k cut."""
    stop: list[str] = Field(default_factory=list)
    """Strings that end a generation besides the tokenizer's EOS token."""
    span: Span


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
    interventions: list[AnyIntervention] = Field(default_factory=list)
    students: list[str]
    """Models trained in this stage (usually one)."""
    teachers: list[str]
    """Models whose signals are read (frozen in this stage)."""
    activation_checkpointing: bool | None = None
    """Forced on/off; None lets the planner choose."""
    grad_accum_allowed: bool = True
    """False when a term forbids gradient accumulation (e.g. LRC-BERT gradient perturbation)."""
    eval_every: int | None = None
    """Optimizer steps between held-out evaluations (the stage's data needs a ``split``); a stage whose data has
    a split is also evaluated at its end."""
    keep_best: KeepBest | None = None
    save_every: int | None = None
    pin: PlacementPin | None = None
    """Placement choices the spec pins for this stage; None: the planner chooses everything."""
    generate: GenerateSpec | None = None
    """On-policy / sequence-level generation for this stage's batches; None: batches come from ``data``."""
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
    overrides: list[str] = Field(default_factory=list, exclude_if=lambda v: not v)
    """``--set PATH=VALUE`` texts applied to the spec's text, in order (gkdlang.overrides); part of ``source_hash``.
    Left out of the JSON when empty, so a spec without overrides serialises (and seals) as before."""
