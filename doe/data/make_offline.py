"""Generate DoE's offline task suite: small text-classification tasks written for this project.

    python doe/data/make_offline.py            # (re)write doe/data/offline/<task>/{train,validation}.jsonl
    python doe/data/make_offline.py --check    # exit 1 if the shipped files differ from what this script makes

Nothing here is copied from a corpus. Every text is composed from the hand-written templates
and word lists below, with a fixed seed per task, so the files are reproducible byte for byte.
The tasks are deliberately different (what the text is about, how it is said, what it is for)
so that the FFN neurons a model needs for each can differ:

    offline_sentiment  negative / positive        reviews of films, books, products, restaurants, hotels, apps
    offline_topic      sports / technology / business / science   one- or two-sentence news items
    offline_question   statement / question       is the sentence asking something?
    offline_spam       ham / spam                 short personal messages vs. unsolicited offers and scams

None of them is solvable from one keyword: sentiment uses negation ("not bad at all"),
concessions ("Although the battery is weak, ...") and opposite-polarity distractor words;
topics share vocabulary ("record", "team", "launch", "deal"); a third of the questions carry
no "?", and statements are full of question words ("I wonder where ...", "Only then did ...");
ham messages say "free", "win", "call", "urgent" and share links, and some spam says none of it.

Within a task no two texts are equal after lower-casing and dropping punctuation, so the
validation split holds no exact (or punctuation-only) duplicate of a training text.
Each line is {"label": "<label name>", "text": "..."}; files are balanced per label and shuffled.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path
from typing import Callable

SEED = 20240418
OUT_DIR = Path(__file__).resolve().parent / "offline"


def _load_templates():
    """offline_templates.py next to this file (this script runs by path, outside any package)."""
    path = Path(__file__).resolve().with_name("offline_templates.py")
    spec = importlib.util.spec_from_file_location("_doe_offline_templates", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_T = _load_templates()


# ---------------------------------------------------------------------------------------------
# assembling the suite
# ---------------------------------------------------------------------------------------------

# name -> (labels in label-id order, generator, train per label, validation per label)
SUITE: dict[str, tuple[tuple[str, ...], Callable[[random.Random, str], str], int, int]] = {
    "offline_sentiment": (("negative", "positive"), _T.sentiment_text, 200, 80),
    "offline_topic": (("sports", "technology", "business", "science"), _T.topic_text, 120, 40),
    "offline_question": (("statement", "question"), _T.question_text, 200, 80),
    "offline_spam": (("ham", "spam"), _T.spam_text, 200, 80),
}


def build_task(name: str) -> dict[str, list[dict]]:
    """The rows of one offline task: {"train": [...], "validation": [...]}, balanced, shuffled."""
    labels, gen, n_train, n_eval = SUITE[name]
    rng = random.Random(f"{SEED}-{name}")
    seen: set[str] = set()
    train: list[dict] = []
    valid: list[dict] = []
    for label in labels:
        texts: list[str] = []
        attempts = 0
        while len(texts) < n_train + n_eval:
            attempts += 1
            if attempts > 200 * (n_train + n_eval):
                raise RuntimeError(f"{name}: could not make {n_train + n_eval} distinct '{label}' texts")
            text = gen(rng, label)
            key = _T.norm(text)
            if key in seen:
                continue
            seen.add(key)
            texts.append(text)
        train += [{"label": label, "text": t} for t in texts[:n_train]]
        valid += [{"label": label, "text": t} for t in texts[n_train:]]
    rng.shuffle(train)
    rng.shuffle(valid)
    return {"train": train, "validation": valid}


def _dump(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def write_suite(out_dir: Path = OUT_DIR, check: bool = False) -> list[str]:
    """Write (or, with check=True, compare) every task's files. Returns the paths that differ."""
    differ = []
    for name in SUITE:
        splits = build_task(name)
        for split, rows in splits.items():
            path = Path(out_dir) / name / f"{split}.jsonl"
            content = _dump(rows)
            if check:
                if not path.exists() or path.read_text(encoding="utf-8") != content:
                    differ.append(str(path))
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
    return differ


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="only compare with the files in --out")
    args = ap.parse_args(argv)
    differ = write_suite(args.out, check=args.check)
    if args.check:
        for p in differ:
            print(f"out of date: {p}", file=sys.stderr)
        return 1 if differ else 0
    for name, (labels, _, n_tr, n_ev) in SUITE.items():
        print(f"{name}: {len(labels)} labels {labels}, train {n_tr * len(labels)}, validation {n_ev * len(labels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
