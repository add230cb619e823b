"""Recipe overhead: step time of ``runtime.recipe.train_step`` vs a hand-written PyTorch loop, same work.

Both sides train a copy of the same tiny GPT-2 student against the same frozen teacher on the same
batches with the same losses (KL on logits at T=2 over non-pad positions + 0.5 * MSE of a projected
hidden state) and AdamW. The recipe side goes through everything a real run does per step (gates,
capture hooks, the loss graph, a DeepSpeed ZeRO-0 engine, the finite check, metrics bookkeeping); the
hand side calls HF with ``output_hidden_states`` and calls the same loss kernels (``runtime.losses``)
directly, so the ratio measures the recipe's machinery, not the kernels. Steps are interleaved
(recipe, hand, recipe, ...) so machine noise hits both alike; the median ratio is printed.

    python bench/overhead.py [--steps 60] [--batch 8] [--seq 128] [--width 128]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import transformers as tf

from gkdlang.arch import arch_from_config
from gkdlang.spec import LossTerm, LRScheduleSpec, OptimizerSpec, Project, Schedule, SignalNode, Span, StageSpec
from planner.dsconfig import GRADIENT_CLIPPING
from planner.plan import CapturePoint, ModelCapture
from runtime import engine as eng
from runtime import losses as L
from runtime import recipe as R
from runtime.lossgraph import LossGraph
from runtime.metrics import MetricsLogger

SPAN = Span(file="bench", line=1, col=1, end_line=1, end_col=1)
T = 2.0


def models(width: int, vocab: int) -> tuple[tf.GPT2LMHeadModel, tf.GPT2LMHeadModel]:
    torch.manual_seed(0)
    teacher = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_embd=2 * width, n_layer=2, n_head=4,
                                               n_positions=512))
    student = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_embd=width, n_layer=2, n_head=4,
                                               n_positions=512, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    return teacher.eval().requires_grad_(False), student


def terms(d_s: int, d_t: int) -> list[LossTerm]:
    sig = lambda m, k, l=None: SignalNode(model=m, kind=k, layer=l)  # noqa: E731
    proj = Project(inputs=[sig("s", "hidden", 0)], dim_in=d_s, dim_out=d_t, module="p")
    return [
        LossTerm(id="kl", fn="kl", target=sig("t", "logits"), pred=sig("s", "logits"), mask="not pad",
                 options={"T": T}, span=SPAN),
        LossTerm(id="mse", fn="mse", target=sig("t", "hidden", 0), pred=proj, mask="not pad",
                 weight=Schedule(value=0.5), span=SPAN),
    ]


def batches(n: int, batch: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[: batch // 2, seq * 3 // 4 :] = 0
        out.append({"input_ids": torch.randint(0, vocab, (batch, seq), generator=g), "attention_mask": mask})
    return out


class _Data:
    def epoch_of(self, step: int) -> int:
        return 0


def recipe_side(teacher, student, d_s, d_t, batch: int, steps: int, out: Path):
    """A live stage exactly as ``run_stage`` assembles one, with a disabled metrics logger."""
    cap = ModelCapture(model="s", points=[CapturePoint(kind="logits"), CapturePoint(kind="hidden", layer=0)],
                       stop_after_layer=None, needs_head=True)
    dims = {"t": arch_from_config(teacher.config.to_dict()), "s": arch_from_config(student.config.to_dict())}
    graph = LossGraph(terms(d_s, d_t), dims)
    module = R.DistillStep(student, "s", graph, cap)
    optimizer = R.build_optimizer(module, OptimizerSpec(lr=1e-4), "bench")
    scheduler = R.build_lr_schedule(optimizer, LRScheduleSpec(), steps)
    config = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 0}, "steps_per_print": 10**9,
              "gradient_clipping": GRADIENT_CLIPPING}
    engine = eng.init_student(module, optimizer, scheduler, config, stage="bench")
    stage = StageSpec(name="bench", data="d", loss=graph.terms, students=["s"], teachers=["t"], span=SPAN)
    live = R._LiveStage(engine, {"t": teacher}, {"t": cap.model_copy(update={"model": "t"})}, graph, _Data(),
                        stage, 0, steps, "s")
    env = R._RunEnv(None, out, out, 0, 1, False, False, MetricsLogger(out, enabled=False, show_bar=False))
    return (lambda feed: R.train_step(env, live, feed, 0)), graph.projections["p"].linear


def hand_side(teacher, student, proj_init: torch.nn.Linear):
    """The same step written directly against HF outputs."""
    proj = torch.nn.Linear(proj_init.in_features, proj_init.out_features)
    proj.load_state_dict(proj_init.state_dict())
    params = list(student.parameters()) + list(proj.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(feed):
        b = next(feed)["student"]
        keep = b["attention_mask"].bool()
        with torch.no_grad():
            t_out = teacher(**b, output_hidden_states=True, use_cache=False)
        s_out = student(**b, output_hidden_states=True, use_cache=False)
        kl = L.kl(t_out.logits, s_out.logits, mask=keep, T=T)
        mse = 0.5 * L.mse(t_out.hidden_states[1], proj(s_out.hidden_states[1]), mask=keep)
        loss = kl + mse
        loss.backward()
        # the recipe's engine clips at the plan's gradient_clipping (1.0, also DeepSpeed 0.19's default): same math
        torch.nn.utils.clip_grad_norm_(params, GRADIENT_CLIPPING)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"total": loss.item(), "kl": kl.item(), "mse": mse.item()}

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=1024)
    args = parser.parse_args()
    eng.prepare_process()
    teacher, student = models(args.width, args.vocab)
    hand_student = tf.GPT2LMHeadModel(student.config)
    hand_student.load_state_dict(student.state_dict())
    d_s, d_t = args.width, 2 * args.width
    out = Path("/tmp/gkdc-bench-overhead")
    recipe_step, proj = recipe_side(teacher, student, d_s, d_t, args.batch, args.steps, out)
    hand_step = hand_side(teacher, hand_student, proj)
    data = batches(args.steps + args.warmup, args.batch, args.seq, args.vocab)
    times = {"recipe": [], "hand": []}
    for i, b in enumerate(data):
        for name, fn in (("recipe", recipe_step), ("hand", hand_step)):
            start = time.perf_counter()
            losses = fn(iter([{"teacher": b, "student": b}]))
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
            if i in (0, len(data) - 1):  # the same losses at the last step too: both sides train the same way
                print(f"step {i + 1} {name:6s} losses: " + ", ".join(f"{k}={v:.6f}" for k, v in losses.items()))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"batch {args.batch} x {args.seq}, student width {args.width}, {args.steps} interleaved steps")
    print(f"median step: recipe {med['recipe'] * 1e3:.1f} ms, hand-written {med['hand'] * 1e3:.1f} ms")
    print(f"ratio recipe / hand: {med['recipe'] / med['hand']:.3f} (target <= 1.03)")


if __name__ == "__main__":
    main()
