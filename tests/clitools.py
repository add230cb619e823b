"""Running the real `gkdc` command line from tests, in a subprocess with a clean environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RENDEZVOUS_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env() -> dict[str, str]:
    """No rendezvous variables left by in-process runs of this pytest; this checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    env["PYTHONPATH"] = str(ROOT)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


TINY_SPEC = """
teacher t = hf("{root}/examples/tiny") {{ init: random, dtype: fp32 }}
student s = like(t) {{ layers: 1, hidden: 32, heads: 2, dtype: fp32 }}
data corpus = text("{root}/examples/data/corpus.txt") {{ seq_len: 32 }}
stage distill {{
  data: corpus
  steps: {steps}
  batch: 8
{stage}  loss: {loss}
}}
cluster {{ {cluster}, cpu_memory: 8GB }}
"""


def tiny_spec(*, steps: int, cluster: str, loss: str = "kl(t.logits, s.logits, T: 2)", stage: str = "") -> str:
    """A spec of a random examples/tiny teacher and a 1-block student on the repository's corpus: one stage of
    batch 8 on ``cluster`` (8GB of CPU memory); ``stage``: more lines of the stage (each ending in a newline)."""
    return TINY_SPEC.format(root=ROOT, steps=steps, cluster=cluster, loss=loss, stage=stage)


def gkdc(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gkdc", *args], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=timeout)


def doc_section_blocks(doc: str, heading: str, lang: str = "") -> list[str]:
    """The fenced blocks of language ``lang`` ("" = plain) in the section of ``docs/<doc>`` that starts with the
    line ``heading`` and ends at the next ``## `` heading: tests run what the tutorial shows."""
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    section = text[start:end if end >= 0 else None]
    blocks, fence, lines = [], None, []
    for line in section.splitlines():
        if line.startswith("```"):
            if fence is None:
                fence, lines = line[3:].strip(), []
            else:
                if fence == lang:
                    blocks.append("\n".join(lines))
                fence = None
        elif fence is not None:
            lines.append(line)
    return blocks
