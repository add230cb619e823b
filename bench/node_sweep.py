"""Teacher size x nodes sweep of the planner: does adding nodes shorten the step, and why.

For every teacher (7B to 175B dense decoders) and cluster (1, 2 and 4 nodes of 8 x A100-40GB and of
8 x H100-80GB), a spec distils it into a student of a quarter of its blocks with ``kl`` on the logits and an
``mse`` on the last hidden states, global batch 64 x 2048 tokens, 2 TB of host memory per node. Each spec is
planned twice in this process:

- ``flat``: the model before hierarchical pricing: every collective one ring over all ranks at the slowest
  link (``planner.collectives.flat_ring``: 25 GB/s across A100 nodes), no tensor-parallel teachers, no hpZ;
- ``now``: the planner as it is (NVLink inside a node, one InfiniBand adapter per GPU across nodes, hpZ
  secondary partitions and tensor-parallel teachers searched).

Prints a markdown table (one row per plan: placement, step time, the communication share, the speed-up over one
node) and, with ``--doc``, rewrites the table between the ``node-sweep`` markers of docs/cost-model.md;
``--check`` exits 1 when that table differs from what the planner gives now (tests/test_node_sweep.py).
Planner only (no torch): ``python bench/node_sweep.py [--doc | --check]``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gkdlang.lower import check_file  # noqa: E402
from planner import collectives, cost, placement  # noqa: E402
from planner import tensor_parallel as TP  # noqa: E402
from planner.build import build_plan  # noqa: E402
from planner.describe import teacher_strategy  # noqa: E402
from planner.plan import Plan  # noqa: E402

TEACHERS = [("llama-2-7b", "7B"), ("llama-2-13b", "13B"), ("llama-3-70b", "70B"),
            (str(ROOT / "specs" / "models" / "dense-100b"), "102B"), (str(ROOT / "specs" / "models" / "dense-175b"), "175B")]
DEVICES = ["A100-40GB", "H100-80GB"]
NODES = [1, 2, 4]
DOC = ROOT / "docs" / "cost-model.md"
BEGIN, END = "<!-- node-sweep: begin (bench/node_sweep.py --doc) -->", "<!-- node-sweep: end -->"

SPEC = """teacher big = hf("{teacher}") {{ dtype: bf16 }}
student mid = like(big) {{ layers: {layers} }}
data corpus = text("{corpus}") {{ seq_len: 2048 }}
stage distill {{
  data: corpus
  steps: 1000
  batch: 64
  optimizer: adamw(lr: 1e-4)
  loss: kl(big.logits, mid.logits, T: 2) + 0.1 * mse(big.hidden[-1], project(mid.hidden[-1]))
}}
cluster {{ nodes: {nodes}, gpus: 8 x {device} per node, cpu_memory: 2TB }}
"""


@contextlib.contextmanager
def flat_model():
    """The planner with every collective one flat ring over all ranks at the slowest link, no TP, no hpZ."""
    saved = (cost.all_gather, cost.reduce_scatter, cost.all_reduce, TP.degrees, placement._teacher_options)

    def flat(nbytes, topo, calls=1):
        return collectives.flat_ring(nbytes, topo.device, topo.ranks, topo.per_node)

    def no_hpz(models, device, world, nvme, pin=None, cluster=None):
        return saved[4](models, device, world, nvme, pin, None)

    cost.all_gather = cost.reduce_scatter = flat
    cost.all_reduce = lambda nbytes, topo, calls=1: 2 * flat(nbytes, topo)
    TP.degrees = lambda *a, **k: ()
    placement._teacher_options = no_hpz
    try:
        yield
    finally:
        cost.all_gather, cost.reduce_scatter, cost.all_reduce, TP.degrees, placement._teacher_options = saved


def plan(text: str, where: Path) -> Plan | None:
    path = where / "sweep.gkd"
    path.write_text(text)
    checked = check_file(path)
    if checked.spec is None:
        raise SystemExit(f"sweep spec does not check:\n{text}\n{[d.message for d in checked.diagnostics]}")
    out = build_plan(checked.spec, gkdc_version="sweep", spec_path=str(path))
    return out if isinstance(out, Plan) else None


def layers_of(teacher: str) -> int:
    import json

    path = Path(teacher) / "config.json"
    if path.exists():
        return json.loads(path.read_text())["num_hidden_layers"]
    return json.loads((ROOT / "gkdlang" / "catalog" / f"{teacher}.json").read_text())["num_hidden_layers"]


def comm_share(sp) -> float:
    parts = sp.step_time_parts
    return (parts.get("zero_comm", 0) + parts.get("offload", 0)) / sp.step_time_s


def rows() -> list[str]:
    corpus = "corpus.txt"  # copied next to the sweep's spec (the path rule keeps data inside the spec's project)
    out = ["| teacher | cluster | teacher placement | student | step (flat ring) | step (now) | comm + offload share | "
           "vs 1 node |",
           "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        (where / corpus).write_bytes((ROOT / "examples" / "data" / "corpus.txt").read_bytes())
        for teacher, label in TEACHERS:
            layers = max(1, layers_of(teacher) // 4)
            for device in DEVICES:
                one = None
                for nodes in NODES:
                    text = SPEC.format(teacher=teacher, layers=layers, corpus=corpus, nodes=nodes, device=device)
                    with flat_model():
                        before = plan(text, where)
                    now = plan(text, where)
                    cluster = f"{nodes} x 8 x {device}"
                    if now is None:
                        out.append(f"| {label} | {cluster} | does not fit | | | | | |")
                        continue
                    sp = now.stages[0]
                    p = sp.placement
                    one = sp.step_time_s if nodes == 1 else one
                    student = f"ZeRO-{p.zero_stage}" + (f" opt->{p.offload_optimizer}" if p.offload_optimizer != "none" else "") \
                        + (f" params->{p.offload_params}" if p.offload_params != "none" else "") \
                        + f", micro {p.micro_batch} x {p.grad_accum}" + (", ckpt" if p.activation_checkpointing else "")
                    flat = f"{before.stages[0].step_time_s:.2f} s" if before is not None else "does not fit"
                    speed = f"{one / sp.step_time_s:.2f}x" if one else "-"
                    out.append(f"| {label} | {cluster} | {teacher_strategy(p, 'big')} | {student} | {flat} | "
                               f"{sp.step_time_s:.2f} s | {comm_share(sp):.0%} | {speed} |")
    return out


def gkd_comparison() -> list[str]:
    """specs/gkd-100b.gkd as planned, and with its teacher pinned to GKD's layout (tensor parallel over the node's
    8 GPUs, MP=8): memory per rank and step time side by side."""
    text = (ROOT / "specs" / "gkd-100b.gkd").read_text()  # planned from a temporary folder: absolute model path
    text = text.replace('hf("models/', f'hf("{ROOT}/specs/models/').replace('"../examples/data/corpus.txt"', '"corpus.txt"')
    pinned = text.replace("\ncluster {", "\nplacement { teacher big: tensor_parallel }\ncluster {")
    out = ["| layout | teacher | student | GPU memory per rank | teacher weights per rank | step | parts |",
           "|---|---|---|---|---|---|---|"]
    for label, body in (("gkdc's choice", text), ("GKD's MP=8 teacher (pinned)", pinned)):
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "corpus.txt").write_bytes((ROOT / "examples" / "data" / "corpus.txt").read_bytes())
            got = plan(body, Path(tmp))
        if not isinstance(got, Plan):
            out.append(f"| {label} | does not fit | | | | | |")
            continue
        sp = got.stages[0]
        p, rank = sp.placement, sp.memory[0]
        weights = sum(i.bytes for i in rank.items if i.name.startswith("teacher:big.") and i.device == "gpu"
                      and not i.name.endswith(".forward"))
        student = f"ZeRO-{p.zero_stage}" + (f" opt->{p.offload_optimizer}" if p.offload_optimizer != "none" else "") \
            + (f" params->{p.offload_params}" if p.offload_params != "none" else "") \
            + f", micro {p.micro_batch} x {p.grad_accum}" + (", ckpt" if p.activation_checkpointing else "")
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sp.step_time_parts.items() if v >= 0.005)
        out.append(f"| {label} | {teacher_strategy(p, 'big')} | {student} | {rank.total_gpu / 2**30:.1f} GiB | "
                   f"{weights / 2**30:.1f} GiB | {sp.step_time_s:.2f} s | {parts} |")
    return out


def doc_table() -> str:
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        return ""
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip("\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", action="store_true", help="rewrite the table in docs/cost-model.md")
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/cost-model.md's table is stale")
    args = ap.parse_args()
    table = "\n".join([*rows(), "", *gkd_comparison()])
    print(table)
    if args.doc:
        text = DOC.read_text()
        head, tail = text[:text.index(BEGIN) + len(BEGIN)], text[text.index(END):]
        DOC.write_text(f"{head}\n{table}\n{tail}")
    if args.check and doc_table() != table:
        print("docs/cost-model.md's node sweep differs from the planner: run python bench/node_sweep.py --doc",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
