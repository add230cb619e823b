"""Adapters: every planned signal equals an independent reference, for every family; early stop; hook hygiene.

References are (a) HF's own outputs on an eager-attention copy (``output_hidden_states`` /
``output_attentions``) and (b) each block recomputed by hand from its weights, starting from the reference
input of that block. Tiny random models (3 blocks, width 32, vocab 100, seq 8) with padding in the batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import runtime.adapters.attention as attention
from planner.plan import CapturePoint, ModelCapture
from runtime.adapters import Captured, adapter_for, capture
from runtime.errors import RunError

L, H, HEADS, V, S = 3, 32, 4, 100, 8
KINDS = ("hidden", "attn_scores", "attn_probs", "query", "key", "value", "ffn")


# --- tiny models ------------------------------------------------------------------------------------------


def _bert_cfg(cls=tf.BertConfig, **kw):
    return cls(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS, intermediate_size=64,
               max_position_embeddings=40, pad_token_id=1, **kw)


def _llama_kw(**kw):
    return dict(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=L, num_attention_heads=HEADS,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, **kw)


def _gpt2_cfg(**kw):
    return tf.GPT2Config(vocab_size=V, n_embd=H, n_layer=L, n_head=HEADS, n_positions=32, pad_token_id=0, **kw)


FACTORIES = {
    "bert": lambda: tf.BertForMaskedLM(_bert_cfg()),
    "roberta": lambda: tf.RobertaForMaskedLM(_bert_cfg(tf.RobertaConfig)),
    "xlm-roberta": lambda: tf.XLMRobertaForMaskedLM(_bert_cfg(tf.XLMRobertaConfig)),
    "gpt2": lambda: tf.GPT2LMHeadModel(_gpt2_cfg()),
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_llama_kw())),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_llama_kw())),
    # a window shorter than the sequence: the sliding mask reaches the eager tap as a real mask
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_llama_kw(sliding_window=4))),
}
FAMILY = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "gpt2": "gpt2", "llama": "llama",
          "qwen2": "qwen2", "mistral": "mistral"}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return FACTORIES[name]().eval()


def _batch(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, S), generator=g)
    mask = torch.ones(2, S, dtype=torch.long)
    mask[1, 5:] = 0  # right padding in the second row
    ids[1, 5:] = 1 if name in {"bert", "roberta", "xlm-roberta"} else 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
    if name == "bert":
        batch["token_type_ids"] = torch.tensor([[0] * 4 + [1] * 4] * 2)
    return batch


def _plan(points, *, stop=None, head=False, eager=()) -> ModelCapture:
    return ModelCapture(model="m", points=[CapturePoint(kind=k, layer=i) for k, i in points], stop_after_layer=stop,
                        needs_head=head, eager_attention_layers=list(eager))


def _everything(head_kind: str = "logits") -> ModelCapture:
    points = [("embeddings", None), (head_kind, None)] + [(k, i) for k in KINDS for i in range(L)]
    return _plan(points, head=True, eager=range(L))


# --- references -------------------------------------------------------------------------------------------


def _eager_reference(model: nn.Module, batch: dict) -> object:
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return ref(**inputs, output_hidden_states=True, output_attentions=True)


def _heads(x, d):
    b, s, _ = x.shape
    return x.view(b, s, -1, d).transpose(1, 2)


def _attend(q, k, v, allowed):
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    probs = torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1)
    b, _, s, _ = q.shape
    return scores, probs, (probs @ v).transpose(1, 2).reshape(b, s, -1)


def _allowed(pad_mask, causal, window=None):
    s = pad_mask.shape[1]
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = pad_mask.bool()[:, None, None, :].expand(-1, 1, s, s)
    if causal:
        allowed = allowed & (j <= i)
    if window is not None:
        allowed = allowed & (j > i - window)
    return allowed


def _manual_bert(model, block, h, batch, i):
    sa, d = block.attention.self, H // HEADS
    q, k, v = sa.query(h), sa.key(h), sa.value(h)
    scores, probs, ctx = _attend(_heads(q, d), _heads(k, d), _heads(v, d), _allowed(batch["attention_mask"], False))
    a = block.attention.output.LayerNorm(block.attention.output.dense(ctx) + h)
    ffn = block.intermediate(a)
    out = block.output.LayerNorm(block.output.dense(ffn) + a)
    return dict(query=q, key=k, value=v, attn_scores=scores, attn_probs=probs, ffn=ffn, hidden=out)


def _manual_gpt2(model, block, h, batch, i):
    d = H // HEADS
    q, k, v = block.attn.c_attn(block.ln_1(h)).split(H, dim=-1)
    scores, probs, ctx = _attend(_heads(q, d), _heads(k, d), _heads(v, d), _allowed(batch["attention_mask"], True))
    h2 = h + block.attn.c_proj(ctx)
    ffn = block.mlp.act(block.mlp.c_fc(block.ln_2(h2)))
    out = h2 + block.mlp.c_proj(ffn)
    return dict(query=q, key=k, value=v, attn_scores=scores, attn_probs=probs, ffn=ffn, hidden=out)


def _manual_llama(model, block, h, batch, i):
    attn, mlp, d = block.self_attn, block.mlp, block.self_attn.head_dim
    x = block.input_layernorm(h)
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    cos, sin = model.model.rotary_emb(h, torch.arange(S)[None])
    qr, kr = apply_rotary_pos_emb(_heads(q, d), _heads(k, d), cos, sin)
    groups = HEADS // model.config.num_key_value_heads
    kr, vr = kr.repeat_interleave(groups, 1), _heads(v, d).repeat_interleave(groups, 1)
    window = getattr(model.config, "sliding_window", None) if model.config.model_type == "mistral" else None
    scores, probs, ctx = _attend(qr, kr, vr, _allowed(batch["attention_mask"], True, window))
    h2 = h + attn.o_proj(ctx)
    m = block.post_attention_layernorm(h2)
    ffn = mlp.act_fn(mlp.gate_proj(m)) * mlp.up_proj(m)
    out = h2 + mlp.down_proj(ffn)
    return dict(query=q, key=k, value=v, attn_scores=scores, attn_probs=probs, ffn=ffn, hidden=out)


MANUAL = {"bert": _manual_bert, "roberta": _manual_bert, "gpt2": _manual_gpt2, "llama": _manual_llama,
          "qwen2": _manual_llama, "mistral": _manual_llama}


def _close(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def _hook_state(model):
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()}


# --- every signal, every family ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_signal_matches_independent_reference(name):
    model, batch = _model(name), _batch(name)
    got = capture(model, batch, _everything(), grad=False)
    ref = _eager_reference(model, batch)
    manual = MANUAL[FAMILY[name]]
    blocks = adapter_for(model).layers(model)
    _close(got.embeddings, ref.hidden_states[0], "embeddings")
    _close(got.logits, ref.logits, "logits")
    with torch.no_grad():
        for i in range(L):
            expect = manual(model, blocks[i], ref.hidden_states[i], batch, i)
            for kind in KINDS:
                _close(got[(kind, i)], expect[kind], f"{name} {kind}[{i}]")
            _close(got[("attn_probs", i)], ref.attentions[i], f"{name} attn_probs[{i}] vs HF eager")
            if i < L - 1:
                _close(got[("hidden", i)], ref.hidden_states[i + 1], f"{name} hidden[{i}] vs HF")
    if FAMILY[name] not in {"bert", "roberta"}:  # pre-LN decoders: HF's last hidden state is after the final norm
        assert not torch.allclose(got[("hidden", L - 1)], ref.hidden_states[L])
    assert len(got) == 2 + len(KINDS) * L


def test_shapes_follow_the_signal_table():
    got = capture(_model("llama"), _batch("llama"), _everything(), grad=False)
    d = H // HEADS
    assert got[("query", 0)].shape == (2, S, HEADS * d)
    assert got[("key", 0)].shape == (2, S, 2 * d)  # GQA: Hkv * d
    assert got[("attn_scores", 0)].shape == (2, HEADS, S, S)
    assert got[("ffn", 2)].shape == (2, S, 64)
    assert got.logits.shape == (2, S, V)


def test_left_padding_probs_match_eager_reference():
    model, batch = _model("llama"), _batch("llama")
    batch["attention_mask"] = batch["attention_mask"].flip(1)
    got = capture(model, batch, _plan([("attn_probs", 0), ("attn_probs", 2)], eager=[0, 2]), grad=False)
    ref = _eager_reference(model, batch)
    _close(got[("attn_probs", 0)], ref.attentions[0], "left-padded attn_probs[0]")
    _close(got[("attn_probs", 2)], ref.attentions[2], "left-padded attn_probs[2]")


def test_chunked_bert_ffn_is_joined_along_the_sequence():
    torch.manual_seed(0)
    model = tf.BertForMaskedLM(_bert_cfg(chunk_size_feed_forward=4)).eval()
    batch = _batch("bert")
    got = capture(model, batch, _plan([("ffn", 1)]), grad=False)
    ref = _eager_reference(model, batch)
    with torch.no_grad():
        expect = _manual_bert(model, model.bert.encoder.layer[1], ref.hidden_states[1], batch, 1)
    _close(got[("ffn", 1)], expect["ffn"], "chunked ffn[1]")


# --- heads and base models --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,cfg", [
    (tf.BertForSequenceClassification, lambda: _bert_cfg(num_labels=3)),
    (tf.GPT2ForSequenceClassification, lambda: _gpt2_cfg(num_labels=3)),
    (tf.LlamaForSequenceClassification, lambda: tf.LlamaConfig(**_llama_kw(num_labels=3))),
])
def test_task_logits_come_from_the_model_forward(cls, cfg):
    torch.manual_seed(0)
    model = cls(cfg()).eval()
    batch = _batch("bert" if "Bert" in cls.__name__ else "llama")
    got = capture(model, batch, _plan([("task_logits", None), ("hidden", 0)], head=True), grad=False)
    with torch.no_grad():
        expect = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    _close(got.task_logits, expect, "task_logits")
    assert expect.shape == (2, 3)
    with pytest.raises(RunError, match="sequence-classification head"):
        capture(model, batch, _plan([("logits", None)], head=True), grad=False)


@pytest.mark.parametrize("model_fn", [
    lambda: tf.BertModel(_bert_cfg()),
    lambda: tf.LlamaModel(tf.LlamaConfig(**_llama_kw())),
])
def test_base_models_give_layer_signals_but_no_logits(model_fn):
    torch.manual_seed(0)
    model = model_fn().eval()
    batch = _batch("bert" if isinstance(model, tf.BertModel) else "llama")
    got = capture(model, batch, _plan([("hidden", 1), ("attn_probs", 1)], eager=[1]), grad=False)
    _close(got[("attn_probs", 1)], _eager_reference(model, batch).attentions[1], "base model attn_probs[1]")
    with pytest.raises(RunError, match="no head"):
        capture(model, batch, _plan([("logits", None)], head=True), grad=False)


# --- early stop -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_early_stop_runs_no_later_block_and_matches_full_forward(name):
    model, batch = _model(name), _batch(name)
    adapter = adapter_for(model)
    blocks = adapter.layers(model)
    calls = [0] * L
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, b in enumerate(blocks)]
    head = model.get_output_embeddings()
    handles.append(head.register_forward_hook(lambda *a: calls.append("head")))
    try:
        got = capture(model, batch, _plan([("hidden", 1), ("ffn", 0)], stop=1), grad=False)
    finally:
        for h in handles:
            h.remove()
    assert calls == [1, 1, 0], calls
    full = capture(model, batch, _plan([("hidden", 1), ("ffn", 0), ("logits", None)], head=True), grad=False)
    _close(got[("hidden", 1)], full[("hidden", 1)], "early-stopped hidden[1]")
    _close(got[("ffn", 0)], full[("ffn", 0)], "early-stopped ffn[0]")
    assert set(got) == {("hidden", 1), ("ffn", 0)}


def test_needs_head_overrides_stop_after_layer():
    model, batch = _model("llama"), _batch("llama")
    got = capture(model, batch, _plan([("hidden", 0), ("logits", None)], stop=0, head=True), grad=False)
    assert got.logits.shape == (2, S, V)


# --- attention taps ---------------------------------------------------------------------------------------


def test_attention_is_materialised_only_on_listed_blocks(monkeypatch):
    model, batch = _model("llama"), _batch("llama")
    fused = []
    real = attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward",
                        lambda module, *a, **k: fused.append(module.layer_idx) or real(module, *a, **k))
    got = capture(model, batch, _plan([("attn_probs", 1), ("hidden", 2)], eager=[1]), grad=False)
    assert fused == [0, 2]  # blocks 0 and 2 kept the fused kernel
    assert set(got) == {("attn_probs", 1), ("hidden", 2)}
    assert model.config._attn_implementation == "sdpa"


def test_no_taps_leaves_the_attention_implementation_alone(monkeypatch):
    model, batch = _model("gpt2"), _batch("gpt2")
    monkeypatch.setattr(attention, "_register", lambda: pytest.fail("switched implementation with no taps"))
    capture(model, batch, _plan([("hidden", 0)]), grad=False)


# --- hook hygiene -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [None, 1])
def test_hooks_are_removed_and_implementation_restored(stop):
    model, batch = _model("bert"), _batch("bert")
    before = _hook_state(model)
    capture(model, batch, _plan([("embeddings", None), ("query", 1), ("ffn", 1), ("attn_scores", 0)], stop=stop,
                                eager=[0]), grad=False)
    assert _hook_state(model) == before
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hooks_are_removed_when_the_forward_raises(name):
    model, batch = _model(name), _batch(name)
    blocks = adapter_for(model).layers(model)

    def boom(*_):
        raise ValueError("boom in block 1")

    before = _hook_state(model)
    handle = blocks[1].register_forward_hook(boom)
    try:
        with pytest.raises(ValueError, match="boom"):
            capture(model, batch, _plan([("hidden", 0), ("value", 2), ("attn_probs", 1)], stop=2, eager=[1]),
                    grad=False)
    finally:
        handle.remove()
    assert _hook_state(model) == before
    assert model.config._attn_implementation == "sdpa"
    assert attention._SESSION.get() is None


# --- gradients --------------------------------------------------------------------------------------------


def test_gradients_flow_with_grad_true_and_not_without():
    model, batch = _model("llama"), _batch("llama")
    plan = _plan([("hidden", 1), ("attn_probs", 0), ("query", 1), ("ffn", 0)], eager=[0], stop=1)
    got = capture(model, batch, plan, grad=True)
    loss = sum(t.float().pow(2).mean() for t in got.values())
    loss.backward()
    assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0  # through attn_probs[0]
    assert model.model.layers[1].mlp.down_proj.weight.grad.abs().sum() > 0  # through hidden[1]
    assert model.model.layers[2].self_attn.q_proj.weight.grad is None  # never ran
    frozen = capture(model, batch, plan, grad=False)
    assert not any(t.requires_grad for t in frozen.values())


# --- adapters and errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FACTORIES))
def test_adapter_accessors(name):
    model = _model(name)
    adapter = adapter_for(model)
    assert adapter.family == FAMILY[name]
    assert len(adapter.layers(model)) == L
    assert adapter.input_embeddings(model) is model.get_input_embeddings()
    assert adapter.output_embeddings(model).weight.shape == (V, H)
    assert any(p is adapter.input_embeddings(model).weight for p in adapter.embeddings_module(model).parameters())


def test_unsupported_models_raise_run_error():
    opt = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=4,
                                         ffn_dim=64, word_embed_proj_dim=H))
    with pytest.raises(RunError, match="model_type 'opt'.*supported: bert"):
        adapter_for(opt)
    with pytest.raises(RunError, match="not a Hugging Face"):
        capture(nn.Linear(2, 2), {"input_ids": torch.zeros(1, 2)}, _plan([("hidden", 0)]), grad=False)


@pytest.mark.parametrize("plan,message", [
    (_plan([("attn_probs", 1)], eager=[0]), r"attn_probs\[1\] needs eager attention on block 1"),
    (_plan([("hidden", 3)]), r"hidden\[3\] is out of range; the model has 3 blocks"),
    (_plan([("hidden", 2)], stop=1), "stop_after_layer 1 is before block 2"),
    (_plan([("logits", None)]), "needs the model's head but needs_head is false"),
    (_plan([("hiden", 0)]), "unknown signal kind 'hiden'"),
    (_plan([("hidden", None)]), "needs a block index"),
])
def test_inconsistent_plans_raise_run_error_naming_the_signal(plan, message):
    with pytest.raises(RunError, match=message):
        capture(_model("gpt2"), _batch("gpt2"), plan, grad=False)


def test_batch_without_input_ids_is_a_run_error():
    with pytest.raises(RunError, match="no 'input_ids'"):
        capture(_model("gpt2"), {"attention_mask": torch.ones(1, 2)}, _plan([("hidden", 0)]), grad=False)


def test_captured_is_a_read_only_mapping_with_clear_misses():
    got = Captured("t", {("hidden", 0): torch.zeros(1)})
    assert got[CapturePoint(kind="hidden", layer=0)] is got[("hidden", 0)]
    with pytest.raises(KeyError, match=r"model 't' captured no logits \(captured: hidden\[0\]\)"):
        got.logits
    with pytest.raises(TypeError):
        got.signals[("x", None)] = torch.zeros(1)


def _grads(model, checkpointing):
    torch.manual_seed(0)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    model.train()
    plan = _plan([("hidden", 1), ("attn_probs", 0), ("ffn", 1)], eager=[0], stop=1)
    got = capture(model, _batch("llama"), plan, grad=True)
    sum(t.pow(2).mean() for t in got.values()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_non_reentrant_activation_checkpointing_gives_the_same_gradients():
    # The recompute during backward must take the eager path again on tapped blocks (else torch rejects it).
    plain = _grads(_model("llama"), None)
    checkpointed = _grads(_model("llama"), False)
    assert plain.keys() == checkpointed.keys() and "model.layers.0.self_attn.k_proj.weight" in plain
    for name in plain:
        _close(checkpointed[name], plain[name], f"grad of {name}")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_reentrant_checkpointing_with_inner_signals_is_a_run_error():
    with pytest.raises(RunError, match="use_reentrant=True gives no gradient to attn_probs, ffn"):
        _grads(_model("llama"), True)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_pruned_teacher_keeps_its_planned_signals_and_frees_the_rest(name):
    """A teacher read only up to block 0 loses blocks 1.. and its untied head, and still gives the same signals."""
    full, pruned, batch = _model(name), _model(name), _batch(name)
    plan = _plan([("hidden", 0), ("attn_probs", 0)], stop=0, eager=[0])
    expected = capture(full, batch, plan, grad=False)
    freed = adapter_for(pruned).prune(pruned, 1, drop_head=True)
    per_block = sum(p.numel() for p in adapter_for(full).layers(full)[1].parameters())
    untied = full.get_output_embeddings() is not None and \
        full.get_output_embeddings().weight is not full.get_input_embeddings().weight
    head = sum(p.numel() for p in full.get_output_embeddings().parameters()) if untied else 0
    assert freed == per_block * (L - 1) + head
    assert len(adapter_for(pruned).layers(pruned)) == 1
    got = capture(pruned, batch, plan, grad=False)
    for key in expected.keys():
        torch.testing.assert_close(got[key], expected[key])
