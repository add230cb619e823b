"""Hub ids resolved from the local Hugging Face cache (gkdlang.models.hub_snapshot), the catalog as the fallback.

The cache is built in tmp_path in huggingface_hub's real layout (``models--org--name/{blobs,refs/main,snapshots/
<sha>/config.json -> ../../blobs/<hash>}``), and huggingface_hub's own scan (``scan_cache_dir``) must read it as a
valid cache, so the fixture cannot drift from what `hf download` writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from clitools import ROOT, clean_env
from gkdlang import catalog
from gkdlang.lower import check_source
from gkdlang.models import SourceError, cached_models, hub_snapshot, resolve_source

TINY_LLAMA = {"model_type": "llama", "num_hidden_layers": 3, "hidden_size": 96, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 192, "vocab_size": 500, "max_position_embeddings": 128,
              "tie_word_embeddings": False, "architectures": ["LlamaForCausalLM"]}


def cache_model(hub: Path, repo_id: str, files: dict[str, bytes], sha: str = "a" * 40, main: bool = True) -> Path:
    """One snapshot of ``repo_id`` in a hub cache folder, laid out as huggingface_hub writes it; its folder."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / sha
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(sha)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    folder = tmp_path / "hf" / "hub"
    folder.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    return folder


def test_a_cached_model_resolves_to_its_snapshot_config(hub, tmp_path):
    snap = cache_model(hub, "acme/tiny-llama", {"config.json": json.dumps(TINY_LLAMA).encode()})
    got = resolve_source("acme/tiny-llama", tmp_path)
    assert got.kind == "hub" and Path(got.path) == snap and got.config == TINY_LLAMA
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hub)  # huggingface_hub reads the fixture as a real cache
    assert not info.warnings and [r.repo_id for r in info.repos] == ["acme/tiny-llama"]
    assert cached_models() == ["acme/tiny-llama"]


def test_refs_main_picks_the_snapshot(hub, tmp_path):
    old = dict(TINY_LLAMA, num_hidden_layers=2)
    cache_model(hub, "acme/tiny-llama", {"config.json": json.dumps(old).encode()}, sha="b" * 40, main=False)
    new = cache_model(hub, "acme/tiny-llama", {"config.json": json.dumps(TINY_LLAMA).encode()}, sha="c" * 40)
    assert hub_snapshot("acme/tiny-llama") == new
    assert resolve_source("acme/tiny-llama", tmp_path).config["num_hidden_layers"] == 3


def test_the_cache_wins_over_the_catalog_which_stays_the_fallback(hub, tmp_path):
    assert resolve_source("openai-community/gpt2", tmp_path).kind == "catalog"  # nothing cached: the catalog
    real = {**catalog.lookup("gpt2"), "n_layer": 5}
    cache_model(hub, "openai-community/gpt2", {"config.json": json.dumps(real).encode()})
    got = resolve_source("openai-community/gpt2", tmp_path)
    assert got.kind == "hub" and got.config["n_layer"] == 5


def test_a_snapshot_without_config_or_a_folder_without_refs_is_not_cached(hub, tmp_path):
    cache_model(hub, "acme/no-config", {"tokenizer.json": b"{}"})
    cache_model(hub, "acme/no-refs", {"config.json": json.dumps(TINY_LLAMA).encode()}, main=False)
    assert hub_snapshot("acme/no-config") is None and hub_snapshot("acme/no-refs") is None
    with pytest.raises(SourceError, match="local Hugging Face cache"):
        resolve_source("acme/no-config", tmp_path)


def test_unknown_id_suggests_a_cached_model(hub, tmp_path):
    cache_model(hub, "acme/tiny-llama", {"config.json": json.dumps(TINY_LLAMA).encode()})
    with pytest.raises(SourceError) as err:
        resolve_source("acme/tiny-lama", tmp_path)
    assert "did you mean 'acme/tiny-llama' (in the local Hugging Face cache)?" == err.value.hint


SPEC = """teacher big = hf("acme/tiny-llama")
student small = like(big) { layers: 1 }
data corpus = text("data/corpus.txt") { seq_len: 64 }
stage s { data: corpus, steps: 2, batch: 2, loss: kl(big.logits, small.logits) }
cluster { gpus: 1 x cpu, cpu_memory: 8GB }
"""


def test_check_reads_the_cached_config_and_its_weights(hub):
    snap = cache_model(hub, "acme/tiny-llama", {"config.json": json.dumps(TINY_LLAMA).encode()})
    result = check_source(SPEC, "t.gkd", base_dir=ROOT / "tests" / "cases")
    assert result.ok, result.diagnostics
    big = result.spec.models["big"]
    assert big.source_kind == "hub" and big.source == "acme/tiny-llama" and big.arch.num_layers == 3
    # a cached teacher whose weights lack the head the spec reads is refused, as a local folder is
    weights = (ROOT / "tests" / "cases" / "models" / "bert-no-head" / "model.safetensors").read_bytes()
    config = (ROOT / "tests" / "cases" / "models" / "bert-no-head" / "config.json").read_bytes()
    shutil.rmtree(snap.parent.parent)
    cache_model(hub, "acme/tiny-llama", {"config.json": config, "model.safetensors": weights})
    bad = check_source(SPEC, "t.gkd", base_dir=ROOT / "tests" / "cases")
    assert "missing-weights" in {d.code for d in bad.diagnostics}


def test_runtime_loads_a_cached_model_from_its_snapshot(hub):
    from runtime.models import _where

    snap = cache_model(hub, "acme/tiny-llama", {"config.json": json.dumps(TINY_LLAMA).encode()})
    spec = check_source(SPEC, "t.gkd", base_dir=ROOT / "tests" / "cases").spec
    assert _where(spec.models["big"], ROOT) == (str(snap), True)


def test_cli_finds_the_cache_through_hf_home(tmp_path):
    """HF_HOME as a user sets it, in a fresh process (huggingface_hub reads it at import)."""
    import subprocess
    import sys

    cache_model(tmp_path / "home" / "hub", "acme/tiny-llama", {"config.json": json.dumps(TINY_LLAMA).encode()})
    spec = tmp_path / "s.gkd"
    spec.write_text(SPEC.replace("data/corpus.txt", "corpus.txt"))
    (tmp_path / "corpus.txt").write_text("hello world\n" * 10)
    env = {**clean_env(), "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "gkdc", "check", str(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    env["HF_HOME"] = str(tmp_path / "elsewhere")
    proc = subprocess.run([sys.executable, "-m", "gkdc", "check", str(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "[model-source]" in proc.stderr and "Traceback" not in proc.stderr
