"""LoRA students: adapter parameter counts equal peft's, the checker's rules, the planner pricing the trainable
subset (no ZeRO-3), a real `gkdc run` whose adapter peft loads and whose merged student `from_pretrained` loads,
and exact resume of a LoRA student after SIGKILL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clitools import gkdc
from gkdlang.arch import arch_from_config
from gkdlang.lora import DEFAULT_TARGETS, LINEARS, adapter_params
from gkdlang.lower import check_source

LLAMA = dict(model_type="llama", vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


def _hf(config: dict):
    import transformers as tf

    cfg = tf.AutoConfig.for_model(**config)
    return tf.AutoModelForMaskedLM.from_config(cfg) if cfg.model_type == "bert" else \
        tf.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("config", [
    LLAMA,
    dict(model_type="gpt2", vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64),
    dict(model_type="bert", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
         num_attention_heads=2, max_position_embeddings=64),
], ids=["llama", "gpt2", "bert"])
def test_adapter_params_equal_peft_for_every_target(config) -> None:
    from peft import LoraConfig, get_peft_model

    arch = arch_from_config(config)
    for targets in ([*DEFAULT_TARGETS[arch.family]], [*LINEARS[arch.family]]):
        model = get_peft_model(_hf(config), LoraConfig(r=3, lora_alpha=6, target_modules=targets))
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert adapter_params(arch, 3, targets) == trained, targets


# ---------------------------------------------------------------- checking


def _check(tmp_path: Path, student: str, extra: str = "") -> list:
    (tmp_path / "c.txt").write_text("the cat sat\n" * 8)
    text = (f'teacher t = hf("tiny-llama")\nstudent s = like(t) {{ {student} }}\n{extra}'
            'data c = text("c.txt") { seq_len: 16 }\nstage a { data: c, steps: 2, loss: kl(t.logits, s.logits) }\n')
    return check_source(text, "l.gkd", base_dir=tmp_path).diagnostics


def test_lora_options_are_lowered_with_defaults(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("the cat sat\n" * 8)
    r = check_source('teacher t = hf("tiny-llama")\nstudent s = like(t) { layers: 1, init: copy(t), '
                     'adapter: lora(r: 4, targets: [q_proj, "o_proj"]) }\ndata c = text("c.txt")\n'
                     'stage a { data: c, steps: 2, loss: kl(t.logits, s.logits) }\n', "l.gkd", base_dir=tmp_path)
    adapter = r.spec.models["s"].adapter
    assert (adapter.r, adapter.alpha, adapter.dropout, adapter.targets) == (4, 16.0, 0.0, ["q_proj", "o_proj"])
    assert adapter.params == adapter_params(r.spec.models["s"].arch, 4, ["q_proj", "o_proj"]) > 0


@pytest.mark.parametrize("student, code, at", [
    ("layers: 1, init: copy(t), adapter: lora(targets: [q_porj])", "bad-value", "q_porj"),
    ("layers: 1, init: copy(t), adapter: lora(r: 0)", "bad-value", "0)"),
    ("layers: 1, init: copy(t), adapter: lora(rank: 4)", "unknown-option", "rank"),
    ("layers: 1, init: copy(t), adapter: lora(dropout: 1.0)", "bad-value", "1.0"),
    ("layers: 1, init: copy(t), adapter: topk()", "type-mismatch", "topk"),
    ("layers: 1, adapter: lora()", "adapter-random-base", "lora"),
])
def test_bad_adapters_are_located(tmp_path: Path, student: str, code: str, at: str) -> None:
    found = [d for d in _check(tmp_path, student) if d.code == code]
    col = len("student s = like(t) { ") + student.index(at) + 1
    assert found and (found[0].span.line, found[0].span.col) == (2, col), found


def test_an_adapter_on_a_teacher_or_a_compressed_student_is_refused(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("the cat sat\n" * 8)
    r = check_source('teacher t = hf("tiny-llama") { adapter: lora() }\nstudent s = like(t) { layers: 1 }\n'
                     'data c = text("c.txt")\nstage a { data: c, steps: 2, loss: kl(t.logits, s.logits) }\n',
                     "l.gkd", base_dir=tmp_path)
    assert any(d.code == "bad-value" and "student option" in d.message for d in r.diagnostics)
    diags = _check(tmp_path, "layers: 1, init: copy(t), adapter: lora()",
                   "vocab s from t { keep: 50%, rank: frequency(c) }\n")
    assert any(d.code == "conflicting-options" and "LoRA" in d.message for d in diags)


# ---------------------------------------------------------------- planning


def _plan(tmp_path: Path, student: str, placement: str = ""):
    from planner.build import build_plan

    (tmp_path / "c.txt").write_text("the cat sat\n" * 64)
    text = (f'teacher t = hf("tiny-llama")\nstudent s = like(t) {{ {student} }}\n'
            'data c = text("c.txt") { seq_len: 64 }\nstage a { data: c, steps: 2, batch: 4, '
            f'loss: kl(t.logits, s.logits) }}\ncluster {{ gpus: 2 x A100-40GB }}\n{placement}')
    r = check_source(text, "l.gkd", base_dir=tmp_path)
    assert r.ok, r.diagnostics
    return r.spec, build_plan(r.spec, gkdc_version="t", spec_path=str(tmp_path / "l.gkd"))


def _items(plan) -> dict[str, int]:
    return {i.name: i.bytes for i in plan.stages[0].memory[0].items}


def test_the_plan_prices_only_the_adapter_for_grads_and_optimizer(tmp_path: Path) -> None:
    spec, full = _plan(tmp_path, "layers: 2, init: copy(t), dtype: fp32", 'placement { zero: 0 }')
    _, lora = _plan(tmp_path, "layers: 2, init: copy(t), dtype: fp32, adapter: lora(r: 4)", 'placement { zero: 0 }')
    total = next(m for m in full.models if m.name == "s").parameters
    adapter = spec.models["s"].arch and next(m for m in lora.models if m.name == "s").trainable_parameters
    assert 0 < adapter < total / 20
    f, l = _items(full), _items(lora)
    w = 2  # bf16 training on A100s
    assert f["student.params"] == w * total and l["student.params"] == w * adapter
    assert l["student.frozen_params"] == w * total and "student.frozen_params" not in f
    assert f["student.grads"] == w * total and l["student.grads"] == w * adapter
    assert l["student.optimizer"] * total == f["student.optimizer"] * adapter
    assert "activations.embedding_grad" not in l
    assert lora.stages[0].memory[0].total_gpu < full.stages[0].memory[0].total_gpu
    assert lora.stages[0].step_time_parts["compute_student"] < full.stages[0].step_time_parts["compute_student"]


def test_zero3_is_never_planned_for_a_lora_student(tmp_path: Path) -> None:
    _, plan = _plan(tmp_path, "layers: 2, init: copy(t), adapter: lora()")
    assert plan.stages[0].placement.zero_stage < 3
    assert all(a.placement.zero_stage < 3 for a in plan.stages[0].alternatives)
    _, refused = _plan(tmp_path, "layers: 2, init: copy(t), adapter: lora()", "placement { zero: 3 }")
    assert [d.code for d in refused.diagnostics] == ["pin-unavailable"]


# ---------------------------------------------------------------- running


SPEC = """teacher t = hf("{folder}") {{ init: random, dtype: fp32 }}
student s = like(t) {{ layers: 1, init: copy(t, layers: [1]), dtype: fp32, adapter: lora(r: 4, alpha: 8, targets: [q_proj, v_proj, down_proj]) }}
data c = text("{data}") {{ seq_len: 16 }}
stage a {{
  data: c
  steps: {steps}
  batch: 4
  save_every: 2
  optimizer: adamw(lr: 5e-2)
  loss: kl(t.logits, s.logits, T: 2) + mse(t.query[1], s.query[0])
}}
"""


def llama_folder(root: Path) -> Path:
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = root / "llama"
    words = "the cat sat on a mat dog ran to park bird sang in tree".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *words])},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(folder)
    tf.AutoConfig.for_model(**{**LLAMA, "vocab_size": len(fast), "pad_token_id": 0, "eos_token_id": 2}) \
        .save_pretrained(folder)
    (root / "c.txt").write_text("".join(f"{' '.join(words[i % 7: i % 7 + 5])}\n" for i in range(40)))
    return folder


def _spec(root: Path, steps: int) -> Path:
    folder = llama_folder(root)
    spec = root / "l.gkd"
    spec.write_text(SPEC.format(folder=folder, data=root / "c.txt", steps=steps))
    return spec


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    out = root / "run"
    r = gkdc("run", str(_spec(root, 6)), "--out", str(out), "--no-progress", "--allow-path", str(root))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_the_adapter_loads_with_peft_and_equals_the_merged_student(lora_run: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = lora_run / "models" / "s" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and sorted(config["target_modules"]) == \
        ["down_proj", "q_proj", "v_proj"] and config["base_model_name_or_path"] == "base"
    base = AutoModelForCausalLM.from_pretrained(adapter / "base")
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "student").eval()
    plain = AutoModelForCausalLM.from_pretrained(adapter / "base").eval()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        got, want, before = peft_model(ids).logits, merged(ids).logits, plain(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(before, want, atol=1e-3)  # the adapter learned something
    assert (lora_run / "student" / "adapter" / "adapter_model.safetensors").is_file()
    # only the targeted modules changed in the merged student; everything else is the frozen base
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, plain.state_dict()[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("q_proj", "v_proj", "down_proj") for k in changed), changed


def test_the_lora_plan_reports_the_adapter_as_trainable(lora_run: Path) -> None:
    plan = json.loads((lora_run / "plan.json").read_text())
    s = next(m for m in plan["models"] if m["name"] == "s")
    assert s["trainable_parameters"] == plan["spec"]["models"]["s"]["adapter"]["params"] < s["parameters"] / 5


@pytest.mark.deepspeed
def test_a_killed_lora_run_resumes_to_the_same_adapter_and_student(tmp_path: Path, lora_run: Path) -> None:
    from test_recipe import student_tensors
    from test_resume import _kill_at

    spec = _spec(tmp_path, 6)
    plan = tmp_path / "plan.json"
    r = gkdc("plan", str(spec), "-o", str(plan), "--allow-path", str(tmp_path))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    _kill_at(plan, out, 3, 0.05)
    assert not (out / "student").exists()
    r = gkdc("run", str(plan), "--out", str(out), "--resume", "--no-progress", "--allow-path", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    expected, got = student_tensors(lora_run), student_tensors(out)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    from safetensors.torch import load_file

    a = load_file(str(lora_run / "models" / "s" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "models" / "s" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _lora_bench():
    import importlib.util
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))  # bench/lora.py imports bench/memory_accuracy.py
    spec = importlib.util.spec_from_file_location("lora_bench", bench / "lora.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lora_bench"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], [*LINEARS["llama"]]], ids=["default", "all"])
def test_planned_lora_memory_matches_measured(targets) -> None:
    """Model states and the step peak of a peft LoRA student, planned vs measured (bench/lora.py, small shape):
    frozen weights keep no saved inputs, so the step peak is below the full student's."""
    bench = _lora_bench()
    config = {**LLAMA, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160}
    model = bench.spec_for(targets, 4, config)
    states, peak = bench.measured(bench.build(model), 2, 32)
    p_states, p_peak = bench.planned(model, 2, 32)
    assert abs(p_states / states - 1) < 1e-3, (p_states, states)  # AdamW's step counters: 4 B per tensor
    assert abs(p_peak / peak - 1) < 0.05, (p_peak, peak)
    _, full_peak = bench.planned(bench.spec_for(None, 4, config), 2, 32)
    assert p_peak < full_peak


def test_the_tutorials_lora_example_saves_an_adapter_and_a_merged_student(tmp_path: Path) -> None:
    """docs/tutorial.md's LoRA section, as written (a shorter stage): the run's adapter loads with peft, the
    merged student with from_pretrained (the section's python block, run as is), and both give the same logits."""
    import shlex

    from clitools import doc_section_blocks

    commands = [c for b in doc_section_blocks("tutorial.md", "## 10. LoRA students") for c in b.splitlines()]
    out = tmp_path / "lora"
    for command in commands:
        argv = shlex.split(command.replace("runs/lora", str(out)))[1:]
        r = gkdc(*argv, *(("--max-steps", "3", "--no-progress") if argv[0] == "run" else ()))
        assert r.returncode == 0, r.stderr[-3000:]
    (code,) = doc_section_blocks("tutorial.md", "## 10. LoRA students", "python")
    names: dict = {}
    exec(code.replace("runs/lora", str(out)), names)  # noqa: S102 (the tutorial's own block)
    ids = torch.tensor([[2, 9, 31, 8, 3]])
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out / "models" / "small" / "adapter" / "base").eval()
    with torch.no_grad():
        got, want, before = names["adapted"].eval()(ids).logits, names["merged"].eval()(ids).logits, plain(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.equal(before, want)  # three steps of the adapter changed the student
