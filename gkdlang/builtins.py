"""The language's vocabulary: signals, losses, transforms, layer maps, schedules, masks, and block keys.

Explicit ``name -> spec`` tables with did-you-mean lookup; gkdlang.lower interprets them, docs/language.md
documents them (and a test checks that every name here appears in the docs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from gkdlang.spec import INTERVENTION_CONSTRUCTS, OP_TYPES, LossTerm, Plateau

#: signal attribute -> (layered, description)
SIGNALS: dict[str, tuple[bool, str]] = {
    "logits": (False, "LM head output [b, s, vocab]"),
    "task_logits": (False, "classification head output [b, classes] (needs `head: classify(n)`)"),
    "embeddings": (False, "embedding output [b, s, hidden]"),
    "hidden": (True, "output of block i [b, s, hidden]"),
    "attn_scores": (True, "pre-softmax attention scores of block i [b, heads, s, s]"),
    "attn_probs": (True, "attention probabilities of block i [b, heads, s, s]"),
    "query": (True, "query projection of block i [b, s, heads*head_dim]"),
    "key": (True, "key projection of block i [b, s, kv_heads*head_dim]"),
    "value": (True, "value projection of block i [b, s, kv_heads*head_dim]"),
    "ffn": (True, "feed-forward inner activation of block i [b, s, intermediate]"),
    "cls": (True, "hidden state of block i at position 0 [b, hidden] (sugar for pool(hidden[i], cls))"),
}

#: data targets usable as bare names in loss expressions
TARGETS: dict[str, str] = {
    "labels": "the task label column of the stage's data [b]",
    "tokens": "next-token targets (causal LM) or masked-token targets (masked LM) [b, s]",
}


@dataclass(frozen=True)
class LossDef:
    options: dict[str, str]
    """keyword -> kind of value: "schedule", "number", "bool", "int", "fraction"."""
    accepts: frozenset[str]
    """Feature kinds the loss compares."""
    doc: str


_SHAPES = frozenset({"hidden", "qkv", "ffn", "pooled", "attn", "relation", "logits", "task_logits"})
#: pooled vectors count as logits over the feature dim (Universal-KD's KL over projected features)
_DISTS = frozenset({"logits", "task_logits", "attn", "relation", "pooled"})

LOSSES: dict[str, LossDef] = {
    "kl": LossDef({"T": "schedule", "scale_t2": "bool", "reverse": "bool", "mask_keys": "bool",
                   "probs_as_logits": "bool"}, _DISTS,
                  "KL(teacher || student) of softmax(x / T), times T^2 unless scale_t2: false"),
    "soft_ce": LossDef({"T": "schedule", "scale_t2": "bool"}, _DISTS,
                       "cross-entropy of the student's softmax(x/T) against the teacher's soft targets"),
    "jsd": LossDef({"T": "schedule"}, _DISTS, "Jensen-Shannon divergence of the two softmax(x/T)"),
    "gjsd": LossDef({"beta": "number", "T": "schedule", "scale_t2": "bool"}, _DISTS,
                    "generalized JSD as TRL's GKD trainer: beta 0 = forward KL, 1 = reverse KL, else "
                    "beta KL(t||m) + (1-beta) KL(s||m), m = beta t + (1-beta) s"),
    "skew_kl": LossDef({"alpha": "number", "T": "schedule", "scale_t2": "bool"}, frozenset({"logits", "task_logits"}),
                       "DistiLLM's skew KL: KL(t || alpha t + (1-alpha) s), alpha in [0, 1], default 0.1"),
    "skew_rkl": LossDef({"alpha": "number", "T": "schedule", "scale_t2": "bool"}, frozenset({"logits", "task_logits"}),
                        "DistiLLM's skew reverse KL: KL(s || alpha s + (1-alpha) t), alpha in [0, 1], default 0.1"),
    "ce": LossDef({}, frozenset({"labels", "tokens"}), "hard cross-entropy against data labels or tokens"),
    "mse": LossDef({}, _SHAPES, "mean squared error"),
    "sse": LossDef({"total": "bool"}, _SHAPES, "sum of squared errors over the feature dim, mean over positions "
                   "(total: true sums over them too, GKD's RAIL-KD)"),
    "smooth_l1": LossDef({"beta": "number"}, _SHAPES, "smooth L1 (Huber) loss"),
    "cos": LossDef({}, _SHAPES, "1 - cosine similarity along the feature dim"),
    "hinge_mse": LossDef({"margin": "number"}, _SHAPES, "MSE ignoring errors below a margin (Continuation-KD)"),
    "gated_mse": LossDef({"margin": "schedule"}, _SHAPES,
                         "per-row MSE counted only where it exceeds margin (GKD's Continuation-KD gate)"),
    "nce": LossDef({"tau": "number", "gather": "bool"}, frozenset({"pooled", "hidden"}),
                   "contrastive InfoNCE across the batch: the teacher vector of the same example is the positive; "
                   "gather: true takes negatives from every data-parallel rank (LRC-BERT)"),
    "distance": LossDef({"window": "int", "heads": "int"}, frozenset({"hidden", "pooled"}),
                        "smooth L1 between normalised pairwise-distance matrices (CKD / MGSKD relations)"),
    "angle": LossDef({"window": "int", "heads": "int", "top_k": "int"}, frozenset({"hidden", "pooled"}),
                     "smooth L1 between triplet-angle tensors within a window (CKD / MGSKD relations)"),
    "ckd_distance": LossDef({"layers": "bool"}, frozenset({"hidden"}),
                            "CKD's distance relation as its authors' code computes it: softmaxed cosine similarities "
                            "within each set compared by KL (layers: true relates a stack's layers)"),
    "ckd_angle": LossDef({"window": "int", "layers": "bool"}, frozenset({"hidden"}),
                         "CKD's angle relation as its authors' code computes it: triplet angle cosines compared by "
                         "squared error, within a window of tokens or across a stack's layers"),
    "mgskd_token": LossDef({"heads": "int", "top_k": "int", "spans": "fraction"}, frozenset({"hidden"}),
                           "MGSKD's token (or, with spans: rate, span) level as its authors' code computes it: "
                           "head-wise pair relations by squared error plus attended triplet angles by smooth L1"),
    "mgskd_sample": LossDef({"heads": "int"}, frozenset({"hidden"}),
                            "MGSKD's sample level as its authors' code computes it: angles among the batch's "
                            "mean-pooled examples per relation head, smooth L1 over every entry"),
    "cos_nce": LossDef({"gather": "bool"}, frozenset({"hidden", "pooled"}),
                       "LRC-BERT's COS-NCE as GKD computes it: angular distances 1 - cos between every student and "
                       "teacher example, averaged over positions; 1 - the negatives' mean / 2 + 1.5 x the positive's"),
}

#: every loss's ``average:`` option (LossTerm.average; its default, ``kept``, declared there)
LOSS_AVERAGES: tuple[str, ...] = get_args(LossTerm.model_fields["average"].annotation)

#: losses comparing relations *within* each model (pairwise distances, angles): the two sides may have
#: different widths, but the same number of items along the related axis
RELATION_LOSSES = frozenset({"distance", "angle", "ckd_distance", "ckd_angle", "mgskd_token", "mgskd_sample"})

#: losses whose two sides may be distributions given as probabilities
DISTRIBUTION_LOSSES = frozenset({"kl", "soft_ce", "jsd", "gjsd"})

#: transform -> options (keyword -> kind), from the op class each lowers to; ``align`` re-pairs items (no op)
TRANSFORMS: dict[str, dict[str, str]] = {
    **{op.transform: dict(op.options) for op in OP_TYPES if op.transform},
    "align": {"map": "map"},
}

#: functions that regroup or gate the terms of a loss expression -> options. ``choose`` also takes a layered
#: signal: then it picks a random sorted subset of its items (RAIL-KD's random teacher layers).
COMBINATORS: dict[str, dict[str, str]] = {
    "progressive": {"over": "fraction", "exclusive": "bool", "below_lr": "number", "until": "trigger", "kept": "number",
                    "only_then": "bool",
                    "then": "objective"},
    "choose": {"every": "symbol"},
    "len": {},
}

#: conditions evaluated by the runtime on a stage's running losses -> options (``progressive(x, until: ...)``)
TRIGGERS: dict[str, dict[str, str]] = {"plateau": dict(Plateau.options)}

POOLS = ("mean", "cls", "max", "mean_all")

#: layer maps: student block j -> teacher block
LAYER_MAPS: dict[str, str] = {
    "uniform": "j -> (j+1)*k - 1 with k = teacher_layers / student_layers (TinyBERT)",
    "skip": "like uniform without the student's last block (PKD-skip)",
    "last": "j -> teacher_layers - student_layers + j (PKD-last)",
    "first": "j -> j",
    "pairs": "explicit pairs: pairs((s0, t0), (s1, t1), ...)",
}

SCHEDULES = ("linear", "cosine", "step", "stairs")
MASKS = ("pad", "masked", "cls", "special")
LR_SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "adam", "sgd")
#: accepted keys whose behaviour the runtime does not execute yet: key -> what is missing (warning not-executed)
NOT_EXECUTED: dict[str, str] = {}
DATA_FORMATS = ("text", "jsonl", "json", "parquet", "csv", "chat")
DTYPES = ("fp32", "bf16", "fp16")
#: bytes per element of each dtype: the one table (planner memory, signal sizes, cache storage)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

@dataclass(frozen=True)
class InterventionDef:
    """A construct that lowers to a Spec ``Intervention`` (runtime behaviour beyond signals and losses)."""

    options: dict[str, str]
    """keyword -> kind of value."""
    rewrites_forward: bool
    """Changes how the student's forward/backward pass runs; two of these cannot share a stage."""
    doc: str


#: interventions -> definition, from their Spec classes (gkdlang.spec: fields, defaults, options). Each is
#: documented in docs/language.md; the runtime builds its component from the class's fields.
INTERVENTIONS: dict[str, InterventionDef] = {
    cls.model_fields["kind"].default: InterventionDef(dict(cls.options), cls.rewrites_forward, cls.doc)
    for cls in INTERVENTION_CONSTRUCTS
}

#: libraries whose methods compare signals with no projection by design, and the code a width or head
#: mismatch inside them gets instead of the generic one (the message then names the method's requirement)
STRICT_METHODS: dict[str, tuple[str, str]] = {
    "mobilebert": ("no-bottleneck-teacher",
                   "MobileBERT transfers feature maps and attention without projection: the teacher must be an "
                   "inverted-bottleneck model (IB-BERT) with the student's hidden size and head count"),
}

WEIGH_BY = ("teacher_ce", "student_entropy")
#: how perturb normalises the embedding gradient: over the whole micro-batch, or each position on its own
PERTURB_NORMS = ("batch", "token")
EVERY = ("step", "epoch")
INTERCHANGE_WAYS = ("consecutive", "random", "masked")
INTERCHANGE_POSITIONS = ("same", "independent")
INTERCHANGE_BLOCKS = ("aligned", "group")
POLICIES = ("reinforce", "glmkd")
REWARDS = ("ce", "ce_kl")

#: block keys per declaration kind -> what the value must be
MODEL_KEYS = {
    "layers": "int", "hidden": "int", "heads": "int", "kv_heads": "int", "intermediate": "int", "vocab": "int",
    "embedding_size": "int", "max_positions": "int", "dtype": "symbol", "frozen": "bool", "init": "init",
    "head": "head", "cache": "cache", "adapter": "adapter",
}
#: ``adapter: lora(...)`` options -> kinds of value
LORA_OPTIONS = {"r": "int", "alpha": "number", "dropout": "fraction", "targets": "names"}
DATA_KEYS = {"seq_len": "int", "text": "column", "pair": "column", "label": "column", "split": "fraction",
             "packing": "bool"}
#: ``chat(...)`` data: conversations, so no text/pair/label columns
CHAT_DATA_KEYS = {"seq_len": "int", "messages": "column", "assistant_only": "bool", "split": "fraction",
                  "packing": "bool"}
VOCAB_KEYS = {"keep": "keep", "rank": "rank", "protect": "strings", "remap": "remap", "multiple": "int"}
STAGE_KEYS = {
    "data": "data", "steps": "int", "epochs": "number", "batch": "int", "micro_batch": "int", "seq_len": "int",
    "optimizer": "optimizer", "schedule": "lr_schedule", "loss": "objective", "activation_checkpointing": "bool",
    "eval_every": "int", "keep_best": "symbol", "save_every": "int",
    "generate": "generate",
}
CLUSTER_KEYS = {
    "gpus": "gpus", "gpu": "string", "nodes": "int", "cpu_memory": "bytes", "nvme": "bytes",
    "gpu_memory": "bytes", "precision": "symbol",
}
#: ``placement [stage] { ... }`` keys (besides ``teacher <name>: <strategy>``) -> what the value must be
PLACEMENT_KEYS = {"zero": "int", "offload_optimizer": "symbol", "offload_params": "symbol", "micro_batch": "int",
                  "checkpointing": "bool"}
OFFLOAD_TARGETS = ("none", "cpu", "nvme")
#: teacher strategies a spec may pin: those the runtime runs (the planner's ``separate`` is modelled only)
TEACHER_STRATEGIES = ("replicated", "sharded", "tensor_parallel", "cpu_offload", "nvme_offload", "offline")
#: ``cached`` reads as what it is in the plan: ``offline`` (signals read from the teacher's cache)
TEACHER_STRATEGY_ALIASES = {"cached": "offline"}
OPTIMIZER_KEYS = {"lr": "number", "betas": "pair", "eps": "number", "weight_decay": "number"}
LR_SCHEDULE_KEYS = {"warmup": "fraction", "min_lr": "number"}
