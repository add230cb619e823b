"""The method library: every GKD method's spec checks clean, the constructs lower to complete Spec gates and
interventions, and every pair of single-teacher methods on one teacher/student pair either checks or is
refused with the expected code.

Specs live in ``specs/methods/<method>.gkd`` (one per method of GKD, plus GLMD's three variants), method
definitions in ``gkdlang/stdlib/<library>.gkd`` and method pages in ``docs/methods/<method>.md``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from gkdlang.lower import check_file, check_source

ROOT = Path(__file__).resolve().parents[1]
METHOD_SPECS = sorted((ROOT / "specs" / "methods").glob("*.gkd"))
CASES = ROOT / "tests" / "cases"

#: GKD's 25 methods and GLMD's variants -> spec / doc stem
METHODS = ["kd", "pd", "tinybert", "minilm", "minilmv2", "distilbert", "pkd", "rail_kd", "mgskd", "diito", "sid",
           "alp_kd", "ckd", "theseus", "universal_kd", "lrc_bert", "annealing_kd", "mobilebert", "continuation_kd",
           "tmkd", "mt_bert", "uncertainty", "rl_kd", "takd", "dgkd", "glmd", "glmd_vc", "glmd_al"]

#: stages that train without a teacher on purpose (pre-training or fine-tuning steps of a method)
TEACHER_FREE = {("pd", "pretrain"), ("sid", "pretrain"), ("annealing_kd", "hard"), ("universal_kd", "finetune"),
                ("mobilebert", "teacher_pretrain"), ("mobilebert", "finetune")}


def one_error_at(text: str, name: str, code: str, line: int, piece: str, at: str) -> None:
    """``text`` (checked as ``name``) has one error, ``code``, on its line ``line``, at the first ``at`` of the
    first ``piece`` on that line."""
    errors = [d for d in check_source(text, name, base_dir=CASES).diagnostics if d.severity == "error"]
    assert [(d.code, d.span.file, d.span.line) for d in errors] == [(code, name, line)], errors
    assert errors[0].span.col == text.splitlines()[line - 1].index(piece) + piece.index(at) + 1


def test_every_method_has_a_spec_a_doc_and_a_library():
    assert len(METHODS) == 28
    for name in METHODS:
        assert (ROOT / "specs" / "methods" / f"{name}.gkd").exists(), name
        assert (ROOT / "docs" / "methods" / f"{name}.md").exists(), name
        library = "glmd" if name.startswith("glmd") else name
        assert (ROOT / "gkdlang" / "stdlib" / f"{library}.gkd").exists(), library


@pytest.mark.parametrize("path", METHOD_SPECS, ids=lambda p: p.stem)
def test_method_spec_checks_clean(path: Path):
    result = check_file(path, display_name=path.name)
    assert result.ok, [f"{d.code}: {d.message}" for d in result.diagnostics]
    for d in result.diagnostics:
        stage = d.message.split("'")[1] if d.code == "no-teacher-signal" else None
        assert (path.stem, stage) in TEACHER_FREE, f"{d.code}: {d.message}"


def spec(name: str):
    result = check_file(ROOT / "specs" / "methods" / f"{name}.gkd")
    assert result.ok
    return result.spec


def stage(name: str, stage_name: str):
    return next(s for s in spec(name).stages if s.name == stage_name)


# ---------------------------------------------------------------- what the constructs lower to


def test_theseus_replace_layers_params():
    st = stage("theseus", "finetune")
    (iv,) = st.interventions
    assert iv.kind == "replace_layers" and iv.models == ["bert", "small"]
    assert iv.groups == [[0, 1]] and iv.teacher_forward is False
    assert iv.p.model_dump() == {"kind": "linear", "value": 0.3, "end": 1.0, "start": 0.0, "until": 0.66, "levels": None,
                                 "every": None}
    assert st.teachers == ["bert"] and [t.fn for t in st.loss] == ["ce"]


def test_diito_interchange_forces_no_checkpointing_and_marks_counterfactual_terms():
    st = stage("diito", "pretrain")
    (iv,) = st.interventions
    assert st.activation_checkpointing is False
    assert iv.kind == "interchange" and iv.fraction == 0.3 and iv.way == "consecutive"
    assert iv.layers == [[0, 1]]  # student block 0 <-> teacher block 1 (uniform, k = 2)
    causal = [t for t in st.loss if t.target.node == "op" and t.target.op == "interchanged"]
    assert len(causal) == 1 and causal[0].pred.op == "interchanged"
    assert causal[0].target.intervention == iv.id
    assert sum(t.weight.value for t in st.loss) == pytest.approx(1.0)


def test_lrc_bert_perturb_forbids_gradient_accumulation():
    for name in ("contrast", "predict"):
        st = stage("lrc_bert", name)
        assert not st.grad_accum_allowed
        assert [iv.kind for iv in st.interventions] == ["perturb"]
        assert st.interventions[0].passes == 2
    terms = [t for t in stage("lrc_bert", "contrast").loss if t.fn == "cos_nce"]
    assert terms and all(t.options["gather"] is False for t in terms)  # GKD's command: no --lrc_bert_gather_dp


def test_uncertainty_hard_weigh_units_and_minimum_micro_batch():
    (iv,) = stage("uncertainty", "finetune").interventions
    assert iv.kind == "weigh" and iv.hard and iv.min_micro_batch == 2
    assert [u.teacher for u in iv.units] == ["base", "large"]
    groups = {t.gate.group for t in stage("uncertainty", "finetune").loss if t.gate.group}
    assert groups == {u.group for u in iv.units}


def test_mt_bert_weighs_by_teacher_ce():
    st = stage("mt_bert", "finetune")
    (iv,) = st.interventions
    assert iv.by == "teacher_ce" and iv.needs_labels
    assert sum(1 for t in st.loss if t.gate.group) == 2


def test_mobilebert_progressive_windows_and_lower_learning_rate():
    st = stage("mobilebert", "transfer")
    (iv,) = st.interventions
    assert iv.kind == "progressive_lr" and iv.below_lr == 0.1
    assert [w.model_dump() for w in iv.windows] == [{"start": 0.0, "until": 0.4, "layer": 0},
                                                    {"start": 0.4, "until": 1.0, "layer": 1}]
    layer0 = [t for t in st.loss if t.pred.layer == 0]
    assert len(layer0) == 2 and all(t.gate.active_until == 0.4 for t in layer0)
    assert all(t.weight.value == 0.5 for t in layer0)


def test_rail_kd_chooses_as_many_teacher_layers_as_the_student_has():
    st = stage("rail_kd", "finetune")
    sse = next(t for t in st.loss if t.fn == "sse")
    node = sse.target
    while node.op != "concat":
        node = node.inputs[0]
    picks = node.inputs
    assert len(picks) == 5 and all(p.op == "choose" and p.k == 5 for p in picks)
    assert [p.index for p in picks] == list(range(5)) and picks[0].every == "epoch"
    assert len(picks[0].inputs) == 11  # teacher blocks 0..10 (the last one excluded)


def test_dgkd_drops_each_teacher_independently():
    st = stage("dgkd", "student_kd")
    assert [iv.kind for iv in st.interventions] == ["drop", "drop"]
    assert [iv.models for iv in st.interventions] == [["large"], ["mid"]]
    assert all(iv.p == 0.25 for iv in st.interventions)


def test_rl_kd_agent_state_model_is_loaded_as_a_teacher():
    st = stage("rl_kd", "select")
    (iv,) = st.interventions
    assert iv.kind == "select_teacher" and iv.policy == "reinforce" and iv.state_model == "semantic"
    assert "semantic" in st.teachers


def test_glmd_variants():
    assert not spec("glmd_vc").vocabs
    assert spec("glmd").vocabs["small"].keep_rows == 15360
    assert spec("glmd_al").models["small"].arch.embedding_size == 384


def test_progressive_groups_terms_by_student_layer():
    text = """teacher bert = hf("tiny-bert")
student small = like(bert) { layers: 2 }
data corpus = text("data/corpus.txt")
stage s { data: corpus, steps: 10,
  loss: progressive(mse(bert.hidden, small.hidden) + kl(bert.attn_probs, small.attn_probs), over: 50%) }
"""
    st = check_source(text, "p.gkd", base_dir=CASES).spec.stages[0]
    starts = {(t.fn, t.pred.layer): t.gate.active_from for t in st.loss}
    assert starts == {("mse", 0): 0.0, ("mse", 1): 0.25, ("kl", 0): 0.0, ("kl", 1): 0.25}
    assert all(t.gate.active_until == 1.0 for t in st.loss)


# ---------------------------------------------------------------- the matrix of single-teacher methods

#: method -> call on a tiny-bert teacher ``t`` (2 x 64, 4 heads) and student ``s`` (2 blocks)
CALLS = {
    "kd": "kd(t, s)", "pd": "pd(t, s)", "tinybert": "tinybert.intermediate(t, s)", "minilm": "minilm(t, s)",
    "minilmv2": "minilmv2(t, s, heads: 16)", "distilbert": "distilbert(t, s)", "pkd": "pkd(t, s)",
    "rail_kd": "rail_kd(t, s)", "mgskd": "mgskd(t, s, m: 2, heads: 16)", "diito": "diito(t, s)",
    "sid": "sid(t, s)", "alp_kd": "alp_kd(t, s)", "ckd": "ckd(t, s)", "theseus": "theseus(t, s)",
    "universal_kd": "universal_kd(t, s)", "lrc_bert": "lrc_bert(t, s)", "annealing_kd": "annealing_kd(t, s)",
    "mobilebert": "mobilebert(t, s)", "continuation_kd": "continuation_kd(t, s)",
}
#: what each method needs of the student's head (others work on either)
NEEDS_LM = {"distilbert", "diito", "mobilebert"}
NEEDS_CLASSIFY = {"kd", "pd", "pkd", "rail_kd", "sid", "alp_kd", "ckd", "theseus", "universal_kd", "annealing_kd",
                  "continuation_kd"}
#: first error of a method alone when the student is narrower than the teacher (32 vs 64)
NARROW = {"distilbert": "cosine-width", "pkd": "dim-mismatch", "diito": "cosine-width", "sid": "cosine-width",
          "alp_kd": "dim-mismatch", "theseus": "dim-mismatch", "mobilebert": "no-bottleneck-teacher"}
#: first error of an LM-head method given a classification-head student (body order decides what comes first)
UNDER_CLASSIFY = {("distilbert", 64): "no-task-head", ("distilbert", 32): "cosine-width",
                  ("diito", 64): "no-task-head", ("diito", 32): "no-task-head",
                  ("mobilebert", 64): "no-task-head", ("mobilebert", 32): "no-bottleneck-teacher"}
#: methods that rewrite the student's forward pass: two in one stage are incompatible-methods
REWRITES = {"theseus", "diito", "lrc_bert"}


def single(method: str, width: int, head: str) -> str | None:
    if head == "classify" and method in NEEDS_LM:
        return UNDER_CLASSIFY[(method, width)]
    return NARROW.get(method) if width < 64 else None


def expected(a: str, b: str, width: int) -> set[str]:
    head = "lm" if {a, b} & NEEDS_LM and not {a, b} & NEEDS_CLASSIFY else "classify"
    # a loss expression stops at its first error: the left method's, else the right one's
    first = single(a, width, head) or single(b, width, head)
    if first:
        return {first}
    return {"incompatible-methods"} if a in REWRITES and b in REWRITES else set()


def pair_source(a: str, b: str, width: int) -> str:
    head = "" if {a, b} & NEEDS_LM and not {a, b} & NEEDS_CLASSIFY else ", head: classify(2)"
    return f"""use {", ".join(sorted({a, b}))}
teacher t = hf("tiny-bert") {{ {head.lstrip(', ')} }}
student s = like(t) {{ layers: 2, hidden: {width}{head} }}
data d = jsonl("data/sst2.jsonl") {{ text: sentence, label: label, seq_len: 16 }}
stage x {{ data: d, steps: 10, batch: 8, loss: {CALLS[a]} + {CALLS[b]} }}
"""


PAIRS = list(itertools.combinations_with_replacement(sorted(CALLS), 2))


@pytest.mark.parametrize("width", [64, 32], ids=["same-width", "narrow"])
def test_single_teacher_method_matrix(width: int):
    assert len(PAIRS) == 190
    wrong = []
    for a, b in PAIRS:
        result = check_source(pair_source(a, b, width), f"{a}+{b}.gkd", base_dir=CASES)
        got = {d.code for d in result.diagnostics if d.severity == "error"}
        if got != expected(a, b, width) or (not got and not result.ok):
            wrong.append(f"{a} + {b}: got {sorted(got)}, expected {sorted(expected(a, b, width))}")
    assert not wrong, "\n".join(wrong)


def test_matrix_refusals_point_at_both_sides():
    result = check_source(pair_source("theseus", "lrc_bert", 64), "x.gkd", base_dir=CASES)
    (d,) = [d for d in result.diagnostics if d.code == "incompatible-methods"]
    assert d.span.file == "<stdlib>/lrc_bert.gkd" and d.related[0][0].file == "<stdlib>/theseus.gkd"
    result = check_source(pair_source("kd", "distilbert", 32), "y.gkd", base_dir=CASES)
    (d,) = result.diagnostics
    assert d.code == "cosine-width" and {r[1].split(":")[0] for r in d.related} >= {"target", "prediction"}


# ---------------------------------------------------------------- progressive(until: plateau(...))


def test_sid_lowers_to_plateau_groups_and_a_final_phase():
    st = stage("sid", "finetune")
    (iv,) = st.interventions
    assert iv.kind == "plateau" and iv.on == "cos" and iv.deadlines is None
    assert (iv.patience, iv.window, iv.min_delta) == (3, 10, 0.0)
    groups = {}
    for t in st.loss:
        groups.setdefault(t.gate.group, []).append((t.fn, t.pred.inputs[0].layer if t.fn == "cos" else t.pred.layer)
                                                   if t.fn != "soft_ce" else t.fn)
    assert iv.groups == [f"{iv.id}/{j}" for j in range(6)]
    assert all(sorted(groups[g]) == [("cos", j), ("kl", j)] for j, g in enumerate(iv.groups))
    assert groups[iv.then] == ["soft_ce"]
    assert all(t.gate.active_from == 0.0 and t.gate.active_until == 1.0 for t in st.loss)  # the runtime gates them


PLATEAU = """teacher bert = hf("tiny-bert") {{ head: classify(2) }}
student small = like(bert) {{ layers: 2, head: classify(2) }}
data d = jsonl("data/sst2.jsonl") {{ text: sentence, label: label }}
stage s {{ data: d, steps: 10,
  loss: progressive(cos(bert.cls, small.cls, map: uniform) + kl(bert.attn_probs, small.attn_probs, map: uniform), {opts}) }}
"""


@pytest.mark.parametrize("opts, code, at", [
    ("until: plateau(patience: 0)", "bad-value", "0"),
    ("until: plateau(window: 2.5)", "bad-number", "2.5"),
    ("until: plateau(min_delta: -1)", "bad-value", "-1"),
    ("until: plateau(on: mse)", "bad-value", "plateau"),
    ("until: plateau(on: cosine)", "bad-value", "cosine"),
    ("until: plateau(pateince: 2)", "unknown-option", "pateince"),
    ("until: plateau(3)", "bad-arity", "plateau"),
    ("until: 3", "type-mismatch", "3"),
    ("until: plateau(), below_lr: 0.1", "conflicting-options", "0.1"),
    ("then: 3, over: 50%", "type-mismatch", "3"),
    ("then: ce(labels, small.task_logits)", "bad-value", "ce("),
])
def test_plateau_bad_input_has_a_code_and_position(opts, code, at):
    one_error_at(PLATEAU.format(opts=opts), "p.gkd", code, 5, opts, at)


def test_progressive_then_after_fixed_windows():
    result = check_source(PLATEAU.format(opts="over: 50%, then: ce(labels, small.task_logits)"), "p.gkd", base_dir=CASES)
    st = result.spec.stages[0]
    windows = sorted((t.fn, t.gate.active_from, t.gate.active_until) for t in st.loss)
    assert windows == [("ce", 0.5, 1.0), ("cos", 0.0, 0.5), ("cos", 0.25, 0.5), ("kl", 0.0, 0.5), ("kl", 0.25, 0.5)]


STAIRS = """teacher bert = hf("tiny-bert") {{ head: classify(2) }}
student small = like(bert) {{ layers: 2, head: classify(2) }}
data d = jsonl("data/sst2.jsonl") {{ text: sentence, label: label }}
stage s {{ data: d, epochs: 3, loss: {loss} }}
"""


def test_stairs_schedule_lowers_to_levels_per_epoch():
    result = check_source(STAIRS.format(loss="mse(anneal(bert.task_logits, phi: stairs(0.25, 1, levels: 4)), "
                                             "small.task_logits)"), "s.gkd", base_dir=CASES)
    (term,) = result.spec.stages[0].loss
    phi = term.target.phi
    assert (phi.kind, phi.value, phi.end, phi.levels, phi.every) == ("stairs", 0.25, 1.0, 4, "epoch")
    assert [phi.at(0.99, epoch=e) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert phi.at(0.0, step=7, epoch=0) == 0.25  # every: epoch ignores the step


def test_stairs_every_stage_splits_the_stage_into_equal_parts():
    result = check_source(STAIRS.format(loss="mse(anneal(bert.task_logits, phi: stairs(0.25, 1, levels: 4, "
                                             "every: stage)), small.task_logits)"), "s.gkd", base_dir=CASES)
    phi = result.spec.stages[0].loss[0].target.phi
    assert phi.every == "stage"
    assert [phi.at(x, epoch=9) for x in (0.0, 0.24, 0.25, 0.5, 0.74, 0.75, 1.0)] == [0.25, 0.25, 0.5, 0.75, 0.75, 1.0, 1.0]


@pytest.mark.parametrize("loss, code, at", [
    ("stairs(0.5, 1) * ce(labels, small.task_logits)", "missing-option", "stairs"),
    ("stairs(0.5, 1, levels: 0) * ce(labels, small.task_logits)", "bad-value", "0)"),
    ("stairs(0.5, 1, levels: 2, every: hour) * ce(labels, small.task_logits)", "bad-value", "hour"),
    ("stairs(0.5, levels: 2) * ce(labels, small.task_logits)", "bad-arity", "stairs"),
    ("ce(labels, small.task_logits) + replace_layers(bert, small, p: stairs(0.3, 1, levels: 3))", "bad-value",
     "stairs"),
])
def test_stairs_bad_input_has_a_code_and_position(loss, code, at):
    one_error_at(STAIRS.format(loss=loss), "s.gkd", code, 4, loss, at)


# ---------------------------------------------------------------- lists of teachers

TEACHERS3 = """use tmkd, mt_bert, uncertainty, rl_kd, dgkd
teacher a = hf("tiny-bert") {{ head: classify(2) }}
teacher b = hf("tiny-bert") {{ head: classify(2) }}
teacher c = hf("tiny-bert") {{ head: classify(2) }}
teacher sem = hf("tiny-bert") {{ head: none }}
student s = like(a) {{ layers: 2, head: classify(2) }}
data d = jsonl("data/sst2.jsonl") {{ text: sentence, label: label }}
stage x {{ data: d, steps: 10, batch: 8, {extra}loss: {loss} }}
"""


def test_multi_teacher_methods_take_a_list_of_three_teachers():
    def lowered(loss, extra=""):
        result = check_source(TEACHERS3.format(loss=loss, extra=extra), "t.gkd", base_dir=CASES)
        assert result.ok, [d.message for d in result.diagnostics]
        return result.spec.stages[0]

    st = lowered("tmkd([a, b, c], s)")
    assert [(t.fn, t.target.model if t.fn == "mse" else None, round(t.weight.value, 6)) for t in st.loss] == [
        ("mse", "a", 0.333333), ("mse", "b", 0.333333), ("mse", "c", 0.333333), ("ce", None, 0.333333)]
    (iv,) = lowered("uncertainty([a, b, c], s)", "micro_batch: 4, ").interventions
    assert [u.teacher for u in iv.units] == ["a", "b", "c"] and iv.min_micro_batch == 3
    (iv,) = lowered("mt_bert([a, b, c], s)").interventions
    assert iv.by == "teacher_ce" and len(iv.units) == 3
    (iv,) = lowered("rl_kd([a, b, c], s, sem)").interventions
    assert [u.teacher for u in iv.units] == ["a", "b", "c"] and iv.state_model == "sem"
    st = lowered("dgkd([a, b, c], s)")
    assert [iv.models for iv in st.interventions] == [["a"], ["b"], ["c"]]
    assert len({t.gate.group for t in st.loss if t.gate.group}) == 3


@pytest.mark.parametrize("loss, extra, code, at", [
    ("tmkd(a, s)", "", "type-mismatch", "ts"),
    ("tmkd([a, a], s)", "", "bad-value", "ts"),
    ("uncertainty([a, b, c], s)", "micro_batch: 2, ", "batch-too-small", "2"),
    ("weigh(kl(a.task_logits, s.task_logits), by: teacher_ce)", "", "type-mismatch", "kl("),
    ("mse(s.task_logits, [a, b].task_logits)", "", "type-mismatch", "[a, b]"),
    ("drop(kl([a, b].task_logits, s.task_logits), per: student)", "", "bad-value", "student"),
])
def test_teacher_list_bad_input_has_a_code_and_position(loss, extra, code, at):
    text = TEACHERS3.format(loss=loss, extra=extra)
    result = check_source(text, "t.gkd", base_dir=CASES)
    errors = [d for d in result.diagnostics if d.severity == "error"]
    assert [d.code for d in errors] == [code], errors
    d = errors[0]
    if d.span.file == "t.gkd":
        line = text.splitlines()[d.span.line - 1]
        assert d.span.line == 8 and d.span.col == line.index(at) + 1, (d.span, line)
    else:  # inside the library: the message names the library line, the related span the user's call
        assert d.span.file.startswith("<stdlib>/") and any(r[0].file == "t.gkd" and r[0].line == 8 for r in d.related)


def test_lrc_bert_perturbs_each_position_by_its_unit_gradient():
    (iv,) = stage("lrc_bert", "contrast").interventions
    assert (iv.eps, iv.norm) == (1.0, "token")
    text = PERTURB.format(opts="eps: 0.5, norm: tokens")
    result = check_source(text, "q.gkd", base_dir=CASES)
    (d,) = [d for d in result.diagnostics if d.severity == "error"]
    line = text.splitlines()[d.span.line - 1]
    assert (d.code, d.span.line, d.span.col) == ("bad-value", 4, line.index("tokens") + 1) and "batch, token" in d.message
    ok = check_source(PERTURB.format(opts="norm: batch"), "q.gkd", base_dir=CASES).spec.stages[0].interventions[0]
    assert (ok.eps, ok.norm) == (1e-5, "batch")


PERTURB = """teacher bert = hf("tiny-bert") {{ head: classify(2) }}
student small = like(bert) {{ layers: 2, head: classify(2) }}
data d = jsonl("data/sst2.jsonl") {{ text: sentence, label: label }}
stage s {{ data: d, steps: 10, loss: kl(bert.task_logits, small.task_logits) + perturb(small, {opts}) }}
"""


def test_relation_scores_option():
    text = STAIRS.format(loss="mse(relation(bert.hidden[1], heads: 2, softmax: false), relation(small.hidden[1], heads: 2, "
                              "softmax: false)) where not pad")
    (term,) = check_source(text, "r.gkd", base_dir=CASES).spec.stages[0].loss
    assert (term.pred.heads, term.pred.softmax) == (2, False) and term.mask == "not pad"
    bad = STAIRS.format(loss="mse(relation(bert.hidden[1], softmax: 3), relation(small.hidden[1]))")
    (d,) = [d for d in check_source(bad, "r.gkd", base_dir=CASES).diagnostics if d.severity == "error"]
    assert (d.code, d.span.line, d.span.col) == ("type-mismatch", 4, bad.splitlines()[3].index("3)") + 1)


@pytest.mark.parametrize("loss, code, at", [
    ("drop(soft_ce(bert.task_logits, small.task_logits), min_kept: -1)", "bad-value", "-1"),
    ("drop(soft_ce(bert.task_logits, small.task_logits), min_kept: 0.5)", "bad-number", "0.5"),
])
def test_drop_min_kept_bad_input_has_a_code_and_position(loss, code, at):
    one_error_at(STAIRS.format(loss=loss), "d.gkd", code, 4, loss, at)


def test_loss_average_reaches_the_term_and_bad_values_are_coded():
    for extra, want in (("", "kept"), (", average: kept", "kept"), (", average: all_positions", "all_positions")):
        text = STAIRS.format(loss=f"mse(bert.task_logits, small.task_logits{extra}) where not pad")
        (term,) = check_source(text, "a.gkd", base_dir=CASES).spec.stages[0].loss
        assert (term.average, term.mask) == (want, "not pad")
    loss = "mse(bert.task_logits, small.task_logits, average: everything)"
    text = STAIRS.format(loss=loss)
    errors = [d for d in check_source(text, "a.gkd", base_dir=CASES).diagnostics if d.severity == "error"]
    assert [(d.code, d.span.line) for d in errors] == [("bad-value", 4)], errors
    assert errors[0].span.col == text.splitlines()[3].index(loss) + loss.index("everything") + 1


def test_drop_min_kept_reaches_the_intervention():
    for extra, want in (("", 1), (", min_kept: 0", 0), (", min_kept: 2", 2)):
        text = STAIRS.format(loss=f"drop(soft_ce(bert.task_logits, small.task_logits){extra})")
        (iv,) = check_source(text, "d.gkd", base_dir=CASES).spec.stages[0].interventions
        assert iv.min_kept == want
