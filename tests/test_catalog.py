"""gkdlang.catalog and gkdlang.models: catalog lookup, did-you-mean, local/catalog source resolution, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gkdlang import catalog
from gkdlang.arch import arch_from_config
from gkdlang.models import ResolvedSource, SourceError, resolve_source

REQUIRED = [
    "bert-base-uncased", "bert-large-uncased", "roberta-base", "roberta-large",
    "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl",
    "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "mistral-7b-v0.1",
    *(f"qwen2.5-{s}" for s in ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b")),
    *(f"opt-{s}" for s in ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")),
    "bloom", "bloom-560m", "glm-10b", "smollm2-135m", "tiny-bert", "tiny-gpt2", "tiny-llama",
]


# ---------------------------------------------------------------- catalog


def test_catalog_has_the_models_gkdc_documents():
    assert set(REQUIRED) <= set(catalog.names())
    assert catalog.names() == sorted(catalog.names())


@pytest.mark.parametrize("name", catalog.names())
def test_every_entry_reads_as_an_architecture(name):
    arch = arch_from_config(catalog.lookup(name))
    assert arch.hidden_size % arch.num_heads == 0
    assert arch.num_heads % arch.num_kv_heads == 0
    assert "_catalog" not in arch.config


@pytest.mark.parametrize(
    "name, key",
    [
        ("meta-llama/Llama-2-70b-hf", "llama-2-70b"),  # hub id
        ("META-LLAMA/llama-2-70B-HF", "llama-2-70b"),  # case-insensitive
        ("openai-community/gpt2", "gpt2"),
        ("gpt2-small", "gpt2"),  # alias
        ("  Qwen/Qwen2.5-7B ", "qwen2.5-7b"),  # surrounding blanks
        ("HuggingFaceTB/SmolLM2-135M", "smollm2-135m"),
        ("bigscience/bloom", "bloom"),
        ("THUDM/glm-10b", "glm-10b"),
    ],
)
def test_lookup_by_key_hub_id_or_alias(name, key):
    assert catalog.entry(name).key == key
    assert catalog.lookup(name) == catalog.lookup(key)


def test_lookup_unknown_is_none_and_copies_are_independent():
    assert catalog.lookup("no-such-model") is None
    first = catalog.lookup("gpt2")
    first["n_layer"] = 1
    assert catalog.lookup("gpt2")["n_layer"] == 12


def test_hub_ids_are_unique_and_tiny_configs_have_none():
    ids = [catalog.entry(n).hub_id for n in catalog.names() if catalog.entry(n).hub_id]
    assert len(ids) == len(set(ids))
    assert catalog.entry("tiny-llama").hub_id is None


@pytest.mark.parametrize(
    "typo, expected",
    [
        ("meta-llama/llama-2-7b", "meta-llama/Llama-2-7b-hf"),
        ("gpt-2", "gpt2"),
        ("qwen2.5-7", "qwen2.5-7b"),
        ("someorg/opt-125", "facebook/opt-125m"),  # wrong org: match on the model part
    ],
)
def test_suggest(typo, expected):
    assert catalog.suggest(typo) == expected


def test_suggest_nothing_close():
    assert catalog.suggest("xyzzy-plugh") is None


# ---------------------------------------------------------------- architecture facts from the catalog


def test_llama_2_70b_is_grouped_query():
    arch = arch_from_config(catalog.lookup("llama-2-70b"))
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (80, 64, 8, 128)
    assert arch.kv_dim == 1024 and arch.gated_ffn and not arch.tie_word_embeddings


def test_smollm2_is_tied_gqa_llama():
    arch = arch_from_config(catalog.lookup("smollm2-135m"))
    assert arch.family == "llama" and arch.tie_word_embeddings
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads) == (30, 576, 9, 3)
    assert (arch.intermediate_size, arch.vocab_size, arch.head_dim) == (1536, 49152, 64)


def test_bloom_176b_reads_n_embed_and_encoders_are_encoders():
    bloom = arch_from_config(catalog.lookup("bloom"))
    assert (bloom.hidden_size, bloom.num_layers, bloom.num_heads, bloom.intermediate_size) == (14336, 70, 112, 57344)
    assert arch_from_config(catalog.lookup("roberta-base")).is_encoder
    assert not arch_from_config(catalog.lookup("gpt2")).is_encoder


def test_glm_10b_facts():
    arch = arch_from_config(catalog.lookup("glm-10b"))
    assert (arch.family, arch.num_layers, arch.hidden_size, arch.num_heads) == ("glm", 48, 4096, 64)
    assert arch.intermediate_size == 4 * 4096 and arch.tie_word_embeddings


# ---------------------------------------------------------------- resolve_source


def _model_dir(root: Path, name: str = "student", config: object | None = None) -> Path:
    path = root / name
    path.mkdir(parents=True)
    cfg = catalog.lookup("tiny-llama") if config is None else config
    (path / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return path


def test_local_dir_relative_to_base_dir(tmp_path):
    path = _model_dir(tmp_path / "models")
    got = resolve_source("models/student", tmp_path)
    assert got == ResolvedSource(kind="local", config=catalog.lookup("tiny-llama"), path=str(path.resolve()))
    assert got.config["hidden_size"] == 64


def test_local_dir_absolute(tmp_path):
    path = _model_dir(tmp_path)
    got = resolve_source(str(path), Path("/nonexistent/base"))
    assert got.kind == "local" and got.path == str(path.resolve())


def test_local_dir_shadows_catalog(tmp_path):
    # a directory named like a catalog model is the user's model, not the catalog's
    _model_dir(tmp_path, "gpt2", {**catalog.lookup("tiny-gpt2")})
    got = resolve_source("gpt2", tmp_path)
    assert got.kind == "local" and got.config["n_layer"] == 2


def test_catalog_hit(tmp_path):
    got = resolve_source("meta-llama/Llama-2-7b-hf", tmp_path)
    assert (got.kind, got.path, got.key) == ("catalog", None, "llama-2-7b")
    assert got.config == catalog.lookup("llama-2-7b")


def test_unknown_hub_id_says_no_download_and_suggests(tmp_path):
    with pytest.raises(SourceError) as err:
        resolve_source("meta-llama/Llama-2-7b", tmp_path)
    assert "neither a local directory" in err.value.message
    assert "never downloads" in err.value.message
    assert err.value.hint == "did you mean 'meta-llama/Llama-2-7b-hf'?"


def test_unknown_without_suggestion_explains_how_to_get_it(tmp_path):
    with pytest.raises(SourceError) as err:
        resolve_source("acme/zzzz-qqqq", tmp_path)
    assert "download" in err.value.hint


def test_missing_relative_path_names_where_it_looked(tmp_path):
    with pytest.raises(SourceError) as err:
        resolve_source("./checkpoints/student", tmp_path)
    assert "does not exist" in err.value.message
    assert str(tmp_path.resolve()) in err.value.message


def test_dir_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="has no config.json"):
        resolve_source("empty", tmp_path)


@pytest.mark.parametrize(
    "text, match",
    [("{not json", "not valid JSON"), ("[1, 2]", "not an object"), ("", "not valid JSON")],
)
def test_invalid_config_json(tmp_path, text, match):
    _model_dir(tmp_path, config=text)
    with pytest.raises(SourceError, match=match):
        resolve_source("student", tmp_path)


def test_unreadable_config(tmp_path):
    path = _model_dir(tmp_path)
    (path / "config.json").unlink()
    (path / "config.json").mkdir()  # a directory where the file should be: reading it fails
    with pytest.raises(SourceError):
        resolve_source("student", tmp_path)


def test_empty_source(tmp_path):
    with pytest.raises(SourceError, match="empty"):
        resolve_source("   ", tmp_path)


@pytest.mark.parametrize("name", ["bloom", "gpt2", "opt-350m"])
def test_derived_student_overrides_reach_every_spelling(name):
    """BLOOM-176B spells width/heads n_embed/num_attention_heads: overrides must win over both spellings."""
    from gkdlang.arch import derive_config

    transformers = pytest.importorskip("transformers")
    cfg = derive_config(arch_from_config(catalog.lookup(name)), {"layers": 4, "hidden": 1024, "heads": 16})
    arch = arch_from_config(cfg)
    assert (arch.num_layers, arch.hidden_size, arch.num_heads) == (4, 1024, 16)
    hf = transformers.AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    assert (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads) == (4, 1024, 16)


def test_hint_examples_are_catalog_models():
    from gkdlang.models import _EXAMPLES

    assert all(catalog.lookup(name) is not None for name in _EXAMPLES)
