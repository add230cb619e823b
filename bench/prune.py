"""Pruning gain: a teacher read only at a shallow block, as gkdc plans it, vs what peers do.

A TinyBERT-style term reads the teacher's hidden state of block K of a 12-block GPT-2. gkdc's plan stops the
teacher after block K (``stop_after_layer``), deletes the later blocks and the head at load time
(``Adapter.prune``) and captures one tensor with a hook. Peers (TextBrewer, torchdistill, DistillKit) run the
whole teacher with ``output_hidden_states=True`` and pick the layer afterwards. Both sides run the same
forward under ``no_grad`` on the same batches, interleaved so machine noise hits both; the script prints the
median time ratio, the peak-memory ratio of the forward (profiler allocator events on CPU,
``torch.cuda.max_memory_allocated`` on a GPU) and the weight-memory ratio.

    python bench/prune.py [--layer 2] [--steps 20] [--batch 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import transformers as tf
from torch.profiler import ProfilerActivity, profile

from planner.plan import CapturePoint, ModelCapture
from runtime.adapters import adapter_for, capture


def teacher(width: int, layers: int, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=width // 64, n_positions=1024)
    return tf.GPT2LMHeadModel(cfg).eval().requires_grad_(False)


def peak_bytes(fn) -> int:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    full = teacher(args.width, args.layers, args.vocab).to(device)
    pruned = copy.deepcopy(full)
    adapter_for(pruned).prune(pruned, args.layer + 1, drop_head=True)
    plan = ModelCapture(model="t", points=[CapturePoint(kind="hidden", layer=args.layer)],
                        stop_after_layer=args.layer, needs_head=False)
    batch = {"input_ids": torch.randint(0, args.vocab, (args.batch, args.seq), device=device),
             "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device)}

    def ours():
        return capture(pruned, batch, plan, grad=False)[("hidden", args.layer)]

    @torch.no_grad()
    def peers():
        out = full(**batch, output_hidden_states=True)
        return out.hidden_states[args.layer + 1]

    torch.testing.assert_close(ours(), peers())  # same signal (hidden[k] = hidden_states[k+1] before the last)
    times = {"gkdc": [], "peers": []}
    for _ in range(2):  # warm-up
        ours(), peers()
    for _ in range(args.steps):
        for name, fn in (("gkdc", ours), ("peers", peers)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    t_ours, t_peers = statistics.median(times["gkdc"]), statistics.median(times["peers"])
    m_ours, m_peers = peak_bytes(ours), peak_bytes(peers)
    w_ours = sum(p.numel() * p.element_size() for p in pruned.parameters())
    w_peers = sum(p.numel() * p.element_size() for p in full.parameters())
    print(f"device: {device}; teacher GPT-2 {args.layers} x {args.width}, vocab {args.vocab}; "
          f"batch {args.batch} x {args.seq}; signal hidden[{args.layer}]")
    print(f"{'':<22}{'gkdc (pruned)':>16}{'full + hidden_states':>24}{'ratio':>10}")
    print(f"{'forward time (median)':<22}{t_ours * 1e3:>14.1f}ms{t_peers * 1e3:>22.1f}ms{t_ours / t_peers:>10.3f}")
    print(f"{'forward peak memory':<22}{m_ours / 2**20:>13.1f}MiB{m_peers / 2**20:>21.1f}MiB{m_ours / m_peers:>10.3f}")
    print(f"{'teacher weights':<22}{w_ours / 2**20:>13.1f}MiB{w_peers / 2**20:>21.1f}MiB{w_ours / w_peers:>10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
