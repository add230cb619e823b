"""The recipe end to end on one rank: tiny local GPT-2 teacher, derived student, two stages, hand-built Plan.

Also holds the fixture builders the resume and multi-rank tests import (``make_plan``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import pytest
import torch

from gkdlang.arch import arch_from_config, derive_config
from gkdlang.spec import (
    ClusterSpec,
    DataSpec,
    HeadSpec,
    KeepBest,
    LossTerm,
    LRScheduleSpec,
    ModelSpec,
    Project,
    OptimizerSpec,
    Schedule,
    SignalNode,
    Span,
    Spec,
    StageSpec,
)
from planner.plan import CapturePoint, ModelCapture, Placement, Plan, ResolvedModel, StagePlan, TokensPerStep, sealed
from runtime.errors import RunError

SPAN = Span(file="spec.gkd", line=1, col=1, end_line=1, end_col=2)
WORDS = [f"w{i}" for i in range(40)]
SEQ = 12


# ---------------------------------------------------------------- fixture builders


def _tokenizer(directory: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    fast.save_pretrained(directory)
    return fast


def _teacher_dir(root: Path) -> tuple[Path, dict]:
    """A tiny random GPT-2 saved like a real local model (config, safetensors, tokenizer)."""
    import transformers as tf

    directory = root / "teacher"
    tok = _tokenizer(directory)
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=32,
                        pad_token_id=0, bos_token_id=2, eos_token_id=2)
    tf.GPT2LMHeadModel(cfg).save_pretrained(directory)
    return directory, json.loads((directory / "config.json").read_text())


def _corpus(root: Path, lines: int = 48) -> Path:
    rng = random.Random(0)
    path = root / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(lines)))
    return path


def _sig(model, kind, layer=None):
    return SignalNode(model=model, kind=kind, layer=layer)


def _capture(model: str, points: list[tuple[str, int | None]]) -> ModelCapture:
    return ModelCapture(model=model, points=[CapturePoint(kind=k, layer=l) for k, l in points],
                        stop_after_layer=None, needs_head=True)


def distill_terms(weight: Schedule | None = None) -> list[LossTerm]:
    """KL on logits (T=2, not pad) + MSE of the projected last hidden state."""
    proj = Project(inputs=[_sig("s", "hidden", 1)], dim_in=16, dim_out=32, module="fit_dense")
    return [
        LossTerm(id="kd/kl[logits]", fn="kl", target=_sig("t", "logits"), pred=_sig("s", "logits"), mask="not pad",
                 options={"T": 2.0}, weight=weight or Schedule(value=1.0), span=SPAN),
        LossTerm(id="hidden/mse[s1<-t1]", fn="mse", target=_sig("t", "hidden", 1), pred=proj, mask="not pad",
                 weight=Schedule(value=0.5), span=SPAN),
    ]


def hard_terms() -> list[LossTerm]:
    return [
        LossTerm(id="hard/ce", fn="ce", target=_sig(None, "tokens"), pred=_sig("s", "logits"), span=SPAN),
        LossTerm(id="soft/kl", fn="kl", target=_sig("t", "logits"), pred=_sig("s", "logits"), mask="not pad",
                 weight=Schedule(kind="linear", value=0.0, end=1.0), span=SPAN),
    ]


def ds_config(zero: int, micro: int, accum: int, world: int, precision: str = "fp32") -> dict:
    cfg = {
        "train_batch_size": micro * accum * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": {"stage": zero},
        "steps_per_print": 10**9,
        "gradient_clipping": 1.0,
    }
    if zero == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def make_plan(
    root: Path,
    *,
    steps: tuple[int, ...] = (6,),
    zero: int = 0,
    world: int = 1,
    micro: int = 2,
    accum: int = 2,
    save_every: int | None = None,
    weight: Schedule | None = None,
    lr: float = 3e-3,
    precision: str = "fp32",
    sharded_teacher: bool = False,
    packed: bool = False,
    split: float | None = None,
    eval_every: int | None = None,
    keep_best: str | None = None,
) -> Path:
    """Write teacher, corpus, spec and plan.json under ``root``; stage 0 distills, stage 1 adds hard labels."""
    root.mkdir(parents=True, exist_ok=True)
    teacher_dir, teacher_cfg = _teacher_dir(root)
    _corpus(root)
    spec_path = root / "spec.gkd"
    spec_path.write_text("# hand-built plan for tests\n")
    t_arch = arch_from_config(teacher_cfg)
    s_cfg = derive_config(t_arch, {"hidden": 16})
    models = {
        "t": ModelSpec(name="t", role="teacher", source_kind="local", source=str(teacher_dir), arch=t_arch,
                       dtype="fp32", span=SPAN),
        "s": ModelSpec(name="s", role="student", source_kind="derived", source=None, base="t",
                       overrides={"hidden": 16}, arch=arch_from_config(s_cfg), dtype="fp32", frozen=False,
                       head=HeadSpec(kind="lm"), span=SPAN),
    }
    data = {"corpus": DataSpec(name="corpus", format="text", paths=["corpus.txt"], seq_len=SEQ, split=split,
                               span=SPAN)}
    best = KeepBest(metric=keep_best, mode="max" if keep_best == "accuracy" else "min", span=SPAN) if keep_best else None
    losses = [distill_terms(weight), hard_terms()]
    stages, stage_plans = [], []
    for i, n in enumerate(steps):
        name = f"stage{i}"
        stages.append(StageSpec(
            name=name, after=[f"stage{i - 1}"] if i else [], data="corpus", steps=n, batch=micro * accum * world,
            micro_batch=micro, optimizer=OptimizerSpec(lr=lr), schedule=LRScheduleSpec(kind="cosine", warmup=0.2),
            loss=losses[i % 2], students=["s"], teachers=["t"], save_every=save_every, eval_every=eval_every,
            keep_best=best, span=SPAN))
        points = [("logits", None), ("hidden", 1)]
        teacher_cfg = {k: v for k, v in ds_config(3, micro, accum, world, precision).items() if k != "gradient_clipping"}
        stage_plans.append(StagePlan(
            name=name, captures=[_capture("t", points), _capture("s", points)],
            placement=Placement(teacher_strategy={"t": "sharded" if sharded_teacher else "replicated"},
                                zero_stage=zero, micro_batch=micro, grad_accum=accum, activation_checkpointing=False,
                                precision=precision),
            memory=[], step_time_s=0.0, total_steps=n,
            deepspeed_config=ds_config(zero, micro, accum, world, precision),
            teacher_configs={"t": teacher_cfg} if sharded_teacher else {},
            tokens=TokensPerStep(packed=packed, why="test", seq_len=SEQ, real=0.0, computed=0.0, source="test")))
    spec = Spec(file=str(spec_path), source_hash="test", models=models, data=data, stages=stages,
                cluster=ClusterSpec(gpus_per_node=world, span=SPAN))
    launch = ["deepspeed", "--num_gpus", str(world), "--module", "runtime.worker", "plan.json", "out"]
    plan = sealed(Plan(gkdc_version="0.1.0", spec_hash=hashlib.sha256(spec_path.read_text().encode()).hexdigest(),
                spec_file="spec.gkd", spec=spec,
                models=[ResolvedModel(name="t", role="teacher", family="gpt2", parameters=0, trainable_parameters=0),
                        ResolvedModel(name="s", role="student", family="gpt2", parameters=0, trainable_parameters=0)],
                stages=stage_plans, world_size=world, launch=launch))
    path = root / "plan.json"
    path.write_text(plan.model_dump_json(indent=1))
    return path


def load(plan_path: Path) -> Plan:
    return Plan.model_validate_json(plan_path.read_text())


def student_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted((out / "student").glob("*.safetensors"))
    assert files, f"no safetensors under {out / 'student'}"
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    from runtime.recipe import run

    root = tmp_path_factory.mktemp("two_stage")
    plan_path = make_plan(root, steps=(8, 4), save_every=3)
    result = run(load(plan_path), plan_path, root / "out", resume=False, progress=False)
    return root, plan_path, result


def test_two_stages_train_log_and_save(two_stage):
    root, _, result = two_stage
    out = root / "out"
    recs = records(out)
    assert [(r["stage"], r["step"]) for r in recs] == [("stage0", i) for i in range(1, 9)] + [
        ("stage1", i) for i in range(1, 5)]
    assert set(recs[0]["terms"]) == {"kd/kl[logits]", "hidden/mse[s1<-t1]"}
    assert set(recs[-1]["terms"]) == {"hard/ce", "soft/kl"}
    for r in recs:
        assert r["total"] == pytest.approx(sum(r["terms"].values()), rel=1e-6)
    stage0 = [r["total"] for r in recs[:8]]
    assert stage0[-1] < stage0[0], "distillation loss should fall on a tiny repeated corpus"
    # cosine schedule with 20% warm-up over 8 steps: rises, then decays
    lrs = [r["lr"] for r in recs[:8]]
    assert lrs[0] < lrs[1] and lrs[-1] < max(lrs)
    assert [s.steps for s in result.stages] == [8, 4]
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_student_is_a_loadable_hf_model_with_the_trained_weights(two_stage):
    import transformers as tf
    from safetensors.torch import load_file

    root, _, result = two_stage
    out = root / "out"
    assert result.student_dir == out / "student"
    model = tf.AutoModelForCausalLM.from_pretrained(out / "student")
    assert model.config.n_embd == 16 and model.config.n_layer == 2
    final_stage = load_file(str(out / "checkpoints" / "stage-1.safetensors"))
    saved = student_tensors(out)
    for key, value in saved.items():
        assert torch.equal(value.float(), final_stage[key]), key
    # stored once: the exported weights are the hand-off file (one inode), read-only so no tool rewrites both
    exported = (out / "student" / "model.safetensors").stat()
    assert exported.st_ino == (out / "checkpoints" / "stage-1.safetensors").stat().st_ino and exported.st_nlink == 2
    assert not exported.st_mode & 0o222
    # stage 1 continued from stage 0's weights, so they differ from stage 0's end but not wildly
    after0 = load_file(str(out / "checkpoints" / "stage-0.safetensors"))
    key = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(after0[key], final_stage[key])
    assert (after0[key] - final_stage[key]).abs().max() < 0.5


def test_rerun_into_same_dir_needs_resume_and_resume_of_finished_run_is_a_noop(two_stage):
    from runtime.recipe import run

    root, plan_path, _ = two_stage
    with pytest.raises(RunError, match="already holds a run; pass --resume"):
        run(load(plan_path), plan_path, root / "out", resume=False, progress=False)
    before = student_tensors(root / "out")
    result = run(load(plan_path), plan_path, root / "out", resume=True, progress=False)
    assert result.resumed_from == "stage1:4"
    after = student_tensors(root / "out")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_changed_spec_and_unknown_schema_are_refused(tmp_path):
    from runtime.recipe import run

    plan_path = make_plan(tmp_path, steps=(1,))
    plan = load(plan_path)
    future = plan.model_copy(update={"plan_schema_version": 99})
    with pytest.raises(RunError, match="plan_schema_version 99 is not supported"):
        run(future, plan_path, tmp_path / "out", resume=False, progress=False)
    (tmp_path / "spec.gkd").write_text("# edited after planning\n")
    with pytest.raises(RunError, match=r"spec\.gkd changed since .*plan\.json was made"):
        run(plan, plan_path, tmp_path / "out", resume=False, progress=False)


def test_non_finite_loss_stops_naming_stage_step_and_term_and_keeps_last_checkpoint(tmp_path):
    from runtime.checkpoint import read_progress
    from runtime.recipe import run

    # the KL weight jumps to inf halfway through the stage (step 5 of 8)
    weight = Schedule(kind="step", value=1.0, end=1e39, until=0.5)  # inf in fp32
    plan_path = make_plan(tmp_path, steps=(8,), save_every=2, weight=weight)
    with pytest.raises(RunError) as err:
        run(load(plan_path), plan_path, tmp_path / "out", resume=False, progress=False)
    message = str(err.value)
    assert "stage 'stage0', step 5" in message and "loss term 'kd/kl[logits]' is inf" in message
    assert "last good checkpoint (stage0:4) is kept" in message
    progress = read_progress(tmp_path / "out")
    assert (progress.stage, progress.step, progress.done) == (0, 4, False)
    assert (tmp_path / "out" / "checkpoints" / progress.tag).is_dir()


def test_bf16_engine_trains_an_fp32_built_student(tmp_path):
    from runtime.recipe import run

    plan_path = make_plan(tmp_path, steps=(3,), precision="bf16")
    result = run(load(plan_path), plan_path, tmp_path / "out", resume=False, progress=True)
    assert math.isfinite(result.stages[0].last["total"])
    assert len(records(tmp_path / "out")) == 3
    assert student_tensors(tmp_path / "out")  # saved from the gathered fp32 copy


def test_worker_reports_user_errors_without_traceback(tmp_path, capsys):
    from runtime.worker import main

    assert main([str(tmp_path / "missing.json"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: plan file {tmp_path / 'missing.json'} does not exist"
    from planner.plan import PLAN_SCHEMA_VERSION

    (tmp_path / "bad.json").write_text(f'{{"plan_schema_version": {PLAN_SCHEMA_VERSION}}}')
    assert main([str(tmp_path / "bad.json"), str(tmp_path / "out"), "--local_rank=0"]) == 2
    assert "is not a valid gkdc plan" in capsys.readouterr().err


def test_zero3_teacher_engine_is_partitioned_and_gives_the_plain_signals():
    import transformers as tf

    from runtime import engine as eng
    from runtime.adapters import capture

    eng.prepare_process()
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=16)
    plain = tf.GPT2LMHeadModel(cfg).eval()
    copy = tf.GPT2LMHeadModel(cfg)
    copy.load_state_dict(plain.state_dict())
    teacher = eng.init_teacher(copy, {k: v for k, v in ds_config(3, 2, 1, 1).items() if k != "gradient_clipping"},
                               name="t", stage="x")
    assert all(p.numel() == 0 for p in copy.parameters())  # partitioned: full weights exist only when gathered
    batch = {"input_ids": torch.randint(0, 50, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    points = _capture("t", [("logits", None), ("hidden", 1)])
    got, want = capture(teacher, batch, points, grad=False), capture(plain, batch, points, grad=False)
    for key in want:
        torch.testing.assert_close(got[key], want[key])
    eng.release(teacher)
