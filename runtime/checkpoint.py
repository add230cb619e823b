"""Run progress on disk: where a run stands (stage, step, sampler, RNG) -> atomic files, and back.

Layout under ``<out>/checkpoints``::

    progress.json            the last *complete* checkpoint (written last, atomically: tmp + os.replace)
    <tag>/                   DeepSpeed engine state (model, optimizer, LR scheduler) of that checkpoint
    <tag>/rng-rank<r>.pt     this rank's RNG states and sampler state
    stage-<i>.safetensors    the trained model's full weights at the end of stage i (carried to stage i+1)

A crash at any point leaves ``progress.json`` naming a checkpoint whose files are all on disk, so resume
never reads a half-written one. Older tags are deleted only after the newer record is in place.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.errors import RunError
from runtime.files import atomic_path, atomic_write

PROGRESS_FILE = "progress.json"


@dataclass(frozen=True)
class Progress:
    """Where a run stands after a completed optimizer step."""

    stage: int
    """Index of the stage in plan order."""
    stage_name: str
    step: int
    """Optimizer steps completed in this stage."""
    done: bool
    """The stage finished; its weights are in ``stage-<stage>.safetensors``."""
    tag: str | None
    """Engine checkpoint directory of this record (None for a finished stage)."""
    spec_hash: str
    trained: dict[str, str] = field(default_factory=dict)
    """Model name -> safetensors file of its weights after the last stage that trained it."""


def checkpoint_dir(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def step_tag(stage: int, step: int) -> str:
    return f"stage{stage}-step{step:08d}"


def write_progress(out_dir: Path, progress: Progress) -> None:
    """Rank 0: record ``progress`` as the last complete checkpoint."""
    path = checkpoint_dir(out_dir) / PROGRESS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(asdict(progress), indent=1), fsync=True)


def read_progress(out_dir: Path) -> Progress | None:
    """The last complete checkpoint, or None when the run never completed one."""
    path = checkpoint_dir(out_dir) / PROGRESS_FILE
    if not path.exists():
        return None
    try:
        return Progress(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise RunError(f"{path} is not a gkdc progress record ({err}); delete it to start over") from err


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_rank_state(out_dir: Path, tag: str, rank: int, sampler_state: dict[str, Any]) -> None:
    """Every rank: its RNG and sampler state beside the engine checkpoint ``tag``."""
    path = checkpoint_dir(out_dir) / tag / f"rng-rank{rank}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"rng": rng_state(), "sampler": sampler_state}, tmp)


def read_rank_state(out_dir: Path, tag: str, rank: int) -> dict[str, Any]:
    path = checkpoint_dir(out_dir) / tag / f"rng-rank{rank}.pt"
    if not path.exists():
        raise RunError(f"checkpoint '{tag}' has no state for rank {rank} ({path}); was the world size changed?")
    # our own file of python/numpy RNG tuples: not loadable with weights_only
    return torch.load(path, weights_only=False)


def stage_weights_path(out_dir: Path, stage: int) -> Path:
    return checkpoint_dir(out_dir) / f"stage-{stage}.safetensors"


def write_stage_weights(out_dir: Path, stage: int, state: dict[str, torch.Tensor]) -> Path:
    """Rank 0: the full weights of the model a stage trained, for the next stage and for resume."""
    from safetensors.torch import save_file

    path = stage_weights_path(out_dir, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        # tied weights share storage; safetensors refuses shared tensors, so store independent copies
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(tmp))
    return path


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.exists():
        raise RunError(f"weights file {path} of a finished stage is missing; delete {path.parent} to start over")
    return load_file(str(path))


def prune_tags(out_dir: Path, keep: str | None) -> None:
    """Rank 0: delete engine checkpoints other than ``keep`` (called after the newer record is written)."""
    root = checkpoint_dir(out_dir)
    for child in root.glob("stage*-step*"):
        if child.is_dir() and child.name != keep:
            shutil.rmtree(child, ignore_errors=True)
