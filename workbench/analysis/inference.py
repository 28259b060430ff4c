"""Routing at inference time: temporal locality, inference-time knobs, determinism.

Three questions about a trained model once it generates text:

1. **Temporal locality of routing** (Jiang et al. 2024, "Mixtral of Experts", arXiv:2401.04088,
   section 5 and its table 5): do consecutive tokens go to the same expert more often than chance,
   and more so in deeper layers? Two rates per MoE layer, over the pairs of consecutive tokens
   (i, i+1) of a sequence:

   - ``top1``: the first-choice expert of token i+1 is that of token i (Mixtral's "first choice");
   - ``topk``: the top-k sets of the two tokens share at least one expert (for k = 2, Mixtral's
     "first or second choice").

   Each beside what random routing with the same per-expert load gives (``chance``):

   - ``top1``: exactly ``sum_e p_e^2``, p the first-choice load of the layer over the tokens
     counted (two tokens routed independently with that load share their first choice with that
     probability);
   - ``topk``: a permutation baseline: token positions shuffled within each sequence (which keeps
     every sequence's per-expert load exactly), the overlap rate averaged over ``shuffles``
     shuffles drawn from a fixed seed. There is no closed form for a set overlap with unequal loads.

   ``shuffled`` is the within-sequence permutation baseline for both metrics; for ``top1`` it is
   exact, with no sampling: under a random permutation of a sequence's n tokens, with counts c_e,
   two neighbours share their first choice with probability sum_e c_e (c_e - 1) / (n (n - 1)).
   It is stricter than ``chance``: a sequence of one domain uses its domain's experts
   (specialization, not locality in time), which it keeps and ``chance`` does not. ``uniform`` is
   Mixtral's reference, routing uniform over experts: 1/E and 1 - C(E-k, k)/C(E, k).
   The routing comes from generation (``GenerationResult.routing``) or from a teacher-forced
   forward of any text (``teacher_forced_routing``), in the same ``LayerRouting`` layout.

2. **Inference-time knobs**, each a context manager that changes how a trained model routes and
   restores it exactly when it exits (no parameter or buffer is written; the hooks are removed):

   - ``smaller_top_k``: fewer experts per token than in training, each token keeping the experts
     it ranks highest; gates renormalised to sum to one over the kept experts, or not (the kept
     experts keep the gates they had at the trained top-k, so the dropped experts' share is lost);
   - ``drop_experts``: some experts of each layer can no longer be selected (typically the least
     used on validation data, ``least_used_experts``): their router logits are set to -inf before
     the router's own selection and gate rule run, so the softmax, the top-k and the gates are
     those of a router that never had them (with renormalised top-k gates, as the ``tiny`` preset
     has, the kept experts' gates keep their relative sizes);
   - ``inference_capacity``: the capacity dispatch (GShard, batch scope, capacity factor c) in a
     teacher-forced forward. Generation stays dropless whatever the layer's dispatch
     (``workbench.moe.dispatch.dropless_form``), so this knob changes evaluation, not decoding.

   They work on the readable modules and on the fused CPU subclasses (``workbench.kernels.cpu``)
   alike: the router knobs are forward hooks on the router, which run around whatever the
   router's class computes, and the capacity knob swaps the layer's ``dispatch`` attribute.
   ``knob_table`` measures validation loss, bits per byte per domain and arithmetic exact match
   (``workbench.inference.evaluate``) for the unmodified model and every setting.

3. **Determinism** (``determinism_report``): the same seed gives the same sampled text, and
   greedy decoding through the KV cache gives exactly what recomputing the prefix gives.

Shape legend: B sequences, N positions, K experts per token, E experts, T = B*N tokens.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from workbench.inference.generation import GenerationResult, LayerRouting, generate
from workbench.moe.dispatch import capacity_dispatch
from workbench.moe.types import RouterOutput
from workbench.validation import check

# --- 1. temporal locality -----------------------------------------------------------------------


def first_choice(expert_ids_BNK: torch.Tensor, gates_BNK: torch.Tensor) -> torch.Tensor:
    """(B, N) long: each token's first-choice expert, the one with the largest gate (routers
    return their top-k unsorted); -1 where the position holds no token (expert -1)."""
    top_BN = gates_BNK.argmax(dim=-1, keepdim=True)
    first_BN = expert_ids_BNK.gather(-1, top_BN).squeeze(-1)
    return first_BN.masked_fill(expert_ids_BNK[..., 0] < 0, -1)


def span_mask(valid_BN: torch.Tensor, start_B: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) bool: the positions counted, the valid ones at or after each sequence's ``start``
    (e.g. its prompt length, to count generated tokens only; None: from the first)."""
    if start_B is None:
        return valid_BN.clone()
    start_B = torch.as_tensor(start_B, dtype=torch.long)
    return valid_BN & (torch.arange(valid_BN.shape[1])[None, :] >= start_B[:, None])


def shuffle_within_sequences(values_BNX: torch.Tensor, mask_BN: torch.Tensor,
                             generator: torch.Generator) -> torch.Tensor:
    """``values`` (B, N, ...) with the positions where ``mask`` is True permuted at random within
    each sequence (the others stay): every sequence keeps exactly the multiset of its values,
    so its per-expert load, and only the order is lost."""
    out = values_BNX.clone()
    for b in range(values_BNX.shape[0]):
        idx = mask_BN[b].nonzero().squeeze(1)
        if idx.numel() > 1:
            out[b, idx] = values_BNX[b, idx[torch.randperm(idx.numel(), generator=generator)]]
    return out


def _pairs(mask_BN: torch.Tensor) -> torch.Tensor:
    """(B, N-1) bool: consecutive pairs (j, j+1) with both positions counted."""
    return mask_BN[:, :-1] & mask_BN[:, 1:]


def _top1_repeats(first_BN: torch.Tensor, pairs_BM: torch.Tensor) -> torch.Tensor:
    return ((first_BN[:, :-1] == first_BN[:, 1:]) & pairs_BM).sum()


def _topk_overlaps(ids_BNK: torch.Tensor, pairs_BM: torch.Tensor) -> torch.Tensor:
    # (B, N-1, K, K): does any of token j's experts equal any of token j+1's
    share_BM = (ids_BNK[:, :-1, :, None] == ids_BNK[:, 1:, None, :]).flatten(-2).any(-1)
    return (share_BM & pairs_BM).sum()


def sum_squared_load(first_BN: torch.Tensor, mask_BN: torch.Tensor, num_experts: int) -> float:
    """sum_e p_e^2, p the first-choice load over the counted positions of every sequence: the
    probability that two tokens routed independently with that load share their first choice."""
    ids = first_BN[mask_BN]
    if ids.numel() == 0:
        return float("nan")
    p = torch.bincount(ids, minlength=num_experts).double() / ids.numel()
    return float((p * p).sum())


def permuted_top1_repeats(first_BN: torch.Tensor, mask_BN: torch.Tensor, num_experts: int) -> float:
    """The expected first-choice repeats over the consecutive pairs of counted positions when each
    sequence's counted positions are permuted at random, exactly: a pair is then two distinct
    random positions of the sequence, sharing their expert with probability
    sum_e c_e (c_e - 1) / (n (n - 1)). Counted positions must be contiguous (``span_mask``)."""
    total = 0.0
    for b in range(first_BN.shape[0]):
        ids = first_BN[b][mask_BN[b]]
        n = ids.numel()
        if n > 1:
            c = torch.bincount(ids, minlength=num_experts).double()
            total += (n - 1) * float((c * (c - 1)).sum()) / (n * (n - 1))
    return total


def uniform_rates(num_experts: int, top_k: int) -> dict[str, float]:
    """Mixtral's reference: routing uniform over experts. ``top1``: 1/E; ``topk``: the chance
    that two uniformly drawn k-sets of E experts intersect, 1 - C(E-k, k) / C(E, k)."""
    disjoint = math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)
    return {"top1": 1.0 / num_experts, "topk": 1.0 - disjoint}


def repeat_rates(expert_ids_BNK: torch.Tensor, gates_BNK: torch.Tensor, num_experts: int, *,
                 start_B: Sequence[int] | torch.Tensor | None = None, shuffles: int = 16,
                 seed: int = 0) -> dict[str, dict[str, float]]:
    """The two repeat rates of one MoE layer and their baselines (see the module docstring).

    expert_ids (B, N, K) long, -1 where a position holds no token; gates (B, N, K). ``start_B``:
    count positions from there on (``span_mask``). Returns ``{"top1": {...}, "topk": {...}}``, each
    with ``rate``, ``chance``, ``shuffled``, ``uniform`` and ``pairs`` (pairs counted).
    """
    check(expert_ids_BNK.dim() == 3 and gates_BNK.shape == expert_ids_BNK.shape, "expert_ids",
          "must be (B, N, K), with gates of the same shape", tuple(expert_ids_BNK.shape))
    check(isinstance(shuffles, int) and shuffles >= 1, "shuffles", "must be an integer >= 1", shuffles)
    ids_BNK, K = expert_ids_BNK.cpu().long(), expert_ids_BNK.shape[-1]
    mask_BN = span_mask(ids_BNK[..., 0] >= 0, start_B)
    first_BN = first_choice(ids_BNK, gates_BNK.cpu())
    pairs_BM = _pairs(mask_BN)
    n_pairs = int(pairs_BM.sum())
    uniform = uniform_rates(num_experts, K)
    if n_pairs == 0:
        nan = float("nan")
        return {m: {"rate": nan, "chance": nan, "shuffled": nan, "uniform": uniform[m], "pairs": 0}
                for m in ("top1", "topk")}
    generator = torch.Generator().manual_seed(seed)
    shuffled_topk = 0
    for _ in range(shuffles):
        shuffled_topk += int(_topk_overlaps(shuffle_within_sequences(ids_BNK, mask_BN, generator), pairs_BM))
    topk_shuffled = shuffled_topk / (shuffles * n_pairs)
    return {
        "top1": {"rate": int(_top1_repeats(first_BN, pairs_BM)) / n_pairs,
                 "chance": sum_squared_load(first_BN, mask_BN, num_experts),
                 "shuffled": permuted_top1_repeats(first_BN, mask_BN, num_experts) / n_pairs,
                 "uniform": uniform["top1"], "pairs": n_pairs},
        "topk": {"rate": int(_topk_overlaps(ids_BNK, pairs_BM)) / n_pairs, "chance": topk_shuffled,
                 "shuffled": topk_shuffled, "uniform": uniform["topk"], "pairs": n_pairs},
    }


def locality_table(routing: Sequence[LayerRouting], num_experts: int, *,
                   start_B: Sequence[int] | torch.Tensor | None = None, shuffles: int = 16,
                   seed: int = 0) -> list[dict[str, Any]]:
    """One row per (MoE layer, metric): ``layer`` (its index among the MoE layers), ``block`` (its
    transformer block), ``metric`` (``top1`` / ``topk``), ``rate``, ``chance``, ``ratio`` =
    rate / chance, ``excess`` = rate - chance, ``shuffled`` and ``ratio_shuffled`` = rate /
    shuffled, ``uniform``, ``pairs``."""
    rows = []
    for layer, r in enumerate(routing):
        rates = repeat_rates(r.expert_ids, r.gates, num_experts, start_B=start_B, shuffles=shuffles, seed=seed + layer)
        for metric, v in rates.items():
            ratio = v["rate"] / v["chance"] if v["chance"] > 0 else float("nan")
            rows.append({"layer": layer, "block": r.block, "metric": metric, "rate": v["rate"], "chance": v["chance"],
                         "ratio": ratio, "excess": v["rate"] - v["chance"], "shuffled": v["shuffled"],
                         "ratio_shuffled": v["rate"] / v["shuffled"] if v["shuffled"] > 0 else float("nan"),
                         "uniform": v["uniform"], "pairs": v["pairs"]})
    return rows


def _pad_right(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    N = max(len(s) for s in sequences)
    tokens_BN = torch.zeros(len(sequences), N, dtype=torch.long)
    valid_BN = torch.zeros(len(sequences), N, dtype=torch.bool)
    for b, s in enumerate(sequences):
        tokens_BN[b, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        valid_BN[b, :len(s)] = True
    return tokens_BN, valid_BN


@torch.no_grad()
def teacher_forced_routing(model: torch.nn.Module, tokens: Sequence[Sequence[int]] | torch.Tensor, *,
                           batch_size: int = 64) -> list[LayerRouting]:
    """The routing of ``tokens`` (a (B, N) tensor, or sequences of token ids of any lengths)
    through ``model.forward`` in evaluation mode: one ``LayerRouting`` per MoE layer in the layout
    of ``GenerationResult.routing`` (position j of sequence b is its j-th token; -1 beyond its
    length). Sequences of unequal length are right-padded: the causal model never lets a
    padding token change an earlier token's routing."""
    if isinstance(tokens, torch.Tensor):
        check(tokens.dim() == 2, "tokens", "must be (B, N) token ids", tuple(tokens.shape))
        tokens_BN, valid_BN = tokens.cpu().long(), torch.ones(tokens.shape, dtype=torch.bool)
    else:
        tokens_BN, valid_BN = _pad_right(tokens)
    device = next(model.parameters()).device
    blocks = [i for i, block in enumerate(model.blocks) if block.is_moe]
    was_training = model.training
    model.eval()
    parts: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in blocks]
    try:
        for start in range(0, tokens_BN.shape[0], batch_size):
            chunk = tokens_BN[start:start + batch_size]
            out = model(chunk.to(device))
            B, N = chunk.shape
            for layer, info in enumerate(out.routing):
                ro = info.router_output
                parts[layer].append(tuple(t.detach().cpu().reshape(B, N, -1)
                                          for t in (ro.expert_ids_TK, ro.weights_TK.float(), ro.scores_TE.float())))
    finally:
        model.train(was_training)
    layers = []
    for block, chunks in zip(blocks, parts, strict=True):
        ids, gates, scores = (torch.cat([c[i] for c in chunks]) for i in range(3))
        invalid = ~valid_BN[:, :, None]
        layers.append(LayerRouting(block, ids.masked_fill(invalid, -1), gates.masked_fill(invalid, 0.0),
                                   scores.masked_fill(invalid, 0.0)))
    return layers


def batches_routing(model: torch.nn.Module, batches: Sequence[Any]) -> list[LayerRouting]:
    """``teacher_forced_routing`` of data batches (``LMData.val_batches()``'s ``Batch`` objects,
    or (B, S) tensors), concatenated along the sequences."""
    tokens = torch.cat([getattr(b, "tokens", b) for b in batches])
    return teacher_forced_routing(model, tokens)


def routing_agreement(a: Sequence[LayerRouting], b: Sequence[LayerRouting], *,
                      start_B: Sequence[int] | torch.Tensor | None = None) -> list[dict[str, Any]]:
    """Per MoE layer, how often two routings of the same tokens agree (e.g. generation vs the same
    text teacher-forced): ``top1`` the share of tokens with the same first choice, ``set`` the
    share with the same top-k set, over the positions valid in both (from ``start_B`` on)."""
    rows = []
    for layer, (ra, rb) in enumerate(zip(a, b, strict=True)):
        N = min(ra.expert_ids.shape[1], rb.expert_ids.shape[1])
        ids_a, ids_b = ra.expert_ids[:, :N].cpu(), rb.expert_ids[:, :N].cpu()
        mask = span_mask((ids_a[..., 0] >= 0) & (ids_b[..., 0] >= 0), start_B)
        n = int(mask.sum())
        same_first = first_choice(ids_a, ra.gates[:, :N].cpu()) == first_choice(ids_b, rb.gates[:, :N].cpu())
        same_set = (ids_a.sort(-1).values == ids_b.sort(-1).values).all(-1)
        rows.append({"layer": layer, "block": ra.block, "tokens": n,
                     "top1": float((same_first & mask).sum()) / n if n else float("nan"),
                     "set": float((same_set & mask).sum()) / n if n else float("nan")})
    return rows


# --- 2. inference-time knobs --------------------------------------------------------------------

# Routers whose selection reads their own logits, so that masking logits removes an expert; and
# token-choice routers with a top-k to shrink (not expert choice's padded slots, not soft MoE).
DROPPABLE_ROUTERS = ("softmax_topk", "switch", "sigmoid", "noisy_topk")
TOP_K_ROUTERS = ("softmax_topk", "sigmoid", "noisy_topk", "cosine", "sinkhorn")


def _router_hook(model: torch.nn.Module, make_hook) -> contextlib.AbstractContextManager:
    """A context that registers ``make_hook(layer)`` as a forward hook on every MoE layer's router
    and removes them all on exit: a hook's returned ``RouterOutput`` replaces the router's."""

    @contextlib.contextmanager
    def context() -> Iterator[torch.nn.Module]:
        handles = [layer.router.register_forward_hook(make_hook(layer)) for layer in model.moe_layers()]
        try:
            yield model
        finally:
            for handle in handles:
                handle.remove()

    return context()


def _selection_scores(router: torch.nn.Module, out: RouterOutput) -> torch.Tensor:
    """(T, E): what the router ranks experts by (its scores, plus the loss-free bias if it has one)."""
    bias = getattr(router, "bias", None)
    return out.scores_TE if bias is None else out.scores_TE + bias


def smaller_top_k(model: torch.nn.Module, k: int, *, renormalize: bool = True) -> contextlib.AbstractContextManager:
    """Route every token to its ``k`` highest-ranked experts of the trained top-K (k <= K): the
    top-k of the router's own selection score, so the same experts a top-k router would pick.

    Gates: ``renormalize=True`` divides the kept gates by their sum, times the router's
    ``route_scale`` (Mixtral's rule at the new k); ``False`` keeps the gates the experts had at
    the trained top-K (the dropped experts' share of the output is lost; for a router trained
    without renormalisation these are its raw probabilities, as the new k would give them). At
    k = K nothing changes unless ``renormalize`` asks a router trained without it to renormalise.
    """
    layers = model.moe_layers()
    check(len(layers) > 0, "model", "has no MoE layer", type(model).__name__)
    names = {layer.cfg.router for layer in layers}
    check(names <= set(TOP_K_ROUTERS) | {"switch"}, "model", "smaller_top_k needs token-choice routers: "
          + ", ".join(TOP_K_ROUTERS), sorted(names))
    trained_k = min(layer.router.top_k for layer in layers)
    check(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= trained_k, "k",
          f"must be an integer from 1 to the trained top_k={trained_k}", k)

    def make_hook(layer: torch.nn.Module):
        router = layer.router
        unchanged = k == router.top_k and (router.normalize_topk or not renormalize)

        def hook(module, args, out: RouterOutput) -> RouterOutput:
            if unchanged:
                return out
            ids_TK, weights_TK = out.expert_ids_TK, out.weights_TK
            rank_TK = _selection_scores(router, out).gather(1, ids_TK)
            keep_Tk = rank_TK.topk(k, dim=-1, sorted=False).indices
            ids_Tk, weights_Tk = ids_TK.gather(1, keep_Tk).contiguous(), weights_TK.gather(1, keep_Tk)
            if renormalize:
                scores_Tk = out.scores_TE.gather(1, ids_Tk)
                weights_Tk = scores_Tk / scores_Tk.sum(-1, keepdim=True).clamp_min(1e-20) * router.route_scale
            return RouterOutput(ids_Tk, weights_Tk.contiguous(), out.scores_TE, out.logits_TE, None)

        return hook

    return _router_hook(model, make_hook)


def drop_experts(model: torch.nn.Module, dropped: Sequence[Sequence[int]]) -> contextlib.AbstractContextManager:
    """Take experts out of each MoE layer: ``dropped[l]`` lists the experts of MoE layer l that can
    no longer be selected. Their router logits are set to -inf (and any loss-free bias too, so that
    no bias can select them) and the router's own ``route`` runs on the masked logits: its softmax
    (or sigmoid), top-k and gate rule then see only the remaining experts. Each layer must keep at
    least top_k experts."""
    layers = model.moe_layers()
    check(len(dropped) == len(layers), "dropped", f"must list the dropped experts of each of the {len(layers)} "
          "MoE layers", len(dropped))
    names = {layer.cfg.router for layer in layers}
    check(names <= set(DROPPABLE_ROUTERS), "model", "drop_experts masks router logits, which decides selection "
          "only for " + ", ".join(DROPPABLE_ROUTERS), sorted(names))
    masks = []
    for i, (layer, experts) in enumerate(zip(layers, dropped, strict=True)):
        E = layer.cfg.num_experts
        experts = sorted({int(e) for e in experts})
        check(all(0 <= e < E for e in experts), f"dropped[{i}]", f"must be expert ids in [0, {E})", experts)
        check(E - len(experts) >= layer.router.top_k, f"dropped[{i}]",
              f"leaves fewer than top_k={layer.router.top_k} of the {E} experts", experts)
        mask_E = torch.zeros(E, dtype=torch.bool)
        mask_E[experts] = True
        masks.append(mask_E)

    def make_hook(layer: torch.nn.Module):
        router, mask_E = layer.router, masks[layers.index(layer)]
        if not bool(mask_E.any()):
            return lambda module, args, out: out

        def hook(module, args, out: RouterOutput) -> RouterOutput:
            x_TD = args[0]
            token_ids_T = args[1] if len(args) > 1 else None
            mask = mask_E.to(out.logits_TE.device)
            logits_TE = out.logits_TE.masked_fill(mask, float("-inf"))
            bias = router.bias
            try:
                if bias is not None:  # a buffer: swapped for the call and put back, never written
                    router.bias = bias.masked_fill(mask, float("-inf"))
                with torch.autocast(device_type=x_TD.device.type, enabled=False):
                    masked = router.route(router.jittered(x_TD).float(), logits_TE, token_ids_T)
            finally:
                if bias is not None:
                    router.bias = bias
            if router.route_scale != 1.0:
                masked.weights_TK = masked.weights_TK * router.route_scale
            masked.logits_TE = out.logits_TE  # the router's real logits (the z-loss reads them)
            return masked

        return hook

    return _router_hook(model, make_hook)


@torch.no_grad()
def expert_usage(model: torch.nn.Module, batches: Sequence[Any]) -> torch.Tensor:
    """(L, E) long: token-expert assignments per expert of each MoE layer on ``batches``."""
    routing = batches_routing(model, batches)
    E = model.moe_layers()[0].cfg.num_experts
    return torch.stack([torch.bincount(r.expert_ids[r.expert_ids >= 0].flatten(), minlength=E) for r in routing])


def least_used_experts(usage_LE: torch.Tensor, fraction: float) -> list[list[int]]:
    """The ``round(fraction * E)`` least-used experts of each layer (ties: the lower id first)."""
    check(0 <= fraction < 1, "fraction", "must be in [0, 1)", fraction)
    n = round(fraction * usage_LE.shape[1])
    order = [sorted(range(usage_LE.shape[1]), key=lambda e, row=row: (int(row[e]), e)) for row in usage_LE]
    return [sorted(o[:n]) for o in order]


def inference_capacity(model: torch.nn.Module, capacity_factor: float, *,
                       drop_policy: str = "position") -> contextlib.AbstractContextManager:
    """Every MoE layer's dispatch replaced by the capacity dispatch (batch scope) with
    ``capacity_factor``: in a teacher-forced forward each expert takes at most
    C = ceil(c * T * K / E) of the batch's assignments, the rest are dropped (the token keeps its
    residual path). Decoding is dropless whatever the dispatch (``dropless_form``)."""
    check(isinstance(capacity_factor, int | float) and math.isfinite(capacity_factor) and capacity_factor > 0,
          "capacity_factor", "must be a finite number > 0", capacity_factor)
    layers = model.moe_layers()
    check(not any(layer.router.mixes_tokens or layer.router.pads_slots for layer in layers), "model",
          "inference_capacity needs token-choice routers (not soft MoE or expert choice)",
          sorted({layer.cfg.router for layer in layers}))

    @contextlib.contextmanager
    def context() -> Iterator[torch.nn.Module]:
        saved = [layer.dispatch for layer in layers]
        try:
            for layer in layers:
                layer.dispatch = partial(capacity_dispatch, capacity_factor=float(capacity_factor),
                                         drop_policy=drop_policy, capacity_scope="batch")
            yield model
        finally:
            for layer, dispatch in zip(layers, saved, strict=True):
                layer.dispatch = dispatch

    return context()


KNOBS = ("top_k", "drop", "capacity")


@dataclass(frozen=True)
class Knob:
    """One inference-time setting. ``kind``: ``top_k`` (``value`` = k, with ``renormalize``),
    ``drop`` (``value`` = the fraction of least-used experts dropped per layer) or ``capacity``
    (``value`` = the capacity factor)."""

    kind: str
    value: float
    renormalize: bool = True

    def __post_init__(self) -> None:
        check(self.kind in KNOBS, "kind", "must be one of " + ", ".join(KNOBS), self.kind)

    @property
    def name(self) -> str:
        if self.kind == "top_k":
            return f"top-{int(self.value)}, " + ("renormalised" if self.renormalize else "not renormalised")
        if self.kind == "drop":
            return f"drop {self.value:.0%} least used"
        return f"capacity {self.value:g}"

    def apply(self, model: torch.nn.Module, usage_LE: torch.Tensor | None = None) -> contextlib.AbstractContextManager:
        """The context manager of this setting on ``model`` (``drop`` needs the usage counts)."""
        if self.kind == "top_k":
            return smaller_top_k(model, int(self.value), renormalize=self.renormalize)
        if self.kind == "drop":
            check(usage_LE is not None, "usage_LE", "is needed to drop the least-used experts", usage_LE)
            return drop_experts(model, least_used_experts(usage_LE, self.value))
        return inference_capacity(model, self.value)


@torch.no_grad()
def teacher_forced_eval(model: torch.nn.Module, data: Any) -> dict[str, float]:
    """Validation loss (nats per token over every validation window), the kept assignments per
    token and the share of assignments dropped, in one pass over ``data.val_batches()``."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nats, tokens, kept, routed, dropped = 0.0, 0, 0, 0, 0
    try:
        for batches in data.val_batches().values():
            for batch in batches:
                out = model(batch.tokens.to(device))
                targets = batch.targets.to(device)
                nats += F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
                tokens += targets.numel()
                for info in out.routing:
                    kept += int(info.stats.kept_per_expert.sum())
                    routed += int(info.stats.tokens_per_expert.sum())
                    dropped += int(info.stats.dropped_assignments)
    finally:
        model.train(was_training)
    layers = max(1, len(model.moe_layers()))
    return {"val_loss": nats / tokens, "experts_per_token": kept / (tokens * layers),
            "dropped_fraction": dropped / routed if routed else 0.0}


def knob_table(model: torch.nn.Module, data: Any, problems: Sequence[Any], settings: Sequence[Knob], *,
               usage_LE: torch.Tensor | None = None, batch_size: int = 64) -> list[dict[str, Any]]:
    """One row for the unmodified model (``setting`` "trained") and one per setting: validation
    loss, bits per byte of each domain (``bpb/<domain>``), arithmetic exact match on ``problems``
    (greedy decoding), experts per token actually run and the share of assignments dropped, in
    teacher-forced evaluation.

    ``usage_LE``: expert usage for the ``drop`` settings (default: ``expert_usage`` on the
    validation windows). A ``capacity`` row's arithmetic is the unmodified model's by design
    (decoding is dropless), recorded as NaN with ``note`` saying so.
    """
    from workbench.inference.evaluate import arithmetic_exact_match, domain_bits_per_byte

    if usage_LE is None and any(s.kind == "drop" for s in settings):
        usage_LE = expert_usage(model, [b for bs in data.val_batches().values() for b in bs])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for setting in [None, *settings]:
        context = contextlib.nullcontext() if setting is None else setting.apply(model, usage_LE)
        with context:
            row: dict[str, Any] = {"setting": "trained" if setting is None else setting.name,
                                   "kind": "none" if setting is None else setting.kind,
                                   "value": float("nan") if setting is None else float(setting.value),
                                   "renormalize": None if setting is None else setting.renormalize}
            row.update(teacher_forced_eval(model, data))
            row.update({f"bpb/{d}": v for d, v in domain_bits_per_byte(model, data).items()})
            if problems and (setting is None or setting.kind != "capacity"):
                row["arithmetic"] = arithmetic_exact_match(model, list(problems), batch_size=batch_size).accuracy
                row["note"] = ""
            else:
                row["arithmetic"] = float("nan")
                row["note"] = "decoding is dropless: arithmetic as trained" if problems else "no problems"
        rows.append(row)
    after = model.state_dict()
    if not all(torch.equal(before[k], after[k]) for k in before):  # the knobs' contract, checked where it counts
        raise RuntimeError("an inference knob changed the model's parameters or buffers")
    return rows


# --- 3. determinism -----------------------------------------------------------------------------


def _first_difference(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> tuple[int, int] | None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        for j in range(max(len(x), len(y))):
            if j >= len(x) or j >= len(y) or x[j] != y[j]:
                return i, j
    return None


def determinism_report(model: torch.nn.Module, prompts: Sequence[str], max_new_tokens: int, *, seed: int = 0,
                       temperature: float = 0.8, top_p: float | None = 0.95) -> dict[str, Any]:
    """Two checks a reader can rerun:

    - ``same_seed_same_text``: sampling twice with ``seed`` gives the same tokens (and
      ``other_seed_differs``: with seed + 1 it gives other ones, so the seed does something);
    - ``cache_equals_recompute``: greedy decoding through the KV cache gives the tokens that
      recomputing the whole prefix at every step gives (``use_cache=False``), and
      ``cache_routing_agreement`` is the smallest share of tokens, over the MoE layers, whose
      top-k sets agree between the two.

    ``first_difference``: (sequence, position) of the first token that differs, per check, or None.
    """
    kwargs = {"temperature": temperature, "top_p": top_p}
    a = generate(model, list(prompts), max_new_tokens, seed=seed, record_routing=False, **kwargs)
    b = generate(model, list(prompts), max_new_tokens, seed=seed, record_routing=False, **kwargs)
    c = generate(model, list(prompts), max_new_tokens, seed=seed + 1, record_routing=False, **kwargs)
    cached = generate(model, list(prompts), max_new_tokens)
    recomputed = generate(model, list(prompts), max_new_tokens, use_cache=False)
    agreement = routing_agreement(cached.routing, recomputed.routing)
    return {
        "same_seed_same_text": a.tokens == b.tokens,
        "other_seed_differs": a.tokens != c.tokens,
        "cache_equals_recompute": cached.tokens == recomputed.tokens,
        "cache_routing_agreement": min(r["set"] for r in agreement) if agreement else float("nan"),
        "first_difference": {"same_seed": _first_difference(a.tokens, b.tokens),
                             "cache": _first_difference(cached.tokens, recomputed.tokens)},
        "prompts": len(prompts), "max_new_tokens": max_new_tokens, "seed": seed, "temperature": temperature,
        "sample": a.texts[0], "greedy": cached.texts[0],
    }


def generation_locality(result: GenerationResult, num_experts: int, *, generated_only: bool = True,
                        shuffles: int = 16, seed: int = 0) -> list[dict[str, Any]]:
    """``locality_table`` of a generation's routing; ``generated_only`` counts the pairs of
    generated tokens only (both tokens after the prompt), else every token of the text."""
    start = [len(p) for p in result.prompt_tokens] if generated_only else None
    return locality_table(result.routing, num_experts, start_B=start, shuffles=shuffles, seed=seed)
