"""Run the fuzz target over its seed corpus and a few thousand mutations (fast)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
from fuzz_session import CORPUS, fuzz_one, load_corpus, mutate

SEEDS = load_corpus(CORPUS)


def test_corpus_has_the_expected_seeds() -> None:
    names = {p.name for p in CORPUS.iterdir()}
    assert {"transaction", "bdat", "auth_login", "smuggle_lf", "starttls_injection"} <= names


@pytest.mark.parametrize("seed", SEEDS, ids=[p.name for p in sorted(CORPUS.iterdir())])
def test_seed(seed: bytes) -> None:
    fuzz_one(seed)


def test_random_and_mutated_inputs() -> None:
    rng = random.Random(20240611)
    for i in range(2000):
        if i % 4 == 0:
            data = rng.randbytes(rng.randint(0, 300))
        else:
            data = mutate(rng.choice(SEEDS), rng, SEEDS)
        fuzz_one(data)
