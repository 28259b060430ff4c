"""The trainer: exact resume, checkpoint integrity, divergence, metrics and tracking."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.train.conftest import MICRO_MODEL
from workbench.config import MoEConfig
from workbench.train import CheckpointError, TrainConfig, Trainer, TrainingDiverged, load_checkpoint
from workbench.train.checkpoint import list_checkpoints
from workbench.train.trainer import lr_factor


def make_trainer(run_dir, data_dir, model=MICRO_MODEL, **kw) -> Trainer:
    cfg = TrainConfig(run_dir=str(run_dir), data=str(data_dir), batch_size=4, eval_windows=2, progress=False,
                      **{"steps": 12, "eval_every": 6, "checkpoint_every": 4, **kw})
    return Trainer(model, cfg)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_in_process_is_bitwise_exact(tmp_path, domain_folder):
    """Interrupt two steps after a checkpoint, resume, finish: the parameters, optimizer
    moments and history equal an uninterrupted run's exactly."""
    model = MICRO_MODEL.replace(moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, router="noisy_topk"))
    full = make_trainer(tmp_path / "full", domain_folder, model=model)
    full.fit()

    class Interrupt(Exception):
        pass

    def stop_at_step_6(trainer, row):
        if trainer.step == 6:
            raise Interrupt  # steps 5 and 6 are logged but not checkpointed: they are lost

    part = make_trainer(tmp_path / "part", domain_folder, model=model)
    with pytest.raises(Interrupt):
        part.fit(callback=stop_at_step_6)
    resumed = Trainer.resume(tmp_path / "part")
    assert resumed.step == 4
    resumed.fit()
    assert_same_state(full.model.state_dict(), resumed.model.state_dict())
    final_a = load_checkpoint(list_checkpoints(tmp_path / "full")[-1][1])
    final_b = load_checkpoint(list_checkpoints(tmp_path / "part")[-1][1])
    for k, state in final_a.optimizer_state["state"].items():
        for field, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(final_b.optimizer_state["state"][k][field]))
    # the resumed history is the uninterrupted one (the lost steps were dropped from metrics.jsonl)
    assert [r["step"] for r in resumed.history] == list(range(1, 13))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]


def test_loss_free_bias_is_updated_at_the_step_and_checkpointed(tmp_path, domain_folder):
    model = MICRO_MODEL.replace(moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, router="sigmoid",
                                              aux_loss_weight=0.0, bias_update_rate=0.01))
    trainer = make_trainer(tmp_path / "run", domain_folder, model=model, steps=4, checkpoint_every=4)
    trainer.fit()
    bias = trainer.model.moe_layers()[0].router.bias
    assert bias.abs().sum() > 0
    # each step moves every bias by at most the rate
    assert bias.abs().max() <= 4 * 0.01 + 1e-6
    saved = load_checkpoint(list_checkpoints(tmp_path / "run")[-1][1]).model_state
    assert torch.equal(saved["blocks.0.ffn.router.bias"], bias)
    assert "blocks.0.ffn.router.bias" not in dict(trainer.model.named_parameters())


def test_truncated_checkpoint_is_named_and_resume_falls_back(tmp_path, domain_folder):
    trainer = make_trainer(tmp_path / "run", domain_folder, steps=8, checkpoint_every=4, keep_checkpoints=2)
    trainer.fit()
    (step_a, older), (step_b, newest) = list_checkpoints(tmp_path / "run")
    assert (step_a, step_b) == (4, 8)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError, match=str(newest)):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match="falling back to the previous checkpoint"):
        resumed = Trainer.resume(tmp_path / "run")
    assert resumed.step == 4

    older.write_bytes(b"not a checkpoint")
    newest.unlink()
    with pytest.raises(CheckpointError, match="no readable checkpoint"):  # one error, no warning repeating it
        Trainer.resume(tmp_path / "run")


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, domain_folder):
    trainer = make_trainer(tmp_path / "run", domain_folder, steps=12, checkpoint_every=4)
    for _ in range(4):
        trainer.train_step()
    good = trainer.save()
    before = good.read_bytes()
    with torch.no_grad():
        trainer.model.embed.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=rf"loss is nan at step 5.*{good.name}"):
        trainer.fit()
    assert list_checkpoints(tmp_path / "run") == [(4, good)]
    assert good.read_bytes() == before


def test_refuses_to_overwrite_a_run_with_checkpoints(tmp_path, domain_folder):
    make_trainer(tmp_path / "run", domain_folder, steps=4).fit()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        make_trainer(tmp_path / "run", domain_folder, steps=4)


def test_metrics_history_jsonl_and_per_domain_validation(tmp_path, domain_folder):
    trainer = make_trainer(tmp_path / "run", domain_folder, steps=6, eval_every=3)
    history = trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows == json.loads(json.dumps(history))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lm_loss", "aux_loss", "raw/aux_loss", "raw/z_loss", "lr", "grad_norm", "max_vio",
                "L0/max_vio", "L1/load_fraction", "L0/dropped_fraction", "L1/aux_loss"):
        assert key in rows[-1], key
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["lm_loss"] + rows[-1]["aux_loss"])
    # weighted = weight x raw (the micro model keeps the default Switch weight 0.01, no z-loss)
    assert rows[-1]["weighted/aux_loss"] == pytest.approx(0.01 * rows[-1]["raw/aux_loss"])
    assert rows[-1]["weighted/z_loss"] == 0.0 and rows[-1]["raw/z_loss"] > 0
    assert "val/words" in rows[2] and "val/numbers" in rows[2] and "val/words" not in rows[3]
    ev = trainer.last_eval
    assert set(ev.domains) == {"numbers", "words"}
    # every validation token is routed to top_k experts in every MoE layer
    tokens_per_domain = ev.routing_matrix.sum(dim=2) / 2
    assert torch.all(tokens_per_domain == tokens_per_domain[0, 0])
    # finite and no worse than a little above uniform over bytes
    for v in ev.loss_per_domain.values():
        assert 0 < v < math.log(256) + 1


def test_warmup_then_cosine_schedule():
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, cfg) == pytest.approx(0.1)


def test_weight_decay_skips_norms_and_biases(tmp_path, domain_folder):
    trainer = make_trainer(tmp_path / "run", domain_folder, steps=1)
    decay, no_decay = trainer.optimizer.param_groups
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    assert any("experts.w1" in names[id(p)] for p in decay["params"])


def test_gradient_accumulation_matches_one_big_batch(tmp_path, domain_folder):
    """Two micro-batches of 4 give the same update as their concatenation (fp32, up to rounding)."""
    model = MICRO_MODEL.replace(moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, aux_loss_weight=0.0))
    acc = make_trainer(tmp_path / "acc", domain_folder, model=model, steps=1, grad_accum=2, grad_clip=0.0)
    one = make_trainer(tmp_path / "one", domain_folder, model=model, steps=1, grad_clip=0.0)
    b0, b1 = acc.data.get_batch(0), acc.data.get_batch(1)
    out = one.model(torch.cat([b0.tokens, b1.tokens]), torch.cat([b0.targets, b1.targets]))
    out.loss.backward()
    acc.train_step()
    # after one step the accumulated gradient (now applied) equals the big-batch gradient: compare
    # by applying the same optimizer step to `one`
    one.optimizer.step()
    for (n, a), b in zip(acc.model.named_parameters(), one.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_wandb_failure_never_stops_training(tmp_path, domain_folder, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def broken_init(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", broken_init)
    trainer = make_trainer(tmp_path / "run", domain_folder, steps=2)
    with pytest.warns(UserWarning, match="wandb failed .*no network.*training continues"):
        trainer.fit()
    assert trainer.step == 2
