"""Hostile inputs for the fuzzers (tests/test_fuzz.py, bench/fuzz_long.py), drawn from a ``random.Random``.

Three kinds: a *valued* spec (a valid skeleton whose numbers, names, sizes, devices, paths and options are
replaced by boundary values: 0, negatives, 1e12, 1e400, huge clusters, empty or escaping paths, keywords glued
to names); a *mutated* shipped spec (tokens deleted, duplicated, swapped, replaced, truncated, bytes inserted);
and *token soup*. Each goes through ``check_source`` and, when it checks, through the planner.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "specs").glob("*.gkd"))
         + sorted((ROOT / "gkdlang" / "stdlib").glob("*.gkd"))]
_TOKEN = re.compile(r'\s+|#[^\n]*|"([^"\\\n]|\\.)*"|\d+(\.\d*)?([eE][-+]?\d+)?(%|[KMGT]i?B|[kKMBT])?|\w+|.', re.S)

INTS = ["2", "0", "-1", "1", "3", "7", "12", "13", "64", "513", "4096", "1e6", "1e12", "1e400", "2.5", "-0", "1k",
        "50%", "150%", "40GB"]
SIZES = ["40GB", "0GB", "-5GB", "1GB", "1e9GB", "512", "64GiB", "1e400GB"]
DEVICES = ["A100-40GB", "A100-80GB", "H100-80GB", "cpu", "A100-41GB", "x", ""]
TEACHERS = ["tiny-bert", "bert-base-uncased", "gpt2", "tiny-gpt2", "llama-2-70b", "roberta-base", "../models/bert-no-head",
            "../models/unsupported", "", "nope", "../data"]
PATHS = ["../data/corpus.txt", "../data/sst2.jsonl", "", " ", "/etc/passwd", "../../../../../../etc/passwd", "../data",
         ".", "*", "../data/*.txt", "a" * 300, "x\\y", "../data/../../..", "~/x"]
SIGNALS = ["logits", "hidden[1]", "hidden[-1]", "hidden[40]", "attn_probs[0]", "task_logits", "embeddings", "hiddens",
           "hidden[0:2]", "hidden[*]", "hidden[1.5]"]
LOSSES = ["kl", "mse", "cos", "ce", "jsd", "soft_ce", "kll", "kd"]
SOUP = ["teacher", "student", "assistant", "data", "vocab", "from", "method", "stage", "after", "cluster", "let",
        "use", "where", "not", "and", "true", "false", "bert", "small", "hf", "like", "kl", "mse", "project",
        "hidden", "logits", "attn_probs", "pairs", "uniform", "linear", "T", "map", "steps", "loss", "keep",
        "0", "1", "-1", "12", "2.5", "150k", "5%", "40GB", "1e400", "8 x A100-40GB", '"bert-base-uncased"',
        '"x\\q"', "'", "$", "{", "}", "(", ")", "[", "]", ",", ";", ":", "=", ".", "+", "-", "*", "/", "^",
        "\n", "# c\n", "\ufeff", "\x00", "teacherbert", "☃"]
NAMES = ["bert", "small", "tiny", "corpus", "hidden", "logits", "kl", "mse", "uniform", "pad", "steps", "loss", "data",
         "T", "foo", "glmd", "stage", "teacher", "x" * 200]


def tokens(text: str) -> list[str]:
    return [m.group() for m in _TOKEN.finditer(text)]


def valued(rng: random.Random) -> str:
    """A spec skeleton with boundary values in its slots (each slot keeps its first, sane value 85% of the time,
    so many inputs check and reach the planner)."""
    def pick(options):
        return options[0] if rng.random() < 0.85 else rng.choice(options)
    t_src = pick(TEACHERS)
    t_opts = pick(["", "{ head: classify(2) }", "{ head: none }", "{ cache: topk(k: %s) }" % pick(INTS),
                   '{ cache: topk(k: 8, path: "%s") }' % pick(PATHS), "{ dtype: %s }" % pick(["fp16", "fp8", "1"])])
    s_opts = ", ".join(f"{k}: {pick(INTS)}" for k in rng.sample(["layers", "hidden", "heads", "intermediate"],
                                                                  pick([1, 0, 2, 3])))
    d_opts = ", ".join(f"{k}: {pick(INTS)}" for k in rng.sample(["seq_len", "split"], rng.randint(0, 2)))
    fmt = pick(["text", "jsonl", "csv", "txt"])
    paths = ", ".join(f'"{pick(PATHS)}"' for _ in range(pick([1, 0, 2])))
    loss = " + ".join(f"{pick(['', '0.5 * ', '-1 * ', '1e400 * '])}{pick(LOSSES)}(t.{pick(SIGNALS)}, s.{pick(SIGNALS)}"
                      f"{pick(['', ', T: 2', ', T: 0', ', T: -1'])})" for _ in range(rng.randint(1, 3)))
    stage_opts = [f"data: {pick(['c', 'q'])}", f"{pick(['steps', 'epochs', 'bach'])}: {pick(INTS)}",
                  f"loss: {loss}"] + rng.sample([f"batch: {pick(INTS)}", f"micro_batch: {pick(INTS)}",
                                                 f"seq_len: {pick(INTS)}", f"save_every: {pick(INTS)}",
                                                 f"optimizer: adamw(lr: {pick(INTS)})"], pick([0, 1, 2, 3]))
    cluster = pick(["", "cluster { gpus: %s x %s }" % (pick(INTS[:8]), pick(DEVICES)),
                          "cluster { nodes: %s, gpus: %s x %s, cpu_memory: %s }" % (pick(INTS), pick(INTS[:8]),
                                                                                   pick(DEVICES), pick(SIZES)),
                          "cluster { gpus: 1 x A100-40GB, gpu_memory: %s, nvme: %s }" % (pick(SIZES), pick(SIZES))])
    vocab = pick(["", f"vocab s from t {{ keep: {pick(INTS)}, rank: frequency(c) }}"])
    glue = rng.random() < 0.1
    lines = [f'{"teacher" if not glue else "teacher"}{"" if glue else " "}t = hf("{t_src}") {t_opts}',
             f"student s = like(t) {{ {s_opts} }}", f"data c = {fmt}({paths}) {{ {d_opts} }}", vocab,
             f"stage x {{ {', '.join(stage_opts)} }}", cluster]
    return "\n".join(lines) + "\n"


def mutated(rng: random.Random) -> str:
    """A shipped spec or stdlib file with one to four token-level mutations, possibly truncated."""
    toks = tokens(rng.choice(TEXTS))
    for _ in range(rng.randint(1, 4)):
        solid = [i for i, t in enumerate(toks) if t.strip()]
        if not solid:
            break
        i = rng.choice(solid)
        op = rng.choice(["delete", "duplicate", "swap", "number", "name", "truncate", "insert", "glue"])
        if op == "delete":
            toks[i] = ""
        elif op == "duplicate":
            toks.insert(i, toks[i] + " ")
        elif op == "swap":
            j = rng.choice(solid)
            toks[i], toks[j] = toks[j], toks[i]
        elif op == "number":
            nums = [k for k in solid if toks[k][:1].isdigit()] or solid
            toks[rng.choice(nums)] = rng.choice(INTS)
        elif op == "name":
            names = [k for k in solid if re.fullmatch(r"[A-Za-z_]\w*", toks[k])] or solid
            toks[rng.choice(names)] = rng.choice(NAMES)
        elif op == "insert":
            toks.insert(i, rng.choice(SOUP))
        elif op == "glue" and i + 1 < len(toks) and not toks[i + 1].strip():
            toks[i + 1] = ""
        else:
            toks = toks[:i]
    return "".join(toks)


def soup(rng: random.Random) -> str:
    return " ".join(rng.choice(SOUP) for _ in range(rng.randint(0, 60)))


KINDS = {"valued": valued, "mutated": mutated, "soup": soup}


def draw(rng: random.Random) -> tuple[str, str]:
    kind = rng.choices(list(KINDS), weights=[4, 4, 2])[0]
    return kind, KINDS[kind](rng)


BASE = ROOT / "tests" / "cases" / "bad"  # "../data" and "../models" exist from here, as in the catalogue


def exercise(text: str) -> str:
    """Check (and plan, when it checks) one input; raise AssertionError on a broken property, let any other
    exception escape (a crash). Returns 'planned', 'plan-refused', 'checked' or 'refused'."""
    from gkdlang.diagnostics import CODES
    from gkdlang.lower import check_source

    result = check_source(text, "fuzz.gkd", base_dir=BASE)
    lines = max(len(text.splitlines()), 1) + 1
    for d in result.diagnostics:
        assert d.code in CODES, d
        assert d.span is not None, d
        if d.span.file == "fuzz.gkd":
            assert 1 <= d.span.line <= lines, d
    if not result.ok:
        assert any(d.severity == "error" for d in result.diagnostics)
        return "refused"
    from planner.build import PlanFailure, build_plan

    plan = build_plan(result.spec, gkdc_version="fuzz", spec_path=str(BASE / "fuzz.gkd"), plan_path="plan.json")
    if isinstance(plan, PlanFailure):
        assert plan.diagnostics and all(d.code in CODES and d.span is not None for d in plan.diagnostics)
        return "plan-refused"
    return "planned"
