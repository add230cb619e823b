"""`epochs:` turn into optimizer steps: counted at plan time for text/jsonl, at run time for other formats."""

from __future__ import annotations

import json

from clitools import ROOT, gkdc

SPEC = """
teacher t = hf("{root}/examples/tiny") {{ init: random, dtype: fp32 }}
student s = like(t) {{ layers: 1, hidden: 32, heads: 2, dtype: fp32 }}
data rows = {fmt}("{data}") {{ seq_len: 16 }}
stage distill {{
  data: rows
  epochs: 1.5
  batch: 4
  loss: kl(t.logits, s.logits)
}}
"""


def _run(tmp_path, fmt: str, data) -> tuple[dict, list[dict]]:
    spec = tmp_path / "e.gkd"
    spec.write_text(SPEC.format(root=ROOT, fmt=fmt, data=data))
    out = tmp_path / "run"
    r = gkdc("run", str(spec), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads((out / "plan.json").read_text())
    return plan, [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_text_epochs_are_counted_at_plan_time(tmp_path):
    data = tmp_path / "ten.txt"
    data.write_text("".join(f"the cat sees {i} dogs .\n" for i in ["two", "three"] * 5))
    plan, metrics = _run(tmp_path, "text", data)
    # packed by default: 10 lines x (6 tokens + EOS) = 70 tokens = 4 blocks of 16; ceil(1.5 x 4 / 4) = 2
    assert plan["stages"][0]["tokens"]["packed"] is True
    assert plan["stages"][0]["total_steps"] == 2
    assert max(m["step"] for m in metrics) == 2
    assert all(m["tokens"] == m["positions"] == 4 * 16 for m in metrics)


def test_csv_epochs_are_counted_by_the_runtime(tmp_path):
    data = tmp_path / "ten.csv"
    data.write_text("text\n" + "".join(f"the bird helps {i} kings .\n" for i in ["two", "four"] * 5))
    plan, metrics = _run(tmp_path, "csv", data)
    assert plan["stages"][0]["total_steps"] == -1
    # packed: 10 rows x (6 tokens + EOS) = 4 blocks of 16, counted by the runtime: ceil(1.5 x 4 / 4) = 2
    assert max(m["step"] for m in metrics) == 2
