"""Offline teacher cache (issue 7): bytes per token, KL from the cache vs the dense KL, epoch time offline vs online.

Uses the real-teacher demo's models (``models/smollm2-135m``, from ``scripts/get_real.py``): the teacher
SmolLM2-135M (49,152 tokens) and the demo's 4-block student copied from its blocks [0, 1, 28, 29].

1. bytes/token: ``gkdc cache`` at the default setting (``topk()``: top-32 fp16 + tail mass + the tail's
   sum p log p + 80 tail samples) over held-out text; the size of the logits tensors on disk / tokens, and all
   shard bytes (offsets, headers) / tokens. Target: <= 300.
2. KL: over every real token of the held-out text, the dense ``kl`` (teacher's full softmax) vs ``cached_kl``
   read from the cache, token-weighted means; with the standard error of the difference (the sampled tail is an
   estimate) and, for reference, the bucket form (``tail: bucket``) at top-64 computed from the same logits.
   Target: within 1%.
3. epoch time: ``gkdc run`` of the same distillation stage (``kl`` at T 2 on the logits, where not pad; same
   student, same data, same steps) for ``--epochs`` epochs of a ``--lines`` subset of the training text, once
   with the teacher online and once from the cache, ``--repeats`` times alternating the order; epoch time = the
   summed ``train_step`` wall time of the epoch; the cache pass is timed apart. Where time goes: the online
   teacher's forward and the cache reads are timed inside the steps. Target: epochs after the first >= 2x
   faster from the cache.

    python bench/cache.py [--heldout-lines 256] [--lines 128] [--epochs 2] [--batch 8] [--seq 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "models" / "smollm2-135m"
HELDOUT = ROOT / "examples" / "real" / "data" / "lm_heldout.txt"
TRAIN = ROOT / "examples" / "real" / "data" / "lm_train.txt"


def spec_text(data: Path, *, steps: int, batch: int, seq: int, T: float, cache: str | None,
              micro: int | None = None) -> str:
    option = f", cache: {cache}" if cache else ""
    micro_line = f"\n  micro_batch: {micro}" if micro else ""
    return f"""
teacher smol = hf("{TEACHER}") {{ dtype: fp32{option} }}
student small = like(smol) {{ layers: 4, dtype: fp32, init: copy(smol, layers: [0, 1, 28, 29]) }}
data text = text("{data}") {{ seq_len: {seq} }}
stage distill {{
  data: text
  steps: {steps}
  batch: {batch}{micro_line}
  optimizer: adamw(lr: 3e-4)
  loss: kl(smol.logits, small.logits, T: {T}) where not pad
}}
"""


def _subset(src: Path, n: int, dst: Path) -> Path:
    lines = [line for line in src.read_text().splitlines() if line.strip()][:n]
    dst.write_text("\n".join(lines) + "\n")
    return dst


def _spec(path: Path, text: str):
    from gkdlang.lower import check_file

    path.write_text(text)
    result = check_file(path)
    if not result.ok:
        sys.exit("\n".join(d.message for d in result.diagnostics))
    return result.spec


def _job(spec, base: Path):
    from planner.graph import build_graph
    from runtime import cache

    graph = build_graph(spec)
    return cache.jobs_for(spec, {s.name: graph.captures(s) for s in spec.stages}, base)[0]


# ---------------------------------------------------------------- 1 + 2


def bytes_and_kl(work: Path, lines: int, batch: int, seq: int, T: float) -> None:
    from runtime import cache
    from runtime import models as M
    from runtime.adapters import capture
    from runtime.lossgraph import LossGraph

    data = _subset(HELDOUT, lines, work / "heldout.txt")
    # its own cache folder: the epoch benchmark caches other data at another T in the same work folder
    spec = _spec(work / "heldout.gkd", spec_text(data, steps=1, batch=batch, seq=seq, T=T,
                                                 cache=f'topk(path: "{work / "cache-heldout"}")'))
    job = _job(spec, work)
    start = time.perf_counter()
    res = cache.write_cache(job)
    cache_s = time.perf_counter() - start
    logits = 0
    for path in job.directory.glob("shard-*.safetensors"):
        for name, t in cache.mapped_tensors(path).items():
            if name.startswith("logits."):
                logits += t.numel() * t.element_size()
    c = spec.models["smol"].cache
    print(f"cache: top-{c.k} {c.dtype} + tail mass + tail sum p log p + {c.samples} tail samples (seed {c.seed}), "
          f"{res.tokens:,} held-out tokens, written in {cache_s:.1f}s")
    print(f"bytes/token (logits): {logits / res.tokens:.1f}  (target <= 300)")
    print(f"bytes/token (all shard bytes): {res.bytes / res.tokens:.1f}")

    tokenizer = M.load_tokenizer(spec.models["small"], spec.models, work)
    tokens = cache.tokenized(job, tokenizer)
    reader = cache.open_teacher(job, tokenizer, tokens)
    teacher = cache.build_teacher(job, 0)
    student = M.build_model(spec.models["small"], work, {"smol": teacher}).float().eval()
    stage = spec.stages[0]
    from planner.graph import build_graph

    caps = {c.model: c for c in build_graph(spec).captures(stage)}
    dims = {n: m.arch for n, m in spec.models.items()}
    dense_graph = LossGraph(stage.loss, dims)
    sparse_graph = LossGraph(cache.offline_terms(stage.loss, {"smol": c}), dims)
    bucket = dataclasses.replace(reader.reader.contract, k=64, tail="bucket", samples=0)
    per_batch = []  # (tokens, dense, cached, bucket)
    with torch.no_grad():
        for lo in range(0, len(tokens), batch):
            ids = list(range(lo, min(lo + batch, len(tokens))))
            b = tokens.collate(ids, 0)
            s_sig = capture(student, b, caps["small"], grad=False)
            t_sig = capture(teacher, b, caps["smol"], grad=False)
            dense, _ = dense_graph({"smol": t_sig, "small": s_sig}, b, 0.0)
            sparse, _ = sparse_graph({"smol": reader.signals({**b, "example_ids": torch.tensor(ids)}),
                                      "small": s_sig}, b, 0.0)
            real = b["attention_mask"].bool()
            stored = cache.encode_logits(t_sig[("logits", None)][real], bucket, 0, teacher.config.vocab_size)
            bucketed = cache.cached_kl_bucket(cache.pack_logits(stored, bucket)[0], s_sig[("logits", None)][real],
                                              T=T)
            per_batch.append((int(real.sum()), float(dense), float(sparse), float(bucketed)))
    n = torch.tensor([r[0] for r in per_batch], dtype=torch.float64)
    dense_b, sparse_b, bucket_b = (torch.tensor([r[i] for r in per_batch], dtype=torch.float64) for i in (1, 2, 3))
    count = float(n.sum())
    dense, sparse, bucketed = (float((n * x).sum()) / count for x in (dense_b, sparse_b, bucket_b))
    diff = sparse_b - dense_b
    # standard error of the token-weighted mean difference, from its spread over the batches
    se = float(((n * (diff - (sparse - dense))) ** 2).sum() ** 0.5) / count
    print(f"KL(T={T:g}) over {count:,.0f} held-out tokens: dense {dense:.5f}, from cache {sparse:.5f}, "
          f"relative difference {abs(sparse - dense) / dense:.3%}  (target <= 1%)")
    print(f"  signed difference {(sparse - dense) / dense:+.3%}, standard error of the sampled estimate "
          f"{se / dense:.3%}; bucket form at top-64 (no samples): {bucketed:.5f}, {(bucketed - dense) / dense:+.2%}")


# ---------------------------------------------------------------- 3


class _Timers:
    """Wall time of the online teacher's forwards and of the cache reads inside the timed steps."""

    def __init__(self) -> None:
        self.teacher: list[float] = []
        self.reads: list[float] = []

    def install(self):
        from runtime import cache, recipe

        real_capture, real_signals = recipe.capture, cache.CachedTeacher.signals
        timers = self

        def capture(model, batch, plan, *, grad, **kw):
            start = time.perf_counter()
            out = real_capture(model, batch, plan, grad=grad, **kw)
            if not grad:  # the teacher's forward; the student's runs with grad inside the engine
                timers.teacher.append(time.perf_counter() - start)
            return out

        def signals(self, batch):
            start = time.perf_counter()
            out = real_signals(self, batch)
            timers.reads.append(time.perf_counter() - start)
            return out

        recipe.capture, cache.CachedTeacher.signals = capture, signals
        return lambda: (setattr(recipe, "capture", real_capture), setattr(cache.CachedTeacher, "signals", real_signals))


def _timed_run(spec_path: Path, out: Path) -> tuple[list[float], _Timers]:
    from gkdc.cli import main
    from runtime import recipe

    times: list[float] = []
    real = recipe.train_step

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = real(*args, **kwargs)
        times.append(time.perf_counter() - start)
        return result

    timers = _Timers()
    restore = timers.install()
    recipe.train_step = timed
    try:
        if main(["run", str(spec_path), "--out", str(out), "--no-progress"]) != 0:
            sys.exit(f"gkdc run {spec_path} failed")
    finally:
        recipe.train_step = real
        restore()
    return times, timers


def epoch_times(work: Path, lines: int, epochs: int, batch: int, seq: int, repeats: int, micro: int | None) -> None:
    import json
    import os
    import shutil
    import statistics

    from gkdc.cli import main

    data = _subset(TRAIN, lines, work / "train.txt")
    steps_per_epoch = -(-lines // batch)
    steps = epochs * steps_per_epoch
    online = work / "online.gkd"
    # both arms get the same micro-batch: left to the planner they differ (its CPU cost model ties them), and
    # the per-micro-batch work of a 49k-vocabulary student (dense embedding gradient, head) would differ too
    _spec(online, spec_text(data, steps=steps, batch=batch, seq=seq, T=2.0, cache=None, micro=micro))
    offline = work / "offline.gkd"
    _spec(offline, spec_text(data, steps=steps, batch=batch, seq=seq, T=2.0, cache="topk()", micro=micro))
    start = time.perf_counter()
    if main(["cache", str(offline)]) != 0:
        sys.exit("gkdc cache failed")
    cache_s = time.perf_counter() - start
    on_runs, off_runs = [], []
    placements: dict[str, str] = {}
    for r in range(repeats):  # alternate the order, so a change of machine load hits both arms alike
        order = [("offline", offline, off_runs), ("online", online, on_runs)]
        for name, path, runs in order if r % 2 == 0 else order[::-1]:
            out = work / f"run-{name}-{r}"
            runs.append(_timed_run(path, out))
            placement = json.loads((out / "plan.json").read_text())["stages"][0]["placement"]
            placements[name] = (f"{placement['teacher_strategy']['smol']}, micro-batch {placement['micro_batch']} x "
                                f"accum {placement['grad_accum']}")
            shutil.rmtree(out, ignore_errors=True)
    print(f"epoch = {steps_per_epoch} steps x batch {batch} x seq {seq}; placements: online "
          f"{placements['online']}, from cache {placements['offline']}; {repeats} run(s) per arm, alternating; "
          f"load average {os.getloadavg()[0]:.2f} at the end ({os.cpu_count()} cores)")
    print(f"cache pass (gkdc cache, once): {cache_s:.1f}s")

    def epoch(times: list[float], e: int) -> float:
        return sum(times[e * steps_per_epoch:(e + 1) * steps_per_epoch])

    for e in range(epochs):
        a = statistics.median(epoch(t, e) for t, _ in on_runs)
        b = statistics.median(epoch(t, e) for t, _ in off_runs)
        print(f"epoch {e + 1}: online {a:.1f}s, from cache {b:.1f}s, speed-up {a / b:.2f}x")
    later_on = statistics.median(sum(t[steps_per_epoch:]) for t, _ in on_runs)
    later_off = statistics.median(sum(t[steps_per_epoch:]) for t, _ in off_runs)
    # where a step's time goes (medians over the steps after the first epoch)
    on_step = statistics.median(x for t, _ in on_runs for x in t[steps_per_epoch:])
    off_step = statistics.median(x for t, _ in off_runs for x in t[steps_per_epoch:])
    teacher = statistics.median(x for _, tm in on_runs for x in tm.teacher[steps_per_epoch:])
    read = statistics.median(x for _, tm in off_runs for x in tm.reads[steps_per_epoch:])
    print(f"median step after the first epoch: online {on_step:.3f}s (teacher forward {teacher:.3f}s, the rest "
          f"{on_step - teacher:.3f}s), from cache {off_step:.3f}s (cache read {read * 1e3:.1f} ms, the rest "
          f"{off_step - read:.3f}s); bound if the cached step were the online step minus the teacher: "
          f"{on_step / (on_step - teacher):.2f}x")
    print(f"epochs after the first: speed-up {later_on / later_off:.2f}x  (target >= 2x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heldout-lines", type=int, default=256)
    ap.add_argument("--lines", type=int, default=128, help="training lines (one epoch)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="runs per arm (alternating order)")
    ap.add_argument("--micro", type=int, default=None, help="micro-batch of both arms (default: the batch)")
    ap.add_argument("--T", type=float, default=1.0, help="temperature of the held-out KL")
    ap.add_argument("--skip-epochs", action="store_true")
    ap.add_argument("--skip-kl", action="store_true")
    args = ap.parse_args()
    if not (TEACHER / "model.safetensors").is_file():
        sys.exit(f"{TEACHER} is missing: run .venv/bin/python scripts/get_real.py first")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_kl:
            bytes_and_kl(work, args.heldout_lines, args.batch, args.seq, args.T)
        if not args.skip_epochs:
            epoch_times(work, args.lines, args.epochs, args.batch, args.seq, args.repeats, args.micro or args.batch)


if __name__ == "__main__":
    main()
