"""Hugging Face ``transformers`` MoE models: routing traces through hooks, and MoE blocks to and from
the workbench's ``MoELayer``.

The families and how their routers map onto the workbench's (``moe_config_from_hf``):

================  ==============================================  ========================================
``model_type``    router                                          workbench ``MoEConfig``
================  ==============================================  ========================================
``mixtral``       softmax, top-k, renormalised over the k         ``softmax_topk``, ``normalize_topk=True``
``qwen2_moe``     softmax, top-k, renormalised if                 ``softmax_topk``; the shared expert with
                  ``norm_topk_prob``; a shared expert scaled by   ``shared_expert_gate=True``
                  sigmoid(x . w)
``qwen3_moe``     softmax, top-k, renormalised if                 ``softmax_topk``
                  ``norm_topk_prob``
``olmoe``         softmax, top-k, renormalised if                 ``softmax_topk``
                  ``norm_topk_prob``
``deepseek_v3``   sigmoid affinities; top-k of affinity +         ``sigmoid`` with the bias as its
                  ``e_score_correction_bias`` within the          selection bias, ``num_groups``,
                  ``topk_group`` best of ``n_group`` groups;      ``topk_groups``, ``route_scale``; the
                  gates renormalised if ``norm_topk_prob``, times  shared experts merged into one MLP of
                  ``routed_scaling_factor``; shared experts       ``n_shared_experts`` x hidden
================  ==============================================  ========================================

Every family's experts are SwiGLU: ``silu(x W_gate) * (x W_up)) W_down``, stored either as one
module per expert (``transformers`` 4.x: ``w1/w3/w2`` or ``gate_proj/up_proj/down_proj``) or as
stacked tensors (5.x: ``gate_up_proj`` (E, 2H, D) with the gate half first, ``down_proj``
(E, D, H)); the workbench stacks them as ``w1``, ``w3`` (E, D, H) and ``w2`` (E, H, D), so the
conversion is transposes. What the workbench cannot express is refused, naming the setting: another
activation (``hidden_act``), Mixtral's router jitter (it also scales the experts' input),
biases on the expert projections, another DeepSeek ``topk_method`` or ``scoring_func``.

Traces (``collect_hf_routing``) hook every MoE block: where the block hands its experts the chosen
ids and gates (``transformers`` 5.x, ``experts(hidden, top_k_index, top_k_weights)``) the hook reads
them there, the model's own decision; where the router returns them (DeepSeek-V3 in 4.x) it reads
its output; where the router returns only logits (4.x ``nn.Linear`` gates) the hook routes the
router's input with the converted workbench router, whose equality with the block is tested.
Both layouts are tested (``transformers`` 4.57 and 5.24). The counts are the workbench's
``RoutingCounts``, so every analysis of
``workbench.analysis.specialization`` runs unchanged on a pretrained model on disk::

    model = AutoModelForCausalLM.from_pretrained("/path/to/OLMoE-1B-7B", torch_dtype=torch.bfloat16)
    counts = collect_hf_routing(model, batches_of_token_ids)     # (tokens, domain ids) pairs work too
    specialization_table(counts)

Shape legend: B batch, S sequence, T tokens, D model dim, H expert hidden, E experts, K experts per token.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from workbench.analysis.traces import RoutingCollector, RoutingCounts, stream_routing
from workbench.moe import MoEConfig, MoELayer, build_router

HF_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")

# DeepSeek-V3's bias update speed gamma for most of its pretraining (DeepSeek-AI 2024,
# arXiv:2412.19437, section 4.2). A converted DeepSeek-V3 layer needs bias_update_rate > 0 for its
# router to hold the bias buffer at all; it moves only when someone trains the layer.
DEEPSEEK_V3_BIAS_UPDATE_RATE = 0.001


def require_transformers() -> Any:
    """Import ``transformers``, or one clear sentence on how to install it."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError("Hugging Face interop needs transformers: pip install 'moe-workbench[hf]' "
                          "(or pip install 'transformers>=4.46')") from err
    return transformers


def _cfg(config: Any, name: str, default: Any = None) -> Any:
    return getattr(config, name, default)


def _refuse(setting: str, value: Any, why: str) -> None:
    raise ValueError(f"{setting}={value!r} cannot be expressed by the workbench's MoELayer: {why}")


def moe_config_from_hf(config: Any, *, dispatch: str = "sorted", capacity_factor: float | None = None,
                       bias_update_rate: float | None = None) -> MoEConfig:
    """The ``MoEConfig`` of one MoE block of a ``transformers`` config (see the module table).

    ``dispatch`` and ``capacity_factor`` choose the workbench dispatch (``capacity`` with
    ``capacity_factor=None`` never drops, as the Hugging Face blocks never do). For DeepSeek-V3,
    ``bias_update_rate`` (default ``DEEPSEEK_V3_BIAS_UPDATE_RATE``) is the loss-free balancing
    rate, which gives the router the bias buffer that holds ``e_score_correction_bias``.
    ``ValueError`` names the setting the workbench cannot express, or lists the known families.
    """
    require_transformers()  # a config comes from transformers; without it, say how to install it
    family = _cfg(config, "model_type")
    if family not in HF_FAMILIES:
        raise ValueError(f"model_type={family!r} is invalid: the supported MoE families are "
                         + ", ".join(HF_FAMILIES))
    act = _cfg(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        _refuse("hidden_act", act, "the workbench's experts are SwiGLU (silu)")
    common: dict[str, Any] = {"top_k": config.num_experts_per_tok, "dispatch": dispatch,
                              "capacity_factor": capacity_factor, "router": "softmax_topk",
                              # balancing losses: reported, not weighted (inference and analysis)
                              "aux_loss_weight": 0.0}
    if family == "mixtral":
        jitter = _cfg(config, "router_jitter_noise", 0.0) or 0.0
        if jitter > 0:
            _refuse("router_jitter_noise", jitter, "Mixtral multiplies the hidden states seen by the router *and* "
                    "the experts by the noise; the workbench's router_jitter perturbs the router input only. Set it "
                    "to 0 for analysis (it applies in training mode only)")
        return MoEConfig(num_experts=config.num_local_experts, expert_hidden=config.intermediate_size,
                         normalize_topk=True, **common)
    if family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        hidden = config.intermediate_size if family == "olmoe" else config.moe_intermediate_size
        shared: dict[str, Any] = {}
        if family == "qwen2_moe" and (_cfg(config, "shared_expert_intermediate_size", 0) or 0) > 0:
            shared = {"num_shared_experts": 1, "shared_expert_hidden": config.shared_expert_intermediate_size,
                      "shared_expert_gate": True}
        return MoEConfig(num_experts=config.num_experts, expert_hidden=hidden,
                         normalize_topk=bool(_cfg(config, "norm_topk_prob", False)), **shared, **common)
    # deepseek_v3
    for name, wanted in (("topk_method", "noaux_tc"), ("scoring_func", "sigmoid")):
        value = _cfg(config, name, wanted)
        if value != wanted:
            _refuse(name, value, f"the workbench's sigmoid router implements DeepSeek-V3's {wanted!r} only")
    n_shared = _cfg(config, "n_shared_experts", 0) or 0
    shared = ({"num_shared_experts": n_shared, "shared_expert_hidden": n_shared * config.moe_intermediate_size}
              if n_shared else {})
    common["router"] = "sigmoid"
    rate = DEEPSEEK_V3_BIAS_UPDATE_RATE if bias_update_rate is None else bias_update_rate
    return MoEConfig(num_experts=config.n_routed_experts, expert_hidden=config.moe_intermediate_size,
                     normalize_topk=bool(_cfg(config, "norm_topk_prob", True)), num_groups=config.n_group or 1,
                     topk_groups=config.topk_group or 1, route_scale=float(config.routed_scaling_factor),
                     bias_update_rate=rate, **shared, **common)


# --- finding the MoE blocks ------------------------------------------------------------------------


def _is_moe_block(module: nn.Module) -> bool:
    experts = getattr(module, "experts", None)
    return (isinstance(getattr(module, "gate", None), nn.Module) and experts is not None
            and (isinstance(experts, nn.ModuleList) or hasattr(experts, "gate_up_proj")))


def hf_moe_blocks(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """(layer index, module name, block) of every MoE block of a ``transformers`` model, in depth
    order; the layer index is the decoder layer's (``model.layers.<i>``), dense layers left out."""
    blocks = []
    for name, module in model.named_modules():
        if _is_moe_block(module):
            found = re.search(r"layers\.(\d+)\.", name + ".")
            blocks.append((int(found.group(1)) if found else len(blocks), name, module))
    if not blocks:
        raise ValueError(f"model ({type(model).__name__}) has no MoE block (a module with a gate and experts): the "
                         "supported families are " + ", ".join(HF_FAMILIES))
    return sorted(blocks, key=lambda b: b[0])


# --- weights ---------------------------------------------------------------------------------------


def _mlp_parts(mlp: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """(gate, up, down) projections of a per-expert or shared SwiGLU MLP."""
    for names in (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")):
        if all(hasattr(mlp, n) for n in names):
            parts = tuple(getattr(mlp, n) for n in names)
            for n, p in zip(names, parts, strict=True):
                if getattr(p, "bias", None) is not None:
                    _refuse(f"{n}.bias", "present", "the workbench's experts have no biases")
            return parts  # type: ignore[return-value]
    raise ValueError(f"an expert MLP of type {type(mlp).__name__} has neither w1/w3/w2 nor gate/up/down projections")


def _stacked_layout(experts: nn.Module, H: int) -> bool:
    """True for the 5.x layout gate_up_proj (E, 2H, D), False for the transposed (E, D, 2H)."""
    if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) is not None:
        _refuse("experts.has_bias", True, "the workbench's experts have no biases")
    if getattr(experts, "is_concatenated", True) is False:
        _refuse("experts.is_concatenated", False, "separate gate and up tensors are not a layout this converter reads")
    transposed = getattr(experts, "is_transposed", None)
    if transposed is None:
        transposed = experts.gate_up_proj.shape[1] != 2 * H
    return not transposed


def _expert_weights(block: nn.Module, H: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w1, w3: (E, D, H), w2: (E, H, D)) of a block's routed experts."""
    experts = block.experts
    if isinstance(experts, nn.ModuleList):
        parts = [_mlp_parts(e) for e in experts]
        w1 = torch.stack([g.weight.t() for g, _, _ in parts])
        w3 = torch.stack([u.weight.t() for _, u, _ in parts])
        w2 = torch.stack([d.weight.t() for _, _, d in parts])
        return w1, w3, w2
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if _stacked_layout(experts, H):  # (E, 2H, D), (E, D, H)
        return gate_up[:, :H].transpose(1, 2), gate_up[:, H:].transpose(1, 2), down.transpose(1, 2)
    return gate_up[..., :H], gate_up[..., H:], down  # (E, D, 2H), (E, H, D)


def _shared_mlp(block: nn.Module) -> nn.Module | None:
    return getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)


@torch.no_grad()
def _copy_router(router: nn.Module, block: nn.Module, cfg: MoEConfig, d_model: int) -> None:
    router_weight = block.gate.weight
    if tuple(router_weight.shape) != (cfg.num_experts, d_model):
        raise ValueError(f"block.gate.weight has shape {tuple(router_weight.shape)}, the config says "
                         f"({cfg.num_experts}, {d_model}): pass the config of the model the block belongs to")
    router.weight.copy_(router_weight.float())
    if cfg.router == "sigmoid":
        bias = getattr(block.gate, "e_score_correction_bias", None)
        if bias is not None:
            router.bias.copy_(bias.float())
        elif router.bias is not None:
            router.bias.zero_()


def router_from_hf(block: nn.Module, config: Any) -> nn.Module:
    """The workbench router (``workbench.moe.Router``) of a ``transformers`` MoE block, with its weights."""
    cfg = moe_config_from_hf(config)
    router = build_router(config.hidden_size, cfg)
    _copy_router(router, block, cfg, config.hidden_size)
    return router.train(block.training)


@torch.no_grad()
def moe_layer_from_hf(block: nn.Module, config: Any, *, dispatch: str = "sorted", capacity_factor: float | None = None,
                      bias_update_rate: float | None = None) -> MoELayer:
    """A workbench ``MoELayer`` (fp32) that computes what the ``transformers`` MoE ``block`` computes.

    ``config`` is the model's ``transformers`` config (``model.config``); ``dispatch`` and
    ``capacity_factor`` as for ``moe_config_from_hf``. The router weight, DeepSeek-V3's
    ``e_score_correction_bias`` (as the selection bias), the routed experts, the shared expert(s)
    and Qwen2-MoE's shared expert gate are copied. The layer is in the block's train/eval mode.

    Equal outputs (tested at relative error 1e-5 in fp32 for every dispatch). Some ``transformers``
    releases set the experts of DeepSeek-V3's dropped groups to 0 before the top-k where the
    workbench (and recent releases) set them to -inf; those select alike whenever the kept experts'
    biased scores are positive (a sigmoid plus a bias smaller than it, as in trained checkpoints).
    """
    cfg = moe_config_from_hf(config, dispatch=dispatch, capacity_factor=capacity_factor,
                             bias_update_rate=bias_update_rate)
    D = config.hidden_size
    layer = MoELayer(D, cfg)
    _copy_router(layer.router, block, cfg, D)
    w1, w3, w2 = _expert_weights(block, cfg.expert_hidden)
    if tuple(w1.shape) != tuple(layer.experts.w1.shape):
        raise ValueError(f"the block's experts have shape {tuple(w1.shape)} (E, D, H); the config says "
                         f"{tuple(layer.experts.w1.shape)}")
    layer.experts.w1.copy_(w1.float())
    layer.experts.w3.copy_(w3.float())
    layer.experts.w2.copy_(w2.float())
    shared = _shared_mlp(block)
    if (shared is None) != (layer.shared_experts is None):
        raise ValueError("the block's shared expert and the config disagree: pass the config of the model the "
                         "block belongs to")
    if shared is not None:
        g, u, d = _mlp_parts(shared)
        layer.shared_experts.w1.weight.copy_(g.weight.float())
        layer.shared_experts.w3.weight.copy_(u.weight.float())
        layer.shared_experts.w2.weight.copy_(d.weight.float())
    if layer.shared_gate is not None:
        layer.shared_gate.weight.copy_(block.shared_expert_gate.weight.float())
    layer.train(block.training)
    return layer


_ROUTER_FIELDS = ("router", "num_experts", "top_k", "expert_hidden", "normalize_topk", "num_groups", "topk_groups",
                  "route_scale", "num_shared_experts", "shared_hidden", "shared_expert_gate")


@torch.no_grad()
def moe_layer_to_hf(layer: MoELayer, block: nn.Module, config: Any) -> None:
    """Copy a workbench ``MoELayer``'s weights into the ``transformers`` MoE ``block`` (in place, in the
    block's dtype): the inverse of ``moe_layer_from_hf``, for a layer studied or trained with the
    workbench's tools. The layer must compute what the block does: ``ValueError`` names the first
    setting that differs (router, experts, normalisation, groups, scale, shared experts)."""
    want = moe_config_from_hf(config)
    for name in _ROUTER_FIELDS:
        mine, theirs = getattr(layer.cfg, name), getattr(want, name)
        if name == "normalize_topk":  # None means the router's default
            mine = layer.router.normalize_topk
        if mine != theirs:
            raise ValueError(f"MoEConfig.{name}={mine!r} cannot go into this {config.model_type} block, whose "
                             f"router needs {name}={theirs!r}")
    dtype = block.gate.weight.dtype
    block.gate.weight.copy_(layer.router.weight.to(dtype))
    bias = getattr(block.gate, "e_score_correction_bias", None)
    if bias is not None:
        bias.copy_((layer.router.bias if layer.router.bias is not None else torch.zeros_like(bias)).to(bias.dtype))
    H = layer.cfg.expert_hidden
    w1, w3, w2 = layer.experts.w1, layer.experts.w3, layer.experts.w2
    experts = block.experts
    if isinstance(experts, nn.ModuleList):
        for e, mlp in enumerate(experts):
            g, u, d = _mlp_parts(mlp)
            g.weight.copy_(w1[e].t().to(dtype))
            u.weight.copy_(w3[e].t().to(dtype))
            d.weight.copy_(w2[e].t().to(dtype))
    elif _stacked_layout(experts, H):
        experts.gate_up_proj.copy_(torch.cat([w1, w3], dim=2).transpose(1, 2).to(dtype))
        experts.down_proj.copy_(w2.transpose(1, 2).to(dtype))
    else:
        experts.gate_up_proj.copy_(torch.cat([w1, w3], dim=2).to(dtype))
        experts.down_proj.copy_(w2.to(dtype))
    shared = _shared_mlp(block)
    if shared is not None:
        g, u, d = _mlp_parts(shared)
        g.weight.copy_(layer.shared_experts.w1.weight.to(dtype))
        u.weight.copy_(layer.shared_experts.w3.weight.to(dtype))
        d.weight.copy_(layer.shared_experts.w2.weight.to(dtype))
    if layer.shared_gate is not None:
        block.shared_expert_gate.weight.copy_(layer.shared_gate.weight.to(dtype))


# --- traces ----------------------------------------------------------------------------------------


class _BlockHook:
    """Captures one block's routing per forward: (expert ids (T, K), gates (T, K))."""

    def __init__(self, block: nn.Module, config: Any):
        self.block = block
        self.captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles = []
        experts = block.experts
        self.router = None
        if type(experts).forward is not nn.Module.forward:
            # the experts module receives the block's own decision (5.x; some 4.x ModuleList subclasses)
            self.handles.append(experts.register_forward_pre_hook(self._experts_pre_hook, with_kwargs=True))
        else:
            self.handles.append(block.gate.register_forward_hook(self._gate_hook))
            # a workbench router with the block's weights, for gates that return logits only
            self.router = router_from_hf(block, config).eval()

    def _experts_pre_hook(self, module, args, kwargs):
        ids = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
        weights = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
        if ids is None or weights is None:
            raise RuntimeError(f"{type(module).__name__} was called without top_k_index and top_k_weights: this "
                               "transformers version's experts interface is not supported for traces")
        self.captured.append((ids.detach(), weights.detach()))

    @torch.no_grad()
    def _gate_hook(self, module, args, output):
        if isinstance(output, tuple) and len(output) == 2 and not output[0].is_floating_point():
            ids, weights = output  # DeepSeek-V3 in 4.x: (topk_indices, topk_weights)
        else:
            x = args[0]
            routed = self.router(x.reshape(-1, x.shape[-1]))
            ids, weights = routed.expert_ids_TK, routed.weights_TK
        self.captured.append((ids.detach(), weights.detach()))

    def pop(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.captured) != 1:
            raise RuntimeError(f"an MoE block routed {len(self.captured)} times in one forward; expected once")
        return self.captured.pop()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class hf_routing_hooks:
    """Context manager: hooks on every MoE block of a ``transformers`` model; ``routing()`` after a
    forward returns one (expert ids (T, K), gates (T, K), None) per MoE block, in depth order."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks = hf_moe_blocks(model)
        self.layers = [i for i, _, _ in self.blocks]
        self.hooks: list[_BlockHook] = []

    def __enter__(self) -> hf_routing_hooks:
        self.hooks = [_BlockHook(block, self.model.config) for _, _, block in self.blocks]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.hooks:
            h.remove()

    def routing(self) -> list[tuple[torch.Tensor, torch.Tensor, None]]:
        return [(*h.pop(), None) for h in self.hooks]


def _num_experts(config: Any) -> int:
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = _cfg(config, name)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"config ({type(config).__name__}) names no expert count (num_local_experts, num_experts or "
                     "n_routed_experts)")


@torch.no_grad()
def collect_hf_routing(model: nn.Module, batches: Iterable[Any], *, domains: Sequence[str] | None = None,
                       probe_tokens: torch.Tensor | None = None, max_batches: int | None = None) -> RoutingCounts:
    """``RoutingCounts`` of a ``transformers`` MoE model over ``batches``, through hooks on its MoE
    blocks (see the module docstring); the analyses of ``workbench.analysis.specialization`` run on
    them unchanged.

    ``batches`` yields (B, S) token id tensors, (tokens, domain ids) pairs or ``Batch`` objects;
    ``domains`` names the domain ids. ``probe_tokens`` (B, S): a fixed probe set whose ranked experts
    are kept, for router saturation across checkpoints (``revision=`` of ``from_pretrained``). The
    model runs in evaluation mode (restored after) on its own device, without a KV cache. Every token
    of a batch is counted, so pack text into full windows rather than padding them.
    """
    config = model.config
    with hf_routing_hooks(model) as hooks:
        collector = RoutingCollector(hooks.layers, _num_experts(config), config.num_experts_per_tok,
                                     config.vocab_size, domains)
        collector.notes.append(f"{config.model_type}: traced through hooks on {len(hooks.layers)} MoE blocks")
        device = next(model.parameters()).device

        def route(tokens: torch.Tensor) -> Any:
            model(input_ids=tokens.to(device), use_cache=False)
            return hooks.routing()

        return stream_routing(model, collector, batches, route, probe_tokens=probe_tokens, max_batches=max_batches)


def replace_dispatch(layer: MoELayer, dispatch: str, capacity_factor: float | None = None) -> MoELayer:
    """The same weights behind another dispatch (a new layer; the state dict carries over)."""
    cfg = replace(layer.cfg, dispatch=dispatch, capacity_factor=capacity_factor)
    other = MoELayer(layer.experts.d_model, cfg)
    other.load_state_dict(layer.state_dict())
    return other.train(layer.training)
