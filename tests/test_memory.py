"""planner.memory / hardware / cost: model states equal DeepSpeed's estimators, activations match measured memory,
monotonic sanity, catalog lookup."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from gkdlang.arch import arch_from_config
from gkdlang.spec import ClusterSpec, ModelSpec, Span
from planner import hardware
from planner.memory import (ClusterShape, StageModels, act_shape, block_bytes_per_token, estimate,
                            student_model_states)
from planner.params import count_params
from planner.plan import CapturePoint, ModelCapture, Placement

SPAN = Span(file="t.gkd", line=1, col=1, end_line=1, end_col=1)

# ---------------------------------------------------------------- model states vs DeepSpeed

zero2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
zero3 = pytest.importorskip("deepspeed.runtime.zero.stage3")

SIZES = [(125_000_000, 38_597_376), (6_738_415_616, 262_144_000), (70_000_000_003, 1_048_576_001)]
LAYOUTS = [(1, 1), (8, 1), (8, 4), (3, 2)]  # (gpus per node, nodes)


@pytest.mark.parametrize("total,largest", SIZES)
@pytest.mark.parametrize("gpn,nodes", LAYOUTS)
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_states_equal_deepspeed_estimator(total, largest, gpn, nodes, offload):
    cpu, gpu = zero2.estimate_zero2_model_states_mem_needs(total, gpn, nodes, cpu_offload=offload)
    ours = student_model_states(total, largest, 2, offload_optimizer="cpu" if offload else "none",
                                gpus_per_node=gpn, nodes=nodes, precision="bf16")
    assert ours.gpu == gpu and ours.cpu_node == cpu


@pytest.mark.parametrize("total,largest", SIZES)
@pytest.mark.parametrize("gpn,nodes", LAYOUTS)
@pytest.mark.parametrize("off_opt,off_par", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("zero_init", [False, True])
def test_zero3_states_equal_deepspeed_estimator(total, largest, gpn, nodes, off_opt, off_par, zero_init):
    cpu, gpu, _ = zero3.estimate_zero3_model_states_mem_needs(
        total, largest, gpn, nodes, cpu_offload=off_opt, cpu_offload_params=off_par, zero_init=zero_init)
    ours = student_model_states(total, largest, 3, offload_optimizer="cpu" if off_opt else "none",
                                offload_params="cpu" if off_par else "none", gpus_per_node=gpn, nodes=nodes,
                                precision="bf16", zero_init=zero_init)
    assert ours.gpu == gpu and ours.cpu_node == int(cpu)


def test_states_per_param_by_stage_and_precision():
    p = 1_000_000
    per_rank = {z: student_model_states(p, 0, z, gpus_per_node=4, precision="bf16").gpu for z in (0, 1, 2)}
    assert per_rank == {0: 20 * p, 1: 4 * p + 4 * p, 2: 2 * p + int(18 * p / 4)}
    assert student_model_states(p, 0, 0, precision="fp32").gpu == 16 * p  # weights + grads + Adam m, v
    names = {i.name for i in student_model_states(p, 10, 3, gpus_per_node=2).rank_items}
    assert names == {"student.gathered_layer", "student.params", "student.grads", "student.optimizer"}


# ---------------------------------------------------------------- activations vs measurement


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "memory_accuracy.py"
    spec = importlib.util.spec_from_file_location("memory_accuracy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_accuracy"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,config,dtype,ckpt", [
    ("gpt2", {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 512}, "fp32", False),
    ("llama", {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 160, "vocab_size": 512}, "bf16", False),
    ("llama-ckpt", {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "intermediate_size": 160, "vocab_size": 512}, "fp32", True),
])
def test_predicted_activations_match_measured_cpu_memory(name, config, dtype, ckpt):
    pytest.importorskip("transformers")
    bench = _bench()
    case = bench.Case(name, config, dtype, batch=2, seq=16, checkpointing=ckpt)
    saved, peak = bench.measure_cpu(bench.build(case), case.batch, case.seq)
    p_saved, p_peak = bench.predict(case, "cpu")
    assert abs(p_saved / saved - 1) < 0.10, (p_saved, saved)
    assert abs(p_peak / peak - 1) < 0.10, (p_peak, peak)


LLAMA = arch_from_config({"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 256,
                          "num_attention_heads": 8, "num_key_value_heads": 8, "intermediate_size": 688,
                          "vocab_size": 1000})


def test_eager_attention_pays_s_squared_and_fused_does_not():
    a = act_shape(LLAMA, 2, hardware.lookup("A100-40GB"))
    fused = [block_bytes_per_token(LLAMA, s, a, eager=False) for s in (128, 1024)]
    eager = [block_bytes_per_token(LLAMA, s, a, eager=True) for s in (128, 1024)]
    assert fused[0] == fused[1]  # no sequence term per token
    assert eager[1] - eager[0] == pytest.approx(8 * (1024 - 128) * (4 + 2))  # H * s * (fp32 softmax + cast)


# ---------------------------------------------------------------- whole-rank sanity


def _model(name: str, role: str, arch) -> ModelSpec:
    return ModelSpec(name=name, role=role, source_kind="catalog", source="x", arch=arch, frozen=role == "teacher",
                     span=SPAN)


def _stage_models(seq: int = 256) -> StageModels:
    teacher_arch = arch_from_config({**LLAMA.config, "num_hidden_layers": 8, "hidden_size": 512,
                                     "intermediate_size": 1376})
    logits = [CapturePoint(kind="logits")]
    return StageModels(
        students=[(_model("s", "student", LLAMA), count_params(LLAMA),
                   ModelCapture(model="s", points=logits, stop_after_layer=None, needs_head=True))],
        teachers=[(_model("t", "teacher", teacher_arch), count_params(teacher_arch),
                   ModelCapture(model="t", points=logits, stop_after_layer=None, needs_head=True))],
        seq_len=seq)


def _placement(**kw) -> Placement:
    base = dict(teacher_strategy={"t": "sharded"}, zero_stage=3, micro_batch=4, grad_accum=1,
                activation_checkpointing=False, precision="bf16")
    return Placement(**{**base, **kw})


def _peak(world: int, p: Placement) -> int:
    cluster = ClusterShape(hardware.lookup("A100-40GB"), world, min(world, 8), max(1, world // 8))
    return max(r.total_gpu for r in estimate(_stage_models(), cluster, p))


@pytest.mark.parametrize("zero,teacher", [(0, "replicated"), (2, "replicated"), (3, "sharded"), (3, "cpu_offload")])
def test_more_gpus_never_need_more_memory_per_rank(zero, teacher):
    p = _placement(zero_stage=zero, teacher_strategy={"t": teacher})
    # from 2 ranks on: going from 1 to 2 adds the all-reduce buckets a single rank does not need
    peaks = [_peak(w, p) for w in (2, 4, 8, 16, 32)]
    assert all(a >= b for a, b in zip(peaks, peaks[1:])), peaks
    if zero >= 2:
        assert peaks[0] > peaks[-1]


def test_checkpointing_lowers_activations_and_offload_lowers_gpu():
    plain, ckpt = _peak(2, _placement()), _peak(2, _placement(activation_checkpointing=True))
    assert ckpt < plain
    offloaded = _peak(2, _placement(offload_optimizer="cpu", offload_params="cpu", teacher_strategy={"t": "cpu_offload"}))
    assert offloaded < plain


def test_items_name_their_parts_and_totals_add_up():
    cluster = ClusterShape(hardware.lookup("A100-40GB"), 2, 2, 1)
    (rank,) = estimate(_stage_models(), cluster, _placement(offload_optimizer="cpu"))
    names = {i.name for i in rank.items}
    assert {"runtime", "student.params", "teacher:t.weights", "teacher:t.window", "zero.buckets",
            "signals.teacher:t", "logits.student", "activations.blocks"} <= names
    assert rank.total_gpu == sum(i.bytes for i in rank.items if i.device == "gpu")
    assert rank.total_cpu == sum(i.bytes for i in rank.items if i.device == "cpu") > 0
    assert 0 < rank.headroom < 1


# ---------------------------------------------------------------- hardware


def test_catalog_has_required_devices_and_did_you_mean():
    for key in ("A100-40GB", "A100-80GB", "H100-80GB", "H200", "L4", "A10G", "V100-32GB", "RTX-4090", "cpu"):
        dev = hardware.lookup(key)
        assert dev is not None and dev.memory > 0 and dev.flops["fp32"] > 0, key
    assert hardware.lookup("a100-40gb").name == "A100-40GB"
    assert not hardware.lookup("V100-32GB").supports("bf16")
    with pytest.raises(hardware.HardwareError, match="did you mean 'A100-40GB'"):
        hardware.require("A100-40G8")


def test_cpu_device_memory_comes_from_the_cluster():
    c = ClusterSpec(gpus_per_node=2, gpu="cpu", cpu_memory=8 * 2**30, span=SPAN)
    assert hardware.device_for(c).memory == 4 * 2**30
    assert hardware.training_precision(c, hardware.device_for(c)) == "fp32"
    gpu = ClusterSpec(gpu="V100-32GB", span=SPAN)
    assert hardware.training_precision(gpu, hardware.device_for(gpu)) == "fp16"


# ---------------------------------------------------------------- logit kernels


def test_planner_chunk_size_is_the_runtime_kernels():
    from planner import memory
    from runtime import chunked

    assert memory.CHUNK_ELEMENTS == chunked.CHUNK_ELEMENTS


def _lm(vocab=49152, hidden=576):
    arch = arch_from_config({"model_type": "llama", "num_hidden_layers": 4, "hidden_size": hidden,
                             "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
                             "vocab_size": vocab})
    return _model("s", "student", arch)


def test_logit_items_per_kernel():
    from planner.memory import CHUNK_ELEMENTS, student_logits

    m = _lm()
    rows, V = 4 * 2048, 49152
    chunk = (CHUNK_ELEMENTS // V) * V
    dense = {i.name: i.bytes for i in student_logits(m, 4, 2048, 2, True, ("mse",))}
    assert dense == {"logits.student": rows * V * 2, "loss.saved": rows * V * 4, "loss.backward": rows * V * 8}
    kl = {i.name: i.bytes for i in student_logits(m, 4, 2048, 2, True, ("kl", "ce"))}
    assert kl == {"logits.student": rows * V * 2, "loss.grad": 2 * rows * V * 2, "loss.chunks": 4 * chunk * 4}
    fused = {i.name: i.bytes for i in student_logits(m, 4, 2048, 2, True, ("jsd",), fused=True)}
    assert fused == {"loss.head_grads": rows * 576 * 2 + V * 576 * 4, "loss.chunks": 5 * chunk * 4 + chunk * 2}


def test_fused_head_needs_a_whole_head_on_the_rank():
    from planner.memory import fused_head

    models = _stage_models()
    models = StageModels(students=models.students, teachers=models.teachers, seq_len=models.seq_len,
                         logit_losses={"s": ("kl",), "t": ("kl",)}, fusable=frozenset({"s", "t"}))
    assert fused_head(models, "s", _placement(zero_stage=2)) and not fused_head(models, "s", _placement(zero_stage=3))
    assert fused_head(models, "t", _placement(teacher_strategy={"t": "replicated"}))
    assert not fused_head(models, "t", _placement(teacher_strategy={"t": "sharded"}))


# ---------------------------------------------------------------- head / embedding weight gradients in backward


def _items(model, **kw) -> dict[str, int]:
    from planner.memory import student_items

    cap = ModelCapture(model="s", points=[CapturePoint(kind="logits")], stop_after_layer=None, needs_head=True)
    args = dict(losses=("ce",), grads_held=True) | kw
    return {i.name: i.bytes for i in student_items(model, cap, 2, 128, 4, hardware.lookup("cpu"), False, **args)}


def _tied(tied: bool, adapter=None) -> ModelSpec:
    arch = arch_from_config({**_lm().arch.config, "tie_word_embeddings": tied})
    return ModelSpec(name="s", role="student", source_kind="catalog", source="x", arch=arch, dtype="fp32",
                     adapter=adapter, span=SPAN)


VH = 49152 * 576 * 4  # one fp32 V x h gradient


def test_tied_head_gradient_sets_the_end_of_backward_peak():
    # bench/lora.py measured 3 V x h at the end of backward (head grad, embedding grad, their sum), nothing else
    items = _items(_tied(True))
    forward = sum(b for n, b in items.items() if not n.startswith(("activations.head_weight_grad",
                                                                    "activations.tied_head_grad")))
    at_head = items["activations.blocks"] + items["activations.embeddings_norm"] + items["loss.grad"] + VH
    assert items["activations.head_weight_grad"] == at_head - forward > 0
    assert items["activations.tied_head_grad"] == 3 * VH - at_head > 0
    assert sum(items.values()) == 3 * VH and "activations.embedding_grad" not in items
    # first micro-batch (no .grad yet): the sum becomes .grad, two V x h beyond the states; no head temporary
    first = _items(_tied(True), grads_held=False)
    assert sum(first.values()) == 2 * VH and "activations.head_weight_grad" not in first


def test_untied_head_gradient_is_a_temporary_only_while_grads_are_held():
    items = _items(_tied(False))
    assert "activations.tied_head_grad" not in items and "activations.embedding_grad" not in items
    at_head = items["activations.blocks"] + items["activations.embeddings_norm"] + items["loss.grad"] + VH
    assert sum(items.values()) == at_head  # measured 201.9 MiB vs 201.2 planned (bench/lora.py)
    first = _items(_tied(False), grads_held=False)
    assert not {n for n in first if n.startswith(("activations.head", "activations.tied", "activations.embedding_g"))}


def test_frozen_embeddings_and_fused_heads_form_no_head_gradient_temporary():
    from gkdlang.lora import adapter_params
    from gkdlang.spec import LoraSpec

    arch = _tied(True).arch
    lora = LoraSpec(r=8, alpha=16.0, targets=["q_proj", "v_proj"], params=adapter_params(arch, 8, ["q_proj", "v_proj"]))
    assert not {n for n in _items(_tied(True, lora)) if "grad" in n and n.startswith("activations.")}
    fused = _items(_tied(True), fused=True)  # the head's weight gradient is loss.head_grads, priced from the loss on
    assert "activations.head_weight_grad" not in fused and "loss.head_grads" in fused
    assert sum(fused.values()) == max(3 * VH, sum(b for n, b in fused.items() if n != "activations.tied_head_grad"))


@pytest.mark.parametrize("zero,accum,held", [(0, 1, False), (0, 4, True), (1, 1, False), (1, 2, True),
                                             (2, 1, True), (3, 1, True)])
def test_placements_price_the_gradient_temporaries_when_grads_are_held(zero, accum, held):
    from planner.memory import grads_held

    assert grads_held(zero, accum) is held
    s = _tied(True)
    models = StageModels(students=[(s, count_params(s.arch), ModelCapture(
        model="s", points=[CapturePoint(kind="logits")], stop_after_layer=None, needs_head=True))], teachers=[],
        seq_len=128, logit_losses={"s": ("ce",)})
    cluster = ClusterShape(hardware.lookup("cpu"), 1, 1, 1)
    p = Placement(teacher_strategy={}, zero_stage=zero, micro_batch=2, grad_accum=accum,
                  activation_checkpointing=False, precision="fp32")
    names = {i.name for i in estimate(models, cluster, p)[0].items}
    assert ("activations.head_weight_grad" in names) is held and "activations.tied_head_grad" in names
