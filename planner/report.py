"""Plan -> human report (rich tables): models, and per stage captures, placement, memory per rank, alternatives.

``render_report(plan, explain)`` returns the text; colours only when stdout is a terminal, plain text otherwise
(fixed width, so reports in files and tests are stable). ``explain`` adds why each choice was made: why a model
stops where it does, what each loss term reads and when its signals are freed, why the alternatives lost.
"""

from __future__ import annotations

import io
import shutil
import sys

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gkdlang.spec import ModelSpec, StageSpec
from planner.describe import _blocks, describe_capture, describe_placement, describe_points, fmt_bytes, fmt_count, pin_block, ranges  # noqa: F401
from planner.plan import Candidate, ModelCapture, Placement, Plan, RankMemory, StagePlan

PLAIN_WIDTH = 120


def render_report(plan: Plan, explain: bool = False) -> str:
    """The whole report as text (ANSI colours only when stdout is a terminal)."""
    tty = sys.stdout.isatty()
    width = shutil.get_terminal_size().columns if tty else PLAIN_WIDTH
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=tty, no_color=not tty, width=width, highlight=False)
    console.print(_header(plan))
    console.print(_models_table(plan, console))
    for sp in plan.stages:
        _print_stage(console, plan, sp, explain)
    if plan.notes:
        console.print(Text("notes", style="bold"))
        for note in plan.notes:
            console.print(f"  - {note}", soft_wrap=True)
    return buf.getvalue()


def mismatch_warning(plan_device: str, cuda_devices: int) -> str | None:
    """Why a plan's figures are not this machine's (``gkdc run`` warns ``device-mismatch``), or None: a GPU plan
    on a machine without CUDA runs on the CPU; a CPU plan on a machine with GPUs runs on them."""
    if plan_device != "cpu" and cuda_devices == 0:
        return (f"the plan is for {plan_device} GPUs, but this machine has no CUDA device: the run uses the CPU, so the "
                "plan's memory and time figures are not this machine's (re-plan with cluster { gpus: 1 x cpu } for "
                "CPU figures)")
    if plan_device == "cpu" and cuda_devices > 0:
        return (f"the plan is for CPU ranks, but this machine has {cuda_devices} CUDA device(s) and the run uses them; "
                "the plan's memory and time figures are a CPU's (re-plan with the GPU in the cluster block)")
    return None


def _table(title: str, console: Console) -> Table:
    # ASCII borders in files and pipes (plain text), box drawing on terminals
    return Table(title=title, title_justify="left", box=box.HEAVY_HEAD if console.is_terminal else box.ASCII)


def _header(plan: Plan) -> Text:
    text = Text()
    text.append(f"plan for {plan.spec_file}", style="bold")
    text.append(f"  (spec {plan.spec_hash[:12]}, gkdc {plan.gkdc_version}, plan schema {plan.plan_schema_version})\n")
    c = plan.spec.cluster
    text.append(f"cluster: {c.nodes} node(s) x {c.gpus_per_node} x {c.gpu} = {plan.world_size} rank(s)\n")
    text.append(f"launch:  {' '.join(plan.launch)}")
    return text


def _models_table(plan: Plan, console: Console) -> Table:
    table = _table("models", console)
    for col in ("name", "role", "family", "blocks x width", "heads", "vocab", "parameters", "trainable"):
        table.add_column(col, justify="right" if col in ("parameters", "trainable", "vocab", "heads") else "left")
    for m in plan.models:
        a = plan.spec.models[m.name].arch
        table.add_row(m.name, m.role, m.family, f"{a.num_layers} x {a.hidden_size}", str(a.num_heads),
                      str(a.vocab_size), f"{m.parameters:,} ({fmt_count(m.parameters)})",
                      fmt_count(m.trainable_parameters))
    return table


def _stage_spec(plan: Plan, name: str) -> StageSpec:
    return next(s for s in plan.spec.stages if s.name == name)


def _generation_line(sp: StagePlan) -> str:
    """How a generating stage's step splits: generation / teacher scoring / training (planner.generation)."""
    g = sp.generation
    split = ", ".join(f"{k} {v:.3g}s ({v / sp.step_time_s:.0%})" if sp.step_time_s else f"{k} {v:.3g}s"
                      for k, v in g.time_split.items())
    return (f"generation: {g.generator} samples up to {g.tokens_per_step:,} tokens per step (KV cache "
            f"{fmt_bytes(g.kv_cache_bytes)} per rank); step time split: {split}")


def _print_stage(console: Console, plan: Plan, sp: StagePlan, explain: bool) -> None:
    st = _stage_spec(plan, sp.name)
    steps = "unknown (counted at run time)" if sp.total_steps < 0 else f"{sp.total_steps:,} steps"
    console.print(Text(f"\nstage {sp.name}: {steps}, batch {st.batch}, data '{st.data}'", style="bold"))
    console.print(_captures_table(plan, st, sp, console))
    skipped = [t for t in st.teachers if t not in {c.model for c in sp.captures}]
    for t in skipped:
        console.print(f"  teacher '{t}' is not read by this stage: not loaded")
    console.print(f"placement: {describe_placement(sp.placement)}", soft_wrap=True)
    if sp.pin is not None:
        console.print(f"pinned: {', '.join(sp.pin.pinned)}: {sp.pin.verdict}", soft_wrap=True)
    parts = ", ".join(f"{k} {v:.3g}s" for k, v in sorted(sp.step_time_parts.items()))
    console.print(f"predicted step time: {sp.step_time_s:.3g}s" + (f" ({parts})" if parts else ""))
    if sp.generation is not None:
        console.print(_generation_line(sp), soft_wrap=True)
    if sp.tokens is not None:
        console.print(_tokens_line(sp), soft_wrap=True)
    if sp.host_check is not None:
        console.print(_host_line(sp, plan.spec.cluster), soft_wrap=True)
    if sp.memory:
        console.print(_memory_table(sp.memory, console, plan.spec.cluster))
    if sp.alternatives:
        console.print(_alternatives_table(sp.alternatives, console, plan.spec.cluster))
    if explain:
        _print_explain(console, plan, st, sp)


def _tokens_line(sp: StagePlan) -> str:
    t = sp.tokens
    fill = f" ({t.real / t.computed:.0%} of them real)" if t.computed and t.real < t.computed else ""
    return (f"tokens per step: {t.real:,.0f} real of {t.computed:,.0f} positions run{fill}, {t.why}; {t.source}")


def _host_line(sp: StagePlan, cluster) -> str:
    from planner import hardware

    h, gpn = sp.host_check, cluster.gpus_per_node
    ranks = f"{gpn} rank{'s' * (gpn > 1)} x {fmt_bytes(h.per_rank)}"
    dev = hardware.lookup(cluster.gpu)
    if h.limit is not None:
        checked = f"of cpu_memory {fmt_bytes(h.limit)}"
    elif dev is not None and dev.is_cpu:
        checked = f"checked only against the catalog's assumed {fmt_bytes(dev.memory)} per CPU rank (no cpu_memory)"
    else:
        checked = "not checked: no cpu_memory given"
    return f"host memory: {fmt_bytes(h.per_node)} per node ({ranks}), {checked}"


def _captures_table(plan: Plan, st: StageSpec, sp: StagePlan, console: Console) -> Table:
    table = _table("signals captured", console)
    for col in ("model", "captures", "runs"):
        table.add_column(col)
    for cap in sp.captures:
        model = plan.spec.models[cap.model]
        role = "trained" if cap.model in st.students else model.role
        run = describe_capture(cap, model).split("' ", 1)[1]
        table.add_row(f"{cap.model} ({role})", describe_points(cap), run)
    return table


def _on_cpu(cluster) -> bool:
    from planner import hardware

    dev = hardware.lookup(cluster.gpu)
    return dev is not None and dev.is_cpu


def _memory_table(memory: list[RankMemory], console: Console, cluster) -> Table:
    """Per-rank items. On a CPU plan the device memory is the rank's share of host memory: rows say ``cpu``, and
    a capacity the spec does not give (no ``cpu_memory``) is labelled as the catalog's assumption."""
    cpu = _on_cpu(cluster)
    device = "cpu" if cpu else "gpu"
    table = _table("predicted memory per rank", console)
    table.add_column("item")
    table.add_column("where")
    for rank in memory:
        table.add_column(f"rank {rank.rank}", justify="right")
    table.add_column("note")
    rows: dict[tuple[str, str], dict[int, int]] = {}
    notes: dict[tuple[str, str], str] = {}
    for rank in memory:
        for item in rank.items:
            rows.setdefault((item.name, item.device), {})[rank.rank] = item.bytes
            notes.setdefault((item.name, item.device), item.note)
    for (name, where), per_rank in rows.items():
        cells = [fmt_bytes(per_rank[r.rank]) if r.rank in per_rank else "-" for r in memory]
        table.add_row(name, "cpu" if cpu and where == "gpu" else where, *cells, notes[(name, where)])
    table.add_section()
    table.add_row("total" if cpu else "total GPU", device, *[fmt_bytes(r.total_gpu) for r in memory], "")
    assumed = cpu and cluster.cpu_memory is None
    table.add_row("capacity (assumed)" if assumed else "capacity", device,
                  *[fmt_bytes(r.capacity_gpu) for r in memory],
                  "the catalog's figure per CPU rank: give cluster { cpu_memory: ... }" if assumed else "")
    table.add_row("headroom", "", *[f"{r.headroom:.0%}" for r in memory], "")
    if any(r.total_cpu for r in memory):
        table.add_row("total host" if cpu else "total host", "cpu", *[fmt_bytes(r.total_cpu) for r in memory],
                      "offloaded to host memory" if cpu else "")
    return table


def _alternatives_table(alternatives: list[Candidate], console: Console, cluster) -> Table:
    table = _table("placements considered", console)
    peak = "peak" if _on_cpu(cluster) else "peak GPU"
    for col in ("placement", "fits", peak, "step", "verdict"):
        table.add_column(col, justify="right" if col in (peak, "step") else "left")
    for cand in alternatives:
        table.add_row(describe_placement(cand.placement), "yes" if cand.fits else "no", fmt_bytes(cand.peak_gpu),
                      f"{cand.step_time_s:.3g}s", cand.reason)
    return table


# ---------------------------------------------------------------- explain


def _print_explain(console: Console, plan: Plan, st: StageSpec, sp: StagePlan) -> None:
    # the planner's own graph, rebuilt from the embedded spec: the report needs nothing but the plan
    from planner.graph import build_graph

    graph = build_graph(plan.spec)
    console.print(Text("why", style="bold"))
    for cap in sp.captures:
        console.print(f"  - {_why_capture(cap, plan.spec.models[cap.model], st)}", soft_wrap=True)
    last = graph.last_use(st)
    freed: dict[str, list[str]] = {}
    for key, term_id in last.items():
        freed.setdefault(term_id, []).append(str(key))
    table = _table("loss terms (in order) and signals freed after each", console)
    for col in ("term", "loss", "weight", "method", "frees"):
        table.add_column(col)
    for term in st.loss:
        table.add_row(term.id, term.fn, _weight(term.weight), term.method or "", " ".join(freed.get(term.id, [])))
    console.print(table)
    losers = [c for c in sp.alternatives if c.placement != sp.placement]
    headroom = min((r.headroom for r in sp.memory), default=None)
    fit = f"fits with {headroom:.0%} GPU headroom, " if headroom is not None else ""
    console.print(f"  - chosen: {describe_placement(sp.placement)}: {fit}predicted {sp.step_time_s:.3g}s per step",
                  soft_wrap=True)
    console.print(f"  - to pin it: {pin_block(sp.name, sp.placement)}", soft_wrap=True)
    for cand in losers:
        console.print(f"  - not {describe_placement(cand.placement)}: {cand.reason}", soft_wrap=True)


def _why_capture(cap: ModelCapture, model: ModelSpec, st: StageSpec) -> str:
    if cap.model in st.students:
        return f"'{cap.model}' is trained in this stage, so it runs all its blocks"
    if not cap.points:
        return f"'{cap.model}' is used by an intervention, so it is loaded whole"
    if cap.needs_head:
        return f"'{cap.model}' must run its head because a term reads its {describe_points(cap)}"
    deepest = max((p.layer for p in cap.points if p.layer is not None), default=0)
    saved = model.arch.num_layers - 1 - cap.stop_after_layer
    why = (f"'{cap.model}' stops after block {cap.stop_after_layer}: the deepest signal read is in block {deepest}; "
           f"{saved} block(s) and the head are skipped")
    if cap.eager_attention_layers:
        why += (f"; attention is materialised only in {_blocks(cap.eager_attention_layers)} "
                f"(fused kernels elsewhere)")
    return why


def _weight(schedule) -> str:
    if schedule.kind == "constant" or schedule.end is None:
        return f"{schedule.value:g}"
    return f"{schedule.kind} {schedule.value:g}->{schedule.end:g}"
