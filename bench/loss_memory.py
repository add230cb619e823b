"""Logit-loss memory and step time: the chunked and fused kernels (runtime/chunked.py) against the dense autograd
kernels they replace (``runtime.losses.dense_*``, the kernels of gkdc before them), measured side by side in one run.

For every logit loss (kl, soft_ce, jsd, gjsd, ce) and dtype (fp32, bf16), on CPU:

- ``beyond``: peak bytes of loss + backward beyond the student's logits (the logits exist before the measured
  region; the teacher's logits too). Dense at ``--ref-tokens`` rows (the dense fp32 reference at 8192 x 49,152
  would need ~13 GiB on this 24 GiB machine shared by six), the new kernels at ``--tokens``; compared per logit
  element (the dense figure is linear in the rows: see the two dense rows of the table when ``--check-linear``).
- ``total``: peak of (student logits + loss + backward) from the student's final hidden states: dense = the head
  ``h @ W.T`` then the dense loss; fused = ``HeadLogits`` (logits never materialised).

Two measures per case: the tensor-level peak from the torch profiler's allocator events (bench/memory_accuracy.py's
``profiled_peak``; the planner's figures are this one) and, as an outside cross-check, the process's peak resident
memory (VmHWM, reset through /proc/self/clear_refs before each case) above its resident memory at the start.

``--step`` also times a real distillation step: a SmolLM2-135M-shaped teacher (random weights, from its config)
and a 4-block student of the same width, teacher forward, student forward, kl, backward, AdamW step; dense vs
chunked vs fused, interleaved repeats, median ratio.

Prints ratios (targets: chunked beyond <= 0.2 x dense beyond; fused total <= 0.15 x dense total; step time <= 1.05 x
dense) and exits 1 when one is missed. Heavy: run under the shared lock,
``flock /work/notes/heavy.lock timeout 900 python bench/loss_memory.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from memory_accuracy import profiled_peak
from runtime import losses as L
from runtime.chunked import HeadLogits

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LOSSES = ("kl", "soft_ce", "jsd", "gjsd", "ce")
OPTIONS = {"kl": {"T": 2.0}, "soft_ce": {"T": 2.0}, "jsd": {}, "gjsd": {"beta": 0.5}, "ce": {}}


# ---------------------------------------------------------------- outside measure


def _rss() -> tuple[int, int]:
    """(current resident bytes, peak resident bytes since the last reset) of this process."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def measured(fn) -> tuple[int, int]:
    """(tensor-level peak, resident peak) bytes of ``fn()`` above the starting point."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start, _ = _rss()
    _, tensor_peak = profiled_peak(fn)
    _, hwm = _rss()
    return tensor_peak, hwm - start


# ---------------------------------------------------------------- cases


def _rows(rows: int, width: int, dtype: torch.dtype, g: torch.Generator, scale: float = 2.0) -> torch.Tensor:
    """A [rows, width] tensor of random rows: 256 drawn, then repeated (drawing 400M normals would take longer
    than the measurement; the values do not change what is allocated)."""
    block = (torch.randn(min(rows, 256), width, generator=g) * scale).to(dtype)
    return block.repeat(-(-rows // len(block)), 1)[:rows].contiguous()


def _kernel(name: str, variant: str):
    return getattr(L, name if variant != "dense" else f"dense_{name}")


def beyond(name: str, variant: str, rows: int, vocab: int, dtype: torch.dtype) -> tuple[int, int]:
    """Loss + backward beyond the student's logits (a leaf whose .grad the backward fills)."""
    g = torch.Generator().manual_seed(0)
    z = _rows(rows, vocab, dtype, g).requires_grad_(True)
    target = torch.randint(0, vocab, (rows,), generator=g) if name == "ce" else _rows(rows, vocab, dtype, g)
    fn = _kernel(name, variant)

    def run() -> None:
        fn(target, z, **OPTIONS[name]).backward()

    out = measured(run)
    del z, target
    return out


def total(name: str, variant: str, rows: int, vocab: int, hidden: int, dtype: torch.dtype,
          teacher_fused: bool = False) -> tuple[int, int]:
    """Student head + loss + backward from the final hidden states (the head weight's gradient pre-allocated, as
    an engine's gradient buffers are)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, hidden, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.05).to(dtype).requires_grad_(True)
    w.grad = torch.zeros_like(w)
    if name == "ce":
        target = torch.randint(0, vocab, (rows,), generator=g)
    elif teacher_fused:
        target = HeadLogits(torch.randn(rows, hidden, generator=g).to(dtype),
                            (torch.randn(vocab, hidden, generator=g) * 0.05).to(dtype))
    else:
        target = _rows(rows, vocab, dtype, g)
    fn = _kernel(name, "chunked" if variant == "fused" else variant)

    def run() -> None:
        pred = HeadLogits(h, w) if variant == "fused" else torch.nn.functional.linear(h, w)
        fn(target, pred, **OPTIONS[name]).backward()

    out = measured(run)
    del h, w, target
    return out


# ---------------------------------------------------------------- step time


SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
           "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True, "hidden_act": "silu"}


def step_times(batch: int, seq: int, repeats: int, dtype: torch.dtype) -> dict[str, list[float]]:
    """Seconds per distillation step (teacher forward, student forward, kl(T=2), backward, AdamW) per variant."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model(**SMOLLM2)).to(dtype).eval()
    student = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**SMOLLM2, "num_hidden_layers": 4})).to(dtype)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.bool)

    def step(variant: str) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        if variant == "fused":
            hidden = student.model(input_ids=ids, use_cache=False).last_hidden_state
            pred = HeadLogits(hidden, student.lm_head.weight)
        else:
            pred = student(input_ids=ids, use_cache=False).logits
        loss = (L.dense_kl if variant == "dense" else L.kl)(t_logits, pred, mask=mask, T=2.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"dense": [], "chunked": [], "fused": []}
    for v in times:  # warm-up: allocator, oneDNN kernels, optimizer state
        step(v)
    for _ in range(repeats):
        for v in times:  # interleaved, so load from other users of the machine hits every variant alike
            times[v].append(step(v))
    return times


# ---------------------------------------------------------------- main


def _mib(n: int) -> str:
    return f"{n / 2**20:9.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="rows (B x T) of the new kernels' cases")
    parser.add_argument("--ref-tokens", type=int, default=2048, help="rows of the dense reference cases")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--step", action="store_true", help="also time a real distillation step")
    parser.add_argument("--no-memory", action="store_true", help="only the step time (with --step)")
    parser.add_argument("--step-batch", type=int, default=4)
    parser.add_argument("--step-seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(True)
    n, n_ref, vocab, hidden = args.tokens, args.ref_tokens, args.vocab, args.hidden
    print(f"rows {n} (dense reference {n_ref}), vocab {vocab}, hidden {hidden}; bytes per logit element "
          f"(profiler tensor peak / resident peak)")
    print("ratios: to today's dense kl of the same dtype (the issue's reference) and, in brackets, to the loss's own "
          "dense kernel")
    print(f"{'loss':8} {'dtype':5} {'dense beyond':>14} {'chunked':>14} {'ratio':>14} {'dense total':>14} "
          f"{'fused':>14} {'ratio':>14}")
    failed, figures = [], {}
    for dname in [] if args.no_memory else args.dtypes.split(","):
        dtype = DTYPES[dname]
        kl_ref = None
        for name in ["kl", *[x for x in args.losses.split(",") if x != "kl"]]:
            d_b = beyond(name, "dense", n_ref, vocab, dtype)
            c_b = beyond(name, "chunked", n, vocab, dtype)
            d_t = total(name, "dense", n_ref, vocab, hidden, dtype)
            f_t = total(name, "fused", n, vocab, hidden, dtype)
            per = lambda m, rows: tuple(x / (rows * vocab) for x in m)  # noqa: E731
            row = {"dense_beyond": per(d_b, n_ref), "chunked_beyond": per(c_b, n), "dense_total": per(d_t, n_ref),
                   "fused_total": per(f_t, n)}
            kl_ref = kl_ref or (row["dense_beyond"][0], row["dense_total"][0])
            r1 = row["chunked_beyond"][0] / kl_ref[0]
            r2 = row["fused_total"][0] / kl_ref[1]
            own1 = row["chunked_beyond"][0] / row["dense_beyond"][0]
            own2 = row["fused_total"][0] / row["dense_total"][0]
            figures[f"{name}/{dname}"] = {**row, "ratio_beyond": r1, "ratio_total": r2, "own_beyond": own1,
                                          "own_total": own2}
            fmt = lambda m: f"{m[0]:6.2f}/{m[1]:6.2f}"  # noqa: E731
            print(f"{name:8} {dname:5} {fmt(row['dense_beyond']):>14} {fmt(row['chunked_beyond']):>14} "
                  f"{f'{r1:.3f} ({own1:.3f})':>14} {fmt(row['dense_total']):>14} {fmt(row['fused_total']):>14} "
                  f"{f'{r2:.3f} ({own2:.3f})':>14}", flush=True)
            if r1 > 0.2:
                failed.append(f"{name}/{dname} chunked beyond ratio {r1:.3f} > 0.2")
            if r2 > 0.15:
                failed.append(f"{name}/{dname} fused total ratio {r2:.3f} > 0.15")
        f_tt = total("kl", "fused", n, vocab, hidden, dtype, teacher_fused=True)
        print(f"kl {dname}: fused student and teacher heads, total {f_tt[0] / (n * vocab):.3f} B/element "
              f"({_mib(f_tt[0]).strip()} MiB tensor peak, {_mib(f_tt[1]).strip()} MiB resident)")
        figures[f"kl/{dname}/teacher_fused"] = [x / (n * vocab) for x in f_tt]
    if args.step:
        for dname in args.dtypes.split(","):
            times = step_times(args.step_batch, args.step_seq, args.repeats, DTYPES[dname])
            med = {v: statistics.median(t) for v, t in times.items()}
            r_c, r_f = med["chunked"] / med["dense"], med["fused"] / med["dense"]
            figures[f"step/{dname}"] = {**med, "ratio_chunked": r_c, "ratio_fused": r_f}
            print(f"step {dname} ({args.step_batch} x {args.step_seq} tokens, SmolLM2-135M-shaped teacher, 4-block "
                  f"student): dense {med['dense']:.3f} s, chunked {med['chunked']:.3f} s ({r_c:.3f}), fused "
                  f"{med['fused']:.3f} s ({r_f:.3f})", flush=True)
            if r_c > 1.05:
                failed.append(f"step {dname}: chunked {r_c:.3f} x dense > 1.05")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    for line in failed:
        print("MISSED:", line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
