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
from runtime.vocab import VOCAB_FILE, vocab_params

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
    """(path or hub id to load from, whether it is local). A hub model found in the local Hugging Face cache is
    loaded from its cached snapshot folder, as a local folder (no network; the safetensors rules apply)."""
    if model.source_kind == "local":
        return str(_local_dir(model, base_dir)), True
    hub_id = _hub_id(model)
    from gkdlang.models import hub_snapshot

    cached = hub_snapshot(hub_id)
    return (str(cached), True) if cached is not None else (hub_id, False)


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


def _from_pretrained(model: ModelSpec, base_dir: Path, remote: bool, allow_pickle: bool, *,
                     config: Any = None, zero3: dict[str, Any] | None = None) -> nn.Module:
    """``from_pretrained``; with ``config`` (e.g. fewer blocks) instead of the folder's; with a ZeRO-3 ``zero3``
    config through transformers' own partitioned loading (rank 0 reads the files, each module is gathered,
    filled and re-partitioned): the route for hub models and pickle weights."""
    where, local = _where(model, base_dir)
    if local:
        _check_weights(model, Path(where), allow_pickle)
    kwargs: dict[str, Any] = {"dtype": DTYPES[model.dtype], **_head_kwargs(model)}
    if config is not None:
        kwargs = {"dtype": DTYPES[model.dtype], "config": config}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    if remote:
        kwargs["trust_remote_code"] = True
    try:
        if zero3 is not None:
            from runtime import engine as eng

            with eng.zero3_build(zero3):
                net, info = _auto_class(model).from_pretrained(where, output_loading_info=True, **kwargs)
        else:
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


def _from_config(model: ModelSpec, remote: bool, config: Any = None) -> nn.Module:
    """``model``'s transformers class built from ``config`` (default: the one its spec describes), in its dtype;
    inside ``eng.zero3_build`` or a meta-device context as the caller sets it."""
    kwargs: dict[str, Any] = {"dtype": DTYPES[model.dtype]}
    if remote:
        kwargs["trust_remote_code"] = True
    try:
        return _auto_class(model).from_config(_config(model) if config is None else config, **kwargs)
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
            count = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
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


def copy_init(net: nn.Module, model: ModelSpec, built: dict[str, nn.Module], *, rows: torch.Tensor | None = None) -> int:
    """Copy embeddings, blocks ``init.layers`` and final norm/head from ``built[init.source]``; returns tensors copied.

    Tensors the source lacks (a new classification head, a pooler) keep their random init; a tensor present
    in both with different shapes is an error naming it. With ``rows`` (a compressed vocabulary's kept ids, in
    new-row order) ``net`` already has the compressed size: its vocabulary-indexed tensors take those rows of
    the source's full-vocabulary ones (the same values as copying whole and then ``compress_student``).
    """
    source = built.get(str(model.init.source))
    if source is None:
        raise RunError(f"model '{model.name}': init copy source '{model.init.source}' has not been built")
    n_dst, n_src = _num_layers(net), _num_layers(source)
    layers = _copy_layers(model, n_dst, n_src)
    dst = (_prefix_of(net), _blocks_path(net, n_dst, model.name))
    src = (_prefix_of(source), _blocks_path(source, n_src, str(model.init.source)))
    from runtime import engine as eng

    src_state = dict(named_tensors(source))
    by_row = set() if rows is None else {id(p) for p in vocab_params(net, int(rows.numel()))}
    copied = 0
    for key, tensor in named_tensors(net):
        value = src_state.get(_source_key(key, dst, src, layers))
        if value is None:
            continue
        pick = rows if id(tensor) in by_row else None  # in the map's order, even when every row is kept
        if pick is not None and eng.full_shape(value)[1:] == eng.full_shape(tensor)[1:]:
            with eng.gathered_pair(value, tensor) as writes, torch.no_grad():  # kept rows of the full table
                if writes:
                    tensor.data.copy_(value.data.index_select(0, pick.to(value.device)).to(tensor.dtype))
            copied += 1
            continue
        if eng.full_shape(value) != eng.full_shape(tensor):
            raise RunError(
                f"model '{model.name}': init copy from '{model.init.source}': tensor {key} has shape "
                f"{eng.full_shape(tensor)} but the source's is {eng.full_shape(value)}; make the student's width "
                f"(and heads, intermediate, vocab, max_positions) match or use init random"
            )
        # ZeRO-3 tensors (a partitioned student or source) are gathered one pair at a time
        with eng.gathered_pair(value, tensor) as writes, torch.no_grad():
            if writes:
                tensor.data.copy_(value.data.to(tensor.dtype))
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


# ---------------------------------------------------------------- built into the placement


def _pretrained_config(model: ModelSpec, where: str, remote: bool) -> Any:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(where, trust_remote_code=remote)
    except (OSError, ValueError, KeyError) as exc:
        raise RunError(f"model '{model.name}': cannot read the config of {where}: {exc}") from None
    for key, value in _head_kwargs(model).items():
        setattr(cfg, key, value)
    return cfg


def _keep_blocks(cfg: Any, keep_blocks: int | None) -> Any:
    """The config of the first ``keep_blocks`` blocks (every family maps ``num_hidden_layers`` to its own key)."""
    if keep_blocks is not None and keep_blocks < int(cfg.num_hidden_layers):
        cfg.num_hidden_layers = keep_blocks
    return cfg


def build_teacher(
    model: ModelSpec,
    base_dir: Path,
    *,
    keep_blocks: int | None,
    drop_head: bool,
    zero3: dict[str, Any] | None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> nn.Module:
    """A frozen teacher built as the plan places it: only blocks ``0..keep_blocks-1`` (and no head when its
    forward never reaches it), and, with a ZeRO-3 ``zero3`` config, partitioned while it is built, each rank
    reading only its own part of every weight from the safetensors files.

    The blocks it does not run are never built and their bytes never read. A replicated teacher is loaded by
    ``from_pretrained`` with the shortened config (transformers skips the files' other blocks).
    """
    if model.source_kind == "derived" or model.init.kind in ("random", "copy"):
        raise RunError(f"model '{model.name}': a teacher needs weights (hf(...)), not a derived or random init")
    where, local = _where(model, base_dir)
    if local:
        _check_weights(model, Path(where), allow_pickle)
    if zero3 is None or not local or not _has_safetensors(Path(where)):
        net = _from_pretrained(model, base_dir, trust_remote_code, allow_pickle,
                               config=_keep_blocks(_pretrained_config(model, where, trust_remote_code), keep_blocks),
                               zero3=zero3)
        return _frozen(_drop_head(net, drop_head))
    from runtime import engine as eng

    cfg = _keep_blocks(_pretrained_config(model, where, trust_remote_code), keep_blocks)
    with eng.zero3_build(zero3):
        net = _from_config(model, trust_remote_code, cfg)
    net = _drop_head(net, drop_head)
    load_weights(net, Path(where), model.name)
    return _frozen(net)


def _has_safetensors(path: Path) -> bool:
    return any(path.glob("*.safetensors"))


def _frozen(net: nn.Module) -> nn.Module:
    _pad_for_classify(net)
    return net.eval().requires_grad_(False)


def _drop_head(net: nn.Module, drop: bool) -> nn.Module:
    if drop:
        from runtime.adapters import adapter_for

        adapter = adapter_for(net)
        adapter.prune(net, len(adapter.layers(net)), drop_head=True)
    return net


def streams_from_files(model: ModelSpec, base_dir: Path) -> bool:
    """Whether ``model``'s weights are local safetensors files that gkdc reads tensor by tensor (and row by row)."""
    if model.source_kind == "derived" or model.init.kind != "pretrained":
        return False
    try:
        where, local = _where(model, base_dir)
    except RunError:
        return False
    return local and _has_safetensors(Path(where))


def build_student_partitioned(model: ModelSpec, zero3: dict[str, Any], *, trust_remote_code: bool = False,
                              base_dir: Path = Path("."), allow_pickle: bool = False,
                              rows: torch.Tensor | None = None) -> nn.Module:
    """A student partitioned while it is built (ZeRO-3): transformers initialises each module gathered on rank 0
    and re-partitions it, so no rank ever holds the whole model. A pretrained (hub / local) student is loaded
    by transformers' partitioned ``from_pretrained``; a derived or random-init one is built from its config.

    With ``rows`` (a compressed vocabulary's kept ids, in new-row order) a pretrained student from local
    safetensors is built at ``len(rows)`` vocabulary rows from its folder's config and streamed from its files:
    each rank reads its partition of every tensor, and of the embedding / head only the kept rows' bytes (the
    values of loading whole and then ``compress_student``). Other pretrained students need ``rows`` None.
    """
    from runtime import engine as eng

    if rows is not None and model.init.kind == "pretrained":
        if not streams_from_files(model, base_dir):
            raise RunError(f"model '{model.name}': a compressed vocabulary is read row by row from local "
                           f"safetensors files only")
        where = Path(_where(model, base_dir)[0])
        _check_weights(model, where, allow_pickle)
        cfg = _pretrained_config(model, str(where), trust_remote_code)
        cfg.vocab_size = int(rows.numel())
        with eng.zero3_build(zero3):
            net = _from_config(model, trust_remote_code, cfg)
        # a tensor the files lack (a new classification head) keeps its init, as from_pretrained leaves it
        load_weights(net, where, model.name, strict=model.head.kind != "classify", rows=rows)
        _pad_for_classify(net)
        return net.train(True).requires_grad_(True)
    if model.source_kind != "derived" and model.init.kind == "pretrained":
        net = _from_pretrained(model, base_dir, trust_remote_code, allow_pickle, zero3=zero3)
        _pad_for_classify(net)
        return net.train(True).requires_grad_(True)
    with eng.zero3_build(zero3):
        net = _from_config(model, trust_remote_code)
    _pad_for_classify(net)
    net.train(True)
    return net.requires_grad_(True)


def named_tensors(net: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every state-dict entry of ``net`` as (key, parameter or buffer), tied parameters under each of their keys;
    partitioned ZeRO-3 parameters stay partitioned (nothing is gathered)."""
    out = [(k, p) for k, p in net.named_parameters(remove_duplicate=False)]
    for prefix, module in net.named_modules(remove_duplicate=False):
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                out.append((f"{prefix}.{name}" if prefix else name, buf))
    return out


def load_weights(net: nn.Module, where: Path, name: str, *, strict: bool = True,
                 rows: torch.Tensor | None = None) -> int:
    """Stream weights from the safetensors folder or file ``where`` into ``net``, tensor by tensor: a ZeRO-3
    parameter receives only this rank's partition (read from its byte range of the file), any other tensor its
    whole value. Keys may lack the base model's prefix (files saved from a bare base model). Returns tensors read.

    With ``rows`` (kept ids of a compressed vocabulary) ``net``'s vocabulary-indexed tensors have ``len(rows)``
    rows and take those rows of the files' full-vocabulary ones, read row by row (never the whole table).
    """
    from runtime import engine as eng
    from runtime.weights import WeightFiles

    files = WeightFiles(where)
    prefix = getattr(net, "base_model_prefix", "")
    by_row = set() if rows is None else {id(p) for p in vocab_params(net, int(rows.numel()))}
    done: set[int] = set()
    missing: list[str] = []
    keys_of: dict[int, list[str]] = {}
    for key, tensor in named_tensors(net):
        keys_of.setdefault(id(tensor), []).append(key)
    try:
        for key, tensor in named_tensors(net):
            if id(tensor) in done:
                continue
            found = _file_key(key, prefix, files)
            if found is None:
                if key == keys_of[id(tensor)][-1]:  # none of a tied tensor's keys is in the files
                    missing.append(key)
                continue
            stored = files.tensors[found]
            if id(tensor) in by_row and stored.shape[1:] == eng.full_shape(tensor)[1:]:  # map order, always
                eng.load_partition(tensor, lambda start, out, k=found: files.read_rows_flat(k, rows, start, out),
                                   lambda k=found, t=tensor: files.read_rows(k, rows, t.dtype))
                done.add(id(tensor))
                continue
            if stored.shape != eng.full_shape(tensor):
                raise RunError(f"model '{name}': tensor {key} has shape {eng.full_shape(tensor)} in the model but "
                               f"{stored.shape} in {stored.file}")
            eng.load_partition(tensor, lambda start, out, k=found: files.read_flat(k, start, out),
                               lambda k=found, t=tensor: files.read(k, t.dtype))
            done.add(id(tensor))
    finally:
        files.close()
    if strict and missing:
        raise RunError(f"model '{name}': {len(missing)} tensors are not in {where} (e.g. {missing[:3]}); "
                       f"are these the weights of this model?")
    return len(done)


def input_embeddings_from_files(model: ModelSpec, base_dir: Path, *, trust_remote_code: bool = False) -> torch.Tensor:
    """``model``'s input embedding table (fp32, the values its loaded model holds) read from its local
    safetensors files: that one tensor, the model never built (its key comes from a meta-device instance)."""
    from runtime.weights import WeightFiles

    where = _where(model, base_dir)[0]
    with torch.device("meta"):
        skeleton = _from_config(model, trust_remote_code, _pretrained_config(model, where, trust_remote_code))
    weight = skeleton.get_input_embeddings().weight
    keys = [k for k, p in skeleton.named_parameters(remove_duplicate=False) if p is weight]
    files = WeightFiles(Path(where))
    try:
        prefix = getattr(skeleton, "base_model_prefix", "")
        found = next((f for f in (_file_key(k, prefix, files) for k in keys) if f is not None), None)
        if found is None:
            raise RunError(f"model '{model.name}': its input embeddings ({keys[0]}) are not in {where}")
        # the dtype the loaded model holds them in, then fp32, as the remap reads a built model's
        return files.read(found, DTYPES[model.dtype]).float()
    finally:
        files.close()


def _file_key(key: str, prefix: str, files: Any) -> str | None:
    if key in files:
        return key
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in files:
        return key[len(prefix) + 1:]
    if prefix and f"{prefix}.{key}" in files:
        return f"{prefix}.{key}"
    return None


def write_weights(net: nn.Module, path: Path, *, rank: int, dtype: torch.dtype | None = torch.float32) -> Path | None:
    """All ranks: ``net``'s full weights to one safetensors file, gathered one tensor at a time and written by
    rank 0 as it goes (no rank holds more than one gathered tensor). Returns the path on rank 0."""
    from runtime import engine as eng
    from runtime.weights import StreamWriter

    tensors = named_tensors(net)
    writer = None
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = [(k, _out_dtype(t, dtype), eng.full_shape(t)) for k, t in tensors]
        writer = StreamWriter(path, entries)
    try:
        for key, value in eng.gathered_tensors(tensors, dtype):
            if writer is not None:
                writer.write(key, value)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return writer.close() if writer is not None else None


def _out_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def export_student(config: Any, weights: Path, tokenizer: Any, out_dir: Path, vocab_map: VocabMap | None) -> None:
    """Rank 0: an HF folder (config, safetensors, tokenizer [, gkdc_vocab.json]) from a weights file;
    ``from_pretrained`` loads it as is.

    Its ``model.safetensors`` is a hard link to ``weights`` (the stage hand-off file is already a safetensors
    file of the model's state-dict keys), so the run stores the trained weights once; the shared file is made
    read-only, because a tool that rewrote it in place would change the run's checkpoint too (gkdc itself only
    replaces files). Where a link cannot be made (another file system), the weights are copied one tensor at
    a time into sharded files instead, and so is a model larger than one shard (``SHARD_BYTES``): the Hub's
    convention of shards of at most a few GB is kept for large models, at the price of a second copy.
    """
    from runtime.weights import INDEX_FILE, SHARD_BYTES, WeightFiles, write_sharded

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("model*.safetensors"), out_dir / INDEX_FILE]:  # an earlier export of this folder
        old.unlink(missing_ok=True)
    files = WeightFiles(weights)
    try:
        one_shard = Path(weights).is_file() and Path(weights).stat().st_size <= SHARD_BYTES
        if not (one_shard and _shared(Path(weights), out_dir / "model.safetensors")):
            entries = [(k, s.dtype, s.shape) for k, s in files.tensors.items()]
            write_sharded(out_dir, entries, ((k, files.read(k)) for k, _, _ in entries))
        config.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    except (OSError, ValueError, RuntimeError) as exc:
        raise RunError(f"cannot save the student to {out_dir}: {exc}") from None
    finally:
        files.close()
    if vocab_map is not None:
        (out_dir / VOCAB_FILE).write_text(vocab_map.to_json(), encoding="utf-8")


def _shared(weights: Path, target: Path) -> bool:
    """``target`` a read-only hard link to the one file ``weights``; False where none can be made."""
    import os
    import stat

    if not weights.is_file():
        return False  # a sharded folder: copied
    try:
        os.link(weights, target)
    except OSError:
        return False
    os.chmod(target, stat.S_IMODE(os.stat(target).st_mode) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return True
