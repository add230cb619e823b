"""(HF model, batch, ModelCapture) -> Captured: exactly the planned signals from one forward pass.

Hooks are registered only for ``capture.points`` and removed afterwards, also when the forward raises.
Where each signal is read (the same for every family; the adapter names the modules):

- ``embeddings``: input of block 0 (= HF ``hidden_states[0]``, after embedding dropout/LayerNorm);
- ``hidden[i]``: output of block i, so the last block is read *before* any final norm;
- ``query/key/value[i]``: outputs of the projections (GPT-2: the fused ``c_attn`` split in three), pre-rotary;
- ``ffn[i]``: input of the FFN down projection (activation, times the up projection for gated FFNs);
- ``attn_scores/attn_probs[i]``: recorded by the eager attention tap (``attention.py``);
- ``logits`` / ``task_logits``: the ``logits`` of the model's own forward (rank 3 = LM head, rank 2 = task head);
  with ``fused_head`` the base model runs instead and ``logits`` is a ``HeadLogits`` (final hidden states + the
  head's weight) that the chunked loss kernels turn into logits one chunk of rows at a time.

Early stop: when ``stop_after_layer`` is set and the head is not needed, a forward hook on that block raises
a private exception that ``capture`` catches. We chose this over re-implementing the block loop because the
model's own forward keeps building masks, rotary tables and position ids the way its transformers version
does, for every family, with no duplicated code to drift. Hooks run in registration order, so hooks added
before ours (ours record first; DeepSpeed ZeRO-3's release its gathered parameters) still run for the last
block; ZeRO-3 resets its step in a pre-forward hook on the next forward, so an abandoned tail is harmless.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from planner.plan import CapturePoint, ModelCapture
from runtime.adapters.attention import AttentionTap, attention_taps
from runtime.adapters.families import Adapter, adapter_for
from runtime.chunked import HeadLogits
from runtime.errors import RunError

LAYERED_KINDS = frozenset({"hidden", "attn_scores", "attn_probs", "query", "key", "value", "ffn"})
HEAD_KINDS = frozenset({"logits", "task_logits"})
SIGNAL_KINDS = LAYERED_KINDS | HEAD_KINDS | {"embeddings"}
ATTENTION_KINDS = frozenset({"attn_scores", "attn_probs"})

Key = tuple[str, int | None]


def signal_name(key: Key) -> str:
    kind, layer = key
    return kind if layer is None else f"{kind}[{layer}]"


@dataclass(frozen=True)
class Captured(Mapping[Key, Tensor]):
    """The signals of one model from one forward: ``captured[("hidden", 3)]``, ``captured.logits``."""

    model: str
    signals: Mapping[Key, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "signals", MappingProxyType(dict(self.signals)))

    def __getitem__(self, key: Key | CapturePoint) -> Tensor:
        if isinstance(key, CapturePoint):
            key = (key.kind, key.layer)
        try:
            return self.signals[key]
        except KeyError:
            have = ", ".join(signal_name(k) for k in self.signals) or "nothing"
            raise KeyError(f"model '{self.model}' captured no {signal_name(key)} (captured: {have})") from None

    def __iter__(self) -> Iterator[Key]:
        return iter(self.signals)

    def __len__(self) -> int:
        return len(self.signals)

    @property
    def embeddings(self) -> Tensor:
        return self[("embeddings", None)]

    @property
    def logits(self) -> Tensor:
        return self[("logits", None)]

    @property
    def task_logits(self) -> Tensor:
        return self[("task_logits", None)]


class _StopForward(Exception):
    """Raised by the stop hook after the deepest needed block; never escapes ``capture``."""


def capture(model: nn.Module, batch: dict[str, Tensor], capture: ModelCapture, *, grad: bool) -> Captured:
    """Run ONE forward of ``model`` on ``batch`` and return the signals ``capture`` plans.

    ``model`` is a HF model or a wrapper (e.g. a DeepSpeed engine) whose ``.module`` is one; the forward runs
    through the wrapper. ``grad=False`` (teachers) runs under ``torch.no_grad``.
    """
    hf = _unwrap(model)
    adapter = adapter_for(hf)
    blocks = adapter.layers(hf)
    _check(capture, len(blocks))
    if grad:
        _check_checkpointing(hf, capture)
    store: dict[Key, list[Tensor]] = defaultdict(list)
    record = _recorder(store)
    stop = None if capture.needs_head else capture.stop_after_layer
    with ExitStack() as stack:
        if not grad:
            stack.enter_context(torch.no_grad())
        stack.enter_context(_hooks(_plan_hooks(adapter, blocks, capture, record, stop)))
        stack.enter_context(attention_taps(hf, _attention_taps(adapter, blocks, capture), record))
        inputs = _model_inputs(batch, adapter, capture.model)
        tp = model if hasattr(model, "gather_inputs") else None  # a tensor-parallel teacher runs its group's union
        if tp is not None:
            inputs = tp.gather_inputs(inputs)
        output = _forward(hf.base_model if _base_only(hf, capture, grad) else model, inputs)
    signals = {key: _join(tensors) for key, tensors in store.items()}
    signals.update(_fused_head(hf, output, capture) if capture.fused_head else _head_signals(output, capture))
    if tp is not None:  # ... and keeps this rank's rows
        signals = {key: tp.own_rows(key[0], value) for key, value in signals.items()}
    _check_complete(signals, capture, adapter)
    return Captured(capture.model, signals)


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)
    return inner if not isinstance(model, PreTrainedModel) and isinstance(inner, PreTrainedModel) else model


def _forward(model: nn.Module, inputs: dict[str, Any]) -> Any:
    try:
        return model(**inputs)
    except _StopForward:
        return None


def _model_inputs(batch: dict[str, Tensor], adapter: Adapter, name: str) -> dict[str, Any]:
    if "input_ids" not in batch:
        raise RunError(f"batch for model '{name}' has no 'input_ids' (keys: {', '.join(sorted(batch))})")
    inputs: dict[str, Any] = {k: batch[k] for k in adapter.model_inputs if k in batch}
    if adapter.causal:
        inputs["use_cache"] = False
    if adapter.causal and "position_ids" in batch:
        # packed blocks: restarting position ids and no mask make transformers build a block-diagonal causal mask
        inputs["position_ids"] = batch["position_ids"]
        inputs.pop("attention_mask", None)
    return inputs


def _join(tensors: list[Tensor]) -> Tensor:
    # A module called more than once in one forward only happens for BERT's chunked feed-forward
    # (chunk_size_feed_forward > 0), which runs the FFN per sequence chunk.
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)


# --- plan checks ------------------------------------------------------------------------------------------


def _check(capture: ModelCapture, n_blocks: int) -> None:
    where = f"plan capture for model '{capture.model}'"
    for point in capture.points:
        _check_point(point, n_blocks, capture, where)
    for layer in capture.eager_attention_layers:
        _check_layer(layer, n_blocks, f"eager_attention_layers entry {layer}", where)
    if capture.stop_after_layer is not None:
        _check_layer(capture.stop_after_layer, n_blocks, "stop_after_layer", where)
        deepest = max((p.layer for p in capture.points if p.layer is not None), default=-1)
        if not capture.needs_head and deepest > capture.stop_after_layer:
            raise RunError(f"{where}: stop_after_layer {capture.stop_after_layer} is before block {deepest}, "
                           "which a planned signal needs")


def _check_point(point: CapturePoint, n_blocks: int, capture: ModelCapture, where: str) -> None:
    name = signal_name((point.kind, point.layer))
    if point.kind not in SIGNAL_KINDS:
        raise RunError(f"{where}: unknown signal kind '{point.kind}' (known: {', '.join(sorted(SIGNAL_KINDS))})")
    if (point.kind in LAYERED_KINDS) != (point.layer is not None):
        raise RunError(f"{where}: signal {name} " + ("needs a block index" if point.layer is None else
                                                      "takes no block index"))
    if point.layer is not None:
        _check_layer(point.layer, n_blocks, f"signal {name}", where)
    if point.kind in HEAD_KINDS and not capture.needs_head:
        raise RunError(f"{where}: signal {name} needs the model's head but needs_head is false")
    if point.kind in ATTENTION_KINDS and point.layer not in capture.eager_attention_layers:
        raise RunError(f"{where}: signal {name} needs eager attention on block {point.layer}, "
                       "which is not in eager_attention_layers")


def _check_layer(layer: int, n_blocks: int, what: str, where: str) -> None:
    if not 0 <= layer < n_blocks:
        raise RunError(f"{where}: {what} is out of range; the model has {n_blocks} blocks (0..{n_blocks - 1})")


INNER_KINDS = LAYERED_KINDS - {"hidden"}


def _check_checkpointing(model: nn.Module, capture: ModelCapture) -> None:
    # Reentrant checkpointing runs each block's forward under no_grad: signals read inside a block would come
    # back without a graph and silently train nothing.
    inner = sorted({p.kind for p in capture.points} & INNER_KINDS)
    if not inner or not model.training:
        return
    for module in model.modules():
        keywords = getattr(getattr(module, "_gradient_checkpointing_func", None), "keywords", {})
        if getattr(module, "gradient_checkpointing", False) and keywords.get("use_reentrant", False):
            raise RunError(f"model '{capture.model}': activation checkpointing with use_reentrant=True gives no "
                           f"gradient to {', '.join(inner)} (read inside a block); enable it with use_reentrant=False")


def _check_complete(signals: dict[Key, Tensor], capture: ModelCapture, adapter: Adapter) -> None:
    missing = [signal_name((p.kind, p.layer)) for p in capture.points if (p.kind, p.layer) not in signals]
    if missing:
        raise RunError(f"model '{capture.model}' ({adapter.family}): the forward produced no "
                       f"{', '.join(missing)}; the module layout may differ from the {adapter.family} adapter")


# --- hooks ------------------------------------------------------------------------------------------------

Hook = tuple[nn.Module, str, Callable[..., Any]]
"""(module, "pre" | "post", function) to register for one capture."""


def _recorder(store: dict[Key, list[Tensor]]) -> Callable[[str, int | None, Tensor], None]:
    def record(kind: str, layer: int | None, tensor: Tensor) -> None:
        store[(kind, layer)].append(tensor)

    return record


def _plan_hooks(adapter: Adapter, blocks: nn.ModuleList, capture: ModelCapture, record, stop: int | None) -> list[Hook]:
    hooks: list[Hook] = []
    kinds_at: dict[int | None, set[str]] = defaultdict(set)
    for point in capture.points:
        kinds_at[point.layer].add(point.kind)
    if "embeddings" in kinds_at[None]:
        hooks.append((blocks[0], "pre", lambda m, args, kwargs: record("embeddings", None, _hidden_arg(args, kwargs))))
    for layer, kinds in kinds_at.items():
        if layer is not None:
            hooks += _block_hooks(adapter, blocks[layer], layer, kinds, record)
    if stop is not None:
        # Registered last so that every recording hook on this block has run when it fires.
        hooks.append((blocks[stop], "post", _raise_stop))
    return hooks


def _block_hooks(adapter: Adapter, block: nn.Module, layer: int, kinds: set[str], record) -> list[Hook]:
    hooks: list[Hook] = []
    if "hidden" in kinds:
        hooks.append((block, "post", lambda m, args, out: record("hidden", layer, _first(out))))
    if kinds & {"query", "key", "value"}:
        hooks += _projection_hooks(adapter.projection_modules(block), layer, kinds, record)
    if "ffn" in kinds:
        hooks.append((adapter.ffn_module(block), "pre", lambda m, args, kwargs: record("ffn", layer,
                                                                                      _hidden_arg(args, kwargs))))
    return hooks


def _projection_hooks(modules: list[nn.Module], layer: int, kinds: set[str], record) -> list[Hook]:
    names = ("query", "key", "value")
    if len(modules) == 1:  # fused projection (GPT-2 c_attn): q, k, v are equal thirds of its output

        def split(m, args, out):
            for name, part in zip(names, out.split(out.shape[-1] // 3, dim=-1)):
                if name in kinds:
                    record(name, layer, part)

        return [(modules[0], "post", split)]
    return [(module, "post", _record_output(record, name, layer)) for name, module in zip(names, modules)
            if name in kinds]


def _record_output(record, kind: str, layer: int):
    return lambda m, args, out: record(kind, layer, out)


def _raise_stop(module, args, output):
    raise _StopForward


def _first(output: Any) -> Tensor:
    # Blocks return a tensor in transformers 5.x and a tuple (hidden, ...) in 4.x.
    return output[0] if isinstance(output, (tuple, list)) else output


def _hidden_arg(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def _hooks(hooks: list[Hook]) -> Iterator[None]:
    handles: list[RemovableHandle] = []
    try:
        for module, when, fn in hooks:
            if when == "pre":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _attention_taps(adapter: Adapter, blocks: nn.ModuleList, capture: ModelCapture) -> dict[nn.Module, AttentionTap]:
    wanted = {(p.kind, p.layer) for p in capture.points}
    return {
        adapter.attention_module(blocks[layer]): AttentionTap(
            layer, ("attn_scores", layer) in wanted, ("attn_probs", layer) in wanted
        )
        for layer in sorted(set(capture.eager_attention_layers))
    }


# --- head -------------------------------------------------------------------------------------------------


def _base_only(hf: nn.Module, capture: ModelCapture, grad: bool) -> bool:
    """Run the base model without its head: the head is fused into the loss, or a trained model's head output is
    not planned (its logits would be computed, then dropped, at the peak of the forward). A frozen teacher keeps
    its wrapper's forward (a partitioned engine's hooks) and stops early instead."""
    if hf.base_model is hf:
        return False
    return capture.fused_head or (grad and not capture.needs_head)


def _fused_head(hf: nn.Module, output: Any, capture: ModelCapture) -> dict[Key, Any]:
    """The plan fuses the LM head into the loss: the base model's output (after its final norm) and the head's
    weight stand in for the logits, which the chunked loss kernels form one chunk of rows at a time."""
    head = hf.get_output_embeddings()
    if not isinstance(head, nn.Linear) or getattr(output, "last_hidden_state", None) is None:
        raise RunError(f"model '{capture.model}' ({type(hf).__name__}): the plan fuses its LM head into the loss, "
                       "but its head is not one linear layer over the base model's output; re-plan without it")
    return {("logits", None): HeadLogits(output.last_hidden_state, head.weight, head.bias)}


def _head_signals(output: Any, capture: ModelCapture) -> dict[Key, Tensor]:
    wanted = {p.kind for p in capture.points} & HEAD_KINDS
    if not wanted:
        return {}
    logits = getattr(output, "logits", None)
    if logits is None:
        raise RunError(f"model '{capture.model}' has no head (a base model): it cannot give "
                       f"{', '.join(sorted(wanted))}; load it with an LM or classification head")
    kind = "logits" if logits.dim() == 3 else "task_logits"
    other = (wanted - {kind}).pop() if wanted - {kind} else None
    if other is not None:
        head = "a language-model head" if kind == "logits" else "a sequence-classification head"
        raise RunError(f"model '{capture.model}' has {head}: it gives {kind}, not {other}")
    return {(kind, None): logits}
