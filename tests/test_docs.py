"""The docs are checked: every ```gkd block of docs/*.md, the vocabulary coverage of the language reference,
and docs/diagnostics.md being in sync with ``gkdlang.diagnostics.CODES``.

A ```gkd block must check with no diagnostic at all (``check_source``, no planner), unless its first line is
``# expect: <code>``: then that code must be among the diagnostics. Blocks are checked as if they were spec
files in ``tests/cases`` (so ``data/corpus.txt`` and ``data/sst2.jsonl`` exist). A block whose first line is
``# file: <path>`` is a copy of that shipped file: it must equal the file and check where the file lives.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gkdlang import builtins as B
from gkdlang.diagnostics import CODES, markdown
from gkdlang.lower import check_source

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BASE = ROOT / "tests" / "cases"
_BLOCK = re.compile(r"^```gkd\n(.*?)^```", re.S | re.M)


def gkd_blocks() -> list[tuple[str, int, str]]:
    """(doc name, line of the fence, block text) for every ```gkd block in docs/*.md and docs/methods/*.md."""
    out = []
    for doc in [*sorted(DOCS.glob("*.md")), *sorted((DOCS / "methods").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for m in _BLOCK.finditer(text):
            out.append((doc.relative_to(DOCS).as_posix(), text.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


BLOCKS = gkd_blocks()


def test_reference_has_examples():
    assert sum(1 for name, *_ in BLOCKS if name == "language.md") >= 20


@pytest.mark.parametrize("doc, line, text", BLOCKS, ids=[f"{d}:{n}" for d, n, _ in BLOCKS])
def test_gkd_block_checks(doc, line, text):
    first = text.splitlines()[0] if text.strip() else ""
    base = BASE
    shown = re.fullmatch(r"#\s*file:\s*(\S+)\s*", first)
    if shown:  # a copy of a shipped file: it must not drift from the file, and checks where the file lives
        path = ROOT / shown.group(1)
        text = text.split("\n", 1)[1]
        assert text.strip() == path.read_text(encoding="utf-8").strip(), f"{doc}:{line} differs from {path}"
        base, first = path.parent, ""
    result = check_source(text, f"{doc}:{line}", base_dir=base)
    got = [f"{d.code} ({d.span.line if d.span else '?'}): {d.message}" for d in result.diagnostics
           if d.code != "no-teacher-signal"]
    expect = re.fullmatch(r"#\s*expect:\s*([a-z0-9-]+)\s*", first)
    if expect:
        assert expect.group(1) in CODES, f"unregistered code {expect.group(1)}"
        assert expect.group(1) in {d.code for d in result.diagnostics}, got
    else:
        assert not got, got
        assert result.spec is not None


def builtin_names() -> dict[str, set[str]]:
    """Every name of the language's vocabulary (builtins.py tables), by table."""
    tables = {
        "SIGNALS": set(B.SIGNALS), "TARGETS": set(B.TARGETS), "LOSSES": set(B.LOSSES),
        "loss options": {o for loss in B.LOSSES.values() for o in loss.options},
        "TRANSFORMS": set(B.TRANSFORMS), "transform options": {o for opts in B.TRANSFORMS.values() for o in opts},
        "POOLS": set(B.POOLS), "LAYER_MAPS": set(B.LAYER_MAPS), "SCHEDULES": set(B.SCHEDULES),
        "MASKS": set(B.MASKS), "LR_SCHEDULES": set(B.LR_SCHEDULES), "OPTIMIZERS": set(B.OPTIMIZERS),
        "DATA_FORMATS": set(B.DATA_FORMATS), "DTYPES": set(B.DTYPES), "INTERVENTIONS": set(B.INTERVENTIONS),
        "MODEL_KEYS": set(B.MODEL_KEYS), "DATA_KEYS": set(B.DATA_KEYS), "VOCAB_KEYS": set(B.VOCAB_KEYS),
        "STAGE_KEYS": set(B.STAGE_KEYS), "CLUSTER_KEYS": set(B.CLUSTER_KEYS),
        "OPTIMIZER_KEYS": set(B.OPTIMIZER_KEYS), "LR_SCHEDULE_KEYS": set(B.LR_SCHEDULE_KEYS),
        "PLACEMENT_KEYS": set(B.PLACEMENT_KEYS), "TEACHER_STRATEGIES": set(B.TEACHER_STRATEGIES),
        "OFFLOAD_TARGETS": set(B.OFFLOAD_TARGETS),
    }
    return tables


def test_every_builtin_name_is_documented():
    text = (DOCS / "language.md").read_text(encoding="utf-8")
    # documented = written as code: inside a fenced block, or in an inline `code span` of the prose
    fences = re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)
    prose = re.sub(r"^```[a-z]*\n.*?^```", "", text, flags=re.S | re.M)
    code = " ".join(re.findall(r"`([^`\n]+)`", prose)) + " " + " ".join(fences)
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", code))
    missing = {table: sorted(names - words) for table, names in builtin_names().items() if names - words}
    assert not missing, f"names missing from docs/language.md: {missing}"


def test_every_builtin_is_used_in_a_checked_example():
    # stronger than a mention: each loss, transform, layer map, signal and mask appears in some clean example
    clean = " ".join(b for _, _, b in BLOCKS if not b.startswith("# expect"))
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", clean))
    for table in (B.LOSSES, B.TRANSFORMS, B.LAYER_MAPS, B.SIGNALS, B.MASKS, B.SCHEDULES, B.OPTIMIZERS):
        assert not set(table) - words, sorted(set(table) - words)


def test_diagnostics_doc_in_sync():
    doc = (DOCS / "diagnostics.md").read_text(encoding="utf-8")
    assert doc == markdown(), "docs/diagnostics.md is stale: python -m gkdlang.diagnostics --markdown > docs/diagnostics.md"
    for code, (severity, _) in CODES.items():
        assert f"| `{code}` | {severity} |" in doc


def test_diagnostics_module_cli():
    proc = subprocess.run([sys.executable, "-m", "gkdlang.diagnostics", "--markdown"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == markdown()


def _commands(doc: str) -> list[str]:
    """The `gkdc ...` lines of a doc's plain ``` blocks (not ```gkd)."""
    out, fence = [], None
    for line in (DOCS / doc).read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
        elif fence == "" and line.startswith("gkdc "):
            out.append(line.split("#", 1)[0].strip())
    return out


@pytest.mark.parametrize("doc", ["tutorial.md", "runtime.md"])
def test_doc_commands_parse_and_name_files_that_exist(doc):
    """Every `gkdc` command of the tutorial and the runtime page: its flags are the CLI's, and the specs, plans'
    specs and data it names exist (runs/... are what the earlier commands write). The run commands themselves
    are run by tests/test_demo.py (make demo, twice) and tests/test_evalloop.py (--overwrite, --log-every)."""
    import shlex

    from gkdc.cli import _parser

    commands = _commands(doc)
    assert doc != "tutorial.md" or len(commands) >= 8
    for command in commands:
        argv = shlex.split(command)[1:]
        try:
            args = _parser().parse_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"{doc}: `{command}` is refused by the CLI") from exc
        for value in vars(args).values():
            for path in value if isinstance(value, list) else [value]:
                if isinstance(path, Path) and str(path).startswith(("examples/", "specs/", "docs/")):
                    assert (ROOT / path).exists(), f"{doc}: `{command}` names {path}, which does not exist"
