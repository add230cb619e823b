"""What a stage's setup shares with the cache writer (runtime/cache.py builds a teacher exactly as a run does):
the base seed, seeding every generator from it, and pruning a teacher to its planned forward."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from planner.plan import ModelCapture

SEED = 1234
"""Base seed: model init, data order and random gates are functions of it and the stage index."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pruned(module: nn.Module, capture: ModelCapture) -> nn.Module:
    """A teacher without the blocks and head its planned forward never runs (before any engine partitions it)."""
    from runtime.adapters import adapter_for

    if capture.stop_after_layer is not None and not capture.needs_head:
        adapter_for(module).prune(module, capture.stop_after_layer + 1, drop_head=True)
    return module
