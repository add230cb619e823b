"""HF model + planned ModelCapture -> captured signals: family adapters, attention taps, early stop.

``adapter_for(model)`` gives the module layout of a model's family; ``capture(model, batch, capture, grad=...)``
runs one forward and returns a ``Captured`` mapping ``(kind, layer) -> Tensor``.
"""

from runtime.adapters.capture import HEAD_KINDS, LAYERED_KINDS, SIGNAL_KINDS, Captured, capture, signal_name
from runtime.adapters.families import ADAPTERS, Adapter, adapter_for

__all__ = [
    "ADAPTERS",
    "HEAD_KINDS",
    "LAYERED_KINDS",
    "SIGNAL_KINDS",
    "Adapter",
    "Captured",
    "adapter_for",
    "capture",
    "signal_name",
]
