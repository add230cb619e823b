"""The node sweep in docs/cost-model.md is what the planner gives now (bench/node_sweep.py, planner only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_doc_sweep_is_current():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "node_sweep.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and " x 8 x " in line]
    assert len(rows) == 30  # 5 teachers x 2 devices x 1, 2, 4 nodes: every one planned
    # adding nodes shortens the step of every teacher on both devices (last column: speed-up over one node)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        nodes, speed = int(cells[1].split()[0]), float(cells[-1].rstrip("x"))
        assert speed >= {1: 1.0, 2: 1.8, 4: 3.4}[nodes], row
