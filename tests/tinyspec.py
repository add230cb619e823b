"""The spec text shared by the CLI tests of a tiny run (tests/test_zero3_student.py, tests/test_vocab_run.py):
a random-init teacher of examples/tiny, the shipped corpus, one short KL stage; each test adds its student and,
where it compresses the student's vocabulary, the GLMD vocab block."""

from __future__ import annotations

import json
from pathlib import Path

from clitools import ROOT, gkdc

TEACHER = f'teacher t = hf("{ROOT}/examples/tiny") {{ init: random, dtype: fp32 }}'
DATA = f'data corpus = text("{ROOT}/examples/data/corpus.txt") {{ seq_len: 32 }}'


def vocab_block(source: str = "t", remap: str = "nearest(t.embeddings)") -> str:
    """Half of examples/tiny's 146 rows kept (rounded up to 80), ranked on the corpus, two words protected."""
    return f"""vocab s from {source} {{
  keep: 50%
  multiple: 16
  rank: frequency(corpus)
  protect: ["yes", "no"]
  remap: {remap}
}}"""


def tiny_spec(student: str, *, steps: int, temperature: float = 2, vocab: str = "", zero: int | None = None,
              loss: str = "") -> str:
    """The spec of ``student`` (its whole declaration line) distilled from the tiny teacher (KL on the logits at
    ``temperature`` unless ``loss`` is given)."""
    placement = "" if zero is None else f"placement {{ zero: {zero} }}\n"
    return f"""{TEACHER}
{student}
{DATA}
{vocab}
stage pretrain {{
  data: corpus
  steps: {steps}
  batch: 4
  optimizer: adamw(lr: 1e-3)
  loss: {loss or f"kl(t.logits, s.logits, T: {temperature:g}) where not pad"}
}}
{placement}"""


def run_at_zero_stages(tmp_path: Path, student: str, zeros: tuple[int, ...] = (0, 3), run_args: tuple[str, ...] = (),
                       **spec) -> list[Path]:
    """Run ``tiny_spec(student, **spec)`` pinned to each ZeRO stage of ``zeros`` with ``gkdc run`` (paths under
    the project and ``tmp_path`` allowed, ``run_args`` added), checking that each plan placed the student there;
    the run folders."""
    outs = []
    for zero in zeros:
        path = tmp_path / f"zero{zero}.gkd"
        path.write_text(tiny_spec(student, zero=zero, **spec))
        out = tmp_path / f"run{zero}"
        r = gkdc("run", str(path), "--out", str(out), "--no-progress", "--allow-path", str(ROOT),
                 "--allow-path", str(tmp_path), *run_args)
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "plan.json").read_text())["stages"][0]["placement"]["zero_stage"] == zero
        outs.append(out)
    return outs
