"""The planner's pricing of a generating stage (planner/generation.py): the KV-cache formula from the arch
fields, the generation memory phase (ZeRO-3 gather counted), decode bound by memory bandwidth or FLOPs, the
lambda / seq_kd shares, and the plan's generation / teacher / training split (docs/cost-model.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gkdlang.builtins import DTYPE_BYTES
from gkdlang.lower import check_source
from planner import cost, generation as G
from planner import placement as PL
from planner.build import build_plan, model_params
from planner.hardware import CATALOG, device_for
from planner.memory import estimate
from planner.plan import Plan
from planner.report import render_report

CASES = Path(__file__).resolve().parent / "cases"
SPEC = '''teacher big = hf("qwen2.5-1.5b")
student small = like(big) {{ layers: 4 }}
data corpus = text("data/corpus.txt") {{ seq_len: {prompt} }}
cluster {{ gpus: {gpus} x A100-80GB, cpu_memory: 1TB }}
{placement}
stage s {{ data: corpus, steps: 10, batch: {batch}, loss: kl(big.logits, small.logits, reverse: true){generate} }}
'''


def plan_of(generate: str = "", prompt: int = 128, batch: int = 16, gpus: int = 1, placement: str = "") -> Plan:
    text = SPEC.format(prompt=prompt, batch=batch, gpus=gpus, placement=placement,
                       generate=f", generate: on_policy(prompts: corpus{generate})" if generate is not None else "")
    r = check_source(text, "t.gkd", base_dir=CASES)
    assert r.spec is not None, [(d.code, d.message) for d in r.diagnostics]
    plan = build_plan(r.spec, gkdc_version="t", spec_path=str(CASES / "t.gkd"))
    assert isinstance(plan, Plan), plan
    return plan


def test_kv_cache_is_the_formula_over_the_arch_fields():
    plan = plan_of(", max_new_tokens: 64")
    sp, arch = plan.stages[0], plan.spec.models["small"].arch
    assert arch.num_kv_heads < arch.num_heads  # grouped-query attention: the cache holds kv heads only
    micro, w = sp.placement.micro_batch, DTYPE_BYTES[sp.placement.precision]
    want = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * (128 + 64) * micro * w
    assert sp.generation.kv_cache_bytes == want
    assert sp.generation.tokens_per_step == 16 * 64 and sp.generation.generator == "small"
    assert sp.tokens.seq_len == 128 + 64 and not sp.tokens.packed and "max_new_tokens" in sp.tokens.source


def test_a_stage_without_generate_has_no_generation_part():
    sp = plan_of(None).stages[0]
    assert sp.generation is None and "generation" not in sp.step_time_parts and sp.tokens.seq_len == 128


def test_step_time_includes_generation_and_the_split_adds_up():
    sp = plan_of(", max_new_tokens: 64").stages[0]
    assert sp.step_time_parts["generation"] > 0
    assert sum(sp.step_time_parts.values()) == pytest.approx(sp.step_time_s)
    split = sp.generation.time_split
    assert set(split) == {"generation", "teacher", "training"}
    assert sum(split.values()) == pytest.approx(sp.step_time_s)
    assert split["teacher"] == pytest.approx(sp.step_time_parts["compute_teacher"])


def test_lambda_scales_generation_and_seq_kd_adds_the_teachers_share():
    always = plan_of(", lambda: 1").stages[0].step_time_parts["generation"]
    half = plan_of(", lambda: 0.5").stages[0]
    assert half.step_time_parts["generation"] == pytest.approx(always / 2, rel=1e-9)
    kd = plan_of(", lambda: 0.5, seq_kd: true").stages[0]
    assert kd.step_time_parts["generation"] > half.step_time_parts["generation"]  # the 1.5B teacher samples too
    assert kd.generation.generator == "small (on-policy), big (seq_kd)"
    # the teacher's cache is larger than the student's: it sets kv_cache_bytes
    assert kd.generation.kv_cache_bytes > half.generation.kv_cache_bytes


def test_longer_generations_cost_more_memory_and_time():
    short, long = (plan_of(f", max_new_tokens: {n}").stages[0] for n in (16, 2048))
    assert long.step_time_parts["generation"] > short.step_time_parts["generation"]
    assert long.memory[0].total_gpu > short.memory[0].total_gpu


def test_the_generation_phase_sets_the_peak_when_its_cache_is_largest():
    """Phase 0 (sampling) is one of the rank's phases: a cache larger than the training tensors sets the peak."""
    plan = plan_of(", max_new_tokens: 64")
    spec, sp = plan.spec, plan.stages[0]
    counts = {m: model_params(spec.models[m]) for m in ("big", "small")}
    models = PL.stage_models(spec, spec.stages[0], sp.captures, counts)
    cluster = PL.cluster_shape(spec, device_for(spec.cluster), 1)
    base = estimate(models, cluster, sp.placement)[0]
    assert base.total_gpu == sp.memory[0].total_gpu  # the plan's figure is this estimate
    huge = dataclasses.replace(models, generation=dataclasses.replace(models.generation, max_new_tokens=200_000))
    rank = estimate(huge, cluster, sp.placement)[0]
    names = {i.name: i.bytes for i in rank.items}
    assert "generation.kv_cache:small" in names and not any(n.startswith("activations") for n in names)
    arch = spec.models["small"].arch
    assert names["generation.kv_cache:small"] == G.kv_cache_bytes(arch, sp.placement.precision, 128 + 200_000,
                                                                 sp.placement.micro_batch)
    assert rank.total_gpu > base.total_gpu


def test_zero3_students_count_the_gathered_weights():
    shape = G.GenerationShape(128, 64, (G.Generator("s", plan_of().spec.models["small"].arch, 10**9, None, 1.0,
                                                    True),))
    items = {i.name: i.bytes for i in G.phase_items(shape, 4, 3, 8, "bf16")}
    assert items["generation.gathered_weights:s"] == int(10**9 * 2 * (1 - 1 / 8))
    assert "generation.gathered_weights:s" not in {i.name for i in G.phase_items(shape, 4, 2, 8, "bf16")}
    assert "generation.gathered_weights:s" not in {i.name for i in G.phase_items(shape, 4, 3, 1, "bf16")}


def test_zero3_gather_is_priced_in_the_generation_time():
    pinned = plan_of(", max_new_tokens: 32", gpus=2, placement="placement { zero: 3 }").stages[0]
    other = plan_of(", max_new_tokens: 32", gpus=2, placement="placement { zero: 2 }").stages[0]
    assert pinned.placement.zero_stage == 3 and other.placement.zero_stage == 2
    assert pinned.placement.micro_batch == other.placement.micro_batch
    assert pinned.step_time_parts["generation"] > other.step_time_parts["generation"]


def test_decode_is_bandwidth_bound_at_small_batches_and_flop_bound_at_large_ones():
    arch = plan_of().spec.models["small"].arch
    gen = G.Generator("s", arch, 300_000_000, "bf16", 1.0, True)
    a100 = CATALOG["A100-80GB"]
    faster_memory = dataclasses.replace(a100, hbm_bw=a100.hbm_bw * 2)
    faster_math = dataclasses.replace(a100, flops={k: v * 2 for k, v in a100.flops.items()})
    small = {d: G.micro_batch_seconds(gen, 1, 256, 1, dev, "bf16") for d, dev in
             (("base", a100), ("bw", faster_memory), ("flops", faster_math))}
    assert small["bw"] < 0.6 * small["base"]  # decode dominates and reads weights: twice the bandwidth halves it
    assert small["flops"] > 0.99 * small["base"]
    huge = {d: G.micro_batch_seconds(gen, 1, 256, 4096, dev, "bf16") for d, dev in
            (("base", a100), ("bw", faster_memory), ("flops", faster_math))}
    assert huge["flops"] < 0.9 * huge["base"]  # 4,096 sequences per read of the weights: FLOPs bound it


def test_the_report_prints_the_split_and_the_constant_matches_the_cost_model():
    plan = plan_of(", max_new_tokens: 64")
    text = render_report(plan)
    assert "step time split: generation" in text and "teacher" in text and "training" in text
    assert G.EFFICIENCY == cost.EFFICIENCY
