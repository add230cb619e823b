"""Text -> AST. The one boundary where lark's exceptions become ``syntax-*`` diagnostics."""

from __future__ import annotations

import contextlib
import functools
import gc
import re
from pathlib import Path

import lark
from lark import Lark, Transformer
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedToken, VisitError

from gkdlang import ast
from gkdlang.diagnostics import Diagnostic
from gkdlang.spec import Span

GRAMMAR = Path(__file__).with_name("grammar.lark")
#: the language's keywords (whole words; see grammar.lark)
KEYWORDS = {"USE", "DATA", "VOCAB", "FROM", "METHOD", "STAGE", "AFTER", "CLUSTER", "LET", "TEACHER", "STUDENT",
            "ASSISTANT", "WHERE", "AND", "NOT", "TRUE", "FALSE"}


class ParseError(Exception):
    """A syntax error; carries exactly one diagnostic (parsing stops at the first syntax error)."""

    def __init__(self, diagnostic: Diagnostic):
        super().__init__(diagnostic.message)
        self.diagnostic = diagnostic


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    # cache=True stores the LALR tables on disk: `gkdc check` then starts in milliseconds
    return Lark(GRAMMAR.read_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True,
                cache=True)


#: largest spec accepted, in characters. Measured by bench/large_spec.py on the 2-core dev box (load 5-7): a
#: 5 MB spec of 55,000 lets, 5,500 methods and 200 stages checks (--no-plan) in 16 s with 0.72 GB peak, 1 MB in
#: 2 s with 0.17 GB; memory grows ~145 bytes per character, so the cap keeps a check near 1.2 GB and well
#: under a minute; a bigger file is refused before parsing, so no phase runs unbounded
MAX_SPEC_CHARS = 8 * 1024 * 1024


def parse(text: str, file: str = "<input>") -> ast.Module:
    """Parse a whole .gkd text; raises ParseError with a positioned diagnostic."""
    if text.startswith("\ufeff"):  # a UTF-8 byte-order mark some editors write: not part of the text
        text = text[1:]
    if len(text) > MAX_SPEC_CHARS:
        raise ParseError(Diagnostic("spec-too-large", f"the spec is {len(text):,} characters long; gkdc reads specs "
                                    f"of at most {MAX_SPEC_CHARS:,}", Span(file=file, line=1, col=1, end_line=1,
                                                                           end_col=2),
                                    "split it into several specs, or move repeated parts into methods"))
    _check_brackets(text, file)
    with no_gc():
        try:
            tree = _parser().parse(text)
        except (UnexpectedCharacters, UnexpectedToken, UnexpectedEOF) as exc:
            raise ParseError(_syntax_diagnostic(exc, text, file)) from None
        _check_depth(tree, file)
        try:
            return _ToAst(file).transform(tree)
        except VisitError as exc:  # raised inside a transformer method: unwrap lark's wrapper
            if isinstance(exc.orig_exc, ParseError):
                raise exc.orig_exc from None
            raise


@contextlib.contextmanager
def no_gc():
    """The cyclic garbage collector paused while a spec is parsed: parsing allocates millions of objects that
    all stay alive until the AST is built (no cycles), and each collection rescans them (a third of the time
    of a 1 MB spec, more as the heap grows)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


#: deepest expression accepted; every later phase recurses over the tree (real specs nest about 15 deep)
MAX_DEPTH = 100


#: most operands of one flat chain of ``+``/``-`` (or of ``*``/``/``): a chain counts one level of nesting, but
#: phases still walk it operand by operand
MAX_CHAIN = 400
_CHAINS = {"add": "sum", "sub": "sum", "mul": "product", "div": "product"}
_BRACKETS = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|[()\[\]{}]')


def _check_brackets(text: str, file: str) -> None:
    """Brackets nested deeper than MAX_DEPTH (they make no tree node of their own, so ``_check_depth`` cannot see
    them): refused at the first bracket past the limit."""
    depth = 0
    for m in _BRACKETS.finditer(text):
        ch = m.group()
        if ch in "([{":
            depth += 1
            if depth > MAX_DEPTH:
                line = text.count("\n", 0, m.start()) + 1
                col = m.start() - (text.rfind("\n", 0, m.start()) + 1) + 1
                raise ParseError(Diagnostic("nesting-too-deep", f"brackets nested more than {MAX_DEPTH} levels deep",
                                            Span(file=file, line=line, col=col, end_line=line, end_col=col + 1),
                                            "split the expression with `let` declarations"))
        elif ch in ")]}":
            depth = max(0, depth - 1)


def _check_depth(tree: lark.Tree, file: str) -> None:
    """Reject absurdly deep trees up front (iteratively), so no phase can hit Python's recursion limit.

    The left operand of a chain of the same precedence (``a + b + c``) does not nest deeper: a flat sum of 99
    terms is one level, and is limited by its length (MAX_CHAIN) instead."""
    stack = [(tree, 1, tree, 1)]
    while stack:
        node, depth, decl, chain = stack.pop()
        if depth > MAX_DEPTH:  # point at the declaration: the deepest node is an arbitrary leaf
            raise ParseError(Diagnostic("nesting-too-deep", f"expression nested more than {MAX_DEPTH} levels deep",
                                        _span(file, decl.meta), "split it with `let` declarations"))
        kind = _CHAINS.get(node.data) if isinstance(node.data, str) else None
        if chain >= MAX_CHAIN:  # a chain of k operators has k + 1 operands
            raise ParseError(Diagnostic("nesting-too-deep", f"a {kind} of more than {MAX_CHAIN} operands",
                                        _span(file, node.meta), "split it with `let` declarations"))
        for i, child in enumerate(node.children):
            if isinstance(child, lark.Tree):
                same = kind is not None and i == 0 and _CHAINS.get(child.data) == kind
                stack.append((child, depth if same else depth + 1, child if depth == 1 else decl,
                              chain + 1 if same else 1))


def parse_file(path: str | Path) -> ast.Module:
    path = Path(path)
    return parse(path.read_text(encoding="utf-8"), str(path))


# ---------------------------------------------------------------- lark tree -> AST


# Spans are built unvalidated (``model_construct``): lark's positions are ints by construction, and validating
# one Span per AST node was 20% of the time a 1 MB spec took to parse (bench/large_spec.py)
_new_span = Span.model_construct


def _span(file: str, meta) -> Span:
    if getattr(meta, "empty", True):
        return _new_span(file=file, line=1, col=1, end_line=1, end_col=1)
    return _new_span(file=file, line=meta.line, col=meta.column, end_line=meta.end_line, end_col=meta.end_column)


def _tok_span(file: str, tok: lark.Token) -> Span:
    return _new_span(file=file, line=tok.line, col=tok.column, end_line=tok.end_line, end_col=tok.end_column)


_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}


class _ToAst(Transformer):
    """Builds AST nodes bottom-up; every span comes from ``self.s(meta)``. Each rule's method takes
    ``(meta, children)``, as under lark's ``v_args(meta=True)``, called directly by ``_call_userfunc``: the
    decorator wraps every call anew (functools.update_wrapper), a third of the transform's time."""

    def __init__(self, file: str):
        super().__init__(visit_tokens=False)  # no terminal has a callback: tokens reach the rules as they are
        self.file = file

    def _call_userfunc(self, tree, new_children=None):
        children = new_children if new_children is not None else tree.children
        try:
            f = getattr(self, tree.data)
        except AttributeError:
            return self.__default__(tree.data, children, tree.meta)
        try:
            return f(tree.meta, children)
        except Exception as e:  # as lark's own: wrapped, and unwrapped at the one boundary (parse)
            raise VisitError(tree.data, tree, e) from e

    def s(self, meta) -> Span:
        return _span(self.file, meta)

    # declarations
    def start(self, meta, decls):
        return ast.Module(self.s(meta), tuple(decls), self.file)

    def use_decl(self, meta, paths):
        return ast.Use(self.s(meta), tuple(paths))

    def dotted(self, meta, idents):
        return tuple(idents)

    def role(self, meta, toks):
        return str(toks[0])

    def model_decl(self, meta, c):
        return ast.ModelDecl(self.s(meta), c[0], c[1], c[2], c[3])

    def data_decl(self, meta, c):
        return ast.DataDecl(self.s(meta), c[0], c[1], c[2])

    def vocab_decl(self, meta, c):
        return ast.VocabDecl(self.s(meta), c[0], c[1], c[2])

    def method_decl(self, meta, c):
        name, *params, body = c
        return ast.MethodDecl(self.s(meta), name, tuple(p for p in params if p is not None), body)

    def param(self, meta, c):
        return ast.Param(self.s(meta), c[0], c[1])

    def stage_decl(self, meta, c):
        return ast.StageDecl(self.s(meta), c[0], c[1] or (), c[2])

    def after(self, meta, idents):
        return tuple(idents)

    def cluster_decl(self, meta, c):
        return ast.ClusterDecl(self.s(meta), c[0])

    def placement_decl(self, meta, c):
        return ast.PlacementDecl(self.s(meta), c[0], c[1])

    def placement_block(self, meta, entries):
        return ast.Block(self.s(meta), tuple(entries))

    def teacher_entry(self, meta, c):
        return ast.TeacherEntry(self.s(meta), c[1], c[2])  # c[0]: the TEACHER keyword

    def let_decl(self, meta, c):
        return ast.LetDecl(self.s(meta), c[0], c[1])

    def block(self, meta, entries):
        return ast.Block(self.s(meta), tuple(entries))

    def entry(self, meta, c):
        return ast.Entry(self.s(meta), c[0], c[1])

    def ident(self, meta, toks):
        return ast.Ident(_tok_span(self.file, toks[0]), str(toks[0]))

    # expressions
    def number(self, meta, toks):
        return ast.Number(self.s(meta), str(toks[0]))

    def string(self, meta, toks):
        raw = str(toks[0])[1:-1]

        def unescape(m: re.Match) -> str:
            ch = m.group(1)
            if ch not in _ESCAPES:
                span = _tok_span(self.file, toks[0])
                raise ParseError(Diagnostic("bad-string", f"invalid escape '\\{ch}' in string", span,
                                            'use \\n, \\t, \\" or \\\\'))
            return _ESCAPES[ch]

        return ast.String(self.s(meta), re.sub(r"\\(.)", unescape, raw))

    def hwspec(self, meta, toks):
        count, device, per_node = re.fullmatch(r"(\d+)\s*x\s*(.+?)(\s+per\s+node)?", str(toks[0])).groups()
        return ast.HwSpec(self.s(meta), int(count), device, per_node is not None)

    def true(self, meta, _):
        return ast.Bool(self.s(meta), True)

    def false(self, meta, _):
        return ast.Bool(self.s(meta), False)

    def name(self, meta, c):
        return ast.Name(self.s(meta), c[0].name)

    def attr(self, meta, c):
        return ast.Attr(self.s(meta), c[0], c[1])

    def index(self, meta, c):
        items = c[1] if isinstance(c[1], tuple) else (c[1],)
        return ast.Index(self.s(meta), c[0], items)

    def index_list(self, meta, c):
        return tuple(c)

    def star(self, meta, toks):
        return ast.Star(self.s(meta))

    def slice(self, meta, c):
        return ast.Slice(self.s(meta), c[0], c[1], c[2])

    def call(self, meta, c):
        func, *args = c
        args = [a for a in args if a is not None]
        pos = tuple(a for a in args if not isinstance(a, ast.Kwarg))
        kws = tuple(a for a in args if isinstance(a, ast.Kwarg))
        return ast.Call(self.s(meta), func, pos, kws)

    def kwarg(self, meta, c):
        return ast.Kwarg(self.s(meta), c[0], c[1])

    def _bin(op):  # noqa: N805 - helper building binary-operator methods
        def method(self, meta, c):
            return ast.BinOp(self.s(meta), op, c[0], c[1])

        return method

    add, sub, mul, div, pow = _bin("+"), _bin("-"), _bin("*"), _bin("/"), _bin("^")

    def neg(self, meta, c):
        return ast.Neg(self.s(meta), c[0])

    def tuple(self, meta, c):
        return ast.Tuple(self.s(meta), tuple(x for x in c if x is not None))

    def list(self, meta, c):
        return ast.List(self.s(meta), tuple(x for x in c if x is not None))

    def where(self, meta, c):
        return ast.Where(self.s(meta), c[0], c[1])

    def mask(self, meta, atoms):
        return tuple(atoms)

    def mask_atom(self, meta, c):
        return ast.MaskAtom(self.s(meta), c[0] is not None, c[1])


# ---------------------------------------------------------------- syntax errors

_READABLE = {
    "$END": "end of file", "NAME": "name", "NUMBER": "number", "STRING": "string",
    "HWSPEC": "device spec (8 x A100-40GB, 8 x A100-40GB per node)", "STAR": "'*'",
}


def _readable(terminal: str) -> str:
    if terminal in _READABLE:
        return _READABLE[terminal]
    if terminal.lstrip("_") in KEYWORDS:
        return f"'{terminal.lstrip('_').lower()}'"
    try:
        pattern = _parser().get_terminal(terminal).pattern
    except KeyError:
        return terminal
    if isinstance(pattern, lark.lexer.PatternStr):
        return f"'{pattern.value}'"
    return terminal.lower()


def _expected(names) -> str:
    names = set(names)
    if {"NUMBER", "STRING", "NAME"} <= names:
        return "an expression"
    if {"TEACHER", "_STAGE"} <= names:
        return "a declaration (use, teacher, student, data, vocab, method, stage, cluster, placement, let)"
    items = sorted({_readable(n) for n in names})
    if len(items) > 8:
        items = items[:8] + ["..."]
    return ", ".join(items)


def _syntax_diagnostic(exc: Exception, text: str, file: str) -> Diagnostic:
    if isinstance(exc, UnexpectedToken) and exc.token.type == "$END" or isinstance(exc, UnexpectedEOF):
        lines = text.splitlines() or [""]
        line, col = len(lines), len(lines[-1]) + 1
        span = Span(file=file, line=line, col=col, end_line=line, end_col=col + 1)
        expected = getattr(exc, "expected", None) or []
        return Diagnostic("syntax-unexpected-eof", f"unexpected end of file; expected {_expected(expected)}", span,
                          "check for an unclosed '{', '(' or '['")
    if isinstance(exc, UnexpectedToken):
        tok = exc.token
        if exc.interactive_parser is not None:  # exact set: LALR state merging over-approximates exc.expected
            try:
                exc.expected = exc.interactive_parser.accepts() or exc.expected
            except Exception:  # noqa: BLE001 - fall back to lark's approximate set
                pass
        span = _tok_span(file, tok)
        what = _readable(tok.type)
        if not what.startswith("'"):
            what += " '" + str(tok).replace("\n", "\\n") + "'"
        return Diagnostic("syntax-unexpected-token",
                          f"unexpected {what}; expected {_expected(exc.expected)}", span,
                          _token_hint(tok, exc.expected))
    assert isinstance(exc, UnexpectedCharacters)
    ch = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else ""
    span = Span(file=file, line=exc.line, col=exc.column, end_line=exc.line, end_col=exc.column + 1)
    hint = "strings use double quotes" if ch == "'" else None
    if ch == '"':
        return Diagnostic("syntax-unexpected-char", "unterminated string", span, "close it with '\"' on the same line")
    return Diagnostic("syntax-unexpected-char", f"unexpected character {ch!r}", span, hint)


def _token_hint(tok: lark.Token, expected) -> str | None:
    if "COLON" in expected and len(expected) <= 2:
        return "a block entry is written 'key: value'"
    if "EQUAL" in expected and len(expected) <= 2:
        return "a declaration is written 'teacher name = hf(\"...\")'"
    if "RBRACE" in expected:
        return "check for a missing '}'"
    return None
