"""Tensor-parallel teachers: which degrees a teacher can run at, what a rank holds, what a step exchanges.

A ``tensor_parallel`` teacher of degree ``t`` is split over ``t`` ranks of one node (Megatron's layout, GKD's
MP=8): every block's query/key/value and gate/up projections by output columns, its attention output and down
projections by input rows; embeddings, final norm and head stay whole on every rank (``runtime/tensor_parallel.py``).
The ``t`` ranks of a group run the teacher together on the union of their micro-batches, and each keeps the
rows of its own. Per rank and micro-batch:

- memory (``planner.memory.teacher_items``): ``blocks / t + embeddings + norm + head`` parameters resident in the teacher's dtype, no gathered
  window; the forward's temporaries at ``t x micro`` sequences (the union), its signals until each rank has cut
  its own rows;
- compute: ``t x micro`` sequences through ``1/t`` of every block: the same FLOPs as a replica;
- communication: two all-reduces per block (after the attention output and the down projection) of the
  union's residual stream, ``t micro s h`` elements in the teacher's dtype, inside the node (``planner.collectives``),
  plus one all-gather of the token ids.

Degrees searched: ``t`` >= 2 dividing the GPUs per node, the attention heads, the key/value heads and the FFN
width. Eligible teachers: Llama-family decoders (llama, qwen2, mistral: the layout the runtime splits) whose
stage reads only hidden states, embeddings or logits of them (query/key/value, FFN inputs and attention maps
would be per-rank slices) and runs no intervention.
"""

from __future__ import annotations

from gkdlang.spec import ModelSpec, StageSpec
from planner.collectives import Topology, all_gather, all_reduce
from planner.memory import DTYPE_BYTES
from planner.plan import ModelCapture

TP_FAMILIES = frozenset({"llama", "qwen2", "mistral"})
#: signals a tensor-parallel teacher gives whole on every rank
TP_SIGNALS = frozenset({"hidden", "embeddings", "logits", "labels", "tokens"})
#: all-reduces per block (attention output, FFN down projection)
ALL_REDUCES_PER_BLOCK = 2


def degrees(model: ModelSpec, cap: ModelCapture, stage: StageSpec, gpus_per_node: int) -> tuple[int, ...]:
    """The tensor-parallel degrees the runtime can run this teacher at in this stage (empty: none)."""
    return tuple(t for t in range(2, gpus_per_node + 1) if not why_not(model, cap, stage, gpus_per_node, t))


def why_not(model: ModelSpec, cap: ModelCapture, stage: StageSpec, gpus_per_node: int, t: int) -> str | None:
    """Why degree ``t`` cannot run (None when it can)."""
    a = model.arch
    if a.family not in TP_FAMILIES or a.is_encoder:
        return f"the runtime splits Llama-family decoders only (llama, qwen2, mistral), not {a.family}"
    if model.head.kind not in ("lm", "none"):
        return f"a {model.head.kind} head is not split"
    if stage.interventions:
        return "the stage runs interventions (they call the teacher's blocks themselves)"
    read = sorted({p.kind for p in cap.points} - TP_SIGNALS)
    if read:
        return f"the stage reads {', '.join(read)}, which each rank would hold only a slice of"
    if gpus_per_node % t:
        return f"{t} does not divide the {gpus_per_node} devices of a node"
    for what, n in (("attention heads", a.num_heads), ("key/value heads", a.num_kv_heads),
                    ("FFN width", a.intermediate_size)):
        if n % t:
            return f"{t} does not divide the {n} {what}"
    return None


def blocks_run(model: ModelSpec, cap: ModelCapture) -> int:
    return model.arch.num_layers if cap.stop_after_layer is None else cap.stop_after_layer + 1


def comm_seconds(model: ModelSpec, cap: ModelCapture, micro: int, seq: float, t: int, topo: Topology) -> float:
    """One micro-batch: ``ALL_REDUCES_PER_BLOCK`` all-reduces per block of the union's residual stream inside the
    node, and the token ids gathered."""
    group = topo.within_node(t)
    blocks = blocks_run(model, cap)
    stream = t * micro * seq * model.arch.hidden_size * DTYPE_BYTES[model.dtype]
    calls = ALL_REDUCES_PER_BLOCK * blocks
    return all_reduce(calls * stream, group, calls=calls) + all_gather(t * micro * seq * 8, group)


def placement_notes(stage: str, chosen, step_time: float, alternatives) -> list[str]:
    """Why a tensor-parallel or hpZ teacher was chosen: what it holds and moves, and the fastest runner-up that
    places the teacher otherwise (``alternatives``: the plan's candidates)."""
    from planner.describe import teacher_strategy

    out = []
    for name, strategy in sorted(chosen.teacher_strategy.items()):
        if strategy == "tensor_parallel":
            t = chosen.teacher_tp[name]
            what = (f"runs tensor parallel over {t} GPUs of a node: 1/{t} of every block resident, no gathered "
                    f"window, {ALL_REDUCES_PER_BLOCK} all-reduces per block inside the node, nothing across nodes")
        elif name in chosen.teacher_hpz:
            what = (f"is sharded with an hpZ secondary partition over the {chosen.teacher_hpz[name]} GPUs of each node "
                    "(zero_hpz_partition_size): after its first forward its gathers stay inside the node")
        else:
            continue
        mine = teacher_strategy(chosen, name)
        other = next((a for a in alternatives if a.fits and teacher_strategy(a.placement, name) != mine), None)
        versus = (f"; the fastest placement with the teacher {teacher_strategy(other.placement, name)} takes "
                  f"{other.step_time_s:.3g}s ({other.step_time_s / step_time:.2f}x)") if other else \
            "; no other teacher placement fits"
        out.append(f"stage '{stage}': teacher '{name}' {what}: predicted {step_time:.3g}s per step{versus}")
    return out
