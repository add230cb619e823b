"""Plan notes for cached teachers: each cache's price and the best offline vs online step time.

Takes the Spec, a stage, its captures and the chosen placement; gives one note per cached teacher. It re-runs
the placement search (``planner.placement``), so it sits above both it and ``planner.offline``.
"""

from __future__ import annotations

from gkdlang.spec import Spec, StageSpec
from planner import placement
from planner.offline import cache_temperature, offline_price, offline_problems
from planner.plan import ModelCapture


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def comparison_notes(spec: Spec, stage: StageSpec, captures: list[ModelCapture], params: dict, world: int,
                     chosen_strategy: dict[str, str]) -> list[str]:
    """Plan notes for each cached teacher: its price, and the best offline vs best online step time."""
    cached = [c for c in captures if c.model not in stage.students and spec.models[c.model].cache is not None]
    if not cached:
        return []
    device = placement.device_for(spec.cluster)
    models = placement.stage_models(spec, stage, captures, params)
    cluster = placement.cluster_shape(spec, device, world)
    evals = [e for e in placement.evaluate_all(spec, stage, models, cluster) if e.fits]
    notes = []
    for cap in cached:
        notes.append(_teacher_note(spec, stage, cap, models, device, evals, chosen_strategy))
    return notes


def _teacher_note(spec, stage, cap, models, device, evals, chosen_strategy) -> str:
    name, model = cap.model, spec.models[cap.model]
    problems = offline_problems(spec, stage, name, cap)
    c = model.cache
    tail = f" + {c.samples} tail samples" if c.tail == "sampled" else " + tail bucket"
    head = f"stage '{stage.name}': teacher '{name}' cache {c.path} (top-{c.k}{tail}, {c.dtype})"
    if problems:
        return f"{head} is not used: {'; '.join(problems)}"
    offline = [e for e in evals if e.placement.teacher_strategy.get(name) == "offline"]
    online = [e for e in evals if e.placement.teacher_strategy.get(name) != "offline"]
    best_off = min(offline, key=lambda e: e.cost.total, default=None)
    best_on = min(online, key=lambda e: e.cost.total, default=None)
    ref = best_off or best_on
    p = ref.placement if ref is not None else None
    tokens_step = p.micro_batch * models.seq_len * p.grad_accum if p is not None else models.seq_len
    online_teacher_s = best_on.cost.parts.get("compute_teacher", 0.0) if best_on is not None else 0.0
    price = offline_price(spec, stage, model, cap, online_teacher_s, tokens_step, device.nvme_bw)
    disk = f"{_size(price.disk_bytes)} on disk for at most {price.tokens:,} tokens" if price.disk_bytes else \
        "disk size known once the data is tokenised"
    build = f"teacher pass once ~{price.build_s:.3g}s" if price.build_s is not None else "teacher pass once"
    text = (f"{head}: {price.bytes_per_token} B/token, {disk}, {build}, reads {_size(price.read_bytes_per_step)}"
            f"/step ({price.read_s_per_step * 1e3:.3g} ms at {_size(device.nvme_bw)}/s), {price.epochs:.3g} epoch(s); "
            f"T {cache_temperature(stage, name):g}, signals {', '.join(_point(p) for p in cap.points)}")
    verdict = "offline chosen" if chosen_strategy.get(name) == "offline" else "online chosen"
    on = f"{best_on.cost.total:.3g}s ({best_on.placement.teacher_strategy[name]})" if best_on else "does not fit"
    off = f"{best_off.cost.total:.3g}s" if best_off else "does not fit"
    return f"{text}; step time offline {off} vs online {on}: {verdict}"


def _point(p) -> str:
    return p.kind if p.layer is None else f"{p.kind}[{p.layer}]"
