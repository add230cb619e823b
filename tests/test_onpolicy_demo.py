"""specs/demo/smollm2-onpolicy.gkd and its off-policy arm check and plan, without the real model: each spec is
checked where it would live, beside a stand-in ``models/smollm2-135m`` folder holding the catalog's SmolLM2
config and a ChatML template (what the checker and planner read of the real folder: no weights), and a copy of
the chat cases as ``examples/real/data/chat_train.jsonl``. The arms must differ only in ``generate:``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gkdlang.lower import check_file
from planner.build import build_plan
from planner.plan import Plan
from planner.report import render_report

ROOT = Path(__file__).resolve().parents[1]
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    (root / "gkdc.toml").write_text("")  # the project root, so ../../ paths stay inside it (gkdlang.paths)
    (root / "specs" / "demo").mkdir(parents=True)
    for arm in ("onpolicy", "offpolicy"):
        shutil.copy(ROOT / "specs" / "demo" / f"smollm2-{arm}.gkd", root / "specs" / "demo")
    folder = root / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    config = json.loads((ROOT / "gkdlang" / "catalog" / "smollm2-135m.json").read_text())
    config.pop("_catalog", None)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(CHATML)
    data = root / "examples" / "real" / "data"
    data.mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "cases" / "data" / "chat.jsonl", data / "chat_train.jsonl")
    return root


def planned(project: Path, arm: str):
    path = project / "specs" / "demo" / f"smollm2-{arm}.gkd"
    result = check_file(path)
    assert result.spec is not None, [(d.code, d.message) for d in result.diagnostics]
    assert not [d for d in result.diagnostics if d.severity != "note" and d.code != "no-cpu-memory"], \
        [(d.code, d.message) for d in result.diagnostics]
    plan = build_plan(result.spec, gkdc_version="t", spec_path=str(path))
    assert isinstance(plan, Plan), plan
    return result.spec, plan


def test_the_onpolicy_demo_checks_and_plans_its_generation(project):
    spec, plan = planned(project, "onpolicy")
    g = spec.stages[0].generate
    assert (g.prompts, g.lmbda, g.max_new_tokens, g.stop) == ("talk", 1.0, 32, ["<|im_end|>"])
    sp = plan.stages[0]
    assert sp.generation.generator == "small" and sp.generation.tokens_per_step == 8 * 32
    assert sp.tokens.seq_len == 192 + 32
    assert min(sp.generation.time_split.values()) > 0
    assert "step time split: generation" in render_report(plan)


def test_the_offpolicy_arm_is_the_same_run_teacher_forced(project):
    on, _ = planned(project, "onpolicy")
    off, plan = planned(project, "offpolicy")
    a, b = on.stages[0], off.stages[0]
    assert b.generate is None and plan.stages[0].generation is None
    same = ("steps", "batch", "optimizer", "schedule", "students", "teachers", "data")
    assert all(getattr(a, k) == getattr(b, k) for k in same)
    assert [(t.fn, t.options, t.target, t.pred) for t in a.loss] == [(t.fn, t.options, t.target, t.pred) for t in b.loss]
    assert on.models == off.models or all(on.models[m].model_dump(exclude={"span"}) ==
                                          off.models[m].model_dump(exclude={"span"}) for m in on.models)
