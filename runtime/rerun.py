"""Running a run folder again: ``--resume`` (where it restarts, said in one line), ``--overwrite`` (the run's own
outputs removed first), and the refusal of a folder that already holds a run when neither is given."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from planner.plan import Plan
from runtime import checkpoint as ckpt
from runtime.errors import RunError

#: what a run writes in its folder (``--overwrite`` removes these and nothing else: a plan.json, the lock and any
#: file of the user's stay)
RUN_OUTPUTS = ("checkpoints", "models", "student", "best", "ranks", "tensorboard", "wandb", "metrics.jsonl",
               "loss_curve.png", "run.log", "eval.json")


def clear_outputs(out_dir: Path) -> list[str]:
    """``--overwrite``: remove a previous run's outputs from ``out_dir``; returns the names removed."""
    removed = []
    for name in RUN_OUTPUTS:
        path = Path(out_dir) / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        removed.append(name)
    return removed


def starting_point(plan: Plan, out_dir: Path, resume: bool, rank: int = 0) -> ckpt.Progress | None:
    state = ckpt.read_progress(out_dir)
    if not resume:
        if state is not None:
            raise RunError(f"{out_dir} already holds a run; pass --resume to continue it, --overwrite to start it "
                           "again from scratch, or choose another --out")
        return None
    log = logging.getLogger("gkdc")
    if state is None:
        if rank == 0:
            log.info(f"resume: {out_dir} holds no complete checkpoint yet; starting from the beginning")
        return None
    if state.spec_hash != plan.spec_hash:
        old = ckpt.read_spec(out_dir)
        if old is None:
            raise RunError(f"the checkpoints in {out_dir} were written for a different spec, and the folder does "
                           "not record which; start the run again with another --out")
        allowed, refused = ckpt.spec_changes(old, plan.spec.model_dump(mode="json"))
        if refused:
            raise RunError(f"the checkpoints in {out_dir} were written for another spec and cannot continue with "
                           f"this one: {'; '.join(refused[:4])}" + (f" (+{len(refused) - 4} more)" if len(refused) > 4
                                                                    else "") +
                           ". A resume may change optimizer, schedule, loss and evaluation settings only; start the "
                           "run again with another --out")
        if rank == 0:
            log.info(f"note: resuming {state.stage_name}:{state.step} with a changed spec: {'; '.join(allowed)}")
    if rank == 0:
        log.info(resume_line(plan, state))
    return state


def resume_line(plan: Plan, state: ckpt.Progress) -> str:
    """Where a resume restarts: stage (its number of all), step of its total, and the checkpoint it loads."""
    stages = plan.spec.stages
    of = f"of {len(stages)}"
    if state.done:
        if state.stage + 1 >= len(stages):
            return f"resume: every stage is done (last: {state.stage_name}); saving the models again"
        nxt = stages[state.stage + 1].name
        return (f"resume: stage {state.stage_name} is done; restarting at stage {nxt} ({state.stage + 2} {of}), "
                f"step 0, from its weights in {ckpt.checkpoint_dir(Path('.')).name}/")
    total = plan.stages[state.stage].total_steps
    total_text = f" of {total}" if total > 0 else ""
    return (f"resume: restarting stage {state.stage_name} ({state.stage + 1} {of}) after step {state.step}"
            f"{total_text}, from checkpoint {state.tag}")
