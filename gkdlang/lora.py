"""ArchInfo -> the linear modules of a block that a LoRA adapter can target, with their (in, out) features.

Names are the Hugging Face module names peft matches (``target_modules``: a module whose name ends with the
target). Per family, ``LINEARS`` lists every target and the (in, out) of each module it matches in one block;
``DEFAULT_TARGETS`` are peft's defaults for the family (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``).
GPT-2's ``c_proj`` matches two modules per block (attention output and MLP output). BERT's ``dense`` is left out:
it names the attention output, the FFN, the pooler and the MLM transform alike.
"""

from __future__ import annotations

from collections.abc import Callable

from gkdlang.arch import ArchInfo

Shapes = Callable[[ArchInfo], list[tuple[int, int]]]


def _q(a: ArchInfo) -> list[tuple[int, int]]:
    return [(a.hidden_size, a.num_heads * a.head_dim)]


def _kv(a: ArchInfo) -> list[tuple[int, int]]:
    return [(a.hidden_size, a.num_kv_heads * a.head_dim)]


_DECODER: dict[str, Shapes] = {
    "q_proj": _q,
    "k_proj": _kv,
    "v_proj": _kv,
    "o_proj": lambda a: [(a.num_heads * a.head_dim, a.hidden_size)],
    "gate_proj": lambda a: [(a.hidden_size, a.intermediate_size)],
    "up_proj": lambda a: [(a.hidden_size, a.intermediate_size)],
    "down_proj": lambda a: [(a.intermediate_size, a.hidden_size)],
}
_GPT2: dict[str, Shapes] = {
    "c_attn": lambda a: [(a.hidden_size, 3 * a.hidden_size)],
    "c_proj": lambda a: [(a.hidden_size, a.hidden_size), (a.intermediate_size, a.hidden_size)],
    "c_fc": lambda a: [(a.hidden_size, a.intermediate_size)],
}
_BERT: dict[str, Shapes] = {name: (lambda a: [(a.hidden_size, a.hidden_size)]) for name in ("query", "key", "value")}

LINEARS: dict[str, dict[str, Shapes]] = {
    "llama": _DECODER, "qwen2": _DECODER, "mistral": _DECODER, "gpt2": _GPT2, "bert": _BERT, "roberta": _BERT,
}
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",), "bert": ("query", "value"), "roberta": ("query", "value"),
}


def adapter_params(arch: ArchInfo, r: int, targets: list[str]) -> int:
    """Parameters of a LoRA adapter: ``r * (in + out)`` (A and B, no bias) per targeted module of every block."""
    table = LINEARS[arch.family]
    return arch.num_layers * sum(r * (i + o) for name in targets for i, o in table[name](arch))
