"""Packed vs padded on the shipped corpus: real tokens per step and step time, predicted by the plan and measured
by the runtime, side by side in one run.

Both arms distill the built-in example's 4-block GPT-2 (examples/tiny, random init) into a 2-block student on
``examples/data/corpus.txt`` (3,000 lines of ~30 tokens) at ``seq_len`` 64, batch 16, with the same pinned
placement (``placement { zero: 0; micro_batch: 16; checkpointing: false }``), so the data layout is the only
difference: ``packing: true`` (documents + EOS cut into 64-token blocks, no attention across documents) or
``packing: false`` (one line per example, padded to the longest of each micro-batch). Each arm is planned with
``planner.build`` and run in this process with ``runtime.recipe.run``; the runtime logs each step's real tokens
and positions over all ranks, and a wrapper around the metrics logger stamps each step's wall time. Arms alternate
(packed, padded, packed, padded, ...) so machine noise hits both alike; step times are medians over the steps of
every repeat after the first two of each run.

    python bench/packing.py [--steps 40] [--repeats 2] [--update-docs]

Prints one line per arm and a markdown section (``## Packing``) that ``bench/run_all`` appends to
docs/benchmarks.md (``--update-docs`` replaces that section in place).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPEC = """
teacher t = hf("{root}/examples/tiny") {{ init: random, dtype: fp32 }}
student s = like(t) {{ layers: 2, hidden: 64, heads: 4, dtype: fp32 }}
data corpus = text("{root}/examples/data/corpus.txt") {{ seq_len: 64, packing: {packing} }}
stage distill {{
  data: corpus
  steps: {steps}
  batch: 16
  optimizer: adamw(lr: 3e-3)
  loss: kl(t.logits, s.logits, T: 2) + 0.5 * ce(tokens, s.logits) where not pad
}}
placement {{ zero: 0; micro_batch: 16; checkpointing: false }}
cluster {{ gpus: 1 x cpu, cpu_memory: 8GB }}
"""
BEGIN, END = "<!-- packing: begin (bench/packing.py) -->", "<!-- packing: end -->"


def plan_arm(work: Path, packing: bool, steps: int) -> Path:
    from gkdc import __version__
    from gkdlang.lower import check_file
    from planner.build import build_plan

    arm = work / ("packed" if packing else "padded")
    arm.mkdir(parents=True, exist_ok=True)
    spec_path = arm / "spec.gkd"
    spec_path.write_text(SPEC.format(root=ROOT, packing=str(packing).lower(), steps=steps))
    result = check_file(spec_path)
    assert result.spec is not None, [d.message for d in result.diagnostics]
    plan_path = arm / "plan.json"
    plan = build_plan(result.spec, gkdc_version=__version__, spec_path=str(spec_path), plan_path=str(plan_path))
    assert not hasattr(plan, "diagnostics"), plan
    plan_path.write_text(plan.model_dump_json(indent=1))
    return plan_path


def run_arm(plan_path: Path, out: Path) -> list[tuple[float, dict]]:
    """(wall time at which each step was logged, its record) of one run."""
    import runtime.metrics as metrics
    from planner.plan import Plan
    from runtime.recipe import run

    stamps: list[tuple[float, dict]] = []
    original = metrics.MetricsLogger.log_step

    def stamped(self, record, step):
        stamps.append((time.perf_counter(), dict(record)))
        original(self, record, step)

    metrics.MetricsLogger.log_step = stamped
    try:
        run(Plan.model_validate_json(plan_path.read_text()), plan_path, out, resume=False, progress=False)
    finally:
        metrics.MetricsLogger.log_step = original
    return stamps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared machine, OpenMP threads waiting for each other dominate "
                             "tiny steps; both arms alike)")
    parser.add_argument("--update-docs", action="store_true", help="replace the Packing section of docs/benchmarks.md")
    args = parser.parse_args()
    import torch

    from planner.plan import Plan
    from runtime import engine as eng

    torch.set_num_threads(args.threads)

    eng.prepare_process()
    work = Path(tempfile.mkdtemp(prefix="gkdc-packing-"))
    plans = {packed: plan_arm(work, packed, args.steps) for packed in (True, False)}
    measured: dict[bool, dict[str, list[float]]] = {p: {"dt": [], "tokens": [], "positions": []} for p in plans}
    for rep in range(args.repeats):
        for packed in (True, False):
            stamps = run_arm(plans[packed], work / f"{'packed' if packed else 'padded'}-{rep}")
            times = [t for t, _ in stamps]
            measured[packed]["dt"] += [b - a for a, b in zip(times, times[1:])][2:]
            measured[packed]["tokens"] += [r["tokens"] for _, r in stamps]
            measured[packed]["positions"] += [r["positions"] for _, r in stamps]
    rows = []
    for packed in (True, False):
        sp = Plan.model_validate_json(plans[packed].read_text()).stages[0]
        m = measured[packed]
        dt, tok, pos = statistics.median(m["dt"]), statistics.fmean(m["tokens"]), statistics.fmean(m["positions"])
        rows.append((packed, sp.tokens.real, tok, sp.tokens.computed, pos, sp.step_time_s, dt))
        name = "packed" if packed else "padded"
        print(f"{name}: real tokens/step predicted {sp.tokens.real:.1f} measured {tok:.1f}; positions/step predicted "
              f"{sp.tokens.computed:.1f} measured {pos:.1f}; step time predicted {sp.step_time_s:.4f} s measured "
              f"{dt:.4f} s; real tokens/s predicted {sp.tokens.real / sp.step_time_s:.0f} measured {tok / dt:.0f}")
    (_, _, tok_p, _, _, _, dt_p), (_, _, tok_u, _, _, _, dt_u) = rows
    ratio = (tok_p / dt_p) / (tok_u / dt_u)
    print(f"real tokens/s packed / padded: measured {ratio:.2f}x; "
          f"predicted {(rows[0][1] / rows[0][5]) / (rows[1][1] / rows[1][5]):.2f}x")
    section = markdown(rows, ratio, args)
    print(section)
    if args.update_docs:
        update_docs(section)
    return 0


def markdown(rows, ratio: float, args) -> str:
    lines = [BEGIN, "## Packing", "",
             "`bench/packing.py`: the built-in example's GPT-2 pair on the shipped corpus (`examples/data/corpus.txt`,",
             f"seq_len 64, batch 16, one CPU rank with {args.threads} torch thread(s), the same pinned placement),",
             f"{args.steps} steps x {args.repeats} alternating runs per arm. Predicted = the plan (`stages[0].tokens`,",
             "`step_time_s`); measured = the runtime's logged tokens and positions per step (all ranks) and the",
             "median wall time between steps.", "",
             "| arm | real tokens/step (plan / run) | positions run/step (plan / run) | step time (plan / run) | "
             "real tokens/s (plan / run) |",
             "|---|---|---|---|---|"]
    for packed, t_pred, t_meas, p_pred, p_meas, s_pred, s_meas in rows:
        lines.append(f"| {'packed' if packed else 'padded'} | {t_pred:,.0f} / {t_meas:,.0f} | {p_pred:,.0f} / "
                     f"{p_meas:,.0f} | {s_pred * 1e3:.1f} ms / {s_meas * 1e3:.1f} ms | "
                     f"{t_pred / s_pred:,.0f} / {t_meas / s_meas:,.0f} |")
    (_, tp, tm, _, _, sp_, sm), (_, up, um, upp, upm, su, smu) = rows
    predicted = (tp / sp_) / (up / su)
    import os

    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    lines += ["", f"Real tokens per second, packed / padded: {ratio:.2f}x measured, {predicted:.2f}x predicted. Tokens "
              f"per step, run / plan: packed {tm / tp:.3f}, padded {um / up:.3f} (real) and {upm / upp:.3f} (positions "
              f"run; the padded plan figures are expectations over the corpus's line lengths). Step time, run / plan: "
              f"packed {sm / sp_:.2f}, padded {smu / su:.2f}: the planner's CPU figure ranks placements, it does not "
              f"promise wall time (load average {load} over 1 / 5 / 15 min when this was written, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", END]
    return "\n".join(lines)


def update_docs(section: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
