"""Several nodes in the planner: the cluster's node layout, hierarchical collectives, hpZ and tensor-parallel
teachers (planner/collectives.py, planner/tensor_parallel.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gkdlang.lower import check_file, check_source
from planner import collectives as C
from planner.build import build_plan
from planner.hardware import CATALOG
from planner.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
A100, H100 = CATALOG["A100-40GB"], CATALOG["H100-80GB"]


def test_one_node_is_the_flat_ring():
    s = 10e9
    topo = C.Topology.of(A100, 8, 8)
    assert C.all_gather(s, topo, calls=0) == pytest.approx(7 / 8 * s / A100.link_bw)
    assert C.all_gather(s, topo, calls=0) == pytest.approx(C.flat_ring(s, A100, 8, 8))


def test_two_nodes_cross_the_network_per_gpu():
    s = 10e9
    two = C.Topology.of(A100, 16, 8)
    assert (two.per_node, two.nodes) == (8, 2)
    expect = 7 / 8 * s / A100.link_bw + 1 / 2 * s / (8 * A100.inter_bw)
    assert C.all_gather(s, two, calls=0) == pytest.approx(expect)
    assert C.flat_ring(s, A100, 16, 8) > 4 * C.all_gather(s, two)  # the model before: one 25 GB/s ring
    # a group inside a node pays NVLink only; latency grows with the calls and the steps
    assert C.all_gather(s, two.within_node(8), calls=0) == pytest.approx(7 / 8 * s / A100.link_bw)
    assert C.all_gather(0.0, two) == 0.0
    assert C.all_gather(1, two, calls=10) - C.all_gather(1, two, calls=0) == pytest.approx(
        10 * (7 * A100.intra_latency + 1 * A100.inter_latency))
    assert C.all_reduce(s, two) == pytest.approx(2 * C.all_gather(s, two))


def _plan(text: str, tmp_path: Path) -> Plan:
    (tmp_path / "corpus.txt").write_bytes((ROOT / "examples" / "data" / "corpus.txt").read_bytes())
    path = tmp_path / "s.gkd"
    path.write_text(text)
    checked = check_file(path)
    assert checked.spec is not None, [d.message for d in checked.diagnostics]
    plan = build_plan(checked.spec, gkdc_version="test", spec_path=str(path))
    assert isinstance(plan, Plan), plan
    return plan


SPEC = """teacher big = hf("{teacher}") {{ dtype: bf16 }}
student mid = like(big) {{ layers: {layers} }}
data corpus = text("corpus.txt") {{ seq_len: 2048 }}
stage distill {{ data: corpus, steps: 10, batch: 64, optimizer: adamw(lr: 1e-4), loss: kl(big.logits, mid.logits) }}
{placement}
cluster {{ nodes: {nodes}, gpus: 8 x {device} per node, cpu_memory: 2TB }}
"""


def test_per_node_layout_and_warning():
    text = ("teacher bert = hf(\"gpt2\")\nstudent small = like(bert) { layers: 2 }\ndata corpus = text(\"c.txt\")\n"
            "stage s { data: corpus, steps: 1, batch: 16, loss: kl(bert.logits, small.logits) }\n")
    per_node = check_source(text + "cluster { nodes: 2, gpus: 8 x A100-40GB per node }\n", "s.gkd")
    assert (per_node.spec.cluster.nodes, per_node.spec.cluster.gpus_per_node) == (2, 8)
    assert "gpus-per-node" not in {d.code for d in per_node.diagnostics}
    bare = check_source(text + "cluster { nodes: 2, gpus: 8 x A100-40GB }\n", "s.gkd")
    warn = [d for d in bare.diagnostics if d.code == "gpus-per-node"]
    assert warn and warn[0].span.line == 5 and "16 ranks" in warn[0].message
    assert bare.spec.cluster.gpus_per_node == 8


def test_hpz_config_keys_are_deepspeeds(tmp_path):
    """A 70B teacher on 2 x 8 x H100 is sharded with an hpZ copy per node; its engine config carries the key
    DeepSpeed 0.19 reads (DeepSpeedZeroConfig accepts it as zero_hpz_partition_size) and no MiCS key."""
    plan = _plan(SPEC.format(teacher="llama-3-70b", layers=20, nodes=2, device="H100-80GB", placement=""), tmp_path)
    sp = plan.stages[0]
    assert sp.placement.teacher_hpz == {"big": 8} and sp.placement.teacher_strategy["big"] == "sharded"
    zero = sp.teacher_configs["big"]["zero_optimization"]
    assert zero["zero_hpz_partition_size"] == 8 and not any(k.startswith("mics") for k in zero)
    assert any("hpZ secondary partition" in n for n in plan.notes)
    items = {i.name: i.bytes for i in sp.memory[0].items}
    assert items["teacher:big.hpz_secondary"] == pytest.approx(2 * items["teacher:big.weights"], rel=1e-3)  # 1/8 vs 1/16
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig  # the installed DeepSpeed's own schema

    assert DeepSpeedZeroConfig(**zero).zero_hpz_partition_size == 8


def test_shipped_two_node_spec_chooses_tensor_parallel():
    checked = check_file(ROOT / "specs" / "gkd-100b-2node.gkd")
    plan = build_plan(checked.spec, gkdc_version="test", spec_path=str(ROOT / "specs" / "gkd-100b-2node.gkd"))
    sp = plan.stages[0]
    assert sp.placement.teacher_strategy == {"big": "tensor_parallel"} and sp.placement.teacher_tp["big"] in (2, 4, 8)
    assert sp.teacher_configs == {}  # a plain module split by the runtime, no ZeRO engine
    note = next(n for n in plan.notes if "runs tensor parallel" in n)
    assert "the fastest placement with the teacher sharded" in note
    items = {i.name: i.bytes for i in sp.memory[0].items}
    t = sp.placement.teacher_tp["big"]
    blocks = 80 * (4 * 10240**2 + 3 * 10240 * 27648 + 2 * 10240) * 2  # bf16 Llama blocks: attention, FFN, norms
    assert items["teacher:big.weights"] == pytest.approx(blocks / t, rel=1e-3)
    assert "teacher:big.window" not in items


def test_tensor_parallel_pin_and_pricing(tmp_path):
    """Pinned on one node of 8 x A100-40GB the 100B teacher runs tensor parallel (a degree the planner picks);
    its communication is the all-reduces of the union's residual stream inside the node."""
    from planner import tensor_parallel as TP

    text = (ROOT / "specs" / "gkd-100b.gkd").read_text()
    text = text.replace('hf("models/', f'hf("{ROOT}/specs/models/').replace('"../examples/data/corpus.txt"', '"corpus.txt"')
    text = text.replace("\ncluster {", "\nplacement { teacher big: tensor_parallel }\ncluster {")
    plan = _plan(text, tmp_path)
    sp = plan.stages[0]
    p = sp.placement
    assert p.teacher_strategy == {"big": "tensor_parallel"} and p.teacher_tp["big"] in (2, 4, 8)
    assert sp.pin is not None and sp.pin.planner_choice.placement.teacher_strategy["big"] != "tensor_parallel"
    model, cap = plan.spec.models["big"], next(c for c in sp.captures if c.model == "big")
    t, topo = p.teacher_tp["big"], C.Topology.of(A100, 8, 8)
    stream = t * p.micro_batch * 1024 * 10240 * 2
    expect = C.all_reduce(2 * 80 * stream, topo.within_node(t), calls=160)
    assert TP.comm_seconds(model, cap, p.micro_batch, 1024, t, topo) == pytest.approx(
        expect + C.all_gather(t * p.micro_batch * 1024 * 8, topo.within_node(t)))


def test_tensor_parallel_eligibility():
    from planner import tensor_parallel as TP

    checked = check_file(ROOT / "specs" / "tinybert.gkd")  # BERT teacher reading attention maps
    spec, stage = checked.spec, checked.spec.stages[0]
    from planner.graph import build_graph

    cap = build_graph(spec).captures(stage.name)[0]
    assert TP.degrees(spec.models[cap.model], cap, stage, 8) == ()
    assert "Llama-family" in TP.why_not(spec.models[cap.model], cap, stage, 8, 2)
