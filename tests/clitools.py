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
