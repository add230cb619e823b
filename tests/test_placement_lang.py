"""The placement block and the data `packing` key in the language: parsing, formatting, lowering to pins,
precedence, checks that point at the pin, and reproducing a plan's placement from the block the report prints."""

from __future__ import annotations

from pathlib import Path

from gkdlang.fmt import format_source
from gkdlang.lower import check_source
from planner.build import build_plan
from planner.describe import pin_block

HEAD = """
teacher big = hf("gpt2")
student small = like(big) { layers: 2 }
data corpus = text("c.txt") { seq_len: 64 }
stage a { data: corpus, steps: 10, batch: 16, loss: kl(big.logits, small.logits) }
stage b after a { data: corpus, steps: 10, batch: 16, loss: kl(big.logits, small.logits) }
"""
CLUSTER = "cluster { gpus: 2 x A100-40GB, cpu_memory: 256GB }\n"


def _check(tmp_path: Path, text: str):
    (tmp_path / "c.txt").write_text("the cat sat on the mat\n" * 40)
    return check_source(text, str(tmp_path / "t.gkd"), base_dir=tmp_path)


def _spec(tmp_path: Path, text: str):
    result = _check(tmp_path, text)
    assert result.spec is not None, [d.message for d in result.diagnostics]
    return result.spec


def _plan(tmp_path: Path, text: str):
    plan = build_plan(_spec(tmp_path, text), gkdc_version="t", spec_path=str(tmp_path / "t.gkd"))
    assert not hasattr(plan, "diagnostics"), plan
    return plan


def test_global_and_stage_blocks_lower_to_pins_with_spans(tmp_path):
    spec = _spec(tmp_path, HEAD + "placement { zero: 3; checkpointing: true; teacher big: cached }\n"
                 "placement b { zero: 1, micro_batch: 4, teacher big: replicated }\n" + CLUSTER)
    a, b = spec.stages
    assert (a.pin.zero_stage, a.pin.teachers, a.activation_checkpointing, a.micro_batch) == (
        3, {"big": "offline"}, True, None)
    assert (b.pin.zero_stage, b.pin.teachers, b.activation_checkpointing, b.micro_batch) == (
        1, {"big": "replicated"}, True, 4)
    assert a.pin.span.line == 7 and b.pin.span.line == 8
    assert a.pin.spans["teacher big"].line == 7 and b.pin.spans["teacher big"].line == 8
    assert b.pin.spans["checkpointing"].line == 7  # inherited from the global block, pointing there


def test_stage_keys_are_pins_and_a_conflict_is_reported(tmp_path):
    text = HEAD.replace("batch: 16, loss", "batch: 16, micro_batch: 8, loss", 1)
    spec = _spec(tmp_path, text + CLUSTER)
    assert spec.stages[0].pin.spans.keys() == {"micro_batch"} and spec.stages[1].pin is None
    bad = _check(tmp_path, text + "placement a { micro_batch: 2 }\n" + CLUSTER)
    (diag,) = [d for d in bad.diagnostics if d.severity == "error"]
    assert diag.code == "conflicting-options" and diag.span.line == 7 and diag.related[0][0].line == 5


def test_a_pinned_micro_batch_meets_the_stage_checks_at_the_pin(tmp_path):
    text = HEAD.replace("loss: kl(big.logits, small.logits) }\nstage b", "loss: kl(big.logits, small.logits) "
                        "+ perturb(small) }\nstage b", 1)
    result = _check(tmp_path, text + "placement a { micro_batch: 2 }\n" + CLUSTER)
    (diag,) = [d for d in result.diagnostics if d.severity == "error"]
    assert diag.code == "perturb-accumulation" and (diag.span.line, diag.span.col) == (7, 28)


def test_a_teacher_the_stage_does_not_read_cannot_be_pinned_for_it(tmp_path):
    text = HEAD.replace('student small', 'teacher other = hf("gpt2")\nstudent small')
    result = _check(tmp_path, text + "placement a { teacher other: sharded }\n" + CLUSTER)
    assert [d.code for d in result.diagnostics if d.severity == "error"] == ["bad-value"]
    # a global block's teacher applies only where the teacher is read
    spec = _spec(tmp_path, text + "placement { teacher other: sharded }\n" + CLUSTER)
    assert spec.stages[0].pin is None  # nothing of that block applies to stage a


def test_fmt_keeps_placement_blocks(tmp_path):
    text = HEAD + "placement b {teacher big:sharded;zero:3}\n" + CLUSTER
    out = format_source(text, "t.gkd")
    assert "placement b { teacher big: sharded, zero: 3 }" in out
    assert format_source(out, "t.gkd") == out
    assert _spec(tmp_path, out).stages[1].pin.zero_stage == 3


def test_data_packing_key(tmp_path):
    spec = _spec(tmp_path, HEAD.replace("seq_len: 64", "seq_len: 64, packing: false") + CLUSTER)
    assert spec.data["corpus"].packing is False
    bad = _check(tmp_path, HEAD.replace("seq_len: 64", "seq_len: 64, packing: 1") + CLUSTER)
    assert [d.code for d in bad.diagnostics if d.severity == "error"] == ["type-mismatch"]


def test_the_printed_block_reproduces_the_plan(tmp_path):
    """`gkdc plan --explain` prints `to pin it: placement ...`; pasted into the spec it gives the same placement,
    which the plan then reports as the planner's own choice."""
    free = _plan(tmp_path, HEAD + CLUSTER)
    blocks = "".join(pin_block(sp.name, sp.placement) + "\n" for sp in free.stages)
    pinned = _plan(tmp_path, HEAD + blocks + CLUSTER)
    for before, after in zip(free.stages, pinned.stages):
        assert after.placement == before.placement
        assert after.pin.verdict.endswith("is the planner's own choice")
        assert after.pin.planner_choice.placement == before.placement
