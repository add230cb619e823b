"""Offline teacher cache (issue 7): bytes per token, KL from the cache vs the dense KL, epoch time offline vs online.

Uses the real-teacher demo's models (``models/smollm2-135m``, from ``scripts/get_real.py``): the teacher
SmolLM2-135M (49,152 tokens) and the demo's 4-block student copied from its blocks [0, 1, 28, 29].

1. bytes/token: ``gkdc cache`` at the default setting (top-64, fp16) over held-out text; the size of the
   logits tensors on disk (values, ids, tail) / tokens, and all shard bytes (offsets, headers) / tokens.
   Target: <= 300.
2. KL: over every real token of the held-out text, the dense ``kl`` (teacher's full softmax) vs ``cached_kl``
   read from the cache (bucket form with the tail mass), token-weighted means. Target: within 1%.
3. epoch time: ``gkdc run`` of the same distillation stage (``kl`` at T 2 on the logits, where not pad) for
   ``--epochs`` epochs of a ``--lines`` subset of the training text, once with the teacher online and once from
   the cache; epoch time = the summed ``train_step`` wall time of the epoch; the cache pass is timed apart.
   Target: epochs after the first >= 2x faster from the cache.

    python bench/cache.py [--heldout-lines 256] [--lines 128] [--epochs 2] [--batch 8] [--seq 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "models" / "smollm2-135m"
HELDOUT = ROOT / "examples" / "real" / "data" / "lm_heldout.txt"
TRAIN = ROOT / "examples" / "real" / "data" / "lm_train.txt"


def spec_text(data: Path, *, steps: int, batch: int, seq: int, T: float, cache: str | None) -> str:
    option = f", cache: {cache}" if cache else ""
    return f"""
teacher smol = hf("{TEACHER}") {{ dtype: fp32{option} }}
student small = like(smol) {{ layers: 4, dtype: fp32, init: copy(smol, layers: [0, 1, 28, 29]) }}
data text = text("{data}") {{ seq_len: {seq} }}
stage distill {{
  data: text
  steps: {steps}
  batch: {batch}
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
    from safetensors import safe_open

    from runtime import cache
    from runtime import models as M
    from runtime.adapters import capture
    from runtime.lossgraph import LossGraph

    data = _subset(HELDOUT, lines, work / "heldout.txt")
    spec = _spec(work / "heldout.gkd", spec_text(data, steps=1, batch=batch, seq=seq, T=T, cache="topk()"))
    job = _job(spec, work)
    start = time.perf_counter()
    res = cache.write_cache(job)
    cache_s = time.perf_counter() - start
    logits = 0
    for path in job.directory.glob("shard-*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for name in ("logits.values", "logits.indices", "logits.tail"):
                t = f.get_tensor(name)
                logits += t.numel() * t.element_size()
    print(f"cache: top-{spec.models['smol'].cache.k} {spec.models['smol'].cache.dtype}, {res.tokens:,} held-out "
          f"tokens, written in {cache_s:.1f}s")
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
    dense_graph, sparse_graph = LossGraph(stage.loss, dims), LossGraph(cache.offline_terms(stage.loss, {"smol"}), dims)
    dense_sum = sparse_sum = 0.0
    count = 0
    with torch.no_grad():
        for lo in range(0, len(tokens), batch):
            ids = list(range(lo, min(lo + batch, len(tokens))))
            b = tokens.collate(ids, 0)
            s_sig = capture(student, b, caps["small"], grad=False)
            dense, _ = dense_graph({"smol": capture(teacher, b, caps["smol"], grad=False), "small": s_sig}, b, 0.0)
            sparse, _ = sparse_graph({"smol": reader.signals({**b, "example_ids": torch.tensor(ids)}),
                                      "small": s_sig}, b, 0.0)
            n = int(b["attention_mask"].sum())
            dense_sum, sparse_sum, count = dense_sum + float(dense) * n, sparse_sum + float(sparse) * n, count + n
    dense, sparse = dense_sum / count, sparse_sum / count
    print(f"KL(T={T:g}) over {count:,} held-out tokens: dense {dense:.5f}, from cache {sparse:.5f}, "
          f"relative difference {abs(sparse - dense) / dense:.3%}  (target <= 1%)")


# ---------------------------------------------------------------- 3


def _timed_run(spec_path: Path, out: Path) -> list[float]:
    from gkdc.cli import main
    from runtime import recipe

    times: list[float] = []
    real = recipe.train_step

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = real(*args, **kwargs)
        times.append(time.perf_counter() - start)
        return result

    recipe.train_step = timed
    try:
        if main(["run", str(spec_path), "--out", str(out), "--no-progress"]) != 0:
            sys.exit(f"gkdc run {spec_path} failed")
    finally:
        recipe.train_step = real
    return times


def epoch_times(work: Path, lines: int, epochs: int, batch: int, seq: int) -> None:
    import json

    from gkdc.cli import main

    data = _subset(TRAIN, lines, work / "train.txt")
    steps_per_epoch = -(-lines // batch)
    steps = epochs * steps_per_epoch
    online = work / "online.gkd"
    _spec(online, spec_text(data, steps=steps, batch=batch, seq=seq, T=2.0, cache=None))
    offline = work / "offline.gkd"
    _spec(offline, spec_text(data, steps=steps, batch=batch, seq=seq, T=2.0, cache="topk()"))
    start = time.perf_counter()
    if main(["cache", str(offline)]) != 0:
        sys.exit("gkdc cache failed")
    cache_s = time.perf_counter() - start
    off = _timed_run(offline, work / "run-offline")
    on = _timed_run(online, work / "run-online")
    plan = json.loads((work / "run-offline" / "plan.json").read_text())
    strategy = plan["stages"][0]["placement"]["teacher_strategy"]
    print(f"epoch = {steps_per_epoch} steps x batch {batch} x seq {seq}; offline run's strategy: {strategy}")
    print(f"cache pass (gkdc cache, once): {cache_s:.1f}s")
    for e in range(epochs):
        a = sum(on[e * steps_per_epoch:(e + 1) * steps_per_epoch])
        b = sum(off[e * steps_per_epoch:(e + 1) * steps_per_epoch])
        print(f"epoch {e + 1}: online {a:.1f}s, from cache {b:.1f}s, speed-up {a / b:.2f}x")
    later_on = sum(on[steps_per_epoch:])
    later_off = sum(off[steps_per_epoch:])
    print(f"epochs after the first: speed-up {later_on / later_off:.2f}x  (target >= 2x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heldout-lines", type=int, default=256)
    ap.add_argument("--lines", type=int, default=128, help="training lines (one epoch)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
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
            epoch_times(work, args.lines, args.epochs, args.batch, args.seq)


if __name__ == "__main__":
    main()
