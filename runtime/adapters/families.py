"""HF model -> Adapter: where a model family keeps its blocks, embeddings and the modules signals are read from.

An adapter is data (module paths), not code: every family is read by the same hooks in ``capture.py``.
Paths of blocks and embeddings are relative to ``model.base_model`` (so head classes such as
``*ForMaskedLM`` / ``*ForCausalLM`` / ``*ForSequenceClassification`` and the bare base classes share one
adapter); paths of attention, projections and FFN are relative to one block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from runtime.errors import RunError


@dataclass(frozen=True)
class Adapter:
    """Module layout of one architecture family (HF transformers 5.x naming)."""

    family: str
    """gkdc family name, as in ``gkdlang.arch.MODEL_TYPE_TO_FAMILY``."""
    blocks: str
    """Base model -> the ``nn.ModuleList`` of transformer blocks."""
    embeddings: str
    """Base model -> the token embedding module (BERT: the whole embeddings module with positions)."""
    attention: str
    """Block -> the self-attention module that dispatches through ``ALL_ATTENTION_FUNCTIONS``."""
    qkv: tuple[str, ...]
    """Block -> query, key, value projections; a single fused projection is split in three equal parts."""
    ffn_down: str
    """Block -> the FFN down projection; its *input* is the ``ffn`` signal (the inner activation)."""
    model_inputs: tuple[str, ...]
    """Batch keys the forward takes (everything else in a batch, e.g. labels, stays out of the forward)."""
    causal: bool
    """Decoder-only family: forwards run with ``use_cache=False`` (no KV cache is built for one pass)."""

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _submodule(model.base_model, self.blocks, self, "blocks")

    def embeddings_module(self, model: nn.Module) -> nn.Module:
        return _submodule(model.base_model, self.embeddings, self, "embeddings")

    def input_embeddings(self, model: nn.Module) -> nn.Embedding:
        return model.get_input_embeddings()

    def output_embeddings(self, model: nn.Module) -> nn.Module | None:
        """The LM head projection (tied or not); None for base and classification models."""
        return model.get_output_embeddings()

    def attention_module(self, block: nn.Module) -> nn.Module:
        return _submodule(block, self.attention, self, "attention")

    def projection_modules(self, block: nn.Module) -> list[nn.Module]:
        return [_submodule(block, path, self, "query/key/value projection") for path in self.qkv]

    def ffn_module(self, block: nn.Module) -> nn.Module:
        return _submodule(block, self.ffn_down, self, "FFN down projection")

    def prune(self, model: nn.Module, keep_blocks: int, drop_head: bool) -> int:
        """Delete blocks ``keep_blocks..`` (and an untied LM head) of a frozen teacher; returns parameters freed.

        The plan stops such a teacher's forward after its deepest needed block and never runs its head, so
        their weights are dead memory: the planner counts only what is kept, and this makes that true.
        """
        before = sum(p.numel() for p in model.parameters())
        blocks = self.layers(model)
        if keep_blocks < len(blocks):
            parent_path, _, attr = self.blocks.rpartition(".")
            parent = model.base_model.get_submodule(parent_path) if parent_path else model.base_model
            setattr(parent, attr, nn.ModuleList(list(blocks)[:keep_blocks]))
        head = model.get_output_embeddings() if drop_head else None
        if head is not None and head.weight is not model.get_input_embeddings().weight:
            model.set_output_embeddings(nn.Identity())
        return before - sum(p.numel() for p in model.parameters())


def _submodule(root: nn.Module, path: str, adapter: Adapter, what: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise RunError(
            f"model {type(root).__name__} does not have the {adapter.family} layout gkdc expects: "
            f"no {what} module at '{path}' (is it a modified or unsupported transformers version?)"
        ) from None


_BERT = Adapter(
    family="bert",
    blocks="encoder.layer",
    embeddings="embeddings",
    attention="attention.self",
    qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
    ffn_down="output.dense",
    model_inputs=("input_ids", "attention_mask", "token_type_ids"),
    causal=False,
)
_GPT2 = Adapter(
    family="gpt2",
    blocks="h",
    embeddings="wte",
    attention="attn",
    qkv=("attn.c_attn",),
    ffn_down="mlp.c_proj",
    model_inputs=("input_ids", "attention_mask"),
    causal=True,
)
_LLAMA = Adapter(
    family="llama",
    blocks="layers",
    embeddings="embed_tokens",
    attention="self_attn",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ffn_down="mlp.down_proj",
    model_inputs=("input_ids", "attention_mask"),
    causal=True,
)

#: HF ``model_type`` -> adapter. Families missing here (opt, bloom, glm) are planned but cannot run yet.
ADAPTERS: dict[str, Adapter] = {
    "bert": _BERT,
    "roberta": replace(_BERT, family="roberta"),
    "xlm-roberta": replace(_BERT, family="roberta"),
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "qwen2": replace(_LLAMA, family="qwen2"),
    "mistral": replace(_LLAMA, family="mistral"),
}


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of a HF model, chosen by ``model.config.model_type``; RunError if unsupported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise RunError(f"{type(model).__name__} is not a Hugging Face transformers model (no config.model_type)")
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise RunError(
            f"model_type '{model_type}' ({type(model).__name__}) has no signal-capture adapter; "
            f"supported: {', '.join(sorted(ADAPTERS))}"
        )
    return adapter
