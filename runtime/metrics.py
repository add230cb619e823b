"""Per-step losses -> metrics.jsonl, TensorBoard events, a tqdm bar, and a loss-curve PNG at the end.

Only rank 0 writes (other ranks get a logger whose methods do nothing). On resume the JSONL file is cut
back to the resumed step, so the file always describes exactly one uninterrupted history.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"


def _short(term_id: str, width: int = 18) -> str:
    """A bar-sized term name: the tail of the id, which holds the distinguishing layer pair."""
    return term_id if len(term_id) <= width else "~" + term_id[-(width - 1) :]


class MetricsLogger:
    """Writes one record per optimizer step; ``enabled=False`` (ranks > 0) makes every call a no-op."""

    def __init__(self, out_dir: Path, *, enabled: bool, show_bar: bool) -> None:
        self.out_dir = out_dir
        self.enabled = enabled
        self.show_bar = show_bar and enabled
        self._writer: Any = None
        self._bar: tqdm | None = None
        self._jsonl = None

    def open(self, resume_from: tuple[int, int] | None) -> int:
        """Start writing; ``resume_from=(stage, step)`` drops records after that point (they will be redone).

        Returns the number of records kept (the global step to continue from).
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
        return len(kept)

    def start_stage(self, name: str, total: int, done: int) -> None:
        if self.show_bar:
            self._bar = tqdm(total=total, initial=done, desc=f"stage {name}", dynamic_ncols=True)

    def log_step(self, record: dict[str, Any], global_step: int) -> None:
        """``record``: step, stage, lr, total and per-term values (``terms``)."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._writer.add_scalar("loss/total", record["total"], global_step)
        self._writer.add_scalar("lr", record["lr"], global_step)
        for term, value in record["terms"].items():
            self._writer.add_scalar(f"loss/{term}", value, global_step)
        if self._bar is not None:
            self._bar.update(1)
            postfix = {"loss": f"{record['total']:.4g}"}
            postfix.update({_short(k): f"{v:.3g}" for k, v in record["terms"].items()})
            self._bar.set_postfix(postfix, refresh=False)

    def end_stage(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        """Flush files and draw the loss curve. Runs in the recipe's ``finally``: a step that fails here (a full
        disk, a read-only folder) is reported as a warning, so it never masks the error that ended the run."""
        if not self.enabled:
            return
        steps = [("progress bar", self.end_stage),
                 ("TensorBoard events", self._writer.close if self._writer is not None else None),
                 (METRICS_FILE, self._jsonl.close if self._jsonl is not None else None),
                 (CURVE_FILE, lambda: plot_losses(self.out_dir / METRICS_FILE, self.out_dir / CURVE_FILE))]
        for what, step in steps:
            if step is None:
                continue
            try:
                step()
            except Exception as err:  # noqa: BLE001 - cleanup: report and go on
                print(f"warning: could not finish {what} in {self.out_dir}: {err}", file=sys.stderr)
        self._writer = self._jsonl = None


def _records_up_to(path: Path, point: tuple[int, int]) -> list[dict[str, Any]]:
    stage, step = point
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if (r["stage_index"], r["step"]) <= (stage, step)]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, png_path: Path) -> Path | None:
    """Total and per-term loss over global steps, one line each, log scale when all values are positive."""
    if not metrics_path.exists():
        return None
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = list(range(1, len(records) + 1))
    ax.plot(xs, [r["total"] for r in records], label="total", linewidth=2)
    for term in sorted({t for r in records for t in r["terms"]}):
        pts = [(x, r["terms"][term]) for x, r in zip(xs, records) if term in r["terms"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=term, linewidth=1)
    if all(r["total"] > 0 for r in records):
        ax.set_yscale("log")
    _mark_stages(ax, records)
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def _mark_stages(ax: Any, records: list[dict[str, Any]]) -> None:
    for x, (prev, cur) in enumerate(zip(records, records[1:]), start=2):
        if cur["stage_index"] != prev["stage_index"]:
            ax.axvline(x - 0.5, color="grey", linestyle="--", linewidth=0.8)
