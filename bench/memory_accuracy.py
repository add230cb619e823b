"""Predicted vs measured memory of whole training steps: planner.memory against real Hugging Face models here.

For GPT-2- and Llama-shaped models (random weights, built from configs) one training micro-batch runs under the
torch profiler with ``profile_memory=True`` on CPU, whose allocator events give the bytes alive at every moment
(on a GPU, ``torch.cuda.max_memory_allocated`` instead). Two kinds of step, both through the runtime's own
signal capture (``runtime.adapters.capture``) and loss kernels (``runtime.losses.LOSSES``):

- a student alone: ``ce(tokens, student.logits)`` (forward, loss, backward);
- a distillation step with a teacher present: the teacher's no-grad forward (its planned signals captured), the
  student's forward, one logit loss (``kl``, ``soft_ce``, ``jsd``, ``gjsd``, ``ce``; materialised logits or the
  fused head the planner chooses when nothing else reads them) or one hidden-state loss (``mse`` on the last
  block), backward.

Weights and parameter gradients are allocated before the measured region, so the figures hold what the planner's
per-micro-batch items predict (activations, logits and loss items, the teacher's captured signals and forward
temporaries):

- ``saved``: bytes still alive after the loss (what autograd keeps for backward, signals, logits, gradients a
  chunked kernel wrote in its forward),
- ``peak``: the highest live bytes at the end of any op (a kernel's private workspace, freed before its op
  returns, is not a tensor and is left out: see ``profiled_peak``). The planner's peak is the larger of its two
  phases: teacher forward (signals + forward temporaries) and student (signals + the student's items).

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
from planner.memory import CHUNK_OPERANDS as CHUNKED
from planner.memory import DTYPE_BYTES, student_items, teacher_forward_peak, teacher_signal_bytes
from planner.params import count_params_for
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
    loss: str = "ce"
    """``ce`` alone (no teacher), or with ``teacher``: a logit loss or ``mse`` (last hidden states)."""
    teacher: dict | None = None
    """The teacher's config (same vocabulary and width as the student); None = the student alone."""
    fused: bool = False
    """Heads fused into the loss (what the planner chooses when only chunked kernels read the logits)."""


LOGIT_OPTIONS = {"kl": {"T": 2.0}, "soft_ce": {"T": 2.0}, "jsd": {}, "gjsd": {"beta": 0.3}, "ce": {}}


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
    # whole distillation steps, a teacher present: every logit loss, materialised and fused, and a hidden loss
    student, teacher = llama(2, 256, 8, 4, 688, 16384), llama(6, 256, 8, 4, 688, 16384)
    for loss in ("kl", "soft_ce", "jsd", "gjsd", "ce"):
        for fused in (False, True):
            out.append(Case(f"distill-{loss}{'-fused' if fused else ''}", student, "fp32", 2, 128, loss=loss,
                            teacher=teacher, fused=fused))
    out.append(Case("distill-kl", student, "bf16", 2, 128, loss="kl", teacher=teacher))
    out.append(Case("distill-kl-fused", student, "bf16", 2, 128, loss="kl", teacher=teacher, fused=True))
    out.append(Case("distill-mse-hidden", student, "fp32", 2, 128, loss="mse", teacher=teacher))
    g_student, g_teacher = gpt2(2, 256, 4, 16384), gpt2(6, 256, 4, 16384)
    out.append(Case("distill-gpt2-kl", g_student, "fp32", 2, 128, loss="kl", teacher=g_teacher))
    out.append(Case("distill-gpt2-kl-fused", g_student, "fp32", 2, 128, loss="kl", teacher=g_teacher, fused=True))
    return out[::2] if quick else out


# ---------------------------------------------------------------- measurement


def build(case: Case, config: dict | None = None, teacher: bool = False) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**(config or case.config))
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(DTYPES[case.dtype])
    if teacher:
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()
    if case.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for p in model.parameters():  # gradients exist before the measured region: only activations are counted
        p.grad = torch.zeros_like(p)
    return model.train()


def captures(case: Case) -> tuple[ModelCapture, ModelCapture | None]:
    """(student, teacher) captures as the planner writes them for the case's one term."""
    if case.teacher is None or case.loss != "mse":
        logits = [CapturePoint(kind="logits")]
        student = ModelCapture(model="s", points=logits, stop_after_layer=None, needs_head=True, fused_head=case.fused)
        teacher = None if case.teacher is None or case.loss == "ce" else \
            ModelCapture(model="t", points=logits, stop_after_layer=None, needs_head=True, fused_head=case.fused)
        return student, teacher
    last = lambda cfg: CapturePoint(kind="hidden", layer=arch_from_config(cfg).num_layers - 1)  # noqa: E731
    return (ModelCapture(model="s", points=[last(case.config)], stop_after_layer=None, needs_head=False),
            ModelCapture(model="t", points=[last(case.teacher)], stop_after_layer=None, needs_head=False))


def training_step(model: torch.nn.Module, batch: int, seq: int, case: Case | None, teacher: torch.nn.Module | None,
                  mark) -> callable:
    """One step of ``case`` as the runtime runs it; ``mark()`` is called between the loss and its backward."""
    from runtime.adapters.capture import capture
    from runtime.losses import LOSSES

    case = case or Case("student", {}, "fp32", batch, seq)
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    s_cap, t_cap = captures(case)

    def step() -> None:
        signals = capture(teacher, data, t_cap, grad=False) if t_cap is not None else None
        mine = capture(model, data, s_cap, grad=True)
        if case.loss == "mse":
            key = (s_cap.points[0].kind, s_cap.points[0].layer)
            loss = LOSSES["mse"](signals[(t_cap.points[0].kind, t_cap.points[0].layer)], mine[key])
        elif signals is None:
            loss = LOSSES["ce"](ids, mine.logits)
        else:
            loss = LOSSES[case.loss](signals.logits, mine.logits, **LOGIT_OPTIONS[case.loss])
        # as in the runtime: the student's captured signals go out of scope before backward (what the loss saved
        # stays), the teacher's stay alive until the step ends
        del mine
        marked = mark()
        loss.backward()
        del marked

    return step


def measure_cpu(model: torch.nn.Module, batch: int, seq: int, case: Case | None = None,
                teacher: torch.nn.Module | None = None) -> tuple[int, int]:
    """(saved, peak) bytes above the starting point of one training step, from the profiler's allocator events."""
    # an allocation of an odd size marks "forward + loss done" in the event stream
    return profiled_peak(training_step(model, batch, seq, case, teacher, lambda: torch.empty(MARKER, dtype=torch.uint8)))


def profiled_peak(fn) -> tuple[int, int]:
    """(saved, peak) bytes above the starting point while ``fn()`` runs, from the profiler's allocator events;
    ``saved`` is the live bytes when ``fn`` allocates a ``MARKER``-byte tensor (0 if it never does)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
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
    return saved, peak


def peak_breakdown(fn, min_bytes: int = 2**20) -> tuple[int, list[tuple[int, int, str, str]]]:
    """(peak, live tensors at it) while ``fn()`` runs: the peak as ``profiled_peak`` takes it (live bytes at an op's
    end), and the tensors alive then grouped as (bytes, count, category, "autograd node / aten op that allocated
    them"), largest first, groups under ``min_bytes`` left out. Uses the profiler's memory timeline
    (``torch.profiler._memory_profiler``, private but the source of ``export_memory_timeline``): what
    ``planner.memory.backward_grad_items`` was measured with."""
    from collections import Counter

    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    memory = prof._memory_profile()
    ops = [(e.start_ns(), e.start_ns() + e.duration_ns(), e.name()) for e in prof.profiler.kineto_results.events()
           if e.name().startswith(("aten::", "autograd::engine"))]
    boundaries = sorted(end for _, end, name in ops if name.startswith("aten::"))
    timeline = sorted((t for t in memory.timeline if t[1] in (Action.CREATE, Action.DESTROY)), key=lambda t: t[0])

    def replay(stop: int | None = None):
        live, now, peak, when, b = {}, 0, 0, None, 0
        for t, action, key, size in timeline:
            while b < len(boundaries) and boundaries[b] < t:
                if now > peak:
                    peak, when = now, boundaries[b]
                b += 1
            if stop is not None and t > stop:
                break
            if action == Action.CREATE:
                live[key[0]] = (t, size, key)
                now += size
            elif key[0] in live:
                now -= live.pop(key[0])[1]
        return (peak, when) if stop is None else live

    def origin(t: int) -> str:
        around = [o for o in ops if o[0] <= t <= o[1]]
        inner = lambda prefix: min((o for o in around if o[2].startswith(prefix)), key=lambda o: o[1] - o[0],  # noqa: E731
                                   default=None)
        node, op = inner("autograd::engine"), inner("aten::")
        return (f"{node[2].split(': ')[-1] if node else 'forward'} / {op[2] if op else '?'}")

    peak, when = replay()
    groups, counts = Counter(), Counter()
    for t, size, key in replay(when).values():
        group = (str(memory._categories.get(*key)).split(".")[-1], origin(t))
        groups[group] += size
        counts[group] += 1
    rows = [(n, counts[g], *g) for g, n in groups.most_common() if n >= min_bytes]
    return peak, rows


def measure_gpu(model: torch.nn.Module, batch: int, seq: int, case: Case | None = None,
                teacher: torch.nn.Module | None = None) -> tuple[int, int]:
    model.cuda()
    if teacher is not None:
        teacher.cuda()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    saved = []
    step = training_step(model, batch, seq, case, teacher, lambda: saved.append(torch.cuda.memory_allocated()))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return saved[0] - base, torch.cuda.max_memory_allocated() - base


# ---------------------------------------------------------------- prediction


def _spec(case: Case, name: str, config: dict, role: str) -> ModelSpec:
    return ModelSpec(name=name, role=role, source_kind="catalog", source="x", arch=arch_from_config(config),
                     dtype=case.dtype, frozen=role == "teacher", span=SPAN)


def predict(case: Case, device_key: str) -> tuple[int, int]:
    """(saved, peak) from the planner's items: the larger of the teacher phase (signals + forward temporaries)
    and the student phase (signals + student items); saved leaves out backward-only and transient ones."""
    model = _spec(case, "s", case.config, "student")
    s_cap, t_cap = captures(case)
    losses = (case.loss,) if case.loss != "mse" else ()
    items = student_items(model, s_cap, case.batch, case.seq, DTYPE_BYTES[case.dtype], lookup(device_key),
                          case.checkpointing, losses=losses, fused=case.fused)
    signals = teacher_phase = 0
    if t_cap is not None:
        teacher = _spec(case, "t", case.teacher, "teacher")
        signals = teacher_signal_bytes(teacher, t_cap, case.batch, case.seq, fused=case.fused)
        counts = count_params_for(teacher.arch, "lm", 2)
        teacher_phase = signals + teacher_forward_peak(teacher, counts, t_cap, case.batch, case.seq)
    # backward-only and forward-only items; a chunked kernel does not keep the logits (their gradient is written)
    transient = ("activations.recompute", "activations.embedding_grad", "activations.head_weight_grad",
                 "activations.tied_head_grad", "loss.backward", "loss.chunks") + \
        (("logits.student",) if all(f in CHUNKED for f in losses) and losses else ())
    peak = max(teacher_phase, signals + sum(i.bytes for i in items))
    saved = signals + sum(i.bytes for i in items if i.name not in transient)
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
    print(f"{'model':22} {'dtype':5} {'b x s':>8} {'ckpt':4} {'saved MiB':>10} {'pred':>8} {'ratio':>6} "
          f"{'peak MiB':>9} {'pred':>8} {'ratio':>6}")
    worst = 0.0
    for case in cases(args.quick):
        model = build(case)
        teacher = build(case, case.teacher, teacher=True) if case.teacher is not None else None
        saved, peak = (measure_gpu if gpu else measure_cpu)(model, case.batch, case.seq, case, teacher)
        p_saved, p_peak = predict(case, device_key)
        r1, r2 = p_saved / saved, p_peak / peak
        worst = max(worst, abs(r1 - 1), abs(r2 - 1))
        print(f"{case.name:22} {case.dtype:5} {f'{case.batch}x{case.seq}':>8} {'yes' if case.checkpointing else 'no':4} "
              f"{saved / 2**20:10.2f} {p_saved / 2**20:8.2f} {r1:6.3f} {peak / 2**20:9.2f} {p_peak / 2**20:8.2f} {r2:6.3f}", flush=True)
    print(f"worst deviation: {worst:.1%} (tolerance {args.tolerance:.0%})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
