"""The Plan: a complete, self-describing runtime artifact (pydantic, JSON), the planner's only output.

``gkdc run`` reads nothing but this. It embeds the checked Spec, so the runtime never re-parses the
language; it adds what the planner decided: signals to capture per model and stage, placement,
predicted memory per rank, DeepSpeed configs and the launch command.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gkdlang.spec import Spec

PLAN_SCHEMA_VERSION = 2


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CapturePoint(Frozen):
    """One signal the runtime must capture on one model: kind and block index."""

    kind: str
    layer: int | None = None


class ModelCapture(Frozen):
    """What one model computes in one stage."""

    model: str
    points: list[CapturePoint]
    stop_after_layer: int | None
    """Deepest block needed; the forward stops after it. None = run the whole model."""
    needs_head: bool
    """Whether the LM / task head must run (logits needed)."""
    eager_attention_layers: list[int] = Field(default_factory=list)
    """Blocks that must materialise attention probabilities (no fused kernel)."""
    fused_head: bool = False
    """The model's logits are never materialised: only chunked logit losses read them, so they take its final
    hidden states and output layer and form logits one chunk of rows at a time (runtime/chunked.py)."""


class MemoryItem(Frozen):
    name: str
    """e.g. ``student.params``, ``teacher:glm.weights``, ``activations``, ``logits.teacher``."""
    bytes: int
    device: Literal["gpu", "cpu", "nvme"] = "gpu"
    note: str = ""


class RankMemory(Frozen):
    rank: int
    items: list[MemoryItem]
    total_gpu: int
    total_cpu: int
    capacity_gpu: int
    headroom: float
    """1 - total_gpu / capacity_gpu."""


class HostMemory(Frozen):
    """Predicted host (CPU RAM) bytes of one rank at the peak of each phase: loading the stage's models,
    training, writing the trained weights (``planner.hostmem.host_phases``)."""

    rank: int
    """0, or 1 for every other rank (only rank 0 writes files)."""
    phases: dict[str, int]
    """``load`` / ``train`` / ``save`` -> bytes."""
    peak: int
    """The largest phase."""
    items: dict[str, list[MemoryItem]] = Field(default_factory=dict)
    """Each phase's items."""


class Placement(Frozen):
    teacher_strategy: dict[str, Literal["replicated", "sharded", "tensor_parallel", "cpu_offload", "nvme_offload",
                                        "separate", "offline"]]
    zero_stage: Literal[0, 1, 2, 3]
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_params: Literal["none", "cpu", "nvme"] = "none"
    micro_batch: int
    grad_accum: int
    activation_checkpointing: bool
    precision: Literal["fp32", "bf16", "fp16"]
    teacher_tp: dict[str, int] = Field(default_factory=dict)
    """Degree of each ``tensor_parallel`` teacher: the ranks of one node it is split over (planner.tensor_parallel)."""
    teacher_hpz: dict[str, int] = Field(default_factory=dict)
    """ZeRO++ hpZ secondary partition size of a ``sharded`` teacher (``zero_hpz_partition_size``: after its first
    forward each node keeps a copy sharded over its own ranks, so gathers stay inside the node); absent: none."""


class Candidate(Frozen):
    """A placement the search considered."""

    placement: Placement
    fits: bool
    peak_gpu: int
    step_time_s: float
    reason: str
    """Why it lost (or ``chosen``)."""


class TokensPerStep(Frozen):
    """What one optimizer step feeds the models, over all ranks (``planner.tokens``); the runtime logs the same."""

    packed: bool
    """Documents concatenated and cut into seq_len blocks (EOS between documents, no attention across them)."""
    why: str
    seq_len: int
    real: float
    """Real tokens per step: document tokens and EOS separators, no padding (expected value when padded)."""
    computed: float
    """Positions the models run per step, padding included (expected value when padded); the step time uses it."""
    source: str
    """How the figures were obtained (packed blocks, documents tokenised at plan time, or assumed full)."""


class HostCheck(Frozen):
    """Host memory of one node under the chosen placement, and what it was checked against."""

    per_node: int
    """Peak host bytes of all ranks of one node (on CPU runs host memory is the ranks' device memory)."""
    per_rank: int
    limit: int | None
    """``cluster.cpu_memory``; None: not given, so the figure was not checked (warning ``no-cpu-memory``)."""


class PinReport(Frozen):
    """A placement the spec pinned: what was pinned, that it fits, and what the planner would have picked."""

    pinned: list[str]
    """Pinned keys: ``zero``, ``offload_optimizer``, ``offload_params``, ``micro_batch``, ``checkpointing``,
    ``teacher <name>``."""
    planner_choice: Candidate
    """The placement the search picks with no pins."""
    verdict: str
    """One line: fits with what headroom, and how it compares with the planner's choice."""


class GenerationPlan(Frozen):
    """What the planner predicts for a stage that generates its batches (``generate:``)."""

    tokens_per_step: int
    """Generated tokens per optimizer step, all ranks (the batch's sequences x max_new_tokens, an upper bound)."""
    kv_cache_bytes: int
    """Peak KV-cache bytes per rank while the generating model samples one micro-batch."""
    generator: str
    """The model that generates on on-policy steps (the student) and, with seq_kd, on the others (the teacher)."""
    time_split: dict[str, float] = Field(default_factory=dict)
    """Predicted seconds per optimizer step: ``generation``, ``teacher`` (scoring), ``training``."""


class StagePlan(Frozen):
    name: str
    captures: list[ModelCapture]
    placement: Placement
    memory: list[RankMemory]
    """Predicted memory per rank (ranks with identical figures may be listed once with rank=0)."""
    step_time_s: float
    step_time_parts: dict[str, float] = Field(default_factory=dict)
    total_steps: int
    alternatives: list[Candidate] = Field(default_factory=list)
    deepspeed_config: dict[str, Any]
    """Config passed to ``deepspeed.initialize`` for the student."""
    teacher_configs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """DeepSpeed config per teacher that runs as an engine (sharded / offloaded); empty for plain replicas."""
    host: list[HostMemory] = Field(default_factory=list)
    """Predicted host memory per rank and phase (rank 0, then the other ranks)."""
    host_node_peak: int = 0
    """Predicted host bytes of one node at its worst phase (all its ranks together)."""
    tokens: TokensPerStep | None = None
    """Packing and the real tokens per step; None in plans written before gkdc planned them (padded data)."""
    host_check: HostCheck | None = None
    """The host figure the placement search checked against ``cpu_memory`` (the worst phase of ``host``)."""
    pin: PinReport | None = None
    """Set when the spec pins part of the placement."""
    generation: GenerationPlan | None = None
    """Set for a stage that generates its batches (``generate:`` in the spec)."""


class ResolvedModel(Frozen):
    name: str
    role: str
    family: str
    parameters: int
    """Exact parameter count of the model as built."""
    trainable_parameters: int


class Plan(Frozen):
    plan_schema_version: int = PLAN_SCHEMA_VERSION
    gkdc_version: str
    spec_hash: str
    spec_file: str
    spec: Spec
    models: list[ResolvedModel]
    stages: list[StagePlan]
    world_size: int
    launch: list[str]
    """argv of the launch command (``deepspeed --num_gpus N ...`` or in-process ``gkdc run``)."""
    hostfile: str | None = None
    notes: list[str] = Field(default_factory=list)
    integrity: str = ""
    """sha256 of every other field (``plan_digest``), set by the planner; ``gkdc run`` refuses a plan whose
    content no longer matches it (an edited plan), so what runs is what ``gkdc plan`` decided."""


def plan_digest(plan: Plan) -> str:
    """sha256 of the plan's canonical JSON (sorted keys, no whitespace), its ``integrity`` field left out."""
    import hashlib
    import json

    body = plan.model_dump(mode="json", exclude={"integrity"})
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed(plan: Plan) -> Plan:
    """``plan`` with its integrity digest set."""
    return plan.model_copy(update={"integrity": plan_digest(plan)})
