"""planner.build / report / schema: plan assembly from a checked spec, launch argv, steps, failure, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("planner.placement")
pytest.importorskip("planner.dsconfig")

from gkdlang.lower import check_source  # noqa: E402
from gkdlang.spec import ClusterSpec, Span  # noqa: E402
from planner.build import PlanFailure, build_plan, launch_command, total_steps  # noqa: E402
from planner.plan import Plan  # noqa: E402
from planner.report import fmt_bytes, ranges, render_report  # noqa: E402
from planner.schema import plan_json_schema  # noqa: E402

SPAN = Span(file="t.gkd", line=1, col=1, end_line=1, end_col=1)

MODELS = """
teacher bert = hf("bert-base-uncased")
teacher spare = like(bert) { layers: 4 }
student small = like(bert) { layers: 2, hidden: 96, heads: 12, intermediate: 128 }
"""

TINYBERT = MODELS + """
data corpus = text("corpus.txt") { seq_len: 16 }
data task = jsonl("task.jsonl") { label: label, seq_len: 16 }
stage general {
  data: corpus;  steps: 20;  batch: 8
  loss: mse(bert.hidden[5], project(small.hidden[1], to: bert))
      + mse(bert.attn_scores[5], small.attn_scores[1])
      + mse(bert.hidden[2], project(small.hidden[0], to: bert))
}
stage kd after general {
  data: task;  epochs: 3;  batch: 4
  loss: kl(bert.logits, small.logits, T: 2)
}
"""


def spec_of(tmp_path: Path, body: str, cluster: str = "cluster { gpus: 1 x cpu }", rows: int = 10):
    (tmp_path / "corpus.txt").write_text("hello world\n")
    (tmp_path / "task.jsonl").write_text("".join(f'{{"text": "x{i}", "label": 0}}\n' for i in range(rows)))
    result = check_source(body + cluster + "\n", "t.gkd", base_dir=tmp_path)
    assert result.spec is not None, [d.message for d in result.diagnostics]
    return result.spec


def plan_of(tmp_path: Path, body: str = TINYBERT, cluster: str = "cluster { gpus: 1 x cpu }") -> Plan:
    plan = build_plan(spec_of(tmp_path, body, cluster), gkdc_version="0.0-test",
                      spec_path=str(tmp_path / "t.gkd"), plan_path=str(tmp_path / "plan.json"))
    assert isinstance(plan, Plan), str(plan)
    return plan


# ---------------------------------------------------------------- plan contents


def test_plan_prunes_teacher_per_stage_and_counts_params(tmp_path):
    plan = plan_of(tmp_path)
    general, kd = plan.stages
    caps = {c.model: c for c in general.captures}
    assert caps["bert"].stop_after_layer == 5 and not caps["bert"].needs_head
    assert caps["bert"].eager_attention_layers == [5]
    assert "spare" not in caps  # declared, read by no term: never loaded
    assert {c.model: c for c in kd.captures}["bert"].needs_head
    models = {m.name: m for m in plan.models}
    assert models["bert"].parameters > 100_000_000 and models["bert"].trainable_parameters == 0
    assert models["small"].trainable_parameters == models["small"].parameters
    assert any("'bert' runs blocks 0..5 of 12, LM head skipped" in n for n in plan.notes)
    assert plan.world_size == 1 and plan.launch == ["gkdc", "run", str(tmp_path / "plan.json")]
    assert general.deepspeed_config  # from dsconfig, non-empty


def test_plan_json_round_trips_and_is_deterministic(tmp_path):
    plan = plan_of(tmp_path)
    text = plan.model_dump_json(indent=2)
    assert Plan.model_validate_json(text) == plan
    again = plan_of(tmp_path)
    assert again.model_dump_json(indent=2) == text  # byte-identical for the same spec


def test_plan_validates_against_exported_schema(tmp_path):
    schema = plan_json_schema()
    assert schema["type"] == "object" and "stages" in schema["properties"]
    data = json.loads(plan_of(tmp_path).model_dump_json())
    try:
        import jsonschema
    except ImportError:  # not installed here: the schema's source model must accept the JSON
        assert set(schema["required"]) <= set(data)
        Plan.model_validate(data)
    else:
        jsonschema.validate(data, schema)


def test_epochs_over_jsonl_and_text_are_counted_other_formats_are_unknown(tmp_path):
    spec = spec_of(tmp_path, TINYBERT, rows=10)
    kd = spec.stages[1]
    steps, note = total_steps(spec, kd, tmp_path)
    assert steps == 8 and "ceil(3 epochs x 10 training rows" in note  # ceil(3 * 10 / 4)
    body = TINYBERT.replace("data: task;  epochs: 3", "data: corpus;  epochs: 3")
    spec = spec_of(tmp_path, body)  # corpus.txt: one non-empty line
    assert total_steps(spec, spec.stages[1], tmp_path)[0] == 1  # ceil(3 x 1 / 4)
    assert total_steps(spec, spec.stages[0], tmp_path) == (20, None)
    (tmp_path / "rows.csv").write_text("text\nhello\n")
    body = TINYBERT.replace("data: task;  epochs: 3", "data: rows;  epochs: 3") + 'data rows = csv("rows.csv")\n'
    spec = spec_of(tmp_path, body)
    assert total_steps(spec, spec.stages[1], tmp_path)[0] == -1  # counted by the runtime after tokenisation


def test_report_plain_text_and_explain(tmp_path):
    plan = plan_of(tmp_path)
    text = render_report(plan, explain=False)
    assert "\x1b[" not in text  # not a TTY under pytest: no ANSI codes
    for needle in ("models", "stage general", "signals captured", "runs blocks 0..5 of 12, LM head skipped",
                   "placement: ZeRO-", "predicted memory per rank", "placements considered"):
        assert needle in text, needle
    explained = render_report(plan, explain=True)
    assert "stops after block 5" in explained and "frees" in explained
    assert len(explained) > len(text)


def test_infeasible_cluster_gives_diagnostic_with_cluster_span(tmp_path):
    spec = spec_of(tmp_path, TINYBERT, "cluster { gpus: 1 x cpu; gpu_memory: 1MB }")
    result = build_plan(spec, gkdc_version="t", spec_path=str(tmp_path / "t.gkd"))
    assert isinstance(result, PlanFailure)
    diag = result.diagnostics[0]
    assert diag.code == "plan-infeasible" and diag.span == spec.cluster.span
    assert "stage 'general'" in diag.message and "rank 0" in diag.message
    assert diag.hint


# ---------------------------------------------------------------- launch


def test_launch_single_rank_runs_in_process():
    argv, hostfile = launch_command(ClusterSpec(span=SPAN), "out/plan.json", 29555)
    assert argv == ["gkdc", "run", "out/plan.json"] and hostfile is None


def test_launch_eight_ranks_uses_deepspeed_launcher():
    argv, hostfile = launch_command(ClusterSpec(gpus_per_node=8, gpu="A100-40GB", span=SPAN), "p.json", 29555)
    assert argv == ["deepspeed", "--num_gpus", "8", "--master_port", "29555", "--module", "runtime.worker", "p.json"]
    assert hostfile is None


def test_launch_two_nodes_writes_hostfile():
    argv, hostfile = launch_command(ClusterSpec(nodes=2, gpus_per_node=8, span=SPAN), "run/p.json", 29555)
    assert argv[:5] == ["deepspeed", "--hostfile", "run/hostfile", "--num_nodes", "2"]
    assert argv[5:7] == ["--num_gpus", "8"]  # per node
    assert hostfile == "worker-0 slots=8\nworker-1 slots=8\n"


def test_deepspeed_launcher_accepts_the_argv():
    runner = pytest.importorskip("deepspeed.launcher.runner")
    argv, _ = launch_command(ClusterSpec(gpus_per_node=2, span=SPAN), "p.json", 29555)
    args = runner.parse_args(argv[1:] + ["out"])
    assert args.module and args.user_script == "runtime.worker" and args.user_args == ["p.json", "out"]
    assert args.num_gpus == 2 and args.master_port == 29555


def test_multi_rank_plan_has_world_size_and_port(tmp_path):
    plan = plan_of(tmp_path, cluster="cluster { gpus: 2 x cpu }")
    assert plan.world_size == 2 and plan.launch[0] == "deepspeed"
    port = int(plan.launch[plan.launch.index("--master_port") + 1])
    assert 29500 <= port < 30500


def test_formatting_helpers():
    assert fmt_bytes(1536 * 2**20) == "1.5 GiB" and fmt_bytes(12) == "12 B"
    assert ranges([0, 1, 2, 5, 7, 8]) == "0..2, 5, 7..8"


def test_fmt_bytes_never_writes_an_exponent():
    """Issue 16: ``1.01e+03 MiB``; sizes from 1000 to 1023 of a unit print as integers."""
    assert fmt_bytes(1010 * 2**20) == "1010 MiB" and fmt_bytes(999.7 * 2**20) == "1000 MiB"
    assert fmt_bytes(1023.9 * 2**20) == "1 GiB" and fmt_bytes(3.16 * 2**20) == "3.16 MiB"
    for exp in range(0, 50):
        for frac in (1.0, 1.37, 9.99, 99.96, 999.6, 1023.7):
            assert "e" not in fmt_bytes(frac * 2**exp)


def test_cpu_plan_report_says_cpu_and_labels_an_assumed_capacity(tmp_path):
    text = render_report(plan_of(tmp_path))
    table = text[text.index("predicted memory per rank"):text.index("placements considered")]
    assert "| gpu " not in table and "total GPU" not in table and "| cpu " in table
    assert "capacity (assumed)" in table and "cpu_memory" in table
    given = render_report(plan_of(tmp_path, cluster="cluster { gpus: 1 x cpu, cpu_memory: 8GB }"))
    assert "capacity (assumed)" not in given
    gpu = render_report(plan_of(tmp_path, cluster="cluster { gpus: 1 x A100-40GB }"))
    assert "total GPU" in gpu and "peak GPU" in gpu


def test_device_mismatch_warning_both_ways():
    from planner.report import mismatch_warning

    assert "no CUDA device" in mismatch_warning("RTX-4090", 0)
    assert "2 CUDA device(s)" in mismatch_warning("cpu", 2)
    assert mismatch_warning("cpu", 0) is None and mismatch_warning("A100-40GB", 1) is None
