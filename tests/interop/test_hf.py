"""Hugging Face interop on tiny random models built from configs (nothing downloaded): converted
layers compute what the transformers blocks compute, for every dispatch; traces match the models'
own routers; settings the workbench cannot express are refused by name."""

from __future__ import annotations

import pytest
import torch

from workbench.analysis import ranked_experts, specialization_table
from workbench.interop import (
    collect_hf_routing,
    hf_moe_blocks,
    moe_config_from_hf,
    moe_layer_from_hf,
    moe_layer_to_hf,
    replace_dispatch,
)

transformers = pytest.importorskip("transformers")

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 64, "max_position_embeddings": 64}

# family -> (config class name, keyword arguments): E experts, top-k, and each family's own settings
FAMILIES = {
    "mixtral": ("MixtralConfig", {"intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", {"intermediate_size": 64, "moe_intermediate_size": 48,
                                     "shared_expert_intermediate_size": 40, "num_experts": 4,
                                     "num_experts_per_tok": 2, "norm_topk_prob": False, "decoder_sparse_step": 1,
                                     "mlp_only_layers": []}),
    "qwen3_moe": ("Qwen3MoeConfig", {"intermediate_size": 64, "moe_intermediate_size": 48, "num_experts": 4,
                                     "num_experts_per_tok": 2, "norm_topk_prob": True, "head_dim": 8,
                                     "decoder_sparse_step": 1, "mlp_only_layers": []}),
    "olmoe": ("OlmoeConfig", {"intermediate_size": 48, "num_experts": 4, "num_experts_per_tok": 2,
                              "norm_topk_prob": False}),
    "deepseek_v3": ("DeepseekV3Config", {"intermediate_size": 64, "moe_intermediate_size": 24, "n_routed_experts": 8,
                                         "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4,
                                         "topk_group": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                                         "first_k_dense_replace": 1, "num_hidden_layers": 3,
                                         "num_key_value_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 16,
                                         "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8}),
}


def tiny_config(family: str, **overrides):
    name, kwargs = FAMILIES[family]
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    config = cls(**{**TINY, **kwargs, **overrides})
    config._attn_implementation = "eager"
    return config


def tiny_model(family: str, seed: int = 0, **overrides):
    """A random tiny causal LM whose MoE blocks have weights large enough to route decisively."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, block in hf_moe_blocks(model):
            for name, p in block.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "gate" in name.split(".")[0] else 0.15))
            bias = getattr(block.gate, "e_score_correction_bias", None)
            if bias is not None:  # a selection bias that changes some selections; positive, as the
                # blocks agree only where the kept experts' biased scores are (moe_layer_from_hf)
                bias.copy_(torch.rand(bias.shape, generator=g) * 0.1)
    return model


def block_output(block, x_BSD):
    out = block(x_BSD)
    return out[0] if isinstance(out, tuple) else out


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


DISPATCHES = [("loop", None), ("sorted", None), ("capacity", None)]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(("dispatch", "capacity_factor"), DISPATCHES, ids=[d for d, _ in DISPATCHES])
def test_converted_layer_equals_the_hf_block(family, dispatch, capacity_factor):
    model = tiny_model(family)
    _, _, block = hf_moe_blocks(model)[0]
    layer = moe_layer_from_hf(block, model.config, dispatch=dispatch, capacity_factor=capacity_factor)
    x = torch.randn(3, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = block_output(block, x)
        got, info = layer(x)
    assert rel_err(got, expected) <= 1e-5
    assert int(info.stats.dropped_assignments) == 0  # capacity_factor=None never drops


@pytest.mark.parametrize("family", list(FAMILIES))
def test_weights_go_back_into_the_hf_block(family):
    model = tiny_model(family)
    _, _, block = hf_moe_blocks(model)[0]
    layer = moe_layer_from_hf(block, model.config)
    with torch.no_grad():  # the workbench changes the layer (as training would) and writes it back
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if layer.router.bias is not None:
            layer.router.bias.add_(0.01)
    moe_layer_to_hf(layer, block, model.config)
    x = torch.randn(2, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(layer(x)[0], block_output(block, x)) <= 1e-5
    again = moe_layer_from_hf(block, model.config)
    for (name, a), (_, b) in zip(layer.state_dict().items(), again.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_every_dispatch_behind_replace_dispatch_computes_the_same():
    model = tiny_model("mixtral")
    layer = moe_layer_from_hf(hf_moe_blocks(model)[0][2], model.config)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = layer(x)[0]
        for dispatch in ("loop", "capacity"):
            assert rel_err(replace_dispatch(layer, dispatch)(x)[0], ref) <= 1e-6


def own_routing(block, config, logits_or_output):
    """(ids, weights) as the transformers block decides them, from what its gate returned."""
    out = logits_or_output
    if isinstance(out, tuple):
        ids = next(t for t in out if not t.is_floating_point())
        weights = next(t for t in out if t.is_floating_point() and t.shape == ids.shape)
        return ids, weights
    if hasattr(block, "route_tokens_to_experts"):  # the block's own routing function
        ids, weights = block.route_tokens_to_experts(out)
        return (ids, weights) if not ids.is_floating_point() else (weights, ids)
    # 4.x softmax gates return logits; the block then takes the top-k of the softmax
    probs = out.float().softmax(dim=-1)
    weights, ids = probs.topk(config.num_experts_per_tok, dim=-1)
    if config.model_type == "mixtral" or getattr(config, "norm_topk_prob", False):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


@pytest.mark.parametrize("family", list(FAMILIES))
def test_traces_match_the_models_own_router_outputs(family):
    model = tiny_model(family)
    config = model.config
    tokens = torch.randint(0, config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(3))
    blocks = hf_moe_blocks(model)
    captured = {}
    handles = [block.gate.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o))
               for i, (_, _, block) in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    domains = torch.arange(tokens.numel()).view(3, 10) % 2
    counts = collect_hf_routing(model, [(tokens, domains)], domains=["even", "odd"], probe_tokens=tokens)
    assert counts.layers == [i for i, _, _ in blocks] and counts.tokens == tokens.numel()
    assert counts.num_experts == moe_config_from_hf(config).num_experts
    E = counts.num_experts
    for li, (_, _, block) in enumerate(blocks):
        with torch.no_grad():
            ids, weights = own_routing(block, config, captured[li])
        # the probe keeps each token's experts ranked by gate: the same as the block's own decision
        assert torch.equal(counts.probe_topk_LPK[li], ranked_experts(ids.long(), weights.float()))
        expected_DE = torch.zeros(2, E, dtype=torch.long).index_put_(
            (domains.reshape(-1, 1).expand_as(ids).flatten(), ids.flatten().long()), torch.ones(1, dtype=torch.long),
            accumulate=True)
        assert torch.equal(counts.domain_expert_LDE[li], expected_DE)
    rows = specialization_table(counts, min_count=1)
    assert len(rows) == len(blocks) and all(r["domain_nmi"] == r["domain_nmi"] for r in rows)  # not NaN


def test_deepseek_layers_before_first_k_dense_replace_are_not_traced():
    model = tiny_model("deepseek_v3")
    assert [i for i, _, _ in hf_moe_blocks(model)] == [1, 2]


def test_conversion_refuses_what_the_workbench_cannot_express():
    with pytest.raises(ValueError, match="router_jitter_noise"):
        moe_config_from_hf(tiny_config("mixtral", router_jitter_noise=0.1))
    with pytest.raises(ValueError, match="hidden_act"):
        moe_config_from_hf(tiny_config("mixtral", hidden_act="gelu"))
    config = tiny_config("deepseek_v3")
    config.topk_method = "greedy"
    with pytest.raises(ValueError, match="topk_method"):
        moe_config_from_hf(config)
    llama = transformers.LlamaConfig(**TINY)
    with pytest.raises(ValueError, match="supported MoE families are mixtral"):
        moe_config_from_hf(llama)
    with pytest.raises(ValueError, match="no MoE block"):
        hf_moe_blocks(transformers.AutoModelForCausalLM.from_config(llama))


def test_writing_back_refuses_a_layer_with_other_router_settings():
    from dataclasses import replace

    from workbench.moe import MoELayer

    model = tiny_model("qwen3_moe")
    _, _, block = hf_moe_blocks(model)[0]
    layer = moe_layer_from_hf(block, model.config)
    other = MoELayer(32, replace(layer.cfg, normalize_topk=False))
    with pytest.raises(ValueError, match="normalize_topk"):
        moe_layer_to_hf(other, block, model.config)

