"""FLOPs and bytes moved -> predicted seconds per optimizer step, with the parts named.

Per optimizer step on one rank (``tokens`` = micro_batch * seq_len * grad_accum):

- ``compute_student``: 6 * N * tokens (forward + backward of every trainable parameter; a LoRA student:
  (4 * N_own + 6 * N_adapter) * tokens, no weight gradients for its frozen weights) plus the attention
  score terms 12 * L * s * (H * head_dim) * tokens, at the training precision's peak times ``EFFICIENCY``;
- ``recompute``: one more forward (2 * N * tokens + 4 * L * s * H * d * tokens) with activation checkpointing;
- ``compute_teacher``: 2 * N_run * tokens (+ attention 4 * L_run * s * H * d * tokens) over the blocks a
  teacher actually runs (up to ``stop_after_layer``, head only when needed), at the teacher dtype's peak;
- ``zero_comm``: gradient all-reduce (ZeRO-0/1, once per step), gradient reduce-scatter (ZeRO-2/3, every
  micro-batch), parameter all-gathers (ZeRO-3: forward and backward of every micro-batch; a sharded teacher:
  its forward, inside the node with an hpZ secondary partition), a tensor-parallel teacher's two all-reduces per
  block inside its node; each priced hierarchically by ``planner.collectives`` (NVLink inside a node, each
  GPU's own InfiniBand adapter across nodes, a latency per ring step and call);
- ``cache_read`` (offline teachers): the step's cached signals (``planner.offline.bytes_per_token``) read at
  the node's NVMe bandwidth; an offline teacher's ``compute_teacher`` is its one pass over the data spread over
  the stage's epochs (online cost / epochs);
- ``latency``: a fixed ``PER_BLOCK_LATENCY_S`` per block and pass of every micro-batch (kernel launches);
- ``generation`` (stages with ``generate:``, planner.generation): prefill and bandwidth- or FLOP-bound decode of
  the prompts by the student (``lambda`` of the steps) and, with ``seq_kd``, the teacher (the rest); a ZeRO-3
  student's weights gathered once per generating micro-batch;
- ``offload``: 16-bit gradients down and weights up over PCIe, the host Adam step (``CPU_ADAM_PARAMS_PER_S``),
  offloaded weights fetched every forward/backward, NVMe traffic at the node's NVMe bandwidth shared by its
  ranks.

Communication is not assumed to overlap with compute: a conservative figure that ranks placements correctly
(those that move more bytes are slower), not a promise about wall-clock time.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

from planner import generation as G
from planner import tensor_parallel as TP
from planner.collectives import Topology, all_gather, all_reduce, reduce_scatter
from planner.hardware import Device
from planner.memory import DTYPE_BYTES, StageModels, teacher_needed_params, zero_buckets
from planner.plan import Placement

#: Fraction of peak FLOP/s that transformer training reaches (typical model-FLOPs utilisation).
EFFICIENCY = 0.45
#: Seconds of kernel-launch and Python latency per block per pass (~20 kernels x 5 us): what makes many small
#: micro-batches slower than few large ones at equal FLOPs.
PER_BLOCK_LATENCY_S = 1e-4
#: Parameters per second a host Adam step updates on one rank (DeepSpeed's CPU Adam with AVX, a few cores).
CPU_ADAM_PARAMS_PER_S = 1e9


@dataclass(frozen=True)
class StepCost:
    total: float
    parts: dict[str, float]


def _attn_flops_per_token(layers: int, seq: int, width: int) -> float:
    # QK^T and (softmax)V: 2 matmuls of 2*s*width FLOPs per token per layer
    return 4.0 * layers * seq * width


def _peak(device: Device, dtype: str) -> float:
    return device.flops.get(dtype) or device.flops["fp32"]


def step_cost(models: StageModels, p: Placement, device: Device, world: int, gpus_per_node: int) -> StepCost:
    """Predicted seconds per optimizer step for one placement (see the module docstring)."""
    seq = models.step_seq(p.micro_batch)  # seq_len, or the expected padded width of unpacked data
    tokens = p.micro_batch * seq * p.grad_accum
    rate = _peak(device, p.precision) * EFFICIENCY
    n, run = models.trainable, models.trainable + models.frozen  # frozen: LoRA students' own weights
    attn = sum(_attn_flops_per_token(m.arch.num_layers, seq, m.arch.num_heads * m.arch.head_dim)
               for m, _, _ in models.students)
    parts = {"compute_student": (4 * run + 2 * n + 3 * attn) * tokens / rate,
             "recompute": (2 * run + attn) * tokens / rate if p.activation_checkpointing else 0.0,
             "compute_teacher": _teacher_compute(models, p, device, tokens, seq)}
    parts["zero_comm"] = _zero_comm(models, p, Topology.of(device, world, gpus_per_node))
    parts["offload"] = _offload(models, p, device, world, gpus_per_node)
    parts["latency"] = _latency(models, p)
    parts["cache_read"] = _cache_read(models, p, device, tokens)
    if models.generation is not None:
        parts["generation"] = _generation(models, p, device, Topology.of(device, world, gpus_per_node))
    return StepCost(total=sum(parts.values()), parts=parts)


def _generation(models: StageModels, p: Placement, device: Device, topo: Topology) -> float:
    """Sampling of a generating stage (planner.generation), and a ZeRO-3 student's weights gathered for it once
    per generating micro-batch."""
    shape = models.generation
    seconds = G.step_seconds(shape, p.micro_batch, p.grad_accum, device, p.precision)
    if p.zero_stage == 3 and topo.ranks > 1:
        blocks = sum(m.arch.num_layers for m, _, _ in models.students)
        seconds += G.student_share(shape) * p.grad_accum * all_gather(
            models.trainable * DTYPE_BYTES[p.precision], topo, blocks)
    return seconds


def _latency(models: StageModels, p: Placement) -> float:
    student = sum(m.arch.num_layers for m, _, _ in models.students) * (3 + p.activation_checkpointing)
    teacher = sum(m.arch.num_layers if c.stop_after_layer is None else c.stop_after_layer + 1
                  for m, _, c in models.teachers if p.teacher_strategy.get(m.name) != "offline")
    return p.grad_accum * (student + teacher) * PER_BLOCK_LATENCY_S


def _teacher_compute(models: StageModels, p: Placement, device: Device, tokens: float, seq: float) -> float:
    total = 0.0
    for m, counts, cap in models.teachers:
        # an offline teacher runs once over the data (building its cache), not once per epoch
        share = 1.0 / max(models.epochs, 1.0) if p.teacher_strategy.get(m.name) == "offline" else 1.0
        blocks = m.arch.num_layers if cap.stop_after_layer is None else cap.stop_after_layer + 1
        flops = 2 * teacher_needed_params(counts, cap, m.arch)
        flops += _attn_flops_per_token(blocks, seq, m.arch.num_heads * m.arch.head_dim)
        total += share * flops * tokens / (_peak(device, m.dtype) * EFFICIENCY)
    return total


def _cache_read(models: StageModels, p: Placement, device: Device, tokens: int) -> float:
    from planner.offline import bytes_per_example, bytes_per_token

    seconds = 0.0
    for m, _, cap in models.teachers:
        if p.teacher_strategy.get(m.name) == "offline" and m.cache is not None:
            nbytes = tokens * bytes_per_token(m, cap) + p.micro_batch * p.grad_accum * bytes_per_example(m, cap)
            seconds += nbytes / device.nvme_bw
    return seconds


def _zero_comm(models: StageModels, p: Placement, topo: Topology) -> float:
    """ZeRO's gradient and weight collectives, and the teachers' gathers or all-reduces, hierarchically priced
    (``planner.collectives``): one collective per bucket (gradients) or per block (weights)."""
    if topo.ranks <= 1:
        return 0.0
    w = DTYPE_BYTES[p.precision]
    grads = models.trainable * w
    buckets = max(1, math.ceil(models.trainable / zero_buckets().reduce))
    blocks = sum(m.arch.num_layers for m, _, _ in models.students)
    if p.zero_stage <= 1:
        seconds = all_reduce(grads, topo, buckets)  # one all-reduce per optimizer step
    else:
        seconds = p.grad_accum * reduce_scatter(grads, topo, buckets)  # reduce-scatter every micro-batch
        seconds += all_gather(grads, topo, buckets) if p.zero_stage == 2 else 0.0  # updated weights gathered
    if p.zero_stage == 3:
        seconds += p.grad_accum * 2 * all_gather(grads, topo, blocks)  # weights gathered for forward and backward
    seq = models.step_seq(p.micro_batch)
    for m, counts, cap in models.teachers:
        strategy = p.teacher_strategy.get(m.name)
        if strategy == "tensor_parallel":
            seconds += p.grad_accum * TP.comm_seconds(m, cap, p.micro_batch, seq, p.teacher_tp[m.name], topo)
        elif strategy in ("sharded", "cpu_offload", "nvme_offload"):
            needed = teacher_needed_params(counts, cap, m.arch) * DTYPE_BYTES[m.dtype]
            hpz = p.teacher_hpz.get(m.name, 1)
            group = topo.within_node(hpz) if hpz > 1 else topo  # hpZ: from the node's secondary partition
            seconds += p.grad_accum * all_gather(needed, group, TP.blocks_run(m, cap))
    return seconds


def _offload(models: StageModels, p: Placement, device: Device, world: int, gpn: int) -> float:
    w = DTYPE_BYTES[p.precision]
    shard = models.trainable / max(world, 1)
    seconds = 0.0
    if p.offload_optimizer != "none":
        seconds += 2 * shard * w / device.pcie_bw + shard / CPU_ADAM_PARAMS_PER_S
        if p.offload_optimizer == "nvme":
            seconds += 2 * shard * 16 / (device.nvme_bw / gpn)  # fp32 master + Adam read and written back
    if p.offload_params != "none":
        link = device.pcie_bw if p.offload_params == "cpu" else min(device.pcie_bw, device.nvme_bw / gpn)
        seconds += p.grad_accum * 2 * shard * w / link
    for m, counts, cap in models.teachers:
        strategy = p.teacher_strategy.get(m.name)
        if strategy in ("cpu_offload", "nvme_offload"):
            needed = teacher_needed_params(counts, cap, m.arch) * DTYPE_BYTES[m.dtype] / max(world, 1)
            link = device.pcie_bw if strategy == "cpu_offload" else min(device.pcie_bw, device.nvme_bw / gpn)
            seconds += p.grad_accum * needed / link
    return seconds
