"""runtime.data: file formats and their errors, tokenising, the resumable sampler, collate and MLM masking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import runtime.data as data_mod
from gkdlang.spec import DataSpec, Span
from runtime.data import ResumableSampler, collate, load_texts, split_eval, step_seed, tokenize
from runtime.errors import RunError

SPAN = Span(file="t.gkd", line=1, col=1, end_line=1, end_col=2)
WORDS = "the cat sat on a mat dog ran to park bird sang in tree good bad".split()


def tokenizer(bert: bool = True) -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if bert else ["<unk>", "<eos>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + WORDS)}, unk_token=specials[0 + bert]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if not bert:
        wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
        wrapped.pad_token = "<eos>"
        return wrapped
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def dspec(fmt: str, paths: list[str], **kw) -> DataSpec:
    return DataSpec(name="corpus", format=fmt, paths=paths, span=SPAN, **kw)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# ---------------------------------------------------------------- formats


def test_text_is_one_example_per_nonempty_line(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("the cat sat\n\n  \non a mat\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("dog ran", encoding="utf-8")
    ds = load_texts(dspec("text", ["*.txt"]), tmp_path)
    assert ds["text"] == ["the cat sat", "on a mat", "dog ran"]


def test_jsonl_csv_parquet_give_the_same_rows(tmp_path: Path) -> None:
    rows = [{"s": "the cat", "t": "a mat", "y": "good"}, {"s": "dog ran", "t": "to park", "y": "bad"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.csv").write_text("s,t,y\nthe cat,a mat,good\ndog ran,to park,bad\n", encoding="utf-8")
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    for fmt in ("jsonl", "csv", "parquet", "json"):
        ds = load_texts(dspec(fmt, [f"d.{fmt}"], text="s", pair="t", label="y"), tmp_path)
        assert ds["s"] == ["the cat", "dog ran"] and ds["y"] == ["good", "bad"], fmt


# ---------------------------------------------------------------- file errors


def test_no_match_empty_file_and_blank_file(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"data 'corpus': no file matches 'missing/\*.txt'"):
        load_texts(dspec("text", ["missing/*.txt"]), tmp_path)
    (tmp_path / "e.txt").write_bytes(b"")
    with pytest.raises(RunError, match=r"e.txt is empty"):
        load_texts(dspec("text", ["e.txt"]), tmp_path)
    (tmp_path / "w.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(RunError, match=r"w.txt is empty \(only whitespace\)"):
        load_texts(dspec("text", ["w.txt"]), tmp_path)


@pytest.mark.parametrize("chunk", [1 << 20, 4, 5])
def test_non_utf8_names_file_and_byte_offset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    # small chunks split the two-byte 'é' and put the bad byte in a later chunk: the offset must still be exact
    monkeypatch.setattr(data_mod, "_CHUNK", chunk)
    body = "caf\u00e9 ok\n".encode() + b"bad \xff byte\n"
    (tmp_path / "bad.txt").write_bytes(body)
    with pytest.raises(RunError, match=r"bad.txt is not UTF-8 text: invalid byte at offset 13 "):
        load_texts(dspec("text", ["bad.txt"]), tmp_path)
    assert body[13] == 0xFF
    (tmp_path / "cut.txt").write_bytes("ok caf\u00e9".encode()[:-1])
    with pytest.raises(RunError, match=r"cut.txt is not UTF-8 text: invalid byte at offset 6 "):
        load_texts(dspec("text", ["cut.txt"]), tmp_path)


def test_bad_json_line_is_named(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "the cat"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(RunError, match=r"d.jsonl line 2 is not valid JSON"):
        load_texts(dspec("jsonl", ["d.jsonl"]), tmp_path)


@pytest.mark.parametrize("key", ["text", "pair", "label"])
def test_missing_column_names_the_columns_present(tmp_path: Path, key: str) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"sentence": "the cat", "other": "a mat", "y": 1}])
    cols = {"text": "sentence", "pair": "other", "label": "y"} | {key: "nope"}
    with pytest.raises(RunError, match=rf"column 'nope' \({key} = \"nope\"\).*columns present: sentence, other, y"):
        load_texts(dspec("jsonl", ["d.jsonl"], **cols), tmp_path)


def test_text_format_cannot_have_labels(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("the cat\n", encoding="utf-8")
    with pytest.raises(RunError, match="format text has one column"):
        load_texts(dspec("text", ["a.txt"], label="y"), tmp_path)


# ---------------------------------------------------------------- tokenising


def labelled(tmp_path: Path, labels: list) -> tuple:
    rows = [{"s": "the cat sat on a mat", "t": "dog ran", "y": y} for y in labels]
    write_jsonl(tmp_path / "d.jsonl", rows)
    spec = dspec("jsonl", ["d.jsonl"], text="s", pair="t", label="y")
    return load_texts(spec, tmp_path), spec


def test_pairs_truncation_and_string_labels(tmp_path: Path) -> None:
    ds, spec = labelled(tmp_path, ["pos", "neg", "pos", "mid"])
    td = tokenize(ds, spec, tokenizer(), 8, causal=False, num_labels=3)
    assert td.label_names == ("mid", "neg", "pos")
    assert td.dataset["label"] == [2, 1, 2, 0]
    row = td.dataset[0]
    assert len(row["input_ids"]) == 8 and row["input_ids"][0] == 2 and row["input_ids"].count(3) == 2
    assert row["token_type_ids"][-1] == 1 and row["special_mask"][0] == 1
    with pytest.raises(RunError, match=r"label column 'y' has 3 distinct labels \(mid, neg, pos\).*num_labels 2"):
        tokenize(ds, spec, tokenizer(), 8, causal=False, num_labels=2)
    with pytest.raises(RunError, match=r"seq_len 64 is longer than the model accepts \(32 positions\)"):
        tokenize(ds, spec, tokenizer(), 64, causal=False, max_positions=32)


def test_integer_labels_are_range_checked(tmp_path: Path) -> None:
    ds, spec = labelled(tmp_path, [0, 1, 4])
    with pytest.raises(RunError, match=r"label 4 in column 'y' is outside 0..2 \(num_labels 3\)"):
        tokenize(ds, spec, tokenizer(), 8, causal=False, num_labels=3)
    assert tokenize(ds, spec, tokenizer(), 8, causal=False).label_names is None


def test_split_eval_is_seeded_and_disjoint(tmp_path: Path) -> None:
    ds, spec = labelled(tmp_path, list(range(10)))
    td = tokenize(ds, spec, tokenizer(), 8, causal=False)
    train, held = split_eval(td, 0.3, seed=1)
    assert len(held) == 3 and len(train) == 7
    assert sorted(list(train.dataset["label"]) + list(held.dataset["label"])) == list(range(10))
    assert list(split_eval(td, 0.3, seed=1)[1].dataset["label"]) == list(held.dataset["label"])


# ---------------------------------------------------------------- sampler


def run_steps(sampler: ResumableSampler, start: int, steps: int) -> list[list[int]]:
    it = sampler.micro_batches(start)
    return [next(it) for _ in range(steps * sampler.accum)]


def test_sampler_is_deterministic_and_covers_each_epoch() -> None:
    a = ResumableSampler(50, 8, 2, 0, 1, seed=7)
    b = ResumableSampler(50, 8, 2, 0, 1, seed=7)
    assert a.accum == 4 and a.steps_per_epoch == 6
    assert run_steps(a, 0, 12) == run_steps(b, 0, 12)
    epoch0 = sum(run_steps(a, 0, 6), [])
    epoch1 = sum(run_steps(a, 6, 6), [])
    assert len(set(epoch0)) == 48 and len(set(epoch1)) == 48 and epoch0 != epoch1
    assert run_steps(ResumableSampler(50, 8, 2, 0, 1, seed=8), 0, 1) != run_steps(a, 0, 1)


def test_sampler_resume_equals_uninterrupted_run() -> None:
    full = run_steps(ResumableSampler(40, 4, 2, 0, 1, seed=3), 0, 25)
    first = ResumableSampler(40, 4, 2, 0, 1, seed=3)
    head = run_steps(first, 0, 13)
    state = first.state_dict()
    assert state["step"] == 13
    resumed = ResumableSampler(40, 4, 2, 0, 1, seed=3)
    resumed.load_state_dict(state)
    it = resumed.micro_batches()
    tail = [next(it) for _ in range(12 * resumed.accum)]
    assert head + tail == full


def test_sampler_ranks_are_disjoint_and_make_the_global_batch() -> None:
    world = 3
    ranks = [ResumableSampler(100, 12, 2, r, world, seed=5) for r in range(world)]
    single = ResumableSampler(100, 12, 4, 0, 1, seed=5)
    for step in range(10):
        parts = [sum(s.step_micro_batches(step), []) for s in ranks]
        assert all(len(p) == 4 for p in parts)
        assert not set(parts[0]) & set(parts[1]) and not set(parts[1]) & set(parts[2])
        assert sum(parts, []) == single.step_indices(step)  # same global batch for any world size


def test_sampler_errors() -> None:
    with pytest.raises(RunError, match="batch 10 is not a multiple of micro_batch 4 x 1 ranks"):
        ResumableSampler(100, 10, 4, 0, 1, seed=0)
    with pytest.raises(RunError, match="the data has 5 examples, fewer than one batch \\(8\\)"):
        ResumableSampler(5, 8, 8, 0, 1, seed=0)
    s = ResumableSampler(100, 8, 8, 0, 1, seed=0)
    with pytest.raises(RunError, match="checkpoint's sampler has n=99 but this run has 100"):
        s.load_state_dict({"n": 99, "global_batch": 8, "seed": 0, "step": 3})


# ---------------------------------------------------------------- collate


def test_causal_collate_targets() -> None:
    tok = tokenizer(bert=False)
    ex = [{"input_ids": tok("the cat sat")["input_ids"], "special_mask": [0, 0, 0]},
          {"input_ids": tok("dog")["input_ids"], "special_mask": [0]}]
    b = collate(ex, tok.pad_token_id, causal=True, mask_token_id=None, seed_for_step=0)
    assert b["input_ids"].tolist() == [[2, 3, 4], [8, 1, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["tokens"].tolist() == [[3, 4, -100], [-100, -100, -100]]
    assert b["special_mask"].tolist() == [[False] * 3, [False, True, True]]
    assert "labels" not in b and "token_type_ids" not in b


def mlm_batch(seed: int, n: int = 64) -> dict:
    tok = tokenizer()
    texts = ["the cat sat on a mat dog ran to park bird sang in tree"] * n
    enc = tok(texts, return_special_tokens_mask=True)
    ex = [{"input_ids": e, "special_mask": m, "label": 1} for e, m in zip(enc["input_ids"], enc["special_tokens_mask"])]
    return collate(ex, 0, causal=False, mask_token_id=4, seed_for_step=seed, vocab_size=len(tok)), ex


def test_mlm_masking_is_deterministic_per_step_seed() -> None:
    a, ex = mlm_batch(step_seed(1, 5, 0, 0))
    b, _ = mlm_batch(step_seed(1, 5, 0, 0))
    c, _ = mlm_batch(step_seed(1, 6, 0, 0))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["tokens"], b["tokens"])
    assert not torch.equal(a["tokens"], c["tokens"])
    original = torch.tensor([e["input_ids"] for e in ex])
    masked = a["tokens"] != -100
    assert torch.equal(a["tokens"][masked], original[masked])  # targets are the original ids
    assert not masked[a["special_mask"]].any()  # [CLS]/[SEP] never masked
    assert torch.equal(a["input_ids"][~masked], original[~masked])  # unmasked positions untouched
    # 15% of 14 ordinary tokens x 64 rows; then 80% [MASK] / 10% random / 10% kept
    total = int(masked.sum())
    assert 0.11 < total / (64 * 14) < 0.19
    as_mask = int((a["input_ids"][masked] == 4).sum())
    assert 0.7 < as_mask / total < 0.9
    assert a["labels"].tolist() == [1] * 64


def test_collate_with_vocab_map_gives_student_ids() -> None:
    from runtime.vocab import VocabMap

    tok = tokenizer(bert=False)
    old_to_new = torch.tensor([0, 1, 2, 2, 3] + [0] * (len(tok) - 5))
    vmap = VocabMap(name="s", remap="unk", kept_ids=torch.tensor([0, 1, 2, 4]), old_to_new=old_to_new)
    ex = [{"input_ids": [2, 3, 4], "special_mask": [0, 0, 0]}]
    b = collate(ex, 1, causal=True, mask_token_id=None, seed_for_step=0, vocab_map=vmap)
    assert b["input_ids"].tolist() == [[2, 3, 4]] and b["student_input_ids"].tolist() == [[2, 2, 3]]
    assert b["tokens"].tolist() == [[2, 3, -100]]


def test_tokenized_data_collates_by_index(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("the cat sat\ndog ran to park\n", encoding="utf-8")
    spec = dspec("text", ["a.txt"])
    td = tokenize(load_texts(spec, tmp_path), spec, tokenizer(), 16, causal=False)
    b = td.collate([1, 0], seed_for_step=3)
    assert b["input_ids"].shape == (2, 6) and b["attention_mask"][1].tolist() == [1] * 5 + [0]
    assert torch.equal(b["tokens"], td.collate([1, 0], seed_for_step=3)["tokens"])
