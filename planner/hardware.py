"""Device name -> Device: memory, peak FLOP/s per dtype and bandwidths of the accelerators gkdc plans for.

``lookup`` / ``suggest`` / ``cluster_device`` answer None for unknown names (the checker reports
``unknown-gpu`` itself); ``require`` / ``device_for`` raise ``HardwareError`` with a did-you-mean instead.
Figures are vendors' datasheet numbers (dense, no sparsity); bandwidths per GPU and per direction: ``link_bw``
inside a node (NVLink 3: 300 GB/s a direction on A100 SXM, NVLink 4: 450 GB/s on H100 / H200 SXM; PCIe peers
25 GB/s), ``inter_bw`` to other nodes (the GPU's own InfiniBand or Ethernet adapter, see the field), latencies
per ring step (``INTRA_NODE_LATENCY_S`` / ``INTER_NODE_LATENCY_S``). Memory is the usable device memory in bytes as
``torch.cuda.get_device_properties().total_memory`` reports it (what the allocator can reach), not the
marketing figure. ``cpu`` describes a CPU-only rank (the test suite and laptops).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gkdlang.diagnostics import closest
from gkdlang.spec import ClusterSpec

GiB = 2**30

#: Per ring step latency of a collective inside a node (NVLink / NVSwitch): nccl-tests' small-message all-reduce
#: on 8 x A100 or H100 SXM takes ~15-20 us over 2 x 7 ring steps, so ~1-2 us a step plus launch; 3 us charged.
INTRA_NODE_LATENCY_S = 3e-6
#: Per ring step latency across nodes over InfiniBand: ~5-8 us a hop in nccl-tests across 2-4 DGX nodes
#: (RDMA verbs + proxy thread); 8 us charged.
INTER_NODE_LATENCY_S = 8e-6


class HardwareError(ValueError):
    """An unknown ``cluster.gpu`` (the message lists the catalog and a did-you-mean)."""


@dataclass(frozen=True)
class Device:
    name: str
    memory: int
    """Usable bytes per device."""
    flops: dict[str, float]
    """Peak dense FLOP/s per compute dtype: fp32, bf16, fp16 (bf16 absent where unsupported)."""
    hbm_bw: float
    """Device memory bandwidth, bytes/s."""
    link_bw: float
    """Per-device bandwidth to the other devices of its node (NVLink or PCIe peer), bytes/s, one direction."""
    pcie_bw: float
    """Host <-> device bandwidth, bytes/s, one direction (offload traffic)."""
    context: int
    """Memory the runtime takes before any tensor: CUDA context, cuBLAS/NCCL workspaces."""
    aliases: tuple[str, ...] = ()
    nvme_bw: float = 3e9
    """NVMe read/write bandwidth per node for NVMe offload, bytes/s."""
    inter_bw: float = 25e9
    """Per-device bandwidth to other nodes, bytes/s, one direction: the device's own NIC (DGX A100: one 200 Gb/s
    HDR InfiniBand adapter per GPU = 25 GB/s; DGX H100 / H200: one 400 Gb/s NDR adapter per GPU = 50 GB/s;
    PCIe cards in cloud nodes: a 100 Gb/s Ethernet share, 12.5 GB/s)."""
    intra_latency: float = INTRA_NODE_LATENCY_S
    inter_latency: float = INTER_NODE_LATENCY_S

    def supports(self, dtype: str) -> bool:
        return dtype in self.flops

    @property
    def is_cpu(self) -> bool:
        return self.name == "cpu"

    @property
    def key(self) -> str:
        return self.name


CATALOG: dict[str, Device] = {d.name: d for d in (
    Device("A100-40GB", int(39.39 * GiB), {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
           1.555e12, 300e9, 25e9, int(1.0 * GiB), ("a100", "a100-40g", "a100-sxm4-40gb")),
    Device("A100-80GB", int(79.15 * GiB), {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
           2.039e12, 300e9, 25e9, int(1.0 * GiB), ("a100-80g", "a100-sxm4-80gb")),
    Device("H100-80GB", int(79.1 * GiB), {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12},
           3.35e12, 450e9, 55e9, int(1.2 * GiB), ("h100", "h100-sxm", "h100-80g"), inter_bw=50e9),
    Device("H200", int(139.8 * GiB), {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12},
           4.8e12, 450e9, 55e9, int(1.2 * GiB), ("h200-141gb", "h200-sxm"), inter_bw=50e9),
    Device("L4", int(22.0 * GiB), {"fp32": 30.3e12, "bf16": 121e12, "fp16": 121e12},
           300e9, 25e9, 25e9, int(0.8 * GiB), ("l4-24gb",), inter_bw=12.5e9),
    Device("A10G", int(22.0 * GiB), {"fp32": 31.2e12, "bf16": 70e12, "fp16": 70e12},
           600e9, 25e9, 25e9, int(0.8 * GiB), ("a10g-24gb", "a10"), inter_bw=12.5e9),
    Device("V100-32GB", int(31.7 * GiB), {"fp32": 15.7e12, "fp16": 125e12},
           900e9, 150e9, 12e9, int(0.8 * GiB), ("v100", "v100-32g"), inter_bw=12.5e9),
    Device("RTX-4090", int(23.6 * GiB), {"fp32": 82.6e12, "bf16": 165e12, "fp16": 165e12},
           1.008e12, 25e9, 25e9, int(0.8 * GiB), ("4090", "rtx4090"), inter_bw=12.5e9),
    # A CPU rank: ranks of a node share host memory; FLOP/s of a few cores with AVX2 in fp32; nodes over
    # 10 Gb/s Ethernet (gloo over TCP: ~30 us a hop).
    Device("cpu", 16 * GiB, {"fp32": 2e11, "bf16": 1e11}, 20e9, 10e9, 20e9, int(0.3 * GiB), ("CPU",),
           inter_bw=1.25e9, intra_latency=10e-6, inter_latency=30e-6),
)}


def lookup(name: str) -> Device | None:
    key = name.strip().lower()
    for dev in CATALOG.values():
        if key == dev.name.lower() or key in (a.lower() for a in dev.aliases):
            return dev
    return None


def suggest(name: str) -> str | None:
    names = [d.name for d in CATALOG.values()] + [a for d in CATALOG.values() for a in d.aliases]
    match = closest(name, names, cutoff=0.5)
    return lookup(match).name if match else None


def cluster_device(cluster: ClusterSpec) -> Device | None:
    """The cluster's device with its memory figures applied (gpu_memory override; cpu memory shared by ranks)."""
    dev = lookup(cluster.gpu)
    if dev is None:
        return None
    if cluster.gpu_memory is not None:
        dev = replace(dev, memory=cluster.gpu_memory)
    elif dev.name == "cpu" and cluster.cpu_memory is not None:
        dev = replace(dev, memory=cluster.cpu_memory // cluster.gpus_per_node)
    return dev


def precision(cluster: ClusterSpec, dev: Device) -> str:
    """Training precision: the cluster's choice, else bf16 where supported, fp16 on pre-Ampere, fp32 on CPU."""
    if cluster.precision is not None:
        return cluster.precision
    if dev.name == "cpu":
        return "fp32"
    return "bf16" if dev.supports("bf16") else "fp16"


def require(name: str) -> Device:
    """The catalog entry, or HardwareError naming ``cluster.gpu`` with the known keys and a did-you-mean."""
    dev = lookup(name)
    if dev is not None:
        return dev
    guess = suggest(name)
    hint = f"; did you mean '{guess}'?" if guess else ""
    raise HardwareError(f"cluster.gpu: unknown GPU '{name}' (known: {', '.join(CATALOG)}){hint}")


def device_for(cluster: ClusterSpec) -> Device:
    """``cluster_device`` that raises HardwareError for an unknown ``cluster.gpu``."""
    require(cluster.gpu)
    dev = cluster_device(cluster)
    assert dev is not None
    return dev


training_precision = precision
