"""planner.placement / dsconfig: a 100B teacher fits 8 x A100-40GB, impossible setups get advice, constraints are
honoured, and DeepSpeed accepts the configs."""

from __future__ import annotations

import pytest

from gkdlang.arch import arch_from_config
from gkdlang.spec import ClusterSpec, DataSpec, LossTerm, ModelSpec, SignalNode, Spec, Span, StageSpec
from planner import dsconfig, placement
from planner.params import count_params
from planner.plan import CapturePoint, ModelCapture, Placement

SPAN = Span(file="t.gkd", line=1, col=1, end_line=1, end_col=1)
GB = 10**9

#: ~100B parameters: Llama layout, 80 blocks of width 10240, GQA with 8 KV heads
TEACHER_100B = {"model_type": "llama", "num_hidden_layers": 80, "hidden_size": 10240, "num_attention_heads": 80,
                "num_key_value_heads": 8, "intermediate_size": 32768, "vocab_size": 32000,
                "max_position_embeddings": 4096}
STUDENT_7B = {**TEACHER_100B, "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
              "num_key_value_heads": 32, "intermediate_size": 11008}
TINY = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 512, "n_positions": 64}


def _model(name, role, cfg, dtype="bf16") -> ModelSpec:
    return ModelSpec(name=name, role=role, source_kind="catalog", source="x", arch=arch_from_config(cfg),
                     dtype=dtype, frozen=role == "teacher", span=SPAN)


def _spec(teacher_cfg, student_cfg, cluster: ClusterSpec, *, seq=512, **stage_kw) -> tuple[Spec, StageSpec]:
    kd = LossTerm(id="kd", fn="kl", target=SignalNode(model="t", kind="logits"),
                  pred=SignalNode(model="s", kind="logits"), span=SPAN)
    stage = StageSpec(name="kd", data="d", steps=10, loss=[kd], students=["s"], teachers=["t"], span=SPAN,
                      **{"batch": 64, **stage_kw})
    spec = Spec(file="t.gkd", source_hash="h", models={"t": _model("t", "teacher", teacher_cfg),
                                                       "s": _model("s", "student", student_cfg)},
                data={"d": DataSpec(name="d", format="text", paths=["x"], seq_len=seq, span=SPAN)},
                stages=[stage], cluster=cluster)
    return spec, stage


def _captures() -> list[ModelCapture]:
    logits = [CapturePoint(kind="logits")]
    return [ModelCapture(model="s", points=logits, stop_after_layer=None, needs_head=True),
            ModelCapture(model="t", points=logits, stop_after_layer=None, needs_head=True)]


def _search(spec, stage, world):
    params = {name: count_params(m.arch) for name, m in spec.models.items()}
    return placement.search(spec, stage, _captures(), params, world)


def _a100s(n=8, **kw) -> ClusterSpec:
    return ClusterSpec(gpus_per_node=n, gpu="A100-40GB", span=SPAN, **kw)


# ---------------------------------------------------------------- search


def test_100b_teacher_and_7b_student_fit_on_8_a100_40gb():
    spec, stage = _spec(TEACHER_100B, STUDENT_7B, _a100s(cpu_memory=1500 * GB))
    assert count_params(spec.models["t"].arch).total > 95e9
    result = _search(spec, stage, 8)
    assert result.chosen is not None, result.advice
    p = result.chosen.placement
    assert p.teacher_strategy["t"] != "replicated"  # 200 GB of bf16 weights cannot sit whole in one GPU
    assert p.zero_stage == 3 or p.offload_optimizer != "none"  # nor 7B x 20 B of student states
    assert p.micro_batch * p.grad_accum * 8 == 64
    for rank in result.memory:
        assert rank.total_gpu < rank.capacity_gpu < 40 * 2**30 + 1
    assert result.step_time_s > 0 and result.step_time_parts["compute_teacher"] > 0
    assert result.alternatives and all(c.reason for c in result.alternatives)


def test_impossible_setup_returns_none_with_advice():
    spec, stage = _spec(TEACHER_100B, STUDENT_7B, ClusterSpec(gpus_per_node=1, gpu="L4", span=SPAN), micro_batch=64)
    result = _search(spec, stage, 1)
    assert result.chosen is None
    assert result.memory and result.memory[0].total_gpu > result.memory[0].capacity_gpu
    assert any("would fit" in a for a in result.advice), result.advice
    assert any("micro_batch" in a for a in result.advice)
    assert all(not c.fits and c.reason.startswith("does not fit: GPU memory of rank 0: needs") for c in result.alternatives)


def test_batch_not_divisible_by_ranks_is_explained():
    spec, stage = _spec(TINY, TINY, _a100s(3), batch=8, seq=32)
    result = _search(spec, stage, 3)
    assert result.chosen is None and "multiple of 3 ranks" in result.advice[0]


def test_forced_micro_batch_checkpointing_and_no_accumulation_are_honoured():
    spec, stage = _spec(TINY, TINY, _a100s(2), batch=16, seq=32, micro_batch=2, activation_checkpointing=True)
    p = _search(spec, stage, 2).chosen.placement
    assert (p.micro_batch, p.grad_accum, p.activation_checkpointing) == (2, 4, True)
    spec, stage = _spec(TINY, TINY, _a100s(2), batch=16, seq=32, grad_accum_allowed=False)
    result = _search(spec, stage, 2)
    assert (result.chosen.placement.micro_batch, result.chosen.placement.grad_accum) == (8, 1)
    assert all(c.placement.grad_accum == 1 for c in result.alternatives)


def test_tight_memory_forces_a_leaner_placement():
    roomy = _search(*_spec(TINY, TINY, _a100s(2), batch=16, seq=64), 2).chosen
    tight_cluster = ClusterSpec(gpus_per_node=2, gpu="cpu", gpu_memory=600 * 2**20, span=SPAN)
    spec, stage = _spec(TINY, TINY, tight_cluster, batch=512, seq=64)
    tight = _search(spec, stage, 2)
    assert roomy is not None and tight.chosen is not None
    assert tight.chosen.placement.micro_batch < 256  # the whole per-rank batch at once would not fit
    assert any(not c.fits for c in tight.alternatives)
    assert any(c.reason.startswith("slower: ") for c in tight.alternatives)


# ---------------------------------------------------------------- DeepSpeed configs


def _placement(**kw) -> Placement:
    base = dict(teacher_strategy={"t": "sharded"}, zero_stage=2, micro_batch=2, grad_accum=4,
                activation_checkpointing=True, precision="bf16")
    return Placement(**{**base, **kw})


def test_student_config_sections():
    spec, stage = _spec(TINY, TINY, _a100s(8))
    cfg = dsconfig.student_ds_config(_placement(offload_optimizer="cpu"), stage, 8)
    assert cfg["train_batch_size"] == 2 * 4 * 8 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["bf16"] == {"enabled": True}
    assert "optimizer" not in cfg and "scheduler" not in cfg and cfg["zero_force_ds_cpu_optimizer"] is False
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "cpu" and zero["overlap_comm"]
    assert "activation_checkpointing" in cfg
    z3 = dsconfig.student_ds_config(_placement(zero_stage=3, offload_params="nvme", offload_optimizer="nvme",
                                               precision="fp16", activation_checkpointing=False), stage, 8)
    assert z3["zero_optimization"]["offload_param"]["device"] == "nvme" and z3["fp16"]["enabled"]
    assert "activation_checkpointing" not in z3


def test_teacher_config_only_for_engines():
    spec, _ = _spec(TINY, TINY, _a100s(2))
    t = spec.models["t"]
    assert dsconfig.teacher_ds_config(_placement(teacher_strategy={"t": "replicated"}), t, 2) is None
    cfg = dsconfig.teacher_ds_config(_placement(teacher_strategy={"t": "cpu_offload"}), t, 2)
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["train_batch_size"] == 2 * 2 and cfg["bf16"]["enabled"]


@pytest.mark.parametrize("zero,off", [(0, "none"), (2, "cpu"), (3, "cpu")])
def test_deepspeed_parses_the_configs(zero, off):
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    spec, stage = _spec(TINY, TINY, ClusterSpec(gpu="cpu", span=SPAN), batch=8)
    p = _placement(zero_stage=zero, offload_optimizer=off if zero else "none",
                   offload_params=off if zero == 3 else "none", grad_accum=4, precision="fp32")
    parsed = ds_config.DeepSpeedConfig(dsconfig.student_ds_config(p, stage, 1))
    assert parsed.zero_optimization_stage == zero and parsed.train_batch_size == 8
    assert parsed.gradient_accumulation_steps == 4
    teacher = dsconfig.teacher_ds_config(_placement(teacher_strategy={"t": "sharded"}, micro_batch=2), spec.models["t"], 1)
    assert ds_config.DeepSpeedConfig(teacher).zero_optimization_stage == 3


@pytest.mark.parametrize("gpu, n", [("A100-40GB", 8), ("cpu", 2), ("cpu", 1)])
def test_search_host_peaks_equal_the_plans_host_records(gpu, n):
    """The search's per-candidate host figures (hostmem.host_peaks) are host_memory's, for every candidate."""
    from planner.hardware import device_for
    from planner.hostmem import host_memory, host_peaks
    from planner.memory import estimate

    spec, stage = _spec(TINY, {**TINY, "n_layer": 1}, ClusterSpec(gpus_per_node=n, gpu=gpu, span=SPAN), batch=8)
    params = {name: count_params(m.arch) for name, m in spec.models.items()}
    models = placement.stage_models(spec, stage, _captures(), params)
    cluster = placement.cluster_shape(spec, device_for(spec.cluster), n)
    candidates = placement.placements(spec, stage, models, cluster)
    assert len(candidates) > 5
    for p in candidates:
        memory = estimate(models, cluster, p)
        records, node = host_memory(models, cluster, p, memory)
        assert host_peaks(models, cluster, p, memory) == (max(h.peak for h in records), node)


@pytest.mark.parametrize("init, partitioned", [("copy", True), ("random", True), ("pretrained", True)])
def test_a_zero3_student_with_a_compressed_vocabulary_is_charged_as_the_runtime_builds_it(init, partitioned):
    """runtime/stagemodels.py builds such a student at its kept rows, partitioned (a pretrained one streamed
    from its files, of its embedding / head only the kept rows)."""
    from gkdlang.spec import InitSpec
    from planner.hardware import device_for
    from planner.hostmem import host_load_items

    spec, stage = _spec(TINY, TINY, ClusterSpec(gpus_per_node=2, gpu="cpu", span=SPAN), batch=8)
    student = spec.models["s"].model_copy(update={
        "vocab": "v", "init": InitSpec(kind=init, source="t" if init == "copy" else None),
        "source_kind": "local" if init == "pretrained" else "derived"})
    spec = spec.model_copy(update={"models": {**spec.models, "s": student}})
    params = {name: count_params(m.arch) for name, m in spec.models.items()}
    models = placement.stage_models(spec, stage, _captures(), params)
    cluster = placement.cluster_shape(spec, device_for(spec.cluster), 2)
    items = {i.name: i for i in host_load_items(models, cluster, _placement(zero_stage=3, precision="fp32"))}
    whole = 4 * params["s"].total
    assert items["host.student:s"].bytes == (-(-whole // 2) if partitioned else whole)
