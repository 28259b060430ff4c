"""Every MoEConfig field takes effect or is refused with the one-line error naming it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from workbench.config import ModelConfig, MoEConfig
from workbench.kernels import cpu as cpu_kernels
from workbench.model import MoELM
from workbench.moe import ROUTERS, MoELayer, build_router
from workbench.moe.dispatch import loop_dispatch

pytestmark = pytest.mark.filterwarnings("ignore::workbench.moe.routers.CausalLeakWarning")

TOKEN_CHOICE = [n for n, cls in ROUTERS.items() if not cls.mixes_tokens]


def route(name: str, x: torch.Tensor, *, seed: int = 0, train: bool = False, **fields):
    """Build router ``name`` with a fixed init and route ``x`` (token ids for the hash router)."""
    top_k = ROUTERS[name].fixed_top_k or 2
    torch.manual_seed(seed)
    router = build_router(x.shape[1], MoEConfig(router=name, num_experts=6, top_k=top_k, **fields))
    router.train(train)
    torch.manual_seed(seed + 1)  # the same draws for random routing and noise
    return router(x, torch.arange(x.shape[0]) % 256)


# --- route_scale --------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in ROUTERS if ROUTERS[n].supports_route_scale])
def test_route_scale_multiplies_every_gate(name):
    x = torch.randn(40, 16)
    plain, scaled = route(name, x), route(name, x, route_scale=2.5)
    assert torch.equal(plain.expert_ids_TK, scaled.expert_ids_TK)
    torch.testing.assert_close(scaled.weights_TK, 2.5 * plain.weights_TK)


def test_route_scale_is_refused_where_there_are_no_gates_to_scale():
    with pytest.raises(ValueError, match=r"^route_scale=2.0 is invalid: router='soft_moe' has no gates to scale"):
        MoEConfig(router="soft_moe", route_scale=2.0)


# --- router_jitter ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ROUTERS)
def test_router_jitter_perturbs_the_router_input_in_training_only(name):
    x = torch.randn(40, 16)
    clean = route(name, x, train=True).logits_TE
    jittered = route(name, x, train=True, router_jitter=0.3).logits_TE
    assert not torch.allclose(clean, jittered)
    torch.testing.assert_close(route(name, x, router_jitter=0.3).logits_TE, route(name, x).logits_TE)


# --- normalize_topk -----------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in TOKEN_CHOICE if ROUTERS[n].default_normalize_topk is not None])
def test_normalize_topk_decides_whether_gates_sum_to_one(name):
    x = torch.randn(40, 16)
    normalized = route(name, x, normalize_topk=True, train=True).weights_TK.sum(-1)
    raw = route(name, x, normalize_topk=False, train=True).weights_TK.sum(-1)
    torch.testing.assert_close(normalized, torch.ones(40))
    assert (raw < 1 - 1e-3).any()


def test_normalize_topk_none_takes_the_routers_published_default():
    x = torch.randn(40, 16)
    # Switch's gate is the raw probability; Mixtral-style top-k renormalises.
    assert (route("switch", x).weights_TK < 1).all()
    torch.testing.assert_close(route("softmax_topk", x).weights_TK.sum(-1), torch.ones(40))
    # noisy top-k: a softmax over the k kept (noisy) logits, Shazeer et al. eq. 3
    out = route("noisy_topk", x)
    torch.testing.assert_close(out.weights_TK, out.logits_TE.gather(1, out.expert_ids_TK).softmax(-1))


@pytest.mark.parametrize("name", [n for n in ROUTERS if ROUTERS[n].default_normalize_topk is None])
def test_normalize_topk_is_refused_by_routers_without_top_k_gates(name):
    with pytest.raises(ValueError, match=rf"^normalize_topk=True is invalid: router='{name}' has no top-k"):
        MoEConfig(router=name, normalize_topk=True)


# --- shared experts -----------------------------------------------------------------------


@pytest.mark.parametrize("fields, pattern", [
    ({"shared_expert_gate": True}, r"^shared_expert_gate=True is invalid: .*num_shared_experts >= 1"),
    ({"shared_expert_hidden": 64}, r"^shared_expert_hidden=64 is invalid: .*num_shared_experts >= 1"),
])
def test_shared_expert_options_without_a_shared_expert_are_refused(fields, pattern):
    with pytest.raises(ValueError, match=pattern):
        MoEConfig(**fields)


def test_shared_expert_hidden_and_gate_take_effect():
    layer = MoELayer(16, MoEConfig(num_shared_experts=1, shared_expert_hidden=40, shared_expert_gate=True))
    assert layer.shared_experts.w1.weight.shape == (40, 16) and layer.shared_gate is not None


# --- the sigmoid router when every selected affinity underflows ---------------------------


def test_sigmoid_gates_are_zero_not_nan_when_every_selected_affinity_underflows():
    """Logits below about -104 give sigmoid = 0 in fp32; Hugging Face's DeepSeek-V3 block adds
    1e-20 to the denominator and outputs 0. So do we, in every dispatch."""
    torch.manual_seed(0)
    for dispatch in ("loop", "capacity", "sorted"):
        layer = MoELayer(16, MoEConfig(router="sigmoid", num_experts=4, top_k=2, dispatch=dispatch))
        with torch.no_grad():
            layer.router.weight.fill_(-50.0)
        x = torch.ones(1, 8, 16)  # logits -800: every affinity is exactly 0
        y, info = layer(x)
        assert (info.router_output.scores_TE == 0).all()
        assert torch.isfinite(y).all() and (y == 0).all(), dispatch


# --- fused sorted path: expert weights that are transposed views --------------------------


def test_sorted_dispatch_accepts_expert_weights_that_are_transposed_views():
    torch.manual_seed(0)
    layer = cpu_kernels.convert(MoELayer(16, MoEConfig(num_experts=4, top_k=2, expert_hidden=24)))
    for name in ("w1", "w3", "w2"):
        w = getattr(layer.experts, name).detach()
        setattr(layer.experts, name, nn.Parameter(w.transpose(1, 2).contiguous().transpose(1, 2)))
    assert not layer.experts.w1.is_contiguous()
    x = torch.randn(2, 10, 16)
    expected, _ = loop_dispatch(x.view(20, 16), layer.router(x.view(20, 16)), layer.experts)
    y, _ = layer(x)
    torch.testing.assert_close(y.view(20, 16), expected, atol=1e-5, rtol=1e-4)
    y.sum().backward()
    assert layer.experts.w2.grad is not None and layer.experts.w2.grad.shape == layer.experts.w2.shape


# --- state dicts --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ROUTERS)
def test_state_dict_holds_only_model_state_and_loads_strictly(name):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, moe=MoEConfig(router=name, num_experts=4,
                                                                       top_k=ROUTERS[name].fixed_top_k or 2))
    model = MoELM(cfg)
    state = model.state_dict()
    params = {k for k, _ in model.named_parameters()}
    extra = set(state) - params
    # the hash router's table is model state; nothing else beyond the parameters is
    assert extra == ({f"blocks.{i}.ffn.router.expert_table" for i in range(2)} if name == "hash" else set())
    MoELM(cfg).load_state_dict(state, strict=True)


def test_loss_free_bias_is_model_state_and_the_load_counter_is_not():
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, moe=MoEConfig(router="sigmoid", bias_update_rate=1e-3))
    model = MoELM(cfg)
    model(torch.randint(0, 256, (2, 16)))
    layer = model.moe_layers()[0]
    assert layer.load_since_update.sum() > 0  # counted in training...
    state = model.state_dict()
    assert "blocks.0.ffn.router.bias" in state and "blocks.0.ffn.load_since_update" not in state  # ...not saved
    MoELM(cfg).load_state_dict(state, strict=True)


# --- capacity: never drop -----------------------------------------------------------------


def test_capacity_factor_none_never_drops_even_when_every_token_picks_one_expert():
    torch.manual_seed(0)
    layer = MoELayer(16, MoEConfig(num_experts=8, top_k=2, dispatch="capacity", capacity_factor=None))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[3] = 5.0  # expert 3 is every token's first choice
    x = torch.randn(2, 32, 16).abs()
    y, info = layer(x)
    assert info.tokens_per_expert[3] == 64 and info.stats.capacity == 64
    assert info.stats.dropped_assignments == 0
    expected, _ = loop_dispatch(x.view(64, 16), info.router_output, layer.experts)
    torch.testing.assert_close(y.view(64, 16), expected, atol=1e-5, rtol=1e-4)
    # the same routing with the default factor drops: the setting is what prevents it
    finite = MoELayer(16, MoEConfig(num_experts=8, top_k=2, dispatch="capacity"))
    finite.load_state_dict(layer.state_dict())
    assert finite(x)[1].stats.dropped_assignments > 0


def test_capacity_factor_must_be_finite():
    with pytest.raises(ValueError, match=r"^capacity_factor=inf is invalid"):
        MoEConfig(capacity_factor=math.inf)


# --- aux_loss_scope, capacity_scope, bias_update_rule --------------------------------------


@pytest.mark.parametrize("field, value, allowed", [
    ("aux_loss_scope", "global", "micro_batch, global_batch"),
    ("capacity_scope", "token", "batch, sequence"),
    ("bias_update_rule", "linear", "sign, proportional"),
])
def test_new_choice_fields_refuse_unknown_values_listing_the_allowed_ones(field, value, allowed):
    with pytest.raises(ValueError, match=rf"^{field}='{value}' is invalid: allowed values are {allowed}$"):
        MoEConfig(**{field: value})


def test_choice_tuples_are_the_ones_the_config_validates_with():
    from workbench.moe import balance, config, dispatch

    assert config.AUX_LOSS_SCOPES is balance.AUX_LOSS_SCOPES == ("micro_batch", "global_batch")
    assert config.BIAS_UPDATE_RULES is balance.BIAS_UPDATE_RULES == ("sign", "proportional")
    assert config.CAPACITY_SCOPES is dispatch.CAPACITY_SCOPES == ("batch", "sequence")


@pytest.mark.parametrize("dispatch", ["sorted", "loop"])
def test_capacity_scope_sequence_needs_the_capacity_dispatch(dispatch):
    with pytest.raises(ValueError, match=rf"^capacity_scope='sequence' is invalid: .*dispatch='{dispatch}'"):
        MoEConfig(dispatch=dispatch, capacity_scope="sequence")


def test_capacity_scope_sequence_needs_position_priority_and_a_causal_router():
    with pytest.raises(ValueError, match=r"^drop_policy='score' is invalid: capacity_scope='sequence'"):
        MoEConfig(dispatch="capacity", capacity_scope="sequence", drop_policy="score")
    for router in ("expert_choice", "soft_moe"):
        with pytest.raises(ValueError, match=rf"^capacity_scope='sequence' is invalid: router='{router}'"):
            MoEConfig(router=router, dispatch="capacity", capacity_scope="sequence")
    cfg = MoEConfig(dispatch="capacity", capacity_scope="sequence", capacity_factor=None)
    assert cfg.capacity_scope == "sequence"


def test_bias_update_rule_is_permissive_without_loss_free_balancing():
    assert MoEConfig(bias_update_rule="proportional").bias_update_rate == 0  # no bias: nothing to update


@pytest.mark.parametrize("scope", ["micro_batch", "global_batch"])
def test_aux_loss_scope_is_accepted_with_every_router(scope):
    for name, cls in ROUTERS.items():
        MoEConfig(router=name, top_k=cls.fixed_top_k or 2, aux_loss_scope=scope)


def test_an_old_config_dict_without_the_new_fields_loads_with_their_defaults():
    saved = ModelConfig(d_model=32, n_layers=1, n_heads=2).to_dict()
    for name in ("aux_loss_scope", "capacity_scope", "bias_update_rule"):
        del saved["moe"][name]
    moe = ModelConfig.from_dict(saved).moe
    assert (moe.aux_loss_scope, moe.capacity_scope, moe.bias_update_rule) == ("micro_batch", "batch", "sign")
