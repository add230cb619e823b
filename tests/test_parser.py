"""Parser: golden AST dumps of every shipped spec and stdlib method file, plus the grammar's corner cases.

Goldens live in ``tests/golden/ast/<name>.txt`` (``ast.dump``: span-free, stable). After an intended change
to the grammar or the AST, rewrite them with ``GKDC_UPDATE_GOLDEN=1 pytest tests/test_parser.py`` and review
the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gkdlang import ast
from gkdlang.parser import ParseError, parse, parse_file

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "ast"
SOURCES = sorted((ROOT / "specs").glob("*.gkd")) + sorted((ROOT / "gkdlang" / "stdlib").glob("*.gkd"))
UPDATE = os.environ.get("GKDC_UPDATE_GOLDEN") == "1"


def golden_name(path: Path) -> str:
    return ("stdlib-" if path.parent.name == "stdlib" else "") + path.stem + ".txt"


def compare_golden(path: Path, actual: str) -> None:
    """Assert ``actual`` equals the golden file (or rewrite it under GKDC_UPDATE_GOLDEN=1)."""
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        return
    assert path.exists(), f"no golden {path.name}; run GKDC_UPDATE_GOLDEN=1 pytest {Path(__file__).name}"
    assert actual == path.read_text(encoding="utf-8"), f"{path.name} differs; if intended, rerun with GKDC_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("path", SOURCES, ids=golden_name)
def test_golden_ast(path: Path):
    compare_golden(GOLDEN / golden_name(path), ast.dump(parse_file(path)) + "\n")


def test_every_golden_has_a_source():
    names = {golden_name(p) for p in SOURCES}
    stale = [p.name for p in GOLDEN.glob("*.txt") if p.name not in names]
    assert not stale, f"goldens without a source (delete them): {stale}"
    assert len(SOURCES) >= 14


def one_expr(text: str) -> ast.Expr:
    module = parse(f"let x = {text}")
    return module.decls[0].value


# ---------------------------------------------------------------- expressions


def test_precedence_and_associativity():
    e = one_expr("1 + 2 * 3 ^ 2 ^ 3 - 4")
    assert isinstance(e, ast.BinOp) and e.op == "-"
    plus = e.left
    assert plus.op == "+" and plus.right.op == "*"
    power = plus.right.right
    assert power.op == "^" and power.right.op == "^"  # right-associative
    neg = one_expr("-2 ^ 2")
    assert isinstance(neg, ast.Neg) and neg.operand.op == "^"


def test_where_binds_loosest_and_masks_conjoin():
    e = one_expr("a + b where not pad and masked")
    assert isinstance(e, ast.Where) and e.expr.op == "+"
    assert [(m.negated, m.name.name) for m in e.mask] == [(True, "pad"), (False, "masked")]


@pytest.mark.parametrize("text, items", [
    ("h[3]", ["Number"]), ("h[-1]", ["Neg"]), ("h[*]", ["Star"]), ("h[1:4]", ["Slice"]), ("h[::2]", ["Slice"]),
    ("h[0, 2, 4]", ["Number", "Number", "Number"]),
])
def test_index_forms(text, items):
    e = one_expr(text)
    assert isinstance(e, ast.Index) and [type(i).__name__ for i in e.items] == items


def test_slice_parts():
    s = one_expr("h[1::2]").items[0]
    assert s.start.text == "1" and s.stop is None and s.step.text == "2"


@pytest.mark.parametrize("text", ["150k", "4e-4", "5%", "40GB", "64GiB", "1.5B", ".5", "2T"])
def test_numbers_keep_their_unit(text):
    e = one_expr(text)
    assert isinstance(e, ast.Number) and e.text == text


def test_hwspec_and_calls():
    e = one_expr("f(8 x A100-40GB, 2, k: v)")
    assert isinstance(e, ast.Call) and isinstance(e.args[0], ast.HwSpec)
    assert (e.args[0].count, e.args[0].device) == (8, "A100-40GB")
    assert [k.key.name for k in e.kwargs] == ["k"]


def test_tuples_lists_strings():
    assert len(one_expr("(0.9, 0.98)").items) == 2
    assert isinstance(one_expr("(1,)"), ast.Tuple)
    assert isinstance(one_expr("(1)"), ast.Number)
    assert len(one_expr("[]").items) == 0
    assert one_expr(r'"a\"b\\c\n"').value == 'a"b\\c\n'


def test_spans_are_one_based_and_cover_the_node():
    m = parse('teacher bert = hf("x")\nstudent s = like(bert) { layers: 6 }\n', "f.gkd")
    student = m.decls[1]
    assert (student.span.line, student.span.col) == (2, 1)
    assert (student.name.span.line, student.name.span.col, student.name.span.end_col) == (2, 9, 10)
    entry = student.options.entries[0]
    assert (entry.value.span.col, entry.value.span.end_col) == (34, 35)
    assert student.span.file == "f.gkd"


def test_separators_and_comments():
    a = parse("stage s { data: d; steps: 1, batch: 2 }  # trailing\n# own line\n")
    b = parse("stage s {\n  data: d\n  steps: 1\n  batch: 2\n}\n")
    assert ast.dump(a) == ast.dump(b)
    assert parse("# only a comment\n").decls == ()


# ---------------------------------------------------------------- syntax errors


@pytest.mark.parametrize("text, code, line, col, words", [
    ("teacher = hf(\"x\")", "syntax-unexpected-token", 1, 9, "expected name"),
    ("stage s { data d }", "syntax-unexpected-token", 1, 16, "expected ':'"),
    ("let x = 1 +", "syntax-unexpected-eof", 1, 12, "expected an expression"),
    ("let x = 'a'", "syntax-unexpected-char", 1, 9, "unexpected character"),
    ("let x = \"abc", "syntax-unexpected-char", 1, 9, "unterminated string"),
    ("let x = \"a\\qb\"", "bad-string", 1, 9, "invalid escape"),
    ("frobnicate x", "syntax-unexpected-token", 1, 1, "a declaration"),
])
def test_syntax_errors(text, code, line, col, words):
    with pytest.raises(ParseError) as info:
        parse(text, "e.gkd")
    d = info.value.diagnostic
    assert (d.code, d.span.line, d.span.col) == (code, line, col)
    assert words in d.message
