"""`gkdc run` of a spec planned for two ranks: planner -> plan launch command -> deepspeed launcher (gloo on
CPU) -> both ranks train and the student is saved; judged by what the ranks wrote."""

from __future__ import annotations

import json

import pytest

from clitools import ROOT, gkdc, tiny_spec


@pytest.mark.deepspeed
def test_gkdc_run_starts_two_ranks_with_the_runtimes_own_launch_command(tmp_path):
    spec = tmp_path / "two.gkd"
    loss = "kl(t.logits, s.logits, T: 2) + mse(t.hidden[1], project(s.hidden[0])) where not pad"
    spec.write_text(tiny_spec(steps=3, cluster="gpus: 2 x cpu", loss=loss))
    out = tmp_path / "run"
    # the spec reads the repository's corpus from a temporary folder: allowed explicitly (docs/security.md)
    r = gkdc("run", str(spec), "--out", str(out), "--no-progress", "--allow-path", str(ROOT), timeout=400)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["world_size"] == 2 and plan["launch"][0] == "deepspeed"
    ranks = sorted((out / "ranks").glob("rank*.json"))
    assert len(ranks) == 2, (r.returncode, r.stderr[-3000:])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "student" / "model.safetensors").exists()
    sums = [json.loads(p.read_text())["weight_sums"]["s"] for p in ranks]
    assert sums[0] == pytest.approx(sums[1], rel=1e-6)  # data-parallel ranks end with the same student
