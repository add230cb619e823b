"""Check time: a local teacher folder holds the weights of the heads the spec reads (no torch: safetensors headers).

A ``BertModel`` folder has no MLM head; used for ``kl(t.logits, ...)`` it would load with a randomly initialised
head and the student would learn noise. ``gkdc check`` reads the tensor names from the header of every
``*.safetensors`` file in the folder and refuses a teacher whose read signals need a head the folder lacks
(``missing-weights``). ``gkdc run`` then refuses any teacher weight that transformers reports missing.

The header reader is ours (ten lines): a safetensors file starts with an 8-byte little-endian length and that
many bytes of JSON naming every tensor, so the names need neither torch nor numpy.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable

from gkdlang.spec import ModelSpec, Node, OpNode, SignalNode, StageSpec

#: a header longer than this is not a safetensors header (the format caps it at 100 MB)
MAX_HEADER = 100 * 2**20

#: family -> tensor-name fragments of the LM head (when not tied to the embedding) and of the classifier
LM_HEAD = {"bert": ("cls.predictions.",), "roberta": ("lm_head.",)}
UNTIED_LM_HEAD = ("lm_head.",)
CLASSIFIER = {"bert": ("classifier.",), "roberta": ("classifier.",)}
SCORE_HEAD = ("score.",)


class HeaderError(Exception):
    pass


def tensor_names(file: Path) -> set[str]:
    """Tensor names in one safetensors file's header."""
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise HeaderError(f"{file.name} is shorter than a safetensors header")
        (size,) = struct.unpack("<Q", raw)
        if size > MAX_HEADER:
            raise HeaderError(f"{file.name} announces a {size:,}-byte header: not a safetensors file")
        try:
            header = json.loads(fh.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HeaderError(f"{file.name} has no readable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{file.name} has no readable safetensors header")
    return {k for k in header if k != "__metadata__"}


def folder_names(folder: Path) -> set[str] | None:
    """Tensor names over every ``*.safetensors`` of ``folder``; None when it has none (a pickle-only folder is
    the runtime's to refuse or, with --allow-pickle, to load)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for f in files:
        names |= tensor_names(f)
    return names


def read_kinds(stages: Iterable[StageSpec]) -> dict[str, set[str]]:
    """model -> signal kinds that some stage's loss reads from it."""
    out: dict[str, set[str]] = {}
    for st in stages:
        stack: list[Node] = [n for t in st.loss for n in (t.target, t.pred)]
        while stack:
            node = stack.pop()
            if isinstance(node, SignalNode):
                if node.model is not None:
                    out.setdefault(node.model, set()).add(node.kind)
            elif isinstance(node, OpNode):
                stack.extend(node.inputs)
    return out


def missing_head(model: ModelSpec, names: set[str]) -> str | None:
    """The declared head (``head: lm``, the default, or ``classify(n)``) the folder lacks, or None. The runtime
    loads the declared head whatever the spec reads, and refuses a teacher with missing weights, so the check
    asks for the same (a folder with no head is declared ``head: none``)."""
    family = model.arch.family

    def has(fragments: tuple[str, ...]) -> bool:
        return any(f in n for n in names for f in fragments)

    if model.head.kind == "lm":
        need = LM_HEAD.get(family) or (UNTIED_LM_HEAD if not model.arch.tie_word_embeddings else ())
        if need and not has(need):
            return f"language-model head (no tensor named {need[0]}*)"
    if model.head.kind == "classify":
        need = CLASSIFIER.get(family, SCORE_HEAD)
        if not has(need):
            return f"classification head (no tensor named {need[0]}*)"
    return None
