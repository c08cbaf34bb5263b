"""A toy text corpus for tests that train: sentences from a tiny grammar, enough for a 512-token BPE."""

from __future__ import annotations

import random
from pathlib import Path

NOUNS = "model head layer token key query value norm rank gain loss seed".split()
VERBS = "drops keeps loses finds learns spreads collapses trains".split()


def write_corpus(root: Path, files: int, lines: int, steps: bool = False) -> Path:
    """`files` text files of `lines` sentences each (seeded: the same text every time); with
    `steps`, each sentence ends 'at step N', which gives the tokenizer numbers to learn."""
    rng = random.Random(0)
    for i in range(files):
        text = [
            f"the {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}"
            + (f" at step {rng.randint(0, 999)}" if steps else "")
            + "."
            for _ in range(lines)
        ]
        (root / f"doc{i:02d}.txt").write_text("\n".join(text))
    return root
