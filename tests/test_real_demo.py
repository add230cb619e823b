"""The real demo (specs/demo/*.gkd: SmolLM2-135M -> 4 blocks, GLMD, vocabulary compression, BBC topics), shortened.

The slow tests need ``models/smollm2-135m`` and ``examples/real/data`` (``scripts/get_real.py`` makes both, with
no network) and are skipped with that reason when they are absent. The fast test here needs no download: it
checks, on the built-in tiny model, what the task stage relies on: a student whose init copies another student
trained in an earlier stage starts from the *trained* weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from clitools import ROOT, gkdc

MODEL = ROOT / "models" / "smollm2-135m"
DATA = ROOT / "examples" / "real" / "data"
SPECS = ROOT / "specs" / "demo"
NEEDS_REAL = pytest.mark.skipif(
    not (MODEL / "model.safetensors").is_file() or not (DATA / "lm_heldout.txt").is_file(),
    reason="models/smollm2-135m or examples/real/data is absent: run `.venv/bin/python scripts/get_real.py`",
)




def run_and_eval(spec: Path, out: Path, steps: int, models: list[str], data: Path, limit: int) -> dict[str, dict]:
    r = gkdc("run", str(spec), "--out", str(out), "--max-steps", str(steps), "--no-progress", timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    r = gkdc("eval", *(str(out / "models" / m) for m in models), "--data", str(data), "--seq-len", "64",
             "--limit", str(limit), "--json", str(out / "eval.json"), timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return {row["model"]: row for row in json.loads((out / "eval.json").read_text())}


@pytest.mark.slow
@NEEDS_REAL
def test_glmd_demo_distills_and_classifies(tmp_path):
    """A few GLMD steps already repair the 4 copied blocks far beyond their untrained state (perplexity about
    4e7, docs/results.md), and the classifier built from them trains and is scored on the 5 topics."""
    res = run_and_eval(SPECS / "smollm2-glmd.gkd", tmp_path, 8, ["small"], DATA / "lm_heldout.txt", 64)
    small = res["small"]
    assert small["metric"] == "perplexity" and small["count"] > 2000
    assert math.isfinite(small["value"]) and small["value"] < 1e5, small
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kl = [m["total"] for m in metrics if m["stage"] == "pretrain"]
    assert len(kl) == 8 and kl[-1] < kl[0], kl
    task = [m["total"] for m in metrics if m["stage"] == "task"]
    assert len(task) == 8 and all(math.isfinite(x) for x in task)
    r = gkdc("eval", str(tmp_path / "models" / "topic"), "--data", str(DATA / "topic_test.jsonl"), "--seq-len", "64",
             "--limit", "100", "--json", str(tmp_path / "acc.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    acc = json.loads((tmp_path / "acc.json").read_text())[0]
    assert acc["metric"] == "accuracy" and acc["count"] == 100 and 0.0 <= acc["value"] <= 1.0


@pytest.mark.slow
@NEEDS_REAL
def test_vocabulary_compressed_student_keeps_half_the_rows(tmp_path):
    spec = tmp_path / "vc.gkd"
    # the LM stage only: the compressed classifier is exercised by the full demo (docs/results.md)
    text = (SPECS / "smollm2-glmd-vc.gkd").read_text()
    text = text[: text.index("stage task")].replace("../../", str(ROOT) + "/")
    spec.write_text(text)
    res = run_and_eval(spec, tmp_path / "run", 4, ["small"], DATA / "lm_heldout.txt", 32)
    small = res["small"]
    assert small["note"] == "compressed vocabulary"
    assert small["embedding_parameters"] == 24576 * 576  # 50% of 49,152 rows, a multiple of 128
    assert math.isfinite(small["value"]) and small["value"] < 1e6, small  # untrained: ~4e7


def test_copy_init_reads_the_weights_an_earlier_stage_trained(tmp_path):
    """Stage `task` builds `cls` with init copy(lm) after stage `lm` trained `lm`: cls's blocks must start from
    lm's trained blocks (with lr 1e-12 in `task`, they stay equal to them), not from lm's initial weights."""
    import torch
    from safetensors.torch import load_file

    tiny, data = ROOT / "examples" / "tiny", ROOT / "examples" / "data"
    spec = tmp_path / "copy.gkd"
    spec.write_text(f"""
assistant base = hf("{tiny}") {{ init: random, dtype: fp32 }}
student lm = like(base) {{ layers: 2, hidden: 32, heads: 4, dtype: fp32 }}
student cls = like(base) {{ layers: 2, hidden: 32, heads: 4, dtype: fp32, head: classify(2), init: copy(lm) }}
data corpus = text("{data / 'corpus.txt'}") {{ seq_len: 16 }}
data sst2 = jsonl("{data / 'sst2.jsonl'}") {{ text: sentence, label: label, seq_len: 16 }}
stage lm_stage {{ data: corpus, steps: 3, batch: 4, optimizer: adamw(lr: 1e-2), loss: ce(tokens, lm.logits) }}
stage task after lm_stage {{ data: sst2, steps: 1, batch: 4, optimizer: adamw(lr: 1e-12, weight_decay: 0), loss: ce(labels, cls.task_logits) }}
""")
    r = gkdc("run", str(spec), "--out", str(tmp_path / "run"), "--no-progress", "--allow-path", str(ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    lm = load_file(tmp_path / "run" / "models" / "lm" / "model.safetensors")
    cls = load_file(tmp_path / "run" / "models" / "cls" / "model.safetensors")
    blocks = [k for k in cls if k.startswith("transformer.h.")]  # GPT-2 blocks (the tiny model is a GPT-2)
    assert len(blocks) > 8
    for key in blocks:
        torch.testing.assert_close(cls[key], lm[key], msg=key)
