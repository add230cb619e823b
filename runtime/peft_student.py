"""A LoRA student (``ModelSpec.adapter``) -> its HF model with peft's LoRA layers, and what a finished stage saves.

- ``wrap_students(modules, stage, models, checkpointing)``: before DeepSpeed sees the student, peft's
  ``get_peft_model`` injects LoRA layers into the HF model *in place* (the module tree keeps its paths, so the
  family adapters' hooks still find blocks, attention and projections; a hooked ``q_proj`` gives its output with
  the low-rank update) and freezes every other weight; DeepSpeed's optimizer then holds the adapter alone
  (``runtime.optim`` takes parameters that require grad). The adapter's parameter count is checked against the
  plan's (``LoraSpec.params``): the planner priced exactly these.
- ``finish(model, spec, dirs, tokenizer, rank)`` at the end of the stage: rank 0 saves the adapter with peft's
  ``save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors``: ``PeftModel.from_pretrained(base,
  dir)`` loads it) into every folder of ``dirs``, with the base it adapts: ``base_model_name_or_path`` is the
  student's own folder when its weights came from there unchanged, else its base weights are saved beside it in
  ``<dir>/base`` (a plain HF folder). Then every rank merges the adapter into the weights (``merge_and_unload``)
  and gets the plain model back, which the recipe writes as the stage's weights: the saved student
  (``models/<name>``, ``student``) is the merged model that ``from_pretrained`` loads, and a later stage of the
  same student starts a fresh adapter over it.

ZeRO-3 is not planned for a LoRA student (planner.placement): peft wraps a whole module, and a LoRA student's
frozen weights are replicated in the compute dtype while the optimizer states exist for the adapter only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from gkdlang.spec import LoraSpec, ModelSpec, StageSpec
from runtime.errors import RunError

#: where the PeftModel of a wrapped HF model is kept (a plain attribute: never a submodule, never in a state dict)
_PEFT = "_gkdc_peft_model"
BASE_DIR = "base"


def lora_config(adapter: LoraSpec) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                      target_modules=list(adapter.targets), bias="none")


def wrap(model: nn.Module, name: str, adapter: LoraSpec, *, checkpointing: bool = False) -> nn.Module:
    """``model`` with LoRA layers injected in place and only them trainable (module docstring)."""
    from peft import get_peft_model

    try:
        peft_model = get_peft_model(model, lora_config(adapter))
    except (ValueError, TypeError) as exc:  # peft names a target that matches no module
        raise RunError(f"student '{name}': peft cannot add the LoRA adapter: {exc}") from None
    object.__setattr__(model, _PEFT, peft_model)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trained != adapter.params:
        raise RunError(f"student '{name}': the LoRA adapter has {trained:,} parameters but the plan priced "
                       f"{adapter.params:,}; re-run `gkdc plan`")
    if checkpointing:  # recomputed blocks of a frozen model need an input that requires grad to backpropagate
        model.enable_input_require_grads()
    return model


def wrap_students(modules: dict[str, nn.Module], stage: StageSpec, models: Mapping[str, ModelSpec],
                  checkpointing: bool) -> None:
    for name in stage.students:
        if models[name].adapter is not None:
            modules[name] = wrap(modules[name], name, models[name].adapter, checkpointing=checkpointing)


def is_wrapped(model: nn.Module) -> bool:
    return hasattr(model, _PEFT)


def _base_source(spec: ModelSpec, base_dir: Path, first_stage: bool) -> str | None:
    """The folder holding the student's base weights as they are, when there is one."""
    if not first_stage or spec.init.kind != "pretrained" or spec.source_kind not in ("local", "hub"):
        return None
    path = Path(str(spec.source))
    return str(path if path.is_absolute() or spec.source_kind == "hub" else (base_dir / path).resolve())


def save_base(model: nn.Module, tokenizer: Any, out: Path) -> None:
    """The frozen weights under the adapter as a plain HF folder (the adapter's base)."""
    import torch

    state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    with torch.device("meta"):
        plain = type(model)(model.config)
    plain.load_state_dict(state, strict=False, assign=True)
    plain.tie_weights()
    missing = [k for k, v in plain.state_dict().items() if v.is_meta]
    if missing:
        raise RunError(f"cannot save the LoRA student's base: {missing[0]} has no value")
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def finish(model: nn.Module, spec: ModelSpec, dirs: Sequence[Path], tokenizer: Any, *, rank: int, base_dir: Path,
           first_stage: bool) -> nn.Module:
    """Save the adapter (rank 0), merge it into the weights (every rank) and return the plain model."""
    peft_model = getattr(model, _PEFT)
    if rank == 0:
        source = _base_source(spec, base_dir, first_stage)
        for out in map(Path, dirs):
            out.mkdir(parents=True, exist_ok=True)
            peft_model.save_pretrained(str(out))
            if source is None:
                save_base(model, tokenizer, out / BASE_DIR)
            _set_base(out, source or BASE_DIR)
    merged = peft_model.merge_and_unload()
    object.__delattr__(model, _PEFT)
    return merged


def adapter_dirs(out_dir: Path, name: str, last: bool) -> list[Path]:
    """Where a stage saves its adapter: beside the model's export, and beside the run's student when it is last."""
    return [Path(out_dir) / "models" / name / "adapter"] + ([Path(out_dir) / "student" / "adapter"] if last else [])


def _set_base(out: Path, base: str) -> None:
    import json

    path = out / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def load_adapter(adapter_dir: Path) -> nn.Module:
    """The base (``<dir>/base`` or ``base_model_name_or_path``) with the saved adapter: the model peft loads."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]
    base_path = Path(adapter_dir) / base if not Path(base).is_absolute() else Path(base)
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(adapter_dir))
