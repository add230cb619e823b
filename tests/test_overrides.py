"""`--set PATH=VALUE` (gkdlang.overrides): values changed on the parsed spec, checked like the spec's own, reported
at `<--set N>:1:col`, recorded in the plan, its spec hash and its integrity seal."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from clitools import ROOT, gkdc
from gkdlang.lower import check_file, check_source
from planner.plan import Plan, plan_digest

KD = ROOT / "specs" / "kd.gkd"
GiB = 2**30


def codes(result) -> list[tuple[str, str]]:
    return [(d.code, str(d.span)) for d in result.diagnostics if d.severity == "error"]


def test_values_are_replaced_added_and_recorded():
    plain = check_file(KD)
    sets = ["stage.finetune.steps=100", "cluster.cpu_memory=64GiB", "stage.finetune.optimizer.lr=1e-5",
            "data.sst2.seq_len=64", "placement.zero=3"]
    result = check_file(KD, overrides=sets)
    assert result.ok, codes(result)
    spec, stage = result.spec, result.spec.stages[0]
    assert plain.spec.stages[0].epochs == 3 and plain.spec.stages[0].steps is None
    assert stage.steps == 100 and stage.epochs is None  # steps replaces epochs instead of conflicting with it
    assert spec.cluster.cpu_memory == 64 * GiB and plain.spec.cluster.cpu_memory is None
    assert stage.optimizer.lr == pytest.approx(1e-5) and stage.optimizer.weight_decay == pytest.approx(0.01)
    assert spec.data["sst2"].seq_len == 64 and stage.pin is not None and stage.pin.zero_stage == 3
    assert spec.overrides == sets and plain.spec.overrides == []
    assert spec.source_hash != plain.spec.source_hash
    assert check_file(KD, overrides=sets[::-1]).spec.source_hash != spec.source_hash  # order is part of it
    assert "overrides" not in plain.spec.model_dump(mode="json")  # specs without --set serialise as before


def test_later_override_wins_and_let_and_source_are_set():
    text = ('let T0 = 4\nteacher bert = hf("bert-base-uncased")\nstudent small = like(bert) { layers: 2 }\n'
            'data corpus = text("data/corpus.txt")\n'
            'stage s { data: corpus, steps: 10, loss: kl(bert.logits, small.logits, T: T0) }\n')
    base = ROOT / "tests" / "cases"
    result = check_source(text, "t.gkd", base_dir=base, overrides=["stage.s.steps=5", "stage.s.steps=7",
                                                                   "let.T0=2", "student.small.layers=3",
                                                                   'data.corpus=text("data/corpus.txt")'])
    assert result.ok, codes(result)
    assert result.spec.stages[0].steps == 7 and result.spec.stages[0].loss[0].options["T"].value == 2
    assert result.spec.models["small"].arch.num_layers == 3


@pytest.mark.parametrize("override, code, where, words", [
    ("stage.finetun.steps=100", "set-target", "<--set 1>:1:7", "did you mean 'finetune'"),
    ("student.bert.layers=3", "set-target", "<--set 1>:1:9", "students: small"),
    ("foo.x=1", "set-target", "<--set 1>:1:1", "stage, data"),
    ("placement.nope.zero=2", "set-target", "<--set 1>:1:11", "stages: finetune"),
    ("stage.finetune.batch.x=1", "set-target", "<--set 1>:1:22", "not a call"),
    ("stage.finetune", "set-syntax", "<--set 1>:1:1", "PATH=VALUE"),
    ("stage.finetune.steps=", "set-syntax", "<--set 1>:1:22", "no value"),
    ("stage finetune.steps=1", "set-syntax", "<--set 1>:1:1", "dotted path"),
    ("stage.finetune.steps=1 stage x { }", "set-syntax", "<--set 1>:1:24", "one expression"),
    ("stage.finetune.steps=10 0", "syntax-unexpected-token", "<--set 1>:1:25", "one expression"),
    ("stage.finetune.steps=(1", "syntax-unexpected-eof", "<--set 1>:1:", ""),
    ("stage.finetune.steps=-4", "bad-value", "<--set 1>:1:22", "at least 1"),
    ("stage.finetune.stepz=3", "unknown-option", "<--set 1>:1:16", "did you mean 'steps'"),
    ("teacher.bert.dtype=fp64", "bad-value", "<--set 1>:1:20", "dtype"),
    ("data.sst2.seq_len=\"a\"", "type-mismatch", "<--set 1>:1:19", "string"),
    ("data.sst2=jsonl(\"/etc/passwd\")", "path-outside-root", "<--set 1>:1:17", "outside"),
])
def test_bad_overrides_are_located_coded_errors(override, code, where, words):
    result = check_file(KD, overrides=["cluster.cpu_memory=64GiB", override])
    where = where.replace("<--set 1>", "<--set 2>")  # the second --set: the first is fine
    errors = [d for d in result.diagnostics if d.severity == "error"]
    assert result.spec is None and errors, result.diagnostics
    d = errors[0]
    assert d.code == code and str(d.span).startswith(where), (d.code, str(d.span), d.message)
    assert words in d.message + " " + (d.hint or ""), (d.message, d.hint)
    assert f"<--set 2>" in result.sources  # rendered with the override's text and a caret


def test_cli_renders_the_override_and_exits_1():
    proc = gkdc("check", str(KD), "--set", "stage.finetune.steps=-4")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "<--set 1>:1:22: error: steps must be at least 1" in proc.stderr
    assert "stage.finetune.steps=-4" in proc.stderr and "[bad-value]" in proc.stderr


def test_plan_records_the_overrides_under_its_seal(tmp_path):
    from runtime.errors import RunError
    from runtime.integrity import check_spec_origin, verify_plan

    spec, out = KD, tmp_path / "plan.json"
    proc = gkdc("plan", str(spec), "--set", "stage.finetune.steps=100", "--set", "cluster.cpu_memory=64GiB",
                "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    raw = json.loads(out.read_text())
    assert raw["spec"]["overrides"] == ["stage.finetune.steps=100", "cluster.cpu_memory=64GiB"]
    assert raw["stages"][0]["total_steps"] == 100 and raw["spec"]["cluster"]["cpu_memory"] == 64 * GiB
    assert any("--set stage.finetune.steps=100" in n for n in raw["notes"])
    plan = Plan.model_validate(raw)
    verify_plan(plan, out, spec.parent)  # sealed as written
    check_spec_origin(plan, out, spec)  # the spec file's hash with the recorded overrides is the plan's
    # dropping an override from the plan breaks its seal; resealed, the spec hash no longer matches the file
    edited = plan.model_copy(update={"spec": plan.spec.model_copy(update={"overrides": plan.spec.overrides[:1]})})
    assert plan_digest(edited) != plan.integrity
    with pytest.raises(RunError, match="edited after"):
        verify_plan(edited, out, spec.parent)
    with pytest.raises(RunError, match="changed since"):
        check_spec_origin(edited, out, spec)


def test_run_refuses_set_on_a_plan(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    proc = gkdc("run", str(plan), "--set", "stage.x.steps=1")
    assert proc.returncode == 2 and "re-plan the spec with --set" in proc.stderr


def test_documented_commands_run():
    """The `gkdc ... --set` commands of docs/language.md's --set section succeed as written."""
    text = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
    section = text.split("## Changing values from the command line", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^gkdc (.+)$", section, re.M)
    assert len(commands) >= 2
    for line in commands:
        args = line.split()
        if "-o" in args:
            args[args.index("-o") + 1] = "-"
        proc = gkdc(*args)
        assert proc.returncode == 0, (line, proc.stderr)
