"""Parity with GKD's own code (GitHub aitsc/GLMKD 8d6cf11) for the methods with state across steps or a second
forward pass: RL-KD's teacher selector, run for several training steps, and DIITO's interchange (its spans, the
counterfactual pass of a real model, its losses). Same conventions as ``tests/test_methods_parity.py``: the
``Glmkd*`` classes are transcriptions written for this test from reading GLMKD's code (no code copied)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime import interventions as ivs
from runtime.lossgraph import LossGraph
from runtime.rl_agent import GlmkdSelectTeacher
from test_methods_formula import (  # noqa: F401 (tdir: fixture)
    MASK, SEED, V, Signals, _additive, _bert, make_inputs, stages, tdir, total)
from test_methods_run import workdir  # noqa: F401 (a fixture)
from test_methods_parity import MASKS, THREE, close, g_kl, g_pre_loss

from parity_tools import glmkd_variants, resumes_exactly, rl_kd_resume_spec

RL_KD_GLMKD = ('use rl_kd\nteacher semantic = hf("{tdir}/t2") {{ head: none }}\n'
               'stage a {{ data: sst2, steps: 8, loss: rl_kd.rl_kd_glmkd([base, bert, third], small, semantic) }}')


class GlmkdRLKD:
    """RL_KD.compute (multi_teacher_model.py:327-427) under readme `## RL-KD` 2 (--distill_ft_soft
    --distill_temperature=10 --rl_kd_reward=1 --rl_kd_semantic_model=0 --mt_has_loss --rl_kd_alpha=0.5):

    - environment: the semantic teacher's [CLS] of `transformer.output` (the last block's state), then each
      teacher's `loss_batch` (per-example CE on the labels, finetune.py get_loss), concatenated; and each
      teacher's logits (classification: `logits * mask` with mask 1), concatenated;
    - s = sigmoid(agent_semantic_mt_loss(env1) + agent_mt_soft(env2)); teacher_select = rand < s;
    - loss_L[j] = pre_loss(keep_batch=True): soft CE at T = 10 per example (no T^2, no hard: --distill_ft_hard
      is not given); final = mean over (example, teacher) of loss_L * teacher_select;
    - from the second call on: s' = the agent on the *stored* previous environment (current weights), pi =
      s' a + (1 - s')(1 - a) with the stored selection a, rl_loss = -pi.sum() x (-s_out['loss']).detach()
      (reward 1: the current batch's mean student CE), added to final; then the environment and selection are
      stored;
    - returned: final x alpha + (1 - alpha) x s_out['loss'].

    The uniform draws are given (``u``): GLMKD draws torch.rand from the global generator, gkdc from its seeded
    one; both keep a teacher when the draw is below s.
    """

    def __init__(self, agent: GlmkdSelectTeacher, alpha: float = 0.5, T: float = 10.0):
        self.w = [p.detach().clone().requires_grad_(True) for p in
                  (agent.agent_state.weight, agent.agent_state.bias, agent.agent_soft.weight, agent.agent_soft.bias)]
        self.alpha, self.T = alpha, T
        self.prev = None

    def agent(self, env1, env2):
        w1, b1, w2, b2 = self.w
        return (F.linear(env1, w1, b1) + F.linear(env2, w2, b2)).sigmoid()

    def compute(self, cls_state, t_logits, s_logits, labels, u):
        s_loss = F.cross_entropy(s_logits, labels)
        env1 = torch.cat([cls_state.detach().clone()]
                         + [F.cross_entropy(t, labels, reduction="none").detach().clone()[:, None] for t in t_logits], -1)
        env2 = torch.cat([t.detach().clone() for t in t_logits], -1)
        loss_l = [g_pre_loss(s_logits, t, None, T=self.T, soft=True)["soft"] for t in t_logits]
        s = self.agent(env1, env2)
        select = u < s
        final = (torch.stack(loss_l, -1) * select).mean()
        rl = None
        if self.prev is not None:
            p_env1, p_env2, p_select = self.prev
            s = self.agent(p_env1, p_env2)
            pi = s * p_select + (1 - s) * (1 - p_select * 1)
            rl = -pi.sum() * (-s_loss).detach().clone()
            final = final + rl
        self.prev = (env1, env2, select)
        return final * self.alpha + (1 - self.alpha) * s_loss, rl


def _step_signals(spec, pad, step):
    """Fresh signals per step (a new batch), the student's task logits a leaf that gets gradients."""
    sig, batch = make_inputs(spec, MASKS[pad])
    for i, (name, m) in enumerate(sorted(spec.models.items())):
        sig[name] = Signals(m.arch, 1000 * step + i + 11, MASKS[pad])
    batch["labels"] = torch.tensor([[0, 2, 1, 2], [1, 1, 0, 2], [2, 0, 0, 1], [0, 1, 2, 2]][step % 4])
    s = sig["small"][("task_logits", None)].detach().requires_grad_(True)
    sig["small"][("task_logits", None)] = s
    return sig, batch, s


@pytest.mark.parametrize("pad", sorted(MASKS))
def test_rl_kd_glmkd_agent_over_several_steps(tdir, pad):
    """Six training steps (SGD on the agent, lr 0.5): at every step gkdc's loss, its policy term, the gradients of
    the agent and of the student's logits, and the agent's weights after the update equal the transcription's.
    The task-level signals do not see padding (it only changes the unused token signals)."""
    spec = stages(tdir, THREE.format(tdir=tdir) + RL_KD_GLMKD.format(tdir=tdir))
    stage = spec.stages[0]
    (iv,) = [i for i in stage.interventions if i.kind == "select_teacher"]
    assert iv.policy == "glmkd" and iv.baseline == "none"
    torch.manual_seed(0)
    graph = LossGraph(stage.loss, {n: m.arch for n, m in spec.models.items()}, seed=SEED)
    (agent,) = [i for i in ivs.build(stage, spec.models, SEED, 1e-3) if isinstance(i, GlmkdSelectTeacher)]
    ref = GlmkdRLKD(agent)
    params = [agent.agent_state.weight, agent.agent_state.bias, agent.agent_soft.weight, agent.agent_soft.bias]
    names = [t for _, t in agent.units]
    kept_total, policies = 0.0, 0
    for step in range(6):
        sig, batch, s = _step_signals(spec, pad, step)
        info = ivs.StepInfo(step, 0, step / 8)
        weights = agent.row_weights(sig, batch, info)
        value, parts = graph(sig, batch, info.progress, graph.active_terms(info.progress), row_weights=weights)
        for key, extra in agent.extra_loss(sig, batch, info).items():
            value, parts[key] = value + extra, extra
        u = torch.rand((4, 3), generator=ivs._generator(SEED, agent.group, step, 0, 0))
        want, rl = ref.compute(sig["semantic"][("hidden", 1)][:, 0], [sig[m][("task_logits", None)] for m in names],
                               s, batch["labels"], u)
        assert float(value) == pytest.approx(float(want), rel=1e-5)
        assert (rl is None) == (f"{agent.group}/policy" not in parts)
        if rl is not None:
            policies += 1
            assert float(parts[f"{agent.group}/policy"]) == pytest.approx(0.5 * float(rl), rel=1e-5)
        got_g = torch.autograd.grad(value, params + [s], allow_unused=True)
        want_g = torch.autograd.grad(want, ref.w + [s], allow_unused=True)
        for g, w, x in zip(got_g, want_g, params + [s]):
            g = torch.zeros_like(x) if g is None else g
            w = torch.zeros_like(x) if w is None else w
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
        assert (got_g[0] is None) == (step == 0)  # no agent update before a previous step exists
        with torch.no_grad():
            for p, g, q, w in zip(params, got_g, ref.w, want_g):
                if g is not None:
                    p -= 0.5 * g
                    q -= 0.5 * w
        for p, q in zip(params, ref.w):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)
        kept_total += float(sum(w.sum() for w in weights.values())) * 3 / len(weights)
    assert policies == 5 and 0 < kept_total < 6 * 12  # some teachers kept, some skipped


def test_rl_kd_glmkd_refuses_a_reward_it_does_not_have(tdir):
    text = (THREE.format(tdir=tdir) + RL_KD_GLMKD.format(tdir=tdir)).replace(
        "rl_kd.rl_kd_glmkd([base, bert, third], small, semantic)",
        "select_teacher(soft_ce([base, bert, third].task_logits, small.task_logits), policy: glmkd, state: semantic, "
        "reward: ce_kl)")
    with pytest.raises(AssertionError, match="reward: ce"):
        stages(tdir, text)


def test_rl_kd_glmkd_trains_end_to_end(workdir, monkeypatch):
    """A real (tiny) run: the agent's policy term appears from the second step and the loss stays finite."""
    import test_methods_run as R

    body, _ = R.SPECS["rl_kd"]
    body = body.replace("loss: rl_kd([base, bert], small, semantic, T: 10)",
                        "loss: rl_kd.rl_kd_glmkd([base, bert], small, semantic, T: 10)")
    assert "rl_kd_glmkd" in body
    monkeypatch.setitem(R.SPECS, "rl_kd_glmkd", (body, ["select1/policy"]))
    records = R.run_method(workdir, "rl_kd_glmkd", "bert")
    select = [r for r in records if r["stage"] == "select"]
    assert "select1/policy" not in select[0]["terms"] and "select1/policy" in select[1]["terms"]


# ---------------------------------------------------------------- DIITO (distill_model.py:1259-1498)


def glmkd_interchange_masks(lengths, starts, dual_starts, prop=0.3):
    """DIITO.prepare_interchange_mask, consecutive way, no max token (distill_model.py:1444-1462): dual_lengths =
    the lengths rolled by one; per example count = int(min(len, dual_len) x prop), the span [start, start + count)
    and the dual span [dual_start, dual_start + count); start in [0, len - count], dual_start in [0, dual_len -
    count], each drawn by random.randint (given here)."""
    dual = torch.cat([lengths[1:], lengths[0:1]])
    mask = torch.zeros(len(lengths), S_MAX, dtype=torch.bool)
    dual_mask = torch.zeros_like(mask)
    for i in range(len(lengths)):
        count = int(min(lengths[i].tolist(), dual[i].tolist()) * prop)
        assert 0 <= starts[i] <= lengths[i] - count and 0 <= dual_starts[i] <= dual[i] - count
        mask[i][starts[i]:starts[i] + count] = 1
        dual_mask[i][dual_starts[i]:dual_starts[i] + count] = 1
    return mask, dual_mask


S_MAX = 6
DIITO_SPEC = "use diito\nstage a {{ data: corpus, steps: 4, loss: {variant}(lmt, lm, T: 2, fraction: 30%) }}"
LONG = torch.tensor([[1] * 6, [1] * 5 + [0], [1] * 4 + [0] * 2, [1] * 6, [1] * 3 + [0] * 3, [1] * 6], dtype=torch.bool)


def _interchange(tdir, variant="diito"):
    spec = stages(tdir, DIITO_SPEC.format(variant=variant))
    (iv,) = ivs.build(spec.stages[0], spec.models, SEED, 1e-3)
    return spec, iv


def test_diito_spans_are_glmkd_s(tdir):
    """Over 400 steps: each step's spans are GLMKD's masks for the drawn starts (int(0.3 x the shorter length),
    target and source spans of equal count), and every admissible (start, source start) pair of a row occurs:
    the two starts are drawn independently over their whole ranges."""
    _, iv = _interchange(tdir)
    assert iv.independent and iv.group
    assert [int(min(a, b) * 0.3) for a, b in zip(LONG.sum(-1), LONG.sum(-1).roll(-1))] == [1, 1, 1, 0, 0, 1]
    batch = {"attention_mask": LONG.long()}
    lengths = LONG.sum(-1)
    seen = [set() for _ in range(len(LONG))]
    for step in range(400):
        target, source = iv.masks(batch, ivs.StepInfo(step, 0, 0.0))
        starts = [int(r.nonzero()[0]) if r.any() else 0 for r in target]
        dual = [int(r.nonzero()[0]) if r.any() else 0 for r in source]
        want_t, want_s = glmkd_interchange_masks(lengths, starts, dual)
        assert torch.equal(target, want_t) and torch.equal(source, want_s)
        for i in range(len(LONG)):
            seen[i].add((starts[i], dual[i]))
    dual_len = torch.roll(lengths, -1)
    for i, n in enumerate(lengths.tolist()):
        count = int(min(n, int(dual_len[i])) * 0.3)
        admissible = {(a, d) for a in range(n - count + 1) for d in range(int(dual_len[i]) - count + 1)}
        assert seen[i] == (admissible if count else {(0, 0)}), i  # count 0 (a row before one of 3): empty spans


def glmkd_interchanged_logits(model, batch, first, blocks, target, source):
    """GLMKD's get_hook_op on a Hugging Face BERT run block by hand: after each block j of ``blocks``, var[target] =
    a[source] with a = the first pass's states of block j rolled by one (torch.cat([a[1:], a[0:1]])); the MLM
    head's logits of the result."""
    ext = _additive(batch["attention_mask"])
    h = model.bert.embeddings(input_ids=batch["input_ids"])
    for j, blk in enumerate(model.bert.encoder.layer):
        h = blk(h, attention_mask=ext)
        h = (h[0] if isinstance(h, tuple) else h).clone()
        if j in blocks:
            a = first[("hidden", j)]
            a = torch.cat([a[1:], a[0:1]])
            h[target] = a[source]
    return model.cls(h)


@pytest.mark.parametrize("pad", sorted(MASKS))
def test_diito_counterfactual_teacher_pass_is_glmkd_s(tdir, pad):
    """The teacher's interchanged pass on a real (tiny) 4-block model whose student has 2 blocks: at each step,
    GLMKD's get_hook_op replaces, at every teacher block of the drawn student block's group
    (--diito_alignment=full: blocks (l - 1) k + 1 .. l k in GLM's numbering, i.e. outputs 2j, 2j + 1 here),
    var[interchange_mask] = a[dual_interchange_mask] with a = the first pass's states rolled by one
    (torch.cat([a[1:], a[0:1]])); the transcription runs the blocks by hand and compares the logits, at steps
    until both groups have been drawn."""
    from planner.plan import CapturePoint, ModelCapture
    from runtime.adapters import capture

    _, iv = _interchange(tdir)
    mask = MASKS[pad]
    model = _bert(4, 5, classify=False)
    batch = {"input_ids": torch.randint(1, V, mask.shape, generator=torch.Generator().manual_seed(3)),
             "attention_mask": mask.long()}
    first = capture(model, batch, ModelCapture(model="lmt", points=[CapturePoint(kind="hidden", layer=i)
                                                                    for i in range(4)],
                                               stop_after_layer=None, needs_head=False), grad=False)
    groups_seen = set()
    for step in range(16):
        if len(groups_seen) == 2 and step >= 4:
            break
        info = ivs.StepInfo(step, 0, 0.0)
        got = iv.teacher_passes({"lmt": model}, batch, {"lmt": first}, info)[f"lmt@{iv.ident}"][("logits", None)]
        s_layer, _ = iv.pair(step)
        group = [2 * s_layer, 2 * s_layer + 1]
        assert iv.teacher_blocks(iv.pair(step)) == group
        groups_seen.add(tuple(group))
        target, source = iv.masks(batch, info)
        with torch.no_grad():
            want = glmkd_interchanged_logits(model, batch, first, group, target, source)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert groups_seen == {(0, 1), (2, 3)}


def glmkd_diito_loss(sig, cf, batch, mask, T=2.0, alpha=0.25):
    """DIITO.pre_loss / inter_loss (distill_model.py:1410-1436) with --distill_pt_soft --distill_pt_hard,
    T = 2, alphas mlm = ce = causal_ce = cos = 0.25, causal_cos 0: first pass, KL(s / T, t / T) with input_mask =
    GLM's loss_mask (the predicted positions) x T^2 x 0.25, averaged over every b x s row, + the model's MLM loss x
    0.25, + cosine distance of the final states times the real-token mask over every b x s row x 0.25; the
    interchanged pass: its KL x 0.25 (hard rate 0, no cos)."""
    lm_mask = (batch["tokens"] != -100)[..., None].float()

    def soft(t, s):
        return g_kl(s[("logits", None)] * lm_mask / T, t[("logits", None)] * lm_mask / T).mean() * T ** 2 * alpha

    t, s = sig["lmt"], sig["lm"]
    mlm = F.cross_entropy(s[("logits", None)].reshape(-1, V), batch["tokens"].reshape(-1), ignore_index=-100)
    real = mask[..., None].float()
    so, to = (s[("hidden", 1)] * real).view(-1, 32), (t[("hidden", 3)] * real).view(-1, 32)
    cos = F.cosine_embedding_loss(so, to, so.new_ones(so.shape[0]), reduction="none").mean()
    return soft(t, s) + alpha * mlm + alpha * cos + soft(*cf)


DIITO_AVG = ("GLMKD averages its KL over every b x s position (unmasked and padded ones add 0) and counts each "
             "padded position's cosine as 1; diito averages over the masked (KL) and real (cosine) positions "
             "(diito.diito_glmkd: as GLMKD)")


def _diito_inputs(tdir, variant, pad):
    """The spec, mask, signals (the interchanged passes' too, under ``<model>@<intervention id>``), batch and
    intervention id of a DIITO stage."""
    spec = stages(tdir, DIITO_SPEC.format(variant=variant))
    mask = MASKS[pad]
    sig, batch = make_inputs(spec, mask)
    ident = spec.stages[0].interventions[0].id
    for i, m in enumerate(("lmt", "lm")):
        sig[f"{m}@{ident}"] = Signals(spec.models[m].arch, 91 + i, mask)
    return spec, mask, sig, batch, ident


@glmkd_variants("diito", "diito.diito_glmkd", DIITO_AVG)
def test_diito_losses(tdir, variant, pad):
    spec, mask, sig, batch, ident = _diito_inputs(tdir, variant, pad)
    want = glmkd_diito_loss(sig, (sig[f"lmt@{ident}"], sig[f"lm@{ident}"]), batch, mask)
    close(total(spec, 0, sig, batch)[0], want)


@pytest.mark.parametrize("pad", sorted(MASKS))
def test_diito_default_averages_over_masked_and_real_positions(tdir, pad):
    """The default's own formula: KL x T^2 averaged over the masked positions, cosine over the real ones."""
    spec, mask, sig, batch, ident = _diito_inputs(tdir, "diito", pad)
    rows = batch["tokens"] != -100

    def soft(t, s):
        return g_kl(s[("logits", None)][rows] / 2, t[("logits", None)][rows] / 2).mean() * 4

    t, s = sig["lmt"], sig["lm"]
    mlm = F.cross_entropy(s[("logits", None)].reshape(-1, V), batch["tokens"].reshape(-1), ignore_index=-100)
    cos = (1 - F.cosine_similarity(s[("hidden", 1)], t[("hidden", 3)], dim=-1))[mask].mean()
    want = 0.25 * (soft(t, s) + mlm + cos + soft(sig[f"lmt@{ident}"], sig[f"lm@{ident}"]))
    close(total(spec, 0, sig, batch)[0], want)


@pytest.mark.parametrize("options,message", [
    ("way: random, positions: independent", "way: consecutive"),
    ("positions: anywhere", "positions"),
    ("blocks: every", "blocks")])
def test_interchange_options_are_checked(tdir, options, message):
    text = ("stage a { data: corpus, steps: 4, loss: interchange(kl(lmt.logits, lm.logits) where masked, "
            f"fraction: 30%, {options}) }}")
    with pytest.raises(AssertionError, match=message):
        stages(tdir, text)


def test_interchange_defaults_leave_the_spec_json_unchanged(tdir):
    spec = stages(tdir, "stage a { data: corpus, steps: 4, loss: interchange(kl(lmt.logits, lm.logits), fraction: 30%) }")
    dumped = spec.stages[0].interventions[0].model_dump()
    assert "positions" not in dumped and "blocks" not in dumped
    glmkd = stages(tdir, DIITO_SPEC.format(variant="diito")).stages[0].interventions[0].model_dump()
    assert (glmkd["positions"], glmkd["blocks"]) == ("independent", "group")


@pytest.mark.parametrize("pad", sorted(MASKS))
def test_diito_counterfactual_student_pass_is_glmkd_s(tdir, pad):
    """The student's interchanged pass: GLMKD replaces the one drawn block's states (the student hook of
    --diito_alignment=full) by the first pass's, rolled by one, at the step's spans; the first pass's states keep
    their graph (no --checkpoint-activations), so the counterfactual logits have a gradient into them."""
    from planner.plan import CapturePoint, ModelCapture
    from runtime.adapters import capture

    _, iv = _interchange(tdir)
    mask = MASKS[pad]
    model = _bert(2, 6, classify=False)
    batch = {"input_ids": torch.randint(1, V, mask.shape, generator=torch.Generator().manual_seed(4)),
             "attention_mask": mask.long()}
    for step in (0, 1, 2, 3):
        info = ivs.StepInfo(step, 0, 0.0)
        s_layer, _ = iv.pair(step)
        first = capture(model, batch, ModelCapture(model="lm", points=[CapturePoint(kind="hidden", layer=s_layer)],
                                                   stop_after_layer=None, needs_head=False), grad=True)
        got = iv.student_passes("lm", model, batch, {"lm": first}, info)[f"lm@{iv.ident}"][("logits", None)]
        target, source = iv.masks(batch, info)
        want = glmkd_interchanged_logits(model, batch, first, [s_layer], target, source)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        (g_got,) = torch.autograd.grad(got.sum(), first[("hidden", s_layer)], retain_graph=True)
        (g_want,) = torch.autograd.grad(want.sum(), first[("hidden", s_layer)])
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)
        assert float(g_got[source.roll(1, 0)].abs().sum()) > 0 or not source.any()


def test_rl_kd_glmkd_resumes_exactly(workdir, monkeypatch):
    """The agent's one-step-late update reads the previous step's state and selection: they are saved with the
    checkpoint, so a run that crashes after its step-2 checkpoint and is resumed ends with the uninterrupted
    weights (agent included)."""
    text = rl_kd_resume_spec("rl_kd.rl_kd_glmkd([base, bert], small, semantic, T: 10)")
    resumes_exactly(workdir, monkeypatch, text, "resume_glmkd", crash_after=3, resumed_from="select:2")
