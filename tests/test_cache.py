"""Offline teacher caches (issue 7): language option, cache writing (shards, resume, ranks), contract checks,
the sparse loss read from the cache against the online dense loss, planning offline vs online, and a run.

Everything runs on a 2-block, width-32 GPT-2 teacher saved to a temporary folder (the example tokenizer,
146 tokens) whose head is scaled up so its next-token distributions are peaked like a trained model's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from gkdlang.lower import check_file, check_source
from planner.build import build_plan
from planner.graph import build_graph
from runtime import cache
from runtime.errors import RunError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny"
VOCAB = 146
_WORDS = (ROOT / "examples" / "data" / "corpus.txt").read_text().split()[:400]
LINES = [" ".join(_WORDS[i * 9:i * 9 + 3 + i % 9]) for i in range(22)]  # 3..11 words: padding in every batch


def _teacher(directory: Path) -> None:
    """A tiny GPT-2 with a sharpened head (peaked distributions) saved as a local safetensors model."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    model = tf.GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(40.0)  # tied head: logits spread over ~+-10
    model.save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / name, directory / name)


def _spec_text(k: int = 16, dtype: str = "fp32", T: float = 2.0, extra: str = "", steps: str = "steps: 3") -> str:
    return f"""
teacher t = hf("teacher") {{ dtype: fp32, cache: topk(k: {k}, dtype: {dtype}) }}
student s = like(t) {{ layers: 1, dtype: fp32 }}
data corpus = text("corpus.txt") {{ seq_len: 12 }}
stage distill {{
  data: corpus
  {steps}
  batch: 4
  loss: kl(t.logits, s.logits, T: {T}) + 0.5 * mse(t.hidden[1], s.hidden[0]) where not pad {extra}
}}
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    _teacher(root / "teacher")
    (root / "corpus.txt").write_text("\n".join(LINES) + "\n")
    return root


def _spec(root: Path, name: str = "spec.gkd", **kw):
    path = root / name
    path.write_text(_spec_text(**kw))
    result = check_file(path)
    assert result.ok, [d.message for d in result.diagnostics]
    return result.spec


def _job(root: Path, out: Path, **kw) -> cache.CacheJob:
    spec = _spec(root, **kw)
    graph = build_graph(spec)
    return cache.jobs_for(spec, {s.name: graph.captures(s) for s in spec.stages}, root, out=out)[0]


# ---------------------------------------------------------------- language


def test_cache_option_lowers_with_defaults_and_is_refused_on_students():
    base = 'teacher t = hf("gpt2") {{ {t} }}\nstudent s = like(t) {{ layers: 2 {s} }}\n' \
           'data c = text("c.txt")\nstage x {{ data: c, steps: 1, loss: kl(t.logits, s.logits) }}\n'
    spec = check_source(base.format(t="cache: topk()", s=""), "a.gkd").spec
    assert spec.models["t"].cache.model_dump() == {"kind": "topk", "k": 64, "dtype": "fp16", "path": "cache/t"}
    bad = check_source(base.format(t="", s=", cache: topk(k: 8)"), "a.gkd")
    assert not bad.ok and any("cache is a teacher option" in d.message for d in bad.diagnostics)
    huge = check_source(base.format(t="cache: topk(k: 60000)", s=""), "a.gkd")
    assert any("larger than the vocabulary" in d.message for d in huge.diagnostics)


# ---------------------------------------------------------------- writing, resume, ranks


def test_write_cache_shards_contract_and_bytes_per_token(workdir, tmp_path):
    job = _job(workdir, tmp_path / "c", k=8, dtype="fp16")
    res = cache.write_cache(job)
    assert res.complete and res.shards_written == 1 and res.tokens == sum(len(line.split()) for line in LINES)
    contract = cache.Contract.from_file(res.directory / cache.CONTRACT_FILE)
    assert (contract.k, contract.dtype, contract.temperature, contract.examples) == (8, "fp16", 2.0, len(LINES))
    assert contract.signals == ("hidden.1", "logits")
    ex = cache.CacheReader(res.directory, contract).example(3)
    n = len(LINES[3].split())
    assert ex["logits.values"].shape == (n, 8) and ex["logits.values"].dtype == torch.float16
    assert ex["logits.indices"].dtype == torch.int16 and ex["hidden.1"].shape == (n, 32)
    # stored values + tail form a distribution; ids are the teacher's top tokens, descending
    total = ex["logits.values"].float().sum(-1) + ex["logits.tail"]
    assert torch.allclose(total, torch.ones(n), atol=1e-6)
    assert bool((ex["logits.values"][:, :-1] >= ex["logits.values"][:, 1:]).all())
    per_token = 8 * (2 + 2) + 4  # fp16 value + int16 id per kept token, fp32 tail
    from planner.offline import bytes_per_token

    logits_only = job.capture.model_copy(update={"points": [p for p in job.capture.points if p.kind == "logits"]})
    assert bytes_per_token(job.model, logits_only) == per_token


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(directory.glob("shard-*.safetensors")):
        out.update({f"{path.name}/{k}": v for k, v in load_file(str(path)).items()})
    return out


def test_half_written_cache_resumes_and_equals_a_fresh_one(workdir, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "SHARD_EXAMPLES", 5)  # 22 examples -> 5 shards
    job = _job(workdir, tmp_path / "half", k=8)
    first = cache.write_cache(job, limit_shards=2)
    assert (first.shards_written, first.complete) == (2, False)
    assert not cache.is_complete(job.directory)
    with pytest.raises(RunError, match="incomplete"):
        cache.CacheReader(job.directory, cache.Contract.from_file(job.directory / cache.CONTRACT_FILE))
    second = cache.write_cache(job)
    assert (second.shards_written, second.shards_skipped, second.complete) == (3, 2, True)
    fresh = cache.write_cache(_job(workdir, tmp_path / "fresh", k=8))
    a, b = _tensors(job.directory), _tensors(fresh.directory)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ranks_write_disjoint_shards(workdir, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "SHARD_EXAMPLES", 5)
    job = _job(workdir, tmp_path / "ranks", k=8)
    r1 = cache.write_cache(job, rank=1, world=2)
    assert not r1.complete and sorted(p.name for p in job.directory.glob("shard-*")) == \
        ["shard-00001.safetensors", "shard-00003.safetensors"]
    r0 = cache.write_cache(job, rank=0, world=2)
    assert (r0.shards_written, r0.complete) == (3, True)


# ---------------------------------------------------------------- contract


def _open(job: cache.CacheJob) -> cache.CachedTeacher:
    from runtime import models as M

    tokenizer = M.load_tokenizer(job.spec.models["s"], job.spec.models, job.base_dir)
    return cache.open_teacher(job, tokenizer, cache.tokenized(job, tokenizer))


def test_contract_mismatch_is_refused_naming_the_field(workdir, tmp_path):
    out = tmp_path / "contract"
    cache.write_cache(_job(workdir, out, k=8, T=2.0))
    _open(_job(workdir, out, k=8, T=2.0))  # the same spec reads it
    with pytest.raises(RunError, match=r"k: cache has 8, the spec needs 12"):
        _open(_job(workdir, out, k=12, T=2.0))
    with pytest.raises(RunError, match=r"temperature: cache has 2.0, the spec needs 1.0"):
        _open(_job(workdir, out, k=8, T=1.0))
    # a resumed write into a directory of another contract is refused too (no mixed shards)
    with pytest.raises(RunError, match="k: cache has 8"):
        cache.write_cache(_job(workdir, out, k=12))
    corpus = workdir / "corpus.txt"
    saved = corpus.read_text()
    try:
        corpus.write_text(saved.replace(LINES[0], LINES[1], 1))
        os.utime(corpus, (1e9, 1e9))  # datasets keys its load cache on path + mtime (1 s resolution)
        with pytest.raises(RunError, match=r"data: cache has [0-9a-f]{12}"):
            _open(_job(workdir, out, k=8, T=2.0))
    finally:
        corpus.write_text(saved)
        os.utime(corpus, (2e9, 2e9))


# ---------------------------------------------------------------- loss from the cache vs dense online loss


def _losses(workdir: Path, out: Path, k: int, dtype: str) -> tuple[float, float]:
    """(online dense loss, loss from the cache) of the spec's terms for one batch and one student."""
    from runtime.adapters import capture
    from runtime.lossgraph import LossGraph
    from runtime import models as M

    job = _job(workdir, out / f"k{k}{dtype}", k=k, dtype=dtype)
    cache.write_cache(job)
    teacher_reader = _open(job)
    spec, stage = job.spec, job.stage
    tokenizer = M.load_tokenizer(spec.models["s"], spec.models, workdir)
    tokens = cache.tokenized(job, tokenizer)
    torch.manual_seed(1)
    student = M.build_model(spec.models["s"], workdir, {}).float()
    teacher = cache.build_teacher(job, 0)
    ids = [0, 3, 7, 21]
    batch = tokens.collate(ids, 0)
    graph = build_graph(spec)
    caps = {c.model: c for c in graph.captures(stage)}
    student_sig = capture(student, batch, caps["s"], grad=False)
    # online: kl over real tokens (the cache holds those), same normalisation on both sides
    online_terms = [t.model_copy(update={"mask": t.mask or "not pad"}) for t in stage.loss]
    dims = {n: m.arch for n, m in spec.models.items()}
    dense, _ = LossGraph(online_terms, dims)({"t": capture(teacher, batch, caps["t"], grad=False), "s": student_sig},
                                             batch, 0.0)
    cached_signals = teacher_reader.signals({**batch, "example_ids": torch.tensor(ids)})
    sparse, _ = LossGraph(cache.offline_terms(stage.loss, {"t"}), dims)({"t": cached_signals, "s": student_sig},
                                                                       batch, 0.0)
    return float(dense), float(sparse)


def test_loss_from_cache_equals_dense_at_k_equal_vocab_and_is_close_at_large_k(workdir, tmp_path):
    dense, sparse = _losses(workdir, tmp_path, VOCAB, "fp32")
    assert sparse == pytest.approx(dense, rel=1e-5)
    dense64, sparse64 = _losses(workdir, tmp_path, 64, "fp16")
    assert dense64 == pytest.approx(dense, rel=1e-6)
    assert sparse64 == pytest.approx(dense, rel=0.01)
    assert sparse64 <= dense * (1 + 1e-3)  # coarse-graining never increases KL (up to fp16 rounding)


def test_offline_terms_rewrite_kl_and_refuse_other_logit_losses(workdir):
    spec = _spec(workdir)
    terms = cache.offline_terms(spec.stages[0].loss, {"t"})
    assert [t.fn for t in terms] == ["cached_kl", "mse"] and all(t.mask == "not pad" for t in terms)
    soft = spec.stages[0].loss[0].model_copy(update={"fn": "soft_ce"})
    with pytest.raises(RunError, match="soft_ce cannot read cached logits"):
        cache.offline_terms([soft], {"t"})


# ---------------------------------------------------------------- planning


def test_plan_prices_offline_against_online(workdir):
    spec = _spec(workdir, name="epochs.gkd", steps="epochs: 4")
    plan = build_plan(spec, gkdc_version="test", spec_path=str(workdir / "epochs.gkd"))
    stage = plan.stages[0]
    assert stage.placement.teacher_strategy == {"t": "offline"}
    assert "cache_read" in stage.step_time_parts
    online = [c for c in stage.alternatives if c.placement.teacher_strategy["t"] == "replicated"]
    assert online and all(c.step_time_s > stage.step_time_s for c in online)
    note = next(n for n in plan.notes if "cache cache/t" in n)
    assert "B/token" in note and "step time offline" in note and "offline chosen" in note
    # the same stage without a cache has no offline candidate
    plain = check_source((workdir / "epochs.gkd").read_text().replace(", cache: topk(k: 16, dtype: fp32)", ""),
                         str(workdir / "plain.gkd"), base_dir=workdir).spec
    p2 = build_plan(plain, gkdc_version="test", spec_path=str(workdir / "plain.gkd"))
    strategies = {c.placement.teacher_strategy["t"] for c in p2.stages[0].alternatives} | \
        {p2.stages[0].placement.teacher_strategy["t"]}
    assert "offline" not in strategies and not any("cache" in n for n in p2.notes)


def test_uncacheable_teacher_is_not_offered_offline(workdir):
    text = _spec_text(steps="epochs: 4").replace("kl(t.logits, s.logits, T: 2.0)", "jsd(t.logits, s.logits)")
    (workdir / "jsd.gkd").write_text(text)
    spec = check_file(workdir / "jsd.gkd").spec
    plan = build_plan(spec, gkdc_version="test", spec_path=str(workdir / "jsd.gkd"))
    assert plan.stages[0].placement.teacher_strategy == {"t": "replicated"}
    assert any("is not used" in n and "jsd" in n for n in plan.notes)


# ---------------------------------------------------------------- a run from the cache


def test_run_trains_from_the_cache_without_loading_the_teacher(workdir, tmp_path, monkeypatch):
    from gkdc.cli import main

    spec_path = workdir / "run.gkd"
    # 20 steps x batch 4 over 22 examples: 3.6 epochs, so the planner picks offline
    spec_path.write_text(_spec_text(steps="steps: 20").replace('cache: topk(k: 16, dtype: fp32)',
                                                                f'cache: topk(k: 16, path: "{tmp_path / "c"}")'))
    assert main(["cache", str(spec_path)]) == 0
    assert cache.is_complete(tmp_path / "c" / "distill")
    from runtime import recipe

    built: list[list[str]] = []
    real = recipe.build_models
    monkeypatch.setattr(recipe, "build_models", lambda env, st, teachers, trained: built.append(list(teachers))
                        or real(env, st, teachers, trained))
    assert main(["run", str(spec_path), "--out", str(tmp_path / "run"), "--max-steps", "2", "--no-progress"]) == 0
    assert built[0] == []  # the offline teacher was never built for training
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["stages"][0]["placement"]["teacher_strategy"] == {"t": "offline"}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("step")]
    assert len(steps) == 2 and all(set(r["terms"]) == {t.id for t in check_file(spec_path).spec.stages[0].loss}
                                   for r in steps)
