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


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time (ns), to prove nothing changed."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``workbench ARGS`` in this process: (exit status, stdout, stderr). An exception that the
    command lets escape (what would print a traceback) fails the calling test."""
    from workbench.cli import main

    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The single line of ``err``; fails when there are more (or a traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    """The CLI turns wandb on (offline) unless WANDB_MODE says otherwise: keep tests off it."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
