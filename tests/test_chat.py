"""Chat data: rendering with the tokenizer's template, the assistant-token mask (prefix difference and generation
tags agree), targets and the loss mask reaching the KD terms, check-time diagnostics, plan-time token counts equal
to the runtime's, no packing, and a real `gkdc run` on chat data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clitools import ROOT, gkdc
from gkdlang.lower import check_source
from gkdlang.spec import DataSpec, LossTerm, SignalNode, Span
from runtime.errors import RunError

SPAN = Span(file="t.gkd", line=1, col=1, end_line=1, end_col=2)
WORDS = "the cat sat on a mat dog ran to park bird sang in tree good bad what topic write headline".split()
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
#: the same layout with the assistant span tagged (content and end-of-turn token, not the newline after it)
TAGGED = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
          "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
          "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "write headline the cat sat"}, {"role": "assistant", "content": "cat sat on mat"}],
    [{"role": "system", "content": "good bird"}, {"role": "user", "content": "what topic dog ran"},
     {"role": "assistant", "content": "park"}, {"role": "user", "content": "good"},
     {"role": "assistant", "content": "bird sang in tree"}],
]


def chat_tokenizer(folder: Path | None = None, template: str | None = CHATML):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + ["user", "assistant", "system"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>")
    if template is not None:
        fast.chat_template = template
    if folder is not None:
        fast.save_pretrained(folder)
    return fast


def model_folder(root: Path, template: str | None = CHATML) -> Path:
    """A tiny local GPT-2 folder (config + tokenizer with a chat template); built with init: random."""
    import transformers as tf

    folder = root / "chatmodel"
    tok = chat_tokenizer(folder, template)
    cfg = tf.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=0,
                        bos_token_id=2, eos_token_id=3)
    cfg.save_pretrained(folder)
    return folder


def write_chat(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def assistant_text(tok, rendered) -> list[str]:
    return [tok.convert_ids_to_tokens(i) for i, a in zip(rendered.ids, rendered.assistant) if a]


# ---------------------------------------------------------------- the mask


def test_prefix_difference_marks_assistant_content_and_end_token_only() -> None:
    from runtime.chat import conversation

    tok = chat_tokenizer()
    r = conversation(tok, CONVERSATIONS[1])
    assert assistant_text(tok, r) == ["park", "<|im_end|>", "bird", "sang", "in", "tree", "<|im_end|>"]
    assert r.ids == tok.apply_chat_template(CONVERSATIONS[1], tokenize=True, return_dict=False)


@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_prefix_difference_equals_the_generation_tag_mask(turns) -> None:
    from runtime.chat import conversation

    plain, tagged = conversation(chat_tokenizer(), turns), conversation(chat_tokenizer(template=TAGGED), turns)
    assert plain.ids == tagged.ids and plain.assistant == tagged.assistant and sum(plain.assistant) > 0


def test_a_template_that_rewrites_earlier_turns_is_refused() -> None:
    from runtime.chat import conversation

    # drops every turn but the last two once a conversation is long: turn 2's prefix is not the whole text's prefix
    rewriting = ("{% for message in messages[-2:] %}{{ message['role'] + ' ' + message['content'] + ' ' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'assistant ' }}{% endif %}")
    with pytest.raises(RunError, match="rewrites earlier text"):
        conversation(chat_tokenizer(template=rewriting), CONVERSATIONS[1])


def test_a_tokenizer_without_template_is_a_run_error(tmp_path: Path) -> None:
    from runtime.data import load_texts, tokenize

    data = DataSpec(name="c", format="chat", paths=[str(write_chat(tmp_path / "c.jsonl", [{"messages": t}
                                                                                          for t in CONVERSATIONS]))],
                    span=SPAN)
    with pytest.raises(RunError, match="needs a chat template"):
        tokenize(load_texts(data, tmp_path), data, chat_tokenizer(template=None), 32, causal=True)


# ---------------------------------------------------------------- targets and masks


def chat_batch(tmp_path: Path, assistant_only: bool = True, seq_len: int = 64):
    from runtime.data import load_texts, tokenize

    path = write_chat(tmp_path / "c.jsonl", [{"messages": t} for t in CONVERSATIONS])
    data = DataSpec(name="c", format="chat", paths=[str(path)], assistant_only=assistant_only, span=SPAN)
    tok = chat_tokenizer()
    td = tokenize(load_texts(data, tmp_path), data, tok, seq_len, causal=True)
    return tok, td.collate([0, 1], seed_for_step=0)


def test_targets_are_the_assistant_tokens_and_the_loss_mask_their_positions(tmp_path: Path) -> None:
    tok, batch = chat_batch(tmp_path)
    tokens = batch["tokens"]
    targets = [tok.convert_ids_to_tokens(int(t)) for t in tokens[1][tokens[1] != -100]]
    assert targets == ["park", "<|im_end|>", "bird", "sang", "in", "tree", "<|im_end|>"]
    assert torch.equal(batch["loss_mask"], tokens != -100)
    # the position before an assistant token predicts it: the input there is the header's newline-less last token
    first = int(batch["loss_mask"][0].nonzero()[0])
    assert tok.convert_ids_to_tokens(int(batch["input_ids"][0, first])) == "assistant"


def test_assistant_only_false_trains_every_next_token(tmp_path: Path) -> None:
    _, batch = chat_batch(tmp_path, assistant_only=False)
    assert "loss_mask" in batch
    assert torch.equal(batch["tokens"] != -100, batch["attention_mask"].bool() & batch["loss_mask"])
    assert int((batch["tokens"][1] != -100).sum()) == int(batch["attention_mask"][1].sum()) - 1


def test_truncation_keeps_rows_and_their_assistant_tokens_inside_seq_len(tmp_path: Path) -> None:
    _, batch = chat_batch(tmp_path, seq_len=12)
    assert batch["input_ids"].shape[1] == 12
    assert int(batch["loss_mask"][0].sum()) > 0 and int(batch["loss_mask"][1].sum()) == 0  # row 1's answers cut off


def test_the_loss_mask_reaches_kd_terms_on_logits_and_hidden_states(tmp_path: Path) -> None:
    """A KL term declared `where not pad` on chat data equals the KL over assistant positions only."""
    from runtime.lossgraph import LossGraph
    from runtime.losses import LOSSES

    _, batch = chat_batch(tmp_path)
    torch.manual_seed(0)
    b, s = batch["input_ids"].shape
    t_logits, s_logits = torch.randn(b, s, 30), torch.randn(b, s, 30)
    t_hidden, s_hidden = torch.randn(b, s, 8), torch.randn(b, s, 8)
    sig = lambda m, k: SignalNode(model=m, kind=k)  # noqa: E731
    terms = [LossTerm(id="kl", fn="kl", target=sig("t", "logits"), pred=sig("s", "logits"), mask="not pad",
                      options={"T": 2.0}, span=SPAN),
             LossTerm(id="mse", fn="mse", target=SignalNode(model="t", kind="hidden", layer=0),
                      pred=SignalNode(model="s", kind="hidden", layer=0), span=SPAN),
             LossTerm(id="ce", fn="ce", target=SignalNode(model=None, kind="tokens"), pred=sig("s", "logits"),
                      span=SPAN)]
    graph = LossGraph(terms, {})
    signals = {"t": {("logits", None): t_logits, ("hidden", 0): t_hidden},
               "s": {("logits", None): s_logits, ("hidden", 0): s_hidden}}
    values = {t.id: float(graph.term_value(t, signals, batch, 0.0)) for t in terms}
    keep = batch["loss_mask"]
    assert keep.sum() < batch["attention_mask"].sum() - 2  # the prompts are really left out
    expect_kl = LOSSES["kl"](t_logits, s_logits, mask=keep, T=2.0)
    expect_mse = LOSSES["mse"](t_hidden, s_hidden, mask=keep)
    assert values["kl"] == pytest.approx(float(expect_kl), rel=1e-5)
    assert values["mse"] == pytest.approx(float(expect_mse), rel=1e-5)
    wrong = LOSSES["kl"](t_logits, s_logits, mask=batch["attention_mask"].bool(), T=2.0)
    assert values["kl"] != pytest.approx(float(wrong), rel=1e-3)
    ce = torch.nn.functional.cross_entropy(s_logits.reshape(-1, 30), batch["tokens"].reshape(-1), ignore_index=-100)
    assert values["ce"] == pytest.approx(float(ce), rel=1e-5)


# ---------------------------------------------------------------- checking and planning


SPEC = """teacher t = hf("{folder}") {{ init: random, dtype: fp32 }}
student s = like(t) {{ layers: 1, dtype: fp32 }}
data conv = chat("{data}") {{ seq_len: 48{extra} }}
stage distill {{
  data: conv
  steps: 3
  batch: 2
  loss: kl(t.logits, s.logits, T: 2) + ce(tokens, s.logits)
}}
"""


def spec_text(folder: Path, data: Path, extra: str = "") -> str:
    return SPEC.format(folder=folder, data=data, extra=extra)


def test_missing_messages_is_a_located_bad_chat_data_error(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    data = write_chat(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[0]}, {"conversation": CONVERSATIONS[0]},
                                             {"messages": [{"role": "user", "content": "good"}]}])
    r = check_source(spec_text(folder, data), "c.gkd", base_dir=tmp_path)
    bad = [d for d in r.diagnostics if d.code == "bad-chat-data"]
    assert [d.message.split(" ", 3)[:3] for d in bad] == [["c.jsonl", "line", "2"], ["c.jsonl", "line", "3"]]
    assert "no 'messages' field (fields: conversation)" in bad[0].message
    assert "no assistant message" in bad[1].message
    assert bad[0].span.line == 3 and bad[0].span.col > 1


def test_a_tokenizer_folder_without_chat_template_is_a_check_error(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, template=None)
    data = write_chat(tmp_path / "c.jsonl", [{"messages": t} for t in CONVERSATIONS])
    r = check_source(spec_text(folder, data), "c.gkd", base_dir=tmp_path)
    (d,) = [d for d in r.diagnostics if d.code == "no-chat-template"]
    assert d.span.line == 3 and "'t'" in d.message and "stage 'distill'" in d.message


def test_chat_options_are_checked(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    data = write_chat(tmp_path / "c.jsonl", [{"messages": t} for t in CONVERSATIONS])
    r = check_source(spec_text(folder, data, ", text: body"), "c.gkd", base_dir=tmp_path)
    assert [d.code for d in r.diagnostics if d.severity == "error"] == ["unknown-option"]
    write_chat(data, [{"turns": t} for t in CONVERSATIONS])
    r = check_source(spec_text(folder, data, ", messages: turns, assistant_only: false"), "c.gkd", base_dir=tmp_path)
    assert r.ok, r.diagnostics
    assert r.spec.data["conv"].messages == "turns" and r.spec.data["conv"].assistant_only is False


def _plan(tmp_path: Path, extra: str = ""):
    from planner.build import build_plan

    folder = model_folder(tmp_path)
    data = write_chat(tmp_path / "c.jsonl", [{"messages": t} for t in CONVERSATIONS * 3])
    r = check_source(spec_text(folder, data, extra), "c.gkd", base_dir=tmp_path)
    assert r.ok, r.diagnostics
    return r.spec, data, build_plan(r.spec, gkdc_version="t", spec_path=str(tmp_path / "c.gkd"))


def test_plan_counts_the_tokens_the_runtime_makes_and_never_packs(tmp_path: Path) -> None:
    from runtime.chat import conversation

    spec, _, plan = _plan(tmp_path)
    tokens = plan.stages[0].tokens
    assert tokens.packed is False and "chat data" in tokens.why
    tok = chat_tokenizer()
    lengths = [len(conversation(tok, t).ids) for t in CONVERSATIONS * 3]
    assert tokens.real == pytest.approx(2 * sum(lengths) / len(lengths))


def test_packing_true_on_chat_data_is_refused(tmp_path: Path) -> None:
    from planner.build import build_plan

    folder = model_folder(tmp_path)
    data = write_chat(tmp_path / "c.jsonl", [{"messages": t} for t in CONVERSATIONS * 3])
    r = check_source(spec_text(folder, data, ", packing: true"), "c.gkd", base_dir=tmp_path)
    assert r.ok
    diags = build_plan(r.spec, gkdc_version="t", spec_path=str(tmp_path / "c.gkd")).diagnostics
    assert [d.code for d in diags if d.code == "packing-unsupported"] == ["packing-unsupported"]


def test_the_planner_renders_templates_as_transformers_does(tmp_path: Path) -> None:
    from gkdlang import chat

    tok = chat_tokenizer()
    for template in (CHATML, TAGGED):
        for turns in CONVERSATIONS:
            tok.chat_template = template
            assert chat.render(template, turns) == tok.apply_chat_template(turns, tokenize=False)
    smol = ROOT / "models" / "smollm2-135m"
    if (smol / "tokenizer.json").is_file():  # the real SmolLM2 template (adds a system turn when there is none)
        from transformers import AutoTokenizer

        from planner.tokens import _special_tokens

        real = AutoTokenizer.from_pretrained(smol)
        text = chat.render(chat.template_in(smol), CONVERSATIONS[0], special=_special_tokens(smol))
        assert text == real.apply_chat_template(CONVERSATIONS[0], tokenize=False)


# ---------------------------------------------------------------- end to end


def test_gkdc_runs_a_chat_spec(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    data = write_chat(tmp_path / "c.jsonl", [{"messages": t} for t in CONVERSATIONS * 4])
    spec = tmp_path / "c.gkd"
    spec.write_text(spec_text(folder, data))
    out = tmp_path / "run"
    r = gkdc("run", str(spec), "--out", str(out), "--no-progress", "--allow-path", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "total" in m]
    assert [m["step"] for m in steps] == [1, 2, 3] and all(torch.isfinite(torch.tensor(m["total"])) for m in steps)
    assert all(m["terms"]["ce[s.logits<-tokens]"] > 0 and m["terms"]["kl[s.logits<-t.logits]"] > 0 for m in steps)


def test_the_tutorials_chat_example_runs_and_scores(tmp_path: Path) -> None:
    """docs/tutorial.md's chat section, as written (shorter stages): `gkdc run examples/chat.gkd` trains on the
    example conversations and saves both models, which examples/real/chat_eval.py scores per assistant token."""
    import shlex
    import subprocess
    import sys

    from clitools import clean_env, doc_section_blocks

    commands = [c for b in doc_section_blocks("tutorial.md", "## 9. Chat data") for c in b.splitlines()]
    run = next(c for c in commands if c.startswith("gkdc run examples/chat.gkd"))
    out = tmp_path / "chat"
    r = gkdc(*shlex.split(run.replace("runs/chat", str(out)))[1:], "--max-steps", "3", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval  stage distill" in r.stdout + r.stderr
    score = next(c for c in commands if "chat_eval.py" in c)
    argv = shlex.split(score.replace("runs/chat", str(out)))[1:] + ["--limit", "16", "--json", str(tmp_path / "s.json")]
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    figures = json.loads((tmp_path / "s.json").read_text())
    assert len(figures) == 2 and all(0 < f["nll"] < 20 and f["se"] > 0 and f["conversations"] == 16
                                     for f in figures.values()), figures
    # assistant tokens only: each answer's words (one token each in the word-level vocabulary) and its [EOS]
    rows = [json.loads(x) for x in (ROOT / "examples/data/chat_heldout.jsonl").read_text().splitlines()[:16]]
    answers = sum(len(m["content"].split()) + 1 for row in rows for m in row["messages"] if m["role"] == "assistant")
    assert all(f["tokens"] == answers for f in figures.values()), (answers, figures)
