"""planner.params: exact parameter counts against the real transformers classes, instantiated on the meta device."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gkdlang import catalog  # noqa: E402
from gkdlang.arch import arch_from_config, derive_config  # noqa: E402
from planner.params import ParamCounts, count_params, count_params_for  # noqa: E402

AUTO_CLASS = {
    "lm": {"bert": "AutoModelForMaskedLM", "roberta": "AutoModelForMaskedLM", "*": "AutoModelForCausalLM"},
    "classify": {"*": "AutoModelForSequenceClassification"},
    "none": {"*": "AutoModel"},
}
# GLM-10B is remote code; transformers' own "glm" model type is GLM-4, a different architecture
HF_BUILDABLE = [n for n in catalog.names() if arch_from_config(catalog.lookup(n)).family != "glm"]
TINY = [n for n in catalog.names() if n.startswith("tiny-")]


def _build(config: dict, head: str = "lm", num_labels: int = 2):
    """The transformers model for ``config`` on the meta device (no memory, no init cost)."""
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    if head == "classify":
        kwargs["num_labels"] = num_labels
    hf_config = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
    family = arch_from_config(config).family
    table = AUTO_CLASS[head]
    auto = getattr(transformers, table.get(family, table["*"]))
    with torch.device("meta"):
        return auto.from_config(hf_config)


def _unique_params(model) -> int:
    # parameters() yields each shared (tied) tensor once
    return sum(p.numel() for p in model.parameters())


def _largest_module(model) -> int:
    """DeepSpeed's ZeRO-3 'largest layer': most parameters held directly by one module."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def _num_layers(config: dict) -> int:
    return arch_from_config(config).num_layers


def _blocks(model, num_layers: int):
    """The ModuleList of transformer blocks (the only ModuleList of that length in these families)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers]
    assert len(lists) == 1, "expected exactly one block list"
    return lists[0]


@pytest.mark.parametrize("name", HF_BUILDABLE)
def test_total_matches_transformers_exactly(name):
    config = catalog.lookup(name)
    counts = count_params(arch_from_config(config))
    model = _build(config)
    assert counts.model_class == type(model).__name__
    assert counts.total == _unique_params(model)
    assert counts.largest_layer == _largest_module(model)
    assert counts.per_layer == _unique_params(_blocks(model, _num_layers(config))[0])


@pytest.mark.parametrize("name", HF_BUILDABLE)
def test_buckets_add_up(name):
    counts = count_params(arch_from_config(catalog.lookup(name)))
    assert counts.total == counts.embeddings + counts.layers + counts.final_norm + counts.head
    assert counts.layers == counts.per_layer * _num_layers(catalog.lookup(name))
    assert min(counts.embeddings, counts.per_layer, counts.final_norm, counts.head) >= 0


@pytest.mark.parametrize("name", [*TINY, "gpt2", "bert-base-uncased", "roberta-base", "opt-350m", "qwen2.5-0.5b"])
@pytest.mark.parametrize("head", ["classify", "none"])
def test_other_heads_match_transformers(name, head):
    config = catalog.lookup(name)
    counts = count_params_for(arch_from_config(config), head, num_labels=3)
    model = _build(config, head, num_labels=3)
    assert counts.model_class == type(model).__name__
    assert counts.total == _unique_params(model)
    assert counts.largest_layer == _largest_module(model)


@pytest.mark.parametrize(
    "name, changes",
    [
        ("tiny-llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
        ("tiny-bert", {"tie_word_embeddings": False}),
        ("tiny-roberta", {"tie_word_embeddings": False}),
        ("tiny-gpt2", {"n_inner": 96, "tie_word_embeddings": False}),
        ("tiny-opt", {"do_layer_norm_before": False, "enable_bias": False}),
        ("tiny-opt", {"word_embed_proj_dim": 64, "_remove_final_layer_norm": True}),
        ("tiny-qwen2", {"tie_word_embeddings": False, "head_dim": 32}),
        ("tiny-bloom", {"tie_word_embeddings": False}),
    ],
)
def test_config_switches_match_transformers(name, changes):
    """Biases, untied heads, OPT's optional projections and norms: every switch the formulas read."""
    config = {**catalog.lookup(name), **changes}
    counts = count_params(arch_from_config(config))
    model = _build(config)
    assert counts.total == _unique_params(model)
    assert counts.largest_layer == _largest_module(model)


def test_derived_student_counts_match_transformers():
    base = arch_from_config(catalog.lookup("smollm2-135m"))
    student = derive_config(base, {"layers": 6, "hidden": 256, "heads": 4, "kv_heads": 2})
    assert count_params(arch_from_config(student)).total == _unique_params(_build(student))


def test_known_published_sizes():
    """Sanity figures people quote for these models (exact values from their model cards / papers)."""
    assert count_params(arch_from_config(catalog.lookup("llama-2-7b"))).total == 6_738_415_616
    assert count_params(arch_from_config(catalog.lookup("gpt2"))).total == 124_439_808
    assert count_params(arch_from_config(catalog.lookup("bloom"))).total == 176_247_271_424


def test_tied_head_adds_nothing_untied_adds_vocab_by_hidden():
    arch = arch_from_config(catalog.lookup("qwen2.5-0.5b"))
    assert count_params(arch).head == 0
    untied = arch_from_config({**catalog.lookup("qwen2.5-0.5b"), "tie_word_embeddings": False})
    assert count_params(untied).head == 151936 * 896


def test_opt_350m_projects_embeddings():
    counts = count_params(arch_from_config(catalog.lookup("opt-350m")))
    # 512-wide token embeddings plus project_in; project_out and no final LayerNorm (post-LN model)
    assert counts.embeddings == 50272 * 512 + 2050 * 1024 + 512 * 1024
    assert counts.final_norm == 1024 * 512


class _GlmLayer(torch.nn.Module):
    """THUDM GLM's ParallelTransformerLayer, parameters only (mirrors GLM's mpu/transformer.py)."""

    def __init__(self, h: int) -> None:
        super().__init__()
        self.input_layernorm = torch.nn.LayerNorm(h)
        self.query_key_value = torch.nn.Linear(h, 3 * h)
        self.dense = torch.nn.Linear(h, h)
        self.post_attention_layernorm = torch.nn.LayerNorm(h)
        self.dense_h_to_4h = torch.nn.Linear(h, 4 * h)
        self.dense_4h_to_h = torch.nn.Linear(4 * h, h)


class _Glm(torch.nn.Module):
    """THUDM GLM's GLMModel with block position encoding; logits reuse word_embeddings.weight."""

    def __init__(self, vocab: int, h: int, layers: int, seq: int) -> None:
        super().__init__()
        self.word_embeddings = torch.nn.Embedding(vocab, h)
        self.position_embeddings = torch.nn.Embedding(seq + 1, h)
        self.block_position_embeddings = torch.nn.Embedding(seq + 1, h)
        self.layers = torch.nn.ModuleList(_GlmLayer(h) for _ in range(layers))
        self.final_layernorm = torch.nn.LayerNorm(h)


@pytest.mark.parametrize("name", ["glm-10b", "glm-10b-chinese"])
def test_glm_counts_match_its_structure(name):
    config = catalog.lookup(name)
    arch = arch_from_config(config)
    with torch.device("meta"):
        model = _Glm(arch.vocab_size, arch.hidden_size, arch.num_layers, config["max_sequence_length"])
    counts = count_params(arch)
    assert counts.total == _unique_params(model)
    assert counts.largest_layer == _largest_module(model)
    assert 9.8e9 < counts.total < 1.0e10  # "GLM-10B"


def test_glm_has_no_classification_class():
    with pytest.raises(ValueError, match="GLM"):
        count_params_for(arch_from_config(catalog.lookup("glm-10b")), "classify", 2)


def test_bad_head_arguments():
    arch = arch_from_config(catalog.lookup("tiny-gpt2"))
    with pytest.raises(ValueError, match="head must be"):
        count_params_for(arch, "pool")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_labels"):
        count_params_for(arch, "classify", 0)


def test_counts_are_frozen():
    counts = count_params(arch_from_config(catalog.lookup("tiny-gpt2")))
    assert isinstance(counts, ParamCounts)
    with pytest.raises(AttributeError):
        counts.total = 0  # type: ignore[misc]


def test_xlm_roberta_counts_as_roberta():
    config = {**catalog.lookup("tiny-roberta"), "model_type": "xlm-roberta", "architectures": ["XLMRobertaForMaskedLM"]}
    counts = count_params(arch_from_config(config))
    model = _build(config)
    assert counts.model_class == type(model).__name__ == "XLMRobertaForMaskedLM"
    assert counts.total == _unique_params(model)
