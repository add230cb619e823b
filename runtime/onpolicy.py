"""The batches of an on-policy stage (``generate:``, issue 17) and their measurements.

``wrap(env, live, models, batches, start)`` returns the stage's micro-batch iterator unchanged for a stage without
``generate``; otherwise an ``OnPolicyBatches`` that, per optimizer step,

- draws whether the step is on-policy: ``uniform(seed, stage, step) < lmbda`` (``step_uniform``: a pure function of
  the stage's seed and the step, the same on every rank and on a resumed run);
- on-policy: picks this rank's prompts (a function of seed, step, micro-batch and rank), lets the student
  (the DeepSpeed engine's module, ``synced`` under ZeRO-3) sample their continuations (runtime/generation.py,
  sampler seeded from the same four numbers) and yields them as the micro-batch, whose loss reads the generated
  tokens only (``loss_mask``); off-policy steps yield the stage's data (teacher-forced) or, with ``seq_kd``, the
  teacher's continuations of the prompts.

The data iterator is consumed on every micro-batch whatever the draw, so the data position stays a function of
the step and a resumed run sees what the uninterrupted one saw; nothing here needs checkpointing.

Measurements (``step_record``, logged as the step record's ``onpolicy`` entry and under TensorBoard's
``onpolicy/``): whether the step was on-policy, the generated sequences' mean length, generation tokens/s, the
per-token reverse KL ``KL(student || teacher)`` at the student's sampled positions (exact over the vocabulary,
from the sampler's logits and the teacher's scoring pass), and the step's wall time split into ``generation``,
``teacher`` (its scoring forward) and ``training`` (the rest: student forward, backward, optimizer).
"""

from __future__ import annotations

import random
import time
from typing import Any, Iterator

import torch

from planner.generation import prompt_len
from runtime import generation as G
from runtime.chunked import HeadLogits
from runtime.errors import RunError

_GEN_SALT = 0x6F6E706F6C  # separates the generation seeds from the data's MLM seeds


def step_uniform(seed: int, index: int, step: int) -> float:
    """A uniform [0, 1) number of (seed, stage index, step): the on-policy draw, identical on every rank."""
    from runtime.data import _mix

    # _mix is a seed, not a uniform number (its low bits barely move the high ones): Mersenne Twister's
    # seeding spreads it
    return random.Random(_mix(seed, _GEN_SALT, index, step)).random()


def sample_seed(seed: int, index: int, step: int, micro: int, rank: int) -> int:
    from runtime.data import _mix

    return _mix(seed, _GEN_SALT + 1, index, step, micro, rank)


class _Quiet:
    """The observer of a stage that does not generate: every hook is a no-op."""

    def teacher_done(self, inputs, signals, started: float) -> None:
        return None

    def step_record(self, seconds: float) -> dict[str, Any]:
        return {}


def observer(batches: Any) -> Any:
    return batches if isinstance(batches, OnPolicyBatches) else _Quiet()


def wrap(env: Any, live: Any, models: Any, batches: Iterator, start: int) -> Iterator:
    if live.stage.generate is None:
        return batches
    return OnPolicyBatches(env, live, models, batches, start)


def _hf(model: Any) -> Any:
    inner = getattr(model, "module", model)
    return getattr(inner, "student", inner)


class OnPolicyBatches:
    """Iterator of ``{"teacher": batch, "student": batch}`` micro-batches (module docstring)."""

    def __init__(self, env: Any, live: Any, models: Any, batches: Iterator, start: int) -> None:
        from runtime import cache
        from runtime.evalloop import split_ids
        from runtime.stagekit import SEED

        stage, spec = live.stage, env.plan.spec
        self.settings = stage.generate
        if models.vocab_maps:
            raise RunError(f"stage '{stage.name}': on-policy generation with a compressed vocabulary is not supported")
        if any(isinstance(t, cache.CachedTeacher) for t in live.teachers.values()):
            raise RunError(f"stage '{stage.name}': an offline (cached) teacher cannot score generated sequences")
        if self.settings.seq_kd and self.settings.lmbda < 1 and not live.teachers:
            raise RunError(f"stage '{stage.name}': seq_kd needs a teacher to generate, and the plan runs none (the "
                           "planner drops a teacher the loss does not read)")
        self.live, self.inner, self.tokenizer = live, batches, models.tokenizer
        self.seed, self.index, self.rank = live.data.seed, live.index, env.rank
        self.accum = live.engine.gradient_accumulation_steps()
        self.k, self.start = 0, start
        data = spec.data[self.settings.prompts]
        # at most the prompts' seq_len (the stage's own when they are its data), as the checker and the planner
        # take it (planner.generation.prompt_len): a sequence is at most that plus max_new_tokens
        prompts = G.prompt_rows(data, env.base_dir, self.tokenizer, prompt_len(spec, stage))
        train_ids, _ = split_ids(len(prompts), data.split, data.name, SEED)  # held-out prompts stay unseen
        self.prompts = prompts if train_ids is None else [prompts[i] for i in train_ids]
        zero = getattr(live.engine, "zero_optimization_stage", lambda: 0)()
        self.synced = zero == 3 and env.world > 1
        self.pad = G._pad_id(self.tokenizer)
        self._reset()

    def _reset(self) -> None:
        self.m = {"generation": 0.0, "teacher": 0.0, "gen_tokens": 0, "sequences": 0, "rkl_sum": 0.0,
                  "rkl_tokens": 0, "on_policy": 0}
        self._logits: torch.Tensor | None = None
        self._lengths: list[int] = []

    def __iter__(self) -> "OnPolicyBatches":
        return self

    def mode(self, step: int) -> str:
        """``student`` (on-policy), ``teacher`` (seq_kd) or ``data`` (teacher-forced)."""
        if step_uniform(self.seed, self.index, step) < self.settings.lmbda:
            return "student"
        return "teacher" if self.settings.seq_kd else "data"

    def pick(self, step: int, micro: int, b: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.index, step, micro, self.rank) % (1 << 62))
        order = torch.randint(len(self.prompts), (b,), generator=gen).tolist()
        return [self.prompts[i] for i in order]

    def __next__(self) -> dict[str, dict[str, torch.Tensor]]:
        inputs = next(self.inner)  # always consumed: the data position stays a function of the step
        step, micro = self.start + self.k // self.accum, self.k % self.accum
        self.k += 1
        mode = self.mode(step)
        self._logits = None
        if mode == "data":
            return inputs
        device = inputs["student"]["input_ids"].device
        prompts = self.pick(step, micro, inputs["student"]["input_ids"].shape[0])
        model = _hf(self.live.engine) if mode == "student" else _hf(next(iter(self.live.teachers.values())))
        out = G.sample(model, prompts, self.settings, self.tokenizer, seed=sample_seed(self.seed, self.index, step,
                       micro, self.rank), synced=self.synced, keep_logits=mode == "student")
        self.m["generation"] += out.seconds
        self.m["gen_tokens"] += sum(out.lengths)
        self.m["sequences"] += len(prompts)
        self.m["on_policy"] = int(mode == "student")
        self._logits, self._lengths = out.logits, out.lengths
        batch = G.batch_of(out, self.pad, device)
        return {"teacher": batch, "student": dict(batch)}

    def teacher_done(self, inputs: dict, signals: dict, started: float) -> None:
        """After the teacher's scoring pass of a micro-batch: its time, and the reverse KL of the student's samples."""
        if inputs["student"]["input_ids"].is_cuda:  # the teacher's kernels are queued: wait for them to count them
            torch.cuda.synchronize()
        self.m["teacher"] += time.perf_counter() - started
        if self._logits is None or not sum(self._lengths):
            return
        keep = inputs["student"]["loss_mask"]
        for captured in signals.values():
            t = captured.signals.get(("logits", None)) if hasattr(captured, "signals") else None
            if t is None:
                continue
            rows = (HeadLogits(t.hidden[keep], t.weight, t.bias).materialise() if isinstance(t, HeadLogits)
                    else t[keep]).float()
            q = G.generated_rows(self._logits, self._lengths).to(rows.device)
            if q.shape != rows.shape:
                return  # a teacher of another vocabulary width: no exact reverse KL
            lq, lp = torch.log_softmax(q, -1), torch.log_softmax(rows, -1)
            self.m["rkl_sum"] += float((lq.exp() * (lq - lp)).sum())
            self.m["rkl_tokens"] += int(q.shape[0])
            return

    def step_record(self, seconds: float) -> dict[str, Any]:
        m = self.m
        record = {"on_policy": m["on_policy"], "generation_seconds": m["generation"],
                  "teacher_seconds": m["teacher"],
                  "training_seconds": max(0.0, seconds - m["generation"] - m["teacher"])}
        if m["sequences"]:
            record["mean_generated_length"] = m["gen_tokens"] / m["sequences"]
            record["generation_tokens_per_second"] = m["gen_tokens"] / max(m["generation"], 1e-9)
        if m["rkl_tokens"]:
            record["reverse_kl_per_token"] = m["rkl_sum"] / m["rkl_tokens"]
        self._reset()
        return {"onpolicy": record}
