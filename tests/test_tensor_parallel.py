"""A tensor-parallel teacher on two CPU ranks (gloo) gives what the replicated teacher gives, to 1e-5 in fp32.

Each rank has its own micro-batch of a different length (the group runs the right-padded union and keeps its
rows); logits and hidden states of every block are compared with the whole model's forward on that rank's batch.
Llama (grouped-query attention) and Qwen2 (biases on q/k/v) are checked.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _model(family: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, attn_implementation="sdpa")).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common, attn_implementation="sdpa")).eval()


def _worker(rank: int, world: int, port: int, out: str, folders: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    sys.path.insert(0, str(ROOT))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for family in ("llama", "qwen2"):
            _compare(rank, world, family, f"{out}.{family}", folders[family])
    finally:
        dist.destroy_process_group()


def _compare(rank: int, world: int, family: str, out: str, folder: str) -> None:
    import copy

    from planner.plan import CapturePoint, ModelCapture
    from runtime import tensor_parallel as T
    from runtime.adapters import capture as run_capture

    reference = _model(family)
    g = torch.Generator().manual_seed(100 + rank)
    length = 9 + 4 * rank  # the ranks' batches differ in length: the union is padded
    ids = torch.randint(0, 97, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # and in padding within a batch
    batch = {"input_ids": ids, "attention_mask": mask}
    cap = ModelCapture(model="t", points=[CapturePoint(kind="embeddings"), *[CapturePoint(kind="hidden", layer=i)
                       for i in range(3)], CapturePoint(kind="logits")], stop_after_layer=None, needs_head=True)
    want = run_capture(reference, batch, cap, grad=False)
    split = T.shard(copy.deepcopy(reference), world, "t")
    q = split.module.model.layers[0].self_attn.q_proj
    assert isinstance(q, T.ColumnParallel) and q.weight.shape[0] == 64 // world
    # built from the saved files straight into this rank's shards (nothing whole on the host)
    streamed = T.from_files(lambda: type(reference)(reference.config), Path(folder), world, "t")
    assert streamed.module.model.layers[0].mlp.down_proj.weight.shape == (64, 128 // world)
    worst = {}
    for label, model in (("split", split), ("from_files", streamed)):
        got = run_capture(model, batch, cap, grad=False)
        worst[label] = 0.0
        for key in want:
            a, b = want[key], got[key]
            assert a.shape == b.shape, (key, a.shape, b.shape)
            worst[label] = max(worst[label], float((a - b).abs().max()))
    torch.save({"worst": worst, "keys": sorted(map(str, want))}, f"{out}.{rank}")


def test_tensor_parallel_matches_replica(tmp_path):
    out = str(tmp_path / "result")
    folders = {}
    for family in ("llama", "qwen2"):
        folders[family] = str(tmp_path / family)
        _model(family).save_pretrained(folders[family], safe_serialization=True)
    mp.start_processes(_worker, args=(2, _free_port(), out, folders), nprocs=2, join=True, start_method="spawn")
    for family in ("llama", "qwen2"):
        for rank in (0, 1):
            result = torch.load(f"{out}.{family}.{rank}")
            assert len(result["keys"]) == 5
            assert max(result["worst"].values()) < 1e-5, (family, rank, result)
