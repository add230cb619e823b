"""A Llama-style teacher with random bf16 weights as a local HF folder (config, sharded safetensors, tokenizer).

Written one tensor at a time (the model is never built: shapes come from a meta-device instance), so a
3 GB teacher needs a few hundred MB of RAM to make. For bench/scale.py and bench/gpu_check.sh; write it to
/tmp or another git-ignored place, never into the repository.

Usage: ``python bench/make_teacher.py OUT_DIR [--layers 32] [--hidden 2048] [--intermediate 5632]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(2000)]


def tokenizer(directory: Path):
    """A whitespace word-level tokenizer over ``WORDS`` (ids below the model's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    fast.save_pretrained(directory)


def make(out: Path, *, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
         dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> int:
    """Write the folder; returns the weights' bytes."""
    import transformers as tf

    from runtime.weights import write_sharded

    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         intermediate_size=intermediate, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, bos_token_id=2,
                         eos_token_id=2, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    with torch.device("meta"):
        shapes = [(k, tuple(v.shape)) for k, v in tf.LlamaForCausalLM(cfg).state_dict().items()]
    gen = torch.Generator().manual_seed(seed)

    def values():
        for key, shape in shapes:
            if key.endswith("norm.weight"):
                yield key, torch.ones(shape, dtype=dtype)
            else:
                yield key, (torch.randn(shape, generator=gen) * 0.02).to(dtype)

    out.mkdir(parents=True, exist_ok=True)
    write_sharded(out, [(k, dtype, s) for k, s in shapes], values(), shard_bytes=1 << 30)
    cfg.save_pretrained(out)
    tokenizer(out)
    return sum(dtype.itemsize * torch.Size(s).numel() for _, s in shapes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    n = make(args.out, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
             kv_heads=args.kv_heads, vocab=args.vocab)
    print(json.dumps({"dir": str(args.out), "bytes": n}))


if __name__ == "__main__":
    main()
