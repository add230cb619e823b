"""The path rule: where a spec may read data and write caches.

A data path (glob) or a cache path in a spec must lie inside an *allowed root*:

- the spec's project: the nearest folder at or above the spec's folder that holds ``.git`` or ``gkdc.toml``
  (the spec's own folder when there is none);
- every folder given with ``--allow-path DIR`` (``gkdc check/plan/run/cache``) or listed in the environment
  variable ``GKDC_ALLOW_PATHS`` (``os.pathsep``-separated).

Paths are resolved (``..`` and symbolic links followed) before the test, so neither ``../../etc`` nor a link
out of the project escapes. Empty paths, NUL characters, paths over 4,096 characters or with a name over 255
are refused before anything touches the file system. This pass runs on the syntax tree, before lowering reads
any file, so a bad path can never reach the file system. Model folders (``hf("dir")``) are read-only inputs
and are not restricted (their weights load only in formats that cannot carry code; see docs/security.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from gkdlang import ast
from gkdlang.diagnostics import Diagnostic
from gkdlang.spec import Span

MARKERS = (".git", "gkdc.toml")
ENV = "GKDC_ALLOW_PATHS"
MAX_PATH = 4096
MAX_NAME = 255
GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class PathRef:
    """One path a spec names: what it is for (``data`` or ``cache``), its text and where it is written."""

    use: str
    text: str
    span: Span


def project_root(spec_dir: Path) -> Path:
    """The nearest folder at or above ``spec_dir`` holding a marker; ``spec_dir`` itself when none does."""
    start = Path(spec_dir).resolve()
    for folder in (start, *start.parents):
        if any((folder / marker).exists() for marker in MARKERS):
            return folder
    return start


def allowed_roots(spec_dir: Path, extra: Iterable[str | Path] = ()) -> tuple[Path, ...]:
    """The project root, then each ``--allow-path`` folder, then each folder in ``GKDC_ALLOW_PATHS``."""
    env = [p for p in os.environ.get(ENV, "").split(os.pathsep) if p.strip()]
    roots = [project_root(spec_dir)]
    for given in [*extra, *env]:
        try:
            roots.append(Path(given).expanduser().resolve())
        except (OSError, RuntimeError, ValueError):
            continue
    return tuple(dict.fromkeys(roots))


def literal_part(pattern: str) -> str:
    """The pattern up to its first component holding a glob character (the part that names real folders)."""
    parts = Path(pattern).parts
    for i, part in enumerate(parts):
        if GLOB_CHARS & set(part):
            return str(Path(*parts[:i])) if i else "."
    return pattern


def text_problem(text: str) -> str | None:
    """Why a path's text is unusable before any file system call, or None."""
    if not text.strip():
        return "the path is empty"
    if "\x00" in text:
        return "the path holds a NUL character"
    if len(text) > MAX_PATH:
        return f"the path is {len(text):,} characters long (at most {MAX_PATH:,})"
    longest = max((len(p) for p in text.replace("\\", "/").split("/")), default=0)
    if longest > MAX_NAME:
        return f"a name in the path is {longest:,} characters long (at most {MAX_NAME})"
    return None


def resolve_within(text: str, base_dir: Path, roots: tuple[Path, ...]) -> tuple[Path, bool]:
    """(resolved path of the pattern's literal part plus the rest taken lexically, whether it is inside a root)."""
    literal = literal_part(text)
    given = Path(literal).expanduser()
    full = (given if given.is_absolute() else Path(base_dir) / given).resolve()
    rest = Path(text).parts[len(Path(literal).parts):] if literal != "." else Path(text).parts
    lexical = Path(os.path.normpath(full.joinpath(*rest))) if rest else full
    inside = any(_inside(full, r) and _inside(lexical, r) for r in roots)
    return lexical, inside


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def refs(module: ast.Module) -> Iterator[PathRef]:
    """Every data and cache path the spec's syntax tree names (string literals only; others are type errors)."""
    for decl in module.decls:
        if isinstance(decl, ast.DataDecl) and isinstance(decl.source, ast.Call):
            for arg in decl.source.args:
                if isinstance(arg, ast.String):
                    yield PathRef("data", arg.value, arg.span)
        elif isinstance(decl, ast.ModelDecl) and decl.options is not None:
            for entry in decl.options.entries:
                if entry.key.name == "cache" and isinstance(entry.value, ast.Call):
                    for kw in entry.value.kwargs:
                        if kw.key.name == "path" and isinstance(kw.value, ast.String):
                            yield PathRef("cache", kw.value.value, kw.value.span)


def check_paths(module: ast.Module, base_dir: Path, extra_roots: Iterable[str | Path] = ()) -> list[Diagnostic]:
    """``bad-path`` / ``path-outside-root`` / ``data-is-directory`` diagnostics for the spec's paths."""
    roots = allowed_roots(base_dir, extra_roots)
    out: list[Diagnostic] = []
    for ref in refs(module):
        problem = text_problem(ref.text)
        if problem is not None:
            out.append(Diagnostic("bad-path", f"{ref.use} path: {problem}", ref.span,
                                  hint="name a file (or glob) relative to the spec's folder"))
            continue
        try:
            full, inside = resolve_within(ref.text, base_dir, roots)
        except (OSError, RuntimeError, ValueError) as exc:  # e.g. a symlink loop
            out.append(Diagnostic("bad-path", f"{ref.use} path '{_short(ref.text)}' cannot be resolved: {exc}",
                                  ref.span))
            continue
        if not inside:
            out.append(Diagnostic(
                "path-outside-root",
                f"{ref.use} path '{_short(ref.text)}' resolves to {_short(str(full))}, outside the allowed roots "
                f"({', '.join(_short(str(r)) for r in roots)})",
                ref.span, hint="move it under the spec's project, or allow its folder with --allow-path DIR "
                               f"(or {ENV})"))
            continue
        if ref.use == "data" and literal_part(ref.text) == ref.text and _is_dir(full):
            out.append(Diagnostic("data-is-directory", f"data path '{_short(ref.text)}' is a folder, not a file",
                                  ref.span, hint=f"name its files with a glob, e.g. \"{ref.text.rstrip('/')}/*.txt\""))
    return out


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _short(text: str, width: int = 80) -> str:
    return text if len(text) <= width else text[: width // 2] + "..." + text[-width // 2 + 3:]
