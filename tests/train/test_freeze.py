"""Freezing (``workbench.train.freeze``): the groups by name, ESFT's selection by hand, and frozen
parameters bit-equal after optimizer steps (weight decay on) while the trained ones move."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.train.conftest import MICRO_MODEL
from workbench.config import ModelConfig
from workbench.model import MoELM
from workbench.train import TrainConfig, Trainer
from workbench.train.freeze import esft_select, freeze, parameter_group, routing_shares, trainable_parameters

# --- ESFT's selection, by hand ---------------------------------------------------------------

# shares: layer 0 .50 .30 .15 .05; layer 1 .10 .10 .40 .40 (a tie at the top)
COUNTS = torch.tensor([[50, 30, 15, 5], [10, 10, 40, 40]])


@pytest.mark.parametrize("rule, expected", [
    ({"threshold": 0.2}, [[0, 1], [2, 3]]),
    ({"threshold": 0.3}, [[0], [2, 3]]),  # strictly above: .30 is not above .3
    ({"threshold": 0.0}, [[0, 1, 2, 3], [0, 1, 2, 3]]),
    ({"threshold": 1.0}, [[], []]),
    ({"top_n": 1}, [[0], [2]]),  # the tie .40 / .40 goes to the lower index
    ({"top_n": 3}, [[0, 1, 2], [0, 2, 3]]),  # .10 / .10: expert 0 before expert 1
    ({"top_p": 0.8}, [[0, 1], [2, 3]]),  # .5 + .3 = .8 reaches .8 (float .8000000000000002 or not)
    ({"top_p": 0.81}, [[0, 1, 2], [0, 2, 3]]),
    ({"top_p": 1.0}, [[0, 1, 2, 3], [0, 1, 2, 3]]),
    ({"top_p": 0.5}, [[0], [2, 3]]),  # .5 alone reaches .5; .4 does not
])
def test_esft_selection_matches_the_hand_computed_case(rule, expected):
    assert esft_select(COUNTS, **rule) == expected


def test_routing_shares_are_each_layers_fractions():
    shares = routing_shares(COUNTS)
    assert shares[0] == pytest.approx([0.5, 0.3, 0.15, 0.05]) and shares[1] == pytest.approx([0.1, 0.1, 0.4, 0.4])


@pytest.mark.parametrize("rule, needle", [
    ({"threshold": 1.5}, "esft_threshold=1.5 is invalid: must be a fraction in [0, 1]"),
    ({"threshold": -0.1}, "esft_threshold=-0.1 is invalid"),
    ({"top_p": 0.0}, "esft_top_p=0.0 is invalid: must be a fraction in (0, 1]"),
    ({"top_p": 1.2}, "esft_top_p=1.2 is invalid"),
    ({"top_n": 0}, "esft_top_n=0 is invalid: must be an integer from 1 to the number of experts per layer, 4"),
    ({"top_n": 5}, "esft_top_n=5 is invalid"),
    ({}, "needs exactly one rule"),
    ({"top_n": 1, "threshold": 0.1}, "given: esft_threshold, esft_top_n"),
])
def test_esft_refuses_bad_rules_naming_the_field(rule, needle):
    with pytest.raises(ValueError) as err:
        esft_select(COUNTS, **rule)
    assert needle in str(err.value)


def test_esft_refuses_a_layer_that_routed_nothing():
    with pytest.raises(ValueError, match=r"MoE layer\(s\) \[1\] routed no token"):
        esft_select(torch.tensor([[1, 2], [0, 0]]), top_n=1)


@pytest.mark.parametrize("kw, needle", [
    ({"trainable": "everything"}, "trainable='everything' is invalid: allowed values are all, non_router, non_moe"),
    ({"trainable": "esft", "init_from": "x", "esft_domain": "code", "esft_threshold": 1.5},
     "esft_threshold=1.5 is invalid: must be a fraction in [0, 1]"),
    ({"trainable": "esft", "init_from": "x", "esft_domain": "code", "esft_top_p": -1.0}, "esft_top_p=-1.0"),
    ({"trainable": "esft", "init_from": "x", "esft_domain": "code"}, "exactly one rule"),
    ({"trainable": "esft", "esft_domain": "code", "esft_top_n": 2}, "init_from=None is invalid"),
    ({"trainable": "esft", "init_from": "x", "esft_top_n": 2}, "esft_domain=None is invalid"),
    ({"esft_top_n": 2}, "esft_top_n=2 is invalid: applies only with trainable=esft"),
    ({"trainable": "experts", "esft_domain": "code"}, "esft_domain='code' is invalid: applies only"),
])
def test_train_config_refuses_bad_freezing_fields(kw, needle):
    with pytest.raises(ValueError) as err:
        TrainConfig(**kw)
    assert needle in str(err.value)


# --- the groups, by parameter name -----------------------------------------------------------

# one dense block first, a shared expert with its gate, the cosine router (its extra parameters)
RICH = dataclasses.replace(MICRO_MODEL, first_dense_layers=1, n_layers=2, moe=dataclasses.replace(
    MICRO_MODEL.moe, router="cosine", num_shared_experts=1, shared_expert_gate=True))


def test_every_group_is_the_parameters_its_name_says():
    model = MoELM(RICH)
    names = set(dict(model.named_parameters()))
    group = {g: set(parameter_group(model, g))
             for g in ("all", "routers", "experts", "attention", "non_moe", "non_router")}
    assert group["all"] == names
    assert group["routers"] == {"blocks.1.ffn.router.weight", "blocks.1.ffn.router.expert_embed",
                                "blocks.1.ffn.router.log_inv_temperature"}
    assert group["experts"] == {f"blocks.1.ffn.experts.{w}" for w in ("w1", "w2", "w3")}
    assert group["attention"] == {f"blocks.{i}.attn.{w}.weight" for i in (0, 1) for w in ("qkv", "out")}
    assert group["non_moe"] == names - group["routers"] - group["experts"]
    assert group["non_router"] == names - group["routers"]  # frozen routers: everything else trains
    # shared experts and their gate, the dense block's FFN, norms, embeddings: non-MoE
    assert {"blocks.1.ffn.shared_experts.w1.weight", "blocks.1.ffn.shared_gate.weight", "blocks.0.ffn.w1.weight",
            "embed.weight", "lm_head.weight", "norm.weight", "blocks.0.attn_norm.weight"} <= group["non_moe"]
    assert set(parameter_group(model, "esft")) == group["experts"]


def test_a_dense_model_has_no_router_or_expert_group():
    dense = MoELM(dataclasses.replace(MICRO_MODEL, moe=None))
    for g in ("non_router", "routers", "experts", "esft"):
        with pytest.raises(ValueError, match=f"trainable='{g}' is invalid: the model has no MoE layer"):
            parameter_group(dense, g)
    assert set(parameter_group(dense, "non_moe")) == set(dict(dense.named_parameters()))


def test_trainable_counts_match_the_groups():
    model = MoELM(MICRO_MODEL)
    n_expert = 3 * 32 * 32  # w1, w3, w2 of one expert: d_model 32, hidden 32
    assert trainable_parameters(model, "experts") == 2 * 4 * n_expert
    assert trainable_parameters(model, "esft", [[0, 2], [1]]) == 3 * n_expert
    assert trainable_parameters(model, "all") == sum(p.numel() for p in model.parameters())


# --- frozen stays bit-equal, trained moves -----------------------------------------------------

# loss-free balancing on, so the frozen router's bias is checked too; weight decay is on by default
BIASED = dataclasses.replace(MICRO_MODEL, moe=dataclasses.replace(MICRO_MODEL.moe, bias_update_rate=1e-2))


def _trainer(tmp_path, folder, model: ModelConfig = BIASED, **kw) -> Trainer:
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), data=str(folder), batch_size=4, eval_windows=2,
                      warmup_steps=1, progress=False, **{"steps": 4, **kw})
    return Trainer(model, cfg)


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict(keep_vars=False).items()}


def _biases(trainer: Trainer) -> list[torch.Tensor]:
    return [layer.router.bias.clone() for layer in trainer.model.moe_layers()]


@pytest.mark.parametrize("group", ["routers", "experts", "attention", "non_moe", "non_router"])
def test_frozen_parameters_are_bit_equal_after_steps_and_the_rest_move(tmp_path, domain_folder, group):
    trainer = _trainer(tmp_path, domain_folder, trainable=group)
    trained = set(parameter_group(trainer.model, group))
    before, bias_before = _state(trainer), _biases(trainer)
    for _ in range(2):
        trainer.train_step()
    after = _state(trainer)
    for name, p in trainer.model.named_parameters():
        if name in trained:
            assert not torch.equal(before[name], after[name]), f"{name} should train under {group}"
        else:
            assert torch.equal(before[name], after[name]), f"{name} should be frozen under {group}"
            assert not p.requires_grad
    for b0, b1 in zip(bias_before, _biases(trainer), strict=True):
        # the routers' balancing bias moves only when the routers train
        assert torch.equal(b0, b1) != (group == "routers"), group
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {n for n, p in trainer.model.named_parameters() if id(p) in optimized} == trained


@pytest.fixture
def source_dir(tmp_path, domain_folder):
    """A run with one checkpoint (after one step) to fine-tune from."""
    source = _trainer(tmp_path / "source", domain_folder, model=BIASED, seed=7)
    source.train_step()
    source.save()
    return source.run_dir


def test_esft_trains_only_the_selected_experts_bit_equal_elsewhere(tmp_path, domain_folder, source_dir):
    trainer = _trainer(tmp_path, domain_folder, init_from=str(source_dir), trainable="esft",
                       esft_domain="numbers", esft_top_n=1)
    selection = trainer.freezing.selection
    # the selection is ESFT's rule applied to the initial model's routing of the domain's training text
    counts = trainer.domain_routing_counts("numbers")
    assert selection == esft_select(counts, top_n=1)
    per_layer = counts.sum(dim=1)  # every token of the windows, top_k = 2 assignments each, in every layer
    assert bool((per_layer == per_layer[0]).all()) and int(per_layer[0]) % (32 * 2) == 0
    record = trainer.trainable_record
    assert record["group"] == "esft" and record["esft"]["experts"] == selection
    assert record["esft"]["domain"] == "numbers" and record["esft"]["rule"] == "top_n"
    before, bias_before = _state(trainer), _biases(trainer)
    for _ in range(2):
        trainer.train_step()
    after = _state(trainer)
    for li, experts in enumerate(selection):
        for w in ("w1", "w2", "w3"):
            name = f"blocks.{li}.ffn.experts.{w}"
            for e in range(4):
                same = torch.equal(before[name][e], after[name][e])
                assert same == (e not in experts), (name, e, experts)
    for name in before:
        if ".experts." not in name:
            assert torch.equal(before[name], after[name]), name
    for b0, b1 in zip(bias_before, _biases(trainer), strict=True):
        assert torch.equal(b0, b1)


def test_esft_gradients_of_frozen_experts_are_zero_before_clipping(tmp_path, domain_folder, source_dir):
    trainer = _trainer(tmp_path, domain_folder, init_from=str(source_dir), trainable="esft",
                       esft_domain="words", esft_threshold=0.3)
    tokens, targets, _ = trainer._batch(0)
    trainer.model(tokens, targets).loss.backward()
    for layer, experts in zip(trainer.model.moe_layers(), trainer.freezing.selection, strict=True):
        grad = layer.experts.w1.grad
        for e in range(4):
            assert bool(grad[e].abs().sum() > 0) == (e in experts)


def test_esft_resume_keeps_the_recorded_selection(tmp_path, domain_folder, source_dir):
    trainer = _trainer(tmp_path, domain_folder, init_from=str(source_dir), trainable="esft",
                       esft_domain="numbers", esft_top_p=0.5, steps=2, checkpoint_every=1, eval_every=2)
    trainer.fit()
    selection = trainer.freezing.selection
    resumed = Trainer.resume(trainer.run_dir, steps=3)
    assert resumed.freezing.selection == selection
    before = _state(resumed)
    resumed.fit()
    after = _state(resumed)
    for li, experts in enumerate(selection):
        w1 = f"blocks.{li}.ffn.experts.w1"
        assert all(torch.equal(before[w1][e], after[w1][e]) == (e not in experts) for e in range(4))


def test_freeze_refuses_a_selection_that_does_not_fit():
    model = MoELM(MICRO_MODEL)
    with pytest.raises(ValueError, match="selection"):
        freeze(model, "esft", [[0]])  # two MoE layers
    with pytest.raises(ValueError, match="expert indices must be from 0 to 3"):
        freeze(model, "esft", [[0], [4]])


def test_a_threshold_that_selects_nothing_is_one_line(tmp_path, domain_folder, source_dir):
    with pytest.raises(ValueError, match=r"esft_threshold=1.0 is invalid: it selects no expert in any layer"):
        _trainer(tmp_path, domain_folder, init_from=str(source_dir), trainable="esft", esft_domain="words",
                 esft_threshold=1.0)

