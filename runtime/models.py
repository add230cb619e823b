"""ModelSpec -> Hugging Face model and tokenizer (hub, local dir, catalog, derived; copy init; safetensors only).

Takes the checked ``ModelSpec`` of each model in a plan; gives ``torch.nn.Module`` objects built by the
transformers Auto classes, their tokenizers, and ``save_student`` which writes a trained student that plain
transformers loads back. This module is the one boundary where transformers exceptions become ``RunError``.

Rules a user meets here:

- ``hf("dir")`` loads ``dir`` with ``use_safetensors=True``; a folder holding only pickle weights
  (``*.bin``/``*.pt``/``*.pth``) is refused unless the caller passes ``allow_pickle`` (pickles run code on load).
- a hub or catalog model is fetched by transformers (network or local HF cache); without either the error says
  so and suggests a local directory.
- a derived model (``like base``) is built from its derived config with random weights; ``init copy(src)``
  then copies embeddings, the chosen blocks and final norm/head from the already built ``src``.
- a tokenizer without a pad token pads with its eos token (decoder tokenizers such as GPT-2 have no pad);
  classification heads of decoders get the same pad id so they can find each sequence's last token.
- teachers come back in ``eval()`` mode with ``requires_grad_(False)``; students and assistants in ``train()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gkdlang.spec import ModelSpec
from runtime.errors import RunError
from runtime.vocab import VOCAB_FILE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from runtime.vocab import VocabMap

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
CATALOG_KEY = "_catalog"


# ---------------------------------------------------------------- where a model's files come from


def _local_dir(model: ModelSpec, base_dir: Path) -> Path:
    path = Path(model.source or "")
    path = path if path.is_absolute() else base_dir / path
    if not path.is_dir():
        raise RunError(f"model '{model.name}': local directory {path} does not exist (hf(\"{model.source}\"))")
    if not (path / "config.json").is_file():
        raise RunError(f"model '{model.name}': {path} has no config.json; is it a Hugging Face model folder?")
    return path


def _hub_id(model: ModelSpec) -> str:
    """The hub id of a hub or catalog model (catalog: ``arch.config['_catalog']['hub_id']`` or the catalog's)."""
    if model.source_kind == "hub":
        return str(model.source)
    meta = model.arch.config.get(CATALOG_KEY) or {}
    hub_id = meta.get("hub_id") if isinstance(meta, dict) else None
    if hub_id is None and CATALOG_KEY not in model.arch.config:
        from gkdlang import catalog

        entry = catalog.entry(str(model.source))
        hub_id = entry.hub_id if entry is not None else model.source
    if not hub_id:
        raise RunError(
            f"model '{model.name}': catalog entry '{model.source}' has no weights on any hub (a synthetic config); "
            f"use a local directory hf(\"path\") or derive a student `like` it"
        )
    return str(hub_id)


def _resolve(model: ModelSpec, models: dict[str, ModelSpec]) -> ModelSpec:
    """Follow ``like`` links of derived models to the model whose files hold the tokenizer."""
    seen: set[str] = set()
    while model.source_kind == "derived":
        if model.base is None or model.base not in models or model.base in seen:
            raise RunError(f"model '{model.name}' is derived but its base '{model.base}' is not in the plan")
        seen.add(model.name)
        model = models[model.base]
    return model


def _where(model: ModelSpec, base_dir: Path) -> tuple[str, bool]:
    """(path or hub id to load from, whether it is local)."""
    if model.source_kind == "local":
        return str(_local_dir(model, base_dir)), True
    return _hub_id(model), False


def _fetch_error(model: ModelSpec, where: str, what: str, exc: Exception) -> RunError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return RunError(
        f"model '{model.name}': could not fetch the {what} of '{where}' from the Hugging Face hub ({first}); "
        f"with no network and no local HF cache, download it elsewhere and use hf(\"path/to/dir\")"
    )


# ---------------------------------------------------------------- tokenizer


def load_tokenizer(model: ModelSpec, models: dict[str, ModelSpec], base_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model`` (a derived model uses its base's); pad defaults to eos when missing."""
    from transformers import AutoTokenizer

    owner = _resolve(model, models)
    where, local = _where(owner, base_dir)
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except OSError as exc:
        if local:
            raise RunError(f"model '{model.name}': no usable tokenizer files in {where} ({exc})") from None
        raise _fetch_error(model, where, "tokenizer", exc) from None
    except (ValueError, KeyError) as exc:
        raise RunError(f"model '{model.name}': transformers cannot build the tokenizer of {where}: {exc}") from None
    return _with_pad(tok, model.name)


def _with_pad(tok: Any, name: str) -> Any:
    if tok.pad_token_id is not None:
        return tok
    if tok.eos_token is None:
        raise RunError(f"model '{name}': its tokenizer has neither a pad nor an eos token; add a pad token to it")
    # decoder tokenizers (GPT-2, Llama) ship without pad; padded positions are masked, so eos is a safe filler
    tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------- building models


def _auto_class(model: ModelSpec) -> Any:
    import transformers as tf

    if model.head.kind == "classify":
        return tf.AutoModelForSequenceClassification
    if model.head.kind == "none":
        return tf.AutoModel
    return tf.AutoModelForMaskedLM if model.arch.is_encoder else tf.AutoModelForCausalLM


def _head_kwargs(model: ModelSpec) -> dict[str, Any]:
    if model.head.kind != "classify":
        return {}
    if not model.head.num_labels:
        raise RunError(f"model '{model.name}': a classify head needs num_labels (head classify(n))")
    return {"num_labels": int(model.head.num_labels)}


def _check_weights(model: ModelSpec, path: Path, allow_pickle: bool) -> None:
    files = [p.name for p in path.iterdir() if p.is_file()]
    safe = [f for f in files if f.endswith(".safetensors") or f == "model.safetensors.index.json"]
    pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if safe or allow_pickle:
        return
    if pickled:
        raise RunError(
            f"model '{model.name}': {path} holds only pickle weights ({', '.join(sorted(pickled))}), which can run "
            f"code when loaded; convert them to safetensors, or pass --allow-pickle if you trust the files"
        )
    raise RunError(f"model '{model.name}': {path} has no weights (*.safetensors)")


def _from_pretrained(model: ModelSpec, base_dir: Path, remote: bool, allow_pickle: bool) -> nn.Module:
    where, local = _where(model, base_dir)
    if local:
        _check_weights(model, Path(where), allow_pickle)
    kwargs: dict[str, Any] = {"dtype": DTYPES[model.dtype], **_head_kwargs(model)}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if remote:
        kwargs["trust_remote_code"] = True
    try:
        net, info = _auto_class(model).from_pretrained(where, output_loading_info=True, **kwargs)
        missing = list(info.get("missing_keys") or [])
        if model.role == "teacher" and missing:
            # transformers would initialise these randomly: a teacher must be trained in full
            raise RunError(f"teacher '{model.name}': {where} has no weights for {len(missing)} tensor(s) "
                           f"({', '.join(sorted(missing)[:4])}{', ...' if len(missing) > 4 else ''}); transformers "
                           "would initialise them randomly. Use a folder saved with every head the spec reads "
                           "(e.g. BertForMaskedLM for logits)")
        return net
    except OSError as exc:
        if local:
            raise RunError(f"model '{model.name}': could not load weights from {where}: {exc}") from None
        if not allow_pickle and "safetensors" in str(exc):
            raise RunError(
                f"model '{model.name}': '{where}' has no safetensors weights ({str(exc).splitlines()[0]}); "
                f"pass --allow-pickle if you trust its pickle files, or convert them"
            ) from None
        raise _fetch_error(model, where, "weights", exc) from None
    except (ValueError, KeyError, RuntimeError) as exc:
        raise RunError(f"model '{model.name}': transformers cannot load '{where}': {exc}") from None


def _config(model: ModelSpec) -> Any:
    from transformers import AutoConfig

    raw = {k: v for k, v in model.arch.config.items() if k != CATALOG_KEY}
    model_type = raw.pop("model_type", model.arch.model_type)
    try:
        cfg = AutoConfig.for_model(model_type, **raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise RunError(f"model '{model.name}': transformers cannot build a '{model_type}' config: {exc}") from None
    for key, value in _head_kwargs(model).items():
        setattr(cfg, key, value)
    return cfg


def _from_config(model: ModelSpec, remote: bool) -> nn.Module:
    kwargs: dict[str, Any] = {"dtype": DTYPES[model.dtype]}
    if remote:
        kwargs["trust_remote_code"] = True
    try:
        return _auto_class(model).from_config(_config(model), **kwargs)
    except (ValueError, KeyError, TypeError) as exc:
        raise RunError(f"model '{model.name}': transformers cannot build it from its config: {exc}") from None


def build_model(
    model: ModelSpec,
    base_dir: Path,
    built: dict[str, nn.Module],
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> nn.Module:
    """The HF model of ``model``: loaded (hub/local/catalog) or built (derived), then copy-initialised.

    ``built`` holds the models built so far by name (the source of ``init copy``). ``trust_remote_code`` is
    passed to transformers only when the caller sets it; a spec cannot enable it.
    """
    # `init: random` (or copy) on a hub/local model means its architecture only: build from its config
    if model.source_kind == "derived" or model.init.kind in ("random", "copy"):
        net = _from_config(model, trust_remote_code)
    else:
        net = _from_pretrained(model, base_dir, trust_remote_code, allow_pickle)
    if model.init.kind == "copy":
        copy_init(net, model, built)
    _pad_for_classify(net)
    # from_pretrained returns eval() models; students and assistants train
    net.train(model.role != "teacher")
    net.requires_grad_(model.role != "teacher")
    return net


def _pad_for_classify(net: nn.Module) -> None:
    # decoder classification heads pick each row's last non-pad token and refuse batches > 1 without a pad id
    cfg = getattr(net, "config", None)
    if cfg is None or getattr(cfg, "pad_token_id", None) is not None:
        return
    if type(net).__name__.endswith("ForSequenceClassification"):
        eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
        cfg.pad_token_id = eos


def sync_pad_token(net: nn.Module, tokenizer: Any) -> None:
    """Give the model the tokenizer's pad id (decoder classification heads read it to find the last token)."""
    if getattr(net, "config", None) is not None and tokenizer.pad_token_id is not None:
        net.config.pad_token_id = tokenizer.pad_token_id


# ---------------------------------------------------------------- copy init


def _prefix_of(net: nn.Module) -> str:
    """State-dict prefix of the base model ('' for a bare base model)."""
    base = getattr(net, "base_model", net)
    for name, module in net.named_modules():
        if module is base:
            return name
    return ""


def _blocks_path(net: nn.Module, num_layers: int, name: str) -> str:
    """Path of the transformer blocks: the largest ModuleList with one entry per layer."""
    best, size = None, -1
    for path, module in net.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            count = sum(p.numel() for p in module.parameters())
            if count > size:
                best, size = path, count
    if best is None:
        raise RunError(f"model '{name}': cannot find its {num_layers} transformer blocks for init copy")
    return best


def _num_layers(net: nn.Module) -> int:
    from gkdlang.arch import arch_from_config

    return arch_from_config(net.config.to_dict()).num_layers


def _source_key(key: str, dst: tuple[str, str], src: tuple[str, str], layers: list[int]) -> str:
    """Student state-dict key -> the source key it copies from (blocks renumbered by ``layers``)."""
    (d_prefix, d_blocks), (s_prefix, s_blocks) = dst, src
    if key.startswith(d_blocks + "."):
        index, rest = key[len(d_blocks) + 1 :].split(".", 1)
        i = int(index)
        return f"{s_blocks}.{layers[i]}.{rest}" if i < len(layers) else ""
    if d_prefix and key.startswith(d_prefix + "."):
        rel = key[len(d_prefix) + 1 :]
        return f"{s_prefix}.{rel}" if s_prefix else rel
    if not d_prefix and s_prefix:
        return f"{s_prefix}.{key}"
    return key  # a head outside the base model (lm_head, cls.*, classifier): same name in the source


def _copy_layers(model: ModelSpec, student_layers: int, source_layers: int) -> list[int]:
    layers = list(model.init.layers) if model.init.layers is not None else list(range(student_layers))
    if len(layers) > student_layers:
        raise RunError(f"model '{model.name}': init copy lists {len(layers)} layers but it has {student_layers}")
    bad = [i for i in layers if not 0 <= i < source_layers]
    if bad:
        raise RunError(
            f"model '{model.name}': init copy layer {bad[0]} does not exist in '{model.init.source}' "
            f"({source_layers} layers)"
        )
    return layers


def copy_init(net: nn.Module, model: ModelSpec, built: dict[str, nn.Module]) -> int:
    """Copy embeddings, blocks ``init.layers`` and final norm/head from ``built[init.source]``; returns tensors copied.

    Tensors the source lacks (a new classification head, a pooler) keep their random init; a tensor present
    in both with different shapes is an error naming it.
    """
    source = built.get(str(model.init.source))
    if source is None:
        raise RunError(f"model '{model.name}': init copy source '{model.init.source}' has not been built")
    n_dst, n_src = _num_layers(net), _num_layers(source)
    layers = _copy_layers(model, n_dst, n_src)
    dst = (_prefix_of(net), _blocks_path(net, n_dst, model.name))
    src = (_prefix_of(source), _blocks_path(source, n_src, str(model.init.source)))
    src_state, copied = source.state_dict(), 0
    with torch.no_grad():
        for key, tensor in net.state_dict().items():
            value = src_state.get(_source_key(key, dst, src, layers))
            if value is None:
                continue
            if value.shape != tensor.shape:
                raise RunError(
                    f"model '{model.name}': init copy from '{model.init.source}': tensor {key} has shape "
                    f"{tuple(tensor.shape)} but the source's is {tuple(value.shape)}; make the student's width "
                    f"(and heads, intermediate, vocab, max_positions) match or use init random"
                )
            tensor.copy_(value.to(tensor.dtype))
            copied += 1
    if copied == 0:
        raise RunError(f"model '{model.name}': init copy found no tensor to copy in '{model.init.source}'")
    return copied


# ---------------------------------------------------------------- saving


def save_student(model: nn.Module, tokenizer: Any, out_dir: Path, vocab_map: VocabMap | None) -> None:
    """Write a trained student as a plain HF folder (safetensors, config, tokenizer [, gkdc_vocab.json]).

    With vocabulary compression the model's rows are the kept ids; ``runtime.vocab.load_compressed`` reads
    ``gkdc_vocab.json`` and remaps input ids (plain ``AutoModel`` loads it too, but then ids must be remapped).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    try:
        net.save_pretrained(str(out_dir))  # transformers 5 always writes safetensors
        tokenizer.save_pretrained(str(out_dir))
    except (OSError, ValueError, RuntimeError) as exc:
        raise RunError(f"cannot save the student to {out_dir}: {exc}") from None
    if vocab_map is not None:
        (out_dir / VOCAB_FILE).write_text(vocab_map.to_json(), encoding="utf-8")
