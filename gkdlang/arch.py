"""HF config.json dict -> ArchInfo: the architecture facts gkdc needs, without weights or torch.

Every later phase (checker, planner, runtime adapters) reads architectures through ArchInfo, so the
family-specific quirks of Hugging Face configs (``n_layer`` vs ``num_hidden_layers``, GQA, tied
embeddings, ...) are normalised in exactly one place.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Family = Literal["bert", "roberta", "gpt2", "llama", "qwen2", "mistral", "opt", "bloom", "glm"]

#: HF ``model_type`` -> gkdc family. Families share module layout and capture points.
MODEL_TYPE_TO_FAMILY: dict[str, Family] = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "gpt2": "gpt2",
    "llama": "llama",
    "qwen2": "qwen2",
    "mistral": "mistral",
    "opt": "opt",
    "bloom": "bloom",
    "glm": "glm",
}

#: Families the runtime can train and capture (runtime/adapters/families.py ADAPTERS; tests/test_trust.py keeps the
#: two equal). Others are planned (parameter counts, memory) but ``gkdc run`` refuses them.
RUNNABLE_FAMILIES: frozenset[str] = frozenset({"bert", "roberta", "gpt2", "llama", "qwen2", "mistral"})

#: Families whose attention is bidirectional (masked-LM style encoders).
ENCODER_FAMILIES: frozenset[str] = frozenset({"bert", "roberta", "glm"})


class ArchError(ValueError):
    """A config.json that gkdc cannot read as a known architecture."""


class ArchInfo(BaseModel):
    """Normalised architecture of one transformer model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_type: str
    """The HF ``model_type`` string, e.g. ``"llama"``."""
    family: Family
    """Family of module layout; decides capture points and parameter formulas."""
    num_layers: int
    """Number of transformer blocks."""
    hidden_size: int
    """Width of the residual stream."""
    num_heads: int
    """Attention (query) heads per layer."""
    num_kv_heads: int
    """Key/value heads per layer (== num_heads unless grouped-query attention)."""
    head_dim: int
    """Width of one attention head."""
    intermediate_size: int
    """Inner width of the feed-forward block."""
    vocab_size: int
    """Rows of the input embedding and columns of the LM head."""
    max_positions: int
    """Longest sequence the model accepts."""
    tie_word_embeddings: bool
    """LM head shares its weight with the input embedding."""
    is_encoder: bool
    """Bidirectional attention (masked-LM teacher) rather than causal."""
    gated_ffn: bool = False
    """SwiGLU-style feed-forward with gate and up projections (Llama family)."""
    embedding_size: int | None = None
    """Factorised embedding width (ALBERT-style), None when equal to hidden_size."""
    config: dict[str, Any] = Field(default_factory=dict)
    """The raw HF config the facts were read from (kept for exact parameter counts and model building)."""

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def arch_from_config(cfg: dict[str, Any]) -> ArchInfo:
    """Read a HF config dict; raises ArchError naming the missing key or unknown model_type."""
    model_type = cfg.get("model_type")
    if model_type is None:
        raise ArchError("config has no 'model_type'")
    family = MODEL_TYPE_TO_FAMILY.get(model_type)
    if family is None:
        known = ", ".join(sorted(MODEL_TYPE_TO_FAMILY))
        raise ArchError(f"unsupported model_type '{model_type}' (supported: {known})")
    if family == "glm" and "num_layers" not in cfg:
        # transformers' own model_type "glm" is GLM-4 (num_hidden_layers, GQA, rotary), a different architecture
        # from THUDM's GLM-10B family that gkdc supports; reading it as GLM would give wrong counts and captures
        raise ArchError("model_type 'glm' without 'num_layers' is GLM-4 (transformers' glm), not THUDM GLM; unsupported")
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    # BLOOM-176B's config spells the width "n_embed" (bloom-560m says "hidden_size")
    hidden = _first(cfg, "hidden_size", "n_embd", "n_embed", "d_model")
    heads = _first(cfg, "num_attention_heads", "n_head")
    vocab = _first(cfg, "vocab_size", "padded_vocab_size")
    for key, value in (("num_layers", layers), ("hidden_size", hidden), ("num_heads", heads), ("vocab_size", vocab)):
        if value is None:
            raise ArchError(f"config of model_type '{model_type}' has no {key}")
    kv_heads = _first(cfg, "num_key_value_heads", "multi_query_group_num", default=heads)
    head_dim = _first(cfg, "head_dim", default=None) or hidden // heads
    inter = _first(cfg, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", default=None) or 4 * hidden
    max_pos = _first(cfg, "max_position_embeddings", "n_positions", "seq_length", "max_sequence_length", default=2048)
    tied = bool(cfg.get("tie_word_embeddings", family in {"bert", "roberta", "gpt2", "opt", "bloom", "glm"}))
    emb = cfg.get("embedding_size")
    return ArchInfo(
        model_type=model_type,
        family=family,
        num_layers=int(layers),
        hidden_size=int(hidden),
        num_heads=int(heads),
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        intermediate_size=int(inter),
        vocab_size=int(vocab),
        max_positions=int(max_pos),
        tie_word_embeddings=tied,
        is_encoder=family in ENCODER_FAMILIES,
        gated_ffn=family in {"llama", "qwen2", "mistral"},
        embedding_size=int(emb) if emb is not None and int(emb) != int(hidden) else None,
        config=dict(cfg),
    )


#: Override keys a derived student may set, mapped to the HF config keys of each family.
OVERRIDE_KEYS: dict[str, dict[str, str]] = {
    "layers": {"gpt2": "n_layer", "bloom": "n_layer", "*": "num_hidden_layers"},
    "hidden": {"gpt2": "n_embd", "*": "hidden_size"},
    "heads": {"gpt2": "n_head", "bloom": "n_head", "*": "num_attention_heads"},
    "kv_heads": {"*": "num_key_value_heads"},
    "intermediate": {"gpt2": "n_inner", "opt": "ffn_dim", "*": "intermediate_size"},
    "vocab": {"*": "vocab_size"},
    "embedding_size": {"*": "embedding_size"},
    "max_positions": {"gpt2": "n_positions", "*": "max_position_embeddings"},
}


#: Other spellings of an override's key that real configs use. A config holding one of them (BLOOM-176B's
#: ``n_embed`` and ``num_attention_heads``) must get the new value there too, or readers that prefer that
#: spelling (arch_from_config, transformers' BloomConfig) silently keep the base value.
_OVERRIDE_ALIASES: dict[str, tuple[str, ...]] = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden": ("hidden_size", "n_embd", "n_embed", "d_model"),
    "heads": ("num_attention_heads", "n_head"),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"),
    "max_positions": ("max_position_embeddings", "n_positions", "max_sequence_length"),
}


def _set_override(cfg: dict[str, Any], family: str, key: str, value: int) -> None:
    """Set one user-facing override in a raw config: its family key plus every alias the config already sets."""
    table = OVERRIDE_KEYS[key]
    cfg[table.get(family, table["*"])] = value
    for alias in _OVERRIDE_ALIASES.get(key, ()):
        if cfg.get(alias) is not None:
            cfg[alias] = value


def derive_config(base: ArchInfo, overrides: dict[str, int]) -> dict[str, Any]:
    """A student config: the base config with user-facing overrides applied (keys of OVERRIDE_KEYS).

    Width changes keep the base head width unless heads are given; a family with an explicit ``head_dim``
    key gets it recomputed so the config stays consistent.
    """
    cfg = dict(base.config)
    for key, value in overrides.items():
        _set_override(cfg, base.family, key, value)
    if "hidden" in overrides and "intermediate" not in overrides:
        # keep the base FFN ratio, rounded to a multiple of 64 as real model families do
        ratio = base.intermediate_size / base.hidden_size
        inter = int(round(overrides["hidden"] * ratio / 64)) * 64 or overrides["hidden"] * 4
        if base.family != "gpt2" or base.config.get("n_inner") is not None:
            _set_override(cfg, base.family, "intermediate", inter)
    if "head_dim" in cfg and ("hidden" in overrides or "heads" in overrides):
        heads = overrides.get("heads", base.num_heads)
        hidden = overrides.get("hidden", base.hidden_size)
        cfg["head_dim"] = hidden // heads
    if "heads" in overrides and "kv_heads" not in overrides and base.num_kv_heads == base.num_heads:
        if "num_key_value_heads" in cfg:
            cfg["num_key_value_heads"] = overrides["heads"]
    if "kv_heads" not in overrides and "num_key_value_heads" in cfg:
        heads = overrides.get("heads", base.num_heads)
        if heads % int(cfg["num_key_value_heads"]) != 0:
            cfg["num_key_value_heads"] = heads
    return cfg
