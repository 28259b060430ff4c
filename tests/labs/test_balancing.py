"""The load-balancing lab's catalogue and its claim checks, on hand-made tables."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from workbench.analysis import domain_expert_mutual_information
from workbench.config import preset
from workbench.labs import balancing
from workbench.train.config import TrainConfig

BALANCING_FIELDS = ("aux_loss_weight", "seq_aux_loss_weight", "z_loss_weight", "bias_update_rate")


def test_every_method_is_the_base_with_only_its_fields():
    base = preset("tiny", aux_loss_weight=0.5, z_loss_weight=0.5)  # balancing the methods must switch off
    train = TrainConfig(steps=5)
    exps = balancing.method_experiments(base, train)
    assert [e.name for e in exps] == list(balancing.METHODS)
    for e in exps:
        family, fields = balancing.METHODS[e.name]
        moe = e.model.moe
        for name in BALANCING_FIELDS:
            assert getattr(moe, name) == fields.get(name, 0.0), (e.name, name)
        for name, value in fields.items():
            assert getattr(moe, name) == value, (e.name, name)
        assert e.train is train and e.tags == {"group": "methods", "family": family}
        assert e.model.replace(moe=None) == base.replace(moe=None)  # only the MoE config differs
    with pytest.raises(ValueError, match="methods"):
        balancing.method_experiments(base, train, ["aux 1e-2", "no such method"])


def test_accumulation_pair_sees_the_same_tokens_per_step():
    train = TrainConfig(steps=5, batch_size=16)
    micro, global_ = balancing.accumulation_experiments(preset("tiny"), train, micro_batch=4)
    for e in (micro, global_):
        assert e.train.batch_size * e.train.grad_accum == 16 and e.train.batch_size == 4
        assert e.model.moe.aux_loss_weight == 0.01
    assert (micro.model.moe.aux_loss_scope, global_.model.moe.aux_loss_scope) == ("micro_batch", "global_batch")
    assert micro.model.replace(moe=None) == global_.model.replace(moe=None)
    with pytest.raises(ValueError, match="micro_batch"):
        balancing.accumulation_experiments(preset("tiny"), train, micro_batch=3)


def test_capacity_grid():
    exps = balancing.capacity_experiments(preset("tiny"), TrainConfig(), factors=[0.5, 2.0], seeds=(0, 1))
    assert [e.name for e in exps] == ["dropless", "capacity 0.5 position", "capacity 2 position",
                                      "capacity 0.5 score", "capacity 2 score"]
    assert exps[0].model.moe.dispatch == "sorted" and all(e.model.moe.dispatch == "capacity" for e in exps[1:])
    assert exps[4].model.moe.capacity_factor == 2.0 and exps[4].model.moe.drop_policy == "score"
    assert all(e.seeds == (0, 1) for e in exps)


def _table(rows):
    return pd.DataFrame([{"name": n, "seed": s, "val_loss": loss, "max_vio_global": vio, "domain_mi": mi,
                          "max_vio_batch": vio}
                         for n, s, loss, vio, mi in rows])


def _runs(lf_loss, aux_loss, lf_vio=(0.05, 0.06, 0.04), aux_vio=(0.5, 0.6, 0.55), seeds=(0, 1, 2)):
    rows = [("loss-free 1e-3", s, loss, v, 0.1) for s, loss, v in zip(seeds, lf_loss, lf_vio, strict=True)]
    aux_seeds = (0, 1, 2)[:len(aux_loss)]
    rows += [("aux 1e-2", s, loss, v, 0.1) for s, loss, v in zip(aux_seeds, aux_loss, aux_vio, strict=True)]
    return _table(rows)


def test_claim_holds_when_balance_is_much_better_and_loss_no_worse():
    c = balancing.claim_check(_runs([2.00, 2.10, 1.90], [2.01, 2.11, 1.91]))
    assert c["balance_holds"] and c["quality_holds"] and c["reproduced"]
    assert c["max_vio_ratio"] == pytest.approx(0.05 / 0.55)
    assert c["paired"] and c["val_loss_diff"] == pytest.approx(-0.01)
    assert c["verdict"].startswith("Claim reproduced")


def test_claim_fails_on_balance():
    c = balancing.claim_check(_runs([2.0, 2.1, 1.9], [2.0, 2.1, 1.9], lf_vio=(0.4, 0.5, 0.45)))
    assert not c["balance_holds"] and c["reproduced"] is False and "not much lower" in c["verdict"]


def test_claim_fails_when_the_loss_is_worse_beyond_paired_noise():
    # every seed 0.05 worse, with per-seed differences that hardly vary: far beyond 2 SE
    c = balancing.claim_check(_runs([2.05, 2.151, 1.949], [2.0, 2.1, 1.9]))
    d = [0.05, 0.051, 0.049]
    se = pd.Series(d).std(ddof=1) / math.sqrt(3)
    assert c["val_loss_diff_se"] == pytest.approx(se)
    assert c["quality_holds"] is False and c["reproduced"] is False and "worse beyond" in c["verdict"]


def test_unpaired_seeds_use_the_two_sample_error():
    runs = _runs([2.05, 2.15, 1.95], [2.0, 2.1, 1.9], seeds=(3, 4, 5))
    c = balancing.claim_check(runs)
    se = math.sqrt(pd.Series([2.05, 2.15, 1.95]).var() / 3 + pd.Series([2.0, 2.1, 1.9]).var() / 3)
    assert not c["paired"] and c["val_loss_diff_se"] == pytest.approx(se)
    assert c["quality_holds"]  # 0.05 higher is within 2 SE of the unpaired spread (0.1 per seed)


def test_one_seed_cannot_judge_noise():
    c = balancing.claim_check(_runs([2.0], [2.0], lf_vio=(0.05,), aux_vio=(0.5,), seeds=(0,)))
    assert c["quality_holds"] is None and c["reproduced"] is None and "at least 2" in c["verdict"]


def test_specialization_check_compares_mutual_information():
    runs = _table([("micro", s, 2.0, 0.2, mi) for s, mi in enumerate([0.10, 0.12, 0.11])]
                  + [("global", s, 2.0, 0.4, mi) for s, mi in enumerate([0.30, 0.33, 0.31])])
    c = balancing.specialization_check(runs, "micro", "global")
    assert c["more_specialised"] and c["domain_mi_diff"] == pytest.approx(0.2033, abs=1e-3)
    same = balancing.specialization_check(runs, "micro", "micro")
    assert same["more_specialised"] is False


def test_mutual_information():
    assert domain_expert_mutual_information(torch.ones(4, 8)) == pytest.approx(0.0, abs=1e-12)
    assert domain_expert_mutual_information(torch.eye(4) * 10) == pytest.approx(2.0)  # log2(4) bits
    # two domains, one shares all its experts with the other: I = H(E) - H(E | D), by hand
    m = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    p = m / m.sum()
    h_e = -sum(x * math.log2(x) for x in p.sum(0).tolist() if x > 0)
    h_e_given_d = 0.5 * 1.0 + 0.5 * 0.0
    assert domain_expert_mutual_information(m) == pytest.approx(h_e - h_e_given_d)


def test_takeaways_are_computed_from_the_table():
    runs = _runs([2.0, 2.1, 1.9], [2.01, 2.11, 1.91])
    runs["group"] = "methods"
    lines = balancing.takeaways(runs)
    assert any("Claim reproduced" in line for line in lines)
    assert lines[0].startswith("Lowest mean validation loss: loss-free 1e-3")
