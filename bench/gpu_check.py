"""One GPU: predicted vs measured ``torch.cuda.max_memory_allocated`` per phase (load, train, save) for a teacher
larger than the memory the process may use (``torch.cuda.set_per_process_memory_fraction``).

Driven by ``bench/gpu_check.sh`` (which makes the random-weight teacher). For each plan (``cpu_offload``: the
cap is below the teacher's bytes, so any whole copy of the teacher on the GPU fails with out-of-memory;
``sharded``: one rank's shard *is* the whole teacher, so its cap is the plan's predicted peak + 10%) the
recipe runs in this process (one rank) with its phases timed by wrapping ``build_models`` (load),
``train_step`` (train) and ``runtime.models.write_weights`` (save); the peak is reset at each boundary.

Usage: ``python bench/gpu_check.py TEACHER_DIR WORK_DIR [--dry-run]`` (``--dry-run``: plan both and print the
predictions and caps, on a machine without a GPU)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
GiB = 2**30


def spec(teacher: Path, gpu_memory: str, strategy: str) -> str:
    return f"""# bench/gpu_check.py
teacher t = hf("{teacher}") {{ dtype: bf16 }}
student s = like(t) {{ layers: 2, hidden: 512, heads: 8, kv_heads: 4, intermediate: 1408 }}
data corpus = text("corpus.txt") {{ seq_len: 64 }}
stage distill {{
  data: corpus
  steps: 3
  batch: 2
  optimizer: adamw(lr: 1e-4)
  loss: kl(t.logits, s.logits, T: 2)
}}
placement {{ zero: 0; teacher t: {strategy} }}
cluster {{ gpus: 1 x H100-80GB, gpu_memory: {gpu_memory}, cpu_memory: 64GB }}
"""


def predicted(plan: dict) -> dict[str, int]:
    """Allocator bytes per phase from the plan (its ``runtime`` item, the CUDA context and workspaces, is not
    allocator memory and is left out): weights resident after loading, the training peak, and while saving the
    model states plus one gathered fp32 tensor (the largest: embeddings or head)."""
    st = plan["stages"][0]
    items = [i for i in st["memory"][0]["items"] if i["device"] == "gpu" and i["name"] != "runtime"]
    resident = sum(i["bytes"] for i in items if i["name"] == "student.params" or i["name"].endswith(".weights"))
    states = sum(i["bytes"] for i in items if i["name"].startswith("student.") or i["name"].endswith(".weights"))
    largest = max(m["parameters"] for m in plan["models"] if m["role"] == "student")  # bounded below
    head = 4 * plan["spec"]["models"]["s"]["arch"]["vocab_size"] * plan["spec"]["models"]["s"]["arch"]["hidden_size"]
    return {"load": resident, "train": sum(i["bytes"] for i in items), "save": states + min(head, 4 * largest)}


def measure(plan_path: Path, out: Path, cap: int) -> dict[str, int]:
    from runtime import models as M
    from runtime import recipe as R
    from planner.plan import Plan

    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory))
    peaks: dict[str, int] = {}

    def phase(name, fn):
        def wrapped(*args, **kwargs):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.synchronize()
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
        return wrapped

    originals = R.build_models, R.train_step, M.write_weights
    R.build_models = phase("load", R.build_models)
    R.train_step = phase("train", R.train_step)
    M.write_weights = phase("save", M.write_weights)
    try:
        plan = Plan.model_validate_json(plan_path.read_text())
        R.run(plan, plan_path, out, resume=False, progress=False)
    finally:  # the next plan wraps the originals, not these wrappers
        R.build_models, R.train_step, M.write_weights = originals
    return peaks


def main() -> int:
    dry = "--dry-run" in sys.argv  # plan and print the predictions and caps only (no GPU needed)
    teacher, work = (Path(a) for a in [a for a in sys.argv[1:] if a != "--dry-run"][:2])
    from scale import corpus

    work.mkdir(parents=True, exist_ok=True)
    corpus(work / "corpus.txt")
    t_bytes = sum(p.stat().st_size for p in teacher.glob("*.safetensors"))
    ok = True
    print(f"teacher {t_bytes / GiB:.2f} GiB on {'(dry run)' if dry else torch.cuda.get_device_name()}")
    print(f"{'plan':12} {'cap GiB':>8} {'phase':6} {'predicted':>9} {'measured':>9} {'ratio':>6}")
    for strategy in ("cpu_offload", "sharded"):
        spec_path = work / f"{strategy}.gkd"
        spec_path.write_text(spec(teacher, "4GB", strategy))  # pinned in the spec: the planner checks it fits
        plan_path = work / f"{strategy}.json"
        subprocess.run([sys.executable, "-m", "gkdc.cli", "plan", str(spec_path), "-o", str(plan_path)], check=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, cwd=work, stdout=subprocess.DEVNULL)
        pred = predicted(json.loads(plan_path.read_text()))
        cap = int(0.8 * t_bytes) if strategy == "cpu_offload" else int(1.1 * pred["train"])
        if dry:
            print(f"{strategy:12} {cap / GiB:8.2f} " + ", ".join(f"{k} {v / GiB:.3f}" for k, v in pred.items()))
            continue
        try:
            peaks = measure(plan_path, work / f"out-{strategy}", cap)
        except Exception as err:  # an out-of-memory is the finding: say it and go on to the next plan
            print(f"{strategy:12} {cap / GiB:8.2f} failed: {type(err).__name__}: {str(err)[:300]}")
            ok = False
            continue
        for name in ("load", "train", "save"):
            m, p = peaks.get(name, 0), pred[name]
            print(f"{strategy:12} {cap / GiB:8.2f} {name:6} {p / GiB:9.3f} {m / GiB:9.3f} {m / p if p else 0:6.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
