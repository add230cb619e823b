"""ArchInfo -> exact parameter counts (total, embeddings, one block, all blocks, final norm, head, largest module).

The counts equal ``sum(p.numel() for p in model.parameters())`` of the Hugging Face model class gkdc builds,
with tied parameters counted once (tests check this on the meta device for every catalog model):

=========  ====================  =====================================  ===========================================
family     head "lm" (default)   head "classify"                        head "none"
=========  ====================  =====================================  ===========================================
bert       BertForMaskedLM       BertForSequenceClassification          BertModel (with pooler)
roberta    RobertaForMaskedLM    RobertaForSequenceClassification       RobertaModel (with pooler)
gpt2       GPT2LMHeadModel       GPT2ForSequenceClassification          GPT2Model
llama      LlamaForCausalLM      LlamaForSequenceClassification         LlamaModel
qwen2      Qwen2ForCausalLM      Qwen2ForSequenceClassification         Qwen2Model
mistral    MistralForCausalLM    MistralForSequenceClassification       MistralModel
opt        OPTForCausalLM        OPTForSequenceClassification           OPTModel
bloom      BloomForCausalLM      BloomForSequenceClassification         BloomModel
glm        GLMModel (remote)     unsupported                            GLMModel (remote)
=========  ====================  =====================================  ===========================================

That is: AutoModelForCausalLM for decoders, AutoModelForMaskedLM for bert/roberta. GLM (THUDM GLM-10B family)
has no transformers class; it is counted from the GLM repository's ``GPT2ParallelTransformer``: token
embedding, position and block-position embeddings of ``max_sequence_length + 1`` rows each, pre-LN blocks
(fused qkv and dense with biases, 4h MLP with biases), a final LayerNorm and an output layer tied to the
token embedding.

Buckets (``total == embeddings + layers + final_norm + head``):
- ``embeddings``: token, position, token-type embeddings, embedding LayerNorm (BERT, RoBERTa, BLOOM) and OPT's
  ``project_in``;
- ``per_layer`` / ``layers``: one block / all blocks;
- ``final_norm``: what the backbone has after its last block: the final norm, and OPT's ``project_out``;
- ``head``: what the task class adds to the backbone: untied LM head, MLM transform and decoder bias,
  pooler, classifier;
- ``largest_layer``: the largest ``sum(p.numel() for p in m.parameters(recurse=False))`` over modules ``m``,
  which is what DeepSpeed's ZeRO-3 estimators call the largest layer (tied weights count in each module that
  holds them, so a tied MLM decoder with its bias is larger than the embedding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from gkdlang.arch import ArchInfo

HeadKind = Literal["lm", "classify", "none"]


@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts of one model (see the module docstring for what each bucket holds)."""

    total: int
    """All unique parameters of ``model_class``."""
    embeddings: int
    """Input embeddings (token, position, type), embedding LayerNorm, OPT project_in."""
    per_layer: int
    """One transformer block."""
    layers: int
    """All transformer blocks."""
    final_norm: int
    """Backbone parameters after the last block (final norm, OPT project_out)."""
    head: int
    """Parameters the task class adds beyond the backbone (untied LM head, MLM transform, pooler, classifier)."""
    largest_layer: int
    """Largest single parameter-holding module, for ZeRO-3 memory estimates."""
    model_class: str
    """The Hugging Face class these counts describe, e.g. ``"LlamaForCausalLM"``."""


@dataclass(frozen=True)
class _Parts:
    """Per-module parameter counts of one family; each value is a module's own (weight + bias) parameters."""

    embeddings: dict[str, int]
    block: dict[str, int]
    final: dict[str, int]
    head: dict[str, int]
    tied_modules: dict[str, int]
    """Modules whose parameters are all counted elsewhere (tied) but that still hold them, for largest_layer."""
    model_class: str


_CLASS_PREFIX = {
    "bert": "Bert", "roberta": "Roberta", "gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2",
    "mistral": "Mistral", "opt": "OPT", "bloom": "Bloom", "glm": "GLM", "xlm-roberta": "XLMRoberta",
}
_LM_SUFFIX = {"bert": "ForMaskedLM", "roberta": "ForMaskedLM", "gpt2": "LMHeadModel", "glm": "Model"}


def count_params(arch: ArchInfo) -> ParamCounts:
    """Counts for the class gkdc builds by default: the causal-LM or masked-LM model of the family."""
    return count_params_for(arch, "lm")


def count_params_for(arch: ArchInfo, head: HeadKind = "lm", num_labels: int = 2) -> ParamCounts:
    """Counts with a given output head: ``lm`` (LM head), ``classify`` (sequence classification), ``none``."""
    if head not in ("lm", "classify", "none"):
        raise ValueError(f"head must be 'lm', 'classify' or 'none', not '{head}'")
    if head == "classify" and num_labels < 1:
        raise ValueError(f"num_labels must be at least 1, not {num_labels}")
    parts = _FAMILY_PARTS[arch.family](arch, _Cfg(arch.config), head, num_labels)
    embeddings, per_layer = sum(parts.embeddings.values()), sum(parts.block.values())
    final, head_params = sum(parts.final.values()), sum(parts.head.values())
    layers = per_layer * arch.num_layers
    modules = [*parts.embeddings.values(), *parts.final.values(), *parts.head.values(), *parts.tied_modules.values()]
    if arch.num_layers:
        modules += parts.block.values()
    return ParamCounts(
        total=embeddings + layers + final + head_params,
        embeddings=embeddings,
        per_layer=per_layer,
        layers=layers,
        final_norm=final,
        head=head_params,
        largest_layer=max(modules, default=0),
        model_class=parts.model_class,
    )


class _Cfg:
    """Read-only view of the raw HF config with the defaults the transformers classes use."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self._raw = raw

    def get(self, key: str, default: Any) -> Any:
        value = self._raw.get(key)
        return default if value is None else value


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _model_class(arch: ArchInfo, head: HeadKind) -> str:
    prefix = _CLASS_PREFIX.get(arch.model_type, _CLASS_PREFIX[arch.family])
    if head == "none":
        return f"{prefix}Model"
    if head == "classify":
        return f"{prefix}ForSequenceClassification"
    return prefix + _LM_SUFFIX.get(arch.family, "ForCausalLM")


def _lm_head(arch: ArchInfo, in_dim: int) -> tuple[dict[str, int], dict[str, int]]:
    """(new params, tied module sizes) of a bias-free LM head; tied heads add no parameters of their own."""
    size = in_dim * arch.vocab_size
    return ({}, {"lm_head": size}) if arch.tie_word_embeddings else ({"lm_head": size}, {})


# ---------------------------------------------------------------- encoders (BERT, RoBERTa)


def _encoder_parts(arch: ArchInfo, cfg: _Cfg, head: HeadKind, num_labels: int) -> _Parts:
    h, inter, vocab = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    embeddings = {
        "word_embeddings": vocab * h,
        # RoBERTa's 514 rows include its padding offset: max_position_embeddings is the row count either way
        "position_embeddings": cfg.get("max_position_embeddings", 512) * h,
        "token_type_embeddings": cfg.get("type_vocab_size", 2) * h,
        "embeddings.LayerNorm": 2 * h,
    }
    block = {
        "attention.query": _linear(h, h), "attention.key": _linear(h, h), "attention.value": _linear(h, h),
        "attention.output.dense": _linear(h, h), "attention.output.LayerNorm": 2 * h,
        "intermediate.dense": _linear(h, inter), "output.dense": _linear(inter, h), "output.LayerNorm": 2 * h,
    }
    new, tied = _encoder_head(arch, head, num_labels)
    return _Parts(embeddings, block, {}, new, tied, _model_class(arch, head))


def _encoder_head(arch: ArchInfo, head: HeadKind, num_labels: int) -> tuple[dict[str, int], dict[str, int]]:
    h, vocab = arch.hidden_size, arch.vocab_size
    pooler = {"pooler.dense": _linear(h, h)}
    if head == "none":
        return pooler, {}
    if head == "classify":
        if arch.family == "roberta":  # RoBERTa drops the pooler and classifies through its own dense layer
            return {"classifier.dense": _linear(h, h), "classifier.out_proj": _linear(h, num_labels)}, {}
        return {**pooler, "classifier": _linear(h, num_labels)}, {}
    # MLM head: transform (dense + LayerNorm) and an output bias; tied, the decoder reuses both the word
    # embedding and that bias, untied it owns a weight and a bias of its own (transformers 5 behaviour)
    new = {"lm.transform.dense": _linear(h, h), "lm.transform.LayerNorm": 2 * h, "lm.bias": vocab}
    if arch.tie_word_embeddings:
        return new, {"lm.decoder": _linear(h, vocab)}
    return {**new, "lm.decoder": _linear(h, vocab)}, {}


# ---------------------------------------------------------------- decoders


def _gpt2_parts(arch: ArchInfo, cfg: _Cfg, head: HeadKind, num_labels: int) -> _Parts:
    h, inter = arch.hidden_size, arch.intermediate_size
    embeddings = {"wte": arch.vocab_size * h, "wpe": cfg.get("n_positions", 1024) * h}
    block = {
        "ln_1": 2 * h, "attn.c_attn": _linear(h, 3 * h), "attn.c_proj": _linear(h, h),
        "ln_2": 2 * h, "mlp.c_fc": _linear(h, inter), "mlp.c_proj": _linear(inter, h),
    }
    new, tied = _decoder_head(arch, head, num_labels, h)
    return _Parts(embeddings, block, {"ln_f": 2 * h}, new, tied, _model_class(arch, head))


def _llama_parts(arch: ArchInfo, cfg: _Cfg, head: HeadKind, num_labels: int) -> _Parts:
    """Llama, Mistral and Qwen2: GQA attention, SwiGLU MLP, RMSNorm (weight only)."""
    h, inter, q_dim, kv_dim = arch.hidden_size, arch.intermediate_size, arch.num_heads * arch.head_dim, arch.kv_dim
    # Qwen2 always has q/k/v biases and no o bias; Llama has both only with attention_bias; Mistral has none
    qkv_bias = arch.family == "qwen2" or (arch.family == "llama" and bool(cfg.get("attention_bias", False)))
    o_bias = arch.family == "llama" and bool(cfg.get("attention_bias", False))
    mlp_bias = arch.family == "llama" and bool(cfg.get("mlp_bias", False))
    block = {
        "self_attn.q_proj": _linear(h, q_dim, qkv_bias), "self_attn.k_proj": _linear(h, kv_dim, qkv_bias),
        "self_attn.v_proj": _linear(h, kv_dim, qkv_bias), "self_attn.o_proj": _linear(q_dim, h, o_bias),
        "mlp.gate_proj": _linear(h, inter, mlp_bias), "mlp.up_proj": _linear(h, inter, mlp_bias),
        "mlp.down_proj": _linear(inter, h, mlp_bias), "input_layernorm": h, "post_attention_layernorm": h,
    }
    new, tied = _decoder_head(arch, head, num_labels, h)
    return _Parts({"embed_tokens": arch.vocab_size * h}, block, {"norm": h}, new, tied, _model_class(arch, head))


def _opt_parts(arch: ArchInfo, cfg: _Cfg, head: HeadKind, num_labels: int) -> _Parts:
    h, ffn = arch.hidden_size, arch.intermediate_size
    proj = cfg.get("word_embed_proj_dim", h)
    bias = bool(cfg.get("enable_bias", True))
    norm = 2 * h if cfg.get("layer_norm_elementwise_affine", True) else 0
    # OPT's learned positions reserve 2 extra rows (its padding offset)
    positions = cfg.get("max_position_embeddings", 2048) + 2
    embeddings = {"embed_tokens": arch.vocab_size * proj, "embed_positions": positions * h}
    final = {}
    if proj != h:
        embeddings["project_in"] = proj * h
        final["project_out"] = h * proj
    if cfg.get("do_layer_norm_before", True) and not cfg.get("_remove_final_layer_norm", False):
        final["final_layer_norm"] = norm
    block = {
        "self_attn.q_proj": _linear(h, h, bias), "self_attn.k_proj": _linear(h, h, bias),
        "self_attn.v_proj": _linear(h, h, bias), "self_attn.out_proj": _linear(h, h, bias),
        "self_attn_layer_norm": norm, "fc1": _linear(h, ffn, bias), "fc2": _linear(ffn, h, bias),
        "final_layer_norm": norm,
    }
    new, tied = _decoder_head(arch, head, num_labels, proj)
    return _Parts(embeddings, block, final, new, tied, _model_class(arch, head))


def _bloom_parts(arch: ArchInfo, cfg: _Cfg, head: HeadKind, num_labels: int) -> _Parts:
    h = arch.hidden_size
    embeddings = {"word_embeddings": arch.vocab_size * h, "word_embeddings_layernorm": 2 * h}
    block = {
        "input_layernorm": 2 * h, "self_attention.query_key_value": _linear(h, 3 * h),
        "self_attention.dense": _linear(h, h), "post_attention_layernorm": 2 * h,
        # BLOOM's MLP is always 4h wide, whatever the config says
        "mlp.dense_h_to_4h": _linear(h, 4 * h), "mlp.dense_4h_to_h": _linear(4 * h, h),
    }
    new, tied = _decoder_head(arch, head, num_labels, h)
    return _Parts(embeddings, block, {"ln_f": 2 * h}, new, tied, _model_class(arch, head))


def _decoder_head(
    arch: ArchInfo, head: HeadKind, num_labels: int, in_dim: int
) -> tuple[dict[str, int], dict[str, int]]:
    """Causal-LM families: LM head (maybe tied), or a bias-free ``score`` layer for classification."""
    if head == "none":
        return {}, {}
    if head == "classify":
        return {"score": _linear(in_dim, num_labels, bias=False)}, {}
    return _lm_head(arch, in_dim)


# ---------------------------------------------------------------- GLM (THUDM, remote code)


def _glm_parts(arch: ArchInfo, cfg: _Cfg, head: HeadKind, num_labels: int) -> _Parts:
    if head == "classify":
        raise ValueError("GLM models have no sequence-classification class; use head 'lm' (cloze) or 'none'")
    h, inter = arch.hidden_size, arch.intermediate_size
    seq = cfg.get("max_sequence_length", arch.max_positions)
    if cfg.get("relative_encoding", False):
        raise ValueError("GLM with relative_encoding (Transformer-XL style) is not supported")
    embeddings = {"word_embeddings": arch.vocab_size * h}
    if cfg.get("block_position_encoding", True):
        # GLM's 2D positions: both tables get one extra row for the [MASK]-span start position
        embeddings |= {"position_embeddings": (seq + 1) * h, "block_position_embeddings": (seq + 1) * h}
    else:
        embeddings["position_embeddings"] = seq * h
    block = {
        "input_layernorm": 2 * h, "attention.query_key_value": _linear(h, 3 * h), "attention.dense": _linear(h, h),
        "post_attention_layernorm": 2 * h,
        "mlp.dense_h_to_4h": _linear(h, inter), "mlp.dense_4h_to_h": _linear(inter, h),
    }
    # logits reuse the word-embedding matrix (F.linear with word_embeddings.weight): no head parameters
    return _Parts(embeddings, block, {"final_layernorm": 2 * h}, {}, {}, _model_class(arch, head))


_FAMILY_PARTS: dict[str, Callable[[ArchInfo, _Cfg, HeadKind, int], _Parts]] = {
    "bert": _encoder_parts,
    "roberta": _encoder_parts,
    "gpt2": _gpt2_parts,
    "llama": _llama_parts,
    "qwen2": _llama_parts,
    "mistral": _llama_parts,
    "opt": _opt_parts,
    "bloom": _bloom_parts,
    "glm": _glm_parts,
}
