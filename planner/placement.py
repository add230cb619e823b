"""Spec + stage + captures + parameter counts -> the fastest placement that fits, runner-ups, and advice.

The search enumerates teacher strategy (per teacher) x ZeRO stage x optimizer / parameter offload x
activation checkpointing x micro-batch, where micro-batch and gradient accumulation satisfy
``batch = micro * accum * ranks``; the stage's pins (``StageSpec.pin`` and its ``micro_batch`` /
``activation_checkpointing``) and ``grad_accum_allowed: false`` narrow it; pinned ZeRO / offload keys may reach
combinations the unpinned search skips (``_valid_zero_options``). A placement fits when every rank's predicted GPU
bytes stay under ``(1 - SAFETY_MARGIN)`` of the device memory (the margin absorbs allocator fragmentation and what
the model leaves out) and host / NVMe bytes per node under the cluster's ``cpu_memory`` / ``nvme`` when those are
given; otherwise its ``Shortfall`` names the resource (GPU of a rank, host per node or per rank, NVMe) that a
refusal reports, and the advice says what would fit.
The fastest fitting placement wins (ties: less memory, then simpler); runner-ups carry a short reason.

Teacher strategies searched are those the runtime executes: ``replicated`` (plain module), ``sharded``
(ZeRO-3 inference engine; on several nodes also with an hpZ secondary partition per node), ``cpu_offload`` /
``nvme_offload`` (ZeRO-3 with offloaded parameters), ``tensor_parallel`` at each degree
``planner.tensor_parallel.degrees`` allows (runtime/tensor_parallel.py splits the blocks).
``offline`` (signals read from a cache written once by ``gkdc cache``) is searched for teachers that declare
``cache`` and meet ``planner.offline``'s rules; it is priced by ``planner.cost`` (one teacher pass amortised over
the epochs, cache reads). ``separate`` is modelled by ``planner.memory`` but not run, so it is not searched; for
teachers without a cache the search suggests ``offline`` in its advice. Offload is not searched on CPU runs
(host memory is the device).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

from gkdlang.spec import PlacementPin, Spec, StageSpec
from planner import tensor_parallel as TP
from planner.cost import StepCost, step_cost
from planner.generation import shape_of, stage_seq
from planner.graph import logit_losses
from planner.hardware import CATALOG, Device, device_for, training_precision
from planner.hostmem import host_peaks
from planner.memory import GiB, ClusterShape, StageModels, estimate, learned_params
from planner.offline import offline_problems, stage_epochs
from planner.params import ParamCounts
from planner.plan import Candidate, ModelCapture, Placement, RankMemory

#: Fraction of device memory kept free.
SAFETY_MARGIN = 0.10
#: Runner-ups reported with the chosen placement.
MAX_ALTERNATIVES = 8
SEARCHED_TEACHER_STRATEGIES = ("replicated", "sharded", "cpu_offload", "nvme_offload", "tensor_parallel")


@dataclass(frozen=True)
class SearchResult:
    chosen: Candidate | None
    """None when nothing fits."""
    memory: list[RankMemory]
    """Breakdown of the chosen placement (or of the best attempt when infeasible)."""
    step_time_s: float
    step_time_parts: dict[str, float]
    alternatives: list[Candidate]
    advice: list[str]
    """When infeasible: what would make it fit."""
    shortfall: Shortfall | None = None
    """When infeasible: what the closest attempt overruns."""
    host_rank: int = 0
    """Peak host bytes per rank of the chosen placement (or of the closest attempt)."""
    host_node: int = 0
    attempt: Candidate | None = None
    """When infeasible: the closest attempt (the one ``memory`` describes)."""


@dataclass(frozen=True)
class Shortfall:
    """The first resource a placement overruns: GPU memory of a rank, host memory of a node or rank, NVMe."""

    resource: Literal["gpu", "host", "nvme"]
    scope: Literal["rank", "node"]
    rank: int
    need: int
    capacity: int
    limit: int
    """What the check allows: the capacity less ``SAFETY_MARGIN`` for device memory, the whole of it otherwise."""
    what: str
    """Where the capacity comes from, e.g. ``cpu_memory 64 GiB`` or ``A100-40GB``."""

    def describe(self) -> str:
        where = {"gpu": f"GPU memory of rank {self.rank}", "nvme": "NVMe per node",
                 "host": "host memory per node" if self.scope == "node" else f"host memory of rank {self.rank}"}
        margin = f"; limit {_gb(self.limit)} with a {SAFETY_MARGIN:.0%} margin" if self.limit < self.capacity else ""
        return f"{where[self.resource]}: needs {_gb(self.need)} of {_gb(self.capacity)} ({self.what}{margin})"


@dataclass(frozen=True)
class _Eval:
    placement: Placement
    memory: list[RankMemory]
    cost: StepCost
    shortfall: Shortfall | None
    peak: int
    host_rank: int
    """Peak host bytes of one rank (on CPU runs: its whole memory)."""
    host_node: int

    @property
    def fits(self) -> bool:
        return self.shortfall is None

    @property
    def why_not(self) -> str:
        return "" if self.shortfall is None else f"does not fit: {self.shortfall.describe()}"


def search(spec: Spec, stage: StageSpec, captures: list[ModelCapture], params: dict[str, ParamCounts],
           world_size: int, lengths: tuple[int, ...] = ()) -> SearchResult:
    """The placement search for one stage (see the module docstring); ``lengths``: sorted token counts of the
    stage's unpacked documents clipped to seq_len (empty: full sequences), for the step time."""
    device = device_for(spec.cluster)
    models = stage_models(spec, stage, captures, params, lengths)
    cluster = cluster_shape(spec, device, world_size)
    evals = evaluate_all(spec, stage, models, cluster)
    if not evals:
        return SearchResult(None, [], 0.0, {}, [], _batch_advice(stage, world_size))
    fitting = sorted((e for e in evals if e.fits), key=_rank_key)
    if fitting:
        best = fitting[0]
        return SearchResult(_candidate(best, "chosen"), best.memory, best.cost.total, best.cost.parts,
                            _alternatives(best, fitting[1:], evals), [], host_rank=best.host_rank,
                            host_node=best.host_node)
    closest = closest_attempt(evals)
    advice = infeasible_advice(spec, stage, captures, params, world_size, device, closest, evals)
    alts = [_candidate(e, e.why_not) for e in sorted(evals, key=lambda e: e.peak)[:MAX_ALTERNATIVES]]
    return SearchResult(None, closest.memory, closest.cost.total, closest.cost.parts, alts, advice,
                        shortfall=closest.shortfall, host_rank=closest.host_rank, host_node=closest.host_node,
                        attempt=_candidate(closest, closest.why_not))


def closest_attempt(evals: list[_Eval]) -> _Eval:
    """The attempt a refusal shows: the leanest on host memory among those that fit the GPUs, else the leanest
    on GPU memory (so a refusal names host memory only when the GPUs are not the problem)."""
    gpu_ok = [e for e in evals if e.shortfall is None or e.shortfall.resource != "gpu"]
    if gpu_ok:
        return min(gpu_ok, key=lambda e: (e.shortfall is not None and e.shortfall.resource == "host", e.host_node))
    return min(evals, key=lambda e: e.peak)


# ---------------------------------------------------------------- inputs


def stage_models(spec: Spec, stage: StageSpec, captures: list[ModelCapture],
                 params: dict[str, ParamCounts], lengths: tuple[int, ...] = ()) -> StageModels:
    caps = {c.model: c for c in captures}
    students = [(spec.models[s], params[s], caps.get(s) or _whole(s)) for s in stage.students if s in params]
    teachers = [(spec.models[c.model], params[c.model], c) for c in captures
                if c.model not in stage.students and c.model in params]
    seq = stage_seq(spec, stage)  # a generated sequence may be longer than the data's
    offline = frozenset(m.name for m, _, c in teachers if not offline_problems(spec, stage, m.name, c))
    gpn = spec.cluster.gpus_per_node
    tp = {m.name: TP.degrees(m, c, stage, gpn) for m, _, c in teachers if spec.cluster.gpu != "cpu" or gpn > 1}
    return StageModels(students=students, teachers=teachers, seq_len=seq, extra_trainable=learned_params(stage),
                       offline=offline, epochs=stage_epochs(spec, stage) if offline else 1.0,
                       logit_losses=logit_losses(stage), fusable=frozenset(c.model for c in captures if c.fused_head),
                       tensor_parallel={k: v for k, v in tp.items() if v}, lengths=lengths,
                       generation=shape_of(spec, stage, {m: c.total for m, c in params.items()}))


def _whole(model: str) -> ModelCapture:
    return ModelCapture(model=model, points=[], stop_after_layer=None, needs_head=True)


def cluster_shape(spec: Spec, device: Device, world: int) -> ClusterShape:
    c = spec.cluster
    gpn = min(c.gpus_per_node, world)
    return ClusterShape(device=device, world=world, gpus_per_node=gpn, nodes=max(1, -(-world // gpn)),
                        cpu_per_node=c.cpu_memory, nvme_per_node=c.nvme)


# ---------------------------------------------------------------- enumeration


def micro_batches(stage: StageSpec, world: int) -> list[tuple[int, int]]:
    """(micro, accum) pairs with micro * accum * world == batch, honouring the stage's constraints."""
    if stage.batch % world:
        return []
    per_rank = stage.batch // world
    if stage.micro_batch is not None:
        pairs = [(stage.micro_batch, per_rank // stage.micro_batch)] if per_rank % stage.micro_batch == 0 else []
    else:  # bounded: every pair is evaluated against every strategy, so a huge batch must not mean a huge search
        pairs = [(m, per_rank // m) for m in _divisors(per_rank) if m <= MAX_MICRO][:MAX_PAIRS]
    if not stage.grad_accum_allowed:
        pairs = [(m, a) for m, a in pairs if a == 1]
    return pairs


#: largest micro-batch per rank the search tries, and most (micro, accum) pairs per stage (the smallest)
MAX_MICRO = 4096
MAX_PAIRS = 32


def _divisors(n: int) -> list[int]:
    """The divisors of ``n`` in increasing order, in O(sqrt n) steps (a loop up to n hung on ``batch: 1e12``)."""
    small, large = [], []
    i = 1
    while i * i <= n:
        if n % i == 0:
            small.append(i)
            if i * i != n:
                large.append(n // i)
        i += 1
    return small + large[::-1]


def _zero_options(device: Device, world: int, nvme: bool, pin: PlacementPin | None = None) -> list[tuple[int, str, str]]:
    """(zero stage, offload_optimizer, offload_params) combinations worth trying, or those a pin leaves."""
    if pin is not None and (pin.zero_stage, pin.offload_optimizer, pin.offload_params) != (None, None, None):
        return [o for o in _valid_zero_options(nvme) if _pin_allows(pin, o)]
    opts = [(0, "none", "none"), (1, "none", "none"), (2, "none", "none"), (3, "none", "none")]
    if world == 1:
        opts = [(0, "none", "none"), (3, "none", "none")]  # ZeRO-1/2 shard nothing on one rank
    if device.is_cpu:
        return opts
    opts += [(2, "cpu", "none"), (3, "cpu", "none"), (3, "cpu", "cpu")]
    if nvme:
        opts += [(3, "nvme", "none"), (3, "nvme", "nvme")]
    return opts


def _valid_zero_options(nvme: bool) -> list[tuple[int, str, str]]:
    """Every combination DeepSpeed runs: optimizer offload from ZeRO-1 on, parameter offload with ZeRO-3 and an
    offloaded optimizer, NVMe only where the cluster has it."""
    where = ("none", "cpu", "nvme") if nvme else ("none", "cpu")
    return [(z, oo, op) for z in range(4) for oo in where for op in where
            if (oo == "none" or z >= 1) and (op == "none" or (z == 3 and oo != "none"))]


def _pin_allows(pin: PlacementPin, option: tuple[int, str, str]) -> bool:
    zero, oo, op = option
    return ((pin.zero_stage is None or zero == pin.zero_stage)
            and (pin.offload_optimizer is None or oo == pin.offload_optimizer)
            and (pin.offload_params is None or op == pin.offload_params))


def _teacher_options(models: StageModels, device: Device, world: int, nvme: bool,
                     pin: PlacementPin | None = None, cluster: ClusterShape | None = None) -> list[dict[str, tuple[str, int]]]:
    """Per teacher ``(strategy, group)``: group is the tensor-parallel degree, or the hpZ partition size of a
    sharded teacher on several nodes (the node's GPUs), else 1."""
    allowed = [s for s in SEARCHED_TEACHER_STRATEGIES
               if not (s == "sharded" and world == 1) and not (device.is_cpu and s.endswith("offload"))
               and not (s == "nvme_offload" and not nvme) and s != "tensor_parallel"]
    names = [m.name for m, _, _ in models.teachers]
    pinned = pin.teachers if pin is not None else {}
    hpz = cluster.gpus_per_node if cluster is not None and cluster.nodes > 1 and cluster.gpus_per_node > 1 else 0

    def options(name: str) -> list[tuple[str, int]]:
        strategies = [pinned[name]] if name in pinned else allowed + ["offline"] * (name in models.offline)
        out = []
        for s in strategies:
            if s == "tensor_parallel":
                continue
            out.append((s, 1))
            if s == "sharded" and hpz:
                out.append((s, hpz))
        if pinned.get(name, "tensor_parallel") == "tensor_parallel":
            out += [("tensor_parallel", t) for t in models.tensor_parallel.get(name, ())]
        return out

    return [dict(zip(names, combo)) for combo in itertools.product(*(options(n) for n in names))]


def placements(spec: Spec, stage: StageSpec, models: StageModels, cluster: ClusterShape) -> list[Placement]:
    precision = training_precision(spec.cluster, cluster.device)
    nvme = cluster.nvme_per_node is not None
    ckpt = [stage.activation_checkpointing] if stage.activation_checkpointing is not None else [False, True]
    out = []
    zeros = _zero_options(cluster.device, cluster.world, nvme, stage.pin)
    if any(m.adapter is not None for m, _, _ in models.students):  # runtime/peft_student.py wraps a whole model
        zeros = [z for z in zeros if z[0] < 3]
    for teachers, (zero, off_opt, off_par), ac, (micro, accum) in itertools.product(
            _teacher_options(models, cluster.device, cluster.world, nvme, stage.pin, cluster),
            zeros, ckpt, micro_batches(stage, cluster.world)):
        out.append(Placement(teacher_strategy={n: s for n, (s, _) in teachers.items()}, zero_stage=zero,
                             offload_optimizer=off_opt, offload_params=off_par, micro_batch=micro, grad_accum=accum,
                             activation_checkpointing=ac, precision=precision,
                             teacher_tp={n: g for n, (s, g) in teachers.items() if s == "tensor_parallel"},
                             teacher_hpz={n: g for n, (s, g) in teachers.items() if s == "sharded" and g > 1}))
    return out


def evaluate_all(spec: Spec, stage: StageSpec, models: StageModels, cluster: ClusterShape) -> list[_Eval]:
    return [evaluate(models, cluster, p) for p in placements(spec, stage, models, cluster)]


def evaluate(models: StageModels, cluster: ClusterShape, p: Placement) -> _Eval:
    memory = estimate(models, cluster, p)
    cost = step_cost(models, p, cluster.device, cluster.world, cluster.gpus_per_node)
    worst = max(memory, key=lambda r: r.total_gpu)
    host_rank, host_node = host_need(models, cluster, p, memory)
    return _Eval(p, memory, cost, shortfall(memory, cluster, host_node, host_rank), worst.total_gpu, host_rank,
                 host_node)


def host_need(models: StageModels, cluster: ClusterShape, p: Placement,
              memory: list[RankMemory]) -> tuple[int, int]:
    """(peak host bytes of one rank, of one node) over the load / train / save phases (``planner.hostmem``):
    every rank of a node shares its host memory; on CPU runs the host *is* the ranks' device."""
    return host_peaks(models, cluster, p, memory)


def shortfall(memory: list[RankMemory], cluster: ClusterShape, host_node: int,
              host_rank: int = 0) -> Shortfall | None:
    """The first resource the predicted memory overruns (device per rank, host per node, NVMe per node); on a
    CPU run a rank's need is its worst host phase (loading or saving may exceed training)."""
    dev = cluster.device
    limit = int(dev.memory * (1 - SAFETY_MARGIN))
    worst = max(memory, key=lambda r: r.total_gpu)
    if dev.is_cpu and host_rank > worst.total_gpu:
        worst = worst.model_copy(update={"total_gpu": host_rank})
    if worst.total_gpu > limit:
        if not dev.is_cpu:
            return Shortfall("gpu", "rank", worst.rank, worst.total_gpu, dev.memory, limit, dev.name)
        if cluster.cpu_per_node is None:
            return Shortfall("host", "rank", worst.rank, worst.total_gpu, dev.memory, limit,
                             "one CPU rank's memory, no cpu_memory given")
        gpn = cluster.gpus_per_node
        return Shortfall("host", "node", worst.rank, worst.total_gpu * gpn, dev.memory * gpn, limit * gpn,
                         f"cpu_memory, {gpn} rank{'s' * (gpn > 1)} x {_gb(worst.total_gpu)}")
    if cluster.cpu_per_node is not None and not dev.is_cpu and host_node > cluster.cpu_per_node:
        gpn = cluster.gpus_per_node
        return Shortfall("host", "node", worst.rank, host_node, cluster.cpu_per_node, cluster.cpu_per_node,
                         f"cpu_memory, {gpn} rank{'s' * (gpn > 1)} x {_gb(host_node // gpn)}")
    if cluster.nvme_per_node is not None:
        nvme = sum(i.bytes for r in memory[:1] for i in r.items if i.device == "nvme") * cluster.gpus_per_node
        if nvme > cluster.nvme_per_node:
            return Shortfall("nvme", "node", 0, nvme, cluster.nvme_per_node, cluster.nvme_per_node, "cluster.nvme")
    return None


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"  # binary units, as the report prints capacities


def _complexity(p: Placement) -> int:
    """Prefer fewer moving parts at equal speed: lower ZeRO stage, no offload, replicas, no checkpointing."""
    order = (*SEARCHED_TEACHER_STRATEGIES, "offline")  # offline last: it needs a cache on disk
    strategies = sum(order.index(s) for s in p.teacher_strategy.values())
    return p.zero_stage + 2 * (p.offload_optimizer != "none") + 2 * (p.offload_params != "none") + strategies \
        + p.activation_checkpointing + len(p.teacher_hpz)


def _rank_key(e: _Eval) -> tuple:
    # step times equal to 3 significant digits tie: then the simpler, then the leaner placement wins
    return (float(f"{e.cost.total:.3g}"), _complexity(e.placement), e.peak)


def _candidate(e: _Eval, reason: str) -> Candidate:
    return Candidate(placement=e.placement, fits=e.fits, peak_gpu=e.peak, step_time_s=e.cost.total, reason=reason)


def _alternatives(best: _Eval, others: list[_Eval], evals: list[_Eval]) -> list[Candidate]:
    """A few fitting runner-ups (the fastest of distinct shapes) and the nearest misses."""
    seen, out = set(), []
    for e in others:
        key = (e.placement.zero_stage, e.placement.offload_optimizer, e.placement.offload_params,
               tuple(sorted(e.placement.teacher_strategy.items())), e.placement.activation_checkpointing,
               tuple(sorted(e.placement.teacher_tp.items())), tuple(sorted(e.placement.teacher_hpz.items())))
        if key in seen:
            continue
        seen.add(key)
        ratio = e.cost.total / best.cost.total if best.cost.total else 1.0
        out.append(_candidate(e, f"slower: {ratio:.2f}x" if ratio > 1.005 else
                              f"as fast, but {'more memory' if e.peak > best.peak else 'more complex'}"))
        if len(out) >= MAX_ALTERNATIVES - 2:
            break
    misses = sorted((e for e in evals if not e.fits and e.cost.total < best.cost.total), key=lambda e: e.cost.total)
    out += [_candidate(e, e.why_not) for e in misses[:MAX_ALTERNATIVES - len(out)]]
    return out


# ---------------------------------------------------------------- pins


def unpinned(stage: StageSpec) -> StageSpec:
    """The stage without the spec's pins (what the planner would pick); constraints that constructs impose
    (e.g. no checkpointing under ``interchange``) are not pins and stay."""
    if stage.pin is None:
        return stage
    update: dict = {"pin": None}
    if "micro_batch" in stage.pin.spans:
        update["micro_batch"] = None
    if "checkpointing" in stage.pin.spans:
        update["activation_checkpointing"] = None
    return stage.model_copy(update=update)


def pin_problems(spec: Spec, stage: StageSpec, captures: list[ModelCapture]) -> list[tuple[str, object, str, str]]:
    """``(code, span, message, hint)`` for pins this cluster or stage cannot run at all, before any search."""
    pin, out = stage.pin, []
    if pin is None:
        return out
    nvme = spec.cluster.nvme is not None
    caps = {c.model: c for c in captures}
    for key in ("offload_optimizer", "offload_params"):
        if getattr(pin, key) == "nvme" and not nvme:
            out.append(("pin-unavailable", pin.spans.get(key, pin.span), f"{key}: nvme needs NVMe in the cluster",
                        "give cluster.nvme (bytes per node), or pin cpu"))
    lora = [n for n in stage.students if spec.models[n].adapter is not None]
    if pin.zero_stage == 3 and lora:
        out.append(("pin-unavailable", pin.spans.get("zero", pin.span), f"zero: 3 with the LoRA student "
                    f"'{lora[0]}': peft wraps a whole model, and its frozen weights are small to replicate",
                    "pin zero: 0, 1 or 2 (ZeRO-1/2 shard the adapter's optimizer states)"))
    for name, strategy in sorted(pin.teachers.items()):
        where = pin.spans.get(f"teacher {name}", pin.span)
        if name not in caps:
            continue  # a teacher this stage does not load: the pin has nothing to place (see stage notes)
        if strategy == "nvme_offload" and not nvme:
            out.append(("pin-unavailable", where, f"teacher '{name}': nvme_offload needs NVMe in the cluster",
                        "give cluster.nvme (bytes per node), or pin cpu_offload"))
        if strategy == "tensor_parallel":
            gpn, cap = spec.cluster.gpus_per_node, caps[name]
            reasons = [TP.why_not(spec.models[name], cap, stage, gpn, t) for t in range(2, gpn + 1)]
            if all(reasons):
                why = reasons[-1] if reasons else f"a node has {gpn} device: nothing to split over"
                out.append(("pin-unavailable", where, f"teacher '{name}' cannot run tensor parallel in stage "
                            f"'{stage.name}': {why}", "pin sharded (ZeRO-3) or replicated"))
        if strategy == "offline":
            problems = offline_problems(spec, stage, name, caps[name])
            if problems:
                out.append(("pin-unavailable", where, f"teacher '{name}' cannot be read from a cache in stage "
                            f"'{stage.name}': {problems[0]}", "pin an online strategy (replicated, sharded, ...)"))
    return out


# ---------------------------------------------------------------- advice


def _batch_advice(stage: StageSpec, world: int) -> list[str]:
    if stage.batch % world:
        return [f"stage '{stage.name}': batch {stage.batch} is not a multiple of {world} ranks; "
                f"use a batch of {(stage.batch // world + 1) * world}"]
    per_rank = stage.batch // world
    return [f"stage '{stage.name}': micro_batch {stage.micro_batch} does not divide the {per_rank} sequences "
            f"per rank" + ("" if stage.grad_accum_allowed else " without gradient accumulation")]


def infeasible_advice(spec: Spec, stage: StageSpec, captures: list[ModelCapture], params: dict[str, ParamCounts],
                      world: int, device: Device, closest: _Eval, evals: list[_Eval] = ()) -> list[str]:
    """What would make the stage fit: more host memory, more GPUs, a larger GPU, smaller micro-batch, NVMe,
    offline teachers."""
    advice = []
    host = _host_advice(closest, evals, device)
    if host:
        advice.append(host)
    more = _gpus_needed(spec, stage, captures, params, world, device)
    if more is not None:
        advice.append(f"{more} x {device.name} would fit (now {world})")
    bigger = [d for d in CATALOG.values() if d.memory > device.memory and not d.is_cpu
              and _fits_on(spec, stage, captures, params, world, d)]
    if bigger and not device.is_cpu:
        best = min(bigger, key=lambda d: d.memory)
        advice.append(f"{world} x {best.name} would fit")
    if stage.micro_batch is not None and stage.micro_batch > 1:
        advice.append(f"a smaller micro_batch than {stage.micro_batch} (or leave it to the planner)")
    if stage.activation_checkpointing is False:
        advice.append("allow activation_checkpointing")
    if spec.cluster.nvme is None and not device.is_cpu:
        advice.append("give cluster.nvme to allow NVMe offload of optimizer states and teacher weights")
    teachers = [c.model for c in captures if c.model not in stage.students]
    if teachers and _fits_without_teachers(spec, stage, captures, params, world, device):
        advice.append(f"precompute the signals of {', '.join(teachers)} offline (declare `cache: topk(k: 64)` on "
                      f"the teacher and run `gkdc cache`): the student alone fits")
    return advice or [f"a smaller student or sequence length; the best attempt needs {_gb(closest.peak)} per GPU"]


def _host_advice(closest: _Eval, evals, device: Device) -> str | None:
    """When host memory is what does not fit: the host figure of the leanest placement that fits the GPUs."""
    if closest.shortfall is None or closest.shortfall.resource != "host":
        return None
    from planner.describe import describe_placement

    short = closest.shortfall
    if device.is_cpu:
        need = int(short.need / (1 - SAFETY_MARGIN)) + 1
        return f"cpu_memory of at least {_gb(need)} per node would fit ({describe_placement(closest.placement)})"
    ok = [e for e in evals if e.shortfall is not None and e.shortfall.resource == "host"] or [closest]
    lean = min(ok, key=lambda e: e.host_node)
    return (f"cpu_memory of at least {_gb(lean.host_node)} per node (now {_gb(short.capacity)}) would fit "
            f"{describe_placement(lean.placement)}")


def _fits_on(spec, stage, captures, params, world, device: Device) -> bool:
    models = stage_models(spec, stage, captures, params)
    cluster = cluster_shape(spec, device, world)
    return any(e.fits for e in evaluate_all(spec, stage, models, cluster))


def _gpus_needed(spec, stage, captures, params, world, device: Device) -> int | None:
    """The smallest world (doubling, up to 1024 ranks) with a fitting placement."""
    n = world * 2
    while n <= 1024:
        batch_ok = stage.model_copy(update={"batch": max(stage.batch, n) // n * n})
        if _fits_on(spec, batch_ok, captures, params, n, device):
            return n
        n *= 2
    return None


def _fits_without_teachers(spec, stage, captures, params, world, device: Device) -> bool:
    students_only = [c for c in captures if c.model in stage.students]
    return _fits_on(spec, stage, students_only, {k: v for k, v in params.items() if k in stage.students}, world, device)
