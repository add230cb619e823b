"""Held-out evaluation during training: the data ``split``, the metrics every ``eval_every`` steps and at a stage's
end, and the best student kept (``keep_best``).

Split: the tokenised examples of a data source (rows, or packed blocks) are ordered by a permutation seeded from
the run's seed and the data source's name; the first ``planner.evalcost.held_out(n, split)`` are held out, the
rest are the only examples the sampler draws. Every rank computes the same split, every stage reading the same
data holds out the same examples, and a rerun or a resume holds out the same ones. Example ids keep their index in
the whole data, so an offline teacher's cache (written over all of it) serves both parts.

Metrics (``Evaluator.evaluate``), on every held-out example once, sharded over the ranks and summed:

- language models: ``loss``, the mean next-token (causal) or masked-token (masked LM; the masks are drawn from a
  fixed seed, the same at every evaluation) cross-entropy over the targets, and ``perplexity = exp(loss)``; a
  compressed-vocabulary student is scored over its kept rows;
- classifiers: ``loss`` (cross-entropy on the labels) and ``accuracy``;
- ``distill``: the stage's distillation loss (its active terms, weighted as in training) on the held-out batches,
  with its ``distill_terms``; measured when the stage reads a teacher and has no interventions (they change the
  forward pass step by step).

Evaluation runs under ``torch.no_grad`` in eval mode (no dropout) inside ``torch.random.fork_rng``: the training
that follows draws the same random numbers as without it, so a resumed run still ends bit for bit like an
uninterrupted one. Ranks run the same number of forwards (a rank whose share ran out repeats an example with
weight 0), as ZeRO-3's parameter gathers need.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gkdlang.spec import KeepBest
from planner.evalcost import held_out
from planner.plan import CapturePoint, ModelCapture
from runtime import cache
from runtime import engine as eng
from runtime.adapters import capture
from runtime.errors import RunError

BEST_DIR = "best"
_EVAL_SEED = 0x5EED_E7A1


def split_ids(n: int, fraction: float | None, data_name: str, seed: int) -> tuple[list[int] | None, list[int]]:
    """(training ids or None for all, held-out ids), both sorted; deterministic in (seed, data name, n)."""
    held = held_out(n, fraction)
    if held == 0:
        return None, []
    if held >= n:
        raise RunError(f"data '{data_name}': split {fraction:.0%} of {n} example(s) leaves none to train on; lower "
                       "the split or add data")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(data_name.encode()))
    order = torch.randperm(n, generator=gen).tolist()
    return sorted(order[held:]), sorted(order[:held])


@dataclass(frozen=True)
class Best:
    step: int
    value: float


class Evaluator:
    """One stage's held-out evaluation (built by ``for_stage``; None when its data holds nothing out)."""

    def __init__(self, env: Any, live: Any, held: list[int], kind: str, keep: KeepBest | None) -> None:
        self.env, self.live, self.held, self.kind, self.keep = env, live, held, kind, keep
        self.every = live.stage.eval_every
        self.micro = live.data.sampler.micro_batch
        self.distill = bool(live.teachers) and not live.interventions
        self.best = _read_best(env.out_dir, live.index) if keep is not None else None

    @classmethod
    def for_stage(cls, env: Any, live: Any) -> "Evaluator | None":
        held = live.data.held_ids
        if not held:
            return None
        head = env.plan.spec.models[live.student].head
        arch = env.plan.spec.models[live.student].arch
        kind = "classify" if head.kind == "classify" else "mlm" if arch.is_encoder else "causal"
        return cls(env, live, held, kind, live.stage.keep_best)

    def due(self, done: int) -> bool:
        """Evaluate after ``done`` optimizer steps: every ``eval_every`` and at the stage's end."""
        return done == self.live.total or (self.every is not None and done % self.every == 0)

    # ------------------------------------------------------------ one evaluation

    def evaluate(self, done: int) -> dict[str, Any]:
        """Every rank: the metrics after ``done`` steps (logged by rank 0); keeps the best weights if asked."""
        start = time.perf_counter()
        engine = self.live.engine
        module = engine.module
        was_training = module.training
        devices = [engine.device] if engine.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            module.eval()
            try:
                sums, terms = self._sums(done)
            finally:
                module.train(was_training)
        record = self._record(done, sums, terms, time.perf_counter() - start)
        self.env.logger.log_eval(record, self.env.global_step)
        if self.keep is not None:
            self._keep_if_best(done, record)
        return record

    def _shards(self) -> list[tuple[list[int], float]]:
        """This rank's micro-batches of held-out ids, with weight 0 for padding batches (same count on all ranks)."""
        env, micro = self.env, self.micro
        width = micro * env.world
        out = []
        for k in range(0, len(self.held), width):
            mine = self.held[k + env.rank * micro: k + (env.rank + 1) * micro]
            out.append((mine, 1.0) if mine else ([self.held[0]], 0.0))
        return out

    def _sums(self, done: int) -> tuple[torch.Tensor, list[str]]:
        live, data = self.live, self.live.data
        device = live.engine.device
        student = live.engine.module.student
        head_kind = "task_logits" if self.kind == "classify" else "logits"
        cap = ModelCapture(model=live.student, points=[CapturePoint(kind=head_kind)], stop_after_layer=None,
                           needs_head=True)
        # nll sum, targets, correct, examples, distill sum (x examples), then the terms (x examples)
        acc: dict[str, float] = {"nll": 0.0, "targets": 0.0, "correct": 0.0, "examples": 0.0, "distill": 0.0}
        term_sums: dict[str, float] = {}
        active = self._active(done)
        for b, (ids, weight) in enumerate(self._shards()):
            inputs = data.batch_of(ids, _EVAL_SEED + b, device)
            logits = capture(student, inputs["student"], cap, grad=False)[(head_kind, None)]
            n = len(ids) * weight
            if self.kind == "classify" and "labels" not in inputs["student"]:
                pass  # unlabelled data (distillation only): no loss or accuracy of its own
            elif self.kind == "classify":
                labels = inputs["student"]["labels"]
                acc["nll"] += weight * float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
                acc["targets"] += n
                acc["correct"] += weight * float((logits.argmax(-1) == labels).sum())
            else:
                nll, count = _token_nll(logits, inputs["student"]["tokens"])
                acc["nll"] += weight * nll
                acc["targets"] += weight * count
            acc["examples"] += n
            if self.distill:
                total, parts = self._distill(inputs, done, active)
                acc["distill"] += n * total
                for key, value in parts.items():
                    term_sums[key] = term_sums.get(key, 0.0) + n * value
        names = sorted(term_sums)  # the same active terms on every rank
        vector = torch.tensor([*acc.values(), *(term_sums[k] for k in names)], dtype=torch.float64, device=device)
        return eng.all_ranks_sum(vector).cpu(), names

    def _active(self, done: int) -> set[str] | None:
        step = max(done - 1, 0)
        return self.live.graph.active_terms(step / self.live.total, step=step, epoch=self.live.data.epoch_of(step))

    def _distill(self, inputs: dict[str, Any], done: int, active: set[str] | None) -> tuple[float, dict[str, float]]:
        from runtime import interventions as ivs

        live = self.live
        signals = {
            name: model.signals(inputs["teacher"]) if isinstance(model, cache.CachedTeacher)
            else capture(model, inputs["teacher"], live.teacher_caps[name], grad=False)
            for name, model in live.teachers.items()
        }
        step = max(done - 1, 0)
        info = ivs.StepInfo(step, live.data.epoch_of(step), step / live.total, 0, self.env.rank)
        loss, parts = live.engine(inputs["student"], signals, info, active)
        return float(loss.detach()), dict(parts)

    def _record(self, done: int, sums: torch.Tensor, terms: list[str], seconds: float) -> dict[str, Any]:
        nll, targets, correct, examples, distill, *term_values = sums.tolist()
        live = self.live
        record: dict[str, Any] = {"kind": "eval", "stage": live.stage.name, "stage_index": live.index, "step": done,
                                  "examples": int(examples)}
        if targets > 0:  # none: unlabelled data for a classifier, or an encoder without a mask token
            record["loss"] = nll / targets
            if self.kind == "classify":
                record["accuracy"] = correct / targets
            else:
                record["perplexity"] = math.exp(min(record["loss"], 700.0))
                record["targets"] = int(targets)
        if self.distill:
            record["distill"] = distill / max(examples, 1.0)
            record["distill_terms"] = {k: v / max(examples, 1.0) for k, v in zip(terms, term_values)}
        record["seconds"] = round(seconds, 3)
        return record

    # ------------------------------------------------------------ the best student

    def _keep_if_best(self, done: int, record: dict[str, Any]) -> None:
        keep = self.keep
        if keep.metric not in record:  # the checker refuses the cases it can see (unlabelled classifier data)
            measured = [k for k in ("loss", "perplexity", "accuracy", "distill") if k in record]
            raise RunError(f"stage '{self.live.stage.name}': keep_best: {keep.metric} is not measured on its held-out "
                           f"data (measured: {', '.join(measured) or 'nothing'}); choose one of those")
        value = float(record[keep.metric])
        better = self.best is None or (value > self.best.value if keep.mode == "max" else value < self.best.value)
        if not better or not math.isfinite(value):
            return
        from runtime import models as M

        path = best_weights_path(self.env.out_dir, self.live.index)
        path.parent.mkdir(parents=True, exist_ok=True)
        M.write_weights(self.live.engine.module.student, path, rank=self.env.rank)  # every rank gathers
        if self.env.rank == 0:
            from runtime.files import atomic_write

            info = {"stage": self.live.stage.name, "model": self.live.student, "step": done, "metric": keep.metric,
                    "value": value, "weights": path.name}
            atomic_write(path.with_suffix(".json"), json.dumps(info, indent=1))
            self.env.logger.info(f"stage {self.live.stage.name}: best {keep.metric} so far ({value:.4g} at step "
                                 f"{done}); kept in {path}")
        eng.barrier()
        self.best = Best(done, value)


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Summed cross-entropy of ``logits`` [b, s, V] against ``targets`` [b, s] (-100 ignored), a chunk of rows at a
    time so no fp32 copy of all the logits exists."""
    flat = logits.reshape(-1, logits.size(-1))
    tgt = targets.reshape(-1).to(flat.device)
    rows = max(1, (1 << 21) // flat.size(-1))
    total = 0.0
    for i in range(0, flat.size(0), rows):
        total += float(torch.nn.functional.cross_entropy(flat[i:i + rows].float(), tgt[i:i + rows],
                                                         ignore_index=-100, reduction="sum"))
    return total, int((tgt != -100).sum())


def best_weights_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / BEST_DIR / f"stage-{index}.safetensors"


def _read_best(out_dir: Path, index: int) -> Best | None:
    """The best kept by an earlier process of this run (a resume continues comparing against it)."""
    path = best_weights_path(out_dir, index).with_suffix(".json")
    if not path.exists() or not best_weights_path(out_dir, index).exists():
        return None
    info = json.loads(path.read_text())
    return Best(int(info["step"]), float(info["value"]))


def best_record(out_dir: Path, index: int) -> dict[str, Any] | None:
    path = best_weights_path(out_dir, index).with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else None
