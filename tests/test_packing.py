"""Packing: blocks, restarting position ids, targets, no attention across documents (GPT-2 and Llama honour it),
the planner's packing decision and tokens per step, and agreement between the plan and the runtime's batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from gkdlang.lower import check_source
from planner import tokens as T
from planner.build import build_plan
from runtime.adapters import capture
from runtime.data import IGNORE, ResumableSampler, load_texts, tokenize
from runtime.errors import RunError
from planner.plan import CapturePoint, ModelCapture
from tests.test_data import dspec, tokenizer


@pytest.fixture(autouse=True)
def _allow_example_data(monkeypatch):
    """These specs live in a temporary folder and read the repository's example data: allow it as the
    documented GKDC_ALLOW_PATHS does (docs/security.md); subprocesses inherit it."""
    monkeypatch.setenv("GKDC_ALLOW_PATHS", str(Path(__file__).resolve().parents[1] / "examples"))


ROOT = Path(__file__).resolve().parents[1]


def _docs(tmp_path: Path, lines: list[str]):
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return load_texts(dspec("text", ["c.txt"]), tmp_path)


# ---------------------------------------------------------------- blocks and targets


def test_packed_blocks_concatenate_documents_with_eos_and_restart_positions(tmp_path: Path) -> None:
    tok = tokenizer(bert=False)  # <unk> 0, <eos> 1, then the words
    ds = _docs(tmp_path, ["the cat sat", "on a mat", "dog ran to park", "bird sang"])
    td = tokenize(ds, dspec("text", ["c.txt"]), tok, 5, causal=True, packed=True)
    eos = tok.eos_token_id
    stream = [t for line in ["the cat sat", "on a mat", "dog ran to park", "bird sang"]
              for t in tok(line)["input_ids"] + [eos]]
    assert len(stream) == 16 and len(td) == 3  # 16 tokens -> 3 blocks of 5, the last token dropped
    assert [row["input_ids"] for row in td.examples(range(3))] == [stream[0:5], stream[5:10], stream[10:15]]
    # document starts (stream positions 0, 4, 8, 13) and block starts restart the positions
    assert [row["position_ids"] for row in td.examples(range(3))] == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    batch = td.collate([0, 1], seed_for_step=0)
    assert batch["attention_mask"].all() and batch["position_ids"].shape == (2, 5)
    tokens = batch["tokens"][0].tolist()
    # next-token targets inside a document, EOS predicted, nothing predicted across a boundary or past the block
    assert tokens == [stream[1], stream[2], stream[3], IGNORE, IGNORE]
    assert batch["tokens"][1].tolist() == [stream[6], stream[7], IGNORE, stream[9], IGNORE]


def test_packing_refuses_masked_lms_labels_and_tokenizers_without_eos(tmp_path: Path) -> None:
    ds = _docs(tmp_path, ["the cat sat", "on a mat"])
    with pytest.raises(RunError, match="causal models"):
        tokenize(ds, dspec("text", ["c.txt"]), tokenizer(bert=True), 4, causal=False, packed=True)
    tok = tokenizer(bert=False)
    tok.eos_token = None
    with pytest.raises(RunError, match="EOS"):
        tokenize(ds, dspec("text", ["c.txt"]), tok, 4, causal=True, packed=True)
    with pytest.raises(RunError, match="fewer than seq_len"):
        tokenize(ds, dspec("text", ["c.txt"]), tokenizer(bert=False), 64, causal=True, packed=True)


def test_packed_sampler_state_resumes_bit_for_bit(tmp_path: Path) -> None:
    ds = _docs(tmp_path, [" ".join(["the cat sat on a mat"] * (i % 3 + 1)) for i in range(40)])
    td = tokenize(ds, dspec("text", ["c.txt"]), tokenizer(bert=False), 8, causal=True, packed=True)
    run = ResumableSampler(len(td), 4, 2, 0, 1, seed=7)
    whole = [td.collate(b, 0)["input_ids"] for _, b in zip(range(12), run.micro_batches(0))]
    first = ResumableSampler(len(td), 4, 2, 0, 1, seed=7)
    it = first.micro_batches(0)
    head = [td.collate(next(it), 0)["input_ids"] for _ in range(6)]
    again = ResumableSampler(len(td), 4, 2, 0, 1, seed=7)
    again.load_state_dict(first.state_dict())
    tail = [td.collate(b, 0)["input_ids"] for _, b in zip(range(6), again.micro_batches())]
    assert all(torch.equal(a, b) for a, b in zip(whole, head + tail))


# ---------------------------------------------------------------- attention does not cross documents


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=40, n_positions=32,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).eval()


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=40,
                                        max_position_embeddings=32)).eval()


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_a_packed_block_gives_each_document_the_signals_it_gets_alone(make) -> None:
    model = make()
    a, b = [5, 6, 7, 8, 1], [9, 10, 11, 1]
    block = {"input_ids": torch.tensor([a + b]), "attention_mask": torch.ones(1, 9, dtype=torch.long),
             "position_ids": torch.tensor([list(range(5)) + list(range(4))])}
    points = [CapturePoint(kind="logits"), CapturePoint(kind="hidden", layer=1),
              CapturePoint(kind="attn_probs", layer=0)]
    plan = ModelCapture(model="m", points=points, stop_after_layer=None, needs_head=True, eager_attention_layers=[0])
    packed = capture(model, block, plan, grad=False).signals
    for doc, span in ((a, slice(0, 5)), (b, slice(5, 9))):
        alone = capture(model, {"input_ids": torch.tensor([doc]), "attention_mask": torch.ones(1, len(doc))},
                        plan, grad=False).signals
        for key in (("logits", None), ("hidden", 1)):
            torch.testing.assert_close(packed[key][:, span], alone[key], atol=1e-5, rtol=1e-5)
    probs = packed[("attn_probs", 0)][0]  # [heads, s, s]: no weight on another document's keys
    assert float(probs[:, 5:, :5].abs().max()) == 0.0
    # without the position ids (one long sequence) document b would see document a: the test can fail
    crossing = capture(model, {"input_ids": block["input_ids"], "attention_mask": block["attention_mask"]},
                       plan, grad=False).signals
    alone_b = capture(model, {"input_ids": torch.tensor([b]), "attention_mask": torch.ones(1, 4)}, plan,
                      grad=False).signals
    assert not torch.allclose(crossing[("logits", None)][:, 5:], alone_b[("logits", None)], atol=1e-3)


# ---------------------------------------------------------------- the planner's decision and figures


BODY = """
teacher t = hf("{model}")
student s = like(t) {{ layers: 2 }}
data corpus = text("{corpus}") {{ seq_len: 64 }}
data pairs = jsonl("p.jsonl") {{ label: label, seq_len: 64 }}
stage lm {{ data: corpus, steps: 10, batch: 16, loss: kl(t.logits, s.logits) }}
"""


def _spec(tmp_path: Path, model: str, stage_extra: str = ""):
    (tmp_path / "p.jsonl").write_text('{"text": "a", "label": 0}\n')
    body = BODY.format(model=model, corpus=str(ROOT / "examples" / "data" / "corpus.txt")) + stage_extra
    result = check_source(body, str(tmp_path / "t.gkd"), base_dir=tmp_path)
    assert result.spec is not None, [d.message for d in result.diagnostics]
    return result.spec


def test_packing_is_the_default_only_where_it_changes_nothing_but_the_waste(tmp_path: Path) -> None:
    spec = _spec(tmp_path, str(ROOT / "examples" / "tiny"),
                 "stage cls { data: corpus, steps: 1, loss: mse(t.cls[-1], s.cls[-1]) }\n"
                 "stage pooled { data: corpus, steps: 1, loss: mse(pool(t.hidden[-1], mean), pool(s.hidden[-1], mean)) }\n")
    lm, cls, pooled = spec.stages
    assert T.packing_choice(spec, lm).packed
    assert not T.packing_choice(spec, cls).packed and "cls), a per-sequence signal" in T.packing_choice(spec, cls).why
    assert not T.packing_choice(spec, pooled).packed and "pool" in T.packing_choice(spec, pooled).why
    bert = _spec(tmp_path, "bert-base-uncased")
    choice = T.packing_choice(bert, bert.stages[0])
    assert not choice.packed and "masked LM" in choice.why
    off = spec.model_copy(update={"data": {**spec.data, "corpus": spec.data["corpus"].model_copy(
        update={"packing": False})}})
    assert not T.packing_choice(off, off.stages[0]).packed
    labelled = spec.model_copy(update={"data": {**spec.data, "corpus": spec.data["corpus"].model_copy(
        update={"packing": True, "label": "y"})}})
    choice = T.packing_choice(labelled, labelled.stages[0])
    assert not choice.packed and choice.problem and "labels" in choice.problem


def test_packing_true_on_unpackable_data_is_a_plan_error(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "bert-base-uncased")
    spec = spec.model_copy(update={"source_hash": "ab", "data": {**spec.data, "corpus": spec.data[
        "corpus"].model_copy(update={"packing": True})}})
    failure = build_plan(spec, gkdc_version="t", spec_path=str(tmp_path / "t.gkd"))
    (diag,) = failure.diagnostics
    assert diag.code == "packing-unsupported" and diag.span == spec.data["corpus"].span


def test_expected_padded_width_is_the_expected_maximum() -> None:
    assert T.expected_max([3, 3, 3], 4) == 3
    assert T.expected_max([1, 2], 1) == 1.5
    assert T.expected_max([1, 2], 2) == pytest.approx(1 * 0.25 + 2 * 0.75)
    # brute force over every ordered draw of 3 from 4 values
    values = [1, 2, 2, 5]
    import itertools

    brute = sum(max(c) for c in itertools.product(values, repeat=3)) / 4**3
    assert T.expected_max(values, 3) == pytest.approx(brute)


def test_plan_tokens_per_step_match_the_runtime_batches(tmp_path: Path) -> None:
    """Packed and padded: the plan's real tokens per step equal what the runtime's batches hold on the shipped
    corpus (padded: the expectation over the data, checked against the mean over many sampled steps)."""
    from transformers import AutoTokenizer

    spec = _spec(tmp_path, str(ROOT / "examples" / "tiny")).model_copy(update={"source_hash": "ab"})
    tok = AutoTokenizer.from_pretrained(ROOT / "examples" / "tiny")
    data = spec.data["corpus"]
    texts = load_texts(data, ROOT)
    for packing in (True, False):
        s = spec.model_copy(update={"data": {**spec.data, "corpus": data.model_copy(update={"packing": packing})}})
        plan = build_plan(s, gkdc_version="t", spec_path=str(tmp_path / "t.gkd"))
        sp = plan.stages[0]
        assert sp.tokens.packed is packing
        td = tokenize(texts, data, tok, 64, causal=True, packed=packing)
        micro = sp.placement.micro_batch
        sampler = ResumableSampler(len(td), 16, micro, 0, 1, seed=3)
        steps = 60
        real = positions = 0
        it = sampler.micro_batches(0)
        for _ in range(steps * sampler.accum):
            batch = td.collate(next(it), 0)
            real += int(batch["attention_mask"].sum())
            positions += batch["attention_mask"].numel()
        if packing:
            assert real / steps == sp.tokens.real == 16 * 64 and positions / steps == sp.tokens.computed
        else:
            assert real / steps == pytest.approx(sp.tokens.real, rel=0.05)
            assert positions / steps == pytest.approx(sp.tokens.computed, rel=0.05)
            assert sp.tokens.real < 0.7 * 16 * 64  # the shipped corpus's lines are about half of seq_len
