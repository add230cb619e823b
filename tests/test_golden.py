"""Golden SignalGraph and Plan of every shipped spec (the AST and Spec goldens are in test_parser / test_lower).

``tests/golden/graph/<name>.txt``: the graph as DOT (``planner.graph.to_dot``) and each stage's captures after
pruning; ``tests/golden/plan/<name>.json``: ``Plan.model_dump_json(indent=2)`` planned as ``specs/<name>.gkd``
with gkdc version ``golden`` and the repository's absolute path replaced by ``<root>``. After an intended change
to the planner, rewrite them with ``GKDC_UPDATE_GOLDEN=1 pytest tests/test_golden.py`` and review the diff.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from test_parser import compare_golden

from gkdlang.lower import check_file
from planner.build import PlanFailure, build_plan
from planner.graph import build_graph, to_dot
from planner.plan import plan_digest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
SPECS = sorted((ROOT / "specs").glob("*.gkd"))


def _spec(path: Path):
    result = check_file(path, display_name=f"specs/{path.name}")
    assert result.ok, [d.message for d in result.diagnostics]
    return result.spec


def graph_text(path: Path) -> str:
    spec = _spec(path)
    sg = build_graph(spec)
    lines = [to_dot(sg).rstrip("\n"), "", "# captures per stage (after pruning)"]
    for stage in spec.stages:
        lines.append(f"stage {stage.name}")
        lines += [f"  {c.model_dump_json()}" for c in sg.captures(stage.name)]
    return "\n".join(lines).replace(str(ROOT), "<root>") + "\n"


def plan_json(path: Path) -> str:
    plan = build_plan(_spec(path), gkdc_version="golden", spec_path=f"specs/{path.name}", plan_path="plan.json")
    assert not isinstance(plan, PlanFailure), plan.diagnostics
    # the integrity digest covers absolute paths (machine-dependent): checked here, shown as a placeholder
    assert plan.integrity == plan_digest(plan)
    plan = plan.model_copy(update={"integrity": "<sha256 of every other field>"})
    return plan.model_dump_json(indent=2).replace(str(ROOT), "<root>") + "\n"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_golden_graph(path: Path):
    compare_golden(GOLDEN / "graph" / f"{path.stem}.txt", graph_text(path))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_golden_plan(path: Path):
    compare_golden(GOLDEN / "plan" / f"{path.stem}.json", plan_json(path))
