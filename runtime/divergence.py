"""Trained weights -> whether they may be written as a checkpoint: finite, and not grown past a bound.

A non-finite loss is caught at the step it happens (recipe._check_finite), and non-finite weights at the
checkpoint; but a run can diverge with every number still finite (issue 14: max |w| 336,663 where it is ~1 in a
healthy run) and its checkpoint then replaced the last good one, so the documented recovery (fix the spec,
resume) resumed from weights that had already diverged. The guard here measures each trained model's largest
weight magnitude when its stage starts and refuses a checkpoint whose largest weight has grown more than
WEIGHT_GROWTH times past it (and past MIN_DIVERGED), so the checkpoint kept is the last one written before the
run went bad. Under ZeRO-3 each rank measures its own partition and the ranks agree on the maximum.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch

from runtime import engine as eng
from runtime.errors import RunError

#: largest |w| a checkpoint may hold, as a multiple of the largest |w| at the stage's start. Healthy training
#: moves it by a small factor (normalisation gains start at 1; trained GPT-2 / BERT / Llama weights peak at
#: ~10-30 from an initial ~1); the diverged run of issue 14 had grown 3e5x.
WEIGHT_GROWTH = 100.0
#: below this largest |w| no checkpoint is called diverged, whatever its start (a tiny init may grow 100x safely)
MIN_DIVERGED = 1e3

_START: "weakref.WeakKeyDictionary[Any, float]" = weakref.WeakKeyDictionary()


def weight_scale(engine: Any) -> tuple[bool, float]:
    """(every weight finite, largest finite |w|) over the trained model, agreed by all ranks."""
    finite, largest = True, 0.0
    with torch.no_grad():
        for p in engine.module.parameters():
            t = getattr(p, "ds_tensor", None)
            t = p.data if t is None or t.numel() == 0 else t
            if not t.numel():
                continue
            if not bool(torch.isfinite(t).all()):
                finite = False
                break
            largest = max(largest, float(t.detach().abs().max()))
    flags = torch.tensor([0.0 if finite else 1.0, largest], dtype=torch.float64, device=eng.device())
    both = eng.all_ranks_max(flags)
    return bool(both[0] == 0.0), float(both[1])


def note_start(engine: Any) -> float:
    """Record the largest |w| of ``engine``'s model as its stage starts (after a resume: the restored weights)."""
    _START[engine] = weight_scale(engine)[1]
    return _START[engine]


def check(engine: Any, stage: str, step: int, kept: str) -> None:
    """Raise a RunError (nothing written) when the weights are not finite or have grown past the bound."""
    finite, largest = weight_scale(engine)
    if not finite:
        raise RunError(f"stage '{stage}', step {step}: the trained weights are not finite (the run diverged); this "
                       f"checkpoint was not written, {kept}. Lower the learning rate or the loss weights in the "
                       "spec, re-plan it and resume with --resume")
    start = _START.get(engine)
    if start is None or not math.isfinite(start):
        return
    bound = max(WEIGHT_GROWTH * start, MIN_DIVERGED)
    if largest > bound:
        raise RunError(f"stage '{stage}', step {step}: the trained weights diverged (largest |w| {largest:.4g}, "
                       f"{largest / max(start, 1e-30):.3g}x the {start:.4g} the stage started with; the bound is "
                       f"{WEIGHT_GROWTH:g}x); this checkpoint was not written, {kept}. Lower the learning rate or "
                       "the loss weights in the spec, re-plan it and resume with --resume")
