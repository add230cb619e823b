"""On-policy vs off-policy distillation from the same start (issue 17): train both arms, then score each student's
generations on held-out prompts with the teacher.

    .venv/bin/python bench/onpolicy_demo.py [--on specs/demo/smollm2-onpolicy.gkd] [--off specs/demo/smollm2-offpolicy.gkd]
        [--prompts examples/real/data/chat_heldout.jsonl] [--n 200] [--out runs/onpolicy-demo] [--skip-train]

Each arm is planned (``gkdc plan``) and run (``gkdc run``) into ``OUT/<arm>``. Then, for each trained student, the
held-out conversations up to their last assistant turn (rendered with the chat template and its generation prompt,
as the run renders its prompts: runtime/generation.py) are continued by the student, sampled with the on-policy
spec's generation settings and the same seed for both students, and the teacher scores every generated token:

- ``nll``: the teacher's negative log-likelihood of the generated token, -log p(y_t | y_<t);
- ``rkl``: the exact reverse KL over the vocabulary at that position, KL(q_student || p_teacher).

Both are averaged over each sequence's generated tokens, then over sequences; the standard error is over
sequences (tokens of one sequence are not independent). The measured wall time per step (metrics.jsonl:
``onpolicy`` generation / teacher / training seconds, mean over steps) is set beside the plan's
``StagePlan.generation.time_split``. Writes ``OUT/report.json`` and ``OUT/report.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _gkdc(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "gkdc", *args], cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"gkdc {' '.join(args)} failed with exit status {proc.returncode}")


def train(spec: Path, out: Path) -> Path:
    """Plan and run ``spec`` into ``out``; returns the plan's path."""
    out.mkdir(parents=True, exist_ok=True)
    plan = out / "plan.json"
    _gkdc("plan", str(spec), "-o", str(plan))
    _gkdc("run", str(plan), "--out", str(out / "run"), "--no-progress")
    return plan


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    if n == 1:
        return m, math.nan
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def score(teacher, student, tokenizer, prompts: list[list[int]], settings, *, seed: int, batch: int = 8) -> dict:
    """Per-sequence mean teacher NLL and reverse KL of ``student``'s continuations of ``prompts``."""
    import torch

    from runtime import generation as G

    nll, rkl, lengths = [], [], []
    teacher.eval()
    pad = G._pad_id(tokenizer)
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        gen = G.sample(student, chunk, settings, tokenizer, seed=seed + i, keep_logits=True)
        if gen.logits is None:
            continue
        inputs = G.batch_of(gen, pad, next(teacher.parameters()).device)
        with torch.no_grad():
            t_logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
        lp = torch.log_softmax(t_logits, -1)
        lq_all = torch.log_softmax(gen.logits, -1)
        for r, n in enumerate(gen.lengths):
            lengths.append(n)
            if n == 0:
                continue
            keep = inputs["loss_mask"][r]
            lp_r = lp[r][keep]  # [n, V]: the teacher at the positions predicting a generated token
            ids = inputs["tokens"][r][keep]
            lq = lq_all[r, :n].to(lp_r.device)
            nll.append(float(-lp_r.gather(-1, ids[:, None]).mean()))
            rkl.append(float((lq.exp() * (lq - lp_r)).sum(-1).mean()))
    (n_m, n_se), (k_m, k_se) = mean_se(nll), mean_se(rkl)
    return {"sequences": len(nll), "mean_length": sum(lengths) / max(1, len(lengths)), "nll": n_m, "nll_se": n_se,
            "rkl": k_m, "rkl_se": k_se}


def measured_split(run: Path) -> dict:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r.get("kind") == "train"]
    out = {"steps": len(recs), "step_seconds": sum(r["step_seconds"] for r in recs) / max(1, len(recs))}
    parts = [r["onpolicy"] for r in recs if "onpolicy" in r]
    for key in ("generation", "teacher", "training"):
        if parts:
            out[key] = sum(p[f"{key}_seconds"] for p in parts) / len(parts)
    return out


def planned_split(plan_path: Path) -> dict:
    from planner.plan import Plan

    plan = Plan.model_validate_json(plan_path.read_text())
    stage = plan.stages[0]
    gen = getattr(stage, "generation", None)
    out = {"step_seconds": stage.step_time_s}
    if gen is not None:
        out.update(gen.time_split)
    return out


def _load(folder: Path, device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, torch_dtype="float32").to(device).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--on", type=Path, default=ROOT / "specs/demo/smollm2-onpolicy.gkd")
    p.add_argument("--off", type=Path, default=ROOT / "specs/demo/smollm2-offpolicy.gkd")
    p.add_argument("--prompts", type=Path, default=ROOT / "examples/real/data/chat_heldout.jsonl")
    p.add_argument("--n", type=int, default=200, help="held-out prompts scored")
    p.add_argument("--out", type=Path, default=ROOT / "runs/onpolicy-demo")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--skip-train", action="store_true", help="score the students already under --out")
    p.add_argument("--also", action="append", default=[], metavar="LABEL=FOLDER",
                   help="score another Hugging Face model folder's generations the same way (e.g. the students' "
                        "common init, or the teacher itself as a reference); repeatable")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from gkdlang.spec import DataSpec, Span
    from planner.generation import prompt_len
    from planner.plan import Plan
    from runtime import generation as G

    arms = {"on-policy": args.on, "off-policy": args.off}
    plans = {}
    for arm, spec in arms.items():
        plans[arm] = args.out / arm / "plan.json"
        if not args.skip_train:
            plans[arm] = train(spec.resolve(), args.out / arm)
    on_plan = Plan.model_validate_json(plans["on-policy"].read_text())
    settings = on_plan.spec.stages[0].generate
    if settings is None:
        raise SystemExit(f"{args.on}: its stage does not generate (no generate: on_policy(...))")
    stage = on_plan.spec.stages[0]
    teacher_spec = on_plan.spec.models[stage.teachers[0]]
    teacher_dir = Path(teacher_spec.source)
    if not teacher_dir.is_absolute():
        teacher_dir = (Path(args.on).resolve().parent / teacher_dir).resolve()
    device = torch.device("cpu")
    teacher = _load(teacher_dir, device)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    span = Span(file=str(args.prompts), line=1, col=1, end_line=1, end_col=2)
    data = DataSpec(name="heldout", format="chat", paths=[str(args.prompts.resolve())], span=span)
    prompts = G.prompt_rows(data, ROOT, tokenizer, prompt_len(on_plan.spec, stage))[:args.n]  # as the run cuts them
    report: dict = {"prompts": len(prompts), "settings": settings.model_dump(exclude={"span"}), "arms": {}}
    for arm in arms:
        run = args.out / arm / "run"
        student = _load(run / "student", device)
        torch.manual_seed(0)
        report["arms"][arm] = {"heldout": score(teacher, student, tokenizer, prompts, settings, seed=args.seed),
                               "measured": measured_split(run), "planned": planned_split(plans[arm])}
    for item in args.also:
        label, sep, folder = item.partition("=")
        if not sep or not label or not Path(folder).is_dir():
            raise SystemExit(f"--also {item!r}: expected LABEL=FOLDER with an existing model folder")
        torch.manual_seed(0)
        report["arms"][label] = {"heldout": score(teacher, _load(Path(folder), device), tokenizer, prompts, settings,
                                                  seed=args.seed)}
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    table = render(report)
    (args.out / "report.md").write_text(table)
    print(table)
    return 0


def render(report: dict) -> str:
    lines = [f"held-out prompts: {report['prompts']}, sampled with temperature {report['settings']['temperature']}, "
             f"top_p {report['settings']['top_p']}, at most {report['settings']['max_new_tokens']} new tokens", "",
             "| arm | teacher NLL / token | reverse KL / token | mean length | step s (plan) | generation s (plan) | "
             "teacher s (plan) | training s (plan) |", "|---|---|---|---|---|---|---|---|"]
    for arm, r in report["arms"].items():
        h, m, p = r["heldout"], r.get("measured"), r.get("planned")
        if m is None:  # an --also model: scored, not trained here
            lines.append(f"| {arm} | {h['nll']:.3f} ± {h['nll_se']:.3f} | {h['rkl']:.3f} ± {h['rkl_se']:.3f} | "
                         f"{h['mean_length']:.1f} | - | - | - | - |")
            continue

        def cell(key):
            got, want = m.get(key), p.get(key)
            return (f"{got:.3f}" if got is not None else "-") + (f" ({want:.3f})" if want is not None else "")

        lines.append(f"| {arm} | {h['nll']:.3f} ± {h['nll_se']:.3f} | {h['rkl']:.3f} ± {h['rkl_se']:.3f} | "
                     f"{h['mean_length']:.1f} | {m['step_seconds']:.3f} ({p['step_seconds']:.3f}) | "
                     f"{cell('generation')} | {cell('teacher')} | {cell('training')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
