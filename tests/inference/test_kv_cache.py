"""Cached decode against the full causal forward, for every router that can decode.

The reference is ``MoELM.forward`` of each sequence alone (no padding, positions from 0), in
evaluation mode, with its MoE layers' dispatch in the dropless form that decoding uses. The cached
path runs the sequences as one left-padded batch: a prefill of prompts of different lengths, then
one token per sequence per step (teacher-forced, so that every position is compared whatever the
model would sample). Tolerance: 1e-5 on fp32 logits (the issue's bar; the observed differences
are a few 1e-7, from the attention's different reduction over masked slots).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from workbench.config import ModelConfig, MoEConfig
from workbench.inference import DecodeRefused, KVCache, generate
from workbench.inference.generation import left_pad
from workbench.kernels import cpu as cpu_kernels
from workbench.model import MoELM
from workbench.moe.dispatch import dropless_form
from workbench.moe.routers import ROUTERS, CausalLeakWarning

TOL = 1e-5
PROMPT_LENGTHS = (5, 9, 1)  # one batch, so the shorter prompts are left-padded
CONTINUATION = 7  # decode steps after the prefill


def build(seed: int = 0, *, fused: bool = False, n_layers: int = 2, seq_len: int = 32, **moe) -> MoELM:
    moe = {"num_experts": 4, "top_k": 2, "expert_hidden": 16, **moe}
    cfg = ModelConfig(seq_len=seq_len, d_model=32, n_layers=n_layers, n_heads=4, dense_hidden=32,
                      moe=MoEConfig(**moe))
    torch.manual_seed(seed)
    with warnings.catch_warnings(), cpu_kernels.fused_cpu_kernel(fused):
        warnings.simplefilter("ignore", CausalLeakWarning)
        model = MoELM(cfg).eval()
    for layer in model.moe_layers():  # a bias that matters, where loss-free balancing is on
        if layer.router.bias is not None:
            layer.router.bias.copy_(torch.randn_like(layer.router.bias) * 0.3)
    return model


def sequences(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n + CONTINUATION,), generator=g).tolist() for n in PROMPT_LENGTHS]


def reference(model: MoELM, ids: list[int]):
    """The full causal forward of one sequence, dropless, as decoding runs it."""
    saved = [layer.dispatch for layer in model.moe_layers()]
    for layer in model.moe_layers():
        layer.dispatch = dropless_form(layer.dispatch)
    try:
        with torch.no_grad():
            return model(torch.tensor([ids]))
    finally:
        for layer, dispatch in zip(model.moe_layers(), saved, strict=True):
            layer.dispatch = dispatch


def cached_logits_and_routing(model: MoELM, seqs: list[list[int]]):
    """Per sequence: its (N, V) logits and per MoE layer its (N, K) experts and gates, from a
    left-padded prefill of the prompts plus one decode step per remaining token."""
    prompts = [s[:n] for s, n in zip(seqs, PROMPT_LENGTHS, strict=True)]
    tokens_BP, real_BP = left_pad(prompts, torch.device("cpu"))
    B, P = tokens_BP.shape
    cache = KVCache(model, B, P + CONTINUATION)
    out = model.forward_cached(tokens_BP, cache, real_BP)
    logits = [out.logits[b, P - n:] for b, n in enumerate(PROMPT_LENGTHS)]
    experts = [[r.router_output.expert_ids_TK.view(B, P, -1)[b, P - n:] for r in out.routing]
               for b, n in enumerate(PROMPT_LENGTHS)]
    gates = [[r.router_output.weights_TK.view(B, P, -1)[b, P - n:] for r in out.routing]
             for b, n in enumerate(PROMPT_LENGTHS)]
    for step in range(CONTINUATION):
        next_B1 = torch.tensor([[s[n + step]] for s, n in zip(seqs, PROMPT_LENGTHS, strict=True)])
        out = model.forward_cached(next_B1, cache)
        for b in range(B):
            logits[b] = torch.cat([logits[b], out.logits[b]])
            for layer, r in enumerate(out.routing):
                experts[b][layer] = torch.cat([experts[b][layer], r.router_output.expert_ids_TK[b:b + 1]])
                gates[b][layer] = torch.cat([gates[b][layer], r.router_output.weights_TK[b:b + 1]])
    return logits, experts, gates


def assert_cached_equals_full(model: MoELM) -> None:
    seqs = sequences()
    logits, experts, gates = cached_logits_and_routing(model, seqs)
    for b, ids in enumerate(seqs):
        ref = reference(model, ids[:-1])  # the last token is only fed, never predicted from
        torch.testing.assert_close(logits[b][:-1], ref.logits[0], atol=TOL, rtol=0)
        for layer, info in enumerate(ref.routing):
            ref_ids, order = info.router_output.expert_ids_TK.sort(dim=-1)
            got_ids, got_order = experts[b][layer][:-1].sort(dim=-1)
            assert torch.equal(got_ids, ref_ids), f"sequence {b}, MoE layer {layer}: experts differ"
            torch.testing.assert_close(gates[b][layer][:-1].gather(1, got_order),
                                       info.router_output.weights_TK.gather(1, order), atol=TOL, rtol=0)


DECODABLE = sorted(name for name, cls in ROUTERS.items() if cls.decode_refusal(MoEConfig()) is None)


def router_options(name: str) -> dict:
    options = {"router": name}
    if ROUTERS[name].fixed_top_k is not None:
        options["top_k"] = ROUTERS[name].fixed_top_k
    return options


def test_the_decodable_routers_are_the_token_choice_ones():
    assert DECODABLE == ["cosine", "hash", "noisy_topk", "sigmoid", "sinkhorn", "softmax_topk", "switch"]


@pytest.mark.parametrize("router", DECODABLE)
@pytest.mark.parametrize("fused", [False, True], ids=["readable", "fused kernels"])
def test_cached_decode_equals_the_full_forward(router, fused):
    if fused and not cpu_kernels.kernel_available():
        pytest.skip("the fused CPU kernels cannot be built here")
    assert_cached_equals_full(build(fused=fused, **router_options(router)))


def test_expert_choice_decodes_in_its_causal_evaluation_form():
    assert_cached_equals_full(build(router="expert_choice", expert_choice_eval="token_choice"))


@pytest.mark.parametrize("options", [
    {"dispatch": "loop"},
    {"dispatch": "sorted"},
    {"dispatch": "capacity", "capacity_factor": 0.5},  # drops in training; dropless in decode
    {"dispatch": "capacity", "capacity_factor": 0.5, "capacity_scope": "sequence"},
    {"num_shared_experts": 1},
    {"num_shared_experts": 1, "shared_expert_gate": True},
    {"router": "sigmoid", "bias_update_rate": 1e-3},  # loss-free balancing's bias selects
    {"router": "sigmoid", "num_experts": 8, "num_groups": 4, "topk_groups": 2, "route_scale": 2.5},
    {"router": "softmax_topk", "normalize_topk": False},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_cached_decode_equals_the_full_forward_for_every_dispatch_and_option(options):
    assert_cached_equals_full(build(**options))


def test_dense_layers_between_moe_layers():
    cfg = ModelConfig(seq_len=32, d_model=32, n_layers=3, n_heads=4, dense_hidden=32, first_dense_layers=1,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16))
    torch.manual_seed(0)
    assert_cached_equals_full(MoELM(cfg).eval())


@pytest.mark.parametrize("name,options", [
    ("expert_choice", {}), ("soft_moe", {}), ("uniform", {}), ("random", {}),
])
def test_routers_that_look_at_other_tokens_are_refused_in_one_line(name, options):
    model = build(**router_options(name), **options)
    with pytest.raises(DecodeRefused) as err:
        generate(model, "abc", 4)
    message = str(err.value)
    assert "\n" not in message and f"router={name!r}" in message and "cannot generate token by token" in message


def test_generate_records_the_teacher_forced_routing_of_its_own_text():
    model = build(router="sigmoid", bias_update_rate=1e-3)
    result = generate(model, ["hello", "12 + 3 =", "x"], 9, temperature=1.0, seed=4)
    for b, ids in enumerate(result.tokens):
        ref = reference(model, ids)
        for layer, info in zip(result.routing, ref.routing, strict=True):
            got = layer.expert_ids[b, :len(ids)].sort(dim=-1).values
            assert torch.equal(got, info.router_output.expert_ids_TK.sort(dim=-1).values)
            assert (layer.expert_ids[b, len(ids):] == -1).all()


def test_greedy_cached_decode_equals_greedy_recompute():
    model = build()
    cached = generate(model, ["hello", "12 + 3 =", "x"], 12)
    recomputed = generate(model, ["hello", "12 + 3 =", "x"], 12, use_cache=False)
    assert cached.new_tokens == recomputed.new_tokens
    for a, b in zip(cached.routing, recomputed.routing, strict=True):
        assert torch.equal(a.expert_ids.sort(dim=-1).values, b.expert_ids.sort(dim=-1).values)


def test_greedy_generation_follows_the_argmax_of_the_full_forward():
    model = build()
    result = generate(model, "hello", 10)
    ids = result.tokens[0]
    with torch.no_grad():
        argmax = model(torch.tensor([ids[:-1]])).logits[0].argmax(dim=-1).tolist()
    assert argmax[len("hello") - 1:] == result.new_tokens[0]


def test_a_decode_step_allocates_no_new_cache():
    model = build()
    cache = KVCache(model, 2, 16)
    pointers = (cache.keys.data_ptr(), cache.values.data_ptr(), cache.key_pos_BW.data_ptr())
    model.forward_cached(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache)
    for token in range(5):
        model.forward_cached(torch.tensor([[token], [token + 1]]), cache)
    assert (cache.keys.data_ptr(), cache.values.data_ptr(), cache.key_pos_BW.data_ptr()) == pointers
    assert cache.written == 8 and cache.free_slots == 8


def test_the_cache_refuses_more_tokens_than_its_slots():
    model = build()
    cache = KVCache(model, 1, 4)
    model.forward_cached(torch.tensor([[1, 2, 3, 4]]), cache)
    with pytest.raises(ValueError, match="more than the cache's 4 slots"):
        model.forward_cached(torch.tensor([[5]]), cache)


def test_generation_stops_at_the_context_unless_a_window_is_chosen():
    model = build(seq_len=16)
    with pytest.raises(ValueError) as err:
        generate(model, "hello", 12)
    assert str(err.value).startswith("max_new_tokens") and "seq_len=16" in str(err.value)
    assert "\n" not in str(err.value)
    result = generate(model, "hello", 40, window=16)
    assert len(result.new_tokens[0]) == 40
    assert all(r.expert_ids.shape[1] == 45 for r in result.routing)


def test_a_full_window_equals_no_window_within_the_context():
    model = build(seq_len=32)
    assert generate(model, ["hello", "x"], 20, window=32).new_tokens == generate(model, ["hello", "x"], 20).new_tokens


def test_past_the_context_a_window_attends_to_exactly_the_last_w_tokens():
    """With a window of w, the logits at a position p >= w equal the full forward of the w tokens
    ending at p only while every key in the window was itself computed from a full history; in
    the first layer, keys depend on the token alone, so the first layer's attention output is the
    banded attention. Checked end to end on a one-layer model: position p's logits equal the full
    forward of tokens p-w+1..p shifted to positions 0..w-1 (RoPE is relative)."""
    cfg = ModelConfig(seq_len=8, d_model=32, n_layers=1, n_heads=4, dense_hidden=32,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16))
    torch.manual_seed(0)
    model = MoELM(cfg).eval()
    ids = torch.randint(0, 256, (20,)).tolist()
    window = 8
    cache = KVCache(model, 1, window, window=window, max_positions=len(ids))
    got = [model.forward_cached(torch.tensor([[ids[0]]]), cache).logits[0, -1]]
    for t in ids[1:]:
        got.append(model.forward_cached(torch.tensor([[t]]), cache).logits[0, -1])
    for p in range(window, len(ids)):
        with torch.no_grad():
            ref = model(torch.tensor([ids[p - window + 1:p + 1]])).logits[0, -1]
        torch.testing.assert_close(got[p], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kwargs,field", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"stop": "ab"}, "stop"),
    ({"seed": -1}, "seed"),
    ({"prompts": ""}, "prompts[0]"),
    ({"prompts": [[300]]}, "prompts[0]"),
    ({"window": 64}, "window"),
])
def test_bad_arguments_are_one_line_errors_naming_the_argument(kwargs, field):
    model = build()
    args = {"prompts": "hello", "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError) as err:
        generate(model, args.pop("prompts"), args.pop("max_new_tokens"), **args)
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_generation_leaves_the_model_in_its_training_mode():
    model = build().train()
    generate(model, "ab", 3)
    assert model.training
    assert all(not torch.is_inference(p) for p in model.parameters())


def test_a_compiled_decode_step_compiles_once_for_prefill_and_once_for_decode():
    """Static shapes: the step counter that changes at every step is a tensor (and the host-side
    bounds check runs outside the graph), so Dynamo compiles each frame for the prefill's shape and
    for the decode step's shape, and never again. ``backend="eager"`` traces without code generation.
    The capacity dispatch (dropless in decode: C = T) is the one with static shapes; the loop and
    sorted ones size their groups by the routing, so they recompile as the routing changes."""
    import torch._dynamo

    model = build(dispatch="capacity")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    eager_cache, compiled_cache = KVCache(model, 2, 16), KVCache(model, 2, 16)
    torch._dynamo.reset()
    step = torch.compile(model.forward_cached, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        expected = [model.forward_cached(ids[:, :4], eager_cache).logits]
        got = [step(ids[:, :4], compiled_cache).logits]
        for t in range(4, 16):  # would raise past two compilations of any frame
            expected.append(model.forward_cached(ids[:, t:t + 1], eager_cache).logits)
            got.append(step(ids[:, t:t + 1], compiled_cache).logits)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(expected, 1), atol=1e-6, rtol=0)
