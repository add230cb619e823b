"""A frozen Llama-family teacher split over ``t`` ranks of one node (Megatron's layout; the plan's ``tensor_parallel``).

Per block, the query/key/value and the gate/up projections are split by output features (each rank computes its
own heads and its own slice of the FFN), the attention output and down projections by input features, their
partial outputs summed over the group (``engine.group_all_reduce``: two all-reduces per block, as
``planner/tensor_parallel.py`` prices them). Embeddings, norms, rotary tables and the head stay whole, so every
rank of the group holds the full residual stream and the full logits. transformers' Llama attention infers the
head count from the projection's width (``view(..., -1, head_dim)``), so the split attention runs unchanged.

A teacher with local safetensors weights is built straight into its shards (``build_teacher``): its modules are
created on the meta device, split, allocated, and each rank reads only its own rows (column-parallel) or its own
slice of every row (row-parallel) of each weight from the files (``runtime/weights.py``), so no rank holds the
whole teacher at any time. Other teachers (hub ids, random weights) are loaded whole and then split (``shard``).

The ranks of a group have different micro-batches (data parallelism for the student): ``capture`` calls
``gather_inputs`` so the group runs the union of their batches (each padded on the right to the longest), and
``own_rows`` to keep each rank's own rows of every captured signal.

Our own split rather than DeepSpeed AutoTP: the capture hooks must keep finding the model's own block and
projection modules (AutoTP's ``init_inference`` replaces them with its kernels' modules), and a 1e-5 parity with
the replica is checked on CPU with gloo (tests/test_tensor_parallel.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from runtime import engine as eng
from runtime.errors import RunError

COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW = ("self_attn.o_proj", "mlp.down_proj")
#: signals whose two last dimensions are positions (b x H x s x s)
SQUARE_KINDS = frozenset({"attn_scores", "attn_probs"})


class ColumnParallel(nn.Module):
    """Rows ``[r n/t, (r+1) n/t)`` of a linear's weight (and bias): this rank's output features."""

    def __init__(self, linear: nn.Linear, rank: int, size: int) -> None:
        super().__init__()
        out = linear.out_features // size
        self.weight = nn.Parameter(linear.weight.detach()[rank * out:(rank + 1) * out].clone(), requires_grad=False)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach()[rank * out:(rank + 1) * out].clone(),
                                                           requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallel(nn.Module):
    """Columns ``[r n/t, (r+1) n/t)`` of a linear's weight: partial outputs summed over the group, then the bias."""

    def __init__(self, linear: nn.Linear, rank: int, size: int, group: Any) -> None:
        super().__init__()
        cols = linear.in_features // size
        self.weight = nn.Parameter(linear.weight.detach()[:, rank * cols:(rank + 1) * cols].clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        y = eng.group_all_reduce(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


def _replace(block: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(block.get_submodule(parent), name, module)


def split_blocks(net: nn.Module, rank: int, size: int, group: Any, name: str) -> None:
    """Replace every block's projections of ``net`` by this rank's shards (the whole weights are freed)."""
    from runtime.adapters import adapter_for

    for i, block in enumerate(adapter_for(net).layers(net)):
        for path in (*COLUMN, *ROW):
            try:
                linear = block.get_submodule(path)
            except AttributeError:
                raise RunError(f"teacher '{name}': block {i} has no {path}; tensor parallelism splits Llama-family "
                               "decoders only: re-run `gkdc plan` with another placement") from None
            features = linear.out_features if path in COLUMN else linear.in_features
            if features % size:
                raise RunError(f"teacher '{name}': {path} has {features} features, not divisible by {size} ranks")
            _replace(block, path, ColumnParallel(linear, rank, size) if path in COLUMN
                     else RowParallel(linear, rank, size, group))


class TensorParallelTeacher(nn.Module):
    """A split teacher and its group; ``module`` is the HF model (the capture hooks register on it)."""

    def __init__(self, module: nn.Module, group: Any, rank: int, size: int) -> None:
        super().__init__()
        self.module, self.group, self.rank, self.size = module, group, rank, size
        self._own: tuple[int, int, int] | None = None  # (rows, positions) of this rank's batch, the union's width

    def forward(self, **inputs: Any) -> Any:
        return self.module(**inputs)

    def gather_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The union of the group's batches: token ids, mask and positions of every rank, right-padded."""
        ids = inputs["input_ids"]
        shape = torch.tensor(ids.shape, dtype=torch.long, device=ids.device)
        shapes = eng.group_all_gather(shape, self.group, self.size)
        rows = {int(s[0]) for s in shapes}
        if len(rows) != 1:
            raise RunError(f"tensor-parallel teacher: the ranks of a group have micro-batches of {sorted(rows)} rows; "
                           "they must be equal (drop_last)")
        width = max(int(s[1]) for s in shapes)
        self._own = (ids.shape[0], ids.shape[1], width)
        out = dict(inputs)
        for key, value in inputs.items():
            if isinstance(value, Tensor) and value.dim() == 2 and value.shape == ids.shape:
                padded = F.pad(value, (0, width - value.shape[1]), value=0)
                out[key] = torch.cat(eng.group_all_gather(padded, self.group, self.size), dim=0)
        if "attention_mask" not in inputs and width != ids.shape[1]:
            raise RunError("tensor-parallel teacher: packed blocks of different lengths within a group")
        return out

    def own_rows(self, kind: str, tensor: Tensor) -> Tensor:
        """This rank's rows of a signal computed on the union, cut back to its own positions."""
        if self._own is None or not isinstance(tensor, Tensor) or tensor.dim() == 0:
            return tensor
        rows, length, width = self._own
        part = tensor[self.rank * rows:(self.rank + 1) * rows]
        if width != length:
            if kind in SQUARE_KINDS:
                part = part[..., :length, :length]
            elif part.dim() >= 2 and part.shape[1] == width:
                part = part[:, :length]
        return part.clone()


def shard(net: nn.Module, size: int, name: str) -> TensorParallelTeacher:
    """``net`` split over this rank's group of ``size`` ranks (every rank of the world calls this together); a
    teacher ``build_teacher`` already built split is returned as it is."""
    if isinstance(net, TensorParallelTeacher):
        return net
    group, rank, size = eng.tp_group(size)
    split_blocks(net, rank, size, group, name)
    return TensorParallelTeacher(net.eval().requires_grad_(False), group, rank, size)


def build_teacher(model: Any, base_dir: Any, *, keep_blocks: int | None, drop_head: bool, size: int,
                  trust_remote_code: bool = False, allow_pickle: bool = False) -> nn.Module:
    """A tensor-parallel teacher as the plan places it: from local safetensors straight into this rank's shards
    (``from_files``); otherwise loaded whole (``runtime.models.build_teacher``) for ``shard`` to split."""
    from pathlib import Path

    from runtime import models as M

    where, local = M._where(model, base_dir)
    if not local or not M._has_safetensors(Path(where)):
        return M.build_teacher(model, base_dir, keep_blocks=keep_blocks, drop_head=drop_head, zero3=None,
                               trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    M._check_weights(model, Path(where), allow_pickle)
    cfg = M._keep_blocks(M._pretrained_config(model, where, trust_remote_code), keep_blocks)
    return from_files(lambda: M._drop_head(M._auto_class(model).from_config(cfg, dtype=M.DTYPES[model.dtype]),
                                           drop_head), Path(where), size, model.name)


def from_files(make: Any, where: Any, size: int, name: str) -> TensorParallelTeacher:
    """``make()`` built on the meta device, split over this rank's group, then filled from the safetensors in
    ``where``: this rank's part of every split weight, every other tensor whole (rotary tables recomputed)."""
    from runtime import models as M
    from runtime.weights import WeightFiles

    with torch.device("meta"):
        net = make()
    group, rank, size = eng.tp_group(size)
    split_blocks(net, rank, size, group, name)
    net.to_empty(device="cpu")
    _fresh_rotary(net)
    files = WeightFiles(where)
    prefix, done, missing = getattr(net, "base_model_prefix", ""), set(), []
    try:
        with torch.no_grad():
            for key, tensor in M.named_tensors(net):
                if id(tensor) in done:
                    continue
                found = M._file_key(key, prefix, files)
                if found is None:
                    missing.append(key)
                    continue
                _read_part(files, found, tensor, net.get_submodule(key.rpartition(".")[0]), rank, name, key)
                done.add(id(tensor))
    finally:
        files.close()
    ids = {k: id(t) for k, t in M.named_tensors(net)}
    missing = [k for k in missing if ids[k] not in done]  # a tied tensor read under another of its keys is there
    if missing:
        raise RunError(f"teacher '{name}': {len(missing)} tensors are not in {where} (e.g. {missing[:3]})")
    return TensorParallelTeacher(net.eval().requires_grad_(False), group, rank, size)


def _read_part(files: Any, key: str, tensor: Tensor, owner: nn.Module, rank: int, name: str, where: str) -> None:
    stored = files.tensors[key]
    data = tensor.data
    if isinstance(owner, RowParallel) and where.endswith("weight"):  # columns [r c, (r+1) c) of every row
        rows, cols = stored.shape
        width = data.shape[1]
        for i in range(rows):
            files.read_flat(key, i * cols + rank * width, data[i])
        return
    if isinstance(owner, ColumnParallel):  # rows [r n, (r+1) n): one contiguous range of the file
        per_row = stored.numel // stored.shape[0]
        files.read_flat(key, rank * data.shape[0] * per_row, data.view(-1))
        return
    if tuple(stored.shape) != tuple(data.shape):
        raise RunError(f"teacher '{name}': tensor {where} has shape {tuple(data.shape)} in the model but "
                       f"{stored.shape} in {stored.file}")
    files.read_flat(key, 0, data.view(-1))


def _fresh_rotary(net: nn.Module) -> None:
    """Rotary tables are buffers computed at construction (not stored): build them anew off the meta device."""
    for path, module in list(net.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "config"):
            parent, _, child = path.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, type(module)(config=module.config))
