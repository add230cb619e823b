"""Pinned placements, refusals that name the resource, the no-cpu-memory warning (planner side).

Specs are built as Spec objects here (the placement block's text form is tested in tests/test_placement_lang.py).
"""

from __future__ import annotations

from pathlib import Path

from gkdlang.spec import ClusterSpec, PlacementPin, Span
from planner.build import PlanFailure, build_plan, plan_warnings
from planner.plan import Plan
from planner.report import render_report
from tests.test_placement import SPAN, STUDENT_7B, TEACHER_100B, TINY, _a100s, _search, _spec

GB = 10**9
PIN_SPAN = Span(file="t.gkd", line=9, col=1, end_line=9, end_col=40)
KEY_SPAN = Span(file="t.gkd", line=9, col=13, end_line=9, end_col=20)


def _pin(**kw) -> PlacementPin:
    spans = {k: KEY_SPAN for k in kw.pop("keys", [])}
    return PlacementPin(span=PIN_SPAN, spans=spans, **kw)


def _plan(spec) -> Plan | PlanFailure:
    spec = spec.model_copy(update={"source_hash": "ab12"})
    return build_plan(spec, gkdc_version="t", spec_path=str(Path("t.gkd").resolve()))


def _with_pin(spec, stage, pin, **stage_kw):
    stage = stage.model_copy(update={"pin": pin, **stage_kw})
    return spec.model_copy(update={"stages": [stage]}), stage


# ---------------------------------------------------------------- pins honoured and explained


def test_pinned_choices_are_used_and_the_planner_choice_is_reported():
    spec, stage = _spec(TINY, TINY, _a100s(2), batch=16, seq=32)
    free = _plan(spec).stages[0].placement
    pinned_zero = 3 if free.zero_stage != 3 else 1
    pin = _pin(zero_stage=pinned_zero, teachers={"t": "sharded"}, keys=["zero", "teacher t", "micro_batch"])
    spec, stage = _with_pin(spec, stage, pin, micro_batch=2)
    plan = _plan(spec)
    sp = plan.stages[0]
    p = sp.placement
    assert (p.zero_stage, p.teacher_strategy["t"], p.micro_batch, p.grad_accum) == (pinned_zero, "sharded", 2, 4)
    assert sp.pin is not None and sp.pin.pinned == ["zero", "teacher t", "micro_batch"]
    assert sp.pin.planner_choice.placement == free  # what the search picks without the pins
    assert "fits" in sp.pin.verdict and "the planner would pick ZeRO-" in sp.pin.verdict
    assert sp.pin.planner_choice.placement != p
    report = render_report(plan)
    assert "pinned: zero, teacher t, micro_batch: the pinned placement fits" in report
    json_text = plan.model_dump_json()
    assert '"planner_choice"' in json_text and '"verdict"' in json_text


def test_a_pin_equal_to_the_planner_choice_says_so():
    spec, stage = _spec(TINY, TINY, _a100s(2), batch=16, seq=32)
    free = _plan(spec).stages[0].placement
    spec, _ = _with_pin(spec, stage, _pin(zero_stage=free.zero_stage, keys=["zero"]))
    assert _plan(spec).stages[0].pin.verdict.endswith("is the planner's own choice")


def test_pin_can_reach_a_placement_the_search_skips():
    # ZeRO-1 on one rank shards nothing, so the search never tries it; pinned, it is evaluated and used
    spec, stage = _spec(TINY, TINY, ClusterSpec(gpus_per_node=1, gpu="A100-40GB", span=SPAN), batch=8, seq=32)
    spec, _ = _with_pin(spec, stage, _pin(zero_stage=1, offload_optimizer="cpu", keys=["zero", "offload_optimizer"]))
    p = _plan(spec).stages[0].placement
    assert (p.zero_stage, p.offload_optimizer) == (1, "cpu")


def test_a_pinned_teacher_that_does_not_fit_is_a_located_error_naming_gpu_memory():
    spec, stage = _spec(TEACHER_100B, STUDENT_7B, _a100s(cpu_memory=1500 * GB))
    spec, _ = _with_pin(spec, stage, _pin(teachers={"t": "replicated"}, keys=["teacher t"]))
    result = _plan(spec)
    assert isinstance(result, PlanFailure)
    (diag,) = result.diagnostics
    assert diag.code == "pin-does-not-fit" and diag.span == PIN_SPAN
    assert "GPU memory of rank 0: needs" in diag.message and "(A100-40GB)" in diag.message
    assert "teacher:t.weights" in diag.message  # the per-rank breakdown
    assert diag.hint.startswith("unpinned, the planner picks ZeRO-") and "which fits" in diag.hint
    assert diag.related and diag.related[0][0] == KEY_SPAN


def test_pin_unavailable_without_nvme():
    spec, stage = _spec(TINY, TINY, _a100s(2), batch=16, seq=32)
    spec, _ = _with_pin(spec, stage, _pin(teachers={"t": "nvme_offload"}, keys=["teacher t"]))
    result = _plan(spec)
    assert isinstance(result, PlanFailure)
    assert [d.code for d in result.diagnostics] == ["pin-unavailable"]
    assert result.diagnostics[0].span == KEY_SPAN and "cluster.nvme" in result.diagnostics[0].hint


def test_pinned_offline_without_a_cache_is_refused():
    spec, stage = _spec(TINY, TINY, _a100s(2), batch=16, seq=32)
    spec, _ = _with_pin(spec, stage, _pin(teachers={"t": "offline"}, keys=["teacher t"]))
    result = _plan(spec)
    assert isinstance(result, PlanFailure) and result.diagnostics[0].code == "pin-unavailable"
    assert "declares no cache" in result.diagnostics[0].message


# ---------------------------------------------------------------- refusals name the resource


def test_host_memory_refusal_names_the_node_and_what_would_fit():
    # the 100B teacher fits 8 x A100-40GB only with its weights (or the student's states) in host memory
    spec, stage = _spec(TEACHER_100B, STUDENT_7B, _a100s(cpu_memory=64 * GB))
    result = _search(spec, stage, 8)
    assert result.chosen is None
    assert result.shortfall.resource == "host" and result.shortfall.scope == "node"
    assert result.shortfall.need > 64 * GB
    assert any(a.startswith("cpu_memory of at least") and "per node (now 59.6 GiB) would fit" in a
               for a in result.advice), result.advice
    failure = _plan(spec)
    diag = failure.diagnostics[0]
    assert diag.code == "plan-infeasible" and "host memory per node: needs" in diag.message
    assert "rank 0 host:" in diag.message and "cpu_memory of at least" in diag.hint


def test_gpu_refusal_names_the_rank():
    spec, stage = _spec(TEACHER_100B, STUDENT_7B, ClusterSpec(gpus_per_node=1, gpu="L4", span=SPAN), micro_batch=64)
    result = _search(spec, stage, 1)
    assert result.shortfall.resource == "gpu" and result.shortfall.scope == "rank"
    assert "GPU memory of rank 0: needs" in _plan(spec).diagnostics[0].message


def test_cpu_cluster_refusal_is_host_memory_per_node():
    spec, stage = _spec(TINY, TINY, ClusterSpec(gpus_per_node=2, gpu="cpu", cpu_memory=2**20, span=SPAN),
                        batch=16, seq=32)
    result = _search(spec, stage, 2)
    assert result.shortfall.resource == "host" and result.shortfall.scope == "node"
    assert result.shortfall.capacity == 2**20
    assert "(cpu_memory, 2 ranks x" in result.shortfall.describe()
    diag = _plan(spec).diagnostics[0]
    assert "host memory per node: needs" in diag.message and "rank 0 host:" in diag.message
    assert "cpu_memory of at least" in diag.hint


# ---------------------------------------------------------------- no cpu_memory


def test_missing_cpu_memory_states_the_need_and_warns():
    spec, _ = _spec(TEACHER_100B, STUDENT_7B, _a100s())
    plan = _plan(spec)
    sp = plan.stages[0]
    assert sp.host_check is not None and sp.host_check.limit is None and sp.host_check.per_node > 0
    assert sp.host_check.per_node >= sp.host_check.per_rank * 7
    (warning,) = plan_warnings(plan)
    assert warning.code == "no-cpu-memory" and warning.severity == "warning"
    assert "host memory was not checked" in warning.message and warning.span == spec.cluster.span
    from planner.describe import fmt_bytes

    assert fmt_bytes(sp.host_check.per_node) in warning.message
    assert "not checked: no cpu_memory given" in render_report(plan)


def test_declared_cpu_memory_gives_no_warning_and_is_recorded():
    spec, _ = _spec(TEACHER_100B, STUDENT_7B, _a100s(cpu_memory=1500 * GB))
    plan = _plan(spec)
    assert plan_warnings(plan) == [] and plan.stages[0].host_check.limit == 1500 * GB
    assert plan.stages[0].host_check.per_node <= 1500 * GB
