"""Offline teacher caches (issue 7): language option, cache writing (shards, resume, ranks), contract checks,
the sampled-tail KL estimator (unbiased loss and gradient, exact at k = V), the loss read from the cache against
the online dense loss, planning offline vs online, and a run.

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


def _spec_text(k: int = 16, dtype: str = "fp32", T: float = 2.0, extra: str = "", steps: str = "steps: 3",
               tail: str = "") -> str:
    return f"""
teacher t = hf("teacher") {{ dtype: fp32, cache: topk(k: {k}, dtype: {dtype}{tail}) }}
student s = like(t) {{ layers: 1, dtype: fp32 }}
data corpus = text("corpus.txt") {{ seq_len: 12, packing: false }}  # the tests index cached examples by line
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
    assert spec.models["t"].cache.model_dump() == {"kind": "topk", "k": 32, "tail": "sampled", "samples": 80,
                                                    "seed": 0, "dtype": "fp16", "path": "cache/t"}
    bucket = check_source(base.format(t="cache: topk(k: 64, tail: bucket)", s=""), "a.gkd").spec
    assert (bucket.models["t"].cache.tail, bucket.models["t"].cache.samples) == ("bucket", 0)
    both = check_source(base.format(t="cache: topk(tail: bucket, samples: 8)", s=""), "a.gkd")
    assert any("samples are drawn for tail: sampled only" in d.message for d in both.diagnostics)
    typo = check_source(base.format(t="cache: topk(tail: sample)", s=""), "a.gkd")
    assert any("tail is one of sampled, bucket" in d.message for d in typo.diagnostics)
    bad = check_source(base.format(t="", s=", cache: topk(k: 8)"), "a.gkd")
    assert not bad.ok and any("cache is a teacher option" in d.message for d in bad.diagnostics)
    huge = check_source(base.format(t="cache: topk(k: 60000)", s=""), "a.gkd")
    assert any("larger than the vocabulary" in d.message for d in huge.diagnostics)


# ---------------------------------------------------------------- writing, resume, ranks


def test_write_cache_shards_contract_and_bytes_per_token(workdir, tmp_path):
    job = _job(workdir, tmp_path / "c", k=8, dtype="fp16", tail=", samples: 12")
    res = cache.write_cache(job)
    assert res.complete and res.shards_written == 1 and res.tokens == sum(len(line.split()) for line in LINES)
    contract = cache.Contract.from_file(res.directory / cache.CONTRACT_FILE)
    assert (contract.k, contract.tail, contract.samples, contract.seed, contract.dtype, contract.temperature,
            contract.examples) == (8, "sampled", 12, 0, "fp16", 2.0, len(LINES))
    assert contract.signals == ("hidden.1", "logits")
    ex = cache.CacheReader(res.directory, contract).example(3)
    n = len(LINES[3].split())
    assert ex["logits.values"].shape == (n, 8) and ex["logits.values"].dtype == torch.float16
    assert ex["logits.indices"].dtype == torch.int16 and ex["hidden.1"].shape == (n, 32)
    assert ex["logits.samples"].shape == (n, 12) and ex["logits.samples"].dtype == torch.int16
    assert ex["logits.tail_xlogx"].shape == (n,) and bool((ex["logits.tail_xlogx"] <= 0).all())
    # stored values + tail form a distribution; ids are the teacher's top tokens, descending
    total = ex["logits.values"].float().sum(-1) + ex["logits.tail"]
    assert torch.allclose(total, torch.ones(n), atol=1e-6)
    assert bool((ex["logits.values"][:, :-1] >= ex["logits.values"][:, 1:]).all())
    # tail samples are tail tokens: never one of the row's top k
    top, drawn = cache._unpack_ids(ex["logits.indices"]), cache._unpack_ids(ex["logits.samples"])
    assert not bool((drawn[:, :, None] == top[:, None, :]).any())
    # fp16 value + int16 id per kept token, fp32 tail mass and tail x log x, int16 id per sample
    per_token = 8 * (2 + 2) + 4 + 4 + 12 * 2
    from planner.offline import bytes_per_token

    logits_only = job.capture.model_copy(update={"points": [p for p in job.capture.points if p.kind == "logits"]})
    assert bytes_per_token(job.model, logits_only) == per_token
    stored = sum(ex[name].numel() * ex[name].element_size() for name in ex if name.startswith("logits."))
    assert stored == n * per_token


def test_a_packed_stage_caches_its_blocks(workdir, tmp_path):
    """Packed data (the default without `packing: false`): the cache's examples are the run's blocks, every one
    seq_len real tokens, in the order the runtime's sampler indexes them."""
    spec_path = workdir / "packed.gkd"
    spec_path.write_text(_spec_text(k=8).replace(", packing: false", ""))
    spec = check_file(spec_path).spec
    graph = build_graph(spec)
    job = cache.jobs_for(spec, {s.name: graph.captures(s) for s in spec.stages}, workdir, out=tmp_path / "p")[0]
    res = cache.write_cache(job)
    contract = cache.Contract.from_file(res.directory / cache.CONTRACT_FILE)
    stream = sum(len(line.split()) + 1 for line in LINES)  # one token per word plus EOS after each line
    assert contract.examples == stream // 12 and res.tokens == contract.examples * 12
    assert cache.CacheReader(res.directory, contract).example(0)["logits.values"].shape == (12, 8)


def test_default_cache_of_a_49k_vocabulary_fits_300_bytes_per_token():
    from planner.offline import logits_bytes_per_token

    text = 'teacher t = hf("smollm2-135m") { cache: topk() }\nstudent s = like(t) { layers: 2 }\n' \
           'data c = text("c.txt")\nstage x { data: c, steps: 1, loss: kl(t.logits, s.logits) }\n'
    model = check_source(text, "a.gkd").spec.models["t"]  # the catalog's SmolLM2-135M config
    assert model.arch.vocab_size == 49152
    assert logits_bytes_per_token(model) == 32 * 4 + 8 + 80 * 2 == 296


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


def test_round_trip_through_the_shards_and_samples_independent_of_the_shard_split(workdir, tmp_path, monkeypatch):
    """What a run reads from disk is exactly the stored form of the teacher's logits, and an example's tail
    samples depend on (seed, example) only: the same with 5 examples per shard as with 256."""
    from runtime import models as M
    from runtime.adapters import capture

    job = _job(workdir, tmp_path / "whole", k=8, dtype="fp16", tail=", samples: 12, seed: 3")
    cache.write_cache(job)
    monkeypatch.setattr(cache, "SHARD_EXAMPLES", 5)
    split = _job(workdir, tmp_path / "split", k=8, dtype="fp16", tail=", samples: 12, seed: 3")
    cache.write_cache(split)
    contract = cache.Contract.from_file(split.directory / cache.CONTRACT_FILE)
    reader = cache.CacheReader(split.directory, contract)
    tokenizer = M.load_tokenizer(job.spec.models["s"], job.spec.models, workdir)
    tokens = cache.tokenized(job, tokenizer)
    teacher = cache.build_teacher(job, 0)
    ids = [2, 7, 13, 21]  # examples in shards 0, 1, 2 and 4
    batch = tokens.collate(ids, 0)
    logits = capture(teacher, batch, job.capture, grad=False)[("logits", None)]
    signals = reader.batch(ids, batch["input_ids"].shape[1])
    packed = signals[("logits", None)]
    assert packed.shape[-1] == cache.packed_width(contract) == 2 * (8 + 12) + 1
    for row, i in enumerate(ids):
        n = int(batch["attention_mask"][row].sum())
        direct = cache.encode_logits(logits[row, :n], contract, i, VOCAB)
        stored = reader.example(i)
        assert all(torch.equal(direct[name], stored[name]) for name in direct)
        assert torch.equal(cache.pack_logits(direct, contract)[0], packed[row, :n])
        assert bool((packed[row, n:] == 0).all())  # padding: zero weights, no loss
    whole = cache.CacheReader(job.directory, cache.Contract.from_file(job.directory / cache.CONTRACT_FILE))
    assert (whole.shard_examples, reader.shard_examples) == (256, 5)  # each cache reads with its own split
    for i in ids:
        a, b = whole.example(i), reader.example(i)
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


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
    # the tail's form, its sample count and its sampling seed are part of the contract
    with pytest.raises(RunError, match=r"samples: cache has 80, the spec needs 24"):
        _open(_job(workdir, out, k=8, T=2.0, tail=", samples: 24"))
    with pytest.raises(RunError, match=r"seed: cache has 0, the spec needs 5") as err:
        _open(_job(workdir, out, k=8, T=2.0, tail=", seed: 5"))
    assert "samples" not in str(err.value) and "k:" not in str(err.value)  # only what differs is named
    with pytest.raises(RunError, match=r"tail: cache has sampled, the spec needs bucket; samples: cache has 80, "
                                       r"the spec needs 0"):
        _open(_job(workdir, out, k=8, T=2.0, tail=", tail: bucket"))
    with pytest.raises(RunError, match="seed: cache has 0"):
        cache.write_cache(_job(workdir, out, k=8, tail=", seed: 5"))
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


def _losses(workdir: Path, out: Path, k: int, dtype: str, tail: str = "") -> tuple[float, float]:
    """(online dense kl, kl from the cache) of the spec's kl term for one batch and one student (the mse term
    on the cached hidden states is checked equal on the way)."""
    from runtime.adapters import capture
    from runtime.lossgraph import LossGraph
    from runtime import models as M

    job = _job(workdir, out / f"k{k}{dtype}{abs(hash(tail))}", k=k, dtype=dtype, tail=tail)
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
    dense, dense_parts = LossGraph(online_terms, dims)(
        {"t": capture(teacher, batch, caps["t"], grad=False), "s": student_sig}, batch, 0.0)
    cached_signals = teacher_reader.signals({**batch, "example_ids": torch.tensor(ids)})
    sparse, sparse_parts = LossGraph(cache.offline_terms(stage.loss, {"t": spec.models["t"].cache}), dims)(
        {"t": cached_signals, "s": student_sig}, batch, 0.0)
    rel = 1e-6 if dtype == "fp32" else 1e-3  # hidden states stored in fp16
    assert sparse_parts[stage.loss[1].id] == pytest.approx(dense_parts[stage.loss[1].id], rel=rel)
    kl_id = stage.loss[0].id
    return dense_parts[kl_id], sparse_parts[kl_id]


def test_loss_from_cache_equals_dense_at_k_equal_vocab_and_is_close_at_large_k(workdir, tmp_path):
    # the spec's kl is at T 2 with T^2 scaling: exact equality at k = V checks the temperature handling of both
    # sides (teacher softmax at cache time, student softmax at train time) against the dense loss
    dense, sparse = _losses(workdir, tmp_path, VOCAB, "fp32")
    assert sparse == pytest.approx(dense, rel=1e-5)
    dense_b, bucket_full = _losses(workdir, tmp_path, VOCAB, "fp32", ", tail: bucket")
    assert dense_b == pytest.approx(dense, rel=1e-6) and bucket_full == pytest.approx(dense, rel=1e-5)
    # at k = 2 of 146 tokens: the bucket form is a lower bound below the dense KL, the sampled tail an unbiased
    # estimate of it: over 6 sampling seeds the mean is within 4 standard errors (+ fp32 rounding) of the dense KL
    _, bucket = _losses(workdir, tmp_path, 2, "fp32", ", tail: bucket")
    sampled = [_losses(workdir, tmp_path, 2, "fp32", f", samples: 16, seed: {seed}")[1] for seed in range(6)]
    mean = sum(sampled) / len(sampled)
    se = (sum((x - mean) ** 2 for x in sampled) / (len(sampled) - 1) / len(sampled)) ** 0.5
    assert abs(mean - dense) <= 4 * se + 1e-5 * dense
    assert bucket < dense - 50 * (se + 1e-5 * dense)  # the gap the sampled tail closes is far beyond its noise
    _, fp16 = _losses(workdir, tmp_path, 32, "fp16")  # the default storage dtype: rounding stays small
    assert fp16 == pytest.approx(dense, rel=2e-3)
    assert len(set(sampled)) == len(sampled)  # the seeds really draw different samples


# ---------------------------------------------------------------- the sampled-tail estimator on random logits


def _contract(k: int, samples: int = 0, seed: int = 0, T: float = 1.0, tail: str = "sampled",
              dtype: str = "fp32") -> cache.Contract:
    return cache.Contract(format=cache.CACHE_FORMAT, teacher="t", stage="x", teacher_weights="", tokenizer="",
                          data="", examples=1, seq_len=1, signals=("logits",), k=k, tail=tail,
                          samples=samples if tail == "sampled" else 0, seed=seed, dtype=dtype, temperature=T)


def _cached_loss(teacher: torch.Tensor, student: torch.Tensor, contract: cache.Contract, example: int = 0):
    """The loss ``cached_kl`` (or ``cached_kl_bucket``) gives from the stored form of ``teacher`` [n, V]."""
    stored = cache.encode_logits(teacher, contract, example, teacher.shape[-1])
    packed, _ = cache.pack_logits(stored, contract)
    fn = cache.cached_kl if contract.tail == "sampled" else cache.cached_kl_bucket
    return fn(packed, student, T=contract.temperature)


def _logits(seed: int, n: int = 48, vocab: int = 300):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * 2.5, torch.randn(n, vocab, generator=g) * 2.0


def test_sampled_kl_is_unbiased_and_converges_to_the_dense_kl():
    from runtime.losses import kl

    teacher, student = _logits(0)
    T, k, m, R = 1.5, 10, 8, 160
    dense = float(kl(teacher, student, T=T))
    estimates = torch.tensor([float(_cached_loss(teacher, student, _contract(k, m, seed=r, T=T))) for r in range(R)])
    mean, se = float(estimates.mean()), float(estimates.std() / R ** 0.5)
    assert se > 0 and len(set(estimates.tolist())) == R  # every seed draws other samples
    assert abs(mean - dense) <= 4 * se
    # the test has power: the bucket form and top-k renormalised (the naive sparse caches) miss by far more
    bucket = float(_cached_loss(teacher, student, _contract(k, tail="bucket", T=T)))
    assert dense - bucket > 50 * se
    p = torch.softmax(teacher / T, -1)
    top, ids = p.topk(k, -1)
    renorm = top / top.sum(-1, keepdim=True)
    naive = float((renorm * (renorm.log() - torch.log_softmax(student / T, -1).gather(-1, ids))).sum(-1).mean() * T * T)
    assert abs(naive - dense) > 50 * se
    # with more samples per token the spread shrinks like 1 / sqrt(m)
    wide = torch.tensor([float(_cached_loss(teacher, student, _contract(k, 8 * m, seed=r, T=T))) for r in range(40)])
    assert float(wide.std()) < 0.6 * float(estimates.std())


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_sampled_kl_at_k_equal_vocab_is_the_dense_kl_and_its_gradient(T):
    from runtime.losses import kl

    teacher, student = _logits(1, n=12, vocab=40)
    a = student.clone().requires_grad_()
    cached = _cached_loss(teacher, a, _contract(40, 5, T=T))
    cached.backward()
    b = student.clone().requires_grad_()
    dense = kl(teacher, b, T=T)
    dense.backward()
    assert cached.item() == pytest.approx(dense.item(), rel=1e-6)
    assert torch.allclose(a.grad, b.grad, atol=1e-7, rtol=1e-5)


def test_sampled_kl_gradient_is_an_unbiased_estimate_of_the_dense_gradient():
    from runtime.losses import kl

    teacher, student = _logits(2, n=16, vocab=200)
    T, k, m, R = 2.0, 6, 8, 400

    def grad(loss_of):
        x = student.clone().requires_grad_()
        loss_of(x).backward()
        return x.grad

    dense = grad(lambda x: kl(teacher, x, T=T))
    grads = torch.stack([grad(lambda x, r=r: _cached_loss(teacher, x, _contract(k, m, seed=r, T=T)))
                         for r in range(R)])
    mean = grads.mean(0)
    # the error of the mean is what R draws leave: |mean - dense|^2 has expectation tr(Cov) / R
    spread = float(grads.var(0).sum() / R) ** 0.5
    assert float((mean - dense).norm()) <= 3 * spread
    assert float((mean - dense).norm()) < 0.1 * float(dense.norm())  # and the bound is not vacuous
    cos = torch.nn.functional.cosine_similarity
    one = float(cos(grads[0].flatten(), dense.flatten(), dim=0))
    assert float(cos(mean.flatten(), dense.flatten(), dim=0)) > max(0.99, one)
    bucket = grad(lambda x: _cached_loss(teacher, x, _contract(k, tail="bucket", T=T)))
    assert float((bucket - dense).norm()) > 5 * float((mean - dense).norm())


def test_sampled_kl_kernel_matches_autograd_and_two_terms_share_no_buffer():
    from runtime.losses import sampled_kl

    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 5, 64, generator=g)
    ids = torch.randint(0, 64, (2, 5, 9), generator=g)
    w = torch.rand(2, 5, 9, generator=g)
    const = torch.randn(2, 5, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    T = 1.7
    a = z.clone().requires_grad_()
    got = sampled_kl(w, ids, const, a, T, mask=mask)
    b = z.clone().requires_grad_()
    rows = const - (w * torch.log_softmax(b / T, -1).gather(-1, ids)).sum(-1)
    ref = rows[mask].mean() * T * T
    (got + 2 * sampled_kl(w.flip(-1), ids, const, a, T, mask=mask)).backward()  # two live buffers, then backward
    (ref + 2 * (const - (w.flip(-1) * torch.log_softmax(b / T, -1).gather(-1, ids)).sum(-1))[mask].mean() * T * T) \
        .backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
    assert float(a.grad[1, 3:].abs().max()) == 0.0  # masked rows get no gradient


def test_tail_samples_follow_the_tail_distribution():
    teacher, _ = _logits(4, n=3, vocab=50)
    k, m = 5, 4000
    c = _contract(k, m, seed=1)
    stored = cache.encode_logits(teacher, c, 0, 50)
    p = torch.softmax(teacher, -1)
    top = cache._unpack_ids(stored["logits.indices"])
    rest = p.scatter(-1, top, 0.0)
    assert torch.allclose(stored["logits.tail_xlogx"], torch.special.xlogy(rest, rest).sum(-1), atol=1e-6)
    assert torch.allclose(stored["logits.tail"], rest.sum(-1), atol=1e-6)
    drawn = cache._unpack_ids(stored["logits.samples"])
    freq = torch.zeros(3, 50).scatter_add_(-1, drawn, torch.ones(3, m)) / m
    target = rest / rest.sum(-1, keepdim=True)
    assert float(freq.gather(-1, top).sum()) == 0.0
    assert bool(((freq - target).abs() <= 4 * (target * (1 - target) / m).sqrt() + 1 / m).all())
    # the same (seed, example) draws the same samples; another example index draws others
    assert torch.equal(cache.encode_logits(teacher, c, 0, 50)["logits.samples"], stored["logits.samples"])
    assert not torch.equal(cache.encode_logits(teacher, c, 1, 50)["logits.samples"], stored["logits.samples"])


def test_offline_terms_rewrite_kl_and_refuse_other_logit_losses(workdir):
    spec = _spec(workdir)
    terms = cache.offline_terms(spec.stages[0].loss, {"t": spec.models["t"].cache})
    assert [t.fn for t in terms] == ["cached_kl", "mse"] and all(t.mask == "not pad" for t in terms)
    soft = spec.stages[0].loss[0].model_copy(update={"fn": "soft_ce"})
    with pytest.raises(RunError, match="soft_ce cannot read cached logits"):
        cache.offline_terms([soft], {"t": spec.models["t"].cache})


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
    allow = ["--allow-path", str(tmp_path)]  # the cache lives outside the spec's folder (docs/security.md)
    assert main(["cache", str(spec_path), *allow]) == 0
    assert cache.is_complete(tmp_path / "c" / "distill")
    from runtime import recipe

    built: list[list[str]] = []
    real = recipe.build_models
    monkeypatch.setattr(recipe, "build_models", lambda env, st, teachers, trained: built.append(list(teachers))
                        or real(env, st, teachers, trained))
    assert main(["run", str(spec_path), "--out", str(tmp_path / "run"), "--max-steps", "2", "--no-progress",
                 *allow]) == 0
    assert built[0] == []  # the offline teacher was never built for training
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["stages"][0]["placement"]["teacher_strategy"] == {"t": "offline"}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("step")]
    ids = {t.id for t in check_file(spec_path, allowed_paths=[tmp_path]).spec.stages[0].loss}
    assert len(steps) == 2 and all(set(r["terms"]) == ids for r in steps)
