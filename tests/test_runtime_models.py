"""runtime.models: local/hub/catalog/derived loading, pickle refusal, copy init, heads, save_student."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from gkdlang.arch import arch_from_config, derive_config
from gkdlang.spec import HeadSpec, InitSpec, ModelSpec, Span
from runtime.errors import RunError
from runtime.models import build_model, load_tokenizer, save_student

SPAN = Span(file="t.gkd", line=1, col=1, end_line=1, end_col=2)
WORDS = "the cat sat on a mat dog ran to park bird sang in tree".split()


def make_tokenizer(bert: bool) -> PreTrainedTokenizerFast:
    """An offline WordLevel tokenizer: BERT-style specials (with pad) or GPT-style (eos only, no pad)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if bert else ["<unk>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1] if bert else "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        names = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
        return PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def gpt2_cfg(layers: int = 2) -> dict:
    return {"model_type": "gpt2", "n_layer": layers, "n_embd": 32, "n_head": 2, "n_positions": 32,
            "vocab_size": 2 + len(WORDS), "eos_token_id": 1, "bos_token_id": 1}


def llama_cfg(layers: int = 4) -> dict:
    return {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": 32, "num_attention_heads": 2,
            "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 32,
            "vocab_size": 2 + len(WORDS), "tie_word_embeddings": False, "eos_token_id": 1}


def bert_cfg(layers: int = 2) -> dict:
    return {"model_type": "bert", "num_hidden_layers": layers, "hidden_size": 32, "num_attention_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 32, "vocab_size": 5 + len(WORDS), "pad_token_id": 0}


def spec(name: str, cfg: dict, *, kind: str = "derived", source: str | None = None, role: str = "student",
         base: str | None = None, init: InitSpec = InitSpec(), head: HeadSpec = HeadSpec()) -> ModelSpec:
    return ModelSpec(name=name, role=role, source_kind=kind, source=source, base=base, arch=arch_from_config(cfg),
                     dtype="fp32", init=init, head=head, span=SPAN)


def save_hf(tmp: Path, name: str, cfg: dict, bert: bool = False) -> Path:
    """A real HF folder (safetensors + tokenizer) built from ``cfg`` with a fixed seed."""
    torch.manual_seed(0)
    model = build_model(spec(name, cfg), tmp, {})
    out = tmp / name
    model.save_pretrained(str(out))
    make_tokenizer(bert).save_pretrained(str(out))
    return out


def same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


# ---------------------------------------------------------------- local directories


def test_local_dir_loads_safetensors_as_frozen_teacher(tmp_path: Path) -> None:
    folder = save_hf(tmp_path, "teacher", gpt2_cfg())
    assert (folder / "model.safetensors").is_file()
    teacher = spec("teacher", gpt2_cfg(), kind="local", source="teacher", role="teacher")
    net = build_model(teacher, tmp_path, {})
    same(net, AutoModelForCausalLM.from_pretrained(str(folder)))
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    tok = load_tokenizer(teacher, {"teacher": teacher}, tmp_path)
    assert tok.pad_token == "<eos>" and tok.pad_token_id == 1  # no pad in the tokenizer: eos pads


def test_student_from_local_dir_is_trainable(tmp_path: Path) -> None:
    save_hf(tmp_path, "s", gpt2_cfg())
    net = build_model(spec("s", gpt2_cfg(), kind="local", source=str(tmp_path / "s")), Path("/nonexistent"), {})
    assert net.training and all(p.requires_grad for p in net.parameters())


def test_pickle_only_folder_is_refused_unless_allowed(tmp_path: Path) -> None:
    folder = save_hf(tmp_path, "p", gpt2_cfg())
    state = AutoModelForCausalLM.from_pretrained(str(folder)).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    model = spec("p", gpt2_cfg(), kind="local", source="p", role="teacher")
    with pytest.raises(RunError, match=r"only pickle weights \(pytorch_model.bin\).*--allow-pickle"):
        build_model(model, tmp_path, {})
    net = build_model(model, tmp_path, {}, allow_pickle=True)
    assert torch.equal(net.state_dict()["transformer.wte.weight"], state["transformer.wte.weight"])


def test_missing_local_dir_and_config_are_named(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"model 'x': local directory .*nope does not exist"):
        build_model(spec("x", gpt2_cfg(), kind="local", source="nope"), tmp_path, {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="has no config.json"):
        build_model(spec("x", gpt2_cfg(), kind="local", source="empty"), tmp_path, {})


# ---------------------------------------------------------------- hub and catalog


def test_hub_model_without_network_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = spec("t", gpt2_cfg(), kind="hub", source="gkdc-test/does-not-exist", role="teacher")
    fetch = r"could not fetch the weights of 'gkdc-test/does-not-exist'.*hf\(\"path/to/dir\"\)"
    with pytest.raises(RunError, match=fetch):
        build_model(model, tmp_path, {})
    with pytest.raises(RunError, match="could not fetch the tokenizer"):
        load_tokenizer(model, {"t": model}, tmp_path)
    # a catalog key is fetched by the catalog's hub id
    listed = spec("t", gpt2_cfg(), kind="catalog", source="gpt2", role="teacher")
    with pytest.raises(RunError, match="could not fetch the weights of 'openai-community/gpt2'"):
        build_model(listed, tmp_path, {})


def test_synthetic_catalog_entry_has_no_weights(tmp_path: Path) -> None:
    cfg = {**gpt2_cfg(), "_catalog": {"hub_id": None}}
    with pytest.raises(RunError, match="catalog entry 'tiny-gpt2' has no weights on any hub"):
        build_model(spec("t", cfg, kind="catalog", source="tiny-gpt2", role="teacher"), tmp_path, {})
    with pytest.raises(RunError, match="has no weights on any hub"):  # config without _catalog: the catalog says
        build_model(spec("t", gpt2_cfg(), kind="catalog", source="tiny-gpt2", role="teacher"), tmp_path, {})


def test_derived_model_uses_base_tokenizer(tmp_path: Path) -> None:
    save_hf(tmp_path, "teacher", bert_cfg(), bert=True)
    teacher = spec("teacher", bert_cfg(), kind="local", source="teacher", role="teacher")
    student = spec("student", bert_cfg(1), base="teacher")
    tok = load_tokenizer(student, {"teacher": teacher, "student": student}, tmp_path)
    assert tok.pad_token == "[PAD]" and tok("the cat")["input_ids"] == [2, 5, 6, 3]


# ---------------------------------------------------------------- derived models and copy init


def test_copy_init_copies_chosen_blocks_embeddings_norm_and_head(tmp_path: Path) -> None:
    torch.manual_seed(1)
    teacher = build_model(spec("teacher", llama_cfg(4), role="teacher"), tmp_path, {})
    base = arch_from_config(llama_cfg(4))
    student_cfg = derive_config(base, {"layers": 2})
    init = InitSpec(kind="copy", source="teacher", layers=[1, 3])
    student = build_model(spec("student", student_cfg, base="teacher", init=init), tmp_path, {"teacher": teacher})
    assert type(student).__name__ == "LlamaForCausalLM" and len(student.model.layers) == 2
    for s_i, t_i in ((0, 1), (1, 3)):
        same(student.model.layers[s_i], teacher.model.layers[t_i])
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert student.training and not teacher.training


def test_copy_init_default_first_layers_into_classifier(tmp_path: Path) -> None:
    torch.manual_seed(2)
    teacher = build_model(spec("teacher", bert_cfg(3), role="teacher"), tmp_path, {})
    init, head = InitSpec(kind="copy", source="teacher"), HeadSpec(kind="classify", num_labels=3)
    student = build_model(spec("s", bert_cfg(2), init=init, head=head), tmp_path, {"teacher": teacher})
    assert type(student).__name__ == "BertForSequenceClassification" and student.config.num_labels == 3
    for i in range(2):
        same(student.bert.encoder.layer[i], teacher.bert.encoder.layer[i])
    same(student.bert.embeddings, teacher.bert.embeddings)
    out = student(input_ids=torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]]))
    assert out.logits.shape == (2, 3)


def test_copy_init_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    teacher = build_model(spec("teacher", llama_cfg(2), role="teacher"), tmp_path, {})
    narrow = derive_config(arch_from_config(llama_cfg(2)), {"hidden": 16, "heads": 2, "intermediate": 32})
    init = InitSpec(kind="copy", source="teacher")
    with pytest.raises(RunError, match=r"tensor model\.embed_tokens\.weight has shape \(16, 16\).*\(16, 32\)"):
        build_model(spec("s", narrow, init=init), tmp_path, {"teacher": teacher})
    with pytest.raises(RunError, match="layer 5 does not exist in 'teacher'"):
        build_model(spec("s", llama_cfg(1), init=InitSpec(kind="copy", source="teacher", layers=[5])),
                    tmp_path, {"teacher": teacher})


def test_decoder_classify_head_gets_a_pad_id(tmp_path: Path) -> None:
    net = build_model(spec("s", gpt2_cfg(), head=HeadSpec(kind="classify", num_labels=2)), tmp_path, {})
    assert type(net).__name__ == "GPT2ForSequenceClassification" and net.config.pad_token_id == 1
    assert net(input_ids=torch.tensor([[3, 4, 1], [5, 1, 1]])).logits.shape == (2, 2)  # batch > 1 works


def test_bert_lm_head_is_masked_lm(tmp_path: Path) -> None:
    assert type(build_model(spec("b", bert_cfg()), tmp_path, {})).__name__ == "BertForMaskedLM"


# ---------------------------------------------------------------- saving


def test_saved_student_loads_with_plain_transformers(tmp_path: Path) -> None:
    torch.manual_seed(3)
    net = build_model(spec("s", llama_cfg(2)), tmp_path, {})
    save_student(net, make_tokenizer(False), tmp_path / "out", None)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files and "gkdc_vocab.json" not in files
    ids = [[3, 4, 5, 6]]
    expected = net(input_ids=torch.tensor(ids)).logits
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r})\n"
        f"AutoTokenizer.from_pretrained({str(tmp_path / 'out')!r})\n"
        "assert not any(k.split('.')[0] in ('gkdc', 'gkdlang', 'runtime', 'planner') for k in sys.modules)\n"
        f"print(json.dumps(m(input_ids=torch.tensor({ids})).logits.tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    got = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)
