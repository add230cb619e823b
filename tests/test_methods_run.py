"""Every GKD method (and GLMD's variants) checks, plans and trains for two steps on CPU with tiny models.

Each spec is a tiny-model variant of ``specs/methods/<method>.gkd`` (same library methods and options, teachers
and students of a few blocks of width 16-32 built from local configs with random weights) and runs through
the real pipeline: ``check_file`` -> ``build_plan`` -> ``runtime.recipe.run`` (``--max-steps 2``). Encoder
(BERT) variants run every method; decoder (GPT-2) variants run the methods that apply to decoders. Besides
"it runs", each test checks what the method must show in the metrics: its terms, its interventions' own
losses, and finite values. The behaviour of each intervention is tested in ``test_methods_formula.py``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from parity_tools import header, resumes_exactly, rl_kd_resume_spec, teacher

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"

pytestmark = pytest.mark.deepspeed  # ~50 small runs: about 2.5 minutes on two CPU cores, part of the default suite

FAMILY = {
    "bert": {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 32, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2,
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "gpt": {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 32, "n_head": 2, "n_positions": 64,
            "bos_token_id": 2, "eos_token_id": 3, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
}
LAYERS_KEY = {"bert": "num_hidden_layers", "gpt": "n_layer"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Local model folders (config + the example tokenizer, random weights) and small data files."""
    root = tmp_path_factory.mktemp("methods")
    for family, config in FAMILY.items():
        for layers in (2, 4):
            folder = root / f"{family}{layers}"
            folder.mkdir()
            full = {**config, LAYERS_KEY[family]: layers, "vocab_size": 146, "pad_token_id": 0}
            (folder / "config.json").write_text(json.dumps(full))
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(ROOT / "examples" / "tiny" / name, folder / name)
    (root / "sst2.jsonl").write_text("".join((DATA / "sst2.jsonl").read_text().splitlines(True)[:64]))
    (root / "corpus.txt").write_text("".join((DATA / "corpus.txt").read_text().splitlines(True)[:64]))
    return root


# method -> (spec body, terms or intervention losses that must appear in the metrics); {f} is the family
SPECS: dict[str, tuple[str, list[str]]] = {
    "kd": ("""use kd
{T}student small = like(bert) {{ layers: 2, head: classify(2), init: copy(bert, layers: [0, 2]) }}
stage finetune {{ data: sst2, steps: 4, batch: 8, loss: kd(bert, small, T: 10) }}""", ["kd.kd/soft_ce", "kd.kd/ce"]),
    "pd": ("""use pd
{T}student lm = like(bert) {{ layers: 2, head: lm }}
student small = like(lm) {{ head: classify(2), init: copy(lm) }}
stage pretrain {{ data: corpus, steps: 4, batch: 8, loss: pd.pretrain(lm) }}
stage finetune after pretrain {{ data: sst2, steps: 4, batch: 8, loss: pd(bert, small) }}""", ["pd.pd/soft_ce"]),
    "tinybert": ("""use tinybert
{T}student small = like(bert) {{ layers: 2, hidden: 16, heads: 2, head: classify(2) }}
stage general {{ data: corpus, steps: 4, batch: 8, loss: tinybert.intermediate(bert, small) }}
stage task_inter after general {{ data: sst2, steps: 4, batch: 8, loss: tinybert.intermediate(bert, small) }}
stage task_pred after task_inter {{ data: sst2, steps: 4, batch: 8, loss: tinybert.prediction(bert, small) }}""",
                 ["tinybert.intermediate/mse", "tinybert.prediction/soft_ce"]),
    "minilm": ("""use minilm
{T}student small = like(bert) {{ layers: 2, hidden: 16, heads: 2, head: lm }}
stage pretrain {{ data: corpus, steps: 4, batch: 8, loss: minilm(bert, small) }}""", ["minilm.minilm/kl"]),
    "minilmv2": ("""use minilmv2
{T}student small = like(bert) {{ layers: 2, hidden: 16, heads: 1, head: lm }}
stage pretrain {{ data: corpus, steps: 4, batch: 8, loss: minilmv2(bert, small, layer: -1, heads: 4) }}""",
                 ["minilmv2.minilmv2/kl"]),
    "distilbert": ("""use distilbert
{T}student small = like(bert) {{ layers: 2, head: lm, init: copy(bert, layers: [0, 2]) }}
stage pretrain {{ data: corpus, steps: 4, batch: 8, loss: distilbert(bert, small, T: 2) }}""",
                   ["distilbert.distilbert/cos", "distilbert.distilbert/kl", "distilbert.distilbert/ce"]),
    "pkd": ("""use pkd
{T}student small = like(bert) {{ layers: 2, head: classify(2), init: copy(bert, layers: [0, 1]) }}
stage finetune {{ data: sst2, steps: 4, batch: 8, loss: pkd(bert, small, alpha: 0.5, T: 10, beta: 100) }}""",
            ["pkd.pkd/mse", "pkd.pkd/kl", "pkd.pkd/ce"]),
    "rail_kd": ("""use distilbert, rail_kd
{T}teacher bert_task = hf("{f}4") {{ head: classify(2), init: random }}
student lm = like(bert) {{ layers: 3, head: lm, init: copy(bert, layers: [0, 1, 3]) }}
student small = like(lm) {{ head: classify(2), init: copy(lm) }}
stage pretrain {{ data: corpus, steps: 4, batch: 8, loss: distilbert(bert, lm) }}
stage finetune after pretrain {{ data: sst2, steps: 4, batch: 8, loss: rail_kd(bert_task, small, dim: 16, T: 10) }}""",
                ["rail_kd.rail_kd/sse"]),
    "mgskd": ("""use tinybert, mgskd
{T}student small = like(bert) {{ layers: 2, head: classify(2) }}
stage general {{ data: corpus, steps: 4, batch: 8, loss: tinybert.intermediate(bert, small) }}
stage structure after general {{ data: sst2, steps: 4, batch: 8, loss: mgskd(bert, small, m: 2, heads: 4, k: 3) }}
stage predict after structure {{ data: sst2, steps: 4, batch: 8, loss: mgskd.prediction(bert, small, T: 1) }}""",
              ["mgskd.mgskd/mgskd_token[small.embeddings", "mgskd.mgskd/mgskd_token[small.hidden[0]",
               "mgskd.mgskd/mgskd_sample[small.hidden[1]"]),
    "diito": ("""use diito
{T}student small = like(bert) {{ layers: 2, head: lm, init: copy(bert, layers: [0, 2]) }}
stage pretrain {{ data: corpus, steps: 4, batch: 8, loss: diito(bert, small, T: 2, fraction: 30%) }}""",
              ["diito.diito/kl[interchanged", "diito.diito/cos"]),
    "sid": ("""use sid
{T}student lm = like(bert) {{ layers: 2, head: lm }}
student small = like(lm) {{ head: classify(2), init: copy(lm) }}
stage pretrain {{ data: corpus, steps: 4, batch: 8, loss: ce(tokens, lm.logits) where masked }}
stage finetune after pretrain {{ data: sst2, steps: 4, batch: 8, loss: sid(bert, small, patience: 1, window: 1, T: 1) }}""",
            ["sid.sid/cos", "sid.sid/kl"]),
    "alp_kd": ("""use alp_kd
{T}student small = like(bert) {{ layers: 2, head: classify(2), init: copy(bert, layers: [0, 2]) }}
stage finetune {{ data: sst2, steps: 4, batch: 8, loss: alp_kd(bert, small, w: 0.2, alpha: 0.7, beta: 0.1, T: 20) }}""",
               ["alp_kd.alp_kd/mse", "alp_kd.alp_kd/soft_ce"]),
    "ckd": ("""use ckd
{T}student small = like(bert) {{ layers: 2, hidden: 16, heads: 2, head: classify(2) }}
stage finetune {{ data: sst2, steps: 4, batch: 8, loss: ckd(bert, small, window: 21) }}""",
            ["ckd.ckd/ckd_distance[stack", "ckd.ckd/ckd_angle[stack"]),
    "theseus": ("""use theseus
{T}student small = like(bert) {{ layers: 2, head: classify(2), init: copy(bert, layers: [0, 2]) }}
stage finetune {{ data: sst2, steps: 4, batch: 8, loss: theseus(bert, small, p0: 0.3, until: 66%) }}""",
                ["theseus.theseus/ce"]),
    "universal_kd": ("""use universal_kd
{T}student small = like(bert) {{ layers: 2, hidden: 16, heads: 2, head: classify(2) }}
stage distil {{ data: sst2, steps: 4, batch: 8, loss: universal_kd(bert, small, gamma: 0.5, alpha: 0.5) }}
stage finetune after distil {{ data: sst2, steps: 4, batch: 8, loss: ce(labels, small.task_logits) }}""",
                     ["universal_kd.universal_kd/kl"]),
    "lrc_bert": ("""use lrc_bert
{T}student small = like(bert) {{ layers: 2, hidden: 16, heads: 2, head: classify(2) }}
stage contrast {{ data: sst2, steps: 4, batch: 8, micro_batch: 8, loss: lrc_bert(bert, small) }}
stage predict after contrast {{ data: sst2, steps: 4, batch: 8, micro_batch: 8, loss: lrc_bert.prediction(bert, small) }}""",
                 ["lrc_bert.lrc_bert/cos_nce", "lrc_bert.prediction/kl"]),
    "annealing_kd": ("""use annealing_kd
{T}student small = like(bert) {{ layers: 2, head: classify(2), init: copy(bert, layers: [0, 2]) }}
stage anneal {{ data: sst2, steps: 4, batch: 8, loss: annealing_kd(bert, small, max_T: 7) }}
stage hard after anneal {{ data: sst2, steps: 4, batch: 8, loss: annealing_kd.hard(small) }}""",
                     ["annealing_kd.annealing_kd/mse", "annealing_kd.hard/ce"]),
    "mobilebert": ("""use mobilebert
teacher base = hf("{f}4") {{ head: lm, init: random }}
assistant ibt = like(base) {{ layers: 2, hidden: 32, heads: 2, intermediate: 128, embedding_size: 16 }}
student mobile_lm = like(base) {{ layers: 2, hidden: 32, heads: 2, intermediate: 16, embedding_size: 16 }}
student mobile = like(mobile_lm) {{ head: classify(2), init: copy(mobile_lm) }}
stage teacher_pretrain {{ data: corpus, steps: 4, batch: 8, loss: ce(tokens, ibt.logits) where masked }}
stage transfer after teacher_pretrain {{ data: corpus, steps: 4, batch: 8, loss: mobilebert(ibt, mobile_lm, w: 0.5, below_lr: 0.1) }}
stage finetune after transfer {{ data: sst2, steps: 4, batch: 8, loss: ce(labels, mobile.task_logits) }}""",
                   ["mobilebert.mobilebert/mse", "mobilebert.mobilebert/kl"]),
    "continuation_kd": ("""use continuation_kd
{T}student small = like(bert) {{ layers: 2, head: classify(2), init: copy(bert, layers: [0, 2]) }}
stage finetune {{ data: sst2, steps: 4, batch: 8, loss: continuation_kd(bert, small, max_T: 10, margin: 1) }}""",
                        ["continuation_kd.continuation_kd/gated_mse", "continuation_kd.continuation_kd/ce"]),
    "tmkd": ("""use tmkd
{T}teacher base = hf("{f}2") {{ head: classify(2), init: random }}
student small = like(base) {{ layers: 2, head: classify(2) }}
stage finetune {{ data: sst2, steps: 4, batch: 8, loss: tmkd([base, bert], small) }}""", ["tmkd.tmkd/mse"]),
    "mt_bert": ("""use mt_bert
{T}teacher base = hf("{f}2") {{ head: classify(2), init: random }}
student small = like(base) {{ layers: 2, head: classify(2) }}
stage finetune {{ data: sst2, steps: 4, batch: 8, loss: mt_bert([base, bert], small, T: 1) }}""",
                ["mt_bert.mt_bert/soft_ce", "mt_bert.patience/mse"]),
    "uncertainty": ("""use uncertainty
{T}teacher base = hf("{f}2") {{ head: classify(2), init: random }}
student small = like(base) {{ layers: 2, head: classify(2) }}
stage finetune {{ data: sst2, steps: 4, batch: 8, micro_batch: 4, loss: uncertainty([base, bert], small, T: 1) }}""",
                    ["uncertainty.uncertainty/kl"]),
    "rl_kd": ("""use rl_kd
{T}teacher base = hf("{f}2") {{ head: classify(2), init: random }}
teacher semantic = hf("{f}2") {{ head: none, init: random }}
student small = like(base) {{ layers: 2, head: classify(2) }}
stage average {{ data: sst2, steps: 4, batch: 8, loss: rl_kd.average([base, bert], small, T: 10) }}
stage select after average {{ data: sst2, steps: 4, batch: 8, loss: rl_kd([base, bert], small, semantic, T: 10) }}""",
              ["rl_kd.average/soft_ce", "select1/policy"]),
    "takd": ("""use takd
{T}assistant mid = like(bert) {{ layers: 3, head: classify(2) }}
student small = like(bert) {{ layers: 2, head: classify(2) }}
stage assistant_kd {{ data: sst2, steps: 4, batch: 8, loss: takd(bert, mid) }}
stage student_kd after assistant_kd {{ data: sst2, steps: 4, batch: 8, loss: takd(mid, small) }}""", ["takd.takd/kl"]),
    "dgkd": ("""use takd, dgkd
{T}assistant mid = like(bert) {{ layers: 3, head: classify(2) }}
student small = like(bert) {{ layers: 2, head: classify(2) }}
stage assistant_kd {{ data: sst2, steps: 4, batch: 8, loss: takd(bert, mid) }}
stage student_kd after assistant_kd {{ data: sst2, steps: 4, batch: 8, loss: dgkd([bert, mid], small, p: 25%) }}""",
             ["dgkd.dgkd/ce"]),
    "glmd_vc": ("""use glmd
teacher bert = hf("{f}4") {{ head: lm, init: random }}
{T}student small = like(bert) {{ layers: 2, head: lm }}
student small_task = like(small) {{ head: classify(2), init: copy(small) }}
stage pretrain {{ data: corpus, steps: 4, batch: 8, loss: glmd(bert, small, T: 15) }}
stage task_words after pretrain {{ data: sst2, steps: 4, batch: 8, loss: glmd(bert, small, T: 15) }}
stage task after task_words {{ data: sst2, steps: 4, batch: 8, loss: glmd.task(bert_task, small_task, T: 1) }}""",
                ["glmd.glmd/kl", "glmd.task/soft_ce"]),
}
_GLMD_VOCAB = """vocab small from bert {{ keep: 50%, multiple: 8, rank: frequency(corpus), protect: ["yes", "no"], remap: nearest(bert.embeddings) }}
vocab small_task from bert {{ keep: 50%, multiple: 8, rank: frequency(corpus), protect: ["yes", "no"], remap: nearest(bert.embeddings) }}
"""
SPECS["glmd"] = (SPECS["glmd_vc"][0] + "\n" + _GLMD_VOCAB, SPECS["glmd_vc"][1])
SPECS["glmd_al"] = (SPECS["glmd"][0].replace("{{ layers: 2, head: lm }}", "{{ layers: 2, head: lm, embedding_size: 16 }}"),
                    SPECS["glmd_vc"][1])

#: BERT-only constructs (factorised embeddings) and GLMD's BERT vocabulary; every other method runs on GPT-2 too
ENCODER_ONLY = {"mobilebert", "glmd_al", "glmd", "glmd_vc"}
#: methods whose teacher `bert` is read through its LM head (word-prediction losses)
LM_TEACHER = {"rail_kd", "distilbert", "diito", "minilm", "minilmv2"}
DECODER_METHODS = sorted(set(SPECS) - ENCODER_ONLY)


def spec_text(method: str, family: str) -> str:
    body, _ = SPECS[method]
    # the main teacher is `bert` in every variant (the name the library calls take), whatever its family
    if method.startswith("glmd"):
        t = f'teacher bert_task = hf("{family}4") {{ head: classify(2), init: random }}\n'
    else:
        t = teacher("bert", family, head="lm" if method in LM_TEACHER else "classify(2)")
    return header(family) + body.format(T=t, f=family).replace("{{", "{").replace("}}", "}")


def run_method(workdir: Path, method: str, family: str) -> list[dict]:
    from gkdlang.lower import check_file
    from planner.build import build_plan
    from runtime.recipe import run

    case = workdir / f"{method}-{family}"
    case.mkdir()
    path = workdir / f"{method}-{family}.gkd"
    path.write_text(spec_text(method, family))
    checked = check_file(path)
    assert checked.ok, [f"{d.code}: {d.message}" for d in checked.diagnostics]
    plan = build_plan(checked.spec, gkdc_version="test", spec_path=str(path), plan_path=str(case / "plan.json"))
    assert not hasattr(plan, "diagnostics"), str(plan)
    (case / "plan.json").write_text(plan.model_dump_json())
    result = run(plan, case / "plan.json", case / "out", resume=False, progress=False, max_steps=2)
    assert result.student_dir is not None and (result.student_dir / "config.json").exists()
    records = [json.loads(line) for line in (case / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [s.name for s in checked.spec.stages for _ in range(2)]
    for r in records:
        assert math.isfinite(r["total"]) and all(math.isfinite(v) for v in r["terms"].values()), r
    return records


def _assert_terms(records: list[dict], wanted: list[str]) -> None:
    seen = {name for r in records for name in r["terms"]}
    for prefix in wanted:
        assert any(name.startswith(prefix) for name in seen), (prefix, sorted(seen))


@pytest.mark.parametrize("method", sorted(SPECS))
def test_method_runs_on_an_encoder(workdir, method):
    records = run_method(workdir, method, "bert")
    _assert_terms(records, SPECS[method][1])


@pytest.mark.parametrize("method", DECODER_METHODS)
def test_method_runs_on_a_decoder(workdir, method):
    records = run_method(workdir, method, "gpt")
    _assert_terms(records, SPECS[method][1])


def test_every_method_spec_has_a_tiny_variant():
    names = {p.stem for p in (ROOT / "specs" / "methods").glob("*.gkd")}
    assert names == set(SPECS)


def test_interrupted_run_with_random_interventions_resumes_exactly(workdir, monkeypatch):
    """RL-KD's agent (trained, with a reward baseline), Theseus' random replacement and per-micro-batch draws:
    a run that crashes after its step-2 checkpoint and is resumed ends with the uninterrupted weights."""
    text = rl_kd_resume_spec("rl_kd([base, bert], small, semantic, T: 10) + replace_layers(bert, small, "
                             "p: linear(0.3, 1, until: 66%))")
    resumes_exactly(workdir, monkeypatch, text, "resume", crash_after=3, resumed_from="select:2")


def test_sid_plateau_unlocks_during_a_run_and_resumes_exactly(workdir, monkeypatch):
    """SID's plateau state (current layer, best window, count) is checkpointed with the student: a run that crashes
    after its step-4 checkpoint and is resumed unlocks at the same steps and ends with the uninterrupted weights."""
    text = header("bert") + teacher("bert", "bert") + """use sid
student small = like(bert) { layers: 2, head: classify(2), init: copy(bert, layers: [0, 2]) }
stage finetune { data: sst2, steps: 9, batch: 8, save_every: 4, loss: sid(bert, small, patience: 1, window: 2, min_delta: 10) }
"""
    straight_dir, out = resumes_exactly(workdir, monkeypatch, text, "sid", crash_after=5, resumed_from="finetune:4")

    def phases(out_dir):
        records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], sorted(k.split("<-")[0] for k in r["terms"])) for r in records]

    # min_delta 10: no window ever improves on the first, so with window 2 and patience 1 a layer unlocks every
    # 4 steps: layer 0 for steps 1-4, layers 0 and 1 for 5-8, then the soft CE alone
    straight = phases(straight_dir)
    cos0, cos1 = "sid.sid/cos[pool(small.hidden[0])", "sid.sid/cos[pool(small.hidden[1])"
    assert {t for _, terms in straight for t in terms} == {cos0, cos1, "sid.sid/kl[small.attn_probs[0]",
                                                          "sid.sid/kl[small.attn_probs[1]", "sid.sid/soft_ce[small.task_logits"}
    assert [step for step, terms in straight if cos1 in terms] == [5, 6, 7, 8]
    assert [step for step, terms in straight if cos0 in terms] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert straight[-1] == (9, ["sid.sid/soft_ce[small.task_logits"])
    assert phases(out)[-5:] == straight[-5:]


#: the multi-teacher methods with three teachers (the library takes a list of any length)
THREE_TEACHERS = {
    "tmkd": ("use tmkd\nstage finetune { data: sst2, steps: 4, batch: 8, loss: tmkd([base, bert, third], small) }",
             ["tmkd.tmkd/mse"]),
    "mt_bert": ("use mt_bert\nstage finetune { data: sst2, steps: 4, batch: 8, loss: mt_bert([base, bert, third], small) }",
                ["mt_bert.mt_bert/soft_ce", "mt_bert.patience/mse"]),
    "uncertainty": ("use uncertainty\nstage finetune { data: sst2, steps: 4, batch: 8, micro_batch: 4, "
                    "loss: uncertainty([base, bert, third], small) }", ["uncertainty.uncertainty/kl"]),
    "rl_kd": ('use rl_kd\nteacher semantic = hf("bert2") { head: none, init: random }\n'
              "stage average { data: sst2, steps: 4, batch: 8, loss: rl_kd.average([base, bert, third], small) }\n"
              "stage select after average { data: sst2, steps: 4, batch: 8, loss: rl_kd([base, bert, third], small, semantic) }",
              ["rl_kd.average/soft_ce", "rl_kd.rl_kd/soft_ce", "select"]),
    "dgkd": ("use dgkd\nassistant mid = like(bert) { layers: 3, head: classify(2) }\n"
             "stage assistant_kd { data: sst2, steps: 4, batch: 8, loss: ce(labels, mid.task_logits) }\n"
             "stage student_kd after assistant_kd { data: sst2, steps: 4, batch: 8, loss: dgkd([bert, mid, third], small) }",
             ["dgkd.dgkd/ce"]),
}


@pytest.mark.parametrize("method", sorted(THREE_TEACHERS))
def test_multi_teacher_method_runs_with_three_teachers(workdir, method):
    from gkdlang.lower import check_file
    from planner.build import build_plan
    from runtime.recipe import run

    body, wanted = THREE_TEACHERS[method]
    text = (header("bert") + teacher("bert", "bert") + teacher("base", "bert", 2) + teacher("third", "bert", 4)
            + 'student small = like(base) { layers: 2, head: classify(2) }\n' + body + "\n")
    path = workdir / f"three-{method}.gkd"
    path.write_text(text)
    checked = check_file(path)
    assert checked.ok, [f"{d.code}: {d.message}" for d in checked.diagnostics]
    last = checked.spec.stages[-1]
    assert {"base", "bert", "third"} <= set(last.teachers) or method == "dgkd"
    case = workdir / f"three-{method}"
    case.mkdir()
    plan = build_plan(checked.spec, gkdc_version="test", spec_path=str(path), plan_path=str(case / "plan.json"))
    (case / "plan.json").write_text(plan.model_dump_json())
    run(plan, case / "plan.json", case / "out", resume=False, progress=False, max_steps=2)
    records = [json.loads(line) for line in (case / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["total"]) for r in records)
    _assert_terms(records, wanted)
    final = [r for r in records if r["stage"] == last.name]
    readers = {name.split("<-")[1].split(".")[0] for r in final for name in r["terms"] if "<-" in name}
    if method == "dgkd":  # one drop unit per teacher (each kept w.p. > 3/4 per step)
        assert [iv.models for iv in last.interventions] == [["bert"], ["mid"], ["third"]]
    elif method == "rl_kd":  # the agent keeps or skips each of the three per example
        (iv,) = last.interventions
        assert [u.teacher for u in iv.units] == ["base", "bert", "third"]
    else:  # every teacher's terms ran
        assert readers >= {"base", "bert", "third"}, readers
