"""The compact LM: parameter and FLOP accounting, causality, gradients, dense baseline."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from workbench.config import ModelConfig, MoEConfig, dense_baseline, preset, small, tiny
from workbench.kernels import cpu as cpu_kernels
from workbench.model import MoELM

VARIANTS = {
    "tiny": tiny(),
    "small": small(),
    "dense": tiny().replace(moe=None),
    "shared_gated_tied": ModelConfig(d_model=64, n_layers=3, n_heads=4, tie_embeddings=True,
                                     moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32,
                                                   num_shared_experts=2, shared_expert_gate=True)),
    "first_dense_every2": ModelConfig(d_model=64, n_layers=5, n_heads=2, first_dense_layers=1, moe_every=2,
                                      moe=MoEConfig(router="sigmoid", num_experts=8, top_k=3, expert_hidden=24,
                                                    num_groups=4, topk_groups=2)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_num_params_matches_the_module(name):
    cfg = VARIANTS[name]
    assert cfg.num_params() == sum(p.numel() for p in MoELM(cfg).parameters())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_active_params_leave_out_exactly_the_unchosen_experts(name):
    cfg = VARIANTS[name]
    m = cfg.moe
    inactive = 0 if m is None else len(cfg.moe_layers) * (m.num_experts - m.top_k) * 3 * cfg.d_model * m.expert_hidden
    assert cfg.num_active_params() == cfg.num_params() - inactive


ROUTER_VARIANTS = {r: tiny(router=r) for r in ("noisy_topk", "cosine", "expert_choice", "soft_moe", "sigmoid")}


@pytest.mark.filterwarnings("ignore::workbench.moe.CausalLeakWarning")
@pytest.mark.parametrize("name", list(ROUTER_VARIANTS))
def test_num_params_matches_the_module_for_every_router_shape(name):
    cfg = ROUTER_VARIANTS[name]
    assert cfg.num_params() == sum(p.numel() for p in MoELM(cfg).parameters())


@pytest.mark.filterwarnings("ignore::workbench.moe.CausalLeakWarning")
@pytest.mark.parametrize("name", ["tiny", "dense", "shared_gated_tied", "first_dense_every2", *ROUTER_VARIANTS])
def test_flops_per_token_matches_a_flop_counter(name):
    """Run forward + backward under torch's FlopCounterMode with the loop dispatch (plain mm per
    expert, so every routed token is counted once per chosen expert; expert choice's C and soft
    MoE's slots divide evenly here). The counter sees the matmuls, soft MoE's mixing einsums
    included (the fused CPU kernels are opaque ops to it, so the model is built without them);
    attention's score and value products are added by the formula checked below."""
    cfg = VARIANTS.get(name) or ROUTER_VARIANTS[name]
    if cfg.moe is not None:
        cfg = cfg.replace(moe=MoEConfig(**{**cfg.moe.__dict__, "dispatch": "loop"}))
    with cpu_kernels.fused_cpu_kernel(False):  # the readable model
        model = MoELM(cfg)
    B, S = 2, cfg.seq_len
    tokens = torch.randint(0, cfg.vocab_size, (B, S))
    with FlopCounterMode(display=False) as counter:
        model(tokens, tokens).loss.backward()
    counted = counter.get_flop_counts()["Global"]
    matmul = sum(v for k, v in counted.items() if "scaled_dot_product" not in str(k))
    attention_formula = 6 * 2 * cfg.n_layers * cfg.seq_len * cfg.d_model
    assert matmul / (B * S) + attention_formula == cfg.flops_per_token()


def test_attention_flop_term_matches_explicit_attention():
    B, h, S, d = 2, 4, 16, 8
    q, k, v = (torch.randn(B, h, S, d, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        ((q @ k.transpose(-1, -2)).softmax(-1) @ v).sum().backward()
    per_token_per_layer = counter.get_total_flops() / (B * S)
    assert per_token_per_layer == 6 * 2 * S * (h * d)


@pytest.mark.parametrize("dispatch", ["loop", "sorted"])
def test_model_is_causal(dispatch):
    """Changing token t changes no logit before t (dropless dispatch; capacity dropping is not
    causal: a later token can take an earlier token's slot)."""
    model = MoELM(preset("tiny", dispatch=dispatch)).eval()
    tokens = torch.randint(0, 256, (2, 64))
    changed = tokens.clone()
    changed[:, 40] = (changed[:, 40] + 1) % 256
    a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :40], b[:, :40], atol=1e-5, rtol=0)
    assert (a[:, 40:] - b[:, 40:]).abs().max() > 1e-3


def test_loss_at_init_is_near_uniform_and_every_parameter_gets_a_gradient():
    cfg = preset("tiny", num_shared_experts=1, shared_expert_gate=True, z_loss_weight=1e-3)
    model = MoELM(cfg)
    tokens = torch.randint(0, 256, (4, cfg.seq_len))
    out = model(tokens[:, :-1], tokens[:, 1:])
    assert out.lm_loss.item() == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.1)
    assert len(out.routing) == cfg.n_layers and out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_aux_loss_is_the_mean_of_per_layer_weighted_losses():
    cfg = preset("tiny", aux_loss_weight=0.1, seq_aux_loss_weight=0.2, z_loss_weight=0.01)
    out = MoELM(cfg)(torch.randint(0, 256, (2, 32)))
    per_layer = [0.1 * r.losses["aux_loss"] + 0.2 * r.losses["seq_aux_loss"] + 0.01 * r.losses["z_loss"]
                 for r in out.routing]
    torch.testing.assert_close(out.aux_loss, torch.stack(per_layer).mean())


def test_dense_baseline_has_no_routing():
    cfg = tiny().replace(moe=None)
    out = MoELM(cfg)(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16)))
    assert out.routing == [] and out.aux_loss.item() == 0.0
    assert cfg.num_active_params() == cfg.num_params()


def _counted_matmul_flops(cfg: ModelConfig) -> float:
    """Forward + backward FLOPs per token that torch's FlopCounterMode sees (attention's SDPA aside)."""
    with cpu_kernels.fused_cpu_kernel(False):  # the readable model: the fused kernels are opaque to the counter
        model = MoELM(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    with FlopCounterMode(display=False) as counter:
        model(tokens, tokens).loss.backward()
    counted = counter.get_flop_counts()["Global"]
    return sum(v for k, v in counted.items() if "scaled_dot_product" not in str(k)) / tokens.numel()


def test_dense_baseline_differs_from_the_moe_by_exactly_the_router_in_measured_flops():
    """Counted, not computed from the config: the MoE (loop dispatch, every routed token counted
    once per chosen expert) and its dense baseline differ by 6 x the router's matmul weights per
    MoE layer; nothing else (the experts' active FLOPs are matched)."""
    cfg = ModelConfig(seq_len=32, d_model=32, n_layers=2, n_heads=2, dense_hidden=64,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=24, dispatch="loop"))
    dense = dense_baseline(cfg)
    router = 6 * len(cfg.moe_layers) * cfg.d_model * cfg.moe.num_experts
    assert _counted_matmul_flops(cfg) - _counted_matmul_flops(dense) == router


def test_padding_is_left_out_of_the_balancing_losses():
    model = MoELM(tiny()).eval()
    tokens = torch.randint(0, 256, (1, 32))
    mask = torch.ones(1, 32, dtype=torch.bool)
    mask[:, 20:] = False
    masked = model(tokens, padding_mask=mask).routing[0].losses["aux_loss"]
    truncated = model(tokens[:, :20]).routing[0].losses["aux_loss"]
    torch.testing.assert_close(masked, truncated)  # causal: the first 20 positions are identical


def test_sequence_longer_than_configured_is_rejected():
    model = MoELM(tiny())
    with pytest.raises(ValueError, match="seq_len=128"):
        model(torch.zeros(1, 129, dtype=torch.long))
