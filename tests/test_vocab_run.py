"""GLMD vocabulary compression end to end through the CLI: spec -> plan -> run -> a compressed student that
loads with the documented loader and evaluates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clitools import ROOT, gkdc
from tinyspec import run_at_zero_stages, tiny_spec, vocab_block


STUDENT = "student s = like(t) { layers: 1, hidden: 32, heads: 2, dtype: fp32 }"
SPEC = tiny_spec(STUDENT, steps=3, temperature=15, vocab=vocab_block())


def test_compressed_student_trains_saves_and_loads(tmp_path):
    spec = tmp_path / "glmd.gkd"
    spec.write_text(SPEC)
    out = tmp_path / "run"
    # the spec in a temporary folder reads the repository's files: allowed explicitly (docs/security.md)
    r = gkdc("run", str(spec), "--out", str(out), "--no-progress", "--allow-path", str(ROOT))
    assert r.returncode == 0, r.stderr
    plan = json.loads((out / "plan.json").read_text())
    vocab = plan["spec"]["vocabs"]["s"]
    full = vocab["full_size"]
    assert vocab["keep_rows"] == 80 and full == 146  # 73 rows (50%) rounded up to a multiple of 16
    student = out / "student"
    mapping = json.loads((student / "gkdc_vocab.json").read_text())
    assert len(mapping["kept_ids"]) == 80
    from runtime.vocab import load_compressed

    model, tokenizer = load_compressed(student)
    assert model.get_input_embeddings().weight.shape[0] == 80
    from transformers import AutoTokenizer

    full_tok = AutoTokenizer.from_pretrained(ROOT / "examples" / "tiny")
    for word in ("yes", "no"):  # protected words survive compression
        assert full_tok.convert_tokens_to_ids(word) in mapping["kept_ids"]
    ids = tokenizer("the cat sees the dog .", return_tensors="pt")["input_ids"]
    assert int(ids.max()) < 80
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    r = gkdc("eval", str(student), "--data", str(ROOT / "examples/data/heldout.txt"), "--limit", "20")
    assert r.returncode == 0, r.stderr
    assert "compressed vocabulary" in r.stdout


def test_single_rank_run_ignores_a_stale_rendezvous_in_its_environment(tmp_path):
    """RANK/MASTER_PORT inherited from a parent (a job script, a test runner) name a store this run must not
    join: a single-rank `gkdc run` picks its own port even when the inherited one is taken."""
    import os
    import socket
    import subprocess
    import sys

    from clitools import clean_env

    spec = tmp_path / "glmd.gkd"
    spec.write_text(SPEC)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = dict(clean_env(), RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(taken.getsockname()[1]))
        r = subprocess.run([sys.executable, "-m", "gkdc", "run", str(spec), "--out", str(tmp_path / "run"),
                            "--no-progress", "--max-steps", "1", "--allow-path", str(ROOT)], cwd=ROOT, env=env,
                           capture_output=True,
                           text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.exists(tmp_path / "run" / "student" / "gkdc_vocab.json")


def test_a_zero3_compressed_student_trains_as_the_replicated_one(tmp_path):
    # the ZeRO-3 student is built partitioned at its kept rows (runtime/stagemodels.py), its init copied from the
    # teacher's kept rows: the run ends with the student a whole-built (ZeRO-0) run trains, within fp tolerance
    from safetensors.torch import load_file

    student = "student s = like(t) { layers: 1, dtype: fp32, init: copy(t) }"
    students = []
    for zero in (0, 3):
        spec = tmp_path / f"zero{zero}.gkd"
        spec.write_text(tiny_spec(student, steps=3, temperature=15, vocab=vocab_block(), zero=zero))
        out = tmp_path / f"run{zero}"
        r = gkdc("run", str(spec), "--out", str(out), "--no-progress", "--allow-path", str(ROOT))
        assert r.returncode == 0, r.stderr
        plan = json.loads((out / "plan.json").read_text())
        assert plan["stages"][0]["placement"]["zero_stage"] == zero
        students.append(load_file(str(out / "student" / "model.safetensors")))
    whole, partitioned = students
    assert whole.keys() == partitioned.keys() and whole["transformer.wte.weight"].shape[0] == 80
    for key in whole:
        torch.testing.assert_close(partitioned[key], whole[key], rtol=1e-5, atol=1e-6)


def _pretrained_student(folder: Path) -> Path:
    """A one-block GPT-2 (tied embedding and head) of examples/tiny's shape with its tokenizer, saved whole."""
    import shutil

    import transformers as tf

    cfg = tf.GPT2Config.from_pretrained(ROOT / "examples" / "tiny", n_layer=1)
    torch.manual_seed(5)
    tf.GPT2LMHeadModel(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "examples" / "tiny" / name, folder / name)
    return folder


@pytest.mark.parametrize("source", ["t", "s"])
def test_a_pretrained_zero3_compressed_student_trains_as_the_replicated_one(tmp_path, source):
    # a pretrained ZeRO-3 student with a compressed vocabulary is built partitioned at its kept rows, streamed
    # from its files (of its tied embedding / head only the kept rows), its vocabulary ranked from the teacher
    # or from itself (its embeddings read from its files): the run ends with the student of a whole-built
    # (ZeRO-0) run, which loads the student whole and then compresses it
    from safetensors.torch import load_file

    folder = _pretrained_student(tmp_path / "student")
    student = f'student s = hf("{folder}") {{ dtype: fp32, frozen: false }}'
    vocab = vocab_block(source, remap=f"nearest({source}.embeddings)")
    # logits over the student's own compressed vocabulary are not the teacher's: it learns its hidden states
    loss = "" if source == "t" else "mse(t.hidden[0], s.hidden[0]) + ce(tokens, s.logits)"
    outs = run_at_zero_stages(tmp_path, student, steps=2, vocab=vocab, loss=loss)
    students = [load_file(str(out / "student" / "model.safetensors")) for out in outs]
    maps = [json.loads((out / "student" / "gkdc_vocab.json").read_text()) for out in outs]
    assert maps[0] == maps[1]  # the same kept rows and nearest-neighbour remap
    whole, partitioned = students
    assert whole.keys() == partitioned.keys() and whole["transformer.wte.weight"].shape[0] == 80
    # ranked from itself the two steps train on the hidden and CE gradients, summed in another order under ZeRO-3
    # (measured: 1.5e-6 at most); a wrong row or remap would differ by the init's scale (0.02)
    for key in whole:
        torch.testing.assert_close(partitioned[key], whole[key], rtol=1e-5, atol=1e-6 if source == "t" else 1e-5)


def test_a_pickle_zero3_student_ranking_its_own_vocabulary_is_built_partitioned_as_the_whole_one(tmp_path):
    # a student whose weights are a pickle (.bin, --allow-pickle) cannot be streamed from safetensors: ranked by its
    # own embeddings under ZeRO-3 it is built partitioned at the full size, its vocabulary map made from its gathered
    # embeddings, its kept rows copied into the compressed partitioned student and the full one dropped
    # (runtime/stagemodels.py). The run ends with the student of a whole-built (ZeRO-0) run and the same map
    from safetensors.torch import load_file

    import shutil

    import transformers as tf

    source, folder = _pretrained_student(tmp_path / "st"), tmp_path / "student"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    # transformers 5 writes only safetensors: the pickle is written as older checkpoints hold it
    torch.save(tf.GPT2LMHeadModel.from_pretrained(source).state_dict(), folder / "pytorch_model.bin")
    assert (folder / "pytorch_model.bin").exists() and not list(folder.glob("*.safetensors"))
    student = f'student s = hf("{folder}") {{ dtype: fp32, frozen: false }}'
    outs = run_at_zero_stages(tmp_path, student, run_args=("--allow-pickle",), steps=2,
                              vocab=vocab_block("s", remap="nearest(s.embeddings)"),
                              loss="mse(t.hidden[0], s.hidden[0]) + ce(tokens, s.logits)")
    whole, partitioned = (load_file(str(out / "student" / "model.safetensors")) for out in outs)
    maps = [json.loads((out / "student" / "gkdc_vocab.json").read_text()) for out in outs]
    assert maps[0] == maps[1]
    assert whole.keys() == partitioned.keys() and whole["transformer.wte.weight"].shape[0] == 80
    for key in whole:  # as the safetensors self-ranked case: gradients summed in another order under ZeRO-3
        torch.testing.assert_close(partitioned[key], whole[key], rtol=1e-5, atol=1e-5)
