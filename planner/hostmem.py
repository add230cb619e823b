"""Model + placement + training estimate -> host (CPU RAM) bytes per rank at the peak of each phase: loading the
models, training, writing the trained weights; and one node's worst phase (all its ranks).

The device-side estimate is ``planner.memory``; this module describes what the runtime holds on the host as
it builds, trains and saves (runtime/models.py, runtime/recipe.py), measured by bench/scale.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gkdlang.builtins import DTYPE_BYTES
from planner.hardware import Device
from planner.memory import (RUNTIME_OVERHEAD_CPU, ClusterShape, StageModels, kept_teacher_params, overhead_item)
from planner.params import ParamCounts
from planner.plan import HostMemory, MemoryItem, Placement, RankMemory


# ---------------------------------------------------------------- host memory per phase (load / train / save)
#
# What a rank's *host* holds as the runtime builds its models, trains and saves (runtime/models.py,
# runtime/recipe.py after issue 11). Measured against the process's peak resident memory by bench/scale.py.
#
# - load: a replicated model is built whole on the host (a teacher's file pages are mapped, a student is built in
#   fp32), then moved to the GPU; a model the plan shards is built partitioned (transformers under zero.Init),
#   each rank streaming only its partition's bytes from the safetensors files, so its host share is its
#   partition when the partitions live on the host (CPU runs, cpu_offload) and nothing otherwise; while a
#   partitioned model is built, one module at a time is whole (built, then initialised gathered on every rank).
# - train: the training estimate above (on a CPU run the device *is* the host) or the offloaded host items.
# - save: the model states stay alive while the stage's trained weights are gathered one tensor at a time; rank 0
#   also holds that tensor cast to fp32 while it writes it.

#: A partitioned model's build holds its largest module whole twice: the module built before zero.Init
#: partitions it, and the gathered copy transformers initialises (rank 0) and broadcasts.
BUILD_GATHER_COPIES = 2


@dataclass(frozen=True)
class HostPhase:
    """Host bytes one rank holds at the peak of one phase, itemised."""

    items: list[MemoryItem]

    @property
    def total(self) -> int:
        return sum(i.bytes for i in self.items)


def _largest_tensor(counts: ParamCounts) -> int:
    """Elements of the largest single tensor: the embedding / head matrix or a block's widest module."""
    return max(counts.largest_layer, counts.embeddings, counts.head)


def host_load_items(models: StageModels, cluster: ClusterShape, p: Placement) -> list[MemoryItem]:
    """Per-rank host bytes once every model of the stage is built (the load phase's peak)."""
    cpu, world = cluster.device.is_cpu, cluster.world
    items = [overhead_item(cluster.device) if cpu else MemoryItem(name="runtime", bytes=RUNTIME_OVERHEAD_CPU,
                                                                   device="cpu", note="host process")]
    transient = 0
    for m, c, cap in models.teachers:
        strategy = p.teacher_strategy.get(m.name, "replicated")
        d, kept = DTYPE_BYTES[m.dtype], kept_teacher_params(c, cap)
        if strategy == "replicated":
            items.append(MemoryItem(name=f"host.teacher:{m.name}", bytes=kept * d, device="cpu",
                                    note="whole on every rank's host while loaded (file pages)"))
        elif strategy in ("sharded", "cpu_offload"):
            on_host = cpu or strategy == "cpu_offload"
            items.append(MemoryItem(name=f"host.teacher:{m.name}", bytes=math.ceil(kept * d / world) if on_host else 0,
                                    device="cpu", note=f"ZeRO-3 partition of {world}, streamed from the files"))
            transient = max(transient, BUILD_GATHER_COPIES * _largest_tensor(c) * d)
        elif strategy == "nvme_offload":
            transient = max(transient, BUILD_GATHER_COPIES * _largest_tensor(c) * d)
        elif strategy == "tensor_parallel":  # runtime/tensor_parallel.py: local files read shard by shard
            t = p.teacher_tp.get(m.name, 1)
            streamed = m.source_kind == "local"  # else (hub id, random init) loaded whole, then split
            items.append(MemoryItem(name=f"host.teacher:{m.name}", bytes=math.ceil(kept * d / t) if streamed else
                                    kept * d, device="cpu", note=f"1/{t} of its blocks read from the files" if streamed
                                    else f"whole on every rank's host while loaded, then split 1/{t}"))
    for m, c, _ in models.students:
        # a compressed vocabulary is built at its kept rows, partitioned (a pretrained one streamed from its files)
        if p.zero_stage == 3:
            w = DTYPE_BYTES[p.precision]
            on_host = cpu or p.offload_params != "none"
            items.append(MemoryItem(name=f"host.student:{m.name}", bytes=math.ceil(c.total * w / world) if on_host else 0,
                                    device="cpu", note="ZeRO-3 partition, built partitioned"))
            transient = max(transient, BUILD_GATHER_COPIES * _largest_tensor(c) * w)
        else:
            items.append(MemoryItem(name=f"host.student:{m.name}", bytes=4 * c.total, device="cpu",
                                    note="fp32, built whole on every rank"))
    items.append(MemoryItem(name="host.build_gather", bytes=transient, device="cpu",
                            note=f"largest module of a partitioned model, x{BUILD_GATHER_COPIES}"))
    return items


def host_train_items(rank: RankMemory, device: Device) -> list[MemoryItem]:
    """Per-rank host bytes while training: the whole estimate on a CPU run, the host-side items otherwise."""
    if device.is_cpu:
        return list(rank.items)
    return [MemoryItem(name="runtime", bytes=RUNTIME_OVERHEAD_CPU, device="cpu", note="host process"),
            *[i for i in rank.items if i.device == "cpu"]]


_STEP_ITEMS = ("activations.", "logits.", "loss.", "signals.", "teacher:")


def _save_kept(train_items: list[MemoryItem]) -> list[MemoryItem]:
    """What stays alive while the weights are written: the model states, not the step's temporaries."""
    return [i for i in train_items if not i.name.startswith(_STEP_ITEMS) or i.name.endswith(".weights")]


def _save_gather_bytes(models: StageModels, rank_index: int) -> int:
    largest = max((_largest_tensor(c) for _, c, _ in models.students), default=0)
    return largest * DTYPE_BYTES["fp32"] * (2 if rank_index == 0 else 1)


def host_save_items(models: StageModels, rank: RankMemory, device: Device, rank_index: int) -> list[MemoryItem]:
    """Per-rank host bytes while a stage's trained weights are written: the model states (not the step's
    temporaries) plus one gathered tensor, and on rank 0 its fp32 copy being written."""
    return [*_save_kept(host_train_items(rank, device)),
            MemoryItem(name="host.save_gather", bytes=_save_gather_bytes(models, rank_index), device="cpu",
                       note="one tensor gathered" + (" + its fp32 copy written" if rank_index == 0 else ""))]


def host_phases(models: StageModels, cluster: ClusterShape, p: Placement, rank: RankMemory,
                rank_index: int = 0) -> dict[str, HostPhase]:
    """The three host phases of a student rank (``rank`` is its training estimate from ``estimate``)."""
    return {"load": HostPhase(host_load_items(models, cluster, p)),
            "train": HostPhase(host_train_items(rank, cluster.device)),
            "save": HostPhase(host_save_items(models, rank, cluster.device, rank_index))}


def _ranks(cluster: ClusterShape) -> list[int]:
    return [0, 1] if cluster.world > 1 else [0]


def _node_peak(rank_phases: list[dict[str, int]], gpus_per_node: int) -> int:
    """One node's worst phase: rank 0's phase plus the other ranks' (alike, so rank 1 stands for them)."""
    first, others = rank_phases[0], rank_phases[-1]
    return max(first[k] + (gpus_per_node - 1) * others[k] for k in first)


def host_memory(models: StageModels, cluster: ClusterShape, p: Placement,
                memory: list[RankMemory]) -> tuple[list[HostMemory], int]:
    """Host phases of rank 0 and (with more than one rank) of the others, and one node's peak (its ranks'
    phases summed, phase by phase; node-shared items are already split over the node's ranks)."""
    out = []
    for r in _ranks(cluster):
        phases = host_phases(models, cluster, p, memory[0], r)
        totals = {k: v.total for k, v in phases.items()}
        out.append(HostMemory(rank=r, phases=totals, peak=max(totals.values()),
                              items={k: v.items for k, v in phases.items()}))
    return out, _node_peak([h.phases for h in out], cluster.gpus_per_node)


def host_peaks(models: StageModels, cluster: ClusterShape, p: Placement, memory: list[RankMemory]) -> tuple[int, int]:
    """(peak host bytes of one rank, of one node): ``host_memory``'s figures without building its records, each
    phase computed once for all ranks (only the save phase's gathered tensor differs by rank). The placement
    search calls this once per candidate; tests/test_placement.py checks it equals ``host_memory``."""
    load = sum(i.bytes for i in host_load_items(models, cluster, p))
    train_items = host_train_items(memory[0], cluster.device)
    train = sum(i.bytes for i in train_items)
    kept = sum(i.bytes for i in _save_kept(train_items))
    phases = [{"load": load, "train": train, "save": kept + _save_gather_bytes(models, r)} for r in _ranks(cluster)]
    return max(max(ph.values()) for ph in phases), _node_peak(phases, cluster.gpus_per_node)
