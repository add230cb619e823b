"""Nothing accepted and not honoured: every optimizer, loss option, transform, intervention and stage / data key
the checker accepts has a runtime implementation, or is listed below as known-pending (and the checker warns
``not-executed`` about it). When a pending key gets implemented, this test asks for its removal from the list."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from gkdlang import builtins as B  # noqa: E402
from gkdlang import spec as S  # noqa: E402
from gkdlang.lower import check_source  # noqa: E402
from runtime import interventions as ivs  # noqa: E402
from runtime import lossgraph, losses  # noqa: E402
from runtime.recipe import build_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: accepted keys the runtime does not execute yet (the checker warns `not-executed`); key -> block
KNOWN_PENDING: dict[str, str] = {}

#: intervention fields that are not runtime inputs: text for the plan's readers, or checked by the checker
NOT_RUNTIME_INPUTS = {
    "meaning", "weight", "reward_meaning", "state",  # descriptions
    "needs_labels", "min_micro_batch",  # the checker's stage checks (no-labels, batch-too-small)
}
#: construct options that are not fields: the lowering turns them into other fields
LOWERED_OPTIONS = {("interchange", "map"): "layers", ("drop", "per"): "one drop group per teacher",
                   ("select_teacher", "state"): "state_model"}


def _source(*paths: str) -> str:
    return "\n".join((ROOT / p).read_text(encoding="utf-8") for p in paths)


@pytest.mark.parametrize("name", B.OPTIMIZERS)
def test_every_optimizer_builds(name):
    net = torch.nn.Linear(2, 2)
    opt = build_optimizer(net, S.OptimizerSpec(name=name, lr=0.1), "s")
    assert isinstance(opt, torch.optim.Optimizer)


def test_lamb_is_refused_by_the_checker():
    text = ('teacher bert = hf("bert-base-uncased")\nstudent small = like(bert) { layers: 2 }\n'
            'data corpus = text("data/corpus.txt")\n'
            "stage s { data: corpus, steps: 1, optimizer: lamb(lr: 1e-3), loss: kl(bert.logits, small.logits) }\n")
    result = check_source(text, "l.gkd", base_dir=ROOT / "examples")
    (d,) = [d for d in result.diagnostics if d.severity == "error"]
    assert d.code == "unknown-function" and "not implemented" in d.message and d.span.line == 4


@pytest.mark.parametrize("fn", sorted(B.LOSSES))
def test_every_loss_and_loss_option_has_a_kernel(fn):
    assert fn in losses.LOSSES
    accepted = losses.loss_options(fn)
    missing = set(B.LOSSES[fn].options) - accepted
    assert not missing, f"{fn}: the checker accepts {sorted(missing)} but the kernel takes {sorted(accepted)}"


def test_every_op_has_a_kernel():
    ops = {cls.model_fields["op"].default for cls in S.OP_TYPES}
    assert ops == set(lossgraph.OPS) | set(lossgraph.LAZY_OPS)


@pytest.mark.parametrize("cls", S.INTERVENTION_TYPES, ids=lambda c: c.__name__)
def test_every_intervention_has_a_runtime_component_reading_its_fields(cls):
    assert cls in ivs.BUILDERS, f"{cls.__name__} has no builder in runtime/interventions.py"
    kind = cls.model_fields["kind"].default
    assert kind in ivs.INTERVENTIONS
    builders = _source("runtime/interventions.py", "runtime/diito.py", "runtime/rl_agent.py")
    fixed = {f for f, info in cls.model_fields.items() if typing.get_origin(info.annotation) is typing.Literal
             and len(typing.get_args(info.annotation)) == 1}  # one-value fields state a fixed runtime behaviour
    inputs = set(cls.model_fields) - set(S.Intervention.model_fields) - fixed - NOT_RUNTIME_INPUTS
    unread = sorted(f for f in inputs if not re.search(rf"\biv\.{f}\b|\bi\.{f}\b", builders))
    assert not unread, f"{kind}: fields {unread} are never read by its builder"
    for option in cls.options:
        assert option in cls.model_fields or (kind, option) in LOWERED_OPTIONS, f"{kind}({option}: ...) is dropped"


def _read_by(field: str, dirs=("runtime", "planner")) -> bool:
    code = _source(*(str(p.relative_to(ROOT)) for d in dirs for p in (ROOT / d).rglob("*.py")))
    return re.search(rf"\.{field}\b(?!\s*\()", code) is not None  # an attribute read, not a method call


STAGE_FIELDS = {"schedule": "schedule", "loss": "loss"}


@pytest.mark.parametrize("key", sorted(B.STAGE_KEYS))
def test_every_stage_key_is_executed_or_pending(key):
    field = STAGE_FIELDS.get(key, key)
    assert field in S.StageSpec.model_fields
    read = _read_by(field)  # the planner turns some into the placement the runtime runs
    if key in KNOWN_PENDING:
        assert not read, f"'{key}' is read now: remove it from KNOWN_PENDING and builtins.NOT_EXECUTED"
        assert key in B.NOT_EXECUTED
    else:
        assert read, f"stage key '{key}' is accepted but nothing in runtime/ or planner/ reads it"


#: data keys the planner resolves per stage into the plan field named here, which the runtime reads instead
PLANNED_DATA_KEYS = {"packing": "tokens.packed"}


@pytest.mark.parametrize("key", sorted(B.DATA_KEYS))
def test_every_data_key_is_executed_or_pending(key):
    assert key in S.DataSpec.model_fields
    read = _read_by(key, ("runtime",))  # data is read by the runtime alone ...
    if key in PLANNED_DATA_KEYS:  # ... or resolved by the planner into a plan field that the runtime reads
        read = _read_by(key, ("planner",)) and _read_by(PLANNED_DATA_KEYS[key], ("runtime",))
    if key in KNOWN_PENDING:
        assert not read, f"'{key}' is read now: remove it from KNOWN_PENDING and builtins.NOT_EXECUTED"
        assert key in B.NOT_EXECUTED
    else:
        assert read, f"data key '{key}' is accepted but nothing in runtime/ or planner/ reads it"


def test_pending_keys_match_the_checker_table():
    assert set(KNOWN_PENDING) == set(B.NOT_EXECUTED)


@pytest.mark.parametrize("key, block", [("eval_every", "stage"), ("split", "data")])
def test_evaluation_keys_are_executed_and_do_not_warn(key, block):
    """``eval_every`` and data ``split`` run (runtime/evalloop.py): no ``not-executed`` warning any more."""
    text = ('teacher bert = hf("bert-base-uncased")\nstudent small = like(bert) { layers: 2 }\n'
            'data corpus = text("data/corpus.txt") { seq_len: 16, split: 10% }\n'
            "stage s { data: corpus, steps: 10, eval_every: 5, loss: kl(bert.logits, small.logits) }\n")
    result = check_source(text, "p.gkd", base_dir=ROOT / "examples")
    assert result.spec is not None and not [d for d in result.diagnostics if d.code == "not-executed"]
    assert result.spec.stages[0].eval_every == 5 and result.spec.data["corpus"].split == 0.1
