"""Re-plan a teacher x cluster sweep of logit distillation with the measured loss kernels, against the model before.

For every teacher (catalog causal LMs from 7B to 72B and specs/models/dense-100b) and cluster, a spec distils it
into a student of a quarter of its blocks with ``kl(teacher.logits, student.logits, T: 2)``, global batch 64 x
2048 tokens. Each spec is planned twice in this process:

- ``before``: the planner as it was (the loss charged 12 B per logit element, what F.cross_entropy needs, and no
  fused heads), and that plan's peak repriced with the dense ``kl`` kernel the runtime then ran (25 B per element,
  measured by bench/loss_memory.py): does it still fit under the planner's own limit (device memory less
  ``SAFETY_MARGIN``)?
- ``after``: the planner now (each kernel's measured bytes, fused heads where the graph and placement allow).

Prints one row per plan and the counts. Planner only (no torch): ``python bench/loss_sweep.py``.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

from gkdlang.lower import check_file
from planner import graph as graph_module
from planner import memory
from planner.build import build_plan
from planner.placement import SAFETY_MARGIN
from planner.plan import MemoryItem, Plan

ROOT = Path(__file__).resolve().parents[1]
TEACHERS = ["llama-2-7b", "mistral-7b-v0.1", "qwen2.5-7b", "llama-3-8b", "llama-2-13b", "qwen2.5-14b",
            "qwen2.5-32b", "llama-3-70b", "qwen2.5-72b", str(ROOT / "specs" / "models" / "dense-100b")]
CLUSTERS = ["1 x A100-80GB", "8 x A100-40GB", "8 x A100-80GB", "8 x H100-80GB"]
DENSE_KL_BYTES = 25
"""Measured peak of the dense kl kernel beyond the student's logits (bench/loss_memory.py, fp32 and bf16)."""
CHARGED_BEFORE = 12

SPEC = """teacher big = hf("{teacher}") {{ dtype: bf16 }}
student mid = like(big) {{ layers: {layers} }}
data corpus = text("{corpus}") {{ seq_len: 2048 }}
stage distill {{
  data: corpus
  steps: 1000
  batch: 64
  optimizer: adamw(lr: 1e-4)
  loss: kl(big.logits, mid.logits, T: 2)
}}
cluster {{ gpus: {cluster}, cpu_memory: 2TB }}
"""


def _before_logits(model, micro, seq, d, needs_head, losses=(), fused=False) -> list[MemoryItem]:
    """The planner's logit items before the chunked kernels: 12 B per element whatever the loss."""
    if not needs_head:
        return []
    n = micro * (seq if model.head.kind == "lm" else 1) * memory.head_width(model)
    return [MemoryItem(name="logits.student", bytes=n * d), MemoryItem(name="loss.saved", bytes=n * 4),
            MemoryItem(name="loss.backward", bytes=2 * n * 4)]


@contextlib.contextmanager
def planner_before():
    logits, fusable = memory.student_logits, graph_module.SignalGraph.fusable_heads
    memory.student_logits = _before_logits
    graph_module.SignalGraph.fusable_heads = lambda self, stage: frozenset()
    try:
        yield
    finally:
        memory.student_logits, graph_module.SignalGraph.fusable_heads = logits, fusable


def plan(text: str, where: Path) -> Plan | None:
    path = where / "sweep.gkd"
    path.write_text(text)
    checked = check_file(path)
    if checked.spec is None:
        raise SystemExit(f"sweep spec does not check:\n{text}\n{checked.diagnostics}")
    out = build_plan(checked.spec, gkdc_version="sweep", spec_path=str(path))
    return out if isinstance(out, Plan) else None


def _logit_elements(p: Plan) -> int:
    st = p.stages[0]
    item = next((i for i in st.memory[0].items if i.name == "logits.student"), None)
    return 0 if item is None else item.bytes // {"bf16": 2, "fp16": 2, "fp32": 4}[st.placement.precision]


def _summary(p: Plan | None) -> str:
    if p is None:
        return "infeasible"
    st = p.stages[0]
    pl = st.placement
    fused = [c.model for c in st.captures if c.fused_head]
    return (f"ZeRO-{pl.zero_stage} mb{pl.micro_batch}{' ckpt' if pl.activation_checkpointing else ''} "
            f"{'/'.join(pl.teacher_strategy.values())}{' fused:' + ','.join(fused) if fused else ''}")


def main(argv: list[str] | None = None) -> int:
    where = Path(tempfile.mkdtemp())
    (where / "corpus.txt").write_text("a b c\n")
    broken = infeasible_after = total = 0
    print(f"{'teacher':18} {'cluster':14} {'before':>34} {'peak':>7} {'repriced':>9} {'limit':>7} | "
          f"{'after':>40} {'peak':>7}")
    for teacher in TEACHERS:
        from gkdlang.arch import arch_from_config  # noqa: F401 (catalog configs load through check_file)

        for cluster in CLUSTERS:
            layers = {"dense-100b": 20}.get(Path(teacher).name, None)
            text = SPEC.format(teacher=teacher, layers=layers or "8", corpus=where / "corpus.txt", cluster=cluster)
            with planner_before():
                before = plan(text, where)
            after = plan(text, where)
            total += 1
            name = Path(teacher).name
            if before is None:
                print(f"{name:18} {cluster:14} {'infeasible':>34}")
                continue
            rank = before.stages[0].memory[0]
            limit = rank.capacity_gpu * (1 - SAFETY_MARGIN)
            repriced = rank.total_gpu + (DENSE_KL_BYTES - CHARGED_BEFORE) * _logit_elements(before)
            broken += repriced > limit
            infeasible_after += after is None
            peak_after = after.stages[0].memory[0].total_gpu if after is not None else 0
            print(f"{name:18} {cluster:14} {_summary(before):>34} {rank.total_gpu / 2**30:7.1f} "
                  f"{repriced / 2**30:8.1f}{'!' if repriced > limit else ' '} {limit / 2**30:7.1f} | "
                  f"{_summary(after):>40} {peak_after / 2**30:7.1f}", flush=True)
    print(f"{total} plans: {broken} planned before break the planner's limit once the dense kl is priced at its "
          f"measured {DENSE_KL_BYTES} B/element; after: every plan is priced by the kernel it runs, "
          f"{infeasible_after} infeasible")
    return 0


if __name__ == "__main__":
    sys.exit(main())
