"""The MindSpore trainer follows the PyTorch trainer step for step (same weights, batches, AdamW,
schedule, clipping, loss-free bias), in PyNative and GRAPH mode, and writes the same metrics rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("mindspore", reason="MindSpore is not installed: pip install 'moe-workbench[mindspore]'")

from workbench.config import preset  # noqa: E402
from workbench.ms.train import MSTrainer  # noqa: E402
from workbench.train import TrainConfig, Trainer  # noqa: E402

STEPS = 3


def train_cfg(run_dir, **over):
    # warmup 1 of 3 steps: both the linear warmup and the cosine decay are taken
    return TrainConfig(**{"steps": STEPS, "batch_size": 2, "warmup_steps": 1, "eval_every": STEPS, "eval_windows": 1,
                          "progress": False, "device": "cpu", "run_dir": str(run_dir),
                          "max_bytes_per_domain": 20_000, **over})


@pytest.fixture(scope="module")
def model_cfg():
    # loss-free bias and sequence-wise loss on, so both the bias update and every loss term take part
    return preset("tiny", router="sigmoid", bias_update_rate=1e-2, seq_aux_loss_weight=1e-2,
                  z_loss_weight=1e-3).replace(n_layers=2, seq_len=32)


@pytest.fixture(scope="module")
def torch_run(model_cfg, tmp_path_factory):
    trainer = Trainer(model_cfg, train_cfg(tmp_path_factory.mktemp("torch")))
    return trainer, trainer.fit()


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_follows_the_pytorch_trainer(model_cfg, torch_run, mode, tmp_path):
    torch_trainer, torch_hist = torch_run
    trainer = MSTrainer(model_cfg, train_cfg(tmp_path), mode=mode)
    hist = trainer.fit()
    for key in ("loss", "lm_loss", "aux_loss", "raw/seq_aux_loss", "grad_norm", "val/loss"):
        for step, (a, b) in enumerate(zip(hist, torch_hist, strict=True)):
            if key in b:
                assert abs(a[key] - b[key]) <= 1e-4 * abs(b[key]), (key, step, a[key], b[key])
    assert [r["lr"] for r in hist] == pytest.approx([r["lr"] for r in torch_hist], rel=1e-12)
    # the same experts were chosen, so the same loads were counted
    assert [r["L1/tokens_per_expert"] for r in hist] == [r["L1/tokens_per_expert"] for r in torch_hist]
    # the loss-free bias moved, the same way
    for ms_router, layer in zip(trainer.model.moe_routers(), torch_trainer.model.moe_layers(), strict=True):
        ref = layer.router.bias.numpy()
        assert np.abs(ref).max() > 0
        np.testing.assert_allclose(ms_router.bias.asnumpy(), ref, atol=1e-7)
    if mode == "pynative":
        # the rows have the PyTorch trainer's keys (so workbench.viz reads both), in metrics.jsonl
        assert set(hist[-1]) == set(torch_hist[-1])
        rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))


def test_refuses_what_it_cannot_do(model_cfg, tmp_path):
    with pytest.raises(ValueError, match="^grad_accum=2 is invalid"):
        MSTrainer(model_cfg, train_cfg(tmp_path, grad_accum=2))
    with pytest.raises(ValueError, match="^mode='eager' is invalid: allowed values are pynative, graph"):
        MSTrainer(model_cfg, train_cfg(tmp_path), mode="eager")
