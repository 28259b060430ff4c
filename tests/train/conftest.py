"""Small, fast training setups shared by the trainer and CLI tests."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from workbench.config import ModelConfig, MoEConfig

# A model small enough that a step takes milliseconds on 2 CPU cores.
MICRO_MODEL = ModelConfig(seq_len=32, d_model=32, n_layers=2, n_heads=2, dense_hidden=64,
                          moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32))
MICRO_FLAGS = ["--seq-len", "32", "--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--dense-hidden", "64",
               "--num-experts", "4", "--expert-hidden", "32", "--batch-size", "4", "--eval-windows", "2"]


def write_domain_folder(root: Path) -> Path:
    """Two small domains of generated text: folder/<domain>/<file>.txt."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "mixture", "expert", "router", "token"]
    for domain in ("words", "numbers"):
        (root / domain).mkdir(parents=True)
        for i in range(6):
            if domain == "words":
                text = " ".join(rng.choice(words) for _ in range(400))
            else:
                text = "\n".join(f"{rng.randint(0, 999)} + {rng.randint(0, 999)}" for _ in range(200))
            (root / domain / f"doc{i}.txt").write_text(text)
    return root


@pytest.fixture
def domain_folder(tmp_path) -> Path:
    return write_domain_folder(tmp_path / "corpus")
