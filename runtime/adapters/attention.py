"""Attention taps: eager attention that records scores/probs on chosen blocks, sdpa on every other block.

transformers 5.x dispatches attention by name through ``AttentionInterface`` (``config._attn_implementation``)
and builds masks through ``AttentionMaskInterface`` under the same name. We register one implementation,
``gkdc_capture``, whose mask is sdpa's (boolean, or None when sdpa may use ``is_causal``) and whose function
checks a context-local table of tapped attention modules: a tapped module computes attention eagerly (the
same math as HF's ``eager_attention_forward``) and records what the plan asks for; any other module calls
HF's own ``sdpa_attention_forward`` unchanged, so untapped blocks keep the fused kernel.

The switch is scoped: ``attention_taps`` sets the implementation on every config of the model and restores
the previous values on exit, also when the forward raises; blocks under non-reentrant activation
checkpointing re-enter it while they are recomputed during backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "gkdc_capture"


@dataclass(frozen=True)
class AttentionTap:
    """What to record from one attention module."""

    layer: int
    scores: bool
    probs: bool


Record = Callable[[str, int, Tensor], None]
"""``record(kind, layer, tensor)`` with kind ``attn_scores`` or ``attn_probs``."""


@dataclass(frozen=True)
class _Session:
    taps: dict[int, AttentionTap]
    """id(attention module) -> tap; ids are stable while the session holds the model."""
    record: Record


# A ContextVar, not a global, so that two models captured in nested or concurrent contexts never mix taps.
_SESSION: ContextVar[_Session | None] = ContextVar("gkdc_attention_taps", default=None)


def tapping_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """The registered attention function: eager + record on tapped modules, sdpa otherwise."""
    session = _SESSION.get()
    tap = session.taps.get(id(module)) if session is not None else None
    if tap is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    return _eager(module, query, key, value, attention_mask, dropout, scaling, is_causal, tap, session.record)


def _eager(module, query, key, value, mask, dropout, scaling, is_causal, tap, record):
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if tap.scores:
        record("attn_scores", tap.layer, scores)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    masked = scores + _additive_mask(mask, causal, scores)
    probs = nn.functional.softmax(masked, dim=-1, dtype=torch.float32).to(query.dtype)
    if tap.probs:
        record("attn_probs", tap.layer, probs)
    dropped = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(dropped, value).transpose(1, 2).contiguous(), probs


def _additive_mask(mask: Tensor | None, causal: bool, scores: Tensor) -> Tensor:
    """0 where attending, the dtype's minimum elsewhere (HF's eager convention, finite so no NaN rows)."""
    q_len, kv_len = scores.shape[-2:]
    if mask is None:
        if not (causal and q_len > 1):
            return torch.zeros((), dtype=scores.dtype, device=scores.device)
        # sdpa_mask returns None for a plain causal mask (sdpa then uses is_causal): rebuild it, upper-left aligned
        # exactly as sdpa's is_causal is.
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril()
    if mask.dtype != torch.bool:
        return mask.to(scores.dtype)
    minimum = torch.finfo(scores.dtype).min
    return torch.where(mask, torch.zeros((), dtype=scores.dtype, device=scores.device), minimum)


def _repeat_kv(states: Tensor, groups: int) -> Tensor:
    """GQA: key/value heads repeated to one per query head, as HF's ``repeat_kv``."""
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def _register() -> None:
    # Idempotent: both registries are plain class-level dicts keyed by name.
    AttentionInterface.register(IMPLEMENTATION, tapping_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _configs(model: nn.Module) -> list[PretrainedConfig]:
    """Every distinct config object the model's modules read ``_attn_implementation`` from."""
    found: dict[int, PretrainedConfig] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            found.setdefault(id(config), config)
    return list(found.values())


@contextmanager
def attention_taps(model: nn.Module, taps: dict[nn.Module, AttentionTap], record: Record) -> Iterator[None]:
    """Within the block, the listed attention modules run eagerly and record; the rest run sdpa.

    With no taps the model is left as it is (whatever implementation it was loaded with).
    """
    if not taps:
        yield
        return
    _register()
    configs = _configs(model)
    by_id = {id(module): tap for module, tap in taps.items()}
    replay = _Session(by_id, lambda kind, layer, tensor: None)
    with _switched(configs, _Session(by_id, record)), _replayed_in_recompute(model, lambda: _switched(configs, replay)):
        yield


@contextmanager
def _switched(configs: list[PretrainedConfig], session: _Session) -> Iterator[None]:
    saved = [(config, config._attn_implementation_internal) for config in configs]
    token = _SESSION.set(session)
    try:
        for config, _ in saved:
            config._attn_implementation_internal = IMPLEMENTATION
        yield
    finally:
        for config, previous in saved:
            config._attn_implementation_internal = previous
        _SESSION.reset(token)


@contextmanager
def _replayed_in_recompute(model: nn.Module, replay: Callable[[], AbstractContextManager]) -> Iterator[None]:
    """Make non-reentrant activation checkpointing recompute tapped blocks with the same attention path.

    The recompute runs during backward, after ``_switched`` restored the model's implementation; torch then
    finds other saved tensors than the forward made (eager vs sdpa) and fails. ``context_fn`` lets the
    recompute re-enter the switch (recording nothing). Reentrant checkpointing takes no ``context_fn``; it runs
    the forward under no_grad anyway, which ``capture`` rejects for signals inside a block.
    """
    wrapped = []
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        keywords = getattr(func, "keywords", None)
        if keywords is None or keywords.get("use_reentrant", True) or "context_fn" in keywords:
            continue
        module._gradient_checkpointing_func = partial(func, context_fn=lambda: (nullcontext(), replay()))
        wrapped.append((module, func))
    try:
        yield
    finally:
        for module, func in wrapped:
            module._gradient_checkpointing_func = func
