"""Build the embedded offline text benchmark ``wordnet20`` from WordNet 3.0.

Source: Debian's ``wordnet-base`` package (``apt-get install wordnet-base``), whose
``data.noun`` holds every noun synset with its lexicographer file number (``noun.animal``,
``noun.food``, ...) and its gloss.

Choices (all fixed, so the output is byte-for-byte reproducible):

* **Text** = the definition part of the gloss: everything before the first example quote
  (``; "...``), whitespace collapsed, trailing ``;`` removed. Lemmas are not included, so the
  class must be inferred from the definition alone.
* **Label** = the synset's lexicographer class.
* **Dedup**: texts are compared case-insensitively after whitespace collapsing. A text that
  occurs under two or more classes is dropped everywhere; exact repeats within one class are
  kept once (first occurrence in file order).
* **Classes**: the 20 largest noun classes after dedup, excluding ``noun.Tops`` (the handful of
  unique beginners). Every chosen class must have at least ``TRAIN + TEST`` texts.
* **Split**: per class, texts sorted, shuffled with ``random.Random(SEED)``; the first ``TEST``
  go to test, the next ``TRAIN`` to train.
* **Class order**: class names sorted alphabetically (label ids), then shuffled with
  ``random.Random(SEED)``; stored as a list of label ids.

Writes ``l2p_fast/continual/data/wordnet20.json.gz`` (gzip, mtime 0) and
``WORDNET_LICENSE.txt`` (the WordNet 3.0 licence from the package's copyright file).

Usage: ``python scripts/build_wordnet20.py [--wordnet-dir DIR] [--out-dir DIR]``
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import re
from collections import defaultdict
from pathlib import Path

SEED = 20
NUM_CLASSES = 20
TRAIN = 300
TEST = 100

# WordNet 3.0 lexicographer file numbers of the noun files (lexnames(5WN)); Debian does not
# ship the ``lexnames`` file itself, only its man page, so the fixed table lives here.
NOUN_LEXNAMES = {
    3: "noun.Tops",
    4: "noun.act",
    5: "noun.animal",
    6: "noun.artifact",
    7: "noun.attribute",
    8: "noun.body",
    9: "noun.cognition",
    10: "noun.communication",
    11: "noun.event",
    12: "noun.feeling",
    13: "noun.food",
    14: "noun.group",
    15: "noun.location",
    16: "noun.motive",
    17: "noun.object",
    18: "noun.person",
    19: "noun.phenomenon",
    20: "noun.plant",
    21: "noun.possession",
    22: "noun.process",
    23: "noun.quantity",
    24: "noun.relation",
    25: "noun.shape",
    26: "noun.state",
    27: "noun.substance",
    28: "noun.time",
}
EXCLUDED = {"noun.Tops"}

_EXAMPLE = re.compile(r';\s*"')
REPO_ROOT = Path(__file__).resolve().parent.parent


def definition(gloss: str) -> str:
    """The definition part of a gloss: text before the first ``; "example"``, cleaned."""
    text = _EXAMPLE.split(gloss, maxsplit=1)[0]
    text = " ".join(text.split())
    return text.rstrip(";").strip()


def read_noun_definitions(data_noun: Path) -> list[tuple[str, str]]:
    """(definition, lexicographer class name) for every noun synset, in file order."""
    out: list[tuple[str, str]] = []
    with data_noun.open(encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # licence header lines
                continue
            head, sep, gloss = line.partition(" | ")
            if not sep:
                continue
            lex_num = int(head.split()[1])
            text = definition(gloss)
            if text:
                out.append((text, NOUN_LEXNAMES[lex_num]))
    return out


def deduplicate(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Texts per class: drop texts seen under two classes, keep one copy of in-class repeats."""
    labels_of: dict[str, set[str]] = defaultdict(set)
    for text, label in pairs:
        labels_of[text.lower()].add(label)
    seen: set[str] = set()
    per_class: dict[str, list[str]] = defaultdict(list)
    for text, label in pairs:
        key = text.lower()
        if len(labels_of[key]) > 1 or key in seen:
            continue
        seen.add(key)
        per_class[label].append(text)
    return dict(per_class)


def build(wordnet_dir: Path) -> dict:
    """The benchmark as a JSON-serialisable dict."""
    per_class = deduplicate(read_noun_definitions(wordnet_dir / "data.noun"))
    candidates = [c for c in per_class if c not in EXCLUDED]
    candidates.sort(key=lambda c: (-len(per_class[c]), c))
    chosen = candidates[:NUM_CLASSES]
    smallest = min(len(per_class[c]) for c in chosen)
    if len(chosen) < NUM_CLASSES or smallest < TRAIN + TEST:
        raise RuntimeError(f"not enough data: {len(chosen)} classes, smallest has {smallest} texts")

    classes = sorted(chosen)
    class_order = list(range(len(classes)))
    random.Random(SEED).shuffle(class_order)

    train: list[list] = []
    test: list[list] = []
    for label, name in enumerate(classes):
        texts = sorted(per_class[name])
        random.Random(f"{SEED}:{name}").shuffle(texts)
        test += [[t, label] for t in texts[:TEST]]
        train += [[t, label] for t in texts[TEST : TEST + TRAIN]]

    return {
        "name": "wordnet20",
        "source": "WordNet 3.0 noun synsets (Debian package wordnet-base), see WORDNET_LICENSE.txt",
        "text": "gloss definition before the first example quote; label = lexicographer class",
        "seed": SEED,
        "classes": classes,
        "class_order": class_order,
        "available_per_class": {c: len(per_class[c]) for c in classes},
        "train": train,
        "test": test,
    }


def gzip_json(obj: dict) -> bytes:
    """Deterministic gzip of compact JSON (no file name, mtime 0)."""
    raw = json.dumps(obj, ensure_ascii=True, sort_keys=True, separators=(",", ":")).encode()
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    return buf.getvalue()


def wordnet_license(copyright_file: Path) -> str:
    """The ``License: WordNet3.0`` paragraph of a Debian copyright file, un-indented."""
    lines = copyright_file.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("License: WordNet"))
    body: list[str] = []
    for line in lines[start + 1 :]:
        if not line.startswith(" "):
            break
        body.append("" if line.strip() == "." else line[1:])
    header = "WordNet 3.0 licence (the wordnet20 data set is derived from WordNet 3.0)\n\n"
    return header + "\n".join(body).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--copyright", type=Path, default=Path("/usr/share/doc/wordnet-base/copyright"))
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "l2p_fast" / "continual" / "data")
    args = parser.parse_args()

    data = build(args.wordnet_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "wordnet20.json.gz"
    out.write_bytes(gzip_json(data))
    (args.out_dir / "WORDNET_LICENSE.txt").write_text(wordnet_license(args.copyright), encoding="utf-8")

    print(f"wrote {out} ({out.stat().st_size} bytes)")
    counts: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for _, y in data["train"]:
        counts[y][0] += 1
    for _, y in data["test"]:
        counts[y][1] += 1
    for y in data["class_order"]:
        name = data["classes"][y]
        print(
            f"  {y:2d} {name:22s} train {counts[y][0]:4d} test {counts[y][1]:4d} "
            f"(available {data['available_per_class'][name]})"
        )


if __name__ == "__main__":
    main()
