"""A pretrained (local) student placed under ZeRO-3 starts from its files' weights: loaded by transformers'
partitioned ``from_pretrained`` (runtime/models.py build_student_partitioned), so a one-rank ZeRO-3 run ends
with the student a ZeRO-0 run trains from the same files."""

from __future__ import annotations

import json
import shutil

import torch

from clitools import ROOT, gkdc

SPEC = """
teacher t = hf("{root}/examples/tiny") {{ init: random, dtype: fp32 }}
student s = hf("{student}") {{ dtype: fp32, frozen: false }}
data corpus = text("{root}/examples/data/corpus.txt") {{ seq_len: 32 }}
stage pretrain {{
  data: corpus
  steps: 2
  batch: 4
  optimizer: adamw(lr: 1e-3)
  loss: kl(t.logits, s.logits, T: 2) where not pad
}}
placement {{ zero: {zero} }}
"""


def test_a_pretrained_zero3_student_starts_from_its_files(tmp_path):
    import transformers as tf
    from safetensors.torch import load_file

    folder = tmp_path / "student"
    cfg = tf.GPT2Config.from_pretrained(ROOT / "examples" / "tiny", n_layer=1)
    torch.manual_seed(3)
    tf.GPT2LMHeadModel(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "examples" / "tiny" / name, folder / name)
    students = []
    for zero in (0, 3):
        spec = tmp_path / f"zero{zero}.gkd"
        spec.write_text(SPEC.format(root=ROOT, student=folder, zero=zero))
        out = tmp_path / f"run{zero}"
        r = gkdc("run", str(spec), "--out", str(out), "--no-progress", "--allow-path", str(ROOT),
                 "--allow-path", str(tmp_path))
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "plan.json").read_text())["stages"][0]["placement"]["zero_stage"] == zero
        students.append(load_file(str(out / "student" / "model.safetensors")))
    whole, partitioned = students
    start = load_file(str(folder / "model.safetensors"))
    key = "transformer.h.0.attn.c_attn.weight"
    assert (whole[key] - start[key]).abs().max() < 0.05  # two small steps from the files' weights
    for key in whole:
        torch.testing.assert_close(partitioned[key], whole[key], rtol=1e-5, atol=1e-6)
