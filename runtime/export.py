"""The end of a run: every trained model saved once, in Hugging Face format, and the list of what was saved.

``models/<name>`` holds each model a stage trained (its weights after the last stage that trained it);
``models/<name>-best`` the weights of a ``keep_best`` stage's best held-out evaluation. ``student`` is a link to
the run's student: the model of the last stage that reads a teacher (a distilled model, never a baseline trained
without one), or the last stage's when no stage reads a teacher.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from gkdlang.spec import Spec
from runtime import engine as eng
from runtime.evalloop import best_record, best_weights_path

STUDENT_LINK = "student"


@dataclass(frozen=True)
class Saved:
    name: str
    path: Path
    what: str
    best_of: int | None = None
    """Index of the stage whose best weights these are (None: the model's final weights)."""


def the_student(spec: Spec) -> tuple[str, str]:
    """(model, stage): the run's student (module docstring)."""
    distilling = [st for st in spec.stages if st.teachers]
    stage = (distilling or spec.stages)[-1]
    return stage.students[0], stage.name


def exported_config(model: Any) -> Any:
    """``model``'s config naming its own class in ``architectures`` (as ``save_pretrained`` would): a derived
    student inherits its base's list, e.g. ``BertForMaskedLM`` for a classifier, and ``from_pretrained`` (and
    ``gkdc eval``) would then load it with the wrong head."""
    config = model.config
    config.architectures = [type(model).__name__]
    return config


def save_models(env: Any, trained: Mapping[str, Path], exports: Mapping[str, tuple]) -> list[Saved]:
    """Rank 0 writes; every rank returns the list (``exports``: name -> (config, tokenizer, vocab map))."""
    from runtime import models as M

    spec = env.plan.spec
    out = Path(env.out_dir)
    last_stage = {st.students[0]: st.name for st in spec.stages}
    saved = [Saved(name, out / "models" / name, f"after stage {last_stage[name]}") for name in exports]
    for index, st in enumerate(spec.stages):
        best = best_record(out, index) if st.keep_best is not None else None
        if best is not None and best_weights_path(out, index).exists():
            saved.append(Saved(best["model"], out / "models" / f"{best['model']}-best",
                               f"best {best['metric']} {best['value']:.4g} at stage {st.name} step {best['step']}", index))
    student, stage = the_student(spec)
    if env.rank == 0:
        for item in saved:
            config, tokenizer, vocab_map = exports[item.name]
            weights = trained[item.name] if item.best_of is None else best_weights_path(out, item.best_of)
            M.export_student(config, weights, tokenizer, item.path, vocab_map)
        _link(out / STUDENT_LINK, Path("models") / student)
    eng.barrier()
    return saved + [Saved(student, out / STUDENT_LINK, f"the run's student: '{student}' of stage {stage} "
                                                       f"(link to models/{student})")]


def _link(link: Path, target: Path) -> None:
    """``link`` -> ``target`` (relative), replacing an old link or an old copy (runs of earlier gkdc versions)."""
    import shutil

    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    os.symlink(target, link, target_is_directory=True)


def saved_lines(saved: list[Saved]) -> list[str]:
    width = max((len(str(s.path)) for s in saved), default=0)
    return ["saved models:"] + [f"  {str(s.path):<{width}}  {s.name}: {s.what}" for s in saved]
