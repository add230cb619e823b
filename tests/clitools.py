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
