"""The model catalog: a catalog key, hub id or alias -> the model's Hugging Face ``config.json`` dict.

Each ``*.json`` file in this package holds the real ``config.json`` of one widely used model, plus a
``"_catalog"`` entry ``{"hub_id": ..., "aliases": [...]}``. The catalog lets ``gkdc check`` and
``gkdc plan`` know real architectures with no network. The catalog key is the file name without ``.json``.

Gives: ``lookup(name) -> dict | None`` (a fresh copy of the config, without ``_catalog``),
``names() -> list[str]`` (catalog keys), ``suggest(name) -> str | None`` (closest known name),
``entry(name) -> CatalogEntry | None`` (key, hub id, aliases and config together).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from gkdlang.diagnostics import closest

CATALOG_META_KEY = "_catalog"


class CatalogError(RuntimeError):
    """A catalog file that is broken: a bug in gkdc, not a user error."""


@dataclass(frozen=True)
class CatalogEntry:
    """One catalog model."""

    key: str
    hub_id: str | None
    """None for synthetic test configs that have no weights on any hub."""
    aliases: tuple[str, ...]
    config: dict[str, Any] = field(repr=False, hash=False, compare=False)


def _load_entry(key: str, text: str) -> CatalogEntry:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogError(f"catalog file {key}.json is not valid JSON: {exc}") from exc
    meta = raw.pop(CATALOG_META_KEY, None)
    if not isinstance(meta, dict) or "hub_id" not in meta or not isinstance(meta["hub_id"], (str, type(None))):
        raise CatalogError(f"catalog file {key}.json lacks a '{CATALOG_META_KEY}' entry with 'hub_id'")
    return CatalogEntry(key=key, hub_id=meta["hub_id"], aliases=tuple(meta.get("aliases", ())), config=raw)


@lru_cache(maxsize=1)
def _entries() -> dict[str, CatalogEntry]:
    """All catalog entries by key, loaded once."""
    out: dict[str, CatalogEntry] = {}
    for item in sorted(resources.files(__package__).iterdir(), key=lambda p: p.name):
        if item.name.endswith(".json"):
            key = item.name[: -len(".json")]
            out[key] = _load_entry(key, item.read_text(encoding="utf-8"))
    return out


def _names_of(ent: CatalogEntry) -> set[str]:
    return {ent.key, *ent.aliases} | ({ent.hub_id} if ent.hub_id else set())


@lru_cache(maxsize=1)
def _index() -> dict[str, str]:
    """Lower-cased key / hub id / alias -> catalog key. A name used twice is a catalog bug."""
    index: dict[str, str] = {}
    for key, ent in _entries().items():
        for name in _names_of(ent):
            low = name.lower()
            if index.get(low, key) != key:
                raise CatalogError(f"catalog name '{name}' is used by both {index[low]} and {key}")
            index[low] = key
    return index


def entry(name: str) -> CatalogEntry | None:
    """The catalog entry for a key, hub id or alias (case-insensitive), or None."""
    key = _index().get(name.strip().lower())
    return None if key is None else _entries()[key]


def lookup(name: str) -> dict[str, Any] | None:
    """The HF config dict for a key, hub id or alias (case-insensitive); a copy the caller may change."""
    ent = entry(name)
    return None if ent is None else copy.deepcopy(ent.config)


def names() -> list[str]:
    """All catalog keys, sorted."""
    return sorted(_entries())


def all_names() -> list[str]:
    """Every name lookup accepts (keys, hub ids, aliases), sorted."""
    out: set[str] = set()
    for ent in _entries().values():
        out.update(_names_of(ent))
    return sorted(out)


def suggest(name: str) -> str | None:
    """The closest known name to ``name`` for a did-you-mean hint, or None if nothing is close.

    Matching is case-insensitive and also tries the part after an ``org/`` prefix, so both
    ``meta-llama/llama-2-7b`` and ``gpt-2`` find a suggestion.
    """
    lowered = {c.lower(): c for c in all_names()}
    query = name.strip().lower()
    # the whole name first (hub ids), then the part after "org/" (a wrong org or a bare model name)
    for q in [query] + ([query.split("/", 1)[1]] if "/" in query else []):
        match = closest(q, lowered)
        if match:
            return lowered[match]
    return None
