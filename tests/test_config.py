"""Invalid configs raise ValueError naming the field and the allowed values."""

from __future__ import annotations

import pytest

from workbench.config import ModelConfig, MoEConfig, preset
from workbench.train.config import TrainConfig


@pytest.mark.parametrize("kwargs, pattern", [
    ({"num_experts": 4, "top_k": 5}, r"top_k=5 .*between 1 and num_experts=4"),
    ({"top_k": 0}, r"top_k=0 .*integer >= 1"),
    ({"num_experts": 2.5}, r"num_experts=2.5 .*integer >= 1"),
    ({"num_experts": True}, r"num_experts=True .*integer >= 1"),
    ({"router": "magic"}, r"router='magic' .*allowed values are softmax_topk, switch, noisy_topk, sigmoid"),
    ({"dispatch": "fast"}, r"dispatch='fast' .*allowed values are loop, capacity, sorted"),
    ({"capacity_factor": 0.0}, r"capacity_factor=0.0 .*> 0, or None to never drop"),
    ({"capacity_factor": -1.5}, r"capacity_factor=-1.5 .*> 0, or None to never drop"),
    ({"capacity_factor": float("inf")}, r"capacity_factor=inf .*finite number > 0, or None to never drop"),
    ({"capacity_factor": float("nan")}, r"capacity_factor=nan .*finite"),
    ({"route_scale": float("inf")}, r"route_scale=inf .*finite"),
    ({"drop_policy": "random"}, r"drop_policy='random' .*position, score"),
    ({"router": "sigmoid", "num_experts": 8, "num_groups": 3}, r"num_groups=3 .*divide num_experts=8"),
    ({"router": "sigmoid", "num_groups": 4, "topk_groups": 5}, r"topk_groups=5 .*between 1 and num_groups=4"),
    ({"router": "sigmoid", "num_experts": 8, "top_k": 3, "num_groups": 4, "topk_groups": 1},
     r"top_k=3 .*2 experts in the topk_groups=1 kept groups"),
    ({"router": "softmax_topk", "num_groups": 2}, r"num_groups=2 .*router='sigmoid'"),
    ({"router": "noisy_topk", "bias_update_rate": 0.001}, r"router='noisy_topk' .*selection bias"),
    ({"aux_loss_weight": -0.1}, r"aux_loss_weight=-0.1 .*>= 0"),
])
def test_invalid_moe_config(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MoEConfig(**kwargs)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"d_model": 100, "n_heads": 3}, r"n_heads=3 .*divide d_model=100"),
    ({"d_model": 12, "n_heads": 4}, r"n_heads=4 .*even"),
    ({"d_model": 64.0}, r"d_model=64.0 .*integer >= 1"),
    ({"moe": 3}, r"moe=3 .*MoEConfig"),
    ({"first_dense_layers": 9, "n_layers": 4}, r"first_dense_layers=9 .*between 0 and n_layers=4"),
    ({"moe_every": 0}, r"moe_every=0 .*>= 1"),
    ({"rope_base": float("nan")}, r"rope_base=nan .*finite number > 0"),
    ({"rope_base": 0.0}, r"rope_base=0.0 .*finite number > 0"),
    ({"rope_base": float("inf")}, r"rope_base=inf .*finite number > 0"),
    ({"norm_eps": -1.0}, r"norm_eps=-1.0 .*finite number > 0"),
    ({"norm_eps": float("nan")}, r"norm_eps=nan .*finite number > 0"),
])
def test_invalid_model_config(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ModelConfig(**kwargs)


def test_configs_are_keyword_only_and_round_trip_through_dicts():
    with pytest.raises(TypeError):
        MoEConfig(8)  # type: ignore[misc]
    cfg = preset("tiny", router="sigmoid")
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again.moe, MoEConfig)
    with pytest.raises(ValueError, match="unknown ModelConfig fields \\['bogus'\\]"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="preset='huge' .*tiny, small"):
        preset("huge")


def test_moe_layer_placement():
    cfg = ModelConfig(n_layers=6, first_dense_layers=1, moe_every=2)
    assert cfg.moe_layers == [1, 3, 5]
    assert ModelConfig(n_layers=3, moe=None).moe_layers == []


@pytest.mark.parametrize("kwargs, pattern", [
    ({"lr": float("inf")}, r"lr=inf .*finite number > 0"),
    ({"lr": float("nan")}, r"lr=nan .*finite number > 0"),
    ({"weight_decay": float("inf")}, r"weight_decay=inf .*finite number >= 0"),
    ({"weight_decay": float("nan")}, r"weight_decay=nan .*finite number >= 0"),
    ({"seed": 99999999999999999999999}, r"seed=99999999999999999999999 .*from -9223372036854775808 to "),
    ({"seed": 1.5}, r"seed=1.5 .*integer"),
])
def test_invalid_train_config(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("flag, value, field", [
    ("--lr", "inf", "lr"), ("--weight-decay", "inf", "weight_decay"), ("--rope-base", "nan", "rope_base"),
    ("--rope-base", "0", "rope_base"), ("--norm-eps", "-1", "norm_eps"),
    ("--seed", "99999999999999999999999", "seed"),
])
def test_cli_refuses_non_finite_values_before_training(capsys, monkeypatch, tmp_path, flag, value, field):
    """Issue 27, items 14 and 16: refused up front with one line naming the field (they used to
    train and stop at step 1 with "loss is nan", naming no field, or a traceback for the seed)."""
    from workbench.cli import main

    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", flag, value, "--steps", "1", "--no-progress", "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and f"{field}=" in err, err
    assert not run.exists()
