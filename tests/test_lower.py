"""Lowering AST -> Spec: golden Spec JSON of every shipped spec, and the semantics of each construct.

Goldens live in ``tests/golden/spec/<name>.json``: ``Spec.model_dump_json(indent=2)`` of ``specs/<name>.gkd``
checked as ``specs/<name>.gkd``, with the repository's absolute path replaced by ``<root>`` (local model
sources resolve to absolute directories). Rewrite with ``GKDC_UPDATE_GOLDEN=1 pytest tests/test_lower.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_parser import compare_golden

from gkdlang.lower import check_file, check_source, number_value

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "spec"
SPECS = sorted((ROOT / "specs").glob("*.gkd"))
DATA = ROOT / "tests" / "cases" / "data"


def spec_json(path: Path) -> str:
    result = check_file(path, display_name=f"specs/{path.name}")
    assert result.ok, [d.message for d in result.diagnostics]
    return result.spec.model_dump_json(indent=2).replace(str(ROOT), "<root>") + "\n"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_golden_spec(path: Path):
    compare_golden(GOLDEN / f"{path.stem}.json", spec_json(path))


def test_spec_json_is_deterministic_across_processes():
    # a different hash seed must not reorder anything (sets, dict iteration over hashed keys)
    code = ("import sys; from pathlib import Path; sys.path.insert(0, 'tests'); from test_lower import spec_json; "
            "sys.stdout.write(spec_json(Path('specs/mix.gkd')))")
    outs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outs == {spec_json(ROOT / "specs" / "mix.gkd")}


def test_source_hash_covers_used_libraries():
    text = (ROOT / "specs" / "glmd.gkd").read_text()
    a = check_source(text, "a.gkd", base_dir=ROOT / "specs").spec
    b = check_source(text.replace("use glmd", "use glmd, kd"), "a.gkd", base_dir=ROOT / "specs").spec
    assert a.source_hash != b.source_hash and b.uses == ["glmd", "kd"]


# ---------------------------------------------------------------- semantics

HEAD = """teacher bert = hf("bert-base-uncased")
student small = like(bert) { layers: 6, hidden: 384 }
data corpus = text("corpus.txt")
"""


def lower(body: str, head: str = HEAD):
    result = check_source(head + body, "t.gkd", base_dir=DATA)
    assert result.ok, [f"{d.code}: {d.message}" for d in result.diagnostics]
    return result.spec


def stage_loss(loss: str, extra: str = ""):
    return lower(f"stage s {{ data: corpus, steps: 10{extra}, loss: {loss} }}").stages[0].loss


def pairs(terms) -> list[tuple[int, int]]:
    def layer(node):
        while node.node == "op":
            node = node.inputs[0]
        return node.layer

    return [(layer(t.pred), layer(t.target)) for t in terms]


@pytest.mark.parametrize("lmap, expected", [
    ("uniform", [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)]),
    ("skip", [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9)]),
    ("last", [(0, 6), (1, 7), (2, 8), (3, 9), (4, 10), (5, 11)]),
    ("first", [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]),
    ("pairs((0, 3), (5, 11))", [(0, 3), (5, 11)]),
])
def test_layer_maps(lmap, expected):
    terms = stage_loss(f"mse(bert.hidden, project(small.hidden), map: {lmap})")
    assert pairs(terms) == expected
    assert all((t.pred.dim_in, t.pred.dim_out) == (384, 768) for t in terms)
    assert len({t.pred.module for t in terms}) == 1  # one shared projection


def test_negative_indices_slices_and_lists_are_normalised():
    terms = stage_loss("mse(bert.hidden[-3:], project(small.hidden[0, 2, -1]))")
    assert pairs(terms) == [(0, 9), (2, 10), (5, 11)]


def test_weights_schedules_and_masks():
    terms = stage_loss("(0.5 * kl(bert.logits, small.logits, T: linear(4, 1)) "
                       "+ linear(0, 1, until: 50%) * (ce(tokens, small.logits) where masked)) where not pad")
    kl, ce = terms
    assert kl.weight.value == 0.5 and kl.weight.kind == "constant" and kl.mask == "not pad"
    assert (kl.options["T"].kind, kl.options["T"].value, kl.options["T"].end) == ("linear", 4, 1)
    assert (ce.weight.kind, ce.weight.value, ce.weight.end, ce.weight.until) == ("linear", 0, 1, 0.5)
    assert ce.mask == "masked"  # an inner where is not overridden by an outer one
    assert kl.id == "kl[small.logits<-bert.logits]"


def test_method_inlining_defaults_and_ids():
    spec = lower("use kd\nteacher cls = hf(\"bert-base-uncased\") { head: classify(3) }\n"
                 "student st = like(cls) { layers: 4, head: classify(3) }\n"
                 "data lab = jsonl(\"sst2.jsonl\") { text: sentence, label: label }\n"
                 "method mine(t, s, w: 2) = w * mse(t.hidden[-1], s.hidden[-1])\n"
                 "stage s { data: lab, epochs: 1, loss: kd.hinton(cls, st, alpha: 0.2) + kd(cls, st, hard: 0.5) + mine(cls, st) }\n",
                 head="")
    loss = spec.stages[0].loss
    assert [(t.method, t.fn, round(t.weight.value, 6)) for t in loss] == [
        ("kd.hinton", "kl", 0.2), ("kd.hinton", "ce", 0.8), ("kd.kd", "soft_ce", 1.0), ("kd.kd", "ce", 0.5),
        ("mine", "mse", 2.0)]
    assert loss[0].options["T"].value == 10 and "scale_t2" not in loss[0].options  # the defaults: KL x T^2
    assert loss[2].options["T"].value == 10 and loss[2].options["scale_t2"] is False  # GKD's KD: no T^2
    assert spec.stages[0].students == ["st"] and spec.stages[0].teachers == ["cls"]
    assert spec.uses == ["kd"]


def test_vocab_compression_rounds_rows_and_resizes_student():
    spec = lower("vocab small from bert { keep: 50%, rank: frequency(corpus), protect: [\"yes\"] }\n"
                 "stage s { data: corpus, steps: 1, loss: kl(bert.logits, small.logits) }\n")
    v = spec.vocabs["small"]
    assert (v.full_size, v.keep_fraction, v.keep_rows, v.remap) == (30522, 0.5, 15360, "nearest")
    assert spec.models["small"].arch.vocab_size == 15360 and spec.models["small"].vocab == "small"
    (term,) = spec.stages[0].loss
    assert term.target.op == "select_vocab" and term.target.vocab == "small"


def test_stage_order_follows_after():
    spec = lower("stage b after a { data: corpus, steps: 1, loss: kl(bert.logits, small.logits) }\n"
                 "stage a { data: corpus, steps: 1, loss: kl(bert.logits, small.logits) }\n")
    assert [s.name for s in spec.stages] == ["a", "b"] and spec.stages[1].after == ["a"]


def test_cluster_units():
    spec = lower("stage s { data: corpus, steps: 1k, batch: 64, loss: kl(bert.logits, small.logits) }\n"
                 "cluster { gpus: 4 x H100-80GB, nodes: 2, cpu_memory: 512GiB, nvme: 2TB }\n")
    c = spec.cluster
    assert (c.gpus_per_node, c.gpu, c.nodes, c.cpu_memory, c.nvme) == (4, "H100-80GB", 2, 512 * 2**30, 2 * 10**12)
    assert spec.stages[0].steps == 1000 and spec.stages[0].batch == 64


def test_model_defaults():
    spec = lower("stage s { data: corpus, steps: 1, loss: kl(bert.logits, small.logits) }\n")
    bert, small = spec.models["bert"], spec.models["small"]
    assert (bert.frozen, bert.init.kind, bert.dtype) == (True, "pretrained", "bf16")
    assert (small.frozen, small.init.kind, small.base, small.overrides) == (False, "random", "bert",
                                                                            {"layers": 6, "hidden": 384})
    assert (small.arch.num_layers, small.arch.hidden_size) == (6, 384)


@pytest.mark.parametrize("text, value, unit", [
    ("150k", 150e3, None), ("1.5B", 1.5e9, None), ("5%", 0.05, "percent"), ("40GB", 40e9, "bytes"),
    ("64GiB", 64 * 2**30, "bytes"), ("4e-4", 4e-4, None), ("2T", 2e12, None), ("1TB", 1e12, "bytes"),
])
def test_number_units(text, value, unit):
    v = number_value(text)
    assert v.value == pytest.approx(value) and v.unit == unit


def test_pass_registries_cover_the_builtin_tables():
    """Each builtins table the checker accepts names from has exactly one lowering function per name."""
    import typing

    from gkdlang import ast as A
    from gkdlang import builtins as Bt
    from gkdlang.lower.combinators import COMBINATORS
    from gkdlang.lower.expressions import EXPRESSIONS
    from gkdlang.lower.interventions import INTERVENTIONS
    from gkdlang.lower.transforms import TRANSFORMS

    assert set(TRANSFORMS) == set(Bt.TRANSFORMS)
    assert set(COMBINATORS) == set(Bt.COMBINATORS)
    assert set(INTERVENTIONS) == set(Bt.INTERVENTIONS)
    assert set(EXPRESSIONS) == set(typing.get_args(A.Expr))  # one evaluator per expression node
