"""ModelSpec + ParamCounts -> the parameters a stage trains and those it only runs (LoRA students).

A full student trains every parameter: gradients and Adam states for all of them. A LoRA student
(``adapter: lora(...)``, runtime/peft_student.py) trains only its adapter (``LoraSpec.params``, counted by
``gkdlang.lora.adapter_params`` and tested equal to peft's count): gradients, fp32 master weights and Adam
states exist for the adapter alone, while its own weights are held once, frozen, in the compute dtype. The
forward runs both; the backward computes activation gradients through every weight and weight gradients for
the adapter only, so a LoRA step costs ``4 N + 6 a`` FLOPs per token (N own weights, a adapter) where a full
step costs ``6 N``.
"""

from __future__ import annotations

from gkdlang.spec import ModelSpec
from planner.params import ParamCounts


def trained_params(model: ModelSpec, counts: ParamCounts) -> int:
    """Parameters with gradients and optimizer states."""
    return model.adapter.params if model.adapter is not None else counts.total


def frozen_params(model: ModelSpec, counts: ParamCounts) -> int:
    """A trained model's parameters that are run but not trained (a LoRA student's own weights)."""
    return counts.total if model.adapter is not None else 0
