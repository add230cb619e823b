"""Parity with GKD's own code (GitHub aitsc/GLMKD 8d6cf11) for the methods with state across steps: RL-KD's
teacher selector, run for several training steps. Same conventions as ``tests/test_methods_parity.py``: the
``Glmkd*`` classes are transcriptions written for this test from reading GLMKD's code (no code copied)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime import interventions as ivs
from runtime.lossgraph import LossGraph
from runtime.rl_agent import GlmkdSelectTeacher
from test_methods_formula import SEED, stages, tdir  # noqa: F401 (tdir is a fixture)
from test_methods_run import workdir  # noqa: F401 (a fixture)
from test_methods_parity import MASKS, THREE, Signals, g_pre_loss, inputs

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
    sig, batch = inputs(spec, MASKS[pad])
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
