"""Spec -> Plan (or PlanFailure): composes graph, parameter counts, placement search and DeepSpeed configs.

Order: signal graph -> captures per stage -> exact parameter counts per model -> placement search per stage
-> DeepSpeed configs -> ``planner.plan.Plan``. Nothing here reads weights, imports torch, or depends on the
clock or the machine, so the same spec gives a byte-identical plan.

Decisions made here (documented in the plan's ``notes``):

- ``total_steps``: a stage's ``steps``; for ``epochs`` over a jsonl source whose files exist at plan time,
  ``ceil(epochs * train_rows / batch)`` (one example per non-empty line, less the rows its ``split`` holds out);
  otherwise -1: the size is unknown until the runtime tokenises the data, and a note says so.
- launch: one rank runs in-process (``gkdc run PLAN``); several use the ``deepspeed`` launcher with
  ``--module runtime.worker PLAN`` (the runtime appends its own arguments); more than one node adds
  ``--hostfile`` next to the plan, whose text (placeholder host names) is ``Plan.hostfile``.
- master port: 29500 + (spec hash mod 1000), so concurrent plans of different specs rarely collide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from gkdlang.diagnostics import Diagnostic
from gkdlang.spec import ClusterSpec, DataSpec, ModelSpec, Spec, StageSpec
from planner import dsconfig, evalcost, generation, offline_notes, placement, tensor_parallel, tokens
from planner.graph import SignalGraph, build_graph
from planner.hardware import device_for
from planner.hostmem import host_memory
from planner.memory import fused_head
from planner.params import ParamCounts, count_params_for
from planner.trainable import trained_params
from planner.plan import GenerationPlan, HostCheck, ModelCapture, PinReport, Plan, ResolvedModel, StagePlan, TokensPerStep, sealed
from planner.datasize import count_rows
from planner.describe import describe_capture, describe_placement, fmt_bytes

BASE_PORT = 29500


@dataclass(frozen=True)
class PlanFailure:
    """No plan: one ``plan-infeasible`` diagnostic per stage that fits nowhere (span: the cluster block)."""

    diagnostics: list[Diagnostic]

    def __str__(self) -> str:
        return "\n".join(d.message for d in self.diagnostics)


def build_plan(spec: Spec, *, gkdc_version: str, spec_path: str, plan_path: str = "plan.json") -> Plan | PlanFailure:
    """The plan of a checked spec; ``plan_path`` is where the caller will write it (it appears in ``launch``)."""
    unknown = _unknown_device(spec.cluster) or _bad_cluster(spec.cluster)
    if unknown is not None:
        return PlanFailure([unknown])
    graph = build_graph(spec)
    params, bad = {}, []
    for name, m in spec.models.items():
        try:
            params[name] = model_params(m)
        except ValueError as exc:  # a head or shape the family's parameter count cannot have
            bad.append(Diagnostic("bad-config", f"model '{name}': {exc}", m.span))
    if bad:
        return PlanFailure(bad)
    world = world_size(spec.cluster)
    spec_dir = Path(spec_path).parent
    stages, failures = [], []
    notes = [f"spec values set on the command line (recorded in spec.overrides and the spec hash): "
             f"{', '.join('--set ' + o for o in spec.overrides)}"] if spec.overrides else []
    for st in spec.stages:
        result = _plan_stage(spec, graph, st, params, world, spec_dir)
        if isinstance(result, list):
            failures += result
            continue
        stages.append(result)
        notes += stage_notes(spec, graph, st, spec_dir, result.captures)
        notes += offline_notes.comparison_notes(spec, st, result.captures, params, world, result.placement.teacher_strategy)
        notes += tensor_parallel.placement_notes(st.name, result.placement, result.step_time_s, result.alternatives)
    if failures:
        return PlanFailure(failures)
    launch, hostfile = launch_command(spec.cluster, plan_path, master_port(spec.source_hash))
    if hostfile is not None:
        notes.append(f"multi-node: write Plan.hostfile to {_hostfile_path(plan_path)} and replace the "
                     f"placeholder host names (worker-0 ...) with the real ones")
    return sealed(Plan(gkdc_version=gkdc_version, spec_hash=spec.source_hash, spec_file=spec_path, spec=spec,
                       models=[resolved_model(m, params[m.name]) for m in spec.models.values()], stages=stages,
                       world_size=world, launch=launch, hostfile=hostfile, notes=notes))


#: most ranks a plan may have (every per-rank figure is computed for each one)
MAX_WORLD = 65536


def _bad_cluster(cluster: ClusterSpec) -> Diagnostic | None:
    """Counts below one or absurdly large, and memory sizes that are not positive: the checker's job, repeated
    here so the planner never divides by zero or loops over a million ranks whatever Spec it is handed."""
    if cluster.nodes < 1 or cluster.gpus_per_node < 1:
        return Diagnostic("bad-value", f"the cluster has {cluster.nodes} node(s) x {cluster.gpus_per_node} device(s); "
                          "both must be at least 1", cluster.span)
    if cluster.nodes * cluster.gpus_per_node > MAX_WORLD:
        return Diagnostic("bad-value", f"the cluster has {cluster.nodes * cluster.gpus_per_node:,} ranks; gkdc plans "
                          f"at most {MAX_WORLD:,}", cluster.span)
    for key in ("gpu_memory", "cpu_memory", "nvme"):
        value = getattr(cluster, key)
        if value is not None and value <= 0:
            return Diagnostic("bad-value", f"{key} must be a positive size, got {value:,} bytes", cluster.span)
    return None


def plan_warnings(plan: Plan) -> list[Diagnostic]:
    """Warnings about a plan that was built: ``no-cpu-memory`` when the cluster gives no host memory (the
    host figure the plan needs is stated in the message and in each ``StagePlan.host_check``)."""
    c = plan.spec.cluster
    hosts = [(sp.name, sp.host_check) for sp in plan.stages if sp.host_check is not None]
    if c.cpu_memory is not None or not hosts:
        return []
    need = max(h.per_node for _, h in hosts)
    per_stage = ", ".join(f"'{name}' {fmt_bytes(h.per_node)}" for name, h in hosts)
    if _is_cpu(plan.spec):
        from planner import hardware

        assumed = fmt_bytes(hardware.lookup(c.gpu).memory)
        no_block = (c.span.line, c.span.col) == (c.span.end_line, c.span.end_col)  # the default cluster's span
        where = "the spec has no cluster block (one CPU rank)" if no_block else "the cluster gives no cpu_memory"
        what = (f"{where}, so each CPU rank was checked against the catalog's assumed {assumed}, not this "
                f"machine's memory")
    else:
        no_block = False
        what = "the cluster gives no cpu_memory, so host memory was not checked"
    hint = (f"add cluster {{ gpus: 1 x cpu, cpu_memory: {_round_up_gb(need)}GB }} with this machine's memory"
            if no_block else f"declare the host memory of one node, e.g. cpu_memory: {_round_up_gb(need)}GB")
    return [Diagnostic("no-cpu-memory", f"{what}: the plan needs {fmt_bytes(need)} of host memory per node "
                       f"(stages: {per_stage})", c.span, hint)]


def _round_up_gb(n: int) -> int:
    return max(1, math.ceil(n / 1e9))


def _unknown_device(cluster: ClusterSpec) -> Diagnostic | None:
    """``unknown-gpu`` at the cluster block when its device is not in the hardware catalog."""
    from planner import hardware

    if hardware.lookup(cluster.gpu) is not None:
        return None
    guess = hardware.suggest(cluster.gpu)
    hint = f"did you mean '{guess}'?" if guess else f"known devices: {', '.join(hardware.CATALOG)}"
    return Diagnostic("unknown-gpu", f"unknown device '{cluster.gpu}': the hardware catalog has no such GPU",
                      cluster.span, hint)


# ---------------------------------------------------------------- models


def model_params(model: ModelSpec) -> ParamCounts:
    """Exact counts of the model class gkdc builds for this model's head (vocab compression already in arch)."""
    return count_params_for(model.arch, model.head.kind, model.head.num_labels or 2)


def resolved_model(model: ModelSpec, counts: ParamCounts) -> ResolvedModel:
    # students and assistants train in some stage; a teacher trains only if declared `frozen: false`
    trainable = model.role != "teacher" or not model.frozen
    return ResolvedModel(name=model.name, role=model.role, family=model.arch.family, parameters=counts.total,
                         trainable_parameters=trained_params(model, counts) if trainable else 0)


def world_size(cluster: ClusterSpec) -> int:
    return cluster.nodes * cluster.gpus_per_node


# ---------------------------------------------------------------- stages


def _plan_stage(spec: Spec, graph: SignalGraph, st: StageSpec, params: dict[str, ParamCounts],
                world: int, spec_dir: Path) -> StagePlan | list[Diagnostic]:
    fusable = graph.fusable_heads(st)
    # marked fusable for the search, which prices each placement with the heads it can fuse; the plan records
    # the heads the chosen placement fuses
    captures = [c.model_copy(update={"fused_head": c.model in fusable}) for c in graph.captures(st)]
    problems = [Diagnostic(code, message, span, hint)
                for code, span, message, hint in placement.pin_problems(spec, st, captures)]
    packing = tokens.packing_choice(spec, st)
    if packing.problem:
        problems.append(Diagnostic("packing-unsupported", packing.problem, spec.data[st.data].span,
                                   "remove `packing: true` from the data block (or use it in a stage that can pack)"))
    if problems:
        return problems
    # teachers that no term reads are not loaded, so the search must not count them
    loaded = {c.model for c in captures}
    seq = generation.stage_seq(spec, st)
    # packed blocks are full by construction: documents are tokenised only for padded data (or packed epochs);
    # generated sequences are priced at their longest, each prompt plus max_new_tokens (memory: the longest prompt)
    lengths = None if packing.packed else stage_lengths(spec, st, spec_dir)
    if st.generate:
        lengths = generation.generated_lengths(spec, st, lengths)
    clipped = () if lengths is None else tuple(sorted(min(n, seq) for n in lengths.counts))
    counts = {m: p for m, p in params.items() if m in loaded}
    result = placement.search(spec, st, captures, counts, world, clipped)
    free = placement.search(spec, placement.unpinned(st), captures, counts, world, clipped) if st.pin else None
    if result.chosen is None:
        return [pin_refusal(spec, st, result, free) if st.pin is not None else infeasible(spec, st, result)]
    chosen = result.chosen.placement
    models = placement.stage_models(spec, st, captures, counts, clipped)
    captures = [c.model_copy(update={"fused_head": fused_head(models, c.model, chosen)}) for c in captures]
    host, host_node = host_memory(models, placement.cluster_shape(spec, device_for(spec.cluster), world), chosen,
                                  result.memory)
    step = tokens.step_tokens(st.batch, chosen.micro_batch, seq, packing.packed, lengths)
    if st.generate is not None:
        step = replace(step, source=f"generated: each sequence at most its prompt ({generation.prompt_len(spec, st)} "
                       f"positions) plus max_new_tokens ({st.generate.max_new_tokens}), an upper bound"
                       + ("" if lengths is None else "; the prompts' lengths from their documents, tokenised at plan "
                          "time (each micro-batch left-padded to its longest prompt)"))
    return StagePlan(
        name=st.name, captures=captures, placement=chosen, memory=result.memory, step_time_s=result.step_time_s,
        step_time_parts=dict(result.step_time_parts), total_steps=total_steps(spec, st, spec_dir, packing.packed)[0],
        alternatives=result.alternatives, deepspeed_config=dsconfig.student_ds_config(chosen, st, world),
        teacher_configs=_teacher_configs(spec, captures, st, chosen, world), host=host, host_node_peak=host_node,
        tokens=TokensPerStep(packed=packing.packed, why=packing.why, seq_len=seq, real=step.real,
                             computed=step.computed, source=step.source),
        host_check=HostCheck(per_node=result.host_node, per_rank=result.host_rank, limit=spec.cluster.cpu_memory),
        pin=pin_report(st, result, free), generation=generation_plan(st, models, chosen, result.step_time_parts))


def generation_plan(st: StageSpec, models, chosen, parts: dict[str, float]) -> GenerationPlan | None:
    """StagePlan.generation: generated tokens, KV cache and the step's generation / teacher / training split."""
    shape = models.generation
    if shape is None:
        return None
    return GenerationPlan(tokens_per_step=st.batch * shape.max_new_tokens,
                          kv_cache_bytes=generation.kv_cache_peak(shape, chosen.micro_batch, chosen.precision),
                          generator=generation.generator_label(shape), time_split=generation.time_split(parts))


_LENGTHS: dict[tuple, object] = {}


def stage_lengths(spec: Spec, st: StageSpec, spec_dir: Path):
    """``planner.tokens.document_lengths`` once per (spec, data, student) in a process: the notes and the
    step figures both need them."""
    key = (spec.source_hash, st.data, tuple(st.students), str(spec_dir))
    if key not in _LENGTHS:
        _LENGTHS[key] = tokens.document_lengths(spec, st, spec_dir)
    return _LENGTHS[key]


def pin_report(st: StageSpec, result, free) -> PinReport | None:
    """What was pinned, that it fits, and the placement the planner would have picked without the pins."""
    if st.pin is None or free is None:
        return None
    pinned = list(st.pin.spans)
    headroom = min((r.headroom for r in result.memory), default=0.0)
    fits = f"the pinned placement fits ({headroom:.0%} memory headroom)"
    theirs = free.chosen
    if theirs is None:  # pins may reach placements the search skips (e.g. ZeRO-1 on one rank)
        return PinReport(pinned=pinned, planner_choice=result.chosen,
                         verdict=f"{fits}; without the pins the planner finds nothing that fits")
    if theirs.placement == result.chosen.placement:
        return PinReport(pinned=pinned, planner_choice=theirs, verdict=f"{fits} and is the planner's own choice")
    ratio = result.chosen.step_time_s / theirs.step_time_s if theirs.step_time_s else 1.0
    speed = f"{ratio:.2f}x the planner's step time" if abs(ratio - 1) > 0.005 else "as fast"
    return PinReport(pinned=pinned, planner_choice=theirs,
                     verdict=f"{fits}, {speed}; the planner would pick {describe_placement(theirs.placement)} "
                             f"({theirs.step_time_s:.3g}s per step)")


def _teacher_configs(spec: Spec, captures: list[ModelCapture], st: StageSpec, chosen, world: int) -> dict:
    out = {}
    for cap in captures:
        if cap.model in st.students:
            continue
        cfg = dsconfig.teacher_ds_config(chosen, spec.models[cap.model], world)
        if cfg is not None:
            out[cap.model] = cfg
    return out


def infeasible(spec: Spec, st: StageSpec, result) -> Diagnostic:
    """The ``plan-infeasible`` diagnostic: the resource that does not fit, the best attempt's per-rank breakdown
    and the search's advice (what would fit)."""
    c = spec.cluster
    capacity = f" ({fmt_bytes(result.memory[0].capacity_gpu)} each)" if result.memory else ""
    head = f"stage '{st.name}' fits no placement on {world_size(c)} x {c.gpu}{capacity}"
    if result.shortfall is not None:
        head += f": {result.shortfall.describe()}"
    lines = [head, *_attempt_lines(result, _is_cpu(spec))]
    hint = "; ".join(result.advice) if result.advice else "use more or larger GPUs, or a smaller teacher or batch"
    return Diagnostic("plan-infeasible", "\n  ".join(lines), c.span, hint)


def pin_refusal(spec: Spec, st: StageSpec, result, free) -> Diagnostic:
    """``pin-does-not-fit`` at the placement block: the resource the pinned placement overruns, its per-rank
    breakdown, and what would fit (the planner's own choice, or the search's advice)."""
    pin = st.pin
    what = f": {result.shortfall.describe()}" if result.shortfall is not None else ""
    if result.shortfall is None and result.advice:
        what = f": {result.advice[0]}"
    lines = [f"the placement pinned for stage '{st.name}' ({', '.join(pin.spans)}) does not fit{what}",
             *_attempt_lines(result, _is_cpu(spec))]
    if free is not None and free.chosen is not None:
        hint = (f"unpinned, the planner picks {describe_placement(free.chosen.placement)} "
                f"({free.chosen.step_time_s:.3g}s per step), which fits")
    else:
        hint = "; ".join(free.advice if free is not None and free.advice else result.advice) or \
            "nothing fits this cluster even without the pins"
    related = tuple((span, f"pinned here: {key}") for key, span in pin.spans.items() if span != pin.span)
    return Diagnostic("pin-does-not-fit", "\n  ".join(lines), pin.span, hint, related)


def _attempt_lines(result, cpu: bool) -> list[str]:
    """The best attempt and, per rank, the items of the resource that does not fit."""
    lines = []
    best = result.attempt or min(result.alternatives, key=lambda cand: cand.peak_gpu, default=None)
    if best is not None:
        lines.append(f"best attempt: {describe_placement(best.placement)}, peak {fmt_bytes(best.peak_gpu)} per rank")
    host = result.shortfall is not None and result.shortfall.resource == "host"
    for rank in result.memory:
        if host and cpu:  # on CPU runs every item is host memory
            items = ", ".join(f"{i.name} {fmt_bytes(i.bytes)}" for i in rank.items)
            lines.append(f"rank {rank.rank} host: {fmt_bytes(rank.total_gpu)} of {fmt_bytes(rank.capacity_gpu)} "
                         f"({items})")
            continue
        if host and rank.total_cpu:
            items = ", ".join(f"{i.name} {fmt_bytes(i.bytes)}" for i in rank.items if i.device == "cpu")
            lines.append(f"rank {rank.rank} host: {fmt_bytes(rank.total_cpu)} ({items})")
        gpu_items = ", ".join(f"{i.name} {fmt_bytes(i.bytes)}" for i in rank.items if i.device == "gpu")
        label = "memory" if host and not rank.total_cpu else "GPU"
        lines.append(f"rank {rank.rank} {label}: {fmt_bytes(rank.total_gpu)} of {fmt_bytes(rank.capacity_gpu)} "
                     f"({gpu_items})")
    return lines


def _is_cpu(spec: Spec) -> bool:
    from planner import hardware

    dev = hardware.lookup(spec.cluster.gpu)
    return dev is not None and dev.is_cpu


def total_steps(spec: Spec, st: StageSpec, spec_dir: Path, packed: bool | None = None) -> tuple[int, str | None]:
    """(optimizer steps, note or None); -1 when ``epochs`` meet a data size unknown at plan time. ``packed``: the
    stage's packing choice when the caller already made it (``tokens.packing_choice``)."""
    if st.steps is not None:
        return st.steps, None
    data = spec.data[st.data]
    if (tokens.packing_choice(spec, st).packed if packed is None else packed):
        return _packed_steps(spec, st, spec_dir)
    rows = count_rows(data, spec_dir)
    if rows is None:
        return -1, (f"stage '{st.name}': {st.epochs:g} epochs of '{data.name}' ({data.format}); its size is known "
                    f"only after tokenisation, so total_steps is -1 and the runtime counts it")
    held = evalcost.held_out(rows, data.split)  # the run trains on the rows its split does not hold out
    train_rows = rows - held
    steps = max(1, math.ceil(st.epochs * train_rows / st.batch))
    kept = f" ({held} held out)" if held else ""
    return steps, (f"stage '{st.name}': {steps} steps = ceil({st.epochs:g} epochs x {train_rows} training rows{kept} "
                   f"of '{data.name}' / batch {st.batch})")


def _packed_steps(spec: Spec, st: StageSpec, spec_dir: Path) -> tuple[int, str]:
    """Optimizer steps of ``epochs`` over packed blocks: counted when every document was tokenised at plan time."""
    data = spec.data[st.data]
    seq = st.seq_len or data.seq_len
    lengths = stage_lengths(spec, st, spec_dir)
    blocks = tokens.packed_blocks(lengths, seq) if lengths is not None else None
    if blocks is None:
        return -1, (f"stage '{st.name}': {st.epochs:g} epochs of packed '{data.name}'; its blocks are known only "
                    f"after tokenisation, so total_steps is -1 and the runtime counts it")
    train = blocks - evalcost.held_out(blocks, data.split)  # its split holds whole blocks out
    steps = max(1, math.ceil(st.epochs * train / st.batch))
    return steps, (f"stage '{st.name}': {steps} steps = ceil({st.epochs:g} epochs x {train} packed blocks of "
                   f"{seq} tokens of '{data.name}' / batch {st.batch})")


def _examples(spec: Spec, st: StageSpec, spec_dir: Path) -> int | None:
    """The stage's examples as the runtime samples them: rows, or packed blocks; None when unknown at plan time."""
    if tokens.packing_choice(spec, st).packed:
        lengths = stage_lengths(spec, st, spec_dir)
        return tokens.packed_blocks(lengths, st.seq_len or spec.data[st.data].seq_len) if lengths is not None else None
    return count_rows(spec.data[st.data], spec_dir)


def stage_notes(spec: Spec, graph: SignalGraph, st: StageSpec, spec_dir: Path,
                captures: list[ModelCapture] | None = None) -> list[str]:
    """What the planner pruned or decided for a stage, in words (``captures``: the plan's, with fused heads)."""
    notes = [f"stage '{st.name}': teacher '{t}' is not read by any term and is not loaded"
             for t in graph.unused_teachers(st)]
    for cap in captures if captures is not None else graph.captures(st):
        if cap.model not in st.students:
            notes.append(f"stage '{st.name}': {describe_capture(cap, spec.models[cap.model])}")
    modules = graph.learned_modules(st)
    if modules:
        notes.append(f"stage '{st.name}': learned transforms {', '.join(modules)} add "
                     f"{sum(modules.values()):,} trainable parameters (trained with the student, not saved in it)")
    steps, note = total_steps(spec, st, spec_dir)
    if note is not None:
        notes.append(note)
    split = spec.data[st.data].split
    rows = _examples(spec, st, spec_dir) if split else None
    if rows:
        # teachers counted as costly as the student: the share is within 1.5x of one that weighs them by size
        note = evalcost.eval_note(st.name, steps, st.batch, evalcost.held_out(rows, split), st.eval_every,
                                  float(len(st.teachers)))
        if note is not None:
            notes.append(note)
    return notes


# ---------------------------------------------------------------- launch


def master_port(spec_hash: str) -> int:
    return BASE_PORT + int(spec_hash[:8] or "0", 16) % 1000


def launch_command(cluster: ClusterSpec, plan_path: str, port: int) -> tuple[list[str], str | None]:
    """(argv, hostfile text or None) for the cluster's ranks."""
    if world_size(cluster) == 1:
        return ["gkdc", "run", plan_path], None
    argv, hostfile = ["deepspeed"], None
    if cluster.nodes > 1:
        argv += ["--hostfile", _hostfile_path(plan_path), "--num_nodes", str(cluster.nodes)]
        hostfile = "".join(f"worker-{i} slots={cluster.gpus_per_node}\n" for i in range(cluster.nodes))
    # --num_gpus is per node for the deepspeed launcher; --module runs runtime.worker like `python -m`
    argv += ["--num_gpus", str(cluster.gpus_per_node), "--master_port", str(port),
             "--module", "runtime.worker", plan_path]
    return argv, hostfile


def _hostfile_path(plan_path: str) -> str:
    return str(Path(plan_path).with_name("hostfile"))

