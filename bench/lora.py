"""A LoRA student vs the full student: the planner's model-state bytes and step peak against measured ones.

For a Llama-shaped student (the chat demo's: 4 blocks of SmolLM2-135M, width 576, vocabulary 49,152, tied
embeddings; random weights, fp32, CPU) trained with ``ce(tokens, student.logits)``, three students: every weight
trained, and peft LoRA adapters (``runtime.peft_student.wrap``, the runtime's own wrapping) on the family's
default targets and on every linear. Per student, side by side:

- **model states**: planned = ``planner.memory.student_model_states`` of the trained parameters (weights,
  gradients, fp32 Adam m and v) plus ``student.frozen_params`` (a LoRA student's own weights, once);
  measured = the bytes of the distinct tensor storages of the parameters, their gradients and the optimizer's
  states after one ``torch.optim.AdamW`` step (tensor accounting, exact but for AdamW's 4-byte step counters;
  not RSS, which the allocator blurs);
- **step peak**: planned = the planner's per-micro-batch items (``student_items``: activations, logits, loss
  temporaries, the head and embedding weight gradients backward forms while ``.grad`` exists); measured = the
  highest live bytes above the model states during one forward + loss + backward, gradients already allocated
  (every micro-batch after the first of an accumulation), from the torch profiler's allocator events
  (``bench/memory_accuracy.profiled_peak``).

A fourth row, the full student with an untied head, checks the head-gradient item on its own. Prints one row per
student with both ratios planned / measured, then the markdown section bench/run_all puts in docs/benchmarks.md;
exits 1 when any ratio is outside ``--tolerance`` (default 10%). ``--explain`` prints, per full student, the
tensors alive at the measured peak and the op that allocated them (``memory_accuracy.peak_breakdown``).
Usage: ``python bench/lora.py [--batch 2] [--seq 128] [--tolerance 0.10] [--explain]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_accuracy import MARKER, SPAN, Case, captures, llama, peak_breakdown, profiled_peak, training_step  # noqa: E402,E501

from gkdlang.arch import arch_from_config  # noqa: E402
from gkdlang.lora import DEFAULT_TARGETS, LINEARS, adapter_params  # noqa: E402
from gkdlang.spec import LoraSpec, ModelSpec  # noqa: E402
from planner.hardware import lookup  # noqa: E402
from planner.memory import grads_held, student_items, student_model_states  # noqa: E402
from planner.params import count_params_for  # noqa: E402
from planner.trainable import frozen_params, trained_params  # noqa: E402

#: the chat demo's student: SmolLM2-135M's shape with 4 of its 30 blocks
STUDENT = {**llama(4, 576, 9, 3, 1536, 49152), "tie_word_embeddings": True}
MiB = 2**20
BEGIN, END = "<!-- lora: begin (bench/lora.py) -->", "<!-- lora: end -->"


def spec_for(targets: list[str] | None, r: int, config: dict = STUDENT) -> ModelSpec:
    arch = arch_from_config(config)
    adapter = None if targets is None else LoraSpec(r=r, alpha=2.0 * r, targets=targets,
                                                    params=adapter_params(arch, r, targets))
    return ModelSpec(name="s", role="student", source_kind="catalog", source="x", arch=arch, dtype="fp32",
                     adapter=adapter, span=SPAN)


def planned(model: ModelSpec, batch: int, seq: int) -> tuple[int, int]:
    """(model-state bytes, step peak bytes above them) as the planner prices them on one CPU rank, ZeRO-0."""
    counts = count_params_for(model.arch, "lm")
    states = student_model_states(trained_params(model, counts), counts.per_layer, 0, precision="fp32")
    state_bytes = sum(i.bytes for i in states.rank_items) + 4 * frozen_params(model, counts)
    cap, _ = captures(Case("s", model.arch.config, "fp32", batch, seq))
    # ZeRO-0 on a micro-batch after the first of an accumulation: .grad exists, as in ``measured``
    items = student_items(model, cap, batch, seq, 4, lookup("cpu"), False, losses=("ce",),
                          grads_held=grads_held(0, grad_accum=2))
    return state_bytes, sum(i.bytes for i in items)


def build(model: ModelSpec) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from runtime.peft_student import wrap

    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model.arch.config), attn_implementation="sdpa")
    if model.adapter is not None:
        hf = wrap(hf, "s", model.adapter)
    return hf.train()


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def measured(hf: torch.nn.Module, batch: int, seq: int, explain: bool = False) -> tuple[int, int]:
    """(model-state bytes after one AdamW step, step peak above them from the profiler); ``explain``: print the
    tensors alive at the peak."""
    trained = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4)
    # the runtime's capture and loss kernel, as bench/memory_accuracy.py measures a student alone
    step = training_step(hf, batch, seq, Case("s", hf.config.to_dict(), "fp32", batch, seq), None,
                         lambda: torch.empty(MARKER, dtype=torch.uint8))
    step()
    opt.step()  # materialises Adam's m and v
    states = storage_bytes([*hf.parameters(), *(p.grad for p in trained),
                            *(v for s in opt.state.values() for v in s.values())])
    _, peak = profiled_peak(step)  # gradients already exist: backward accumulates into them
    if explain:
        at, rows = peak_breakdown(step)
        print(f"  live tensors at the peak ({at / MiB:.1f} MiB; category, autograd node / op that allocated them):")
        for n, count, category, origin in rows:
            print(f"  {n / MiB:9.1f} MiB  {count:3d} x  {category:16} {origin}")
    return states, peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--explain", action="store_true", help="print the tensors alive at each full student's peak")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    family = arch_from_config(STUDENT).family
    students = [("full", None), ("full, untied head", None),
                (f"lora r{args.r} {'+'.join(DEFAULT_TARGETS[family])}", list(DEFAULT_TARGETS[family])),
                (f"lora r{args.r} all linears", list(LINEARS[family]))]
    print(f"student: Llama 4 x 576, vocab 49,152 (the chat demo's), fp32, cpu, micro-batch {args.batch} x {args.seq}, "
          "ce loss; model states: tensor storages after one AdamW step; step peak: torch profiler, above the states")
    print(f"{'student':32} {'trained':>11} {'states MiB':>10} {'planned':>8} {'ratio':>6} "
          f"{'peak MiB':>9} {'planned':>8} {'ratio':>6}")
    worst, full, rows = 0.0, 0.0, []
    for name, targets in students:
        model = spec_for(targets, args.r, {**STUDENT, "tie_word_embeddings": False} if "untied" in name else STUDENT)
        hf = build(model)
        trained = sum(p.numel() for p in hf.parameters() if p.requires_grad)
        states, peak = measured(hf, args.batch, args.seq, explain=args.explain and targets is None)
        p_states, p_peak = planned(model, args.batch, args.seq)
        r1, r2 = p_states / states, p_peak / peak
        if targets is None:
            full = max(full, abs(r1 - 1), abs(r2 - 1))
        else:
            worst = max(worst, abs(r1 - 1), abs(r2 - 1))
        print(f"{name:32} {trained:>11,} {states / MiB:10.1f} {p_states / MiB:8.1f} {r1:6.3f} "
              f"{peak / MiB:9.1f} {p_peak / MiB:8.1f} {r2:6.3f}", flush=True)
        rows.append(f"| {name} | {trained:,} | {p_states / MiB:.1f} / {states / MiB:.1f} ({r1:.3f}) | "
                    f"{p_peak / MiB:.1f} / {peak / MiB:.1f} ({r2:.3f}) |")
        del hf
    print(f"worst LoRA deviation: {worst:.1%} (tolerance {args.tolerance:.0%})")
    print(f"worst full-student deviation: {full:.1%} (tolerance {args.tolerance:.0%})")
    print("\n".join([
        BEGIN, "## LoRA students: planned vs measured memory", "",
        f"`bench/lora.py`: the chat demo's student shape (Llama, 4 blocks x 576, vocabulary 49,152, tied "
        f"embeddings; random weights), fp32 on one CPU rank, ZeRO-0, micro-batch {args.batch} x {args.seq}, "
        "`ce(tokens, s.logits)`; LoRA through the runtime's own peft wrapping (`runtime/peft_student.py`). "
        "Model states: planned = `student.params` + `student.grads` + `student.optimizer` (+ "
        "`student.frozen_params`); measured = the distinct tensor storages of parameters, gradients and "
        "AdamW's states after one step (tensor accounting, not RSS). Step peak: planned = the per-micro-batch "
        "items (activations, logits, loss, head and embedding weight gradients); measured = the highest live "
        "bytes above the "
        "model states during forward + loss + backward, from the torch profiler's allocator events, "
        "gradients already allocated.", "",
        "| student | trained params | model states MiB, planned / measured (ratio) | "
        "step peak MiB, planned / measured (ratio) |", "|---|---|---|---|", *rows, "",
        "With gradients already allocated, backward forms each weight gradient as a new tensor and adds it "
        "into `.grad`. For the tied full student the peak is the end of backward, every activation freed: "
        "three V x h tensors (108 MiB each in fp32; `--explain` lists them): the head's weight gradient, "
        "held until the embedding's use has contributed, the embedding's dense gradient and their sum; "
        "the planner's `activations.tied_head_grad`. With an untied head the peak is the head's backward: "
        "its V x h weight gradient with the activations and the logit gradient "
        "(`activations.head_weight_grad`). A LoRA student's embeddings and head are frozen: neither.", END]))
    return 0 if max(worst, full) <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
