"""Per-step losses and held-out evaluations -> metrics.jsonl, TensorBoard events [, Weights & Biases offline], the
text log (runtime/logs.py: a bar or plain lines, and run.log), and a loss-curve PNG at the end.

Only rank 0 writes (other ranks get a logger whose methods do nothing). On resume the JSONL file is cut
back to the resumed step, so the file always describes exactly one uninterrupted history.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from runtime import logs

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"


LOG_EVERY_ENV = "GKDC_LOG_EVERY"
"""Steps between plain progress lines (``gkdc run --log-every``); default ``logs.default_log_every``."""
WANDB_ENV = "GKDC_WANDB"
"""``offline`` (``gkdc run --wandb``): also log to Weights & Biases in offline mode under ``<run>/wandb``."""


class MetricsLogger:
    """Writes one record per optimizer step and per evaluation; ``enabled=False`` (ranks > 0) makes every call
    but the text log's warnings a no-op."""

    def __init__(self, out_dir: Path, *, enabled: bool, show_bar: bool, rank: int = 0) -> None:
        self.out_dir = out_dir
        self.enabled = enabled
        # a bar only on a terminal: piped or redirected output gets plain lines (runtime/logs.py)
        self.show_bar = show_bar and enabled and sys.stderr.isatty()
        self._writer: Any = None
        self._bar: tqdm | None = None
        self._jsonl = None
        self._wandb: Any = None
        self._labels: dict[str, str] = {}
        self._total = 0
        every = os.environ.get(LOG_EVERY_ENV, "")
        self._every = int(every) if every.isdigit() and int(every) > 0 else None
        self.log = logs.setup(out_dir if enabled else None, rank)

    def open(self, resume_from: tuple[int, int] | None) -> int:
        """Start writing; ``resume_from=(stage, step)`` drops records after that point (they will be redone).

        Returns the number of training records kept (the global step to continue from).
        """
        if not self.enabled:
            return 0  # ranks > 0 log nothing, so they need no step count
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / METRICS_FILE
        kept = _records_up_to(path, resume_from) if resume_from and path.exists() else []
        with open(path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in kept)
        self._jsonl = open(path, "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(self.out_dir / "tensorboard"))
        if os.environ.get(WANDB_ENV):
            self._wandb = _open_wandb(self.out_dir, self.log)
        return sum(1 for r in kept if r.get("kind", "train") == "train")

    def info(self, message: str) -> None:
        if self.enabled:
            self.log.info(message)

    def warning(self, message: str) -> None:
        self.log.warning(message)

    def start_stage(self, name: str, total: int, done: int, term_ids: list[str] | None = None) -> None:
        self._labels = logs.term_labels(term_ids or [])
        self._total = total
        if not self.enabled:
            return
        if len(self._labels) > 1:
            self.log.info(f"stage {name}: terms " + ", ".join(f"{v} = {k}" for k, v in self._labels.items()))
        if self.show_bar:
            self._bar = tqdm(total=total, initial=done, desc=f"stage {name}", dynamic_ncols=True)

    def log_step(self, record: dict[str, Any], global_step: int) -> None:
        """``record``: step, stage, lr, total and per-term values (``terms``); step_seconds, tokens_per_second,
        grad_norm when measured."""
        if not self.enabled:
            return
        record = {"kind": "train", **record}
        self._jsonl.write(json.dumps(record) + "\n")
        scalars = {"loss/total": record["total"], "lr": record["lr"]}
        scalars.update({f"loss/{term}": value for term, value in record["terms"].items()})
        scalars.update({f"onpolicy/{k}": v for k, v in record.get("onpolicy", {}).items()})  # runtime/onpolicy.py
        for key, tag in (("step_seconds", "perf/step_seconds"), ("tokens_per_second", "perf/tokens_per_second"),
                         ("grad_norm", "grad_norm")):
            if record.get(key) is not None:
                scalars[tag] = record[key]
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=global_step)
        line = logs.step_line(record, self._total, self._labels)
        every = self._every or logs.default_log_every(self._total)
        due = record["step"] % every == 0 or record["step"] == self._total
        if self._bar is not None:
            self._bar.update(1)
            postfix = {"loss": f"{record['total']:.4g}"}
            postfix.update({self._labels.get(k, k): f"{v:.3g}" for k, v in record["terms"].items()})
            self._bar.set_postfix(postfix, refresh=False)
            if due:
                logs.file_only(self.log, line)
        elif due:
            self.log.info(line)

    def log_eval(self, record: dict[str, Any], global_step: int) -> None:
        """``record``: an evaluation (runtime/evalloop.py): loss and perplexity or accuracy [, distill]."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        scalars = {f"eval/{k}": record[k] for k in ("loss", "perplexity", "accuracy", "distill") if k in record}
        scalars.update({f"eval/distill/{k}": v for k, v in record.get("distill_terms", {}).items()})
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=global_step)
        self.log.info(logs.eval_line(record))

    def end_stage(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        """Flush files and draw the loss curve. Runs in the recipe's ``finally``: a step that fails here (a full
        disk, a read-only folder) is reported as a warning, so it never masks the error that ended the run."""
        if not self.enabled:
            logs.close()
            return
        steps = [("progress bar", self.end_stage),
                 ("TensorBoard events", self._writer.close if self._writer is not None else None),
                 ("Weights & Biases", self._wandb.finish if self._wandb is not None else None),
                 (METRICS_FILE, self._jsonl.close if self._jsonl is not None else None),
                 (CURVE_FILE, lambda: plot_losses(self.out_dir / METRICS_FILE, self.out_dir / CURVE_FILE))]
        for what, step in steps:
            if step is None:
                continue
            try:
                step()
            except Exception as err:  # noqa: BLE001 - cleanup: report and go on
                self.log.warning(f"warning: could not finish {what} in {self.out_dir}: {err}")
        self._writer = self._jsonl = self._wandb = None
        logs.close()


def _open_wandb(out_dir: Path, log: Any) -> Any:
    """A Weights & Biases run in offline mode under ``<run>/wandb`` (``wandb sync`` uploads it later), or None
    with a warning when the optional ``wandb`` package is not installed (``pip install gkdc[wandb]``)."""
    try:
        import wandb
    except ImportError:
        log.warning("warning: --wandb asks for Weights & Biases, but the wandb package is not installed "
                    "(pip install 'gkdc[wandb]'); logging to TensorBoard and metrics.jsonl only")
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(mode="offline", dir=str(out_dir), project="gkdc", name=out_dir.name,
                      settings=wandb.Settings(console="off"))


def _records_up_to(path: Path, point: tuple[int, int]) -> list[dict[str, Any]]:
    stage, step = point
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if (r["stage_index"], r["step"]) <= (stage, step)]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, png_path: Path) -> Path | None:
    """Total and per-term training loss over global steps (one line each, log scale when all are positive), the
    held-out loss of each evaluation as markers, each stage named over its span; the legend sits outside the axes
    so it hides no curve."""
    if not metrics_path.exists():
        return None
    every = read_metrics(metrics_path)
    records = [r for r in every if r.get("kind", "train") == "train"]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.8))
    xs = list(range(1, len(records) + 1))
    ax.plot(xs, [r["total"] for r in records], label="total", linewidth=2)
    terms = sorted({t for r in records for t in r["terms"]})
    labels = logs.term_labels(terms)
    for term in terms:
        pts = [(x, r["terms"][term]) for x, r in zip(xs, records) if term in r["terms"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{labels[term]}: {term}", linewidth=1)
    at = {(r["stage_index"], r["step"]): x for x, r in zip(xs, records)}
    evals = [(at[(r["stage_index"], r["step"])], r["loss"]) for r in every
             if r.get("kind") == "eval" and "loss" in r and (r["stage_index"], r["step"]) in at]
    if evals:
        ax.plot([e[0] for e in evals], [e[1] for e in evals], "o", color="black", markersize=4,
                label="held-out loss (student)")
    if all(r["total"] > 0 for r in records) and all(e[1] > 0 for e in evals):
        ax.set_yscale("log")
    _mark_stages(ax, records)
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def _mark_stages(ax: Any, records: list[dict[str, Any]]) -> None:
    """A dashed line between stages and each stage's name over its span."""
    spans: list[list[Any]] = []
    for x, r in enumerate(records, start=1):
        if not spans or spans[-1][0] != r["stage_index"]:
            spans.append([r["stage_index"], r["stage"], x, x])
        spans[-1][3] = x
    for i, (_, name, first, last) in enumerate(spans):
        if i:
            ax.axvline(first - 0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.text((first + last) / 2, 1.01, name, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=8, color="dimgrey")


def plain_grad_norm(engine: Any) -> float | None:
    """The global gradient norm of a ZeRO-0 fp32 engine, read from ``p.grad`` after the step's last backward
    (DeepSpeed clips those gradients without keeping the norm); None for the others (``step_grad_norm``)."""
    import torch

    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    squares = [p.grad.detach().float().pow(2).sum() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


def step_grad_norm(engine: Any, plain: float | None) -> float | None:
    """The step's gradient norm before clipping: ``plain`` or the ZeRO / mixed-precision optimizer's own."""
    if plain is not None:
        return plain
    value = engine.get_global_grad_norm()
    value = float(value) if value is not None else None
    return value if value is not None and value == value and value != float("inf") else value
