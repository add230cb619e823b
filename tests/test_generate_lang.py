"""``generate: on_policy(...)`` in a stage: lowered into ``StageSpec.generate`` (``lambda`` -> ``lmbda``), its
defaults, ``--set`` reaching its keywords, and the checks that need more than one case line (the located codes
themselves are cases: tests/cases/errors/{no_prompts,cannot_generate,generate_checks}.gkd)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gkdlang.lower import check_source
from gkdlang.spec import GenerateSpec

CASES = Path(__file__).resolve().parent / "cases"
HEAD = ('teacher gpt = hf("gpt2")\nstudent small = like(gpt) { layers: 2 }\n'
        'data corpus = text("data/corpus.txt") { seq_len: 32 }\n'
        'data talk = chat("data/chat.jsonl") { seq_len: 32 }\n')


def check(stage: str, overrides=()):
    return check_source(HEAD + stage, base_dir=CASES, overrides=overrides)


def errors(result) -> list[tuple[str, str]]:
    return [(d.code, d.message) for d in result.diagnostics if d.severity == "error"]


def test_every_keyword_is_lowered_into_the_spec():
    r = check('stage s { data: corpus, steps: 2, loss: kl(gpt.logits, small.logits, reverse: true)\n'
              '  generate: on_policy(prompts: talk, lambda: 0.25, seq_kd: true, max_new_tokens: 16, temperature: 0.5,'
              ' top_p: 0.9, top_k: 40, stop: ["<|im_end|>", "\\n"]) }\n')
    assert r.ok, errors(r)
    g = r.spec.stages[0].generate
    assert (g.prompts, g.lmbda, g.seq_kd, g.max_new_tokens) == ("talk", 0.25, True, 16)
    assert (g.temperature, g.top_p, g.top_k, g.stop) == (0.5, 0.9, 40, ["<|im_end|>", "\n"])
    assert (g.span.line, g.span.col) == (6, 13)
    assert "unused-definition" not in {d.code for d in r.diagnostics}  # the prompts' data counts as used


def test_defaults_are_the_spec_classes_and_a_stage_without_generate_has_none():
    r = check('stage s { data: corpus, steps: 2, loss: kl(gpt.logits, small.logits), generate: on_policy(prompts: corpus) }\n'
              'stage t after s { data: corpus, steps: 2, loss: kl(gpt.logits, small.logits) }\n')
    assert r.ok, errors(r)
    g, defaults = r.spec.stages[0].generate, GenerateSpec.model_fields
    for field in ("lmbda", "seq_kd", "max_new_tokens", "temperature", "top_p", "top_k"):
        assert getattr(g, field) == defaults[field].default, field
    assert g.stop == [] and r.spec.stages[1].generate is None


def test_set_reaches_the_generate_keywords():
    stage = 'stage s { data: corpus, steps: 2, loss: kl(gpt.logits, small.logits), generate: on_policy(prompts: corpus) }\n'
    r = check(stage, overrides=["stage.s.generate.lambda=0.5", "stage.s.generate.max_new_tokens=8",
                                "stage.s.generate.prompts=talk"])
    assert r.ok, errors(r)
    g = r.spec.stages[0].generate
    assert (g.lmbda, g.max_new_tokens, g.prompts) == (0.5, 8, "talk")
    bad = check(stage, overrides=["stage.s.generate.top_p=2"])
    assert [(d.code, d.span.file) for d in bad.diagnostics if d.severity == "error"] == [("bad-value", "<--set 1>")]
    added = check('stage s { data: corpus, steps: 2, loss: kl(gpt.logits, small.logits) }\n',
                  overrides=["stage.s.generate=on_policy(prompts: corpus, lambda: 1)"])
    assert added.ok and added.spec.stages[0].generate.lmbda == 1.0


@pytest.mark.parametrize("generate, code, words", [
    ("on_policy", "no-prompts", "needs prompts"),
    ("off_policy(prompts: corpus)", "unknown-function", "generator"),
    ("on_policy(corpus)", "bad-arity", "positional"),
    ("on_policy(prompts: corpus, beta: 0.5)", "unknown-option", "no option 'beta'"),
    ("on_policy(prompts: corpus, seq_kd: 1)", "type-mismatch", "true or false"),
    ("on_policy(prompts: corpus, stop: \"x\")", "type-mismatch", "list of strings"),
    ("on_policy(prompts: \"corpus\")", "no-prompts", "names no data"),
    ("on_policy(prompts: corpus, max_new_tokens: 1.5)", "bad-number", "whole number"),
])
def test_bad_generate_values_are_coded(generate, code, words):
    r = check(f'stage s {{ data: corpus, steps: 2, loss: kl(gpt.logits, small.logits), generate: {generate} }}\n')
    assert r.spec is None
    assert [c for c, _ in errors(r)] == [code], errors(r)
    assert words in errors(r)[0][1]


def test_lambda_zero_with_seq_kd_needs_a_generating_teacher_but_lambda_one_does_not():
    """With lambda 1 the teacher never generates, so seq_kd asks nothing of it; below 1 it samples."""
    bare = ('teacher t2 = like(gpt) { layers: 2, head: none }\n'
            'stage s { data: corpus, steps: 2, loss: mse(t2.hidden[1], small.hidden[1]), '
            'generate: on_policy(prompts: corpus, seq_kd: true, lambda: %s) }\n')
    assert check(bare % "1").ok
    r = check(bare % "0")
    assert [c for c, _ in errors(r)] == ["cannot-generate"] and "seq_kd" in errors(r)[0][1]


def test_a_cached_teacher_cannot_score_generations():
    r = check('teacher t2 = hf("gpt2") { cache: topk(k: 8) }\n'
              'stage s { data: corpus, steps: 2, loss: kl(t2.logits, small.logits), generate: on_policy(prompts: corpus) }\n')
    assert [c for c, _ in errors(r)] == ["cannot-generate"], errors(r)
    assert "cache" in errors(r)[0][1]


def test_seq_kd_needs_a_teacher_to_generate():
    r = check('stage s { data: corpus, steps: 2, loss: ce(tokens, small.logits), '
              'generate: on_policy(prompts: corpus, seq_kd: true, lambda: 0.5) }\n')
    assert [c for c, _ in errors(r)] == ["cannot-generate"] and "reads no teacher" in errors(r)[0][1]
