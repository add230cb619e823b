"""Placement -> DeepSpeed config dicts: the student engine's, and a ZeRO-3 inference engine's per offloaded teacher.

The configs carry no ``optimizer`` or ``scheduler`` section: the runtime passes a torch optimizer and LR
scheduler instance to ``deepspeed.initialize``. A DeepSpeed optimizer section would make DeepSpeed build its
own (FusedAdam / CPU Adam are JIT-compiled C++/CUDA ops, ~1-2 minutes on first use and unavailable without a
compiler) and would put a second source of truth for learning rates beside the Spec. For the same reason an
offloaded optimizer sets ``zero_force_ds_cpu_optimizer: false``, so DeepSpeed accepts the torch optimizer.

Bucket and ZeRO-3 sizes come from ``planner.memory`` (``zero_buckets``), so the memory the planner charges
and the buffers DeepSpeed allocates are the same numbers.
"""

from __future__ import annotations

from typing import Any

from gkdlang.spec import ModelSpec, StageSpec
from planner.memory import teacher_window_params, zero_buckets
from planner.params import count_params_for
from planner.plan import Placement

#: Never print DeepSpeed's own step logs: the runtime writes metrics itself.
QUIET_STEPS = 10**9
GRADIENT_CLIPPING = 1.0
#: Where NVMe offload swaps (the launcher's working directory unless the user edits the plan).
NVME_PATH = "/local_nvme"
#: Teacher engines run no backward: which placements need a ZeRO-3 inference engine, and where weights live.
TEACHER_OFFLOAD = {"sharded": "none", "cpu_offload": "cpu", "nvme_offload": "nvme"}


def precision_section(precision: str) -> dict[str, Any]:
    if precision == "bf16":
        return {"bf16": {"enabled": True}}
    if precision == "fp16":
        # dynamic loss scaling (loss_scale 0) starting at 2^16, halving after 2 overflowing steps
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 2,
                         "min_loss_scale": 1}}
    return {}


def _offload(device: str) -> dict[str, Any]:
    section: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        section["nvme_path"] = NVME_PATH
    return section


def zero_section(stage: int, offload_optimizer: str, offload_params: str, world: int,
                 persistence: int | None = None) -> dict[str, Any]:
    b = zero_buckets()
    zero: dict[str, Any] = {"stage": stage}
    if stage in (1, 2):
        zero |= {"reduce_bucket_size": b.reduce, "allgather_bucket_size": b.allgather,
                 "overlap_comm": world > 1, "contiguous_gradients": True, "reduce_scatter": True}
    if stage == 3:
        zero |= {"reduce_bucket_size": b.reduce, "overlap_comm": world > 1, "contiguous_gradients": True,
                 "stage3_prefetch_bucket_size": b.prefetch, "stage3_max_live_parameters": b.max_live,
                 "stage3_max_reuse_distance": b.max_live,
                 "stage3_param_persistence_threshold": b.persistence if persistence is None else persistence,
                 "stage3_gather_16bit_weights_on_model_save": True}
    if offload_optimizer != "none" and stage >= 1:
        zero["offload_optimizer"] = _offload(offload_optimizer)
    if offload_params != "none" and stage == 3:
        zero["offload_param"] = _offload(offload_params)
    return zero


def student_ds_config(placement: Placement, stage: StageSpec, world: int) -> dict[str, Any]:
    """The config for the student engine of one stage (``train_batch_size`` = micro * accum * ranks)."""
    p = placement
    dp = world
    cfg: dict[str, Any] = {
        "train_batch_size": p.micro_batch * p.grad_accum * dp,
        "train_micro_batch_size_per_gpu": p.micro_batch,
        "gradient_accumulation_steps": p.grad_accum,
        "gradient_clipping": GRADIENT_CLIPPING,
        "steps_per_print": QUIET_STEPS,
        "wall_clock_breakdown": False,
        **precision_section(p.precision),
        "zero_optimization": zero_section(p.zero_stage, p.offload_optimizer, p.offload_params, dp),
    }
    if p.offload_optimizer != "none":
        cfg["zero_force_ds_cpu_optimizer"] = False  # the runtime's optimizer is a torch instance
    if p.activation_checkpointing:
        # the runtime checkpoints through transformers' gradient_checkpointing_enable (torch.utils.checkpoint);
        # this section only configures deepspeed.checkpointing, kept plain so both agree: no partitioning
        cfg["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": False,
                                           "contiguous_memory_optimization": False, "synchronize_checkpoint_boundary": False}
    return cfg


def teacher_ds_config(placement: Placement, model: ModelSpec, world: int) -> dict[str, Any] | None:
    """A ZeRO-3 inference config for a sharded / offloaded teacher; None for replicas (plain modules).

    ``stage3_param_persistence_threshold`` is 0 so every parameter is partitioned, however small (with the
    default 1e5, small models would stay whole on every rank and "sharded" would save nothing).
    """
    strategy = placement.teacher_strategy.get(model.name, "replicated")
    if strategy not in TEACHER_OFFLOAD:
        return None
    zero = zero_section(3, "none", TEACHER_OFFLOAD[strategy], world, persistence=0)
    # a forward-only engine: keep at most the planner's window gathered (DeepSpeed's defaults, 1e9 live
    # parameters and reuse distance, kept a whole 1.5B teacher gathered from the second forward on: measured)
    counts = count_params_for(model.arch, model.head.kind, model.head.num_labels or 2)
    zero |= {"stage3_max_live_parameters": teacher_window_params(counts), "stage3_max_reuse_distance": 0,
             "stage3_prefetch_bucket_size": counts.per_layer}
    hpz = placement.teacher_hpz.get(model.name, 1)
    if hpz > 1:  # ZeRO++ hpZ: a secondary partition over the node's ranks, kept (a frozen teacher never steps)
        zero["zero_hpz_partition_size"] = hpz
    return {
        "train_batch_size": placement.micro_batch * world,
        "train_micro_batch_size_per_gpu": placement.micro_batch,
        "gradient_accumulation_steps": 1,
        "steps_per_print": QUIET_STEPS,
        "wall_clock_breakdown": False,
        **precision_section(model.dtype),
        "zero_optimization": zero,
    }
