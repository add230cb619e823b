"""DeepSpeed boundary: a model + optimizer + plan config -> engines, checkpoints, gathers, collectives.

This is the only module in gkdc that imports ``deepspeed``. Everything DeepSpeed raises is translated here
into a ``RunError`` that names the stage, so the recipe and the CLI never show a DeepSpeed traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from runtime.errors import RunError

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

import deepspeed  # noqa: E402  (the accelerator choice above must precede the import)
import deepspeed.comm as ds_comm  # noqa: E402

#: Config keys that would make DeepSpeed build its own optimizer / scheduler (op JIT builds, FusedAdam);
#: the recipe always passes torch instances, so these are dropped.
_CLIENT_OWNED_KEYS = ("optimizer", "scheduler")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_process() -> tuple[int, int]:
    """Set up this process for DeepSpeed and return ``(rank, world_size)``.

    A single process started without a launcher gets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* set, since without
    them DeepSpeed falls back to MPI discovery and fails on a missing mpi4py. On CPU the shared-memory
    all-reduce op is marked incompatible: otherwise the first ``initialize`` JIT-compiles it with g++ (~55 s)
    only to speed up collectives that gloo already does correctly.
    """
    _bounded_heap()
    launched = "RANK" in os.environ  # a launcher chose the port; a lone process picks its own
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # a lone process's free port can be taken by another process between probing and binding: try anew
    for attempt in range(1 if launched else 3):
        if ds_comm.is_initialized():
            break
        try:
            deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else None)
        except Exception as err:  # deepspeed/torch raise many kinds here
            if launched or "EADDRINUSE" not in str(err) or attempt == 2:
                raise RunError(f"could not start the distributed backend: {err}") from err
            os.environ["MASTER_PORT"] = str(_free_port())
    return ds_comm.get_rank(), ds_comm.get_world_size()


#: Host allocations at least this large get their own mapping (returned to the OS when freed).
MMAP_THRESHOLD = 1 << 20


def _bounded_heap() -> None:
    """Make glibc map every allocation of ``MMAP_THRESHOLD`` bytes or more on its own.

    Building a partitioned model interleaves long-lived partitions with short-lived gathered modules; with
    glibc's dynamic threshold (up to 32 MiB) both land in the heap and the freed gathers stay resident as
    fragmentation: measured on 2 CPU ranks with a 3 GB sharded teacher, peak RSS 4.6 / 4.0 GiB without this
    and 2.85 / 2.89 GiB with it (bench/scale.py). A no-op where glibc is not the allocator.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return
    try:
        ctypes.CDLL(name).mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def device() -> torch.device:
    """The device this rank computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _client_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _CLIENT_OWNED_KEYS}


def init_student(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: dict[str, Any],
    *,
    stage: str,
) -> Any:
    """Wrap the trainable module in a DeepSpeed engine with a client optimizer and LR scheduler."""
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=_client_config(config)
        )
    except Exception as err:
        raise RunError(f"stage '{stage}': DeepSpeed could not build the student engine: {err}") from err
    if engine.zero_optimization_stage() == 0 and ds_comm.get_world_size() == 1:
        # one rank without ZeRO: the "all-reduce" would only flatten, copy and unflatten every gradient
        engine.enable_backward_allreduce = False
    return engine


def init_teacher(module: nn.Module, config: dict[str, Any] | None, *, name: str, stage: str) -> nn.Module:
    """A frozen teacher: a plain replica, or a ZeRO inference engine when the plan gives it a config.

    The engine is returned as is (not its ``.module``): its forward gathers each ZeRO-3 partition through
    hooks the engine owns, so the engine must stay alive as long as the teacher is used.
    """
    module.eval().requires_grad_(False)
    if not config:
        return module.to(device())
    try:
        engine, _, _, _ = deepspeed.initialize(model=module, config=_client_config(config))
    except Exception as err:
        raise RunError(f"stage '{stage}': DeepSpeed could not build the engine of teacher '{name}': {err}") from err
    engine.eval()
    return engine


def release(engine: Any) -> None:
    """Free an engine's hooks and buffers at the end of its stage (the next stage builds its own)."""
    destroy = getattr(engine, "destroy", None)
    if callable(destroy):
        destroy()


def save_checkpoint(engine: Any, directory: Path, tag: str) -> None:
    """All ranks: write the engine's model, optimizer and scheduler state under ``directory/tag``."""
    try:
        engine.save_checkpoint(str(directory), tag=tag, save_latest=False)
    except Exception as err:
        raise RunError(f"could not write checkpoint '{directory / tag}': {err}") from err


def load_checkpoint(engine: Any, directory: Path, tag: str) -> None:
    """All ranks: restore model, optimizer and scheduler state from ``directory/tag``."""
    try:
        path, _ = engine.load_checkpoint(str(directory), tag=tag)
    except Exception as err:
        raise RunError(f"could not read checkpoint '{directory / tag}': {err}") from err
    if path is None:
        raise RunError(f"checkpoint '{directory / tag}' is missing or incomplete; resume cannot continue from it: "
                       "start the run again with another --out")


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[nn.Module]:
    """Full parameters of a possibly ZeRO-3-partitioned module on every rank, for the duration of the block."""
    params = list(module.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        yield module
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield module


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU fp32 copy of a module's full state (gathered first under ZeRO-3); the same on every rank."""
    with gathered(module):
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}


def barrier() -> None:
    if ds_comm.is_initialized() and ds_comm.get_world_size() > 1:
        ds_comm.barrier()


def all_true(flag: bool) -> bool:
    """True when ``flag`` holds on every rank (one tiny all-reduce; a no-op for one rank)."""
    if not ds_comm.is_initialized() or ds_comm.get_world_size() == 1:
        return flag
    value = torch.tensor([0.0 if flag else 1.0], device=device())
    ds_comm.all_reduce(value)
    return bool(value.item() == 0.0)


def autocast_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype floating inputs must have for the engine (DeepSpeed casts the parameters, not the inputs)."""
    if config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def _data_parallel_ranks() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_ranks_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the data-parallel ranks (``x`` itself for one rank)."""
    import torch.distributed as dist

    if _data_parallel_ranks() == 1:
        return x
    y = x.clone()
    dist.all_reduce(y)
    return y


def all_ranks_max(x: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``x`` over the data-parallel ranks (``x`` itself for one rank)."""
    import torch.distributed as dist

    if _data_parallel_ranks() == 1:
        return x
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y


def all_ranks_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over the data-parallel ranks (detached; ``x`` itself for one rank)."""
    world = _data_parallel_ranks()
    total = all_ranks_sum(x.detach())
    return total if world == 1 else total / world


# ---------------------------------------------------------------- models built into their ZeRO-3 partitions


def is_partitioned(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ZeRO-3 parameter (its full value exists only while gathered)."""
    return hasattr(tensor, "ds_id")


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape of a parameter as the model sees it (a partitioned one's ``data`` is an empty placeholder)."""
    return tuple(tensor.ds_shape) if is_partitioned(tensor) else tuple(tensor.shape)


@contextlib.contextmanager
def zero3_build(config: dict[str, Any]) -> Iterator[None]:
    """While the block runs, transformers builds models partitioned under ``config`` (ZeRO-3's ``zero.Init``).

    transformers reads the config through one process-wide weak reference (``HfDeepSpeedConfig``), so it holds
    for every model built meanwhile: build exactly one model inside (transformers #28106). The reference is
    dropped on exit, so later models (other configs, replicas) are built as usual.
    """
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    import torch._dynamo  # noqa: F401  (imported inside zero.Init it trips over the patched constructors)

    holder = HfDeepSpeedConfig(_client_config(config))
    try:
        yield
    finally:
        del holder
        unset_hf_deepspeed_config()


def _on_nvme(param: torch.Tensor) -> bool:
    ds = getattr(param, "ds_tensor", None)
    location = getattr(ds, "final_location", None)
    return ds is None or (location is not None and "nvme" in str(location).lower())


def load_partition(param: torch.Tensor, read_flat: Any, read_full: Any) -> None:
    """Fill this rank's part of a ZeRO-3 parameter: ``read_flat(start, out)`` reads only its own elements.

    NVMe-offloaded partitions are swapped out between uses, so they are filled through one gather instead
    (rank 0 reads the tensor; ZeRO re-partitions it on exit): one tensor at a time, as ZeRO's own gathers.
    """
    if not is_partitioned(param):
        with torch.no_grad():
            read_flat(0, param.data.view(-1))
        return
    if _on_nvme(param):
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if ds_comm.get_rank() == 0:
                with torch.no_grad():
                    param.data.copy_(read_full().view(param.ds_shape))
        return
    part = param.ds_tensor
    start = part.ds_numel * ds_comm.get_rank()
    with torch.no_grad():
        read_flat(start, part.data.view(-1))


def gathered_tensors(tensors: list[tuple[str, torch.Tensor]], dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor | None]]:
    """``(key, full value)`` one tensor at a time: gathered for ZeRO-3 parameters (all ranks must iterate
    together), ``None`` on ranks other than 0 so only rank 0 keeps anything beyond the one gather."""
    rank = ds_comm.get_rank() if ds_comm.is_initialized() else 0
    for key, tensor in tensors:
        if is_partitioned(tensor):
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                value = _cast(tensor.data, dtype).clone() if rank == 0 else None
        else:
            value = _cast(tensor.detach(), dtype) if rank == 0 else None
        yield key, value


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.to("cpu")
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


@contextlib.contextmanager
def gathered_pair(source: torch.Tensor, target: torch.Tensor) -> Iterator[bool]:
    """``source`` readable and ``target`` writable in full for the block (each gathered if ZeRO-3 partitions
    it); yields whether this rank writes (rank 0 for a partitioned target, whose value ZeRO then scatters)."""
    with contextlib.ExitStack() as stack:
        if is_partitioned(source):
            stack.enter_context(deepspeed.zero.GatheredParameters([source], modifier_rank=None))
        if is_partitioned(target):
            stack.enter_context(deepspeed.zero.GatheredParameters([target], modifier_rank=0))
            yield ds_comm.get_rank() == 0
        else:
            yield True


# ---------------------------------------------------------------- tensor-parallel groups (runtime/tensor_parallel.py)


def tp_group(size: int) -> tuple[Any, int, int]:
    """``(process group, this rank's index in it, size)`` of this rank's tensor-parallel group: ``size``
    consecutive ranks (the launcher numbers a node's ranks consecutively, so a group never spans nodes). Every
    rank creates every group, as torch.distributed requires."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    if size < 1 or world % size:
        raise RunError(f"a tensor-parallel degree of {size} does not divide the {world} ranks; re-run `gkdc plan`")
    mine = None
    for start in range(0, world, size):
        ranks = list(range(start, start + size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = (group, ranks.index(rank), size)
    assert mine is not None
    return mine


def group_all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``x`` in place over ``group`` (a row-parallel linear's partial outputs)."""
    import torch.distributed as dist

    dist.all_reduce(x, group=group)
    return x


def group_all_gather(x: torch.Tensor, group: Any, size: int) -> list[torch.Tensor]:
    """``x`` of every rank of ``group``, in rank order (equal shapes)."""
    import torch.distributed as dist

    out = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(out, x.contiguous(), group=group)
    return out
