"""Models built into their placement (issue 11), two ranks on CPU through the deepspeed launcher.

``scale_ranks.py`` runs on both ranks: a ZeRO-3 teacher built partitioned and streamed from safetensors gives
the replicated teacher's logits and hidden states exactly (asserted to 1e-5), a pruned teacher is built with
only its blocks, and each rank's peak resident memory (VmHWM, reset before each phase) while building the
teacher, building + loading a ZeRO-3 student and saving it stays under what a whole copy would cost.
Measured (2 ranks, 127 MB fp32 teacher T, 84 MB fp32 student S, ranks mapping allocations >= 1 MiB on
their own): partitioned teacher build 0.66 T / 0.63 T, student build + load 0.52 S / 0.87 S, save 0.13 S /
0.07 S; the old whole-copy path (measured with a 51 MB student before the allocator setting) 1.03 T / 0.73 T
and 1.23 S / 1.42 S, which the bounds below refuse (``test_the_check_catches_a_whole_copy``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Bounds between what the partitioned path measured and what a whole copy costs. VmHWM also counts pages that
# the phase maps for the first time (shared libraries and ops loaded lazily), which vary from one machine state
# to another: a clean clone measured the partitioned teacher build at 0.79 T where a warm checkout measured 0.66,
# so the bounds leave that room and still refuse the whole-copy path (1.03 T, 1.42 S at its worst rank).
TEACHER_BOUND = 0.9  # of the teacher's bytes: 1/2 (the shard) + one gathered module + lazily mapped pages
STUDENT_BOUND = 1.1  # of the fp32 student's bytes: a whole copy is 1, and its build and load 1.2-1.4
# A compressed-vocabulary student copying its init from the teacher (103 MB fp32 at its 2000 kept rows of 8000),
# build only: partitioned measured 0.51 S / 0.56 S, the old whole build (full rows, then compressed) 1.17 / 1.18 S.
COMPRESSED_BOUND = 0.9


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _models(root: Path) -> tuple[Path, Path]:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    dirs = []
    # the student's largest tensor is small beside it (two of them are whole while it is built partitioned)
    for name, hidden, layers, inter, vocab in (("teacher", 512, 8, 1408, 8000), ("student", 384, 12, 1024, 2000)):
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                             tie_word_embeddings=False)
        tf.LlamaForCausalLM(cfg).save_pretrained(root / name)
        dirs.append(root / name)
    return dirs[0], dirs[1]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    return _models(tmp_path_factory.mktemp("scale"))


def _run(model_dirs, out: Path, mode: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}}
    env["PYTHONPATH"] = str(REPO)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    launcher = Path(sys.executable).with_name("deepspeed")
    argv = [str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), str(REPO / "tests" / "scale_ranks.py"),
            str(model_dirs[0]), str(model_dirs[1]), str(out / "check.json"), mode]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    done = [out / f"check-rank{r}.json" for r in (0, 1)]
    log = (proc.stdout + proc.stderr)[-4000:]
    assert all(p.exists() for p in done), f"a rank did not finish (exit {proc.returncode}):\n{log}"
    return [json.loads(p.read_text()) for p in done]


@pytest.mark.deepspeed
def test_partitioned_teacher_equals_replicated_and_no_rank_holds_a_whole_copy(model_dirs, tmp_path):
    from safetensors.torch import load_file

    ranks = _run(model_dirs, tmp_path, "partitioned")
    for r in ranks:
        assert r["teacher_partitioned"]
        assert all(diff <= 1e-5 for diff in r["max_abs_diff"].values()), r["max_abs_diff"]
        assert r["pruned_blocks"] == 1 and r["pruned_head"] == "Identity"
        assert r["teacher_build"] < TEACHER_BOUND * r["teacher_bytes"], r
        assert r["student_build_load"] < STUDENT_BOUND * r["student_bytes"], r
    assert ranks[1]["student_save"] < 0.25 * ranks[1]["student_bytes"]  # rank 1 only takes part in the gathers
    assert ranks[0]["student_save"] < 0.6 * ranks[0]["student_bytes"]  # rank 0 writes one tensor at a time
    # what was saved from the partitions is the student file that was loaded into them
    want, got = load_file(str(model_dirs[1] / "model.safetensors")), load_file(ranks[0]["saved"])
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)


@pytest.mark.deepspeed
@pytest.mark.slow
def test_the_check_catches_a_whole_copy(model_dirs, tmp_path):
    # the pre-issue-11 path (whole build on every rank, partitioned afterwards) must exceed the bounds
    ranks = _run(model_dirs, tmp_path, "whole")
    assert max(r["teacher_build"] / r["teacher_bytes"] for r in ranks) > TEACHER_BOUND
    assert max(r["student_build_load"] / r["student_bytes"] for r in ranks) > STUDENT_BOUND


@pytest.mark.deepspeed
def test_a_run_with_a_sharded_teacher_ends_with_the_replicated_runs_student(tmp_path):
    import torch

    from test_multirank import _launch
    from test_recipe import make_plan, student_tensors

    students = []
    for sharded in (False, True):
        root = tmp_path / ("sharded" if sharded else "replicated")
        plan_path = make_plan(root, steps=(3,), zero=2, world=2, micro=2, accum=1, sharded_teacher=sharded)
        proc = _launch(plan_path, root / "out")
        done = list((root / "out" / "ranks").glob("rank*.json"))
        assert len(done) == 2, f"a rank did not finish:\n{(proc.stdout + proc.stderr)[-3000:]}"
        students.append(student_tensors(root / "out"))
    replicated, sharded = students
    assert replicated.keys() == sharded.keys()
    for key in replicated:
        torch.testing.assert_close(sharded[key], replicated[key], rtol=1e-5, atol=1e-6)


@pytest.mark.deepspeed
def test_a_zero3_student_with_a_compressed_vocabulary_is_built_partitioned(model_dirs, tmp_path):
    # built at the compressed size, its rows copied from the teacher's kept rows: the whole-built values, and
    # no rank holds the whole fp32 student (measured: see COMPRESSED_BOUND)
    ranks = _run(model_dirs, tmp_path, "vocab")
    for r in ranks:
        assert r["partitioned"]
        assert r["student_build"] < COMPRESSED_BOUND * r["student_bytes"], ranks
    assert ranks[0]["keys_equal"] and ranks[0]["rows"] == [2000, 512]
    assert ranks[0]["max_abs_diff"] <= 1e-6


@pytest.mark.deepspeed
@pytest.mark.slow
def test_the_check_catches_a_whole_compressed_student(model_dirs, tmp_path):
    ranks = _run(model_dirs, tmp_path, "vocab-whole")
    assert ranks[0]["max_abs_diff"] <= 1e-6  # the reference itself
    assert max(r["student_build"] / r["student_bytes"] for r in ranks) > COMPRESSED_BOUND
