"""AST (+ comments) -> canonical text. ``format_source`` is idempotent and never changes meaning.

Layout rules: one blank line between declarations (none between consecutive one-line declarations of the
same kind), blocks inline when short, otherwise one entry per line indented by two spaces, a long sum broken
before each top-level ``+``, minimal parentheses by precedence. Comments are kept: a comment on its own line
stays before the declaration or entry that follows it, a trailing comment stays at the end of its line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gkdlang import ast
from gkdlang.parser import parse

WIDTH = 100
_PREC = {"where": 0, "+": 1, "-": 1, "*": 2, "/": 2, "neg": 3, "^": 4}
_COMMENT = re.compile(r"#[^\n]*")


@dataclass(frozen=True)
class _Comment:
    line: int
    col: int
    text: str
    own_line: bool


def format_source(text: str, file: str = "<input>") -> str:
    """Canonical text of a spec; raises ParseError on a syntax error (nothing is rewritten then)."""
    module = parse(text, file)
    comments = _comments(text)
    return _Printer(comments).module(module)


def _comments(text: str) -> list[_Comment]:
    """Comments found by a scan that skips string literals (the grammar's only other place for '#')."""
    out: list[_Comment] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        in_str, i = False, 0
        while i < len(line):
            ch = line[i]
            if in_str:
                if ch == "\\":
                    i += 1
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch == "#":
                out.append(_Comment(lineno, i + 1, line[i:].rstrip(), not line[:i].strip()))
                break
            i += 1
    return out


def _shares_line(nodes, i: int) -> bool:
    """True if the node after ``nodes[i]`` starts on the line where ``nodes[i]`` ends (``a: 1; b: 2  # c``):
    a trailing comment there belongs to the last node of the line."""
    return i + 1 < len(nodes) and nodes[i + 1].span.line == nodes[i].span.end_line


class _Printer:
    def __init__(self, comments: list[_Comment]):
        self.pending = list(comments)

    # ------------------------------------------------------------ comments

    def _leading(self, line: int, indent: str) -> list[str]:
        """Own-line comments before ``line`` (and any stray trailing ones), in order."""
        out = []
        while self.pending and self.pending[0].line < line:
            c = self.pending.pop(0)
            out.append(indent + c.text)
        return out

    def _trailing(self, end_line: int) -> str:
        if self.pending and self.pending[0].line == end_line and not self.pending[0].own_line:
            return "  " + self.pending.pop(0).text
        return ""

    # ------------------------------------------------------------ declarations

    def module(self, m: ast.Module) -> str:
        chunks: list[tuple[str, str, bool, bool]] = []  # (kind, text, multiline, has leading comments)
        for i, decl in enumerate(m.decls):
            lead = self._leading(decl.span.line, "")
            text = self.decl(decl)
            if not _shares_line(m.decls, i):
                text += self._trailing(decl.span.end_line)
            chunks.append((type(decl).__name__, "\n".join(lead + [text]), "\n" in text, bool(lead)))
        tail = [c.text for c in self.pending]
        out: list[str] = []
        prev = None
        for kind, text, multi, lead in chunks:
            # a commented declaration opens a new group; a comment above it does not end the group after it
            if prev is not None and (multi or lead or prev[2] or kind != prev[0]):
                out.append("")
            out.append(text)
            prev = (kind, text, multi)
        if tail:
            if out:
                out.append("")
            out.extend(tail)
        return "\n".join(out) + "\n" if out else ""

    def decl(self, d) -> str:
        if isinstance(d, ast.Use):
            return "use " + ", ".join(".".join(i.name for i in path) for path in d.modules)
        if isinstance(d, ast.ModelDecl):
            return f"{d.role} {d.name.name} = {self.expr(d.source)}" + self.block_suffix(d.options)
        if isinstance(d, ast.DataDecl):
            return f"data {d.name.name} = {self.expr(d.source)}" + self.block_suffix(d.options)
        if isinstance(d, ast.VocabDecl):
            return f"vocab {d.name.name} from {d.base.name}" + self.block_suffix(d.options, force=True)
        if isinstance(d, ast.MethodDecl):
            params = ", ".join(p.name.name + (f": {self.expr(p.default)}" if p.default else "") for p in d.params)
            head = f"method {d.name.name}({params}) ="
            body = self.expr(d.body)
            if len(head) + 1 + len(body) <= WIDTH:
                return f"{head} {body}"
            return f"{head}\n    " + self.broken(d.body, "    ")
        if isinstance(d, ast.StageDecl):
            after = (" after " + ", ".join(a.name for a in d.after)) if d.after else ""
            return f"stage {d.name.name}{after}" + self.block_suffix(d.options, force=True)
        if isinstance(d, ast.ClusterDecl):
            return "cluster" + self.block_suffix(d.options)
        if isinstance(d, ast.PlacementDecl):
            return "placement" + (f" {d.stage.name}" if d.stage else "") + self.block_suffix(d.options)
        assert isinstance(d, ast.LetDecl)
        return f"let {d.name.name} = {self.expr(d.value)}"

    def block_suffix(self, block: ast.Block | None, force: bool = False) -> str:
        if block is None:
            return ""
        has_comments = any(block.span.line <= c.line <= block.span.end_line for c in self.pending)
        inline = [f"{e.key.name}: {self.expr(e.value)}" for e in block.entries]
        one_line = " { " + ", ".join(inline) + " }" if inline else " {}"
        if not has_comments and len(one_line) <= 60 and (not force or len(inline) <= 1) and len(inline) <= 4:
            return one_line
        lines = [" {"]
        for i, entry in enumerate(block.entries):
            lines.extend(self._leading(entry.span.line, "  "))
            key = f"  {entry.key.name}: "
            value = self.expr(entry.value)
            if len(key) + len(value) > WIDTH:
                value = self.broken(entry.value, " " * len(key))
            trailing = "" if _shares_line(block.entries, i) else self._trailing(entry.span.end_line)
            lines.append(key + value + trailing)
        lines.extend(self._leading(block.span.end_line, "  "))
        lines.append("}")
        return "\n".join(lines)

    def broken(self, e: ast.Expr, indent: str) -> str:
        """A long expression with each top-level '+' term on its own line."""
        if isinstance(e, ast.Where):
            if isinstance(e.expr, ast.Where):
                return self.expr(e)
            mask = " and ".join(("not " if a.negated else "") + a.name.name for a in e.mask)
            return f"{self.broken(e.expr, indent)} where {mask}"
        terms: list[tuple[str, ast.Expr]] = []

        def flatten(x: ast.Expr, op: str) -> None:
            if isinstance(x, ast.BinOp) and x.op in "+-":
                flatten(x.left, op)
                flatten(x.right, x.op)
            else:
                terms.append((op, x))

        flatten(e, "+")
        if len(terms) == 1:
            return self.expr(e)
        first = self.expr(terms[0][1], _PREC["+"])
        rest = [f"\n{indent}{op} {self.expr(x, _PREC['+'] + 1)}" for op, x in terms[1:]]
        return first + "".join(rest)

    # ------------------------------------------------------------ expressions

    def expr(self, e: ast.Expr, ctx: int = 0) -> str:
        text, prec = self._expr(e)
        return f"({text})" if prec < ctx else text

    def _expr(self, e) -> tuple[str, int]:
        top = 10
        if isinstance(e, ast.Number):
            return e.text, top
        if isinstance(e, ast.String):
            return '"' + e.value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"', top
        if isinstance(e, ast.Bool):
            return ("true" if e.value else "false"), top
        if isinstance(e, ast.Name):
            return e.id, top
        if isinstance(e, ast.HwSpec):
            return f"{e.count} x {e.device}{' per node' * e.per_node}", top
        if isinstance(e, ast.Attr):
            return f"{self.expr(e.obj, 5)}.{e.name.name}", 5
        if isinstance(e, ast.Index):
            return f"{self.expr(e.obj, 5)}[{', '.join(self._index_item(i) for i in e.items)}]", 5
        if isinstance(e, ast.Call):
            args = [self.expr(a) for a in e.args] + [f"{k.key.name}: {self.expr(k.value)}" for k in e.kwargs]
            return f"{self.expr(e.func, 5)}({', '.join(args)})", 5
        if isinstance(e, ast.Tuple):
            inner = ", ".join(self.expr(x) for x in e.items)
            return f"({inner},)" if len(e.items) == 1 else f"({inner})", top
        if isinstance(e, ast.List):
            return "[" + ", ".join(self.expr(x) for x in e.items) + "]", top
        if isinstance(e, ast.Neg):
            return "-" + self.expr(e.operand, _PREC["neg"]), _PREC["neg"]
        if isinstance(e, ast.Where):
            mask = " and ".join(("not " if a.negated else "") + a.name.name for a in e.mask)
            return f"{self.expr(e.expr, 1)} where {mask}", 0
        assert isinstance(e, ast.BinOp)
        p = _PREC[e.op]
        if e.op == "^":  # right-associative
            return f"{self.expr(e.left, p + 1)} ^ {self.expr(e.right, p)}", p
        return f"{self.expr(e.left, p)} {e.op} {self.expr(e.right, p + 1)}", p

    def _index_item(self, i) -> str:
        if isinstance(i, ast.Star):
            return "*"
        if isinstance(i, ast.Slice):
            parts = ["" if x is None else self.expr(x) for x in (i.start, i.stop)]
            text = ":".join(parts)
            return text + (f":{self.expr(i.step)}" if i.step is not None else "")
        return self.expr(i)
