"""What a fine-tuning trains: parameter groups, and the experts ESFT selects.

``TrainConfig.trainable`` names one group; every other parameter is frozen. The groups, by module
of ``MoELM`` (names as ``model.named_parameters()`` gives them):

=============  ==================================================================================
``all``        every parameter (the default: ordinary training)
``non_router`` everything but the routers: fine-tuning with frozen routers (the routing, and the
               loss-free bias with it, stays as pretrained while experts and the rest adapt)
``routers``    each MoE layer's router, ``blocks.N.ffn.router.*``: the gate ``weight``, and what a
               router adds (noisy top-k's ``noise_weight``; cosine's ``expert_embed`` and
               ``log_inv_temperature``)
``experts``    each MoE layer's routed experts, ``blocks.N.ffn.experts.{w1,w3,w2}`` (stacked, E first)
``attention``  each block's attention projections, ``blocks.N.attn.{qkv,out}.weight`` (not the norms)
``non_moe``    everything but the routers and the routed experts: embeddings, attention, norms, the
               dense FFNs of dense blocks, the LM head, and the shared experts with their gate.
               ST-MoE's "non-MoE parameters" (Zoph et al. 2022, "ST-MoE: Designing Stable and
               Transferable Sparse Expert Models", arXiv:2202.08906, "fine-tuning a subset of
               parameters": updating only them does about as well as updating all, only the MoE
               parameters does markedly worse)
``esft``       only the routed experts ESFT selects in each layer (slices of the stacked tensors)
=============  ==================================================================================

Shared experts (DeepSeekMoE, Qwen2-MoE) see every token: they are a dense FFN beside the routed
ones, so they belong to ``non_moe``, not to ``experts``, and ESFT freezes them (as the paper does).

The loss-free balancing bias (``router.bias``, a buffer the optimizer never sees) moves routing
as a router's weights do: it is held fixed whenever the routers are frozen (every group but
``all`` and ``routers``), so that a frozen router routes as it did.

**ESFT** (Wang et al. 2024, "Let the Expert Stick to His Last: Expert-Specialized Fine-Tuning for
Sparse Architectural LLMs", arXiv:2407.01906, sec. 3): the relevance of expert e of layer l to a
task is its share of the task's routing. The paper measures it two ways, the average gate score and
the token selection ratio ``r_e = (1/N) sum_tokens 1[e in top-K(token)] / K``; here it is the
latter, the share of the layer's token-expert assignments on the target domain's text
(``counts_LE[l, e] / counts_LE[l].sum()``), which the trainer counts as its validation counts
routing. Three rules turn shares into a selection, per layer (``esft_select``):

- ``threshold=t``: every expert whose share is above ``t`` (strictly: ``share > t``);
- ``top_n=n``: the ``n`` experts with the largest shares (a tie goes to the lower expert index);
- ``top_p=p``: the paper's rule, the fewest experts, largest shares first, whose shares add up to
  at least ``p``.

A layer may select no expert (``threshold`` above all its shares): it then trains nothing.

Freezing a whole tensor sets ``requires_grad=False``, so the optimizer never holds it. Freezing
some experts of a stacked tensor cannot: (1) a gradient hook zeroes the frozen experts' slices,
so clipping's norm is the trained parameters' norm; (2) after each optimizer step, ``Freezing.restore``
copies their values back. (2) is needed for bit-equality: AdamW's decoupled weight decay,
``p -= lr * wd * p``, moves a parameter whose gradient is zero (its moments stay exactly zero, so
the Adam term is zero; the decay is not). Restoring is simpler and more robust than masking the
update inside the (fused) optimizer, at the cost of a copy of the frozen slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workbench.train.config import TRAINABLE
from workbench.validation import check as _check

# Groups whose routers do not train: their loss-free balancing bias is held fixed too.
ROUTER_FROZEN = ("non_router", "non_moe", "experts", "attention", "esft")


def _moe_layers(model: nn.Module) -> list[nn.Module]:
    return list(model.moe_layers()) if hasattr(model, "moe_layers") else []


def parameter_group(model: nn.Module, group: str) -> dict[str, nn.Parameter]:
    """The parameters of ``group`` (see the module docstring), by name, in model order.

    ``esft`` gives every routed expert tensor: which of their experts train is ``Freezing``'s mask.
    ``ValueError`` naming ``trainable`` for an unknown group or one this model lacks (no MoE layer).
    """
    _check(group in TRAINABLE, "trainable", "allowed values are " + ", ".join(TRAINABLE), group)
    named = dict(model.named_parameters())
    if group == "all":
        return named
    layers = _moe_layers(model)
    if group in ("non_router", "routers", "experts", "esft") and not layers:
        _check(False, "trainable", "the model has no MoE layer (a dense model has no routers or experts)", group)
    routers = {id(p) for layer in layers for p in layer.router.parameters()}
    experts = {id(p) for layer in layers for p in layer.experts.parameters()}
    if group == "routers":
        chosen = routers
    elif group in ("experts", "esft"):
        chosen = experts
    elif group == "non_router":
        chosen = {id(p) for p in named.values()} - routers
    elif group == "attention":
        chosen = {id(p) for block in model.blocks for p in block.attn.parameters()}
    else:  # non_moe
        chosen = {id(p) for p in named.values()} - routers - experts
    return {name: p for name, p in named.items() if id(p) in chosen}


def trainable_parameters(model: nn.Module, group: str, selection: list[list[int]] | None = None) -> int:
    """How many parameter values train under ``group`` (with ESFT's ``selection``: only the selected
    experts' slices of the stacked tensors count)."""
    params = parameter_group(model, group)
    if group != "esft":
        return sum(p.numel() for p in params.values())
    _check(selection is not None, "selection", "trainable=esft needs the selected experts of each MoE layer", None)
    total = 0
    for layer, chosen in zip(_moe_layers(model), selection, strict=True):
        for p in layer.experts.parameters():
            total += len(chosen) * p[0].numel()
    return total


def esft_select(routing_counts_LE: torch.Tensor, threshold: float | None = None, top_n: int | None = None,
                top_p: float | None = None) -> list[list[int]]:
    """ESFT's experts of each layer, from the target domain's routing counts (module docstring).

    ``routing_counts_LE``: (MoE layers, experts) token-expert assignments on the domain's text.
    Exactly one of ``threshold`` (share > t, t in [0, 1]), ``top_n`` (1 <= n <= E) or ``top_p``
    (p in (0, 1]). Returns, per layer, the selected expert indices in increasing order.

        >>> esft_select(torch.tensor([[6, 3, 1, 0]]), threshold=0.2)   # shares .6 .3 .1 0
        [[0, 1]]
        >>> esft_select(torch.tensor([[6, 3, 1, 0]]), top_p=0.9)       # .6, then .9 >= .9
        [[0, 1]]
    """
    rules = {"esft_threshold": threshold, "esft_top_n": top_n, "esft_top_p": top_p}
    given = [name for name, value in rules.items() if value is not None]
    _check(len(given) == 1, "trainable", "esft needs exactly one rule to choose the experts: esft_threshold, "
           f"esft_top_n or esft_top_p (given: {', '.join(given) or 'none'})", "esft")
    counts_LE = torch.as_tensor(routing_counts_LE, dtype=torch.float64)
    _check(counts_LE.dim() == 2 and counts_LE.numel() > 0 and bool((counts_LE >= 0).all()), "routing_counts_LE",
           "must be a (layers, experts) tensor of counts >= 0", tuple(counts_LE.shape))
    L, E = counts_LE.shape
    totals_L = counts_LE.sum(dim=1)
    empty = [layer for layer in range(L) if totals_L[layer] == 0]
    _check(not empty, "routing_counts_LE", f"MoE layer(s) {empty} routed no token of the domain: no share to "
           "select by", empty)
    shares_LE = counts_LE / totals_L[:, None]
    if threshold is not None:
        _check(0 <= threshold <= 1, "esft_threshold", "must be a fraction in [0, 1]", threshold)
        return [[e for e in range(E) if shares_LE[layer, e] > threshold] for layer in range(L)]
    if top_n is not None:
        _check(isinstance(top_n, int) and 1 <= top_n <= E, "esft_top_n",
               f"must be an integer from 1 to the number of experts per layer, {E}", top_n)
    else:
        _check(0 < top_p <= 1, "esft_top_p", "must be a fraction in (0, 1]", top_p)
    selection = []
    for layer in range(L):
        # largest share first; a stable sort of the negated shares breaks ties by the lower index
        order = torch.sort(-shares_LE[layer], stable=True).indices.tolist()
        if top_n is not None:
            n = top_n
        else:  # the fewest experts whose shares reach p (a hair of slack for the float sum of exact fractions)
            cumulative = torch.cumsum(shares_LE[layer][order], 0)
            n = int((cumulative < top_p - 1e-12).sum()) + 1
        selection.append(sorted(order[:min(n, E)]))
    return selection


def routing_shares(routing_counts_LE: torch.Tensor) -> list[list[float]]:
    """Each layer's counts as shares of the layer's assignments (what ``esft_select`` compares)."""
    counts = torch.as_tensor(routing_counts_LE, dtype=torch.float64)
    return (counts / counts.sum(dim=1, keepdim=True).clamp_min(1)).tolist()


@dataclass
class Freezing:
    """The frozen part of a model for one training run (``freeze``): call ``restore()`` after every
    optimizer step (and the loss-free bias update), ``remove()`` to undo the gradient hooks."""

    group: str
    selection: list[list[int]] | None = None  # esft: the trained experts of each MoE layer
    trainable: int = 0  # parameter values that train
    total: int = 0  # parameter values of the model
    _saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    _hooks: list[Any] = field(default_factory=list, repr=False)

    @torch.no_grad()
    def restore(self) -> None:
        """Put every frozen expert slice and frozen balancing bias back to its value (see the module
        docstring: weight decay moves a parameter whose gradient is zero)."""
        for tensor, index, values in self._saved:
            tensor.index_copy_(0, index, values)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def record(self) -> dict[str, Any]:
        """What ``run.json`` records under ``trainable``."""
        out: dict[str, Any] = {"group": self.group, "parameters": self.trainable, "of": self.total}
        if self.group in ROUTER_FROZEN:
            out["router_bias"] = "frozen"
        if self.selection is not None:
            out["esft"] = {"experts": self.selection}
        return out


def freeze(model: nn.Module, group: str, selection: list[list[int]] | None = None) -> Freezing:
    """Freeze everything in ``model`` but ``group``; build the optimizer afterwards (it takes only
    parameters with ``requires_grad``). ``selection`` (``esft`` only): per MoE layer, the experts
    that train. Freezing a whole tensor is ``requires_grad=False``; freezing some experts of one is a
    gradient hook plus ``Freezing.restore`` after each step."""
    train = parameter_group(model, group)
    layers = _moe_layers(model)
    if group == "esft":
        _check(selection is not None and len(selection) == len(layers), "selection",
               f"must list the trained experts of each of the {len(layers)} MoE layers", selection)
        for layer, experts in zip(layers, selection, strict=True):
            E = layer.experts.num_experts
            _check(all(isinstance(e, int) and 0 <= e < E for e in experts), "selection",
                   f"expert indices must be from 0 to {E - 1}", experts)
    chosen = {id(p) for p in train.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    total = sum(p.numel() for p in model.parameters())
    freezing = Freezing(group, selection, trainable_parameters(model, group, selection), total)
    if group in ROUTER_FROZEN:
        for layer in layers:
            bias = getattr(layer.router, "bias", None)
            if isinstance(bias, torch.Tensor):
                index = torch.arange(bias.shape[0], device=bias.device)
                freezing._saved.append((bias, index, bias.detach().clone()))
    if group != "esft":
        return freezing
    for layer, experts in zip(layers, selection, strict=True):
        E = layer.experts.num_experts
        keep_E = torch.zeros(E, dtype=torch.bool)
        keep_E[list(experts)] = True
        for p in layer.experts.parameters():
            keep = keep_E.to(p.device).view(E, *([1] * (p.dim() - 1)))
            # where, not a product: a NaN gradient of a frozen expert must not reach the norm either
            freezing._hooks.append(p.register_hook(lambda g, keep=keep: torch.where(keep, g, torch.zeros_like(g))))
            frozen = (~keep_E).nonzero().flatten().to(p.device)
            if frozen.numel():
                freezing._saved.append((p.data, frozen, p.detach()[frozen].clone()))
    return freezing
