"""What generation costs a stage that generates its batches (``generate: on_policy(...)``): memory and time.

Memory, per rank, in the generation phase (before the teacher scores and the student trains; nothing of the
step's signals or activations is alive yet):

- ``generation.kv_cache``: ``2 x layers x kv_heads x head_dim x (prompt_len + max_new_tokens) x micro_batch x
  bytes`` of the generating model's compute dtype (keys and values of every block for the longest sequence);
- ``generation.gathered_weights`` (ZeRO-3 students): the student's weights gathered whole for sampling (the
  DeepSpeed engine's parameters, ``GatheredParameters``), beyond the rank's own shard: ``(1 - 1/world) x
  params x bytes``;
- ``generation.logits``: the last position's logits, fp32, and their sampling copy: ``2 x micro x vocab x 4``.

With ``seq_kd`` and ``lambda < 1`` the teacher generates on the other steps: its phase is priced the same way
and the larger of the two sets the peak.

Time per optimizer step (``grad_accum`` micro-batches of ``micro`` prompts each):

- prefill: a forward over the prompts, ``2 x N x micro x prompt_len`` FLOPs (+ attention) at the dtype's peak
  times the cost model's efficiency;
- decode, per generated token ``t`` (1..max_new_tokens): bandwidth-bound: the weights are read once per
  micro-batch and the cache so far (``prompt_len + t`` positions) once, ``(weight_bytes + kv_bytes(t)) /
  hbm_bw``, versus ``2 x N x micro`` FLOPs at the dtype's peak: the larger of the two;
- a step generates with the student with probability ``lambda`` and, with ``seq_kd``, with the teacher
  otherwise: the expected seconds are ``lambda x student + (1 - lambda) x teacher``;
- ZeRO-3: one all-gather of the student's weights per generating micro-batch (priced by planner.cost).

The teacher's scoring forward over the generated tokens and the training are the stage's ``compute_teacher``
and the other parts, run at ``prompt_len + max_new_tokens`` positions (an upper bound: generations stop early
at a stop string or EOS).
"""

from __future__ import annotations

from dataclasses import dataclass

from gkdlang.arch import ArchInfo
from gkdlang.builtins import DTYPE_BYTES
from gkdlang.spec import Spec, StageSpec
from planner.hardware import Device
from planner.plan import MemoryItem

#: Fraction of peak FLOP/s reached (the cost model's EFFICIENCY, repeated so cost.py stays the importer).
EFFICIENCY = 0.45


@dataclass(frozen=True)
class Generator:
    """One model that samples in the stage: its shape, parameters and the dtype it runs in."""

    name: str
    arch: ArchInfo
    params: int
    dtype: str | None
    """None: the student, which generates in the placement's training precision."""
    share: float
    """Expected fraction of optimizer steps on which it generates (lambda, or 1 - lambda for the teacher)."""
    student: bool


@dataclass(frozen=True)
class GenerationShape:
    """A generating stage's settings the planner prices (from ``StageSpec.generate``)."""

    prompt_len: int
    max_new_tokens: int
    generators: tuple[Generator, ...]

    @property
    def seq_len(self) -> int:
        """Longest generated sequence: prompt plus every new token."""
        return self.prompt_len + self.max_new_tokens


def prompt_len(spec: Spec, stage: StageSpec) -> int:
    """Prompt positions: the prompts' data ``seq_len`` (the stage's own when the prompts are its data)."""
    g = stage.generate
    if g.prompts == stage.data and stage.seq_len:
        return stage.seq_len
    return spec.data[g.prompts].seq_len


def stage_seq(spec: Spec, stage: StageSpec) -> int:
    """Positions a stage's models run per sequence: its data's, or a generated sequence's when longer."""
    seq = stage.seq_len or spec.data[stage.data].seq_len
    if stage.generate is None:
        return seq
    return max(seq, prompt_len(spec, stage) + stage.generate.max_new_tokens)


def generated_lengths(spec: Spec, stage: StageSpec, lengths):
    """A generating stage's sequences at their longest, for the step time (``planner.tokens.Lengths``): each
    prompt, cut to ``prompt_len`` as the runtime cuts it, plus ``max_new_tokens``. A prompt's length is taken as
    its document's token count (for chat data the whole rendered conversation, its answer included: an upper
    bound on the prompt). None when the prompts are not the stage's data or their lengths are not known at plan
    time (the stage is then priced at ``prompt_len + max_new_tokens`` per sequence)."""
    from planner.tokens import Lengths

    g = stage.generate
    if g is None or lengths is None or not lengths.counts or g.prompts != stage.data:
        return None
    cut = prompt_len(spec, stage)
    return Lengths([min(n, cut) + g.max_new_tokens for n in lengths.counts], lengths.total_docs)


def shape_of(spec: Spec, stage: StageSpec, params: dict[str, int]) -> GenerationShape | None:
    """The stage's generators with their parameters (``params``: model -> total parameters)."""
    g = stage.generate
    if g is None or not stage.students:
        return None
    student = spec.models[stage.students[0]]
    gens = [Generator(student.name, student.arch, params.get(student.name, 0), None, g.lmbda, True)]
    live = [t for t in stage.teachers if spec.models[t].cache is None and t in params]
    if g.seq_kd and g.lmbda < 1 and live:
        t = spec.models[live[0]]
        gens.append(Generator(t.name, t.arch, params[t.name], t.dtype, 1 - g.lmbda, False))
    return GenerationShape(prompt_len(spec, stage), g.max_new_tokens, tuple(gens))


def kv_bytes_per_position(arch: ArchInfo, dtype_bytes: int) -> int:
    """Keys and values of every block for one position of one sequence."""
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * dtype_bytes


def kv_cache_bytes(arch: ArchInfo, dtype: str, positions: int, micro: int) -> int:
    """``2 x layers x kv_heads x head_dim x positions x micro x bytes``."""
    return kv_bytes_per_position(arch, DTYPE_BYTES[dtype]) * positions * micro


def phase_items(shape: GenerationShape, micro: int, zero_stage: int, world: int, precision: str) -> list[MemoryItem]:
    """The generation phase's items of the generator that needs the most memory (module docstring)."""
    best: list[MemoryItem] = []
    for gen in shape.generators:
        dtype = gen.dtype or precision
        items = [MemoryItem(name=f"generation.kv_cache:{gen.name}",
                            bytes=kv_cache_bytes(gen.arch, dtype, shape.seq_len, micro),
                            note=f"{shape.prompt_len} prompt + {shape.max_new_tokens} new positions x {micro}"),
                 MemoryItem(name=f"generation.logits:{gen.name}", bytes=2 * micro * gen.arch.vocab_size * 4,
                            note="last position's fp32 logits and their sampling copy")]
        if gen.student and zero_stage == 3 and world > 1:
            items.append(MemoryItem(name=f"generation.gathered_weights:{gen.name}",
                                    bytes=int(gen.params * DTYPE_BYTES[dtype] * (1 - 1 / world)),
                                    note="ZeRO-3 student gathered whole to sample"))
        if sum(i.bytes for i in items) > sum(i.bytes for i in best):
            best = items
    return best


def kv_cache_peak(shape: GenerationShape, micro: int, precision: str) -> int:
    """The largest KV cache one generator holds for one micro-batch (GenerationPlan.kv_cache_bytes)."""
    return max(kv_cache_bytes(g.arch, g.dtype or precision, shape.seq_len, micro) for g in shape.generators)


def _peak(device: Device, dtype: str) -> float:
    return device.flops.get(dtype) or device.flops["fp32"]


def micro_batch_seconds(gen: Generator, prompt: int, new: int, micro: int, device: Device, dtype: str) -> float:
    """Prefill plus decode of one micro-batch by one generator in ``dtype`` (module docstring)."""
    rate = _peak(device, dtype) * EFFICIENCY
    width = gen.arch.num_heads * gen.arch.head_dim
    prefill = (2 * gen.params + 4 * gen.arch.num_layers * prompt * width) * micro * prompt / rate
    weights = gen.params * DTYPE_BYTES[dtype]
    per_pos = kv_bytes_per_position(gen.arch, DTYPE_BYTES[dtype]) * micro
    flops_token = 2 * gen.params * micro / rate
    decode = 0.0
    for t in range(1, new + 1):
        decode += max((weights + per_pos * (prompt + t)) / device.hbm_bw, flops_token)
    return prefill + decode


def step_seconds(shape: GenerationShape, micro: int, grad_accum: int, device: Device, precision: str) -> float:
    """Expected generation seconds of one optimizer step on one rank (every generator by its share)."""
    return grad_accum * sum(g.share * micro_batch_seconds(g, shape.prompt_len, shape.max_new_tokens, micro, device,
                                                          g.dtype or precision) for g in shape.generators)


def student_share(shape: GenerationShape) -> float:
    """Fraction of steps on which the (ZeRO-3) student gathers its weights to generate."""
    return sum(g.share for g in shape.generators if g.student)


def generator_label(shape: GenerationShape) -> str:
    """``small`` or ``small (on-policy), smol (seq_kd)``."""
    if len(shape.generators) == 1:
        return shape.generators[0].name
    return ", ".join(f"{g.name} ({'on-policy' if g.student else 'seq_kd'})" for g in shape.generators)


def time_split(parts: dict[str, float]) -> dict[str, float]:
    """A step's parts as generation / teacher (scoring forward and cache reads) / training (everything else)."""
    gen = parts.get("generation", 0.0)
    teacher = parts.get("compute_teacher", 0.0) + parts.get("cache_read", 0.0)
    return {"generation": gen, "teacher": teacher, "training": sum(parts.values()) - gen - teacher}
