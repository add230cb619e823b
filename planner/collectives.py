"""Seconds of one collective over a two-level cluster: ``g`` devices per node on NVLink, ``n`` nodes on InfiniBand.

A collective over ``W = n g`` ranks runs hierarchically (what NCCL's rings and trees reach with one network
adapter per GPU, and what DeepSpeed's groups make explicit): ranks first exchange inside their node, then the
``g`` ranks of a node each carry ``1/g`` of the data across nodes over their own adapter. For ``S`` bytes (the
full tensor: what every rank holds after an all-gather, or before a reduce-scatter):

    all_gather(S)     = (g-1)/g * S / B_intra + (n-1)/n * S / (g B_inter) + (g-1) a_intra + (n-1) a_inter
    reduce_scatter(S) = all_gather(S)
    all_reduce(S)     = 2 all_gather(S)        (reduce-scatter then all-gather)

``B_intra`` is the device's ``link_bw``, ``B_inter`` its ``inter_bw`` (one adapter per GPU), ``a`` the per-step
latencies; ``calls`` multiplies the latency terms (one collective per bucket or per block). On one node the
formula is the flat ring ``(g-1)/g * S / B_intra`` the planner always used; a group confined to a node (``hpZ``
secondary partitions, tensor-parallel groups) pays only the first and third terms. A flat ring over all ranks
bottlenecked by the inter-node link, the model before, is ``(W-1)/W * S / B_inter``: 8 x more for 2 nodes of 8.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.hardware import Device


@dataclass(frozen=True)
class Topology:
    """The ranks a collective spans: ``per_node`` devices on each of ``nodes`` nodes."""

    device: Device
    per_node: int
    nodes: int = 1

    @property
    def ranks(self) -> int:
        return self.per_node * self.nodes

    @staticmethod
    def of(device: Device, world: int, gpus_per_node: int) -> "Topology":
        """The whole cluster of ``world`` ranks, ``gpus_per_node`` to a node."""
        gpn = max(1, min(gpus_per_node, world))
        return Topology(device, gpn, max(1, -(-world // gpn)))

    def within_node(self, size: int) -> "Topology":
        """A group of ``size`` ranks on one node (hpZ secondary partition, tensor-parallel group)."""
        return Topology(self.device, max(1, min(size, self.per_node)), 1)


def all_gather(nbytes: float, topo: Topology, calls: int = 1) -> float:
    """Seconds to gather ``nbytes`` (the full tensor) on every rank of ``topo`` (see the module docstring)."""
    g, n, dev = topo.per_node, topo.nodes, topo.device
    if g * n <= 1 or nbytes <= 0:
        return 0.0
    seconds = (g - 1) / g * nbytes / dev.link_bw + (n - 1) / n * nbytes / (g * dev.inter_bw)
    return seconds + calls * ((g - 1) * dev.intra_latency + (n - 1) * dev.inter_latency)


def reduce_scatter(nbytes: float, topo: Topology, calls: int = 1) -> float:
    return all_gather(nbytes, topo, calls)


def all_reduce(nbytes: float, topo: Topology, calls: int = 1) -> float:
    return 2 * all_gather(nbytes, topo, calls)


def flat_ring(nbytes: float, device: Device, world: int, gpus_per_node: int) -> float:
    """The model before: one ring over every rank at the slowest link (for the comparison in docs/cost-model.md)."""
    if world <= 1:
        return 0.0
    bw = device.link_bw if world <= gpus_per_node else min(device.link_bw, device.inter_bw)
    return (world - 1) / world * nbytes / bw
