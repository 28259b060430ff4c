"""Streamed routing traces: bounded-memory counts of where every token went, layer by layer.

Running a model over a dataset and keeping every layer's (T, K) expert ids would grow with the
dataset; every specialization analysis (``workbench.analysis.specialization``) needs only counts.
``RoutingCollector.add`` folds one batch into them and forgets the batch:

=======================  =====================  ==================================================
field                    shape                  counts
=======================  =====================  ==================================================
``domain_expert_LDE``    (L, D, E)              assignments of domain d's tokens to expert e
``domain_tokens_D``      (D,)                   tokens of domain d
``token_expert``         L sparse (V, E)        assignments of token id v to expert e (any slot)
``token_top1``           L sparse (V, E)        ... to expert e as its highest-gate expert
``token_count_V``        (V,)                   occurrences of token id v
``coactivation_LEE``     (L, E, E)              tokens with both a and b among their experts
                                                (diagonal: tokens with a, the load of a)
``transition_LEE``       (L - 1, E, E)          tokens with a in MoE layer l and b in layer l + 1
``transition_top1_LEE``  (L - 1, E, E)          tokens whose highest-gate expert is a in MoE layer l
                                                and b in layer l + 1
``probe_topk_LPK``       (L, P, K)              the experts of a fixed probe set of P tokens,
                                                highest gate first (-1: an empty slot)
=======================  =====================  ==================================================

Memory is independent of the number of tokens: dense counts are L x (D + E) x E, and the token
counts are sparse, so they hold at most the (token id, expert) pairs that occurred, which keeps a
real tokenizer's vocabulary (V of 50k to 150k) affordable. The probe set is routed once per
checkpoint; ``workbench.analysis.specialization.router_saturation`` compares two of them.

Routers that pad slots (expert choice, ``RouterOutput.mask_TK``) are honoured: a padding slot is
not counted anywhere. A token's experts are a set: every router of the zoo and every Hugging Face
router picks K distinct experts.

Sources: the counts are those of the OLMoE routing analyses (Muennighoff et al. 2024, "OLMoE: Open
Mixture-of-Experts Language Models", arXiv:2409.02060, section 5), gathered in one pass instead of
from saved per-token expert ids.

Shape legend: L MoE layers, D domains, V vocabulary, E experts, K experts per token, T tokens,
P probe tokens, B sequences, S positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# The sparse token counts are merged into the running totals every this many added tokens, not
# every batch: coalescing costs a sort of everything held, so batching it keeps ``add`` linear.
_MERGE_EVERY_TOKENS = 1 << 16


def _multi_hot(expert_ids_TK: torch.Tensor, mask_TK: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """(T, E) float64: 1 where the expert is one of the token's real slots."""
    real_TK = (torch.ones_like(expert_ids_TK, dtype=torch.float64) if mask_TK is None
               else mask_TK.to(torch.float64))
    # scatter_add: a padding slot may repeat an id, and adds 0
    return torch.zeros(expert_ids_TK.shape[0], num_experts, dtype=torch.float64).scatter_add_(1, expert_ids_TK,
                                                                                              real_TK)


def ranked_experts(expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                   mask_TK: torch.Tensor | None = None) -> torch.Tensor:
    """(T, K) long: each token's experts ordered by gate, highest first; -1 for a padding slot.

    Routers return their top-k unsorted (``topk(sorted=False)``); saturation at top-1 and the
    top-1 token counts need the order. Ties keep the slot order (a stable sort)."""
    w_TK = weights_TK.detach().float()
    if mask_TK is not None:
        w_TK = w_TK.masked_fill(~mask_TK, float("-inf"))
    order_TK = w_TK.argsort(dim=1, descending=True, stable=True)
    ranked_TK = expert_ids_TK.gather(1, order_TK)
    if mask_TK is not None:
        ranked_TK = ranked_TK.masked_fill(~mask_TK.gather(1, order_TK), -1)
    return ranked_TK


def ranked_layers(routing: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                  num_tokens: int) -> torch.Tensor:
    """(L, T, K) long: ``ranked_experts`` of every layer's (ids, gates, mask), padded with -1 to the
    widest layer."""
    T = num_tokens
    ranked = [ranked_experts(ids.reshape(T, -1).long().cpu(), w.reshape(T, -1).cpu(),
                             None if m is None else m.reshape(T, -1).bool().cpu()) for ids, w, m in routing]
    K = max(r.shape[1] for r in ranked)
    return torch.stack([torch.nn.functional.pad(r, (0, K - r.shape[1]), value=-1) for r in ranked])


@dataclass
class RoutingCounts:
    """The streamed counts of one model over one dataset (see the module docstring for each field).

    ``layers`` are model layer indices, one per MoE layer (index ``l`` of the ``L`` axis), and
    ``domains`` names the D domains (``["all"]`` when no domain was given).
    """

    layers: list[int]
    num_experts: int
    top_k: int
    vocab_size: int
    domains: list[str]
    tokens: int
    domain_tokens_D: torch.Tensor
    domain_expert_LDE: torch.Tensor
    token_count_V: torch.Tensor
    token_expert: list[torch.Tensor]  # L sparse COO (V, E), coalesced
    token_top1: list[torch.Tensor]
    coactivation_LEE: torch.Tensor
    transition_LEE: torch.Tensor
    transition_top1_LEE: torch.Tensor
    probe_tokens_P: torch.Tensor | None = None  # token ids of the probe set, flattened from (B, S)
    probe_topk_LPK: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        # the dataclass repr printed every tensor (about 900 lines in a notebook): what it counted instead
        probe = "" if self.probe_tokens_P is None else f", probe of {self.probe_tokens_P.numel():,} tokens"
        return (f"RoutingCounts({self.tokens:,} tokens, domains {self.domains}, MoE layers {self.layers}, "
                f"{self.num_experts} experts, top-{self.top_k}, vocab {self.vocab_size}{probe})")

    def index(self, layer: int) -> int:
        """Position on the L axis of model layer ``layer`` (``ValueError`` listing the MoE layers)."""
        if layer not in self.layers:
            raise ValueError(f"layer={layer!r} is invalid: the MoE layers are {self.layers}")
        return self.layers.index(layer)

    def load_E(self, layer: int) -> torch.Tensor:
        """(E,) long: assignments per expert in ``layer`` (every domain)."""
        return self.domain_expert_LDE[self.index(layer)].sum(dim=0)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python data (lists and numbers): JSON-able, to commit results or cache them."""
        def sparse(t: torch.Tensor) -> list[list[int]]:
            return [*t.indices().tolist(), t.values().tolist()]

        out: dict[str, Any] = {k: getattr(self, k) for k in ("layers", "num_experts", "top_k", "vocab_size",
                                                              "domains", "tokens", "notes")}
        for k in ("domain_tokens_D", "domain_expert_LDE", "token_count_V", "coactivation_LEE", "transition_LEE",
                  "transition_top1_LEE", "probe_tokens_P", "probe_topk_LPK"):
            value = getattr(self, k)
            out[k] = None if value is None else value.tolist()
        out["token_expert"] = [sparse(t) for t in self.token_expert]
        out["token_top1"] = [sparse(t) for t in self.token_top1]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoutingCounts:
        """The inverse of ``to_dict``."""
        V, E = data["vocab_size"], data["num_experts"]

        def sparse(rows_cols_values: list[list[int]]) -> torch.Tensor:
            rows, cols, values = rows_cols_values
            return torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.long).view(2, -1),
                                           torch.tensor(values, dtype=torch.long), (V, E),
                                           check_invariants=True).coalesce()

        def dense(key: str) -> torch.Tensor | None:
            value = data.get(key)
            return None if value is None else torch.tensor(value, dtype=torch.long)

        L = len(data["layers"])
        return cls(layers=list(data["layers"]), num_experts=E, top_k=data["top_k"], vocab_size=V,
                   domains=list(data["domains"]), tokens=data["tokens"],
                   domain_tokens_D=dense("domain_tokens_D"), domain_expert_LDE=dense("domain_expert_LDE"),
                   token_count_V=dense("token_count_V"), token_expert=[sparse(t) for t in data["token_expert"]],
                   token_top1=[sparse(t) for t in data["token_top1"]], coactivation_LEE=dense("coactivation_LEE"),
                   # one MoE layer: no transition, and [] loses the (0, E, E) shape
                   transition_LEE=dense("transition_LEE").view(max(L - 1, 0), E, E),
                   transition_top1_LEE=dense("transition_top1_LEE").view(max(L - 1, 0), E, E),
                   probe_tokens_P=dense("probe_tokens_P"), probe_topk_LPK=dense("probe_topk_LPK"),
                   notes=list(data.get("notes", [])))


class RoutingCollector:
    """Accumulates ``RoutingCounts`` batch by batch; ``add`` keeps no per-token tensor.

    ``add`` takes one batch's routing of every MoE layer as (expert ids, gates, slot mask) and the
    token ids (and domain ids) of the same T tokens. It works on whatever routed them: ``collect``
    below drives a workbench ``MoELM``; ``workbench.interop.hf.collect_hf_routing`` a Hugging Face
    MoE model through hooks.
    """

    def __init__(self, layers: Sequence[int], num_experts: int, top_k: int, vocab_size: int,
                 domains: Sequence[str] | None = None):
        if not layers:
            raise ValueError("layers=[] is invalid: the model has no MoE layer to trace")
        for name, value in (("num_experts", num_experts), ("top_k", top_k), ("vocab_size", vocab_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1")
        self.layers, self.E, self.K, self.V = list(layers), num_experts, top_k, vocab_size
        self.domains = list(domains) if domains else ["all"]
        L, D, E = len(self.layers), len(self.domains), num_experts
        self.tokens = 0
        self.domain_tokens_D = torch.zeros(D, dtype=torch.long)
        self.domain_expert_LDE = torch.zeros(L, D, E, dtype=torch.long)
        self.token_count_V = torch.zeros(vocab_size, dtype=torch.long)
        self.coactivation_LEE = torch.zeros(L, E, E, dtype=torch.long)
        self.transition_LEE = torch.zeros(max(L - 1, 0), E, E, dtype=torch.long)
        self.transition_top1_LEE = torch.zeros(max(L - 1, 0), E, E, dtype=torch.long)
        self._token_keys: list[list[torch.Tensor]] = [[] for _ in range(L)]  # v * E + e, pending merge
        self._top1_keys: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self._pending = 0
        self._token_expert = [self._empty_sparse() for _ in range(L)]
        self._token_top1 = [self._empty_sparse() for _ in range(L)]
        self.probe_tokens_P: torch.Tensor | None = None
        self.probe_topk_LPK: torch.Tensor | None = None
        self.notes: list[str] = []

    def _empty_sparse(self) -> torch.Tensor:
        return torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                                       (self.V, self.E), check_invariants=False).coalesce()

    @torch.no_grad()
    def add(self, routing: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], token_ids: torch.Tensor,
            domain_ids: torch.Tensor | None = None) -> None:
        """Fold one batch in.

        ``routing``: one ``(expert_ids_TK, weights_TK, mask_TK or None)`` per MoE layer, in depth
        order; ``token_ids``: the T = B * S token ids, any shape; ``domain_ids``: their domain
        ids (indices into ``domains``), same shape, or None (every token in domain 0).
        """
        if len(routing) != len(self.layers):
            raise ValueError(f"routing has {len(routing)} layers, the collector traces {len(self.layers)} "
                             f"(layers={self.layers})")
        token_ids_T = token_ids.reshape(-1).long().cpu()
        T = token_ids_T.numel()
        if T and (int(token_ids_T.min()) < 0 or int(token_ids_T.max()) >= self.V):
            raise ValueError(f"token_ids holds ids outside [0, vocab_size={self.V}): min {int(token_ids_T.min())}, "
                             f"max {int(token_ids_T.max())}")
        if domain_ids is None:
            domain_T = torch.zeros(T, dtype=torch.long)
        else:
            domain_T = domain_ids.reshape(-1).long().cpu()
            if domain_T.numel() != T:
                raise ValueError(f"domain_ids has {domain_T.numel()} entries, token_ids {T}: give one domain id per "
                                 "token")
            if T and (int(domain_T.min()) < 0 or int(domain_T.max()) >= len(self.domains)):
                raise ValueError(f"domain_ids holds ids outside [0, {len(self.domains)}) (domains={self.domains})")
        D = len(self.domains)
        self.tokens += T
        self.domain_tokens_D += torch.bincount(domain_T, minlength=D)
        self.token_count_V += torch.bincount(token_ids_T, minlength=self.V)
        domain_TD = torch.nn.functional.one_hot(domain_T, D).to(torch.float64)

        previous_TE = previous_first_T = None
        for li, (expert_ids_TK, weights_TK, mask_TK) in enumerate(routing):
            ids_TK = expert_ids_TK.reshape(T, -1).long().cpu()
            mask = None if mask_TK is None else mask_TK.reshape(T, -1).bool().cpu()
            if ids_TK.numel() and (int(ids_TK.min()) < 0 or int(ids_TK.max()) >= self.E):
                raise ValueError(f"layer {self.layers[li]}: expert ids outside [0, num_experts={self.E})")
            hot_TE = _multi_hot(ids_TK, mask, self.E)
            # float64 matmuls of 0/1 matrices: exact integer counts up to 2^53
            self.domain_expert_LDE[li] += (domain_TD.t() @ hot_TE).round().long()
            self.coactivation_LEE[li] += (hot_TE.t() @ hot_TE).round().long()
            if previous_TE is not None:
                self.transition_LEE[li - 1] += (previous_TE.t() @ hot_TE).round().long()
            previous_TE = hot_TE

            real_TK = torch.ones_like(ids_TK, dtype=torch.bool) if mask is None else mask
            token_TK = token_ids_T.unsqueeze(1).expand_as(ids_TK)
            self._token_keys[li].append(token_TK[real_TK] * self.E + ids_TK[real_TK])
            first_T = ranked_experts(ids_TK, weights_TK.reshape(T, -1).cpu(), mask)[:, 0]
            has_T = first_T >= 0
            self._top1_keys[li].append(token_ids_T[has_T] * self.E + first_T[has_T])
            if previous_first_T is not None:
                both = has_T & (previous_first_T >= 0)
                pair_keys = previous_first_T[both] * self.E + first_T[both]
                self.transition_top1_LEE[li - 1] += torch.bincount(pair_keys, minlength=self.E * self.E).view(
                    self.E, self.E)
            previous_first_T = first_T
        self._pending += T
        if self._pending >= _MERGE_EVERY_TOKENS:
            self._merge()

    def _merge(self) -> None:
        for li in range(len(self.layers)):
            for pending, totals in ((self._token_keys, self._token_expert), (self._top1_keys, self._token_top1)):
                if pending[li]:
                    keys = torch.cat(pending[li])
                    # the indices are in range by construction (add checks the ids)
                    new = torch.sparse_coo_tensor(torch.stack([keys // self.E, keys % self.E]),
                                                  torch.ones_like(keys), (self.V, self.E), check_invariants=False)
                    totals[li] = (totals[li] + new).coalesce()
                    pending[li] = []
        self._pending = 0

    @torch.no_grad()
    def set_probe(self, routing: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                  token_ids: torch.Tensor) -> None:
        """Keep the ranked experts of a fixed probe set (routed once, e.g. per checkpoint)."""
        if len(routing) != len(self.layers):
            raise ValueError(f"routing has {len(routing)} layers, the collector traces {len(self.layers)}")
        self.probe_tokens_P = token_ids.reshape(-1).long().cpu()
        self.probe_topk_LPK = ranked_layers(routing, self.probe_tokens_P.numel())

    def counts(self) -> RoutingCounts:
        """The counts so far (copies: adding more later does not change them)."""
        self._merge()
        return RoutingCounts(
            layers=list(self.layers), num_experts=self.E, top_k=self.K, vocab_size=self.V, domains=list(self.domains),
            tokens=self.tokens, domain_tokens_D=self.domain_tokens_D.clone(),
            domain_expert_LDE=self.domain_expert_LDE.clone(), token_count_V=self.token_count_V.clone(),
            token_expert=[t.clone() for t in self._token_expert], token_top1=[t.clone() for t in self._token_top1],
            coactivation_LEE=self.coactivation_LEE.clone(), transition_LEE=self.transition_LEE.clone(),
            transition_top1_LEE=self.transition_top1_LEE.clone(),
            probe_tokens_P=None if self.probe_tokens_P is None else self.probe_tokens_P.clone(),
            probe_topk_LPK=None if self.probe_topk_LPK is None else self.probe_topk_LPK.clone(),
            notes=list(self.notes))


# --- workbench models ------------------------------------------------------------------------------


def _layer_routing(out: Any) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    return [(r.router_output.expert_ids_TK, r.router_output.weights_TK, r.router_output.mask_TK) for r in out.routing]


def _batches(batches: Iterable[Any]) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    """(tokens, domains) from ``Batch`` objects, (tokens, domains) pairs, or bare (B, S) token tensors."""
    for batch in batches:
        if isinstance(batch, torch.Tensor):
            yield batch, None
        elif isinstance(batch, tuple | list) and len(batch) == 2:
            yield batch[0], batch[1]
        elif hasattr(batch, "tokens"):
            yield batch.tokens, getattr(batch, "domains", None)
        else:
            raise ValueError(f"batches must yield Batch objects, (tokens, domains) pairs or (B, S) token tensors, "
                             f"got {type(batch).__name__}")


@torch.no_grad()
def collect(model: Any, batches: Iterable[Any], *, domains: Sequence[str] | None = None,
            probe_tokens: torch.Tensor | None = None, max_batches: int | None = None) -> RoutingCounts:
    """Route ``batches`` through a workbench ``MoELM`` in evaluation mode and count (``RoutingCounts``).

    ``batches``: ``workbench.data.Batch`` objects (their per-token ``domains`` are used), (tokens,
    domain ids) pairs, or (B, S) token tensors (one domain, ``"all"``). ``domains`` names the domain
    ids (for example ``LMData.domains``). ``probe_tokens`` (B, S): a fixed probe set whose ranked
    experts are kept, for router saturation across checkpoints. The model's mode is restored.
    """
    moe = model.cfg.moe
    if moe is None:
        raise ValueError("model is dense (ModelConfig.moe=None): there is no routing to trace")
    # expert choice pads to the most experts any token got; the widest a token can get is E
    top_k = moe.num_experts if getattr(model.moe_layers()[0].router, "pads_slots", False) else moe.top_k
    collector = RoutingCollector(model.cfg.moe_layers, moe.num_experts, top_k, model.cfg.vocab_size, domains)
    device = next(model.parameters()).device
    return stream_routing(model, collector, batches, lambda tokens: _layer_routing(model(tokens.to(device))),
                          probe_tokens=probe_tokens, max_batches=max_batches)


def stream_routing(model: Any, collector: RoutingCollector, batches: Iterable[Any],
                   route: Callable[[torch.Tensor], Any], *, probe_tokens: torch.Tensor | None = None,
                   max_batches: int | None = None) -> RoutingCounts:
    """Count ``route(tokens)`` (the per-layer routing of a (B, S) batch) over ``batches`` and the probe
    set, with ``model`` in evaluation mode (its mode restored after): the loop that ``collect`` and the
    Hugging Face collector share."""
    was_training = model.training
    model.eval()
    try:
        for i, (tokens, domain_ids) in enumerate(_batches(batches)):
            if max_batches is not None and i >= max_batches:
                break
            collector.add(route(tokens), tokens, domain_ids)
        if probe_tokens is not None:
            collector.set_probe(route(probe_tokens), probe_tokens)
    finally:
        model.train(was_training)
    return collector.counts()


@torch.no_grad()
def probe_routing(model: Any, probe_tokens: torch.Tensor) -> torch.Tensor:
    """(L, P, K) long: the ranked experts of every probe token in every MoE layer (evaluation mode),
    for ``router_saturation``; P = B * S of ``probe_tokens`` (B, S)."""
    was_training = model.training
    model.eval()
    try:
        out = model(probe_tokens.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
    return ranked_layers(_layer_routing(out), probe_tokens.numel())


class ProbeRecorder:
    """A ``Trainer.fit`` callback that routes a fixed probe set at every validation (and, with
    ``counts_every_eval``, collects ``RoutingCounts`` over the validation batches), for router
    saturation and specialization over training.

        recorder = ProbeRecorder(probe_tokens_BS)
        trainer.fit(callback=recorder)
        router_saturation(recorder.probes[0][1], recorder.probes[-1][1])

    ``probes``: (step, (L, P, K) ranked experts) per validation; ``counts``: (step, RoutingCounts).
    ``every``: route the probe every this many steps as well (None: at validations only).
    """

    def __init__(self, probe_tokens: torch.Tensor, *, counts_every_eval: bool = False, every: int | None = None):
        self.probe_tokens = probe_tokens
        self.counts_every_eval = counts_every_eval
        self.every = every
        self.probes: list[tuple[int, torch.Tensor]] = []
        self.counts: list[tuple[int, RoutingCounts]] = []

    def __call__(self, trainer: Any, row: dict[str, Any]) -> None:
        step = trainer.step
        at_eval = "val/loss" in row
        if at_eval or (self.every and step % self.every == 0):
            if not self.probes or self.probes[-1][0] != step:
                self.probes.append((step, probe_routing(trainer.model, self.probe_tokens)))
        if at_eval and self.counts_every_eval:
            data = trainer.data
            batches = [b for bs in data.val_batches().values() for b in bs]
            self.counts.append((step, collect(trainer.model, batches, domains=list(data.domains))))


def byte_classes() -> dict[str, list[int]]:
    """The byte values of each class, for per-class vocabulary specialization with ``ByteTokenizer``:
    ASCII letters, digits, whitespace (space, tab, newline, CR, VT, FF), punctuation (the 32
    printable ASCII symbols), non-ASCII (128-255: UTF-8 lead and continuation bytes) and other
    (the remaining control bytes)."""
    import string

    classes: dict[str, Callable[[int], bool]] = {
        "letters": lambda b: chr(b) in string.ascii_letters,
        "digits": lambda b: chr(b) in string.digits,
        "whitespace": lambda b: chr(b) in string.whitespace,
        "punctuation": lambda b: chr(b) in string.punctuation,
        "non_ascii": lambda b: b >= 128,
    }
    out = {name: [b for b in range(256) if test(b)] for name, test in classes.items()}
    taken = {b for ids in out.values() for b in ids}
    out["other"] = [b for b in range(256) if b not in taken]
    return out
