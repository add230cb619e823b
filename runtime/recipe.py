"""Plan -> trained student: the run, top to bottom (setup, stages, train, checkpoint, save, cleanup).

``run`` checks the plan, starts this rank's DeepSpeed process, then runs the stages in plan order. Each
stage builds its models (the trained model carries its weights over from the stage before), its data,
its loss graph, its optimizer and LR schedule, and one DeepSpeed engine that holds the student *and* the
loss graph's projections, so both are trained and checkpointed together. Teachers are frozen replicas, or
ZeRO inference engines when the plan gives them a config. Checkpoints land every ``save_every`` steps and
at the end of each stage; ``resume=True`` continues from the last complete one and ends with the same
weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from gkdlang.spec import StageSpec
from planner.plan import PLAN_SCHEMA_VERSION, ModelCapture, Plan, StagePlan
from runtime import cache
from runtime import checkpoint as ckpt
from runtime import engine as eng
from runtime import interventions as ivs
from runtime import onpolicy
from runtime import peft_student as lora
from runtime import tensor_parallel
from runtime.optim import build_lr_schedule, build_optimizer, lr_factor, optimizer_groups  # noqa: F401
from runtime.adapters import capture
from runtime.errors import RunError
from runtime.evalloop import Evaluator, split_ids
from runtime.export import exported_config
from runtime.rerun import starting_point
from runtime.lossgraph import LossGraph
from runtime.metrics import METRICS_FILE, MetricsLogger, plain_grad_norm, step_grad_norm
from runtime.stagemodels import Placing, StageModels, _placing, _single_student, build_models, build_vocab_map
from runtime.stagekit import SEED, pruned as _pruned, seed_everything as _seed_everything  # noqa: F401 (SEED: used by callers)

DEFAULT_SAVE_EVERY = 500
"""Optimizer steps between checkpoints when a stage gives no ``save_every`` (stage ends always save)."""



@dataclass(frozen=True)
class StageResult:
    name: str
    steps: int
    """Optimizer steps the stage ran in total (including steps done before a resume)."""
    last: dict[str, float]
    """Total and per-term losses of the last step this process ran (empty if it ran none)."""


@dataclass(frozen=True)
class RunResult:
    out_dir: Path
    student_dir: Path | None
    """Where the HF student was saved (rank 0; None on other ranks)."""
    metrics: Path
    stages: tuple[StageResult, ...]
    resumed_from: str | None = None
    """``stage:step`` of the checkpoint the run continued from."""


# ================================================================ the recipe


def run(
    plan: Plan,
    plan_path: Path,
    out_dir: Path,
    *,
    resume: bool,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    allowed_paths: tuple[str, ...] = (),
) -> RunResult:
    """Execute ``plan``; ``max_steps`` caps every stage's optimizer steps (smoke runs)."""
    base_dir = check_plan(plan, plan_path, allowed_paths)
    rank, world = eng.prepare_process()
    if world != plan.world_size:
        raise RunError(f"the plan was made for {plan.world_size} rank(s) but {world} started; "
                       f"launch it with: gkdc run {plan_path}")
    _quiet_libraries()  # our own bar shows training progress; loading bars of every stage would bury it
    out_dir = Path(out_dir)
    logger = MetricsLogger(out_dir, enabled=rank == 0, show_bar=progress, rank=rank)
    state = starting_point(plan, out_dir, resume, rank)  # runtime/rerun.py: says where a resume restarts
    if rank == 0:
        ckpt.write_spec(out_dir, plan.spec.model_dump_json())
    kept = logger.open((state.stage, state.step) if state else None)
    env = _RunEnv(plan, base_dir, out_dir, rank, world, trust_remote_code, allow_pickle, logger, global_step=kept)
    env.weight_files.update(state.trained if state else {})
    trained = {name: _weights_file(Path(p)) for name, p in (state.trained if state else {}).items()}
    results = []
    try:
        for index, (stage, stage_plan) in enumerate(zip(plan.spec.stages, plan.stages)):
            if state is not None and (index < state.stage or (index == state.stage and state.done)):
                results.append(StageResult(stage.name, _capped(stage_plan, max_steps), {}))
                continue
            resume_tag = state.tag if state is not None and index == state.stage else None
            start = state.step if resume_tag else 0
            results.append(run_stage(env, index, stage, stage_plan, trained, start, resume_tag, max_steps))
        student_dir = save_final_student(env, trained)
    finally:
        logger.close()
    _write_rank_result(env, results, trained)
    resumed = f"{state.stage_name}:{state.step}" if state else None
    return RunResult(out_dir, student_dir, out_dir / METRICS_FILE, tuple(results), resumed)


def run_stage(
    env: "_RunEnv",
    index: int,
    stage: StageSpec,
    stage_plan: StagePlan,
    trained: dict[str, Path],
    start: int,
    resume_tag: str | None,
    max_steps: int | None,
) -> StageResult:
    """Setup, train and save one stage; ``trained[name]`` receives the file of the trained model's weights."""
    total = _capped(stage_plan, max_steps)
    live, models = setup_stage(env, index, stage, stage_plan, trained, total, max_steps)
    total = live.total  # counted from the data when the plan could not (total_steps -1)
    if resume_tag is not None:
        restore(env, live.engine, resume_tag, live.data)
    from runtime import divergence

    divergence.note_start(live.engine)  # the scale a checkpoint's weights are checked against

    env.logger.start_stage(stage.name, total, start, [t.id for t in live.graph.terms])
    save_every = stage.save_every or DEFAULT_SAVE_EVERY
    batches = onpolicy.wrap(env, live, models, live.data.micro_batches(start, live.engine.device), start)
    evaluator = Evaluator.for_stage(env, live)  # None when the stage's data holds nothing out
    last: dict[str, float] = {}
    for step in range(start, total):
        last = train_step(env, live, batches, step)
        if evaluator is not None and evaluator.due(step + 1):
            evaluator.evaluate(step + 1)
        if (step + 1) % save_every == 0 and step + 1 < total:
            save_checkpoint(env, live.engine, live.data, index, stage.name, step + 1)
    env.logger.end_stage()

    student = models.modules[live.student]
    if lora.is_wrapped(student):  # the adapter saved, then merged: the stage's weights are a plain model's
        student = lora.finish(student, env.plan.spec.models[live.student], lora.adapter_dirs(env.out_dir, live.student,
                              index == len(env.plan.stages) - 1), models.tokenizer, rank=env.rank,
                              base_dir=env.base_dir, first_stage=live.student not in trained)
    # gathered one tensor at a time and written by rank 0: no rank holds the whole trained model
    path = ckpt.stage_weights_path(env.out_dir, index)
    from runtime import models as M

    M.write_weights(student, path, rank=env.rank)
    eng.barrier()
    trained[live.student] = path
    finish_stage(env, index, stage.name, total, live.student, trained)
    env.exports[live.student] = (exported_config(student), models.tokenizer, models.vocab_maps.get(live.student))
    for engine in [live.engine, *live.teachers.values()]:
        eng.release(engine)
    return StageResult(stage.name, total, last)


def setup_stage(
    env: "_RunEnv",
    index: int,
    stage: StageSpec,
    stage_plan: StagePlan,
    trained: Mapping[str, Path],
    total: int,
    max_steps: int | None = None,
) -> tuple["_LiveStage", "StageModels"]:
    """Models, data, loss graph, optimizer, LR schedule and engines of one stage."""
    student_name = _single_student(stage)
    spec_models = env.plan.spec.models
    interventions = ivs.build(stage, spec_models, SEED + index, stage.optimizer.lr)
    captures = _with_intervention_points({c.model: c for c in stage_plan.captures}, interventions)
    used = [t for t in stage.teachers if t in captures and captures[t].points]  # the planner prunes unread teachers
    offline = cache.offline_teachers(stage_plan.placement.teacher_strategy) & set(used)  # read from their caches
    used = [t for t in used if t not in offline]
    whole = {m for iv in interventions for m in iv.built_models()} - {student_name}  # blocks run by interventions
    blocks_only = sorted(whole - set(used))
    _seed_everything(SEED + 1000 * index)  # same init on every rank (replicas; ZeRO-3 inits on rank 0)
    env.placing = _placing(stage, stage_plan, captures, used, whole)
    models = build_models(env, stage, [*used, *blocks_only], trained)
    lora.wrap_students(models.modules, stage, spec_models, stage_plan.placement.activation_checkpointing)
    data = StageData.build(env, stage, stage_plan, models, index)
    if total < 0:  # epochs over data the planner could not count: count the tokenised examples now
        total = steps_from_epochs(stage, data.sampler.n, max_steps)
    student = models.modules[student_name]
    keep_ids = {vm.name: vm.kept_ids for vm in models.vocab_maps.values()}
    terms = cache.offline_terms(stage.loss, {t: spec_models[t].cache for t in offline}) if offline else stage.loss
    graph = LossGraph(terms, models.archs, keep_ids=keep_ids, seed=SEED + index)
    step_module = DistillStep(student, student_name, graph, _capture_of(captures, student_name, stage), interventions)
    if stage_plan.placement.activation_checkpointing and hasattr(student, "gradient_checkpointing_enable"):
        student.gradient_checkpointing_enable()
    groups = optimizer_groups(step_module, interventions)
    optimizer = build_optimizer(groups, stage.optimizer, stage.name)
    scheduler = build_lr_schedule(optimizer, stage.schedule, total, [g["scale"] for g in groups])
    engine = eng.init_student(step_module, optimizer, scheduler, stage_plan.deepspeed_config, stage=stage.name)
    tp = stage_plan.placement.teacher_tp  # split on the host over the tensor-parallel group, then moved
    teachers = {
        name: eng.init_teacher(tensor_parallel.shard(models.modules[name], tp[name], name) if name in tp else
                               models.modules[name], stage_plan.teacher_configs.get(name), name=name, stage=stage.name)
        for name in used
    }
    blocks = {name: eng.init_teacher(models.modules[name], stage_plan.teacher_configs.get(name), name=name,
                                     stage=stage.name) for name in blocks_only}
    for iv in interventions:  # teachers whose blocks run inside the student's forward (Theseus)
        for name in iv.built_models():
            iv.attach(teachers[name] if name in teachers else blocks[name])
    for name in sorted(offline):
        job = cache.CacheJob(env.plan.spec, index, stage, name, _capture_of(captures, name, stage), env.base_dir)
        teachers[name] = cache.open_teacher(job, models.tokenizer, data.tokens, rank=env.rank, world=env.world,
                                            barrier=eng.barrier)
    teacher_caps = {name: _capture_of(captures, name, stage) for name in teachers}
    _seed_everything(SEED + 1000 * index + 1 + env.rank)  # dropout differs per rank, same on every rerun
    live = _LiveStage(engine, teachers, teacher_caps, graph, data, stage, index, total, student_name,
                      tuple(interventions))
    return live, models


def _with_intervention_points(
    captures: dict[str, ModelCapture], interventions: list[ivs.Base]
) -> dict[str, ModelCapture]:
    """The plan's captures plus what the interventions read in the first pass (interchange sources, ...)."""
    out = dict(captures)
    for iv in interventions:
        for model, points in iv.extra_points().items():
            base = out.get(model) or ModelCapture(model=model, points=[], stop_after_layer=None, needs_head=False)
            out[model] = ivs.with_points(base, points)
    return out


@dataclass(frozen=True)
class _LiveStage:
    """The running pieces of one stage that every step uses."""

    engine: Any
    teachers: Mapping[str, nn.Module]
    teacher_caps: Mapping[str, ModelCapture]
    graph: LossGraph
    data: "StageData"
    stage: StageSpec
    index: int
    total: int
    student: str
    interventions: tuple[ivs.Base, ...] = ()


def train_step(
    env: "_RunEnv", live: _LiveStage, batches: Iterator[dict[str, dict[str, torch.Tensor]]], step: int
) -> dict[str, float]:
    """One optimizer step (``grad_accum`` micro-batches); logs and returns the mean losses."""
    engine = live.engine
    progress = step / live.total
    epoch = live.data.epoch_of(step)
    active = live.graph.active_terms(progress, step=step, epoch=epoch)
    for iv in live.interventions:
        active = iv.gate(active, ivs.StepInfo(step, epoch, progress, rank=env.rank))
    lr = engine.optimizer.param_groups[0]["lr"]
    accum = engine.gradient_accumulation_steps()
    sums: dict[str, float] = {}
    fed = torch.zeros(2, dtype=torch.long)  # real tokens and positions run (with padding) on this rank
    started, norm, watch = time.perf_counter(), None, onpolicy.observer(batches)
    for micro in range(accum):
        inputs = next(batches)
        mask = inputs["student"]["attention_mask"]
        fed += torch.tensor([int(mask.sum()), mask.numel()])
        info = ivs.StepInfo(step, epoch, progress, micro, env.rank)
        scoring = time.perf_counter()
        signals = {
            name: model.signals(inputs["teacher"]) if isinstance(model, cache.CachedTeacher)
            else capture(model, inputs["teacher"], live.teacher_caps[name], grad=False)
            for name, model in live.teachers.items()
        }
        for iv in live.interventions:  # counterfactual teacher passes (DIITO)
            signals.update(iv.teacher_passes(live.teachers, inputs["teacher"], signals, info))
        watch.teacher_done(inputs, signals, scoring)
        loss, parts = engine(inputs["student"], signals, info, active)
        _check_finite(env, live.stage.name, step, loss, parts)
        engine.backward(loss)
        norm = plain_grad_norm(engine) if micro == accum - 1 else None
        engine.step()
        for key, value in {"total": sum(parts.values()), **parts}.items():
            sums[key] = sums.get(key, 0.0) + value / accum
    for iv in live.interventions:  # triggers on running losses (SID's plateau) see the step's values
        iv.observe(sums, ivs.StepInfo(step, epoch, progress, rank=env.rank))
    total = sums.pop("total", 0.0)
    tokens, positions = eng.all_ranks_sum(fed.to(engine.device)).tolist()  # TokensPerStep counts all ranks
    seconds = time.perf_counter() - started
    record = {"stage": live.stage.name, "stage_index": live.index, "step": step + 1, "lr": lr, "total": total,
              "terms": sums, "tokens": tokens, "positions": positions, "grad_norm": step_grad_norm(engine, norm),
              "step_seconds": seconds, "tokens_per_second": tokens / max(seconds, 1e-9),
              **watch.step_record(seconds)}
    env.logger.log_step(record, env.next_global_step())
    return {"total": total, **sums}


# ================================================================ components


class DistillStep(nn.Module):
    """Student + loss graph + interventions as one module, so DeepSpeed trains and checkpoints the projections
    and the interventions' learned parts (the RL agent) with the student.

    ``forward(batch, teacher_signals, info, active)`` captures the student's planned signals with gradients
    (under the interventions' changes to its forward), runs their extra passes and per-example weights, and
    returns the loss graph's ``(total, per-term values)`` plus the interventions' own losses.
    """

    def __init__(self, student: nn.Module, student_name: str, graph: LossGraph, plan: ModelCapture,
                 interventions: list[ivs.Base] | None = None) -> None:
        super().__init__()
        self.student = student
        self.graph = graph
        self.student_name = student_name
        self.plan = plan
        self.interventions = nn.ModuleList(interventions or [])

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        teacher_signals: Mapping[str, Mapping[tuple[str, int | None], torch.Tensor]],
        info: ivs.StepInfo | float,
        active: set[str] | None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if not isinstance(info, ivs.StepInfo):  # a bare progress (callers without interventions)
            info = ivs.StepInfo(0, 0, float(info))
        run = lambda: self._loss(batch, teacher_signals, info, active)  # noqa: E731
        perturb = next((iv for iv in self.interventions if isinstance(iv, ivs.Perturb)), None)
        return perturb.two_passes(self.student, run) if perturb is not None else run()

    def _loss(self, batch, teacher_signals, info: ivs.StepInfo, active) -> tuple[torch.Tensor, dict[str, float]]:
        signals = dict(teacher_signals)
        with ExitStack() as stack:
            for iv in self.interventions:
                stack.enter_context(iv.student_context(self.student, info))
            signals[self.student_name] = capture(self.student, batch, self.plan, grad=True)
        weights: dict[str, torch.Tensor] = {}
        for iv in self.interventions:
            signals.update(iv.student_passes(self.student_name, self.student, batch, signals, info))
            weights.update(iv.row_weights(signals, batch, info))
        total, parts = self.graph(signals, batch, info.progress, active, step=info.step, epoch=info.epoch,
                                  row_weights=weights)
        for iv in self.interventions:
            for key, value in iv.extra_loss(signals, batch, info).items():
                total = total + value
                parts[key] = float(value.detach())
        return total, parts


def _weights_file(path: Path) -> Path:
    if not path.exists():
        raise RunError(f"weights file {path} of a finished stage is missing; start the run again with another --out (this folder is kept)")
    return path


class StageData:
    """Tokenised data + this rank's resumable sampler -> micro-batches per model (student ids may be remapped)."""

    def __init__(self, tokens: Any, sampler: Any, seed: int, rank: int, train_ids: list[int] | None = None,
                 held_ids: list[int] | None = None) -> None:
        self.tokens = tokens
        self.sampler = sampler
        self.seed = seed
        self.rank = rank
        self.train_ids = train_ids
        """Example ids the sampler's positions stand for (None: every example); the rest are ``held_ids``."""
        self.held_ids = held_ids or []

    @classmethod
    def build(cls, env: "_RunEnv", stage: StageSpec, stage_plan: StagePlan, models: StageModels, index: int):
        from runtime import data as D

        spec = env.plan.spec
        data_spec = spec.data[stage.data]
        student = spec.models[_single_student(stage)]
        max_positions = min(spec.models[m].arch.max_positions for m in [*stage.teachers, *stage.students])
        texts = D.load_texts(data_spec, env.base_dir)
        tokens = D.tokenize(
            texts, data_spec, models.tokenizer, stage.seq_len or data_spec.seq_len,
            causal=not student.arch.is_encoder, vocab_map=models.vocab_maps.get(student.name),
            num_labels=student.head.num_labels, max_positions=max_positions,
            packed=stage_plan.tokens is not None and stage_plan.tokens.packed,
        )
        micro = stage_plan.placement.micro_batch
        train_ids, held_ids = split_ids(len(tokens), data_spec.split, data_spec.name, SEED)  # runtime/evalloop.py
        n_train = len(tokens) if train_ids is None else len(train_ids)
        sampler = D.ResumableSampler(n_train, stage.batch, micro, env.rank, env.world, SEED + index)
        return cls(tokens, sampler, SEED + index, env.rank, train_ids, held_ids)

    def epoch_of(self, step: int) -> int:
        return step // self.sampler.steps_per_epoch

    def micro_batches(self, start_step: int, device: torch.device) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
        """Micro-batches from optimizer step ``start_step`` on: ``{"teacher": batch, "student": batch}`` on device.

        The student's batch carries the compressed-vocabulary ids when its vocabulary is compressed.
        """
        from runtime import data as D

        accum = self.sampler.accum
        for k, ids in enumerate(self.sampler.micro_batches(start_step)):
            step, micro = start_step + k // accum, k % accum
            ids = ids if self.train_ids is None else [self.train_ids[i] for i in ids]
            yield self.batch_of(ids, D.step_seed(self.seed, step, micro, self.rank), device)

    def batch_of(self, ids: list[int], seed: int, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
        """The examples ``ids`` as ``{"teacher": batch, "student": batch}`` on device (``seed``: MLM masks)."""
        batch = self.tokens.collate(ids, seed)
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        student = dict(batch)
        if "student_input_ids" in student:
            student["input_ids"] = student.pop("student_input_ids")
            batch.pop("student_input_ids")
        # example indices let an offline teacher's signals be read from its cache
        return {"teacher": {**batch, "example_ids": torch.tensor(ids, device=device)}, "student": student}


# ================================================================ checkpoints


def save_checkpoint(env: "_RunEnv", engine: Any, data: StageData, index: int, stage: str, step: int) -> None:
    """All ranks: engine state + rank state, then (rank 0) the progress record that makes it complete."""
    tag = ckpt.step_tag(index, step)
    _check_weights_finite(env, engine, stage, step)  # never replace the last good checkpoint by a diverged one
    eng.save_checkpoint(engine, ckpt.checkpoint_dir(env.out_dir), tag)
    ckpt.write_rank_state(env.out_dir, tag, env.rank, data.sampler.state_dict())
    eng.barrier()
    if env.rank == 0:
        record = ckpt.Progress(index, stage, step, False, tag, env.plan.spec_hash, dict(env.weight_files))
        ckpt.write_progress(env.out_dir, record)
        ckpt.prune_tags(env.out_dir, keep=tag)
    eng.barrier()


def finish_stage(
    env: "_RunEnv", index: int, stage: str, steps: int, student: str, trained: Mapping[str, Any]
) -> None:
    """Stage end (the trained model's weights are in ``trained[student]``): the record saying the stage is done."""
    if env.rank == 0:
        env.weight_files[student] = str(trained[student])
        record = ckpt.Progress(index, stage, steps, True, None, env.plan.spec_hash, dict(env.weight_files))
        ckpt.write_progress(env.out_dir, record)
        ckpt.prune_tags(env.out_dir, keep=None)
    eng.barrier()


def restore(env: "_RunEnv", engine: Any, tag: str, data: StageData) -> None:
    with ckpt.weights_only_loads():  # DeepSpeed unpickles its files: only tensors and allow-listed classes load
        eng.load_checkpoint(engine, ckpt.checkpoint_dir(env.out_dir), tag)
    state = ckpt.read_rank_state(env.out_dir, tag, env.rank)
    data.sampler.load_state_dict(state["sampler"])  # refuses a checkpoint of other data or batch sizes
    ckpt.set_rng_state(state["rng"])


# ================================================================ checks and small helpers


def check_plan(plan: Plan, plan_path: Path, allowed_paths: tuple[str, ...] = ()) -> Path:
    """Refuse unknown plan schemas, edited plans (runtime.integrity) and plans whose spec changed; return the
    spec's directory (paths' base)."""
    from runtime.integrity import check_spec_origin, verify_plan

    if plan.plan_schema_version != PLAN_SCHEMA_VERSION:
        raise RunError(
            f"{plan_path}: plan_schema_version {plan.plan_schema_version} is not supported by this gkdc "
            f"(it reads version {PLAN_SCHEMA_VERSION}); re-run `gkdc plan`"
        )
    spec_path = _spec_path(plan, Path(plan_path))
    check_spec_origin(plan, Path(plan_path), spec_path, allowed_paths)
    verify_plan(plan, Path(plan_path), spec_path.parent.resolve(), allowed_paths)
    return spec_path.parent.resolve()


def spec_digest(text: str, uses: list[str]) -> str:
    """The front end's spec hash (gkdlang.digest.spec_hash): one definition, so the two can never drift."""
    from gkdlang.digest import spec_hash

    return spec_hash(text, uses)


def _spec_path(plan: Plan, plan_path: Path) -> Path:
    given = Path(plan.spec_file)
    if given.is_absolute():
        return given
    for candidate in (plan_path.parent / given, Path.cwd() / given):
        if candidate.exists():
            return candidate
    return plan_path.parent / given


def steps_from_epochs(stage: StageSpec, examples: int, max_steps: int | None) -> int:
    """ceil(epochs x examples / batch), as the planner computes it when it can count the data."""
    if stage.epochs is None:
        raise RunError(f"stage '{stage.name}': the plan has no step count and the stage no epochs; re-plan it")
    steps = max(1, math.ceil(stage.epochs * examples / stage.batch))
    return steps if max_steps is None else min(steps, max_steps)


def _capped(stage_plan: StagePlan, max_steps: int | None) -> int:
    return stage_plan.total_steps if max_steps is None else min(stage_plan.total_steps, max_steps)



def _capture_of(captures: Mapping[str, ModelCapture], name: str, stage: StageSpec) -> ModelCapture:
    if name not in captures:
        raise RunError(f"stage '{stage.name}': the plan lists no signals to capture for model '{name}'; re-run `gkdc plan`")
    return captures[name]


def _quiet_libraries() -> None:
    # loading bars of datasets/transformers: one per rank and stage would bury the training output
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _check_finite(env: "_RunEnv", stage: str, step: int, loss: torch.Tensor, parts: Mapping[str, float]) -> None:
    value = sum(parts.values()) if parts else float(loss.detach())
    if eng.all_true(math.isfinite(value)):
        return
    bad = next((k for k, v in parts.items() if not math.isfinite(v)), None)
    where = f"loss term '{bad}' is {parts[bad]}" if bad else "the loss is not finite on another rank"
    kept = _kept(env)
    raise RunError(f"stage '{stage}', step {step + 1}: {where}; stopped, {kept}. Fix the spec (a lower learning rate, "
                   "loss weight or temperature; the data), re-plan it and resume with --resume: the resume names "
                   "what changed")


def _kept(env: "_RunEnv") -> str:
    last = ckpt.read_progress(env.out_dir)
    return f"the last good checkpoint ({last.stage_name}:{last.step}) is kept" if last else "no checkpoint was written yet"


def _check_weights_finite(env: "_RunEnv", engine: Any, stage: str, step: int) -> None:
    """Every rank: the trained weights are finite and not diverged (runtime.divergence), or nothing is written."""
    from runtime import divergence

    divergence.check(engine, stage, step, _kept(env))


def save_final_student(env: "_RunEnv", trained: Mapping[str, Path]) -> Path | None:
    """Every model the run trained saved once, in HF format (runtime/export.py), listed with its path. Models
    trained before a resumed process started are rebuilt for their config and tokenizer."""
    from runtime.export import save_models, saved_lines

    for index, stage in enumerate(env.plan.spec.stages):
        name = _single_student(stage)
        if name not in env.exports:
            env.placing = Placing(zero3={name: env.plan.stages[index].deepspeed_config}
                                  if env.plan.stages[index].placement.zero_stage == 3 else {})
            models = build_models(env, stage, [], {})  # only its config, tokenizer and vocabulary are read
            env.exports[name] = (exported_config(models.modules[name]), models.tokenizer, models.vocab_maps.get(name))
            del models
    saved = save_models(env, trained, env.exports)
    for line in saved_lines(saved):
        env.logger.info(line)
    return saved[-1].path if env.rank == 0 else None


def _write_rank_result(env: "_RunEnv", results: list[StageResult], trained: Mapping[str, Path]) -> None:
    """Every rank: what it finished, so multi-rank callers can check results beyond the launcher's exit code."""
    from runtime.weights import tensor_sums

    path = env.out_dir / "ranks" / f"rank{env.rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    sums = {name: tensor_sums(file) for name, file in trained.items()}  # of the weights each stage handed over
    record = {"rank": env.rank, "world": env.world, "stages": [asdict(r) for r in results], "weight_sums": sums}
    path.write_text(json.dumps(record, indent=1))


@dataclass
class _RunEnv:
    """What every stage of one run shares."""

    plan: Plan
    base_dir: Path
    out_dir: Path
    rank: int
    world: int
    trust_remote_code: bool
    allow_pickle: bool
    logger: MetricsLogger
    weight_files: dict[str, str] = field(default_factory=dict)
    exports: dict[str, tuple] = field(default_factory=dict)
    """Model name -> (module, tokenizer, vocab map) of the last stage that trained it (saved at the end)."""
    global_step: int = 0
    """Optimizer steps over all stages so far (TensorBoard's x axis)."""
    vocab_maps: dict[str, Any] = field(default_factory=dict)
    placing: Placing = field(default_factory=lambda: Placing())
    """How the current stage's models are built (see ``Placing``)."""

    def vocab_map(self, name: str, built: dict[str, nn.Module]) -> Any:
        """The VocabMap ``name``, built once per run (every stage and every resume derive the same one)."""
        if name not in self.vocab_maps:
            self.vocab_maps[name] = build_vocab_map(self, name, built)
        return self.vocab_maps[name]

    def next_global_step(self) -> int:
        self.global_step += 1
        return self.global_step
