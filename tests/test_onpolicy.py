"""On-policy distillation (issue 17), the runtime half: DistiLLM's skew losses and the generated-token losses
against naive float64 formulas, ..."""

from __future__ import annotations

import math

import pytest
import torch

from runtime import losses as L
from runtime.errors import RunError


def rnd(*shape, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _softmax(z):
    top = max(z)
    e = [math.exp(v - top) for v in z]
    return [v / sum(e) for v in e]


def naive(kind, t, s, mask, alpha=0.1, beta=0.5, T=1.0):
    """The divergence per kept row from Python floats (the papers' formulas), mean over kept rows."""
    total, rows = 0.0, 0
    flat_t = t.double().reshape(-1, t.shape[-1]).tolist()
    flat_s = s.double().reshape(-1, s.shape[-1]).tolist()
    for tr, sr, keep in zip(flat_t, flat_s, mask.reshape(-1).tolist()):
        if not keep:
            continue
        p, q = _softmax([v / T for v in tr]), _softmax([v / T for v in sr])
        if kind == "skew_kl":  # KL(p || a p + (1 - a) q)
            total += sum(pi * math.log(pi / (alpha * pi + (1 - alpha) * qi)) for pi, qi in zip(p, q))
        elif kind == "skew_rkl":  # KL(q || a q + (1 - a) p)
            total += sum(qi * math.log(qi / (alpha * qi + (1 - alpha) * pi)) for pi, qi in zip(p, q))
        elif kind == "rkl" or (kind == "gjsd" and beta == 1):  # TRL branches at its endpoints
            total += sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
        elif kind == "gjsd" and beta == 0:
            total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        else:  # TRL's generalized JSD
            m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
            total += beta * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m)) + \
                (1 - beta) * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m))
        rows += 1
    return total / rows


def naive_grad(kind, t, s, mask, wrt="pred", **opts):
    """d loss / d student logits (``wrt="target"``: d loss / d teacher logits) by autograd through the float64
    formula written with torch ops."""
    x = s.double().clone().requires_grad_(wrt == "pred")
    y = t.double().clone().requires_grad_(wrt == "target")
    T = opts.get("T", 1.0)
    lq, lp = torch.log_softmax(x / T, -1), torch.log_softmax(y / T, -1)
    a = opts.get("alpha", 0.1)
    if kind == "skew_kl":
        lm = torch.log(a * lp.exp() + (1 - a) * lq.exp())
        rows = (lp.exp() * (lp - lm)).sum(-1)
    else:
        lm = torch.log(a * lq.exp() + (1 - a) * lp.exp())
        rows = (lq.exp() * (lq - lm)).sum(-1)
    keep = mask.double()
    ((rows * keep).sum() / keep.sum()).backward()
    return (x if wrt == "pred" else y).grad.float()


def padded_mask(b, s):
    """Generated-token masks: each row keeps a different run (prompt before it, padding after it)."""
    m = torch.zeros(b, s, dtype=torch.bool)
    m[0, 2:5] = True
    m[1, 1:] = True
    m[2, 4:6] = True
    return m


@pytest.mark.parametrize("kind", ["skew_kl", "skew_rkl"])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.0])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [None, 2])
def test_skew_losses_match_the_naive_formula_with_padding(kind, alpha, T, chunk):
    b, s, v = 3, 7, 29
    t, x = rnd(b, s, v, seed=1), rnd(b, s, v, seed=2)
    mask = padded_mask(b, s)
    # padded rows hold garbage: they must not count
    x[~mask] = 1e4
    pred = x.clone().requires_grad_(True)
    value = L.LOSSES[kind](t, pred, mask=mask, alpha=alpha, T=T, chunk=chunk)
    assert value.item() == pytest.approx(naive(kind, t, x, mask, alpha=alpha, T=T), rel=1e-5)
    value.backward()
    want = naive_grad(kind, t, x, mask, alpha=alpha, T=T)
    assert torch.allclose(pred.grad, want, rtol=1e-5, atol=1e-7)
    assert (pred.grad[~mask] == 0).all()


@pytest.mark.parametrize("kind", ["skew_kl", "skew_rkl"])
@pytest.mark.parametrize("alpha", [0.1, 0.5])
@pytest.mark.parametrize("chunk", [None, 2])
def test_skew_losses_train_a_target_with_a_graph_as_the_naive_formula_does(kind, alpha, chunk):
    """Inside ``target_grad()`` the skew kernels' differentiable row form gives the teacher-side gradient."""
    b, s, v = 3, 7, 29
    t, x = rnd(b, s, v, seed=11), rnd(b, s, v, seed=12)
    mask = padded_mask(b, s)
    target = t.clone().requires_grad_(True)
    with L.target_grad():
        L.LOSSES[kind](target, x.clone().requires_grad_(True), mask=mask, alpha=alpha, T=2.0, chunk=chunk).backward()
    want = naive_grad(kind, t, x, mask, wrt="target", alpha=alpha, T=2.0)
    assert torch.allclose(target.grad, want, rtol=1e-5, atol=1e-7)
    assert (target.grad[~mask] == 0).all()


def test_skew_endpoints_are_the_plain_divergences():
    t, s = rnd(4, 11, seed=3), rnd(4, 11, seed=4)
    assert L.skew_kl(t, s, alpha=0.0).item() == pytest.approx(L.kl(t, s, scale_t2=False).item(), rel=1e-6)
    assert L.skew_rkl(t, s, alpha=0.0).item() == pytest.approx(L.kl(t, s, reverse=True).item(), rel=1e-6)
    assert abs(L.skew_kl(t, s, alpha=1.0).item()) < 1e-6 and abs(L.skew_rkl(t, s, alpha=1.0).item()) < 1e-6


def test_skew_losses_take_a_fused_head_and_refuse_a_bad_alpha():
    from runtime.chunked import HeadLogits

    h, w, t = rnd(2, 5, 8, seed=5), rnd(13, 8, seed=6, scale=0.5), rnd(2, 5, 13, seed=7)
    fused = L.skew_rkl(t, HeadLogits(h, w), alpha=0.2)
    assert fused.item() == pytest.approx(L.skew_rkl(t, h @ w.T, alpha=0.2).item(), rel=1e-5)
    with pytest.raises(RunError, match=r"alpha must be in \[0, 1\], got 1.5"):
        L.skew_kl(t, h @ w.T, alpha=1.5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_gjsd_and_reverse_kl_on_generated_token_masks(beta):
    b, s, v = 3, 7, 31
    t, x = rnd(b, s, v, seed=8), rnd(b, s, v, seed=9)
    mask = padded_mask(b, s)
    x[~mask] = -1e4
    assert L.gjsd(t, x, mask=mask, beta=beta).item() == pytest.approx(naive("gjsd", t, x, mask, beta=beta), rel=1e-5)
    assert L.kl(t, x, mask=mask, reverse=True, scale_t2=False).item() == pytest.approx(naive("rkl", t, x, mask),
                                                                                         rel=1e-5)


# ---------------------------------------------------------------- generation (runtime/generation.py)


def _tiny_lm(seed=0):
    import transformers as tf

    from test_chat import chat_tokenizer

    tok = chat_tokenizer()
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=0,
                        bos_token_id=2, eos_token_id=3)
    return tf.GPT2LMHeadModel(cfg), tok


def _settings(**kw):
    from gkdlang.spec import GenerateSpec, Span

    return GenerateSpec(prompts="conv", span=Span(file="t.gkd", line=1, col=1, end_line=1, end_col=2),
                        **{"max_new_tokens": 6, **kw})


def test_sampling_is_deterministic_in_its_seed_and_leaves_the_run_rng_and_mode_alone():
    from runtime import generation as G

    model, tok = _tiny_lm()
    model.train()
    prompts = [[2, 4, 7, 8], [2, 9]]
    before = torch.random.get_rng_state()
    a = G.sample(model, prompts, _settings(), tok, seed=11, keep_logits=True)
    assert torch.equal(torch.random.get_rng_state(), before) and model.training
    b = G.sample(model, prompts, _settings(), tok, seed=11)
    c = G.sample(model, prompts, _settings(), tok, seed=12)
    assert a.continuations == b.continuations
    assert a.continuations != c.continuations  # 40 tokens, 12 draws: a clash has odds ~1e-19
    assert all(1 <= n <= 6 for n in a.lengths)
    assert a.logits.shape[:2] == (2, max(a.lengths)) and a.logits.shape[2] == len(tok)
    # the sampler's logits are the model's own at those positions (the reverse-KL metric reads them)
    model.eval()
    for r in (0, 1):  # row 1 was left-padded for generation
        row = prompts[r] + a.continuations[r]
        with torch.no_grad():
            full = model(torch.tensor([row])).logits[0, len(prompts[r]) - 1:len(row) - 1]
        assert torch.allclose(a.logits[r, :a.lengths[r]], full, atol=1e-4)


def test_the_loss_mask_covers_exactly_the_generated_tokens():
    from runtime import generation as G

    gen = G.Generated(prompts=[[2, 4, 5], [2, 6, 7, 8, 9]], continuations=[[10, 11, 3], [12]], logits=None,
                      seconds=0.0)
    batch = G.batch_of(gen, pad=0, device="cpu")
    assert batch["input_ids"].tolist() == [[2, 4, 5, 10, 11, 3], [2, 6, 7, 8, 9, 12]]
    assert batch["loss_mask"].tolist() == [[False, False, True, True, True, False],
                                           [False, False, False, False, True, False]]
    assert batch["tokens"][batch["loss_mask"]].tolist() == [10, 11, 3, 12]
    gen = G.Generated(prompts=[[2, 4], [2, 6, 7, 8]], continuations=[[10], [12, 13]], logits=None, seconds=0.0)
    batch = G.batch_of(gen, pad=0, device="cpu")
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert batch["loss_mask"].tolist() == [[False, True, False, False, False, False],
                                           [False, False, False, True, True, False]]  # pad and prompt excluded
    # the loss graph's chat restriction reads it: a per-token term sees only these positions
    from runtime.lossgraph import _chat_restricted

    assert torch.equal(_chat_restricted(None, batch, torch.zeros(2, 6, 5)), batch["loss_mask"])


def test_lmbda_draws_are_the_same_on_every_rank_and_follow_lmbda():
    from runtime.onpolicy import OnPolicyBatches, sample_seed

    def batches(rank, lmbda, seq_kd=False):
        b = OnPolicyBatches.__new__(OnPolicyBatches)
        b.seed, b.index, b.rank, b.settings = 7, 1, rank, _settings(lmbda=lmbda, seq_kd=seq_kd)
        b.prompts = [[i] for i in range(50)]
        return b

    r0, r1 = batches(0, 0.3), batches(1, 0.3)
    modes = [r0.mode(s) for s in range(400)]
    assert modes == [r1.mode(s) for s in range(400)]
    assert set(modes) == {"student", "data"} and 0.22 < modes.count("student") / 400 < 0.38
    assert {batches(0, 1.0).mode(s) for s in range(50)} == {"student"}
    assert {batches(0, 0.0, seq_kd=True).mode(s) for s in range(50)} == {"teacher"}
    # prompts and sampling seeds differ per rank (data parallel), and are a function of the step
    assert r0.pick(3, 0, 4) == r0.pick(3, 0, 4) and r0.pick(3, 0, 4) != r1.pick(3, 0, 4)
    assert sample_seed(7, 1, 3, 0, 0) != sample_seed(7, 1, 3, 0, 1)


# ---------------------------------------------------------------- a run (runtime/onpolicy.py in the stage loop)


def onpolicy_plan(root, *, steps=4, lmbda=1.0, seq_kd=False, loss="kl(t.logits, s.logits, reverse: true)",
                  save_every=None):
    """The tiny chat spec of tests/test_chat.py, its stage made on-policy (GenerateSpec set before planning)."""
    from gkdlang.lower import check_source
    from planner.build import build_plan
    from test_chat import CONVERSATIONS, SPEC, model_folder, write_chat

    root.mkdir(parents=True, exist_ok=True)
    folder = model_folder(root)
    data = write_chat(root / "c.jsonl", [{"messages": t} for t in CONVERSATIONS * 4])
    text = SPEC.format(folder=folder, data=data, extra="").replace("steps: 3", f"steps: {steps}").replace(
        "kl(t.logits, s.logits, T: 2) + ce(tokens, s.logits)", loss)
    if save_every:
        text = text.replace("batch: 2", f"batch: 2\n  save_every: {save_every}")
    (root / "c.gkd").write_text(text)
    r = check_source(text, "c.gkd", base_dir=root)
    assert r.ok, r.diagnostics
    stage = r.spec.stages[0]
    gen = _settings(lmbda=lmbda, seq_kd=seq_kd, max_new_tokens=5)
    spec = r.spec.model_copy(update={"stages": [stage.model_copy(update={"generate": gen})]})
    plan = build_plan(spec, gkdc_version="t", spec_path=str(root / "c.gkd"))
    path = root / "plan.json"
    path.write_text(plan.model_dump_json(indent=1))
    return path


def _run(plan_path, out, resume=False):
    from planner.plan import Plan
    from runtime.recipe import run

    return run(Plan.model_validate_json(plan_path.read_text()), plan_path, out, resume=resume, progress=False,
               allowed_paths=(str(plan_path.parent),))


def _train_records(out):
    import json

    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "train"]


@pytest.mark.deepspeed
def test_an_on_policy_run_trains_on_generations_and_logs_its_measurements(tmp_path):
    plan = onpolicy_plan(tmp_path, steps=3)
    _run(plan, tmp_path / "out")
    recs = _train_records(tmp_path / "out")
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        m = r["onpolicy"]
        assert m["on_policy"] == 1 and 1 <= m["mean_generated_length"] <= 5
        assert m["reverse_kl_per_token"] > 0 and m["generation_tokens_per_second"] > 0
        # the loss is the reverse KL over the same generated tokens; the metric reads the sampler's (eval-mode)
        # logits, the loss the training forward's (dropout 0.1), so they agree only roughly
        assert r["terms"]["kl[s.logits<-t.logits]"] == pytest.approx(m["reverse_kl_per_token"], rel=0.15)
        split = m["generation_seconds"] + m["teacher_seconds"] + m["training_seconds"]
        assert split == pytest.approx(r["step_seconds"], rel=1e-6)


@pytest.mark.deepspeed
@pytest.mark.parametrize("lmbda", [1.0, 0.5])
def test_a_sigkilled_on_policy_run_resumes_bit_for_bit(tmp_path, lmbda):
    import random

    from test_recipe import student_tensors
    from test_resume import _kill_at

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kill_after, delay = rng.randint(1, 4), rng.uniform(0.0, 0.3)
    print(f"seed {seed}: kill after step {kill_after} + {delay:.3f} s")
    ref = onpolicy_plan(tmp_path / "ref", steps=6, lmbda=lmbda, save_every=2)
    _run(ref, tmp_path / "ref" / "out")
    killed = onpolicy_plan(tmp_path / "killed", steps=6, lmbda=lmbda, save_every=2)
    out = tmp_path / "killed" / "out"
    _kill_at(killed, out, kill_after, delay)
    _run(killed, out, resume=True)
    expected, got = student_tensors(tmp_path / "ref" / "out"), student_tensors(out)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs after resume (seed {seed})"
    ref_recs, recs = _train_records(tmp_path / "ref" / "out"), _train_records(out)
    assert [r["step"] for r in recs] == list(range(1, 7))
    for field in ("total", "grad_norm", "tokens"):
        assert [r[field] for r in recs] == [r[field] for r in ref_recs]
    kept = ("on_policy", "mean_generated_length", "reverse_kl_per_token")
    assert [{k: r["onpolicy"].get(k) for k in kept} for r in recs] == \
        [{k: r["onpolicy"].get(k) for k in kept} for r in ref_recs]
    if lmbda < 1:
        assert {r["onpolicy"]["on_policy"] for r in recs} == {0, 1}, "lmbda 0.5 over 6 steps drew one mode only"


@pytest.mark.deepspeed
def test_seq_kd_trains_on_the_teachers_generations(tmp_path):
    plan = onpolicy_plan(tmp_path, steps=2, lmbda=0.0, seq_kd=True, loss="ce(tokens, s.logits) + kl(t.logits, s.logits)")
    _run(plan, tmp_path / "out")
    recs = _train_records(tmp_path / "out")
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        m = r["onpolicy"]
        assert m["on_policy"] == 0 and 1 <= m["mean_generated_length"] <= 5
        assert "reverse_kl_per_token" not in m  # measured on the student's own samples only
        assert r["terms"]["ce[s.logits<-tokens]"] > 0 and r["terms"]["kl[s.logits<-t.logits]"] > 0


# ---------------------------------------------------------------- bench/onpolicy_demo.py's scoring


def _demo():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "onpolicy_demo.py"
    spec = importlib.util.spec_from_file_location("onpolicy_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_demo_scores_a_student_like_its_teacher_at_zero_reverse_kl():
    demo = _demo()
    teacher, tok = _tiny_lm(seed=0)
    other, _ = _tiny_lm(seed=1)
    prompts = [[2, 4, 7, 8], [2, 9], [2, 10, 11]]
    same = demo.score(teacher, teacher, tok, prompts, _settings(), seed=5, batch=2)
    assert same["sequences"] == 3 and abs(same["rkl"]) < 1e-5 and same["nll"] > 0 and same["nll_se"] > 0
    differ = demo.score(teacher, other, tok, prompts, _settings(), seed=5, batch=2)
    assert differ["rkl"] > 1e-3
    assert demo.mean_se([1.0, 3.0]) == (2.0, 1.0)
    table = demo.render({"prompts": 3, "settings": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6},
                         "arms": {"on": {"heldout": same, "measured": {"step_seconds": 1.0, "generation": 0.5},
                                         "planned": {"step_seconds": 2.0, "generation": 0.7}}}})
    assert "| on | " in table and "0.500 (0.700)" in table


@pytest.mark.deepspeed
def test_two_zero3_ranks_generate_and_train(tmp_path):
    """ZeRO-3 partitions the student over two ranks: generate gathers each layer on every rank (synced_gpus), and
    both ranks step together although their prompts and sample lengths differ."""
    import json

    from planner.plan import sealed
    from test_multirank import _launch
    from test_recipe import load, make_plan

    plan_path = make_plan(tmp_path, steps=(3,), zero=3, world=2, micro=2, accum=1, sharded_teacher=True)
    plan = load(plan_path)
    stage = plan.spec.stages[0].model_copy(update={"generate": _settings(lmbda=1.0, max_new_tokens=4).model_copy(
        update={"prompts": "corpus"})})
    plan = sealed(plan.model_copy(update={"spec": plan.spec.model_copy(update={"stages": [stage]})}))
    plan_path.write_text(plan.model_dump_json(indent=1))
    out = tmp_path / "out"
    proc = _launch(plan_path, out)
    done = [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank*.json"))]
    log = (proc.stdout + proc.stderr)[-4000:]
    assert len(done) == 2, f"a rank did not finish (exit {proc.returncode}):\n{log}"
    assert proc.returncode == 0 or "terminate called" in log, log  # docs/deepspeed-cpu.md's exit abort only
    assert done[0]["weight_sums"]["s"] == done[1]["weight_sums"]["s"]
    recs = _train_records(out)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(r["onpolicy"]["on_policy"] == 1 and r["onpolicy"]["mean_generated_length"] >= 1 for r in recs)


def test_a_stop_string_that_is_one_token_ends_the_row_with_it():
    from runtime import generation as G

    model, tok = _tiny_lm()
    prompts = [[2, 4, 7, 8], [2, 9], [2, 10]]
    free = G.sample(model, prompts, _settings(max_new_tokens=12), tok, seed=3)
    word = tok.convert_ids_to_tokens(free.continuations[0][1])  # the row's second sampled token as the stop
    stopped = G.sample(model, prompts, _settings(max_new_tokens=12, stop=[word]), tok, seed=3)
    stop_id = tok.convert_tokens_to_ids(word)
    assert stopped.continuations[0] == free.continuations[0][:free.continuations[0].index(stop_id) + 1]
    for row in stopped.continuations:
        assert stop_id not in row[:-1]
