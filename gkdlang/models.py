"""Model sources -> HF config dicts, with no network and no transformers.

Takes the string of an ``hf("...")`` model source and the directory of the spec file. Gives a
``ResolvedSource``: the ``config.json`` of a local directory (relative to the spec's directory, or
absolute), else the ``config.json`` of that hub id in the local Hugging Face cache (``HF_HUB_CACHE``, or
``HF_HOME``/hub, read through huggingface_hub as transformers would find it offline: ``refs/main`` ->
``snapshots/<sha>/config.json``), else the catalog's copy of a well-known model's config (by key, hub id or
alias: the fallback for planning without files). Anything else raises ``SourceError(message, hint)``:
``gkdc check`` never downloads configs, so an unknown hub id is an error with a did-you-mean hint (over the
catalog and the cached models) rather than a silent network fetch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gkdlang import catalog


class SourceError(ValueError):
    """A model source gkdc cannot resolve; ``message`` and ``hint`` go into a ``model-source`` diagnostic."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class ResolvedSource:
    """Where a model's config came from, and the config itself."""

    kind: Literal["local", "hub", "catalog"]
    config: dict[str, Any] = field(repr=False, hash=False)
    path: str | None
    """Absolute local directory for ``local``; the cached snapshot folder for ``hub``; None for ``catalog``."""
    key: str | None = None
    """Catalog key for ``catalog`` (e.g. ``"llama-2-7b"``); None for ``local``."""


def read_config(config_file: Path) -> dict[str, Any]:
    """Read one config.json; SourceError for unreadable files, invalid JSON or a non-object."""
    try:
        text = config_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read {config_file}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(
            f"{config_file} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
            "fix or re-download the model's config.json",
        ) from exc
    if not isinstance(data, dict):
        raise SourceError(f"{config_file} holds a JSON {type(data).__name__}, not an object of config keys")
    return data


def _local_dir(source: str, base_dir: Path) -> Path | None:
    """The local directory a source names, if one exists (``~`` expanded, relative to base_dir)."""
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    return path.resolve() if path.is_dir() else None


def _looks_like_path(source: str) -> bool:
    # hub ids are "org/name"; anything starting like a file path was meant as a local directory
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def resolve_source(source: str, base_dir: Path) -> ResolvedSource:
    """Resolve ``hf("<source>")``: local directory with config.json, else catalog, else SourceError."""
    source = source.strip()
    if not source:
        raise SourceError("empty model source in hf(\"\")", "give a local model directory or a catalog model id")
    local = _local_dir(source, base_dir)
    if local is not None:
        config_file = local / "config.json"
        if not config_file.is_file():
            raise SourceError(f"local model directory {local} has no config.json",
                              "point hf(...) at a directory saved with save_pretrained()")
        return ResolvedSource(kind="local", config=read_config(config_file), path=str(local))
    if not _looks_like_path(source):
        cached = hub_snapshot(source)
        if cached is not None:
            return ResolvedSource(kind="hub", config=read_config(cached / "config.json"), path=str(cached))
    ent = catalog.entry(source)
    if ent is not None:
        return ResolvedSource(kind="catalog", config=catalog.lookup(ent.key) or {}, path=None, key=ent.key)
    raise _unknown(source, base_dir)


# ---------------------------------------------------------------- the local Hugging Face cache


def _hub_cache() -> Path:
    """The hub cache folder huggingface_hub uses (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of model ``repo_id`` at its ``main`` revision that holds a config.json, or None.

    huggingface_hub's own lookup (``try_to_load_from_cache``) does the resolving; importing it costs ~0.3 s
    (its HTTP client), so a cache with no folder for the repo at all is ruled out first with the documented
    folder name (``models--org--name``), and specs naming catalog models check as fast as before."""
    if not (_hub_cache() / ("models--" + repo_id.replace("/", "--"))).is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=_hub_cache())
    except (HFValidationError, OSError, ValueError):
        return None
    return Path(found).parent if isinstance(found, str) else None


def cached_models() -> list[str]:
    """Ids of the models in the local hub cache (huggingface_hub's ``scan_cache_dir``); [] without a cache."""
    if not _hub_cache().is_dir():
        return []
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(_hub_cache())
    except (OSError, ValueError):  # CacheNotFound is a FileNotFoundError
        return []
    return sorted(r.repo_id for r in info.repos if r.repo_type == "model")


#: Catalog keys named in the hint when nothing is close to what the user wrote.
_EXAMPLES = ("gpt2", "bert-base-uncased", "llama-3-8b", "qwen2.5-7b", "smollm2-135m")


def _unknown(source: str, base_dir: Path) -> SourceError:
    where = Path(base_dir) / Path(source).expanduser()
    if _looks_like_path(source):
        message = f"model directory '{source}' does not exist (looked for {where.resolve()})"
    else:
        message = (f"'{source}' is neither a local directory (relative to {Path(base_dir).resolve()}), "
                   f"nor a model in the local Hugging Face cache ({_hub_cache()}), nor in gkdc's catalog; gkdc "
                   f"never downloads configs at check time")
    cached = [] if _looks_like_path(source) else cached_models()
    from gkdlang.diagnostics import closest

    lowered = {c.lower(): c for c in cached}
    near_cached = closest(source.lower(), lowered, cutoff=0.7)
    guess = catalog.suggest(source)
    if near_cached is not None:
        hint = f"did you mean '{lowered[near_cached]}' (in the local Hugging Face cache)?"
    elif guess is not None:
        hint = f"did you mean '{guess}'?"
    else:
        hint = ("download the model first (`hf download <id>` fills the cache gkdc reads; HF_HOME / HF_HUB_CACHE "
                f"say where it is), or write hf(\"<dir>\") for a local folder, or use a catalog model "
                f"({len(catalog.names())} known, e.g. " + ", ".join(_EXAMPLES) + ")")
    return SourceError(message, hint)
