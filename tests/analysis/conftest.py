"""The micro model config, a fixed batch of random tokens and a two-domain corpus."""

from __future__ import annotations

import random

import pytest
import torch

from tests.analysis.helpers import MICRO
from workbench.data import Corpus, Document, LMData


@pytest.fixture(scope="session")
def micro():
    return MICRO


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def micro_data():
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "mixture", "expert", "router", "token"]
    docs = [Document(f"words/{i}", "words", " ".join(rng.choice(words) for _ in range(300)), "test")
            for i in range(6)]
    docs += [Document(f"numbers/{i}", "numbers",
                      "\n".join(f"{rng.randint(0, 999)} + {rng.randint(0, 999)}" for _ in range(150)), "test")
             for i in range(6)]
    corpus = Corpus(["words", "numbers"], docs)
    return LMData(corpus, seq_len=32, batch_size=4, seed=0, val_fraction=0.3, val_windows_per_domain=2)
