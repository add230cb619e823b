"""Held-out assistant-token NLL of saved models on chat data, with standard errors (the chat demo's figure).

    PYTHONPATH=. .venv/bin/python examples/real/chat_eval.py runs/smollm2-chat/models/small \\
        runs/smollm2-chat-baseline/models/small models/smollm2-135m \\
        --data examples/real/data/chat_heldout.jsonl --limit 400

Each model reads the same conversations the way ``gkdc run`` feeds chat data (``runtime.data`` with a ``chat``
DataSpec: the model's own tokenizer and chat template, assistant tokens only). Gives, per model, the mean NLL per
assistant token, its standard error with conversations as clusters (tokens of one conversation are not
independent: SE of a ratio estimator, sum_i (s_i - m n_i)^2 / (N (N - 1) nbar^2)), the perplexity exp(NLL) with
exp(NLL -/+ 2 SE), and, against the first model, the paired per-conversation difference of NLL with its SE.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gkdlang.spec import DataSpec, Span  # noqa: E402
from runtime import data as D  # noqa: E402


def per_conversation(folder: Path, data: Path, limit: int, seq_len: int, batch: int) -> tuple[list[float], list[int]]:
    """(summed NLL, assistant tokens) per conversation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    spec = DataSpec(name="heldout", format="chat", paths=[str(data.resolve())], seq_len=seq_len,
                    span=Span(file="chat_eval", line=1, col=1, end_line=1, end_col=1))
    rows = D.load_texts(spec, data.parent)
    rows = rows.select(range(min(limit, len(rows))))
    td = D.tokenize(rows, spec, tok, seq_len, causal=True)
    sums, counts = [], []
    with torch.no_grad():
        for start in range(0, len(td), batch):
            b = td.collate(list(range(start, min(start + batch, len(td)))), seed_for_step=0)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), b["tokens"], ignore_index=-100,
                                                    reduction="none")
            keep = b["tokens"] != -100
            sums += (nll * keep).sum(1).tolist()
            counts += keep.sum(1).tolist()
    return sums, counts


def summary(sums: list[float], counts: list[int]) -> tuple[float, float]:
    """(NLL per token, its cluster standard error)."""
    n, total, tokens = len(sums), sum(sums), sum(counts)
    mean = total / tokens
    nbar = tokens / n
    var = sum((s - mean * c) ** 2 for s, c in zip(sums, counts)) / (n * (n - 1) * nbar**2)
    return mean, math.sqrt(var)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--limit", type=int, default=400)
    p.add_argument("--seq-len", type=int, default=192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    results = {}
    for folder in args.models:
        sums, counts = per_conversation(folder, args.data, args.limit, args.seq_len, args.batch)
        results[str(folder)] = (sums, counts)
    first_sums, first_counts = results[str(args.models[0])]
    # each held-out row may name its task (make_chat.py writes "headline" / "topic"): figures per task beside the pool
    rows = [json.loads(x) for x in args.data.read_text().splitlines() if x.strip()][:args.limit]
    tasks = [r.get("task") for r in rows] if len(rows) == len(first_sums) else []
    print(f"{'model':<48} {'conv':>5} {'tokens':>7} {'NLL/token':>16} {'perplexity (-2SE, +2SE)':>28} "
          f"{'NLL - first (paired)':>22} {'pooled - first (paired)':>24}")
    out = {}
    for name, (sums, counts) in results.items():
        mean, se = summary(sums, counts)
        # paired: per-conversation NLL per token of this model minus the first's, same conversations
        diffs = [s / c - fs / fc for s, c, fs, fc in zip(sums, counts, first_sums, first_counts) if c and fc]
        dmean = sum(diffs) / len(diffs)
        dse = math.sqrt(sum((d - dmean) ** 2 for d in diffs) / (len(diffs) * (len(diffs) - 1)))
        # pooled paired: the difference of the token-pooled NLLs, its SE with conversations as clusters (the same
        # ratio estimator as ``summary``, on each conversation's summed NLL difference)
        pmean, pse = summary([s - fs for s, fs in zip(sums, first_sums)], counts)
        ppl = f"{math.exp(mean):,.1f} ({math.exp(mean - 2 * se):,.1f}, {math.exp(mean + 2 * se):,.1f})"
        print(f"{name:<48} {len(sums):>5} {sum(counts):>7} {mean:>9.3f} ± {se:.3f} {ppl:>28} "
              f"{dmean:>+12.3f} ± {dse:.3f} {pmean:>+14.3f} ± {pse:.3f}")
        out[name] = {"conversations": len(sums), "tokens": sum(counts), "nll": mean, "se": se,
                     "perplexity": math.exp(mean), "paired_vs_first": dmean, "paired_se": dse,
                     "pooled_vs_first": pmean, "pooled_se": pse, "by_task": {}}
        for task in sorted({t for t in tasks if t is not None}):
            idx = [i for i, t in enumerate(tasks) if t == task]
            t_mean, t_se = summary([sums[i] for i in idx], [counts[i] for i in idx])
            d_mean, d_se = summary([sums[i] - first_sums[i] for i in idx], [counts[i] for i in idx])
            out[name]["by_task"][task] = {"conversations": len(idx), "tokens": sum(counts[i] for i in idx),
                                          "nll": t_mean, "se": t_se, "pooled_vs_first": d_mean, "pooled_se": d_se}
            print(f"{'  task ' + task:<48} {len(idx):>5} {sum(counts[i] for i in idx):>7} {t_mean:>9.3f} ± "
                  f"{t_se:.3f} {'':>28} {'':>22} {d_mean:>+14.3f} ± {d_se:.3f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
