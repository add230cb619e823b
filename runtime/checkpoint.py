"""Run progress on disk: where a run stands (stage, step, sampler, RNG) -> atomic files, and back.

Layout under ``<out>/checkpoints``::

    progress.json            the last *complete* checkpoint (written last, atomically: tmp + os.replace)
    <tag>/                   DeepSpeed engine state (model, optimizer, LR scheduler) of that checkpoint
    <tag>/rng-rank<r>.safetensors  this rank's RNG states (tensors) and sampler state (JSON metadata)
    stage-<i>.safetensors    the trained model's full weights at the end of stage i (carried to stage i+1; the
                             export's models/<name>/model.safetensors is a read-only hard link to it)

A crash at any point leaves ``progress.json`` naming a checkpoint whose files are all on disk, so resume
never reads a half-written one. Older tags are deleted only after the newer record is in place.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

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
    """Model name -> safetensors file of its weights after the last stage that trained it. On disk only the file
    name is kept (the files live in ``checkpoints/``), so a run resumes from any working directory."""


def checkpoint_dir(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def step_tag(stage: int, step: int) -> str:
    return f"stage{stage}-step{step:08d}"


def write_progress(out_dir: Path, progress: Progress) -> None:
    """Rank 0: record ``progress`` as the last complete checkpoint."""
    path = checkpoint_dir(out_dir) / PROGRESS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = asdict(progress) | {"trained": {k: Path(v).name for k, v in progress.trained.items()}}
    atomic_write(path, json.dumps(record, indent=1), fsync=True)


def read_progress(out_dir: Path) -> Progress | None:
    """The last complete checkpoint, or None when the run never completed one."""
    path = checkpoint_dir(out_dir) / PROGRESS_FILE
    if not path.exists():
        return None
    try:
        record = Progress(**json.loads(path.read_text()))
        trained = {str(k): str(checkpoint_dir(out_dir) / Path(str(v)).name) for k, v in record.trained.items()}
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as err:
        raise RunError(f"{path} is not a gkdc progress record ({err}); this folder cannot be resumed: start the "
                       "run again with another --out") from err
    if record.tag is not None and not _TAG.fullmatch(str(record.tag)):
        raise RunError(f"{path} names checkpoint {str(record.tag)[:60]!r}, not one gkdc writes; start the run "
                       "again with another --out")
    return Progress(**(asdict(record) | {"trained": trained}))


_TAG = re.compile(r"stage\d+-step\d{8}")


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


RANK_STATE = "rng-rank{rank}.safetensors"


def _rng_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """RNG states -> (tensors, JSON fields): formats that hold numbers only, never code (no pickle)."""
    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {"python": torch.tensor(list(internal), dtype=torch.int64),
               "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
               "torch": state["torch"].clone()}
    for i, s in enumerate(state.get("cuda", [])):
        tensors[f"cuda{i}"] = s.clone()
    fields = {"python_version": version, "python_gauss": gauss, "numpy_kind": kind, "numpy_pos": int(pos),
              "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached), "cuda": len(state.get("cuda", []))}
    return tensors, fields


def _rng_from(tensors: dict[str, torch.Tensor], fields: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": (int(fields["python_version"]), tuple(int(x) for x in tensors["python"].tolist()),
                   fields["python_gauss"]),
        "numpy": (str(fields["numpy_kind"]), tensors["numpy"].numpy().astype(np.uint32), int(fields["numpy_pos"]),
                  int(fields["numpy_has_gauss"]), float(fields["numpy_cached"])),
        "torch": tensors["torch"],
    }
    if fields.get("cuda"):
        state["cuda"] = [tensors[f"cuda{i}"] for i in range(int(fields["cuda"]))]
    return state


def write_rank_state(out_dir: Path, tag: str, rank: int, sampler_state: dict[str, Any]) -> None:
    """Every rank: its RNG and sampler state beside the engine checkpoint ``tag`` (safetensors + JSON metadata)."""
    from safetensors.torch import save_file

    path = checkpoint_dir(out_dir) / tag / RANK_STATE.format(rank=rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, fields = _rng_tensors(rng_state())
    meta = {"gkdc": json.dumps({"rng": fields, "sampler": sampler_state})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_rank_state(out_dir: Path, tag: str, rank: int) -> dict[str, Any]:
    """The state ``write_rank_state`` wrote; safetensors and JSON only, so a hostile file cannot run code."""
    from safetensors import SafetensorError, safe_open

    path = checkpoint_dir(out_dir) / tag / RANK_STATE.format(rank=rank)
    if not path.exists():
        raise RunError(f"checkpoint '{tag}' has no state for rank {rank} ({path}); was the world size changed?")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["gkdc"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        return {"rng": _rng_from(tensors, meta["rng"]), "sampler": dict(meta["sampler"])}
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
        raise RunError(f"{path} is not a gkdc rank state ({type(err).__name__}: {err}); resume from another "
                       "checkpoint or start a new --out") from err


#: Classes DeepSpeed 0.19's checkpoints hold besides tensors and containers, found by loading the checkpoints of
#: every ZeRO stage and precision the planner emits with ``weights_only=True`` (tests/test_trust.py re-checks).
def _deepspeed_safe_globals() -> list[Any]:
    found: list[Any] = []
    for module, names in (
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
    ):
        try:
            mod = __import__(module, fromlist=list(names) or ["__name__"])
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return found


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside (DeepSpeed's checkpoint loading) runs with ``weights_only=True``: tensors,
    containers, numbers and the allow-listed DeepSpeed classes load; any other pickled object is refused, so a
    hostile run folder cannot run code on ``--resume``."""
    original = torch.load

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = safe_load
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original


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
        raise RunError(f"weights file {path} of a finished stage is missing, so this run cannot be resumed; start "
                       "it again with another --out")
    return load_file(str(path))


def prune_tags(out_dir: Path, keep: str | None) -> None:
    """Rank 0: delete engine checkpoints other than ``keep`` (called after the newer record is written)."""
    root = checkpoint_dir(out_dir)
    for child in root.glob("stage*-step*"):
        if child.is_dir() and child.name != keep:
            shutil.rmtree(child, ignore_errors=True)


# ---------------------------------------------------------------- the spec a run folder was trained with

SPEC_FILE = "spec.json"
#: parts of a spec a resumed run may change (the documented recovery after a non-finite loss: a lower learning
#: rate, another schedule, loss weights or temperatures); anything else (models, data, batch sizes, stages'
#: names and order, the cluster) would make the checkpoint another run's
RESUMABLE_STAGE_KEYS = {"optimizer", "schedule", "loss", "save_every", "eval_every", "keep_best", "interventions"}


def write_spec(out_dir: Path, spec_json: str) -> None:
    """Rank 0: the embedded spec this run trains with, beside its checkpoints (what a resume compares against)."""
    path = checkpoint_dir(out_dir) / SPEC_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, spec_json, fsync=True)


def read_spec(out_dir: Path) -> dict[str, Any] | None:
    path = checkpoint_dir(out_dir) / SPEC_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _no_spans(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _no_spans(v) for k, v in value.items() if k not in ("span", "source_hash", "file")}
    if isinstance(value, list):
        return [_no_spans(v) for v in value]
    return value


def _diff(old: Any, new: Any, where: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            _diff(old.get(key), new.get(key), f"{where}.{key}" if where else str(key), out)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            _diff(a, b, f"{where}[{i}]", out)
    elif old != new:
        out.append(f"{where}: {_brief(old)} -> {_brief(new)}")


def _brief(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def spec_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(changes a resume may make, changes that make the checkpoints another run's), each as ``path: a -> b``."""
    old, new = _no_spans(old), _no_spans(new)
    allowed: list[str] = []
    refused: list[str] = []
    old_stages, new_stages = old.pop("stages", []), new.pop("stages", [])
    _diff(old, new, "", refused)
    if [s.get("name") for s in old_stages] != [s.get("name") for s in new_stages]:
        refused.append(f"stages: {[s.get('name') for s in old_stages]} -> {[s.get('name') for s in new_stages]}")
        return allowed, refused
    for a, b in zip(old_stages, new_stages):
        for key in sorted(set(a) | set(b)):
            target = allowed if key in RESUMABLE_STAGE_KEYS else refused
            _diff(a.get(key), b.get(key), f"stage '{a['name']}'.{key}", target)
    return allowed, refused
