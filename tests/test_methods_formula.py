"""Each method's loss on fixed tensors equals an independent implementation of the paper's formula.

A tiny spec per method is checked (teacher: a local 4-block BERT config, width 32, 2 heads, vocabulary 50;
no weights are read), its stage's terms become the runtime's ``LossGraph`` plus the stage's interventions,
and the total on fixed random signals is compared with the formula written here with plain
``torch.nn.functional`` (the relation losses by explicit loops). Learned projections are the graph's own
(the formula uses their weights). Interventions that change the forward pass (Theseus, DIITO, LRC-BERT)
are checked against a manual forward of tiny models.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from gkdlang.lower import check_source
from gkdlang.spec import OpNode, SignalNode
from runtime import interventions as ivs
from runtime.lossgraph import LossGraph, chosen_index, span_segmentation

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
B, S, V, C, H = 4, 6, 50, 3, 2
SEED = 7
MASK = torch.tensor([[1] * 6, [1] * 5 + [0], [1] * 4 + [0] * 2, [1] * 6], dtype=torch.bool)


@pytest.fixture(scope="module")
def tdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("formula")
    for layers in (2, 4):
        (root / f"t{layers}").mkdir()
        (root / f"t{layers}" / "config.json").write_text(json.dumps({
            "architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 32, "num_hidden_layers": layers,
            "num_attention_heads": H, "intermediate_size": 64, "max_position_embeddings": 64, "vocab_size": V,
            "type_vocab_size": 2, "pad_token_id": 0}))
    return root


def stages(tdir: Path, body: str, student: str = "{ layers: 2, head: classify(3) }"):
    text = (f'data sst2 = jsonl("{DATA}/sst2.jsonl") {{ text: sentence, label: label, seq_len: 12 }}\n'
            f'data corpus = text("{DATA}/corpus.txt") {{ seq_len: 12 }}\n'
            f'teacher bert = hf("{tdir}/t4") {{ head: classify(3) }}\n'
            f'teacher lmt = hf("{tdir}/t4") {{ head: lm }}\n'
            f'teacher base = hf("{tdir}/t2") {{ head: classify(3) }}\n'
            f'student small = like(bert) {student}\n'
            f'student lm = like(lmt) {{ layers: 2, head: lm }}\n' + body)
    result = check_source(text, "m.gkd")
    assert result.ok, [d.message for d in result.diagnostics]
    return result.spec


class Signals(dict):
    """One model's signals, made up (deterministically) on first use with the shape the model gives; attention
    probabilities put no mass on the keys ``mask`` pads (the parity tests pass theirs)."""

    def __init__(self, arch, seed: int, mask: torch.Tensor = MASK):
        super().__init__()
        self.arch, self.gen, self.mask = arch, torch.Generator().manual_seed(seed), mask

    def __missing__(self, key):
        kind, _ = key
        h, heads = self.arch.hidden_size, self.arch.num_heads
        shapes = {"logits": (B, S, V), "task_logits": (B, C), "embeddings": (B, S, h), "hidden": (B, S, h),
                  "query": (B, S, h), "key": (B, S, h), "value": (B, S, h), "attn_scores": (B, heads, S, S),
                  "attn_probs": (B, heads, S, S)}
        x = torch.randn(shapes[kind], generator=self.gen)
        if kind == "attn_probs":  # like the model's own: no mass on padded keys
            x = F.softmax(x.masked_fill(~self.mask[:, None, None, :], -1e9), dim=-1)
        self[key] = x
        return x


def make_inputs(spec, mask: torch.Tensor = MASK):
    """Every model's made-up signals and a batch of ``mask``'s padding (the parity tests: with and without)."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (B, S), generator=gen).masked_fill(torch.rand(B, S, generator=gen) < 0.5, -100)
    tokens = tokens.masked_fill(~mask, -100)
    tokens[:, 1] = 3  # every example has a target
    batch = {"attention_mask": mask.long(), "labels": torch.tensor([0, 2, 1, 2]), "tokens": tokens,
             "special_mask": torch.zeros(B, S, dtype=torch.long), "input_ids": torch.ones(B, S, dtype=torch.long)}
    signals = {name: Signals(m.arch, i + 11, mask) for i, (name, m) in enumerate(sorted(spec.models.items()))}
    return signals, batch


def total(spec, stage_index: int, signals, batch, *, progress=0.0, step=0, epoch=0, keep_ids=None):
    """What DistillStep computes, without a model: gates, row weights, graph, intervention losses."""
    stage = spec.stages[stage_index]
    archs = {n: m.arch for n, m in spec.models.items()}
    torch.manual_seed(0)  # the same projections on every call
    graph = LossGraph(stage.loss, archs, keep_ids=keep_ids, seed=SEED)
    interventions = ivs.build(stage, spec.models, SEED, 1e-3)
    info = ivs.StepInfo(step, epoch, progress)
    active = graph.active_terms(progress, step=step, epoch=epoch)
    for iv in interventions:
        active = iv.gate(active, info)
    weights = {}
    for iv in interventions:
        weights.update(iv.row_weights(signals, batch, info))
    value, parts = graph(signals, batch, progress, active, step=step, epoch=epoch, row_weights=weights)
    for iv in interventions:
        for key, extra in iv.extra_loss(signals, batch, info).items():
            value, parts[key] = value + extra, float(extra)
    return float(value.detach()), parts, graph, interventions


def proj(graph, module: str):
    return graph.projections[module.replace(".", "_")]


# ---------------------------------------------------------------- independent formulas


def kl(t, s, T=1.0, rows=None, scale=True):
    p, log_p, log_q = F.softmax(t / T, -1), F.log_softmax(t / T, -1), F.log_softmax(s / T, -1)
    per = (p * (log_p - log_q)).sum(-1)
    return mean_rows(per, rows) * (T * T if scale else 1)


def soft_ce(t, s, T=1.0):
    return -(F.softmax(t / T, -1) * F.log_softmax(s / T, -1)).sum(-1).mean()


def mean_rows(per, rows=None):
    return per.mean() if rows is None else per[rows].mean()


def hard_ce(labels, logits):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def cls(x):
    return x[:, 0]


def cosine_loss(t, s, rows=None):
    return mean_rows(1 - F.cosine_similarity(s, t, dim=-1), rows)


def masked_mse(t, s, rows):
    return ((s - t) ** 2)[rows].mean()


def probs_kl(p, q, keys):
    """KL of probability rows [b, H, s, s], padded keys excluded, mean over every (b, H, query) row."""
    terms = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log()), torch.zeros(()))
    return (terms * keys[:, None, None, :]).sum(-1).mean()


def relation(x, heads):
    b, s, w = x.shape
    xr = x.reshape(b, s, heads, w // heads).transpose(1, 2)
    scores = xr @ xr.transpose(-1, -2) / math.sqrt(w // heads)
    return F.softmax(scores.masked_fill(~MASK[:, None, None, :], -1e30), dim=-1)


def smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def distance_loop(t, s, heads=1, window=None):
    """RKD distance by loops: per set and head, distances over the set's mean distance, smooth L1, mean over pairs."""
    losses = []
    for x_t, x_s in _sets(t, s, heads):
        n = len(x_t)
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j and (window is None or abs(i - j) <= window // 2)]
        if not pairs:
            continue
        d_t = {p: float((x_t[p[0]] - x_t[p[1]]).norm()) for p in pairs}
        d_s = {p: float((x_s[p[0]] - x_s[p[1]]).norm()) for p in pairs}
        m_t, m_s = sum(d_t.values()) / len(pairs), sum(d_s.values()) / len(pairs)
        losses += [smooth_l1(d_s[p] / m_s, d_t[p] / m_t) for p in pairs]
    return sum(losses) / max(len(losses), 1)


def mgskd_triplets(x_t, heads, k):
    """MGSKD (Liu et al. 2022, the authors' TokenPhraseLoss): in the teacher's self-attention over `heads`
    relation heads, the k most attended tokens are the anchors and each anchor's k most attended tokens (itself
    excluded) its neighbours (positions are indices into x_t, the example's real tokens)."""
    n, d = x_t.shape
    xh = x_t.reshape(n, heads, d // heads).transpose(0, 1)
    att = F.softmax(xh @ xh.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)  # [H, n, n]
    anchors = att.sum((0, 1)).topk(min(k, n)).indices.tolist()
    local = att.sum(0)
    out = []
    for a in anchors:
        row = local[a].clone()
        row[a] = -1.0
        out.append((a, row.topk(min(k, n - 1)).indices.tolist()))
    return out


def angle_loop(t, s, heads=1, window=None, topk=None, mask=None):
    """Mean over every triplet of every example (and head) of smooth L1 between the two sides' cos(p-a-q);
    with `mask` ([b, s] for [b, s, d] inputs) only each example's real tokens take part."""
    if mask is not None:
        t = [t[b][mask[b]] for b in range(t.shape[0])]
        s = [s[b][mask[b]] for b in range(len(t))]
        sets = [pair for x_t, x_s in zip(t, s) for pair in _sets(x_t[None], x_s[None], 1 if topk is not None else heads)]
    else:
        sets = list(_sets(t, s, 1) if topk is not None else _sets(t, s, heads))
    losses = []
    for x_t, x_s in sets:
        n = len(x_t)
        if topk is not None:  # the triplets come from the teacher's attention; the angles use whole vectors
            plan = mgskd_triplets(x_t, heads, topk)
        else:
            plan = [(a, [j for j in range(n) if j != a and (window is None or abs(j - a) <= window // 2)])
                    for a in range(n)]
        for a, near in plan:
            for p, q in itertools.permutations(near, 2):
                cos_t = F.cosine_similarity(x_t[p] - x_t[a], x_t[q] - x_t[a], dim=0, eps=1e-12)
                cos_s = F.cosine_similarity(x_s[p] - x_s[a], x_s[q] - x_s[a], dim=0, eps=1e-12)
                losses.append(smooth_l1(float(cos_s), float(cos_t)))
    return sum(losses) / max(len(losses), 1)


def _sets(t, s, heads):
    """Sets of points ([n, d] per example, or per position for stacked [b, s, L, d]) split into heads."""
    if t.dim() == 2:
        t, s = t[None], s[None]
    if t.dim() == 4:
        t, s = t.flatten(0, 1), s.flatten(0, 1)
    for x_t, x_s in zip(t, s):
        for h in range(heads):
            w_t, w_s = x_t.shape[-1] // heads, x_s.shape[-1] // heads
            yield x_t[:, h * w_t:(h + 1) * w_t], x_s[:, h * w_s:(h + 1) * w_s]


def close(a, b):
    assert a == pytest.approx(float(b), rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------- single-teacher methods


def test_kd(tdir):
    spec = stages(tdir, "use kd\nstage s { data: sst2, steps: 4, loss: kd(bert, small, T: 10) }")
    sig, batch = make_inputs(spec)
    t, s = sig["bert"][("task_logits", None)], sig["small"][("task_logits", None)]
    # GKD's KD: soft cross-entropy at T = 10 without T^2, plus the hard loss, weights 1 and 1
    close(total(spec, 0, sig, batch)[0], soft_ce(t, s, 10) + hard_ce(batch["labels"], s))


def test_kd_hinton_form(tdir):
    spec = stages(tdir, "use kd\nstage s { data: sst2, steps: 4, loss: kd.hinton(bert, small, T: 4, alpha: 0.3) }")
    sig, batch = make_inputs(spec)
    t, s = sig["bert"][("task_logits", None)], sig["small"][("task_logits", None)]
    # Hinton et al.: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE
    want = 0.3 * 16 * (F.softmax(t / 4, -1) * (F.log_softmax(t / 4, -1) - F.log_softmax(s / 4, -1))).sum(-1).mean()
    close(total(spec, 0, sig, batch)[0], want + 0.7 * hard_ce(batch["labels"], s))


def test_pd_and_takd(tdir):
    spec = stages(tdir, "use pd, takd\nstage a { data: corpus, steps: 4, loss: pd.pretrain(lm) }\n"
                        "stage b after a { data: sst2, steps: 4, loss: pd(bert, small) }\n"
                        "stage c after b { data: sst2, steps: 4, loss: takd(bert, small) }")
    sig, batch = make_inputs(spec)
    t, s = sig["bert"][("task_logits", None)], sig["small"][("task_logits", None)]
    close(total(spec, 0, sig, batch)[0], hard_ce(batch["tokens"], sig["lm"][("logits", None)]))
    close(total(spec, 1, sig, batch)[0], soft_ce(t, s))
    # TAKD as GKD's command runs it: KL x T^2 at T = 10 plus the hard loss, weights 1 and 1
    close(total(spec, 2, sig, batch)[0], kl(t, s, 10) + hard_ce(batch["labels"], s))


def test_tinybert(tdir):
    spec = stages(tdir, "use tinybert\nstage a { data: corpus, steps: 4, loss: tinybert.intermediate(bert, small) }",
                  "{ layers: 2, hidden: 16, heads: 2, head: classify(3) }")
    sig, batch = make_inputs(spec)
    value, _, graph, _ = total(spec, 0, sig, batch)
    t, s = sig["bert"], sig["small"]
    p_h = proj(graph, spec.stages[0].loss[0].pred.module)
    # one projection for the embeddings and every hidden state (TinyBERT's fit_dense)
    assert len({term.pred.module for term in spec.stages[0].loss if term.pred.node == "op"}) == 1
    p_e = p_h
    keys = MASK[:, None, :, None] & MASK[:, None, None, :]
    want = sum(masked_mse(t[("hidden", 2 * j + 1)], p_h(s[("hidden", j)]), MASK) for j in range(2))
    want += masked_mse(t[("embeddings", None)], p_e(s[("embeddings", None)]), MASK)
    want += sum(((s[("attn_scores", j)] - t[("attn_scores", 2 * j + 1)]) ** 2)[keys.expand(B, H, S, S)].mean()
                for j in range(2))
    close(value, want)


def test_minilm_and_minilmv2(tdir):
    spec = stages(tdir, "use minilm, minilmv2\nstage a { data: corpus, steps: 4, loss: minilm(bert, small) }\n"
                        "stage b after a { data: corpus, steps: 4, loss: minilmv2(bert, small, heads: 4) }",
                  "{ layers: 2, hidden: 16, heads: 2, head: classify(3) }")
    sig, batch = make_inputs(spec)
    t, s = sig["bert"], sig["small"]
    want = probs_kl(t[("attn_probs", 3)], s[("attn_probs", 1)], MASK)
    want += probs_kl(relation(t[("value", 3)], H), relation(s[("value", 1)], H), MASK)
    close(total(spec, 0, sig, batch)[0], want)
    want = sum(probs_kl(relation(t[(k, 3)], 4), relation(s[(k, 1)], 4), MASK) for k in ("query", "key", "value"))
    close(total(spec, 1, sig, batch)[0], want)


def test_distilbert(tdir):
    spec = stages(tdir, "use distilbert\nstage a { data: corpus, steps: 4, loss: distilbert(lmt, lm, T: 2) }")
    sig, batch = make_inputs(spec)
    t, s = sig["lmt"], sig["lm"]
    masked = batch["tokens"] != -100
    want = cosine_loss(t[("hidden", 3)], s[("hidden", 1)], MASK)
    want += 5 * kl(t[("logits", None)], s[("logits", None)], 2, masked) + 2 * hard_ce(batch["tokens"], s[("logits", None)])
    close(total(spec, 0, sig, batch)[0], want)


def test_pkd(tdir):
    spec = stages(tdir, "use pkd\nstage a { data: sst2, steps: 4, loss: pkd(bert, small, alpha: 0.5, T: 10, beta: 100) }")
    sig, batch = make_inputs(spec)
    t, s = sig["bert"], sig["small"]
    # PKD-skip, Lt = 4, Ls = 2: teacher block 2 (1-based) vs student block 1
    patience = ((F.normalize(cls(t[("hidden", 1)]), dim=-1) - F.normalize(cls(s[("hidden", 0)]), dim=-1)) ** 2).mean()
    want = 100 * patience + 0.5 * kl(t[("task_logits", None)], s[("task_logits", None)], 10)
    want += 0.5 * hard_ce(batch["labels"], s[("task_logits", None)])
    close(total(spec, 0, sig, batch)[0], want)


def test_rail_kd_draws_sorted_teacher_layers_per_epoch(tdir):
    spec = stages(tdir, "use rail_kd\nstage a { data: sst2, steps: 4, loss: rail_kd(bert, small, dim: 8, T: 10) }",
                  "{ layers: 3, head: classify(3) }")
    sig, batch = make_inputs(spec)
    t, s = sig["bert"], sig["small"]
    chosen_by_epoch = []
    for epoch in range(6):
        value, _, graph, _ = total(spec, 0, sig, batch, epoch=epoch, step=epoch * 3)
        sse_term = spec.stages[0].loss[0]
        p_t, p_s = proj(graph, sse_term.target.inputs[0].module), proj(graph, sse_term.pred.inputs[0].module)

        def side(x, layers, p):
            pooled = [(x[("hidden", l)] * MASK[..., None]).sum(1) / MASK.sum(1, keepdim=True) for l in layers]
            return F.normalize(p(torch.cat(pooled, -1)), dim=-1)

        student = side(s, [0, 1], p_s)
        rest = 0.3333 * soft_ce(t[("task_logits", None)], s[("task_logits", None)], 10)
        rest += 0.3333 * hard_ce(batch["labels"], s[("task_logits", None)])
        matches = [c for c in itertools.combinations(range(3), 2)
                   if abs(value - float(0.3333 * ((side(t, c, p_t) - student) ** 2).sum(-1).mean() + rest)) < 1e-4]
        assert len(matches) == 1, (epoch, value)
        chosen_by_epoch.append(matches[0])
        # the draw is per epoch: another step of the same epoch gives the same layers
        assert total(spec, 0, sig, batch, epoch=epoch, step=epoch * 3 + 1)[0] == pytest.approx(value, rel=1e-6)
    assert len(set(chosen_by_epoch)) > 1


def test_mgskd_token_span_and_sample_structure(tdir):
    spec = stages(tdir, "use mgskd\nstage a { data: sst2, steps: 4, loss: mgskd.real_tokens(bert, small, m: 1, heads: 2, k: 3) }")
    sig, batch = make_inputs(spec)
    t, s = sig["bert"], sig["small"]
    value, parts, _, _ = total(spec, 0, sig, batch, step=5)
    token_t, token_s = t[("hidden", 1)], s[("hidden", 0)]

    def pair_mse(x_t, x_s, mask=None):
        """The authors' pair loss: per relation head the scaled dot products x_i . x_j / sqrt(d_h), squared
        difference summed over the real (i, j) pairs of every head, divided by their count."""
        total_sq, count = 0.0, 0
        for b in range(x_t.shape[0]):
            real = range(x_t.shape[1]) if mask is None else [i for i in range(x_t.shape[1]) if mask[b, i]]
            for h in range(2):
                dt, ds = x_t.shape[-1] // 2, x_s.shape[-1] // 2
                a, c = x_t[b, :, h * dt:(h + 1) * dt], x_s[b, :, h * ds:(h + 1) * ds]
                for i in real:
                    for j in real:
                        total_sq += float(a[i] @ a[j] / math.sqrt(dt) - c[i] @ c[j] / math.sqrt(ds)) ** 2
                        count += 1
        return total_sq / count

    want = pair_mse(token_t, token_s, MASK) + angle_loop(token_t, token_s, heads=2, topk=3, mask=MASK)
    bounds = span_segmentation(SEED, 5, batch, 0.4)
    assert bounds[-1][1] == int(MASK.sum(1).min()) and all(e - s_ <= max(1, int(0.4 * 4)) for s_, e in bounds)
    pool = lambda x: torch.stack([x[:, a:b].mean(1) for a, b in bounds], 1)  # noqa: E731
    want += pair_mse(pool(token_t), pool(token_s)) + angle_loop(pool(token_t), pool(token_s), heads=2, topk=3)
    # sample level (the authors' SampleLoss): angles among the examples' mean-pooled states, over relation heads
    pooled = lambda x: (x * MASK[..., None]).sum(1) / MASK.sum(1, keepdim=True)  # noqa: E731
    want += 4 * angle_loop(pooled(t[("hidden", 3)]), pooled(s[("hidden", 1)]), heads=2)
    close(value, want)


def test_diito_reads_the_counterfactual_pass(tdir):
    """diito.same_positions, gkdc's earlier reading (the default, GKD's: tests/test_methods_parity_agents.py)."""
    spec = stages(tdir, "use diito\nstage a { data: corpus, steps: 4, loss: diito.same_positions(lmt, lm, T: 2, fraction: 30%) }")
    sig, batch = make_inputs(spec)
    ident = spec.stages[0].interventions[0].id
    sig[f"lmt@{ident}"], sig[f"lm@{ident}"] = Signals(spec.models["lmt"].arch, 91), Signals(spec.models["lm"].arch, 92)
    t, s, tc, sc = sig["lmt"], sig["lm"], sig[f"lmt@{ident}"], sig[f"lm@{ident}"]
    want = 0.25 * hard_ce(batch["tokens"], s[("logits", None)]) + 0.25 * kl(t[("logits", None)], s[("logits", None)], 2, MASK)
    want += 0.25 * cosine_loss(t[("hidden", 3)], s[("hidden", 1)], MASK)
    want += 0.25 * kl(tc[("logits", None)], sc[("logits", None)], 2, MASK)
    close(total(spec, 0, sig, batch)[0], want)


class PlateauReference:
    """SID's rule written out: windows of `window` observations, a window mean must beat the best by more than
    min_delta, `patience` windows without that unlock the next layer (best and count start over)."""

    def __init__(self, n, patience, window, min_delta):
        self.n, self.patience, self.window, self.min_delta = n, patience, window, min_delta
        self.current, self.best, self.bad, self.buf = 0, math.inf, 0, []

    def observe(self, x):
        if self.current >= self.n:
            return
        self.buf.append(x)
        if len(self.buf) < self.window:
            return
        mean, self.buf = sum(self.buf) / len(self.buf), []
        if mean < self.best - self.min_delta:
            self.best, self.bad = mean, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            self.current, self.best, self.bad = self.current + 1, math.inf, 0


def test_sid_unlocks_a_layer_when_its_cosine_loss_plateaus(tdir):
    spec = stages(tdir, "use sid\nstage a { data: sst2, steps: 100, loss: sid(bert, small, patience: 2, window: 3, "
                        "min_delta: 0.01, T: 1) }")
    sig, batch = make_inputs(spec)
    t, s = sig["bert"], sig["small"]
    stage = spec.stages[0]
    graph = LossGraph(stage.loss, {n: m.arch for n, m in spec.models.items()}, seed=SEED)
    (iv,) = ivs.build(stage, spec.models, SEED, 1e-3)
    layer = lambda j: cosine_loss(cls(t[("hidden", 2 * j + 1)]), cls(s[("hidden", j)])) + probs_kl(  # noqa: E731
        t[("attn_probs", 2 * j + 1)], s[("attn_probs", j)], MASK)
    final = soft_ce(t[("task_logits", None)], s[("task_logits", None)])
    cos_of = {j: next(term.id for term in stage.loss if term.fn == "cos" and term.pred.inputs[0].layer == j)
              for j in range(2)}
    ref = PlateauReference(2, patience=2, window=3, min_delta=0.01)
    # the watched cosine loss of the current layer: improving, then flat (within min_delta), for each layer
    curve = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.495, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    seen = []
    for step in range(2 * len(curve) + 4):
        info = ivs.StepInfo(step, 0, step / 100)
        active = iv.gate(graph.active_terms(info.progress, step=step), info)
        value, parts = graph(sig, batch, info.progress, active, step=step)
        assert iv.current() == ref.current, step
        want = final if ref.current == 2 else sum(layer(j) for j in range(ref.current + 1))
        close(float(value), want)
        seen.append(ref.current)
        if ref.current < 2:
            x = curve[min(len(curve) - 1, step - seen.index(ref.current))]
            parts = {**parts, cos_of[ref.current]: x}  # what the step logged for the watched term
            ref.observe(x)
        iv.observe(parts, info)
    # 3 improving windows (the third by more than 0.01), then 2 that do not beat the best by 0.01: 15 steps a layer
    assert seen.index(1) == 15 and seen.index(2) == 30
    # the state survives a state_dict round trip exactly (what the engine checkpoint holds)
    other = ivs.build(stage, spec.models, SEED, 1e-3)[0]
    other.load_state_dict(iv.state_dict())
    assert other.describe() == iv.describe()


def test_sid_plateau_deadline_forces_the_next_layer(tdir):
    spec = stages(tdir, "use sid\nstage a { data: sst2, steps: 10, loss: progressive(cos(bert.cls, small.cls, map: uniform), "
                        "over: 50%, until: plateau(patience: 100, window: 1), then: ce(labels, small.task_logits)) }")
    (iv,) = ivs.build(spec.stages[0], spec.models, SEED, 1e-3)
    assert iv.deadlines == [0.25, 0.5]
    assert [iv.current(x) for x in (0.0, 0.24, 0.25, 0.49, 0.5, 0.9)] == [0, 0, 1, 1, 2, 2]
    iv.observe({}, ivs.StepInfo(3, 0, 0.3))  # the deadline passed: the state follows
    assert iv.describe()["current"] == 1


def test_alp_kd(tdir):
    spec = stages(tdir, "use alp_kd\nstage a { data: sst2, steps: 4, loss: alp_kd(bert, small) }")
    sig, batch = make_inputs(spec)
    t, s = sig["bert"], sig["small"]
    want = 0.0
    teachers = torch.stack([cls(t[("hidden", l)]) for l in range(4)], 1)  # [b, L, d]
    for j in range(2):
        sj = cls(s[("hidden", j)])
        alpha = F.softmax(torch.einsum("bd,bld->bl", sj, teachers), -1)
        want += 0.2 * ((torch.einsum("bl,bld->bd", alpha, teachers) - sj) ** 2).mean()
    want += 0.7 * soft_ce(t[("task_logits", None)], s[("task_logits", None)], 20)
    want += 0.1 * hard_ce(batch["labels"], s[("task_logits", None)])
    close(total(spec, 0, sig, batch)[0], want)


def test_ckd_rkd(tdir):
    """ckd.rkd, gkdc's RKD-style reading (the default, the authors' computation: tests/test_methods_parity.py)."""
    spec = stages(tdir, "use ckd\nstage a { data: sst2, steps: 4, loss: ckd.rkd(bert, small, window: 3) }",
                  "{ layers: 2, hidden: 16, heads: 2, head: classify(3) }")
    sig, batch = make_inputs(spec)
    t, s = sig["bert"], sig["small"]
    pairs = [(0, 1), (1, 3)]
    want = sum(distance_loop(t[("hidden", i)], s[("hidden", j)], window=3) for j, i in pairs)
    want += 10 * sum(angle_loop(t[("hidden", i)], s[("hidden", j)], window=3) for j, i in pairs)
    st, ss = torch.stack([t[("hidden", 1)], t[("hidden", 3)]], 2), torch.stack([s[("hidden", 0)], s[("hidden", 1)]], 2)
    want += distance_loop(st, ss) + 10 * angle_loop(st, ss)
    want += 0.9 * soft_ce(t[("task_logits", None)], s[("task_logits", None)], 3)
    want += 0.1 * hard_ce(batch["labels"], s[("task_logits", None)])
    close(total(spec, 0, sig, batch)[0], want)


def test_universal_kd(tdir):
    spec = stages(tdir, "use universal_kd\nstage a { data: sst2, steps: 4, loss: universal_kd(bert, small) }",
                  "{ layers: 3, hidden: 16, heads: 2, head: classify(3) }")
    sig, batch = make_inputs(spec)
    value, _, graph, _ = total(spec, 0, sig, batch)
    t, s = sig["bert"], sig["small"]
    features = [term for term in spec.stages[0].loss if term.target.node == "op"]
    # blocks 0 .. L-2 on both sides, each through its own map (teacher: 3 maps, student: 2)
    teachers = torch.stack([proj(graph, node.module)(cls(t[("hidden", l)]))
                            for l, node in enumerate(features[0].target.inputs[1:])], 1)
    assert teachers.shape[1] == 3 and len(features) == 2
    want = 0.0
    for j, term in enumerate(features):
        sj = proj(graph, term.pred.module)(cls(s[("hidden", j)]))
        alpha = F.softmax(torch.einsum("bd,bld->bl", sj, teachers), -1)
        want += 0.5 * kl(torch.einsum("bl,bld->bd", alpha, teachers), sj)
    close(value, want + 0.5 * kl(t[("task_logits", None)], s[("task_logits", None)]))


def test_lrc_bert_info_nce(tdir):
    """lrc_bert.info_nce, gkdc's earlier reading (the default, GKD's COS-NCE: tests/test_methods_parity.py)."""
    spec = stages(tdir, "use lrc_bert\nstage a { data: sst2, steps: 4, micro_batch: 4, batch: 4, loss: lrc_bert.info_nce(bert, small) }",
                  "{ layers: 2, hidden: 16, heads: 2, head: classify(3) }")
    sig, batch = make_inputs(spec)
    value, _, graph, _ = total(spec, 0, sig, batch)
    t, s = sig["bert"], sig["small"]
    want = 0.0
    for term, (j, i) in zip(spec.stages[0].loss, [(0, 1), (1, 3)]):
        a = F.normalize(proj(graph, term.pred.module)(cls(s[("hidden", j)])), dim=-1)
        b = F.normalize(cls(t[("hidden", i)]), dim=-1)
        sims = a @ b.T / 0.1
        want += -(sims.diagonal() - sims.logsumexp(-1)).mean()
    close(value, want)


def test_annealing_and_continuation_kd(tdir):
    spec = stages(tdir, "use annealing_kd, continuation_kd\n"
                        "stage a { data: sst2, steps: 4, loss: annealing_kd(bert, small, max_T: 7, every: epoch) }\n"
                        "stage b after a { data: sst2, steps: 4, loss: continuation_kd.hinge(bert, small, max_T: 10, margin: 1) }")
    sig, batch = make_inputs(spec)
    t, s = sig["bert"][("task_logits", None)], sig["small"][("task_logits", None)]
    for epoch in range(10):
        T = max(1, 7 - epoch)  # the paper: T = tau_max in the first epoch, one less each epoch, down to 1
        phi = 1 - (T - 1) / 7
        for step, progress in ((epoch * 5, 0.1), (epoch * 5 + 4, 0.9)):  # a step function of the epoch only
            close(total(spec, 0, sig, batch, progress=progress, step=step, epoch=epoch)[0], ((s - phi * t) ** 2).mean())
    assert total(spec, 0, sig, batch, epoch=0)[0] != pytest.approx(total(spec, 0, sig, batch, epoch=1)[0])
    # the default, every: stage: T = ceil((1 - progress) x 7), whatever the epoch
    default = stages(tdir, "use annealing_kd\nstage a { data: sst2, steps: 4, loss: annealing_kd(bert, small) }")
    for progress in (0.0, 0.1, 0.3, 0.5, 0.86, 0.99):
        phi = 1 - (max(1, math.ceil((1 - progress) * 7)) - 1) / 7
        close(total(default, 0, sig, batch, progress=progress, epoch=0)[0], ((s - phi * t) ** 2).mean())
    for x in (0.3, 0.8):  # continuation_kd.hinge, gkdc's earlier reading (the default: test_methods_parity.py)
        phi = 0.1 + 0.9 * min(1.0, x / 0.666)
        psi = 0.0 if x <= 0.666 else 0.75 * (x - 0.666) / (1 - 0.666)
        want = (F.relu((s - phi * t).abs() - 1) ** 2).mean() + psi * hard_ce(batch["labels"], s)
        close(total(spec, 1, sig, batch, progress=x)[0], want)


def test_mobilebert_progressive_transfer(tdir):
    spec = stages(tdir, "use mobilebert\nassistant ibt = like(lmt) { layers: 2, hidden: 32, heads: 2, intermediate: 128 }\n"
                        "stage a { data: corpus, steps: 4, loss: mobilebert(ibt, lm, w: 0.5, below_lr: 0.1) }")
    sig, batch = make_inputs(spec)
    t, s = sig["ibt"], sig["lm"]
    layer = lambda j: 0.5 * ((t[("hidden", j)] - s[("hidden", j)]) ** 2).mean() + 0.5 * probs_kl(  # noqa: E731
        t[("attn_probs", j)], s[("attn_probs", j)], MASK)
    close(total(spec, 0, sig, batch, progress=0.1)[0], layer(0))
    close(total(spec, 0, sig, batch, progress=0.5)[0], layer(1))
    close(total(spec, 0, sig, batch, progress=0.9)[0], layer(1) + hard_ce(batch["tokens"], s[("logits", None)]))
    (iv,) = ivs.build(spec.stages[0], spec.models, SEED, 1e-3)
    assert [iv.lr_scale(g, 0.1) for g in ("embeddings", "block0", "block1")] == [0.1, 1.0, 1.0]
    assert [iv.lr_scale(g, 0.5) for g in ("embeddings", "block0", "block1")] == [0.1, 0.1, 1.0]


def test_glmd_with_vocabulary_compression(tdir):
    spec = stages(tdir, "use glmd\nstage a { data: corpus, steps: 4, loss: glmd(lmt, lm, T: 15) }\n"
                        "stage b after a { data: sst2, steps: 4, loss: glmd.task(bert, small) }")
    sig, batch = make_inputs(spec)
    t, s = sig["lmt"][("logits", None)], sig["lm"][("logits", None)]
    close(total(spec, 0, sig, batch)[0], kl(t, s, 15, MASK))
    close(total(spec, 1, sig, batch)[0], soft_ce(sig["bert"][("task_logits", None)], sig["small"][("task_logits", None)]))


# ---------------------------------------------------------------- multi-teacher methods


def test_tmkd(tdir):
    spec = stages(tdir, "use tmkd\nstage a { data: sst2, steps: 4, loss: tmkd([base, bert], small) }")
    sig, batch = make_inputs(spec)
    s = sig["small"][("task_logits", None)]
    want = sum(0.5 * ((s - sig[m][("task_logits", None)]) ** 2).mean() for m in ("base", "bert"))
    close(total(spec, 0, sig, batch)[0], want + 0.5 * hard_ce(batch["labels"], s))


def test_mt_bert_pkd_cls_weighs_each_teacher_per_example_by_its_ce(tdir):
    spec = stages(tdir, "use mt_bert\nstage a { data: sst2, steps: 4, loss: mt_bert.pkd_cls([base, bert], small) }")
    sig, batch = make_inputs(spec)
    value, parts, graph, _ = total(spec, 0, sig, batch)
    s = sig["small"][("task_logits", None)]
    want = hard_ce(batch["labels"], s)
    for m in ("base", "bert"):
        t = sig[m][("task_logits", None)]
        w = 1 / (1 + F.cross_entropy(t, batch["labels"], reduction="none"))
        per = -(F.softmax(t, -1) * F.log_softmax(s, -1)).sum(-1)
        want += (w * per).mean()
    for term in spec.stages[0].loss:
        if term.fn == "mse":  # patience: normalised projected teacher [CLS] vs normalised student [CLS]
            tm, tl = term.target.inputs[0].inputs[0].inputs[0].model, term.target.inputs[0].inputs[0].inputs[0].layer
            p = proj(graph, term.target.inputs[0].module)
            sl = term.pred.inputs[0].inputs[0].layer
            want += ((F.normalize(p(cls(sig[tm][("hidden", tl)])), dim=-1)
                      - F.normalize(cls(sig["small"][("hidden", sl)]), dim=-1)) ** 2).mean()
    close(value, want)


def test_uncertainty_splits_the_batch_by_student_entropy(tdir):
    spec = stages(tdir, "use uncertainty\nstage a { data: sst2, steps: 4, micro_batch: 4, loss: uncertainty([base, bert], small) }")
    sig, batch = make_inputs(spec)
    s = sig["small"][("task_logits", None)]
    ent = -(F.softmax(s, -1) * F.log_softmax(s, -1)).sum(-1)
    order = sorted(range(B), key=lambda i: float(ent[i]))
    teacher_of = {i: ("base" if rank < B // 2 else "bert") for rank, i in enumerate(order)}
    per = sum(kl(sig[teacher_of[i]][("task_logits", None)][i:i + 1], s[i:i + 1]) for i in range(B)) / B
    close(total(spec, 0, sig, batch)[0], 0.5 * per / 2 + 0.5 * hard_ce(batch["labels"], s))  # GKD: / n teachers


def test_rl_kd_agent_weights_and_reinforce_loss(tdir):
    spec = stages(tdir, "use rl_kd\nteacher semantic = hf(\"" + str(tdir) + "/t2\") { head: none }\n"
                        "stage a { data: sst2, steps: 4, loss: rl_kd([base, bert], small, semantic, T: 10) }")
    sig, batch = make_inputs(spec)
    value, parts, _, (agent,) = total(spec, 0, sig, batch, step=3)
    s = sig["small"][("task_logits", None)]
    state = torch.cat([cls(sig["semantic"][("hidden", 1)]), F.softmax(sig["base"][("task_logits", None)], -1),
                       F.softmax(sig["bert"][("task_logits", None)], -1)], -1)
    probs = torch.sigmoid(agent.agent(state))
    gen = ivs._generator(SEED, "select1", 3, 0, 0)
    actions = (torch.rand(probs.shape, generator=gen) < probs).float()
    kd = 0.0
    for i in range(B):
        kept = [m for j, m in enumerate(("base", "bert")) if actions[i, j]]
        for m in kept:
            kd += soft_ce(sig[m][("task_logits", None)][i:i + 1], s[i:i + 1], 10) / len(kept) / B
    reward = -F.cross_entropy(s, batch["labels"], reduction="none")
    log_pi = (actions * probs.log() + (1 - actions) * (1 - probs).log()).sum(-1)
    policy = -((reward - reward.mean()) * log_pi).mean()  # first step: the baseline is the batch mean
    close(parts["select1/policy"], policy)
    close(value, 0.5 * kd + 0.5 * hard_ce(batch["labels"], s) + policy)


def test_dgkd_drops_each_teacher_with_p_and_never_both(tdir):
    spec = stages(tdir, "use dgkd\nassistant mid = like(bert) { layers: 3, head: classify(3) }\n"
                        "stage a { data: sst2, steps: 4, loss: dgkd([bert, mid], small, p: 25%, min_kept: 1) }")
    sig, batch = make_inputs(spec)
    s = sig["small"][("task_logits", None)]
    sce = {m: 0.5 * soft_ce(sig[m][("task_logits", None)], s, 10) for m in ("bert", "mid")}  # summed (GKD's)
    hard = 0.5 * hard_ce(batch["labels"], s)
    kept_counts = {"bert": 0, "mid": 0}
    steps = 400
    for step in range(steps):
        value = total(spec, 0, sig, batch, step=step)[0]
        kept = [c for c in itertools.chain.from_iterable(itertools.combinations(sce, r) for r in (1, 2))
                if abs(value - float(hard + sum(sce[m] for m in c))) < 1e-5]
        assert len(kept) == 1, (step, value)
        for m in kept[0]:
            kept_counts[m] += 1
    for m, n in kept_counts.items():  # kept w.p. 0.75 + 0.25 * 0.25 * 0.5 (the rescue when both drop)
        assert abs(n / steps - (0.75 + 0.03125)) < 0.06, (m, n)


# ---------------------------------------------------------------- interventions on real forwards


def _bert(layers: int, seed: int, classify: bool = True):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=layers, num_attention_heads=H,
                        intermediate_size=64, max_position_embeddings=32, num_labels=C,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = (tf.BertForSequenceClassification if classify else tf.BertForMaskedLM)(cfg)
    return model.eval()


def _additive(mask):
    return (1 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def _manual(student, teacher, batch, use_teacher: dict[int, list[int]]):
    """Student embeddings, then per student block either itself or its teacher blocks, then the student head."""
    ext = _additive(batch["attention_mask"])
    h = student.bert.embeddings(input_ids=batch["input_ids"])
    for j, block in enumerate(student.bert.encoder.layer):
        for blk in ([teacher.bert.encoder.layer[i] for i in use_teacher[j]] if j in use_teacher else [block]):
            h = blk(h, attention_mask=ext)
            h = h[0] if isinstance(h, tuple) else h
    return student.classifier(student.bert.pooler(h))


def test_theseus_replaces_student_blocks_by_teacher_groups(tdir):
    from planner.plan import CapturePoint, ModelCapture
    from runtime.adapters import capture

    spec = stages(tdir, "use theseus\nstage a { data: sst2, steps: 4, loss: theseus(bert, small) }")
    (iv,) = ivs.build(spec.stages[0], spec.models, SEED, 1e-3)
    teacher, student = _bert(4, 0), _bert(2, 1)
    iv.attach(teacher)
    batch = {"input_ids": torch.randint(1, V, (B, S)), "attention_mask": torch.ones(B, S, dtype=torch.long)}
    plan = ModelCapture(model="small", points=[CapturePoint(kind="task_logits")], stop_after_layer=None, needs_head=True)
    seen = set()
    for step in range(12):
        info = ivs.StepInfo(step, 0, 0.0)
        replaced = iv.replaced(step, 0.0)
        seen.add(tuple(replaced))
        with torch.no_grad(), iv.student_context(student, info):
            got = capture(student, batch, plan, grad=False)[("task_logits", None)]
        want = _manual(student, teacher, batch, {j: [2 * j, 2 * j + 1] for j in replaced})
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(seen) > 1 and len(student.bert.encoder.layer) == 2  # restored after each forward
    assert iv.replaced(5, 1.0) == []  # p = 1 at the end: only the student runs
    rate = sum(len(iv.replaced(st, 0.0)) for st in range(2000)) / 4000
    assert abs(rate - 0.7) < 0.03  # p0 = 0.3: each block is replaced w.p. 0.7


def test_diito_interchange_pass_takes_the_next_examples_states(tdir):
    from planner.plan import CapturePoint, ModelCapture
    from runtime.adapters import capture

    spec = stages(tdir, "use diito\nstage a { data: corpus, steps: 4, loss: diito.same_positions(lmt, lm, fraction: 30%) }")
    (iv,) = ivs.build(spec.stages[0], spec.models, SEED, 1e-3)
    model = _bert(2, 3, classify=False)
    batch = {"input_ids": torch.randint(1, V, (B, S)), "attention_mask": MASK.long()}
    info = ivs.StepInfo(4, 0, 0.0, micro=1)
    s_layer, _ = iv.pair(4)
    first = capture(model, batch, ModelCapture(model="lm", points=[CapturePoint(kind="hidden", layer=s_layer)],
                                               stop_after_layer=None, needs_head=False), grad=False)
    got = iv.student_passes("lm", model, batch, {"lm": first}, info)[f"lm@{iv.ident}"][("logits", None)]
    where = iv.positions(batch, info)
    for i in range(B):  # one contiguous span of round(0.3 * n_real) real positions
        idx = where[i].nonzero().flatten().tolist()
        assert idx == list(range(idx[0], idx[0] + max(1, round(0.3 * int(MASK[i].sum()))))) and MASK[i, idx].all()
    source = first[("hidden", s_layer)].roll(-1, 0)
    ext = _additive(batch["attention_mask"])
    h = model.bert.embeddings(input_ids=batch["input_ids"])
    with torch.no_grad():
        for j, blk in enumerate(model.bert.encoder.layer):
            h = blk(h, attention_mask=ext)
            h = h[0] if isinstance(h, tuple) else h
            if j == s_layer:
                h = torch.where(where[..., None], source, h)
        want = model.cls(h)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("over", ["token", "batch"])
def test_lrc_bert_perturbation_moves_embeddings_along_the_first_pass_gradient(tdir, over):
    from planner.plan import CapturePoint, ModelCapture
    from runtime.adapters import capture

    spec = stages(tdir, "use lrc_bert\nstage a { data: sst2, steps: 4, micro_batch: 4, batch: 4, loss: lrc_bert(bert, small) }")
    (iv,) = ivs.build(spec.stages[0], spec.models, SEED, 1e-3)
    assert (iv.eps, iv.norm) == (1.0, "token")  # the library's default: GKD's per-position unit gradient
    iv.norm = over
    model = _bert(2, 5)
    batch = {"input_ids": torch.randint(1, V, (B, S)), "attention_mask": torch.ones(B, S, dtype=torch.long)}
    plan = ModelCapture(model="small", points=[CapturePoint(kind="task_logits")], stop_after_layer=None, needs_head=True)
    loss_of = lambda logits: F.cross_entropy(logits, torch.tensor([0, 1, 2, 0]))  # noqa: E731

    def run():
        logits = capture(model, batch, plan, grad=True)[("task_logits", None)]
        return loss_of(logits), {}

    got, _ = iv.two_passes(model, run)
    model.zero_grad()
    e = model.bert.embeddings(input_ids=batch["input_ids"])
    ext = _additive(batch["attention_mask"])

    def from_embeddings(x):
        for blk in model.bert.encoder.layer:
            x = blk(x, attention_mask=ext)
            x = x[0] if isinstance(x, tuple) else x
        return loss_of(model.classifier(model.bert.pooler(x)))

    (g,) = torch.autograd.grad(from_embeddings(e), e)
    if over == "token":  # GKD: hidden_states + F.normalize(grad, p=2, dim=-1), each position a unit step
        delta = g / g.norm(dim=-1, keepdim=True)
    else:
        delta = g / g.norm()
    want = from_embeddings(e + delta)
    close(float(got), want)
    assert float(got) > float(from_embeddings(e))  # a step up the loss
    assert all(p.grad is None for p in model.parameters())  # pass 1 left no weight gradient


def test_perturbation_of_a_non_finite_gradient_is_zero():
    g = torch.tensor([[1.0, float("nan")], [3.0, 4.0]])
    assert torch.equal(ivs.perturbation(g, g, 1.0, "token"), torch.zeros(2, 2))
    torch.testing.assert_close(ivs.perturbation(g.nan_to_num(0.0), g, 2.0, "token"),
                               torch.tensor([[2.0, 0.0], [1.2, 1.6]]))


def test_every_intervention_kind_of_the_language_has_a_runtime_class():
    from gkdlang import builtins as Bt

    assert set(Bt.INTERVENTIONS) | {"progressive_lr"} <= set(ivs.INTERVENTIONS)


# ---------------------------------------------------------------- multi-teacher methods with three teachers

THREE = 'teacher third = hf("{tdir}/t4") {{ head: classify(3) }}\n'


def test_tmkd_three_teachers(tdir):
    spec = stages(tdir, THREE.format(tdir=tdir) + "use tmkd\nstage a { data: sst2, steps: 4, loss: tmkd([base, bert, third], small) }")
    sig, batch = make_inputs(spec)
    s = sig["small"][("task_logits", None)]
    want = sum(((s - sig[m][("task_logits", None)]) ** 2).mean() for m in ("base", "bert", "third")) / 3
    close(total(spec, 0, sig, batch)[0], want + hard_ce(batch["labels"], s) / 3)


def test_mt_bert_three_teachers(tdir):
    spec = stages(tdir, THREE.format(tdir=tdir) + "use mt_bert\nstage a { data: sst2, steps: 4, loss: mt_bert([base, bert, third], small) }")
    sig, batch = make_inputs(spec)
    value, _, graph, _ = total(spec, 0, sig, batch)
    s = sig["small"][("task_logits", None)]
    want = hard_ce(batch["labels"], s)
    for m in ("base", "bert", "third"):
        t = sig[m][("task_logits", None)]
        w = 1 / (1 + F.cross_entropy(t, batch["labels"], reduction="none"))
        want += (w * -(F.softmax(t, -1) * F.log_softmax(s, -1)).sum(-1)).mean()
    patience = [t for t in spec.stages[0].loss if t.fn == "mse"]
    # GKD's PKD defaults under MT-BERT: map uniform over every student block, whole sequences, one projection
    # per teacher shared by its blocks: base (2 blocks) -> 0, 1; bert, third (4 blocks) -> 1, 3
    assert sorted((t.target.inputs[0].model, t.target.inputs[0].layer) for t in patience) == [
        ("base", 0), ("base", 1), ("bert", 1), ("bert", 3), ("third", 1), ("third", 3)]
    assert len({t.target.module for t in patience}) == 3  # one projection per teacher
    for term in patience:
        leaf, j = term.target.inputs[0], term.pred.layer
        p = proj(graph, term.target.module)
        want += ((p(sig[leaf.model][("hidden", leaf.layer)]) - sig["small"][("hidden", j)]) ** 2).mean()
    close(value, want)


def test_uncertainty_three_teachers_split_the_batch(tdir):
    spec = stages(tdir, THREE.format(tdir=tdir) + "use uncertainty\nstage a { data: sst2, steps: 4, micro_batch: 4, "
                  "loss: uncertainty([base, bert, third], small) }")
    sig, batch = make_inputs(spec)
    s = sig["small"][("task_logits", None)]
    ent = -(F.softmax(s, -1) * F.log_softmax(s, -1)).sum(-1)
    order = sorted(range(B), key=lambda i: float(ent[i]))
    # four examples over three teachers (smallest first): slices of 2, 1 and 1 by ascending entropy
    teacher_of = {order[0]: "base", order[1]: "base", order[2]: "bert", order[3]: "third"}
    per = sum(kl(sig[teacher_of[i]][("task_logits", None)][i:i + 1], s[i:i + 1]) for i in range(B)) / B
    close(total(spec, 0, sig, batch)[0], 0.5 * per / 3 + 0.5 * hard_ce(batch["labels"], s))  # GKD: / n teachers


def test_rl_kd_three_teachers(tdir):
    spec = stages(tdir, THREE.format(tdir=tdir) + "use rl_kd\nteacher semantic = hf(\"" + str(tdir) + "/t2\") { head: none }\n"
                  "stage a { data: sst2, steps: 4, loss: rl_kd.average([base, bert, third], small, T: 10) }\n"
                  "stage b after a { data: sst2, steps: 4, loss: rl_kd([base, bert, third], small, semantic, T: 10) }")
    sig, batch = make_inputs(spec)
    s = sig["small"][("task_logits", None)]
    names = ("base", "bert", "third")
    avg = sum(soft_ce(sig[m][("task_logits", None)], s, 10) for m in names) / 3
    close(total(spec, 0, sig, batch)[0], 0.5 * avg + 0.5 * hard_ce(batch["labels"], s))
    value, parts, _, (agent,) = total(spec, 1, sig, batch, step=2)
    group = agent.group
    state = torch.cat([cls(sig["semantic"][("hidden", 1)]), *(F.softmax(sig[m][("task_logits", None)], -1) for m in names)], -1)
    probs = torch.sigmoid(agent.agent(state))
    assert probs.shape == (B, 3)
    actions = (torch.rand(probs.shape, generator=ivs._generator(SEED, group, 2, 0, 0)) < probs).float()
    kd = 0.0
    for i in range(B):
        kept = [m for j, m in enumerate(names) if actions[i, j]]
        kd += sum(soft_ce(sig[m][("task_logits", None)][i:i + 1], s[i:i + 1], 10) for m in kept) / max(len(kept), 1) / B
    reward = -F.cross_entropy(s, batch["labels"], reduction="none")
    log_pi = (actions * probs.log() + (1 - actions) * (1 - probs).log()).sum(-1)
    policy = -((reward - reward.mean()) * log_pi).mean()
    close(parts[f"{group}/policy"], policy)
    close(value, 0.5 * kd + 0.5 * hard_ce(batch["labels"], s) + policy)


def test_dgkd_three_teachers_each_dropped_on_its_own(tdir):
    spec = stages(tdir, THREE.format(tdir=tdir) + "use dgkd\nassistant mid = like(bert) { layers: 3, head: classify(3) }\n"
                  "stage a { data: sst2, steps: 4, loss: dgkd([bert, mid, third], small, p: 25%) }")
    assert [iv.models for iv in spec.stages[0].interventions] == [["bert"], ["mid"], ["third"]]
    sig, batch = make_inputs(spec)
    s = sig["small"][("task_logits", None)]
    sce = {m: 0.5 * soft_ce(sig[m][("task_logits", None)], s, 10) for m in ("bert", "mid", "third")}
    hard = 0.5 * hard_ce(batch["labels"], s)
    kept_counts = dict.fromkeys(sce, 0)
    steps = 400
    for step in range(steps):
        value = total(spec, 0, sig, batch, step=step)[0]
        kept = [c for r in (0, 1, 2, 3) for c in itertools.combinations(sce, r)
                if abs(value - float(hard + sum(sce[m] for m in c))) < 1e-5]
        assert len(kept) == 1, (step, value)
        for m in kept[0]:
            kept_counts[m] += 1
    for m, n in kept_counts.items():  # kept w.p. 0.75 on its own (min_kept: 0, GKD's: no rescue)
        assert abs(n / steps - 0.75) < 0.06, (m, n)
