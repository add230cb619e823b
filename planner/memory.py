"""Models + captures + placement + shapes -> predicted memory per rank, every figure an itemised ``MemoryItem``.

What one rank holds while training one micro-batch of a stage:

- student model states (``student_model_states``): bytes per parameter exactly as DeepSpeed's own
  estimators (``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``) count
  them for 16-bit mixed precision: 2 (bf16/fp16 weights) + 18 sharded over the ZeRO ranks (2 bf16 gradients,
  4 fp32 gradients, 4 fp32 master weights, 8 Adam m and v); ZeRO-3 adds 4 bytes for the largest layer's
  gathered weights and gradients. ZeRO-0 keeps all 20 on every rank, ZeRO-1 shards only the fp32 part.
  fp32 training has no 16-bit copy: 4 (weights) + 4 (gradients) + 4 (DeepSpeed's fp32 partition copy; not
  under ZeRO-0) + 8 (Adam), sharded the same way. CPU figures are per node, as DeepSpeed's, including its
  1.5 buffer factor; they are split evenly over the node's ranks in ``RankMemory``.
- teachers (``teacher_items``): weights in the teacher's dtype of what the runtime keeps (a teacher the plan
  stops after block k and whose head it never runs is pruned to blocks 0..k right after loading), replicated / ZeRO-3 sharded / offloaded to CPU or NVMe (the GPU keeps a prefetch
  window of ``PREFETCH_BLOCKS`` blocks) / on separate ranks / offline (only cached signals are read);
  forward activations under ``no_grad`` up to ``stop_after_layer`` (only live tensors: the residual stream and
  the widest block temporary), captured signals alive until the loss.
- activations (``block_bytes_per_token``): what autograd saves per block for each family, read off the
  Hugging Face implementations and checked against measured CPU memory (``bench/memory_accuracy.py``).
  A fused attention kernel saves no s^2 term; blocks in ``eager_attention_layers`` pay ``b*H*s^2``. On
  CPU, attention dropout makes sdpa fall back to its fp32 math path (s^2 terms again) and dropout masks are
  stored in the activation dtype (GPUs store them as 1-byte bools). Activation checkpointing keeps one block
  input per block and recomputes one block at a time.
- logits and loss (``student_logits``): ``b*s*V`` in the model dtype (none with a fused head), and per loss
  kernel its measured bytes: a chunked kernel's logit gradient (model dtype) and chunk-sized fp32 temporaries,
  a fused head's hidden-state and head-weight gradients (docs/cost-model.md, bench/loss_memory.py).
- weight gradients in backward (``backward_grad_items``): the head's and the token embeddings' ``V x h``
  gradients where they are temporaries beyond ``student.grads`` (``grads_held``): at the head's backward, and
  at the end of backward, three of them for a tied head (measured, bench/lora.py).
- ZeRO communication buckets and a fixed runtime overhead: the catalog's ``Device.context`` but at least
  ``RUNTIME_OVERHEAD_GPU`` = 1 GiB on GPUs (CUDA context ~0.5 GiB, cuBLAS workspaces, NCCL buffers, allocator
  slack) and ``RUNTIME_OVERHEAD_CPU`` = 512 MiB on CPU (torch + DeepSpeed + transformers process, gloo).

The peak is taken over two phases of a micro-batch: the teachers' forward (teacher weights and temporaries,
captured signals) and the student's loss + backward (everything the student saved, captured signals, logits
and loss temporaries); the items of the larger phase are reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gkdlang.arch import ArchInfo
from gkdlang.builtins import DTYPE_BYTES
from gkdlang.spec import LoraSpec, ModelSpec, OpNode, Project, StageSpec
from planner.generation import GenerationShape, phase_items
from planner.gradmem import backward_grad_items, grads_held, head_width
from planner.graph import numel, signal_shape
from planner.hardware import Device
from planner.params import ParamCounts
from planner.plan import MemoryItem, ModelCapture, Placement, RankMemory
from planner.trainable import frozen_params, trained_params

GiB = 2**30
MiB = 2**20

#: CUDA context (~500 MiB on Hopper), cuBLAS/cuDNN workspaces, NCCL channel buffers and caching-allocator slack.
RUNTIME_OVERHEAD_GPU = 1 * GiB
#: torch + DeepSpeed + transformers imported in one CPU process (measured RSS ~400 MiB) and gloo buffers.
RUNTIME_OVERHEAD_CPU = 512 * MiB
#: Blocks of an offloaded / sharded teacher that sit gathered on the GPU: the one running and the one prefetched.
PREFETCH_BLOCKS = 2
#: DeepSpeed's host-memory buffer factor in its estimators (pinned staging buffers, fragmentation).
CPU_BUFFER_FACTOR = 1.5
#: NVMe offload swap buffers (DeepSpeed defaults: buffer_count 5 x buffer_size 1e8 elements, fp32) per rank.
NVME_SWAP_BUFFER = 5 * 100_000_000 * 4


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ClusterShape:
    """The hardware a placement is evaluated on."""

    device: Device
    world: int
    gpus_per_node: int
    nodes: int
    cpu_per_node: int | None = None
    """Host bytes per node; None = not given (offload is assumed to fit)."""
    nvme_per_node: int | None = None
    """NVMe bytes per node; None = NVMe offload unavailable."""


@dataclass(frozen=True)
class StageModels:
    """The models of one stage with their exact parameter counts and what each computes."""

    students: list[tuple[ModelSpec, ParamCounts, ModelCapture]]
    teachers: list[tuple[ModelSpec, ParamCounts, ModelCapture]]
    seq_len: int
    extra_trainable: int = 0
    """Parameters of learned transforms (projections) trained with the student."""
    offline: frozenset[str] = frozenset()
    """Teachers whose signals may come from their cache (planner.offline); the search tries ``offline`` for them."""
    epochs: float = 1.0
    """Passes over the stage's data: an offline teacher's one pass over it is amortised over them."""
    logit_losses: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Model -> kernels of the terms reading its logits (``SignalGraph.logit_losses``): their memory per kernel."""
    fusable: frozenset[str] = frozenset()
    """Models whose heads the loss can fuse (``SignalGraph.fusable_heads``); ``fused_head`` says when it does."""
    tensor_parallel: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Teacher -> the tensor-parallel degrees it can run at in this stage (``planner.tensor_parallel.degrees``)."""
    lengths: tuple[int, ...] = ()
    """Sorted token counts of unpacked documents, clipped to seq_len (``planner.tokens``); empty: every
    sequence fills seq_len (packed data, or lengths unknown at plan time). Memory always plans for full
    sequences (a micro-batch may hold one); the step time uses the expected padded width."""
    generation: GenerationShape | None = None
    """A generating stage's generators and lengths (planner.generation); None: batches come from the data."""
    memo: dict = field(default_factory=dict, init=False, compare=False, repr=False, hash=False)
    """Item lists shared by the placements of one search (each depends on a few placement fields only)."""

    def step_seq(self, micro: int) -> float:
        """Positions per sequence the models run: seq_len, or a micro-batch's expected padded width."""
        if not self.lengths:
            return float(self.seq_len)
        key = ("step_seq", micro)
        if key not in self.memo:
            from planner.tokens import expected_max

            self.memo[key] = expected_max(list(self.lengths), micro)
        return self.memo[key]

    @property
    def trainable(self) -> int:
        return sum(trained_params(m, c) for m, c, _ in self.students) + self.extra_trainable

    @property
    def frozen(self) -> int:
        """Student parameters run but not trained (LoRA students' own weights, planner.trainable)."""
        return sum(frozen_params(m, c) for m, c, _ in self.students)

    @property
    def largest_layer(self) -> int:
        return max((c.largest_layer for _, c, _ in self.students), default=0)


def learned_params(stage: StageSpec) -> int:
    """Parameters of the stage's learned transforms: ``in*out + out`` per distinct module key."""
    modules: dict[str, int] = {}

    def walk(node) -> None:
        if isinstance(node, OpNode):
            if isinstance(node, Project) and node.module is not None and node.dim_out is not None:
                modules[node.module] = node.param_count()
            for child in node.inputs:
                walk(child)

    for term in stage.loss:
        walk(term.target)
        walk(term.pred)
    return sum(modules.values())


# ---------------------------------------------------------------- student model states


@dataclass(frozen=True)
class ModelStates:
    """Student model states: per-rank GPU (and NVMe) items, per-node CPU items (DeepSpeed's convention)."""

    rank_items: list[MemoryItem]
    node_cpu_items: list[MemoryItem] = field(default_factory=list)

    @property
    def gpu(self) -> int:
        return sum(i.bytes for i in self.rank_items if i.device == "gpu")

    @property
    def cpu_node(self) -> int:
        return sum(i.bytes for i in self.node_cpu_items)


def student_model_states(params: int, largest_layer: int, zero_stage: int, *, offload_optimizer: str = "none",
                         offload_params: str = "none", gpus_per_node: int = 1, nodes: int = 1,
                         precision: str = "bf16", zero_init: bool = False) -> ModelStates:
    """Weights, gradients and Adam states of ``params`` trainable parameters on one rank (see module docstring).

    ``zero_init``: whether the model is partitioned while it is built (DeepSpeed's ``zero.Init``); gkdc's
    runtime does so for a ZeRO-3 student (``_zero_init``); False models a whole host copy per rank first.
    """
    world = gpus_per_node * nodes
    w = 2 if precision != "fp32" else 4  # bytes of the compute copy of weights and of its gradients
    sharded = _sharded_bytes(precision, zero_stage)  # per parameter, divided over the ranks
    if zero_stage == 3:
        return _zero3_states(params, largest_layer, w, sharded, offload_optimizer, offload_params,
                             gpus_per_node, nodes, zero_init)
    offloaded = offload_optimizer != "none" and zero_stage in (1, 2)
    rank = [MemoryItem(name="student.params", bytes=w * params, note=f"{w} B/param, replicated")]
    if zero_stage < 2:
        rank.append(MemoryItem(name="student.grads", bytes=w * params, note=f"{w} B/param, replicated"))
    if offloaded:
        # DeepSpeed: host holds fp32 master, gradients and Adam for the whole node's ranks
        cpu = int(params * max(4 * world, 16) * CPU_BUFFER_FACTOR)
        return ModelStates(rank, [MemoryItem(name="student.optimizer", bytes=cpu, device="cpu",
                                             note="offloaded fp32 master, grads, Adam (per node, x1.5 buffers)")])
    div = world if zero_stage >= 1 else 1
    optimizer = ("student.optimizer", sharded - (w if zero_stage == 2 else 0), "fp32 master/grads + Adam m,v")
    parts = [("student.grads", w, "gradients"), optimizer] if zero_stage == 2 else [optimizer]
    rank += _split_sharded(params, sharded, div, parts)
    cpu = int(params * 4 * gpus_per_node * CPU_BUFFER_FACTOR)  # every rank loads the fp32 model on the host first
    return ModelStates(rank, [MemoryItem(name="student.load", bytes=cpu, device="cpu", note="fp32 copy per rank while loading")])


def _sharded_bytes(precision: str, zero_stage: int) -> int:
    """Bytes per parameter DeepSpeed divides over ranks (ZeRO-1/2/3) or keeps whole (ZeRO-0)."""
    if precision != "fp32":
        return 18 if zero_stage >= 2 else 16  # ZeRO-0/1 keep the 2 B of 16-bit grads in the replicated part
    return 20 if zero_stage >= 2 else (16 if zero_stage == 1 else 8)  # fp32 grads 4 + copy 4 + Adam 8 (+ grads)


def _split_sharded(params: int, per_param: int, div: int, parts: list[tuple[str, int, str]]) -> list[MemoryItem]:
    """The sharded part as DeepSpeed computes it (``int(per_param * params / ranks)``), split into named items.

    ``parts`` are (name, bytes per parameter, what) of all but the last item; the last gets the remainder.
    """
    total = int(per_param * params / div)
    where = f"sharded over {div} ranks" if div > 1 else "replicated"
    items, used = [], 0
    for name, per, what in parts[:-1]:
        n = int(per * params / div)
        items.append(MemoryItem(name=name, bytes=n, note=f"{what}, {per} B/param, {where}"))
        used += n
    name, per, what = parts[-1]
    items.append(MemoryItem(name=name, bytes=total - used, note=f"{what}, {per} B/param, {where}"))
    return items


def _zero3_states(params: int, largest: int, w: int, sharded: int, off_opt: str, off_par: str,
                  gpn: int, nodes: int, zero_init: bool) -> ModelStates:
    world = gpn * nodes
    gathered = MemoryItem(name="student.gathered_layer", bytes=2 * w * largest,
                          note="largest layer's weights + grads gathered (ZeRO-3)")
    if off_opt == "none":
        # DeepSpeed's 18 B: 2 weights + 2 grads + 14 (fp32 master 4, Adam 8, fp32 grads of the sub-group stepped)
        parts = [("student.params", w, "weights"), ("student.grads", w, "gradients"),
                 ("student.optimizer", sharded - 2 * w, "fp32 master + Adam m,v + fp32 grads")]
        rank = [gathered, *_split_sharded(params, sharded, world, parts)]
        cpu = largest * 4 * gpn * CPU_BUFFER_FACTOR if zero_init else params * 4 * gpn * CPU_BUFFER_FACTOR
        return ModelStates(rank, [MemoryItem(name="student.load", bytes=int(cpu), device="cpu",
                                             note="fp32 copy per rank while loading")])
    host_kind = off_opt  # cpu or nvme
    if off_par == "none":
        rank = [gathered, MemoryItem(name="student.params", bytes=int(w * params / world),
                                     note=f"{w} B/param sharded over {world} ranks")]
        per = sharded - w
    else:
        rank = [gathered]
        per = sharded
    # same float expression order as DeepSpeed's estimator, so the figures match to the byte
    if zero_init:
        host = params * per * (1 / nodes) * CPU_BUFFER_FACTOR
    else:
        host = params * max(4 * gpn, per * (1 / nodes)) * CPU_BUFFER_FACTOR
    if host_kind == "nvme":
        rank.append(MemoryItem(name="student.optimizer", bytes=int(params * per / world), device="nvme",
                               note="fp32 master + Adam swapped to NVMe"))
        return ModelStates(rank, [MemoryItem(name="student.swap_buffers", bytes=NVME_SWAP_BUFFER * gpn,
                                             device="cpu", note="pinned NVMe swap buffers")])
    return ModelStates(rank, [MemoryItem(name="student.optimizer", bytes=int(host), device="cpu",
                                         note="offloaded states (per node, x1.5 buffers)")])


# ---------------------------------------------------------------- activations


@dataclass(frozen=True)
class ActShape:
    """Dtypes and kernel choices that decide activation bytes."""

    dtype_bytes: int
    mask_bytes: int
    """Bytes per element of a dropout mask (0 = no dropout)."""
    attn_dropout: bool
    fused: bool
    """sdpa runs a fused kernel (no s^2 tensors) on non-eager blocks."""
    math_bytes: int
    """Bytes per element of sdpa's math fallback (fp32 on CPU)."""
    lora: LoraSpec | None = None
    """A LoRA student's adapter: its frozen weights need no saved inputs for weight gradients (gated blocks)."""


def _dropouts(arch: ArchInfo) -> tuple[float, float]:
    """(hidden dropout, attention dropout) with the transformers defaults of each family."""
    c, fam = arch.config, arch.family
    if fam == "gpt2":
        return c.get("resid_pdrop", 0.1), c.get("attn_pdrop", 0.1)
    if fam in ("bert", "roberta"):
        return c.get("hidden_dropout_prob", 0.1), c.get("attention_probs_dropout_prob", 0.1)
    if fam == "opt":
        return c.get("dropout", 0.1), c.get("attention_dropout", 0.0)
    if fam == "bloom":
        return c.get("hidden_dropout", 0.0), c.get("attention_dropout", 0.0)
    if fam == "glm":
        return c.get("output_dropout_prob", 0.1), c.get("attention_dropout_prob", 0.1)
    return 0.0, c.get("attention_dropout", 0.0)


def act_shape(arch: ArchInfo, dtype_bytes: int, device: Device, training: bool = True,
              lora: LoraSpec | None = None) -> ActShape:
    hidden_p, attn_p = _dropouts(arch) if training else (0.0, 0.0)
    mask = 0 if hidden_p == 0 else (dtype_bytes if device.is_cpu else 1)
    # CPU sdpa has no fused kernel with dropout: it materialises the attention matrix in fp32
    fused = not (device.is_cpu and attn_p > 0)
    return ActShape(dtype_bytes, mask, attn_p > 0, fused, 4 if device.is_cpu else dtype_bytes, lora)


_MLP_SAVED = {"gpt2": 5, "bert": 2, "roberta": 2, "glm": 2, "bloom": 2, "opt": 1}
"""FFN-width tensors saved per token: GPT-2's gelu_new is written in Python (4 intermediates + its output),
nn.GELU saves input and output, BLOOM's GeLUFunction the same, OPT's ReLU only its output."""


def block_bytes_per_token(arch: ArchInfo, seq_len: int, a: ActShape, eager: bool) -> float:
    """Bytes autograd saves per token for one transformer block in training."""
    h, i, kv, heads, d = arch.hidden_size, arch.intermediate_size, arch.kv_dim, arch.num_heads, a.dtype_bytes
    if arch.gated_ffn:  # Llama / Qwen2 / Mistral: RMSNorm in fp32, no dropout
        norms = 2 * (4 * h + 2 * d * h + 4)  # fp32 input copy, normed output, linear input, rstd
        attn = d * (2 * h + 2 * kv)  # rotated q, k, v, attention output
        mlp = 4 * i * d  # gate, silu(gate), up, product
        if a.lora is not None:  # frozen weights keep no inputs for their gradients (bench/lora.py measures it)
            t = set(a.lora.targets)
            # a norm's normed output is saved for its (frozen) weight only; its output, the projections' input,
            # only when a LoRA layer reads it (lora_A); down_proj's input (the product) likewise
            read = bool(t & {"q_proj", "k_proj", "v_proj"}) + bool(t & {"gate_proj", "up_proj"})
            norms = 2 * (4 * h + 4) + d * h * read
            mlp = (3 + ("down_proj" in t)) * i * d
            attn += len(t) * a.lora.r * d  # lora_A's output, saved for lora_B's gradient
        if eager or not a.fused:
            attn += d * 2 * (h - kv)  # repeat_kv copies of k and v
            attn += heads * seq_len * (4 + (d if d != 4 else 0))  # fp32 softmax and its cast
        else:
            attn += 4 * heads  # log-sum-exp
        return norms + attn + mlp
    if arch.family == "bloom":
        mlp_w = 4 * h
    else:
        mlp_w = i
    norms = 2 * (d * h + 2 * d)  # LayerNorm output + mean/rstd (activation dtype)
    residual = 2 * d * h  # block-internal and block-output residual stream (the next LayerNorm's input)
    masks = 2 * a.mask_bytes * h
    mlp = _MLP_SAVED.get(arch.family, 2) * mlp_w * d
    if eager or not a.fused:
        ab = a.math_bytes if not eager else d
        attn = ab * 3 * h + d * h  # q, k, v for the matmuls + merged heads
        per_head = 1 + (2 if a.attn_dropout else 0)  # softmax output (+ dropout mask and output)
        attn += ab * heads * seq_len * per_head
    else:
        attn = d * (6 * h) + 4 * heads  # q copy, fused qkv output, attention output, merged heads, lse
    return norms + residual + masks + mlp + attn


def _edge_bytes_per_token(arch: ArchInfo, a: ActShape) -> float:
    """Embeddings (ids, first residual, embedding dropout) and the final norm before the head."""
    h, d = arch.hidden_size, a.dtype_bytes
    ids = 8 * 2  # input ids and position ids / mask (int64)
    if arch.gated_ffn:  # a LoRA student's final norm weight and head are frozen: neither keeps its input
        return ids + 4 * h + 4 + (0 if a.lora is not None else 2 * d * h)
    return ids + d * h + a.mask_bytes * h + d * h + 2 * d


def student_activations(arch: ArchInfo, micro: int, seq: int, a: ActShape, *, checkpointing: bool,
                        eager_layers: list[int], loss_bytes: int = 0) -> list[MemoryItem]:
    """Saved activations of a trained model (without logits), itemised.

    With checkpointing, a block is recomputed (its saved tensors plus its backward's gradient temporaries) only
    after the loss's backward has freed ``loss_bytes``; the recompute item counts only what exceeds them.
    """
    tokens = micro * seq
    blocks = [block_bytes_per_token(arch, seq, a, layer in eager_layers) for layer in range(arch.num_layers)]
    edge = int(tokens * _edge_bytes_per_token(arch, a))
    if not checkpointing:
        return [MemoryItem(name="activations.blocks", bytes=int(tokens * sum(blocks)),
                           note=f"{arch.num_layers} blocks, {len(eager_layers)} eager"),
                MemoryItem(name="activations.embeddings_norm", bytes=edge)]
    inputs = arch.num_layers * tokens * arch.hidden_size * a.dtype_bytes
    # gradients alive while a recomputed block runs backward: the block's output grad plus FFN-wide temporaries
    # (measured: ~i/2 for the gated SwiGLU MLP, ~3i/2 for GPT-2's Python gelu_new and other plain MLPs)
    ffn_grads = arch.intermediate_size // 2 if arch.gated_ffn else 3 * arch.intermediate_size // 2
    grads = tokens * a.dtype_bytes * (arch.hidden_size + ffn_grads)
    recompute = max(0, int(tokens * max(blocks, default=0)) + grads - loss_bytes)
    return [MemoryItem(name="activations.checkpoints", bytes=inputs, note="one block input per block"),
            MemoryItem(name="activations.recompute", bytes=recompute,
                       note="one block recomputed in backward, beyond the freed loss temporaries"),
            MemoryItem(name="activations.embeddings_norm", bytes=edge)]


#: fp32 elements of one chunk operand of the row-chunked logit kernels (runtime.chunked.CHUNK_ELEMENTS; a test
#: keeps the two equal): a chunk holds CHUNK_ELEMENTS // V rows.
CHUNK_ELEMENTS = 1 << 21
#: Chunk-sized fp32 tensors alive at the peak of each chunked kernel, measured (profiler, fp32 and bf16, exact
#: to 0.01 operand; docs/cost-model.md): the kernel's peak minus its gradient buffer, in chunk operands.
#: ``kl`` (either direction) 4, ``soft_ce`` 4, ``jsd`` / ``gjsd`` / ``skew_kl`` / ``skew_rkl`` 5, ``ce`` 1.
CHUNK_OPERANDS = {"kl": 4, "soft_ce": 4, "jsd": 5, "gjsd": 5, "skew_kl": 5, "skew_rkl": 5, "ce": 1}
#: A fused head adds one chunk of logits in the model dtype (measured: +1.0 operand in fp32, +0.5 in bf16); a
#: fused teacher head adds nothing at the peak (its chunk is freed into the kernel's fp32 copy).
FUSED_CHUNK_DTYPE_OPERANDS = 1
#: Bytes per logit element of a loss kernel that is not chunked (a dense autograd kernel reading the logits,
#: e.g. mse on logits): its fp32 log-softmax output and two fp32 gradients, as F.cross_entropy (measured 12 B).
DENSE_LOSS_BYTES = 12


def chunk_bytes(rows: int, width: int, losses: tuple[str, ...], fused: bool, d: int) -> int:
    """The largest working set of the chunked kernels among ``losses`` (terms run one after another)."""
    chunk = min(rows, max(1, CHUNK_ELEMENTS // max(1, width))) * width
    extra = FUSED_CHUNK_DTYPE_OPERANDS * chunk * d if fused else 0
    return max((CHUNK_OPERANDS[f] * chunk * 4 + extra for f in losses if f in CHUNK_OPERANDS), default=0)


def student_logits(model: ModelSpec, micro: int, seq: int, d: int, needs_head: bool,
                   losses: tuple[str, ...] = (), fused: bool = False) -> list[MemoryItem]:
    """Logits and logit-loss memory of one trained model, per kernel (docs/cost-model.md, bench/loss_memory.py).

    ``losses``: the kernels of the terms reading these logits. A chunked kernel writes the logits' gradient
    (model dtype) in its forward and keeps chunk-sized fp32 temporaries; a fused head (``fused``) has no logits
    and no logit gradient, but per term the gradients of the hidden states (model dtype) and of the head
    weight (fp32). Other kernels reading the logits cost ``DENSE_LOSS_BYTES`` per element.
    """
    if not needs_head:
        return []
    rows = micro * (seq if model.head.kind == "lm" else 1)
    width = head_width(model)
    n = rows * width
    chunked = [f for f in losses if f in CHUNK_OPERANDS]
    dense = len(losses) - len(chunked) if losses else 1
    items = []
    if fused:
        h = model.arch.hidden_size
        items.append(MemoryItem(name="loss.head_grads", bytes=len(chunked) * (rows * h * d + width * h * 4),
                                note=f"{len(chunked)} term(s): hidden-state grads ({d} B) + fp32 head-weight grads; "
                                     "logits never materialised"))
    else:
        items.append(MemoryItem(name="logits.student", bytes=n * d, note="b*s*V model output"))
        if chunked:
            items.append(MemoryItem(name="loss.grad", bytes=len(chunked) * n * d,
                                    note=f"logit gradient ({d} B/element) written by {len(chunked)} chunked term(s)"))
    if chunked:
        items.append(MemoryItem(name="loss.chunks", bytes=chunk_bytes(rows, width, tuple(chunked), fused, d),
                                note=f"fp32 chunk temporaries of {', '.join(sorted(set(chunked)))}"))
    if dense:
        items += [MemoryItem(name="loss.saved", bytes=dense * n * 4,
                             note=f"{dense} unchunked term(s): fp32 log-softmax output"),
                  MemoryItem(name="loss.backward", bytes=dense * n * (DENSE_LOSS_BYTES - 4),
                             note="fp32 grads of log-probs and logits")]
    return items


# ---------------------------------------------------------------- teachers


def teacher_signal_bytes(model: ModelSpec, cap: ModelCapture, micro: int, seq: int, fused: bool = False) -> int:
    """Captured signals of one teacher for a micro-batch, in its dtype (alive until the loss); a fused head keeps
    the final hidden states in place of the logits."""
    d = DTYPE_BYTES[model.dtype]
    shape = lambda kind: ("b", "s", model.arch.hidden_size) if fused and kind == "logits" else \
        signal_shape(model, kind)  # noqa: E731
    return sum(numel(shape(p.kind), micro, seq) * d for p in cap.points if p.kind not in ("labels", "tokens"))


def teacher_forward_peak(model: ModelSpec, counts: ParamCounts, cap: ModelCapture, micro: int, seq: int) -> int:
    """Live bytes of a no_grad forward at its widest point: residual stream + widest block temporary (+ logits)."""
    a, d, tokens = model.arch, DTYPE_BYTES[model.dtype], micro * seq
    ffn = (3 if a.gated_ffn else 2) * a.intermediate_size  # gate/up/act or fc1 output + activation
    attn = 2 * a.hidden_size + 2 * a.kv_dim
    widest = tokens * d * (2 * a.hidden_size + max(ffn, attn))
    if cap.eager_attention_layers:
        widest = max(widest, tokens * d * 2 * a.hidden_size + 2 * micro * a.num_heads * seq * seq * 4)
    return widest


def teacher_needed_params(counts: ParamCounts, cap: ModelCapture, arch: ArchInfo) -> int:
    """Parameters a forward touches: embeddings, blocks up to stop_after_layer, head when needed."""
    blocks = arch.num_layers if cap.stop_after_layer is None else cap.stop_after_layer + 1
    head = counts.final_norm + counts.head if cap.needs_head else 0
    return counts.embeddings + blocks * counts.per_layer + head


def kept_teacher_params(counts: ParamCounts, cap: ModelCapture) -> int:
    """Parameters a teacher holds after the runtime prunes it (runtime.adapters.Adapter.prune)."""
    if cap.stop_after_layer is None or cap.needs_head:
        return counts.total
    return counts.embeddings + (cap.stop_after_layer + 1) * counts.per_layer + counts.final_norm


def teacher_window_params(counts: ParamCounts) -> int:
    """Parameters a ZeRO-3 teacher may hold gathered at once: ``PREFETCH_BLOCKS`` blocks and the largest of
    embeddings / head. ``planner.dsconfig`` writes it as the teacher engine's ``stage3_max_live_parameters``
    (with reuse distance 0), so DeepSpeed releases every other gathered block."""
    return PREFETCH_BLOCKS * counts.per_layer + max(counts.embeddings, counts.head)


def teacher_items(model: ModelSpec, counts: ParamCounts, cap: ModelCapture, strategy: str,
                  cluster: ClusterShape, group: int = 1) -> tuple[list[MemoryItem], list[MemoryItem]]:
    """(student-rank items, node CPU items) for a teacher's weights under a strategy; ``group``: the degree of a
    tensor-parallel teacher, the hpZ secondary partition size of a sharded one (1: none)."""
    d = DTYPE_BYTES[model.dtype]
    name = f"teacher:{model.name}"
    full = kept_teacher_params(counts, cap) * d
    window = teacher_window_params(counts) * d
    gpn = cluster.gpus_per_node
    if strategy == "replicated":
        return [MemoryItem(name=f"{name}.weights", bytes=full, note=f"{model.dtype}, replicated")], []
    if strategy == "tensor_parallel":  # 1/t of every kept block; embeddings, norm and head whole (tensor_parallel.py)
        blocks = counts.layers if cap.stop_after_layer is None or cap.needs_head else \
            (cap.stop_after_layer + 1) * counts.per_layer
        whole = kept_teacher_params(counts, cap) - blocks
        return [MemoryItem(name=f"{name}.weights", bytes=math.ceil(blocks / group) * d,
                           note=f"{model.dtype}, 1/{group} of every block (tensor parallel)"),
                MemoryItem(name=f"{name}.weights_whole", bytes=whole * d, note="embeddings, norm and head whole")], []
    if strategy == "sharded":
        hpz = [MemoryItem(name=f"{name}.hpz_secondary", bytes=math.ceil(full / group),
                          note=f"hpZ secondary partition over {group} ranks of the node")] * (group > 1)
        return [MemoryItem(name=f"{name}.weights", bytes=math.ceil(full / cluster.world),
                           note=f"ZeRO-3 shard of {cluster.world}"),
                MemoryItem(name=f"{name}.window", bytes=window, note=f"{PREFETCH_BLOCKS} gathered blocks"), *hpz], []
    if strategy == "cpu_offload":
        node = math.ceil(full / cluster.world) * gpn
        return ([MemoryItem(name=f"{name}.window", bytes=window, note="prefetch window; weights in host memory")],
                [MemoryItem(name=f"{name}.weights", bytes=node, device="cpu", note="pinned host copy (per node)")])
    if strategy == "nvme_offload":
        return ([MemoryItem(name=f"{name}.window", bytes=window, note="prefetch window; weights on NVMe"),
                 MemoryItem(name=f"{name}.weights", bytes=math.ceil(full / cluster.world), device="nvme")],
                [MemoryItem(name=f"{name}.swap_buffers", bytes=NVME_SWAP_BUFFER // 2 * gpn, device="cpu")])
    if strategy in ("separate", "offline"):
        return [], []  # not on student ranks (separate: see separate_teacher_rank; offline: signals only)
    raise ValueError(f"unknown teacher strategy '{strategy}'")


# ---------------------------------------------------------------- buckets and overhead


@dataclass(frozen=True)
class ZeroBuckets:
    """ZeRO bucket sizes in elements (the values dsconfig writes)."""

    reduce: int
    allgather: int
    prefetch: int
    max_live: int
    persistence: int


#: DeepSpeed's documented defaults would take 5e8-element buckets (3 GB in bf16 for reduce x2 + all-gather);
#: 5e7 keeps bucket memory at ~300 MB while messages stay large enough to saturate NVLink.
BUCKET_ELEMENTS = 50_000_000
PREFETCH_ELEMENTS = 50_000_000
MAX_LIVE_PARAMETERS = 1_000_000_000
PERSISTENCE_THRESHOLD = 100_000


def zero_buckets() -> ZeroBuckets:
    """The bucket sizes dsconfig writes and this module charges for."""
    return ZeroBuckets(reduce=BUCKET_ELEMENTS, allgather=BUCKET_ELEMENTS, prefetch=PREFETCH_ELEMENTS,
                       max_live=MAX_LIVE_PARAMETERS, persistence=PERSISTENCE_THRESHOLD)


def bucket_items(zero_stage: int, buckets: ZeroBuckets, precision: str, world: int, trainable: int) -> list[MemoryItem]:
    """ZeRO communication buffers; a bucket never holds more than the trainable parameters."""
    w = DTYPE_BYTES[precision]
    if zero_stage == 0 and world == 1:
        return []
    reduce, gather, prefetch = (min(x, trainable) for x in (buckets.reduce, buckets.allgather, buckets.prefetch))
    if zero_stage in (0, 1, 2):
        # overlap_comm double-buffers the reduce bucket; the all-gather bucket is used after the step
        return [MemoryItem(name="zero.buckets", bytes=(2 * reduce + gather) * w,
                           note="reduce (x2, overlap) + all-gather buckets")]
    # DeepSpeed keeps up to stage3_max_live_parameters gathered while they are reused within the reuse distance
    # (both MAX_LIVE_PARAMETERS): a student below it stays gathered from forward to backward (bench/scale.py)
    live = min(buckets.max_live, trainable)
    return [MemoryItem(name="zero.buckets", bytes=(reduce + prefetch) * w, note="reduce + stage-3 prefetch buckets"),
            MemoryItem(name="zero.live_params", bytes=live * w, note="gathered parameters ZeRO-3 keeps live")]


def overhead_item(device: Device) -> MemoryItem:
    """The device's fixed runtime memory (``Device.context``) plus allocator slack on GPUs."""
    if device.is_cpu:
        return MemoryItem(name="runtime", bytes=max(device.context, RUNTIME_OVERHEAD_CPU), note="torch/DeepSpeed process")
    return MemoryItem(name="runtime", bytes=max(device.context, RUNTIME_OVERHEAD_GPU),
                      note="CUDA context, cuBLAS workspaces, NCCL buffers, allocator slack")


# ---------------------------------------------------------------- per rank


def estimate(models: StageModels, cluster: ClusterShape, p: Placement) -> list[RankMemory]:
    """Predicted memory of every distinct rank (student ranks as rank 0; separate teacher ranks after them)."""
    separate = [t for t in models.teachers if p.teacher_strategy.get(t[0].name) == "separate"]
    teacher_ranks = separate_teacher_ranks(separate, cluster)
    student_world = cluster.world - teacher_ranks
    shape = ClusterShape(cluster.device, student_world, min(cluster.gpus_per_node, student_world),
                         max(1, math.ceil(student_world / cluster.gpus_per_node)), cluster.cpu_per_node,
                         cluster.nvme_per_node)
    ranks = [_rank(0, _student_rank_items(models, shape, p), cluster)]
    if teacher_ranks:
        items = _separate_rank_items(separate, teacher_ranks, models.seq_len, p.micro_batch, cluster.device)
        ranks.append(_rank(student_world, items, cluster))
    return ranks


def separate_teacher_ranks(separate: list, cluster: ClusterShape) -> int:
    """Ranks given to teachers on separate ranks: enough to hold their weights in half of each device."""
    if not separate:
        return 0
    weights = sum(c.total * DTYPE_BYTES[m.dtype] for m, c, _ in separate)
    return min(cluster.world - 1, max(1, math.ceil(weights / (0.5 * cluster.device.memory))))


def _separate_rank_items(separate: list, n: int, seq: int, micro: int, device: Device) -> list[MemoryItem]:
    items = [overhead_item(device)]
    for m, c, cap in separate:
        d = DTYPE_BYTES[m.dtype]
        items.append(MemoryItem(name=f"teacher:{m.name}.weights", bytes=math.ceil(c.total * d / n),
                                note=f"on {n} separate ranks"))
        items.append(MemoryItem(name=f"teacher:{m.name}.forward", bytes=teacher_forward_peak(m, c, cap, micro, seq)))
        items.append(MemoryItem(name=f"signals.teacher:{m.name}", bytes=teacher_signal_bytes(m, cap, micro, seq)))
    return items


def _memo(models: StageModels, key: tuple, make):
    """``make()`` once per key and search: the items are frozen, so placements share them."""
    try:
        return models.memo[key]
    except KeyError:
        value = models.memo[key] = make()
        return value


def _where(models: StageModels, cluster: ClusterShape) -> tuple:
    """A memo key for the hardware; the device is pinned in the memo so its id is never reused meanwhile."""
    models.memo.setdefault(("device", id(cluster.device)), cluster.device)
    return (cluster.world, cluster.gpus_per_node, cluster.nodes, cluster.cpu_per_node, cluster.nvme_per_node,
            id(cluster.device))


def _student_rank_items(models: StageModels, cluster: ClusterShape, p: Placement) -> list[MemoryItem]:
    where = _where(models, cluster)
    states = _memo(models, ("states", p.zero_stage, p.offload_optimizer, p.offload_params, p.precision, *where),
                   lambda: student_model_states(models.trainable, models.largest_layer, p.zero_stage,
                                                offload_optimizer=p.offload_optimizer, offload_params=p.offload_params,
                                                gpus_per_node=cluster.gpus_per_node, nodes=cluster.nodes,
                                                precision=p.precision, zero_init=_zero_init(models)))
    fixed = [overhead_item(cluster.device), *states.rank_items]
    if models.frozen:  # a LoRA student's own weights: cast to the compute dtype by DeepSpeed, no grads or states
        w = 4 if p.precision == "fp32" else 2
        fixed.append(MemoryItem(name="student.frozen_params", bytes=w * models.frozen,
                                note=f"{w} B/param, frozen under the LoRA adapter (no grads, no optimizer states)"))
    # on CPU runs the host copy made while loading *is* the model: counting it again would double it
    cpu = list(_memo(models, ("states.cpu", p.zero_stage, p.offload_optimizer, p.offload_params, p.precision, *where),
                     lambda: [_per_rank(i, cluster.gpus_per_node) for i in states.node_cpu_items
                              if not (cluster.device.is_cpu and i.name == "student.load")]))
    signals, teacher_fwd = [], []
    for m, c, cap in models.teachers:
        strategy = p.teacher_strategy.get(m.name, "replicated")
        group = p.teacher_tp.get(m.name) or p.teacher_hpz.get(m.name) or 1
        on_rank, node_cpu = _memo(models, ("teacher", m.name, strategy, group, *where),
                                  lambda: _teacher_rank_items(m, c, cap, strategy, cluster, group))
        fixed += on_rank
        cpu += node_cpu
        if strategy != "separate":
            fused_t = fused_head(models, m.name, p)
            signals.append(_memo(models, ("signals", m.name, strategy, p.micro_batch, fused_t), lambda: MemoryItem(
                name=f"signals.teacher:{m.name}",
                bytes=_signal_bytes(m, cap, strategy, p.micro_batch, models.seq_len, fused_t),
                note="read from the cache (top-k logits)" if strategy == "offline" else
                "final hidden states instead of logits (fused head)" if fused_t else "")))
            if strategy != "offline":
                tp = p.teacher_tp.get(m.name, 1)  # a tensor-parallel group runs the union of its micro-batches
                teacher_fwd.append(_memo(models, ("teacher.forward", m.name, p.micro_batch, tp), lambda: MemoryItem(
                    name=f"teacher:{m.name}.forward", bytes=teacher_forward_peak(m, c, cap, p.micro_batch * tp,
                                                                                 models.seq_len)
                    + (tp - 1) * teacher_signal_bytes(m, cap, p.micro_batch, models.seq_len))))
    fixed += bucket_items(p.zero_stage, zero_buckets(), p.precision, cluster.world, models.trainable)
    fused = tuple(sorted(n for n in models.fusable if fused_head(models, n, p)))
    held = grads_held(p.zero_stage, p.grad_accum)
    train = _memo(models, ("train", *where, p.micro_batch, p.activation_checkpointing, p.precision, fused, held),
                  lambda: _student_training_items(models, cluster.device, p))
    # phase 1: teachers run (their temporaries + signals); phase 2: student loss and backward
    phase1 = sum(i.bytes for i in signals) + max((i.bytes for i in teacher_fwd), default=0)
    phase2 = sum(i.bytes for i in signals) + sum(i.bytes for i in train)
    worst_teacher = max(teacher_fwd, key=lambda i: i.bytes, default=None)
    phase = [*signals, worst_teacher] if phase1 > phase2 and worst_teacher else [*signals, *train]
    if models.generation is not None:  # phase 0: sampling, before any signal or activation of the step exists
        gen = phase_items(models.generation, p.micro_batch, p.zero_stage, cluster.world, p.precision)
        if sum(i.bytes for i in gen) > sum(i.bytes for i in phase):
            phase = gen
    return fixed + phase + cpu


def _zero_init(models: StageModels) -> bool:
    """Whether a ZeRO-3 student is built partitioned: the runtime does so unless its vocabulary is compressed
    (compression slices whole embedding rows; runtime/recipe.py ``build_models``)."""
    return not any(m.vocab is not None for m, _, _ in models.students)


def _teacher_rank_items(model: ModelSpec, counts: ParamCounts, cap: ModelCapture, strategy: str,
                        cluster: ClusterShape, group: int = 1) -> tuple[list[MemoryItem], list[MemoryItem]]:
    on_rank, node_cpu = teacher_items(model, counts, cap, strategy, cluster, group)
    return on_rank, [_per_rank(i, cluster.gpus_per_node) for i in node_cpu]


def _signal_bytes(model: ModelSpec, cap: ModelCapture, strategy: str, micro: int, seq: int, fused: bool = False) -> int:
    if strategy == "offline":
        from planner.offline import loaded_bytes  # offline imports nothing from here, but keeps it lazy

        return loaded_bytes(model, cap, micro, seq)
    return teacher_signal_bytes(model, cap, micro, seq, fused)


def _student_training_items(models: StageModels, device: Device, p: Placement) -> list[MemoryItem]:
    items: list[MemoryItem] = []
    d = DTYPE_BYTES[p.precision]
    for m, _, cap in models.students:
        items += student_items(m, cap, p.micro_batch, models.seq_len, d, device, p.activation_checkpointing,
                               suffix="" if len(models.students) == 1 else f":{m.name}",
                               losses=models.logit_losses.get(m.name, ()), fused=fused_head(models, m.name, p),
                               grads_held=grads_held(p.zero_stage, p.grad_accum))
    return items


def fused_head(models: StageModels, name: str, p: Placement) -> bool:
    """Whether the placement lets the runtime fuse the head of a model whose logits only chunked losses read: a
    student's head weight must be whole on the rank (ZeRO < 3), a teacher replicated (not partitioned, offloaded,
    elsewhere or cached)."""
    if name not in models.fusable:
        return False
    if any(m.name == name for m, _, _ in models.students):
        return p.zero_stage < 3
    return p.teacher_strategy.get(name, "replicated") == "replicated"


def student_items(model: ModelSpec, cap: ModelCapture, micro: int, seq: int, d: int, device: Device,
                  checkpointing: bool, suffix: str = "", losses: tuple[str, ...] = (),
                  fused: bool = False, grads_held: bool = True) -> list[MemoryItem]:
    """Activations, logits and loss temporaries of one trained model for one micro-batch (``losses``: kernels of
    the terms reading its logits; ``fused``: its head is fused into them; ``grads_held``: its weights' gradients
    exist, or are not among the priced model states, when autograd forms them: see ``grads_held``)."""
    head_run = cap.needs_head or not cap.points
    logits = student_logits(model, micro, seq, d, head_run, losses, fused)
    loss = sum(i.bytes for i in logits if i.name.startswith("loss.") and i.name != "loss.head_grads")
    shape = act_shape(model.arch, d, device, lora=model.adapter)
    acts = student_activations(model.arch, micro, seq, shape, checkpointing=checkpointing,
                               eager_layers=cap.eager_attention_layers, loss_bytes=loss)
    items = [*acts, *logits, *backward_grad_items(model, acts, logits, micro, seq, d, head_run=head_run, fused=fused,
                                                   grads_held=grads_held)]
    return [i.model_copy(update={"name": i.name + suffix}) for i in items]


def _per_rank(item: MemoryItem, gpus_per_node: int) -> MemoryItem:
    return item.model_copy(update={"bytes": math.ceil(item.bytes / gpus_per_node),
                                   "note": (item.note + f"; 1/{gpus_per_node} of the node").lstrip("; ")})


def _rank(rank: int, items: list[MemoryItem], cluster: ClusterShape) -> RankMemory:
    # on a CPU run host memory *is* device memory: host-side items count against the same capacity
    gpu = sum(i.bytes for i in items if i.device == "gpu" or (cluster.device.is_cpu and i.device == "cpu"))
    cpu = sum(i.bytes for i in items if i.device == "cpu")
    cap = cluster.device.memory
    return RankMemory(rank=rank, items=items, total_gpu=gpu, total_cpu=cpu, capacity_gpu=cap,
                      headroom=1 - gpu / cap if cap else 0.0)
