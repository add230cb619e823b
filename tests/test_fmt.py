"""Formatter: meaning kept (same AST), comments kept, idempotent on every spec; ``gkdc fmt`` exit codes and files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gkdlang import ast
from gkdlang.fmt import format_source
from gkdlang.parser import ParseError, parse

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (sorted((ROOT / "specs").glob("*.gkd")) + sorted((ROOT / "gkdlang" / "stdlib").glob("*.gkd"))
           + sorted((ROOT / "tests" / "cases" / "errors").glob("*.gkd")))


def parses(text: str) -> bool:
    try:
        parse(text)
        return True
    except ParseError:
        return False


_STRING = re.compile(r'"([^"\\\n]|\\.)*"')


def comments(text: str) -> list[str]:
    """Comment texts, found independently of the formatter's own scanner (strings blanked out first)."""
    out = []
    for line in text.splitlines():
        bare = _STRING.sub(lambda m: "_" * len(m.group()), line)
        if "#" in bare:
            out.append(line[bare.index("#"):].rstrip())
    return out


@pytest.mark.parametrize("path", [p for p in SOURCES if parses(p.read_text())], ids=lambda p: p.parent.name + "/" + p.stem)
def test_fmt_keeps_meaning_and_comments_and_is_idempotent(path: Path):
    text = path.read_text(encoding="utf-8")
    once = format_source(text)
    assert ast.dump(parse(once)) == ast.dump(parse(text))
    assert format_source(once) == once
    assert sorted(comments(once)) == sorted(comments(text))


def test_comment_placement():
    text = ('# header\nteacher bert = hf("bert-base-uncased")  # trailing\n'
            'stage s {  # after brace\n  # before data\n  data: d; steps: 1  # after steps\n  # end of block\n}\n'
            '# end of file\n')
    out = format_source(text)
    assert out == ('# header\nteacher bert = hf("bert-base-uncased")  # trailing\n\n'
                   'stage s {\n  # after brace\n  # before data\n  data: d\n  steps: 1  # after steps\n'
                   '  # end of block\n}\n\n# end of file\n')


def test_hash_in_string_is_not_a_comment():
    out = format_source('data d = text("a#b.txt")  # real\n')
    assert out == 'data d = text("a#b.txt")  # real\n'


def test_layout_rules():
    text = ('let a=1\nlet b =2\nteacher t=hf("x"){dtype:bf16}\n'
            'stage s { data: d, steps: 1, loss: kl(t.logits, s.logits) + mse(t.hidden[ -1 ], s.hidden[-1]) }')
    out = format_source(text)
    assert out.startswith("let a = 1\nlet b = 2\n\nteacher t = hf(\"x\") { dtype: bf16 }\n\nstage s {\n  data: d\n")
    assert "  loss: kl(t.logits, s.logits) + mse(t.hidden[-1], s.hidden[-1])\n}\n" in out


@pytest.mark.parametrize("expr, printed", [
    ("(a + b) * c", "(a + b) * c"), ("a - (b - c)", "a - (b - c)"), ("(a - b) - c", "a - b - c"),
    ("2 ^ (3 ^ 4)", "2 ^ 3 ^ 4"), ("(2 ^ 3) ^ 4", "(2 ^ 3) ^ 4"), ("-(a + b)", "-(a + b)"),
    ("(x where not pad) + y", "(x where not pad) + y"), ("(1,)", "(1,)"), ("h[ 1 : : 2 ]", "h[1::2]"),
    ("f( a , k : 2 )", "f(a, k: 2)"), ("8x A100-40GB", "8 x A100-40GB"),
])
def test_minimal_parentheses(expr, printed):
    assert format_source(f"let v = {expr}\n") == f"let v = {printed}\n"


def test_long_sum_is_broken_before_plus():
    terms = " + ".join(f"mse(teacher.hidden[{i}], project(student.hidden[{i}]))" for i in range(4))
    out = format_source(f"stage s {{ loss: {terms} where not pad }}\n")
    lines = out.splitlines()
    assert lines[1].startswith("  loss: mse(") and lines[2].lstrip().startswith("+ mse(")
    assert lines[-2].endswith("where not pad")
    assert format_source(out) == out


def test_empty_and_comment_only():
    assert format_source("") == ""
    assert format_source("# just a note\n") == "# just a note\n"


# ---------------------------------------------------------------- gkdc fmt


def gkdc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gkdc", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cli_fmt_check_and_rewrite(tmp_path: Path):
    messy = tmp_path / "messy.gkd"
    messy.write_text('teacher  bert=hf("bert-base-uncased")   # keep me\n')
    clean = tmp_path / "clean.gkd"
    clean.write_text(format_source(messy.read_text()))
    assert gkdc("fmt", "--check", "clean.gkd", cwd=tmp_path).returncode == 0
    proc = gkdc("fmt", "--check", "messy.gkd", "clean.gkd", cwd=tmp_path)
    assert proc.returncode == 1 and "messy.gkd: would reformat" in proc.stderr
    assert messy.read_text().startswith("teacher  bert=")  # --check writes nothing
    proc = gkdc("fmt", "--stdout", "messy.gkd", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == clean.read_text()
    assert gkdc("fmt", "messy.gkd", cwd=tmp_path).returncode == 0
    assert messy.read_text() == clean.read_text() == 'teacher bert = hf("bert-base-uncased")  # keep me\n'
    assert gkdc("fmt", "--check", "messy.gkd", cwd=tmp_path).returncode == 0


def test_cli_fmt_syntax_error_leaves_file_untouched(tmp_path: Path):
    bad = tmp_path / "bad.gkd"
    original = 'teacher bert = hf("bert-base-uncased")\nstage s {\n  data corpus\n}\n'
    bad.write_text(original)
    proc = gkdc("fmt", "bad.gkd", cwd=tmp_path)
    assert proc.returncode == 1
    assert "bad.gkd:3:8: error:" in proc.stderr and "[syntax-unexpected-token]" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert bad.read_text() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gkd"]  # no temporary file left behind


def test_cli_fmt_missing_file_is_an_error(tmp_path: Path):
    proc = gkdc("fmt", "nope.gkd", cwd=tmp_path)
    assert proc.returncode == 1 and "nope.gkd" in proc.stderr and "Traceback" not in proc.stderr
