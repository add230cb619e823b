"""Predicted vs measured student activation memory: planner.memory against real Hugging Face models on this machine.

For a few GPT-2- and Llama-shaped models (random weights, built from configs) and batch/sequence shapes, one
training micro-batch (forward, fp32 cross-entropy on the LM logits, backward) runs under the torch profiler
with ``profile_memory=True`` on CPU, whose allocator events give the bytes alive at every moment (on a GPU,
``torch.cuda.max_memory_allocated`` instead). Parameter gradients are allocated before the measured region,
so the figures hold activations, logits and loss temporaries only, which is what the planner's
``activations.*``, ``logits.student`` and ``loss.*`` items predict:

- ``saved``: bytes still alive after the loss (what autograd keeps for backward, plus logits),
- ``peak``: the highest live bytes at the end of any op during forward + backward (a kernel's private
  workspace, freed before its op returns, is not a tensor and is left out: see ``measure_cpu``).

Prints one row per configuration with both ratios predicted / measured (target: within 10%) and exits 1 when
any ratio is outside ``--tolerance``. Usage: ``python bench/memory_accuracy.py [--tolerance 0.10] [--quick]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from gkdlang.arch import arch_from_config
from gkdlang.spec import ModelSpec, Span
from planner.hardware import lookup
from planner.memory import DTYPE_BYTES, student_items
from planner.plan import CapturePoint, ModelCapture

SPAN = Span(file="bench", line=1, col=1, end_line=1, end_col=1)
#: size of the marker allocation (an odd size no model tensor has) that separates forward from backward
MARKER = 12_345
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    name: str
    config: dict
    dtype: str
    batch: int
    seq: int
    checkpointing: bool = False


def gpt2(layers: int, width: int, heads: int, vocab: int = 4096) -> dict:
    return {"model_type": "gpt2", "n_layer": layers, "n_embd": width, "n_head": heads, "vocab_size": vocab,
            "n_positions": 1024}


def llama(layers: int, width: int, heads: int, kv: int, inter: int, vocab: int = 4096) -> dict:
    return {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": width, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab,
            "max_position_embeddings": 1024, "tie_word_embeddings": False}


def cases(quick: bool) -> list[Case]:
    out = [
        Case("gpt2-tiny", gpt2(2, 64, 2), "fp32", 4, 64),
        Case("gpt2-small-ish", gpt2(4, 256, 4, 8192), "fp32", 2, 128),
        Case("gpt2-small-ish", gpt2(4, 256, 4, 8192), "bf16", 2, 128),
        Case("gpt2-ckpt", gpt2(4, 256, 4, 8192), "fp32", 2, 128, checkpointing=True),
        Case("llama-tiny", llama(2, 64, 4, 2, 172), "fp32", 4, 64),
        Case("llama-small-ish", llama(4, 256, 8, 4, 688, 8192), "fp32", 2, 128),
        Case("llama-small-ish", llama(4, 256, 8, 4, 688, 8192), "bf16", 2, 256),
        Case("llama-ckpt", llama(4, 256, 8, 4, 688, 8192), "bf16", 2, 128, checkpointing=True),
        # small vocabulary: the recomputed block, not the loss, sets the checkpointed peak
        Case("llama-ckpt-wide", llama(4, 512, 8, 8, 1376, 512), "fp32", 2, 256, checkpointing=True),
        Case("gpt2-ckpt-wide", gpt2(4, 512, 8, 512), "fp32", 2, 256, checkpointing=True),
    ]
    return out[::2] if quick else out


# ---------------------------------------------------------------- measurement


def build(case: Case) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**case.config)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(DTYPES[case.dtype])
    if case.checkpointing:
        model.gradient_checkpointing_enable()
    for p in model.parameters():  # gradients exist before the measured region: only activations are counted
        p.grad = torch.zeros_like(p)
    return model.train()


def measure_cpu(model: torch.nn.Module, batch: int, seq: int) -> tuple[int, int]:
    """(saved, peak) bytes above the starting point, from the profiler's allocator events."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), ids.view(-1))
        marker = torch.empty(MARKER, dtype=torch.uint8)  # an allocation that marks "forward + loss done"
        loss.backward()
    everything = prof.profiler.kineto_results.events()
    events = sorted((e for e in everything if e.name() == "[memory]"), key=lambda e: e.start_ns())
    # Tensor-level peak: live bytes at the end of every aten op. A kernel's private workspace (allocated and freed
    # inside one op, e.g. oneDNN's bf16 GEMM scratch on CPUs with AVX512-BF16) is not a tensor the planner
    # models; it depends on the CPU's instruction set, and on GPUs it is the cuBLAS workspace counted in `runtime`.
    boundaries = sorted(e.start_ns() + e.duration_ns() for e in everything if e.name().startswith("aten::"))
    live = peak = saved = 0
    b = 0
    for e in events:
        while b < len(boundaries) and boundaries[b] < e.start_ns():
            peak = max(peak, live)  # the state at an op's end: every event before it has been applied
            b += 1
        live += e.nbytes()
        if e.nbytes() == MARKER and saved == 0:
            saved = live - MARKER
    peak = max(peak, live)
    del marker
    return saved, peak


def measure_gpu(model: torch.nn.Module, batch: int, seq: int) -> tuple[int, int]:
    model.cuda()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), ids.view(-1))
    saved = torch.cuda.memory_allocated() - base
    loss.backward()
    return saved, torch.cuda.max_memory_allocated() - base


# ---------------------------------------------------------------- prediction


def predict(case: Case, device_key: str) -> tuple[int, int]:
    """(saved, peak) from the planner's items: peak is all of them, saved leaves out backward-only ones."""
    arch = arch_from_config(case.config)
    model = ModelSpec(name="s", role="student", source_kind="catalog", source="x", arch=arch, dtype=case.dtype,
                      frozen=False, span=SPAN)
    cap = ModelCapture(model="s", points=[CapturePoint(kind="logits")], stop_after_layer=None, needs_head=True)
    items = student_items(model, cap, case.batch, case.seq, DTYPE_BYTES[case.dtype], lookup(device_key),
                          case.checkpointing)
    peak = sum(i.bytes for i in items)
    saved = sum(i.bytes for i in items if i.name not in ("activations.recompute", "loss.backward"))
    return saved, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--quick", action="store_true", help="every other configuration")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    gpu = torch.cuda.is_available()
    device_key = "H100-80GB" if gpu else "cpu"
    print(f"device: {'cuda ' + torch.cuda.get_device_name() if gpu else 'cpu'} (planner key {device_key})")
    print(f"{'model':18} {'dtype':5} {'b x s':>8} {'ckpt':4} {'saved MiB':>10} {'pred':>8} {'ratio':>6} "
          f"{'peak MiB':>9} {'pred':>8} {'ratio':>6}")
    worst = 0.0
    for case in cases(args.quick):
        model = build(case)
        saved, peak = (measure_gpu if gpu else measure_cpu)(model, case.batch, case.seq)
        p_saved, p_peak = predict(case, device_key)
        r1, r2 = p_saved / saved, p_peak / peak
        worst = max(worst, abs(r1 - 1), abs(r2 - 1))
        print(f"{case.name:18} {case.dtype:5} {f'{case.batch}x{case.seq}':>8} {'yes' if case.checkpointing else 'no':4} "
              f"{saved / 2**20:10.2f} {p_saved / 2**20:8.2f} {r1:6.3f} {peak / 2**20:9.2f} {p_peak / 2**20:8.2f} {r2:6.3f}")
    print(f"worst deviation: {worst:.1%} (tolerance {args.tolerance:.0%})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
