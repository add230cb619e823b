"""Plain-text descriptions of plan parts (sizes, layer ranges, captures, placements), shared by the report and
the planner's notes. No rich here: ``gkdc check`` runs the planner and must stay quick to start."""

from __future__ import annotations

from gkdlang.spec import ModelSpec
from planner.plan import ModelCapture, Placement

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def fmt_bytes(n: int | float) -> str:
    """Binary units, 3 significant digits and never an exponent: ``1.5 GiB``, ``1010 MiB``; negative sizes keep
    their sign. The unit comes from rich's ``filesize.pick_unit_and_suffix`` (rich's own formatters are decimal)."""
    from rich.filesize import pick_unit_and_suffix

    size = abs(n)
    factor, suffix = pick_unit_and_suffix(int(size), ["B", *_UNITS[1:]], 1024)
    value = size / factor
    sign = "-" if n < 0 else ""
    if factor == 1:
        return f"{sign}{int(value)} B"
    if round(value) >= 1024 and suffix != _UNITS[-1]:  # 1023.9 MiB reads 1.00 GiB, not 1024 MiB
        value, suffix = value / 1024, _UNITS[_UNITS.index(suffix) + 1]
    return f"{sign}{value:.3g} {suffix}" if value < 999.5 else f"{sign}{value:.0f} {suffix}"


def fmt_count(n: int) -> str:
    """``124.4M`` style parameter counts."""
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.1f}{suffix}"
    return str(n)


def ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0..2, 5``."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        start = layer if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}..{layer}")
            start = None
    return ", ".join(parts)


def describe_capture(cap: ModelCapture, model: ModelSpec) -> str:
    """e.g. ``teacher 'bert' runs blocks 0..5 of 12, LM head skipped, eager attention in blocks 5``."""
    n = model.arch.num_layers
    runs = f"runs all {n} blocks" if cap.stop_after_layer is None else f"runs blocks 0..{cap.stop_after_layer} of {n}"
    head_name = "LM" if model.head.kind == "lm" else model.head.kind
    head = "head runs" if cap.needs_head else f"{head_name} head skipped"
    if cap.fused_head:
        head = f"{head_name} head fused into the loss (logits formed chunk by chunk, never materialised)"
    eager = f", eager attention in {_blocks(cap.eager_attention_layers)}" if cap.eager_attention_layers else ""
    return f"{model.role} '{model.name}' {runs}, {head}{eager}"


def _blocks(layers: list[int]) -> str:
    return f"block{'s' if len(layers) > 1 else ''} {ranges(layers)}"


def describe_points(cap: ModelCapture) -> str:
    """``hidden[2, 5] attn_scores[5] logits``: capture points grouped by kind."""
    kinds: dict[str, list[int]] = {}
    for p in cap.points:
        kinds.setdefault(p.kind, [])
        if p.layer is not None:
            kinds[p.kind].append(p.layer)
    out = [kind if not layers else f"{kind}[{ranges(sorted(layers))}]" for kind, layers in kinds.items()]
    return " ".join(out) or "(no signals: used by an intervention)"


def describe_placement(p: Placement) -> str:
    offload = []
    if p.offload_optimizer != "none":
        offload.append(f"optimizer->{p.offload_optimizer}")
    if p.offload_params != "none":
        offload.append(f"params->{p.offload_params}")
    teachers = ", ".join(f"{m}: {teacher_strategy(p, m)}" for m in sorted(p.teacher_strategy)) or "none"
    return (f"ZeRO-{p.zero_stage}{' offload ' + ', '.join(offload) if offload else ''}, micro-batch {p.micro_batch}"
            f" x accum {p.grad_accum}, {'activation checkpointing, ' if p.activation_checkpointing else ''}"
            f"{p.precision}; teachers {teachers}")


def teacher_strategy(p: Placement, name: str) -> str:
    """``sharded``, ``sharded (hpZ 8)``, ``tensor_parallel (8)``, ...: a teacher's strategy with its group size."""
    s = p.teacher_strategy[name]
    if name in p.teacher_tp:
        return f"{s} ({p.teacher_tp[name]})"
    return f"{s} (hpZ {p.teacher_hpz[name]})" if name in p.teacher_hpz else s


def pin_block(stage: str, p: Placement) -> str:
    """The ``placement`` declaration that pins ``p`` for ``stage`` (to reproduce a placement one trusts)."""
    keys = [f"zero: {p.zero_stage}"]
    if p.offload_optimizer != "none":
        keys.append(f"offload_optimizer: {p.offload_optimizer}")
    if p.offload_params != "none":
        keys.append(f"offload_params: {p.offload_params}")
    keys += [f"micro_batch: {p.micro_batch}", f"checkpointing: {'true' if p.activation_checkpointing else 'false'}"]
    keys += [f"teacher {name}: {strategy}" for name, strategy in sorted(p.teacher_strategy.items())]
    return f"placement {stage} {{ {'; '.join(keys)} }}"


# ---------------------------------------------------------------- the report
