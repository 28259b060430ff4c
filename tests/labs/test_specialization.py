"""The specialization lab: its runs keep parameters equal, and its claim checks decide as defined,
on hand-made tables."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from workbench.config import preset
from workbench.labs import specialization as lab
from workbench.train.config import TrainConfig


def _expert_params(cfg) -> tuple[int, int]:
    """(routed + shared expert parameters, active expert parameters) of one MoE layer, from the config."""
    m = cfg.moe
    shared = m.num_shared_experts and (m.shared_expert_hidden or m.num_shared_experts * m.expert_hidden)
    per_hidden = 3 * cfg.d_model  # SwiGLU: w1, w3 (D x H) and w2 (H x D)
    return per_hidden * (m.num_experts * m.expert_hidden + shared), per_hidden * (m.top_k * m.expert_hidden + shared)


def test_granularity_runs_keep_active_and_total_expert_parameters():
    base = preset("tiny")
    coarse, fine, shared = lab.granularity_experiments(base, TrainConfig(steps=3), split=4)
    assert (fine.model.moe.num_experts, fine.model.moe.top_k, fine.model.moe.expert_hidden) == (32, 8, 32)
    assert (shared.model.moe.num_experts, shared.model.moe.top_k, shared.model.moe.num_shared_experts) == (31, 7, 1)
    params = {e.name: _expert_params(e.model) for e in (coarse, fine, shared)}
    assert len(set(params.values())) == 1, params
    # the models differ only by router rows (d_model per expert per MoE layer)
    router_rows = len(base.moe_layers) * base.d_model
    assert fine.model.num_params() - coarse.model.num_params() == router_rows * (32 - 8)
    assert shared.model.num_params() - coarse.model.num_params() == router_rows * (31 - 8)
    assert coarse.model == base and fine.model.replace(moe=None) == base.replace(moe=None)


@pytest.mark.parametrize("split", [3, 0, 2.0])
def test_a_split_that_does_not_divide_the_experts_is_refused(split):
    with pytest.raises(ValueError, match="split"):
        lab.granularity_experiments(preset("tiny"), TrainConfig(steps=3), split=split)


def test_lab_runs_the_claims_at_their_seeds():
    exps = lab.lab_experiments(preset("tiny"), TrainConfig(steps=3, batch_size=8), micro_batch=2,
                               claim_seeds=(0, 1, 2), other_seeds=(0,))
    groups = {e.name: (e.tags["group"], e.seeds) for e in exps}
    assert [g for g, _ in groups.values()] == ["granularity"] * 3 + ["router"] + ["accumulation"] * 2
    assert all(seeds == (0,) if g == "router" else seeds == (0, 1, 2) for g, seeds in groups.values())
    sigmoid = exps[3].model.moe
    assert sigmoid.router == "sigmoid" and sigmoid.aux_loss_weight == 0 and sigmoid.bias_update_rate == 1e-3
    micro, global_ = exps[4:]
    assert micro.train.grad_accum == global_.train.grad_accum == 4 and micro.train.batch_size == 2
    assert (micro.model.moe.aux_loss_scope, global_.model.moe.aux_loss_scope) == ("micro_batch", "global_batch")


def test_normalized_excess():
    assert lab.normalized_excess(0.5, 0.25) == pytest.approx(1 / 3)
    assert lab.normalized_excess(0.25, 0.25) == 0.0
    assert lab.normalized_excess(1.0, 0.1) == 1.0
    assert math.isnan(lab.normalized_excess(float("nan"), 0.1)) and math.isnan(lab.normalized_excess(0.9, 1.0))


def _scores(a: list[float], b: list[float], metric: str = "domain_nmi/norm") -> pd.DataFrame:
    rows = [{"name": "A", "seed": s, metric: v, "vocab/norm": v} for s, v in enumerate(a)]
    rows += [{"name": "B", "seed": s, metric: v, "vocab/norm": v} for s, v in enumerate(b)]
    return pd.DataFrame(rows)


def test_claim_holds_when_every_seed_is_higher_beyond_noise():
    # per-seed differences 0.10, 0.12, 0.08: mean 0.10, SE 0.0115 -> 8.7 SE
    c = lab.claim_check(_scores([0.30, 0.52, 0.18], [0.20, 0.40, 0.10]), "A", "B", "claim")
    t = c["tests"]["domain_nmi"]
    assert t["paired"] and t["diff"] == pytest.approx(0.10)
    assert t["se"] == pytest.approx(0.02 / math.sqrt(3))
    assert c["outcome"] == "reproduces" and "reproduces" in c["verdict"]


def test_claim_is_not_shown_within_noise_and_refuted_when_reversed():
    noisy = lab.claim_check(_scores([0.30, 0.10, 0.21], [0.20, 0.20, 0.20]), "A", "B", "claim")
    assert noisy["outcome"] == "does not reproduce beyond seed noise"
    reversed_ = lab.claim_check(_scores([0.10, 0.30, 0.05], [0.20, 0.42, 0.14]), "A", "B", "claim")
    assert reversed_["outcome"].startswith("does not reproduce: the opposite holds")
    one_seed = lab.claim_check(_scores([0.3], [0.2]), "A", "B", "claim")
    assert one_seed["outcome"] == "cannot be judged: too few seeds"


def test_beats_random_reports_the_excess_over_the_baseline():
    frame = pd.DataFrame({"name": ["A"] * 4, "seed": [0, 0, 1, 1], "layer": [0, 1, 0, 1],
                          "domain_nmi": [0.2, 0.3, 0.25, 0.15], "domain_nmi_baseline": [0.01] * 4,
                          "vocab": [0.6, 0.5, 0.7, 0.4], "vocab_baseline": [0.3, 0.3, 0.3, 0.35]})
    m = lab.beats_random(frame, "A")
    assert m["domain_nmi"]["excess_mean"] == pytest.approx(0.215)
    assert m["domain_nmi"]["excess_min"] == pytest.approx(0.14)
    assert m["vocab"]["excess_min"] == pytest.approx(0.05) and m["vocab"]["n"] == 4
    with pytest.raises(ValueError, match="name"):
        lab.beats_random(frame, "B")


def test_saturation_summary_takes_the_first_checkpoint_after_the_fraction():
    sat = pd.DataFrame({"name": ["A"] * 6, "seed": [0] * 6, "step": [5, 20, 100] * 2, "layer": [0] * 3 + [1] * 3,
                        "saturation": [0.2, 0.6, 1.0, 0.4, 0.8, 1.0], "baseline": [0.3] * 6,
                        "top1": [0.1] * 6, "top1_baseline": [0.1] * 6})
    row = lab.saturation_summary(sat, fraction=0.1).loc["A"]
    assert row["step"] == 20 and row["saturation"] == pytest.approx(0.7)


def test_domain_windows_pack_each_domains_validation_text():
    batches, names = lab.domain_windows(lambda text: list(text.encode()), seq_len=16, windows_per_domain=3)
    assert names == ["code", "prose", "math", "records"]
    for d, (tokens, domains) in enumerate(batches):
        assert tokens.shape == (3, 16) and tokens.dtype == torch.long
        assert (domains == d).all()
    with pytest.raises(ValueError, match="vocab_size"):
        lab.domain_windows(lambda text: list(text.encode()), seq_len=16, windows_per_domain=1, vocab_size=10)


def test_claim_that_holds_on_one_metric_only_says_which():
    scores = _scores([0.30, 0.52, 0.18], [0.20, 0.40, 0.10])
    scores["vocab/norm"] = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    c = lab.claim_check(scores, "A", "B", "claim")
    assert c["outcome"] == "reproduces on domain specialization (NMI) only"
    assert c["tests"]["vocab"]["holds"] is False


@pytest.mark.parametrize("untrained_vocab, says_reads_token", [(0.9, True), (0.4, False)])
def test_takeaways_credit_the_untrained_router_only_when_it_has_most_of_the_excess(untrained_vocab, says_reads_token):
    rows = [{"name": n, "seed": s, "layer": 0, "domain_nmi": 0.2 + 0.01 * s, "domain_nmi_baseline": 0.0,
             "vocab": 0.8 + 0.01 * s, "vocab_baseline": 0.3, "domain_nmi/norm": 0.2 + 0.01 * s,
             "vocab/norm": 0.7 + 0.01 * s} for n in ("C", "F") for s in (0, 1)]
    untrained = pd.DataFrame([{"domain_nmi": 0.02, "vocab": untrained_vocab, "vocab_baseline": 0.3}])
    lines = lab.takeaways(pd.DataFrame(rows), coarse="C", fine_shared="F", untrained=untrained)
    assert lines[1].startswith(f"The same config untrained: domain NMI 0.020 and vocabulary specialization "
                               f"{untrained_vocab:.3f}")
    assert ("a router that reads the token" in lines[1]) == says_reads_token
