"""runtime.vocab: GLMD frequencies, kept rows, nearest remap, student compression, save/load round trip."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, PreTrainedTokenizerFast

from gkdlang.spec import Span, VocabSpec
from runtime.errors import RunError
from runtime.models import save_student
from runtime.vocab import (
    VocabMap,
    build_vocab_map,
    choose_kept,
    compress_student,
    load_compressed,
    token_frequencies,
)

SPAN = Span(file="t.gkd", line=1, col=1, end_line=1, end_col=2)
WORDS = "the cat sat on a mat dog ran to park bird sang in tree good bad yes no red blue".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
V = len(SPECIALS) + len(WORDS)  # 25


def bert_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def vocab_spec(keep: int, protect: list[str] | None = None, remap: str = "nearest") -> VocabSpec:
    return VocabSpec(name="student", source="teacher", full_size=V, keep_fraction=None, keep_rows=keep,
                     rank_data="corpus", protect=protect or [], remap=remap, span=SPAN)


def wid(word: str) -> int:
    return len(SPECIALS) + WORDS.index(word)


# ---------------------------------------------------------------- ranking


def test_token_frequencies_match_a_counter() -> None:
    seqs = [[5, 6, 6, 7], torch.tensor([6, 24]), []]
    counts = token_frequencies(seqs, V)
    expected = Counter([5, 6, 6, 7, 6, 24])
    assert counts.tolist() == [expected.get(i, 0) for i in range(V)]
    with pytest.raises(RunError, match="token id 25 is outside the full vocabulary of 25"):
        token_frequencies([[25]], V)


def test_kept_rows_specials_then_protected_then_by_frequency() -> None:
    tok = bert_tokenizer()
    freqs = torch.zeros(V, dtype=torch.long)
    freqs[wid("cat")], freqs[wid("dog")], freqs[wid("mat")], freqs[wid("sat")] = 9, 5, 5, 1
    kept = choose_kept(vocab_spec(10, protect=["yes", "no"]), tok, freqs)
    specials = sorted(tok.all_special_ids)
    assert len(kept) == 10
    assert kept[:5] == specials and kept[5:7] == [wid("yes"), wid("no")]
    # then descending frequency; ties (dog, mat: 5) by lower id; then zero-count ids by id
    assert kept[7:] == [wid("cat"), wid("mat"), wid("dog")]  # mat (10) before dog (11)
    assert len(set(kept)) == 10


def test_kept_rows_cap_and_protect_overflow() -> None:
    tok = bert_tokenizer()
    freqs = torch.ones(V, dtype=torch.long)
    assert choose_kept(vocab_spec(128), tok, freqs) == list(range(V))  # keep_rows above full size: all, by id
    with pytest.raises(RunError, match=r"need 7 rows but keep is 6; raise keep or shorten protect"):
        choose_kept(vocab_spec(6, protect=["yes", "no"]), tok, freqs)


# ---------------------------------------------------------------- the map


def brute_force(emb: torch.Tensor, kept: list[int], rule: str) -> list[int]:
    out = []
    for old in range(emb.shape[0]):
        if old in kept:
            out.append(kept.index(old))
            continue
        best, best_score = None, None
        for new, k in enumerate(kept):
            a, b = emb[old].double(), emb[k].double()
            score = {"nearest": float(a @ b), "cosine": float(a @ b / (a.norm() * b.norm())),
                     "euclidean": -float((a - b).norm())}[rule]
            if best_score is None or score > best_score:
                best, best_score = new, score
        out.append(best)
    return out


@pytest.mark.parametrize("rule", ["nearest", "cosine", "euclidean"])
def test_remap_matches_brute_force(rule: str) -> None:
    torch.manual_seed(0)
    emb = torch.randn(V, 8) * torch.rand(V, 1) * 3  # varied norms, so dot product and cosine disagree
    kept = [0, 1, 2, 3, 4, 20, 7, 11, 13, 9]
    vmap = build_vocab_map(vocab_spec(10, remap=rule), kept, emb, unk_id=1)
    assert vmap.old_to_new.tolist() == brute_force(emb, kept, rule)
    assert vmap.kept_ids.tolist() == kept and vmap.size == 10 and vmap.full_size == V


def test_rules_differ_so_the_test_above_can_tell_them_apart() -> None:
    torch.manual_seed(0)
    emb = torch.randn(V, 8) * torch.rand(V, 1) * 3
    kept = [0, 1, 2, 3, 4, 20, 7, 11, 13, 9]
    maps = {r: brute_force(emb, kept, r) for r in ("nearest", "cosine", "euclidean")}
    assert maps["nearest"] != maps["cosine"] and maps["cosine"] != maps["euclidean"]


def test_unk_remap_and_its_errors() -> None:
    kept = [0, 1, 2, 3, 4, 5]
    vmap = build_vocab_map(vocab_spec(6, remap="unk"), kept, None, unk_id=1)
    assert vmap.old_to_new[6:].eq(1).all() and vmap.old_to_new[:6].tolist() == list(range(6))
    with pytest.raises(RunError, match="remap unk needs the tokenizer's unk token"):
        build_vocab_map(vocab_spec(6, remap="unk"), [0, 2, 3, 4, 5, 6], None, unk_id=1)
    with pytest.raises(RunError, match="remap nearest needs the word embeddings of 'teacher'"):
        build_vocab_map(vocab_spec(6), kept, None, unk_id=1)


def test_json_round_trip_and_corruption() -> None:
    vmap = build_vocab_map(vocab_spec(6, remap="unk"), [0, 1, 2, 3, 4, 5], None, unk_id=1)
    back = VocabMap.from_json(vmap.to_json())
    assert torch.equal(back.kept_ids, vmap.kept_ids) and torch.equal(back.old_to_new, vmap.old_to_new)
    broken = vmap.to_json().replace('"kept_ids": [0, 1', '"kept_ids": [1, 0')
    with pytest.raises(RunError, match="inconsistent"):
        VocabMap.from_json(broken)


def test_select_teacher_and_remap_inputs() -> None:
    vmap = build_vocab_map(vocab_spec(6, remap="unk"), [4, 0, 1, 2, 3, 9], None, unk_id=1)
    logits = torch.arange(2 * V, dtype=torch.float).view(2, V)
    assert vmap.select_teacher(logits)[1].tolist() == [V + 4, V, V + 1, V + 2, V + 3, V + 9]
    assert vmap.remap_inputs(torch.tensor([[9, 4, 17]])).tolist() == [[5, 0, 2]]


# ---------------------------------------------------------------- compressing a student


def tiny(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = {"vocab_size": V, "max_position_embeddings": 16, "pad_token_id": 0}
    if model_type == "gpt2":
        cfg = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=V)
        return AutoModelForCausalLM.from_config(cfg)
    if model_type == "llama":
        cfg = AutoConfig.for_model("llama", num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                   intermediate_size=64, tie_word_embeddings=False, **common)
        return AutoModelForCausalLM.from_config(cfg)
    cfg = AutoConfig.for_model("bert", num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                               intermediate_size=64, **common)
    net = AutoModelForMaskedLM.from_config(cfg)
    with torch.no_grad():  # a nonzero output bias, so dropping its columns is checked too
        net.cls.predictions.bias.normal_()
    return net


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert"])
def test_compressed_student_keeps_logits_of_kept_ids(model_type: str) -> None:
    net = tiny(model_type).eval()
    kept = [0, 1, 2, 3, 4, 12, 7, 20, 5, 9, 15, 6]
    vmap = build_vocab_map(vocab_spec(len(kept)), kept, net.get_input_embeddings().weight.detach(), unk_id=1)
    ids = torch.tensor([[2, 12, 7, 20, 9, 3], [2, 5, 15, 6, 3, 0]])  # kept tokens only
    with torch.no_grad():
        full = net(input_ids=ids).logits
    tied_before = net.get_input_embeddings().weight is net.get_output_embeddings().weight
    compress_student(net, vmap)
    assert net.config.vocab_size == len(kept)
    assert net.get_input_embeddings().weight.shape[0] == len(kept)
    assert (net.get_input_embeddings().weight is net.get_output_embeddings().weight) == tied_before
    with torch.no_grad():
        small = net(input_ids=vmap.remap_inputs(ids)).logits
    assert small.shape[-1] == len(kept)
    torch.testing.assert_close(small, vmap.select_teacher(full), rtol=1e-5, atol=1e-5)


def test_compress_refuses_a_student_of_another_size() -> None:
    net = tiny("gpt2")
    vmap = build_vocab_map(vocab_spec(6, remap="unk"), [0, 1, 2, 3, 4, 5], None, unk_id=1)
    compress_student(net, vmap)
    with pytest.raises(RunError, match="has 6 embedding rows but the vocabulary has 25"):
        compress_student(net, vmap)


def test_save_and_load_compressed_round_trip(tmp_path: Path) -> None:
    net = tiny("bert").eval()
    tok = bert_tokenizer()
    freqs = token_frequencies([tok("the cat sat on the mat")["input_ids"]], V)
    kept = choose_kept(vocab_spec(12, protect=["good", "bad"]), tok, freqs)
    vmap = build_vocab_map(vocab_spec(12), kept, net.get_input_embeddings().weight.detach(), unk_id=1)
    compress_student(net, vmap)
    save_student(net, tok, tmp_path / "out", vmap)
    assert (tmp_path / "out" / "gkdc_vocab.json").is_file()
    loaded, ctok = load_compressed(tmp_path / "out")
    enc = ctok(["the cat sat on a red mat"], return_tensors="pt")
    raw = tok(["the cat sat on a red mat"], return_tensors="pt")["input_ids"]
    assert torch.equal(enc["input_ids"], vmap.remap_inputs(raw))  # "a", "red" are removed: remapped
    assert int(enc["input_ids"].max()) < 12
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc).logits, net(**enc).logits)
    assert ctok.decode(ctok.encode("the cat")) == "[CLS] the cat [SEP]"
    with pytest.raises(RunError, match="no gkdc_vocab.json"):
        load_compressed(tmp_path)
