"""The bad-input catalogue: every file in ``tests/cases/bad`` is something a careless or hostile user could write,
and each gets exit status 1, a registered code at ``file:line:col`` and no traceback from ``gkdc check`` (with
the planner's feasibility check).

Inputs are the ``.gkd`` files themselves, byte for byte (an empty file, a NUL, a BOM are inputs too); the
expected code and position of each sit beside them in ``tests/cases/bad/EXPECTED`` (name, code, line:col).
Classes: syntax (glued keywords, unterminated strings, stray characters), names, values and units, shapes and
losses, structure, model folders (missing heads), paths (escaping, empty, over-long, folders), nesting and size
limits, and the planner (infeasible, huge batches and clusters). Each case runs in-process; a few run through
the real CLI. Measured on the 2-core CI machine: the slowest case takes about 0.8 s; the time limit asserted
here is a hang guard, not a benchmark.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gkdc import cli
from gkdlang.diagnostics import CODES

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "cases" / "bad"
HANG_GUARD_S = 20.0


def expected() -> dict[str, tuple[str, int, int]]:
    out = {}
    for line in (BAD / "EXPECTED").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, code, where = line.split("\t")
        row, col = where.split(":")
        out[name] = (code, int(row), int(col))
    return out


EXPECTED = expected()


def check(path: Path, *extra: str) -> tuple[int, str, float]:
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["check", *extra, str(path)])
    return code, err.getvalue(), time.perf_counter() - start


def test_catalogue_is_large_and_complete():
    files = {p.stem for p in BAD.glob("*.gkd")}
    assert files == set(EXPECTED), (sorted(files - set(EXPECTED)), sorted(set(EXPECTED) - files))
    assert len(files) >= 150
    assert {code for code, *_ in EXPECTED.values()} <= set(CODES)
    assert len({code for code, *_ in EXPECTED.values()}) >= 40


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_input_gets_a_located_code(name):
    code, row, col = EXPECTED[name]
    status, err, seconds = check(BAD / f"{name}.gkd")
    assert status == 1, err
    assert "Traceback" not in err
    assert f"{name}.gkd:{row}:{col}: error:" in err and f"[{code}]" in err, err
    assert seconds < HANG_GUARD_S


def test_a_spec_too_large_is_refused_at_its_start(tmp_path):
    path = tmp_path / "huge.gkd"
    body = "".join(f"let x{i} = {i}  # padding to make a large file\n" for i in range(200_000))  # ~9 MB
    path.write_text(body)
    status, err, seconds = check(path, "--no-plan")
    assert status == 1 and "huge.gkd:1:1: error:" in err and "[spec-too-large]" in err
    assert seconds < HANG_GUARD_S


def test_a_spec_over_the_old_256_kib_cap_is_checked(tmp_path):
    """Large specs are checked, not refused (issue 14): 400 KB of lets and stages, clean, with a located error
    at its end still found (bench/large_spec.py times 1-5 MB)."""
    from gkdlang.parser import MAX_SPEC_CHARS

    lets = "".join(f"let w{i} = {i % 7 + 1}e-2  # a weight, documented at some length like a real spec\n"
                   for i in range(5_000))
    stages = "".join(f"stage s{i} {{ data: corpus, steps: 10, loss: kl(bert.logits, small.logits, T: 2) + "
                     f"w{i} * mse(bert.hidden[-1], small.hidden[-1]) }}\n" for i in range(20))
    head = ('teacher bert = hf("tiny-bert")\nstudent small = like(bert) { layers: 1 }\n'
            'data corpus = text("data/corpus.txt")\n')
    text = head + lets + stages
    assert 256 * 1024 < len(text) < MAX_SPEC_CHARS
    path = ROOT / "tests" / "cases" / "_large_case.gkd"
    try:
        path.write_text(text)
        status, err, seconds = check(path, "--no-plan")
        assert status == 0, err[-2000:]
        path.write_text(text + "stage bad { data: corpus, steps: 0, loss: kl(bert.logits, small.logits) }\n")
        status, err, _ = check(path, "--no-plan")
        line = text.count("\n") + 1
        assert status == 1 and f"_large_case.gkd:{line}:" in err and "[bad-value]" in err, err[-2000:]
    finally:
        path.unlink(missing_ok=True)
    assert seconds < HANG_GUARD_S


def test_a_utf8_bom_is_accepted(tmp_path):
    text = (ROOT / "tests" / "cases" / "errors" / "unknown_signal.gkd").read_text().replace("hiddens", "hidden")
    text = text.replace("  # error: unknown-signal @18", "")
    path = ROOT / "tests" / "cases" / "errors" / "_bom_case.gkd"
    try:
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        status, err, _ = check(path, "--no-plan")
    finally:
        path.unlink()
    assert status == 0 and "syntax" not in err, err


@pytest.mark.parametrize("name", ["glued-teacher", "path-climb", "empty-file", "method-chain-300", "gpus-zero",
                                  "cluster-huge", "model-missing-head"])
def test_real_cli_subprocess(name):
    code, row, col = EXPECTED[name]
    proc = subprocess.run([sys.executable, "-m", "gkdc", "check", str(BAD / f"{name}.gkd")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{name}.gkd:{row}:{col}: error:" in proc.stderr and f"[{code}]" in proc.stderr, proc.stderr


def test_plan_subcommand_reports_the_same(tmp_path):
    status = cli.main(["plan", str(BAD / "plan-tiny-gpu.gkd"), "-o", str(tmp_path / "p.json")])
    assert status == 1 and not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("argv", [["check", "a" * 5000], ["plan", "a" * 5000], ["run", "a" * 5000], ["fmt", "BIN"],
                                  ["run", "BADJSON"], ["run", "LIST"], ["run", "BIN"], ["check", "DIR"], ["fmt", "DIR"]])
def test_hostile_command_lines_end_in_a_message(tmp_path, argv):
    files = {"BIN": b"\xff\xfe\x00", "BADJSON": b'{"plan_schema_version": 1', "LIST": b"[]"}
    for key, data in files.items():
        (tmp_path / f"{key.lower()}.json").write_bytes(data)
    (tmp_path / "dir").mkdir()
    argv = [str(tmp_path / f"{a.lower()}.json") if a in files else str(tmp_path / "dir") if a == "DIR" else a
            for a in argv]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = cli.main(argv)
    assert status in (1, 2) and "error" in err.getvalue() or "Is a directory" in err.getvalue(), err.getvalue()
    assert "Traceback" not in err.getvalue()
