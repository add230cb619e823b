"""The run's text log: Python ``logging`` to ``<run>/run.log`` (every line, always) and to stderr (rank 0).

On stderr, training progress is a tqdm bar when stderr is a terminal and ``--no-progress`` is not given;
otherwise (a pipe, a file, CI, ``--no-progress``) it is a plain line every ``log_every`` optimizer steps and at
a stage's last step, the same line the log file gets every time. Log lines written while a bar is showing go
through ``tqdm.write`` so they never break it. Ranks other than 0 log warnings and errors to stderr only.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

LOG_FILE = "run.log"
LOGGER = "gkdc"
LINES_PER_STAGE = 20
"""Plain progress lines per stage when ``log_every`` is not given (at most every ``MAX_LOG_EVERY`` steps)."""
MAX_LOG_EVERY = 100


class _TqdmHandler(logging.StreamHandler):
    """stderr through ``tqdm.write``: a message printed while a bar is showing lands above it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never end a run
            self.handleError(record)


def setup(out_dir: Path | None, rank: int) -> logging.Logger:
    """The ``gkdc`` logger of this process: its handlers replaced (one run per process at a time)."""
    log = logging.getLogger(LOGGER)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.setLevel(logging.INFO)
    log.propagate = False
    console = _TqdmHandler()
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    log.addHandler(console)
    if out_dir is not None and rank == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(out_dir) / LOG_FILE, encoding="utf-8", delay=True)
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(file)
    return log


def close() -> None:
    log = logging.getLogger(LOGGER)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def file_only(log: logging.Logger, message: str) -> None:
    """``message`` to the log file alone (progress lines while the bar shows them on the terminal)."""
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, message, None, None)
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def default_log_every(total: int) -> int:
    return max(1, min(MAX_LOG_EVERY, math.ceil(total / LINES_PER_STAGE)))


def term_labels(term_ids: list[str]) -> dict[str, str]:
    """Short, unambiguous progress labels: the loss function's name (with its method), numbered when repeated
    (``kl``, ``mse``, ``mse#2``); never the tail of an id cut from the left."""
    out: dict[str, str] = {}
    seen: dict[str, int] = {}
    for tid in term_ids:
        base = tid.split("[", 1)[0] or tid
        seen[base] = seen.get(base, 0) + 1
        out[tid] = base if seen[base] == 1 else f"{base}#{seen[base]}"
    return out


def fmt_rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 10_000 else f"{x:.0f}"


def step_line(record: dict[str, Any], total: int, labels: dict[str, str]) -> str:
    """One plain progress line: ``stage teach  step 40/300  loss 3.21 (ce 3.21)  lr 2.9e-03  |g| 1.2 ...``."""
    parts = [f"stage {record['stage']}", f"step {record['step']}/{total}", f"loss {record['total']:.4g}"]
    if len(record["terms"]) > 1:
        parts[-1] += " (" + ", ".join(f"{labels.get(k, k)} {v:.3g}" for k, v in record["terms"].items()) + ")"
    parts.append(f"lr {record['lr']:.2e}")
    if record.get("grad_norm") is not None:
        parts.append(f"|g| {record['grad_norm']:.3g}")
    if record.get("step_seconds"):
        parts.append(f"{record['step_seconds']:.2f} s/step")
        parts.append(f"{fmt_rate(record['tokens_per_second'])} tok/s")
    return "  ".join(parts)


def eval_line(record: dict[str, Any]) -> str:
    """``eval stage distill step 100: loss 3.2 perplexity 24.5 distill 0.51 (120 examples, 1.3 s)``."""
    shown = [f"{k} {record[k]:.4g}" for k in ("loss", "perplexity", "accuracy", "distill") if k in record]
    return (f"eval  stage {record['stage']}  step {record['step']}: " + "  ".join(shown)
            + f"  ({record['examples']} held-out examples, {record['seconds']:.1f} s)")
