"""Expert offloading, simulated on real routing traces: an expert cache per MoE layer on the device,
the rest of the experts in host memory, and what its misses cost in time per token.

The setting is Eliseev & Mazur 2023 ("Fast Inference of Mixture-of-Experts Language Models with
Offloading", arXiv:2312.17238): a model whose experts do not all fit in device memory keeps ``N``
experts of each MoE layer on the device (an LRU cache in their work) and copies a missing expert
over the host link when a token needs it. Three pieces:

- **Traces** (``ExpertTrace``): the experts of every token of every sequence in every MoE layer, as
  generation routed them (``generation_trace`` through ``workbench.inference.generate``; or
  ``hf_generation_trace`` for a Hugging Face MoE model through the interop hooks), with the
  prefetch guesses described below. ``decode_steps`` turns a trace into the requests of a decode
  loop: one step per generated position, a batch of ``batch`` sequences per step, the step needing
  the union of their experts (each expert is copied once per step however many tokens use it).
- **The cache** (``simulate``), one per layer, of ``capacity`` experts, with three policies:
  ``lru`` (evict the least recently used: Eliseev & Mazur's), ``lfu`` (evict the least frequently
  requested so far, ties by recency) and ``belady`` (evict the expert whose next request is furthest
  in the future: Belady 1966, "A study of replacement algorithms for a virtual-storage computer",
  IBM Systems Journal 5(2); it needs the future, so it is the offline optimum, the bound the two
  online policies are measured against). A step's request is a *set*: the experts it needs that
  the cache holds are hits, the others are copied in (misses), and the cache then keeps at most
  ``capacity`` of the experts it held or copied (an expert may be used once and dropped: paging
  with bypass, for which keeping the ``capacity`` experts with the soonest next request is optimal,
  so Belady is never worse than LRU or LFU, which the tests check on random traces).
- **Prefetch** (``prefetch=`` of ``simulate``): Eliseev & Mazur's *speculative expert loading*
  applies the next MoE layer's router to a hidden state the current layer already has and copies
  its top-k guesses while the current layer computes. ``generation_trace`` records three guesses per
  token for every MoE layer after the first, by forward hooks on the previous MoE block during
  generation: ``gate_input`` (the next router applied to the same normalised state the current
  router reads: the paper's), ``residual`` (the next layer's own RMSNorm and router applied to the
  residual stream entering the current FFN) and ``block_output`` (the same applied to the current
  block's output, so only the next block's attention is left to overlap with). ``prefetch_recall``
  is the share of needed experts that were guessed.

``time_per_token`` turns misses into seconds: copies x expert bytes / host-link bandwidth, divided
by the tokens of a step. ``host_link`` reads the device table's ``host_link_gb_s``
(``workbench/bench/devices.yaml``) and falls back on ``HOST_LINKS`` for a device without one.

``shuffled_trace`` is the random-routing baseline with the same loads: every token keeps its set of
experts in each layer, but the tokens are permuted over positions and sequences independently per
layer, so the per-expert load is exactly the trace's and any order in time is gone.

Shape legend: L MoE layers, B sequences, N positions (prompt first), K experts per token, E experts.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workbench.validation import check, check_choice, check_int

POLICIES = ("lru", "lfu", "belady")
PREFETCH_SOURCES = ("gate_input", "residual", "block_output")

# --- traces -----------------------------------------------------------------------------------------


@dataclass
class ExpertTrace:
    """The experts every token went to in every MoE layer, as generation routed them.

    ``expert_ids``: (L, B, N, K) ints, -1 where a sequence is shorter than N. Positions below
    ``prompt_len`` are the prompt (routed in the prefill); the decode steps are the rest.
    ``prefetch``: per source in ``PREFETCH_SOURCES``, (L, B, N, K) guesses of layer l's experts made
    from MoE layer l-1's hidden state at the same token (layer 0 has none: all -1).
    """

    expert_ids: np.ndarray
    num_experts: int
    prompt_len: int
    prefetch: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""
    tokens: np.ndarray | None = None  # (B, N) the token ids, -1 past a sequence's end

    def __post_init__(self) -> None:
        check(self.expert_ids.ndim == 4, "expert_ids", "must be (L, B, N, K)", self.expert_ids.shape)
        check_int("num_experts", self.num_experts, 1)
        check(0 <= self.prompt_len < self.expert_ids.shape[2], "prompt_len",
              f"must leave decode steps: 0 <= prompt_len < N={self.expert_ids.shape[2]}", self.prompt_len)
        check(int(self.expert_ids.max()) < self.num_experts, "expert_ids", f"must be < num_experts={self.num_experts}",
              int(self.expert_ids.max()))
        for name, guess in self.prefetch.items():
            check_choice("prefetch", name, PREFETCH_SOURCES)
            check(guess.shape[:3] == self.expert_ids.shape[:3], f"prefetch[{name!r}]",
                  f"must be (L, B, N, k) like expert_ids {self.expert_ids.shape}", guess.shape)

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[3]

    def decode_ids(self) -> np.ndarray:
        """(L, B, N - prompt_len, K): the generated positions only."""
        return self.expert_ids[:, :, self.prompt_len:]

    def loads(self) -> np.ndarray:
        """(L, E): assignments per expert over the decode positions of every sequence."""
        ids = self.decode_ids()
        return np.stack([np.bincount(ids[layer][ids[layer] >= 0], minlength=self.num_experts)
                         for layer in range(self.num_layers)])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The trace as named arrays (``np.savez_compressed``); ``from_arrays`` reads them back."""
        out = {"expert_ids": self.expert_ids.astype(np.int16), "num_experts": np.array(self.num_experts),
               "prompt_len": np.array(self.prompt_len), "source": np.array(self.source)}
        out.update({f"prefetch_{k}": v.astype(np.int16) for k, v in self.prefetch.items()})
        if self.tokens is not None:
            out["tokens"] = self.tokens.astype(np.int32)
        return out

    @classmethod
    def from_arrays(cls, arrays: Any) -> ExpertTrace:
        prefetch = {k[len("prefetch_"):]: np.asarray(arrays[k]).astype(np.int64) for k in arrays
                    if k.startswith("prefetch_")}
        tokens = np.asarray(arrays["tokens"]).astype(np.int64) if "tokens" in arrays else None
        return cls(np.asarray(arrays["expert_ids"]).astype(np.int64), int(arrays["num_experts"]),
                   int(arrays["prompt_len"]), prefetch, str(arrays["source"]), tokens)


def decode_steps(ids_BNK: np.ndarray, batch: int) -> list[frozenset[int]]:
    """The requests of a decode loop over one layer's (B, N, K) decode positions: sequences taken
    ``batch`` at a time (B // batch groups; a remainder is left out), one step per position, each
    step the set of experts its ``batch`` tokens need. Groups follow one another in time, as
    requests do on a server that keeps one cache."""
    B = ids_BNK.shape[0]
    check_int("batch", batch, 1)
    check(batch <= B, "batch", f"must be at most the trace's {B} sequences", batch)
    steps = []
    for g in range(B // batch):
        group = ids_BNK[g * batch:(g + 1) * batch]  # (batch, N, K)
        for n in range(group.shape[1]):
            needed = group[:, n].ravel()
            needed = needed[needed >= 0]
            if needed.size:
                steps.append(frozenset(needed.tolist()))
    return steps


def shuffled_trace(trace: ExpertTrace, seed: int = 0) -> ExpertTrace:
    """The random-routing baseline with the same loads: in each layer, the decode tokens' expert
    sets permuted over (sequence, position) independently; the prompt kept. Each layer's per-expert
    load is exactly the trace's; prefetch guesses are dropped (they belonged to the original order)."""
    rng = np.random.default_rng(seed)
    ids = trace.expert_ids.copy()
    L, B, N, K = ids.shape
    P = trace.prompt_len
    for layer in range(L):
        decode = ids[layer, :, P:].reshape(B * (N - P), K)
        real = np.flatnonzero((decode >= 0).all(axis=1))
        decode[real] = decode[rng.permutation(real)]
        ids[layer, :, P:] = decode.reshape(B, N - P, K)
    return ExpertTrace(ids, trace.num_experts, P, {}, f"{trace.source}, shuffled (seed {seed})")


# --- the cache --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheStats:
    """What a cache did over a trace. ``requests``: experts needed, summed over steps; ``hits``: of
    those, the ones the cache held (a prefetched one included); ``demand_loads``: copies made when
    a step needed an expert it did not hold (the stalls); ``prefetch_loads``: copies of guesses
    (right or wrong); ``prefetch_hits``: needed experts that were guessed for that step."""

    policy: str
    capacity: int
    steps: int
    requests: int
    hits: int
    demand_loads: int
    prefetch_loads: int = 0
    prefetch_hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else math.nan

    @property
    def loads(self) -> int:
        """Every copy over the host link."""
        return self.demand_loads + self.prefetch_loads

    @property
    def prefetch_recall(self) -> float:
        return self.prefetch_hits / self.requests if self.requests else math.nan


def _next_uses(steps: Sequence[frozenset[int]]) -> list[dict[int, float]]:
    """For step t, each of its experts' next step after t that needs it (inf if none)."""
    upcoming: dict[int, float] = {}
    out: list[dict[int, float]] = [{} for _ in steps]
    for t in range(len(steps) - 1, -1, -1):
        out[t] = {e: upcoming.get(e, math.inf) for e in steps[t]}
        for e in steps[t]:
            upcoming[e] = t
    return out


def simulate(steps: Sequence[frozenset[int]], capacity: int, policy: str = "lru", *,
             prefetch: Sequence[frozenset[int]] | None = None) -> CacheStats:
    """One layer's expert cache of ``capacity`` experts over ``steps`` (``decode_steps``).

    lru: evict the least recently used; lfu: the least often requested so far (every request
    counts, held or not), ties by recency; belady: the one needed furthest in the future (offline).
    ``prefetch``: a set of guessed experts per step, copied in before the step's request as the
    most recently used (lru and lfu only: Belady knows the future and needs no guess).
    """
    check_choice("policy", policy, POLICIES)
    check_int("capacity", capacity, 0)
    check(prefetch is None or policy != "belady", "prefetch", "applies to lru and lfu (Belady is the offline "
          "bound)", policy)
    check(prefetch is None or len(prefetch) == len(steps), "prefetch", f"needs one set per step ({len(steps)})",
          None if prefetch is None else len(prefetch))
    cache: OrderedDict[int, None] = OrderedDict()  # least recently used first
    freq: dict[int, int] = {}
    next_use = _next_uses(steps) if policy == "belady" else None
    # when each cached expert is next needed (Belady), kept for the experts in the cache
    due: dict[int, float] = {}
    requests = hits = demand = pf_loads = pf_hits = 0

    def evict_down(protect: frozenset[int]) -> None:
        # Evict until the cache fits; an expert of the current step is evicted only when the step
        # alone needs more than ``capacity`` (its extra experts are streamed and dropped).
        while len(cache) > capacity:
            candidates = [e for e in cache if e not in protect] or list(cache)
            if policy == "lru":
                victim = candidates[0]
            elif policy == "lfu":
                order = {e: i for i, e in enumerate(cache)}
                victim = min(candidates, key=lambda e: (freq.get(e, 0), order[e]))
            else:
                victim = max(candidates, key=lambda e: (due[e], e))
            del cache[victim]

    for t, needed in enumerate(steps):
        if prefetch is not None and capacity > 0:
            guesses = prefetch[t]
            for e in sorted(guesses):
                if e not in cache:
                    pf_loads += 1
                cache[e] = None
                cache.move_to_end(e)
            evict_down(guesses)
            pf_hits += len(needed & guesses)
        requests += len(needed)
        held = needed & cache.keys()
        hits += len(held)
        demand += len(needed) - len(held)
        for e in sorted(needed):
            freq[e] = freq.get(e, 0) + 1
            if capacity > 0:
                cache[e] = None
                cache.move_to_end(e)
        if policy == "belady":
            for e in needed:
                due[e] = next_use[t][e]
            # Belady with bypass: keep the ``capacity`` experts needed soonest, whoever they are.
            while len(cache) > capacity:
                victim = max(cache, key=lambda e: (due[e], e))
                del cache[victim]
        else:
            evict_down(needed)
    return CacheStats(policy, capacity, len(steps), requests, hits, demand, pf_loads, pf_hits)


def hit_rate_table(trace: ExpertTrace, capacities: Sequence[int], *, batches: Sequence[int] = (1,),
                   policies: Sequence[str] = POLICIES, prefetch: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per (layer, batch, policy, capacity): the cache's counts and rates over the trace's
    decode steps. ``prefetch``: sources of ``trace.prefetch`` to add as ``lru+<source>`` (and
    ``lfu+<source>``) rows on every layer but the first, which has no previous layer to guess from."""
    rows = []
    ids = trace.decode_ids()
    for layer in range(trace.num_layers):
        for batch in batches:
            steps = decode_steps(ids[layer], batch)
            variants: list[tuple[str, str, list[frozenset[int]] | None]] = [(p, p, None) for p in policies]
            if layer > 0:
                for source in prefetch:
                    guesses = decode_steps(trace.prefetch[source][layer][:, trace.prompt_len:], batch)
                    variants += [(f"{p}+{source}", p, guesses) for p in policies if p != "belady"]
            for name, policy, guesses in variants:
                for capacity in capacities:
                    s = simulate(steps, capacity, policy, prefetch=guesses)
                    rows.append({"layer": layer, "batch": batch, "policy": name, "capacity": capacity,
                                 "steps": s.steps, "requests": s.requests, "hits": s.hits, "hit_rate": s.hit_rate,
                                 "demand_loads": s.demand_loads, "prefetch_loads": s.prefetch_loads,
                                 "loads": s.loads, "prefetch_recall": s.prefetch_recall,
                                 "distinct_per_step": s.requests / s.steps if s.steps else math.nan})
    return rows


def prefetch_recall(trace: ExpertTrace, source: str = "gate_input") -> np.ndarray:
    """(L,) the share of each layer's decode-token experts that the guess for the same token named
    (NaN for the first layer, which has no guess), over every decode token of every sequence."""
    check_choice("source", source, list(trace.prefetch))
    P = trace.prompt_len
    ids, guess = trace.expert_ids[:, :, P:], trace.prefetch[source][:, :, P:]
    out = np.full(trace.num_layers, math.nan)
    for layer in range(1, trace.num_layers):
        real = ids[layer] >= 0
        hit = (ids[layer][..., :, None] == guess[layer][..., None, :]).any(-1) & real
        out[layer] = hit.sum() / max(int(real.sum()), 1)
    return out


# --- time per token ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostLink:
    """A device's host-to-device link: GB/s per direction (``value``; ``low`` what a pinned-memory
    copy typically reaches), and where the figure comes from."""

    name: str
    gb_s: float
    low_gb_s: float
    source: str
    status: str


_PCIE4 = ("PCIe 4.0 x16", 31.5, 25.0)
_PCIE5 = ("PCIe 5.0 x16", 63.0, 50.0)
_PCIE_SOURCE = ("nominal per direction: 16 lanes x 16 GT/s (PCIe 4.0) or 32 GT/s (PCIe 5.0) x 128/130; low: a "
                "pinned host-to-device copy reaches about 80% of it")
HOST_LINKS: dict[str, HostLink] = {
    "A100": HostLink(*_PCIE4, "NVIDIA A100 datasheet: PCIe Gen4 (64 GB/s both directions); " + _PCIE_SOURCE,
                     "datasheet"),
    "H100": HostLink(*_PCIE5, "NVIDIA H100 SXM datasheet: PCIe Gen5 (128 GB/s both directions); " + _PCIE_SOURCE,
                     "datasheet"),
    "H200": HostLink(*_PCIE5, "NVIDIA H200 datasheet: PCIe Gen5 (128 GB/s both directions); " + _PCIE_SOURCE,
                     "datasheet"),
    "H800": HostLink(*_PCIE5, "NVIDIA H800 SXM: PCIe Gen5, as the H100; " + _PCIE_SOURCE, "datasheet"),
    "Ascend910B": HostLink(*_PCIE4, "assumed PCIe 4.0 x16 (the Ascend 910 family's host interface as commonly "
                                    "described); no verified figure for the 910B", "unverified"),
    "Ascend910B2": HostLink(*_PCIE4, "assumed as Ascend910B; not verified", "unverified"),
    "Ascend910C": HostLink(*_PCIE5, "assumed PCIe 5.0 x16; no published host-link figure found", "unverified"),
}


def host_link(device_key: str, end: str = "value") -> float:
    """GB/s per direction of ``device_key``'s host link: the device table's ``host_link_gb_s``
    (its ``low`` / ``value`` / ``high`` end) where it has one, else ``HOST_LINKS`` (``low``: a
    typical pinned copy; ``high``: nominal)."""
    check_choice("end", end, ("low", "value", "high"))
    figure = _table_host_link(device_key)
    if figure is not None and figure.at(end) is not None:
        return float(figure.at(end))
    check_choice("device", device_key, HOST_LINKS)
    link = HOST_LINKS[device_key]
    return link.low_gb_s if end == "low" else link.gb_s


def host_link_source(device_key: str) -> str:
    """Where ``host_link`` takes the device's figure from, and that figure's status."""
    figure = _table_host_link(device_key)
    if figure is not None and figure.value is not None:
        return f"devices.yaml ({figure.status}): {figure.source}"
    check_choice("device", device_key, HOST_LINKS)
    link = HOST_LINKS[device_key]
    return f"{link.name} ({link.status}): {link.source}"


def _table_host_link(device_key: str) -> Any:
    from workbench.bench import perfmodel

    if "host_link_gb_s" not in perfmodel.FIGURES:
        return None
    devices = perfmodel.load_devices()
    if device_key not in devices:
        return None
    return devices[device_key].figures.get("host_link_gb_s")


PRECISION_BYTES = {"bf16": 2.0, "fp8": 1.0, "int4": 0.5}


def expert_bytes(d_model: int, expert_hidden: int, precision: str = "bf16") -> float:
    """Bytes of one SwiGLU expert (three D x H matrices) at ``precision`` (bf16, fp8, int4;
    quantisation scales not counted)."""
    check_choice("precision", precision, PRECISION_BYTES)
    return 3.0 * d_model * expert_hidden * PRECISION_BYTES[precision]


def time_per_token(copies_per_step: float, n_moe_layers: int, nbytes: float, link_gb_s: float,
                   batch: int = 1) -> float:
    """Seconds per generated token spent copying experts: ``copies_per_step`` (one layer's mean copies
    per decode step) x ``n_moe_layers`` x ``nbytes`` per expert over ``link_gb_s``, shared by the
    ``batch`` tokens of a step. The copies are serial on one link, so this is also the link-bound
    floor of a token's time when they overlap compute perfectly."""
    check(link_gb_s > 0, "link_gb_s", "must be > 0", link_gb_s)
    check_int("batch", batch, 1)
    return copies_per_step * n_moe_layers * nbytes / (link_gb_s * 1e9) / batch


# --- recording traces -------------------------------------------------------------------------------


class _PrefetchHooks:
    """Forward hooks on every MoE block but the last: the next MoE layer's router applied to this
    block's states, per forward call (prefill, then one per decode step)."""

    def __init__(self, model: Any):
        import torch

        self.torch = torch
        self.blocks = [b for b in model.blocks if b.is_moe]
        self.calls: list[list[dict[str, Any]]] = [[] for _ in self.blocks]  # per MoE layer, per call
        self.handles = []
        for i, (block, nxt) in enumerate(zip(self.blocks[:-1], self.blocks[1:], strict=True)):
            self.handles.append(block.ffn_norm.register_forward_hook(self._norm_hook(i, nxt)))
            self.handles.append(block.register_forward_hook(self._block_hook(i, nxt)))

    def _guess(self, nxt: Any, x_BSD: Any) -> Any:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        return nxt.ffn.router(x_TD, None).expert_ids_TK

    def _norm(self, nxt: Any, x: Any) -> Any:
        # the next block's RMSNorm as a function: calling the module would fire its own hook
        norm = nxt.ffn_norm
        return self.torch.nn.functional.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)

    def _norm_hook(self, i: int, nxt: Any):
        def hook(module, args, output):
            with self.torch.no_grad():
                self.calls[i + 1].append({"gate_input": self._guess(nxt, output),
                                          "residual": self._guess(nxt, self._norm(nxt, args[0]))})
        return hook

    def _block_hook(self, i: int, nxt: Any):
        def hook(module, args, output):
            with self.torch.no_grad():
                self.calls[i + 1][-1]["block_output"] = self._guess(nxt, self._norm(nxt, output[0]))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def generation_trace(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                     temperature: float = 0.8, seed: int = 0, prefetch: bool = True, source: str = "") -> ExpertTrace:
    """Generate from ``prompts`` (token id lists of one length, so that every sequence's decode
    steps line up) with ``workbench.inference.generate`` and return its routing as an
    ``ExpertTrace``; with ``prefetch``, the three next-layer guesses of every token recorded by
    forward hooks during the same generation (removed after)."""
    import torch

    from workbench.inference import generate
    from workbench.inference.generation import _aligned_routing, left_pad

    lengths = {len(p) for p in prompts}
    check(len(lengths) == 1, "prompts", "must all have one length (decode steps line up across the batch)",
          sorted(lengths))
    hooks = _PrefetchHooks(model) if prefetch else None
    try:
        result = generate(model, [list(p) for p in prompts], max_new_tokens, temperature=temperature, seed=seed)
    finally:
        if hooks is not None:
            hooks.remove()
    ids = torch.stack([r.expert_ids for r in result.routing]).numpy()
    guesses: dict[str, np.ndarray] = {}
    if hooks is not None:
        calls = len(hooks.calls[-1]) if len(hooks.calls) > 1 else 0
        if any(len(c) != calls for c in hooks.calls[1:]):
            raise RuntimeError(f"prefetch hooks recorded {[len(c) for c in hooks.calls[1:]]} forward calls per MoE "
                               "layer; expected one per layer and call")
        _, real_BP = left_pad(result.prompt_tokens, torch.device("cpu"))
        lengths_B = [len(t) for t in result.tokens]
        for name in PREFETCH_SOURCES:
            steps = []
            for c in range(calls):
                per_layer = []
                for layer, rec in enumerate(hooks.calls):
                    ref = hooks.calls[-1][c][name]
                    guess = rec[c][name] if layer > 0 else torch.full_like(ref, -1)
                    per_layer.append((guess, guess.float(), guess.float()))
                steps.append(per_layer)
            aligned = _aligned_routing(model, steps, real_BP, lengths_B) if calls else []
            guesses[name] = torch.stack([a.expert_ids for a in aligned]).numpy() if aligned else \
                np.full_like(ids, -1)
    tokens = np.full(ids.shape[1:3], -1, dtype=np.int64)
    for b, row in enumerate(result.tokens):
        tokens[b, :len(row)] = row
    return ExpertTrace(ids.astype(np.int64), model.cfg.moe.num_experts, len(prompts[0]),
                       {k: v.astype(np.int64) for k, v in guesses.items()}, source, tokens)


def hf_generation_trace(model: Any, prompt_ids: Any, max_new_tokens: int, *, source: str = "") -> ExpertTrace:
    """Greedy generation from a Hugging Face ``transformers`` MoE model (``prompt_ids`` (B, P) token
    ids, one length) through its own KV cache, with the experts of every token read by the interop
    hooks (``workbench.interop.hf.hf_routing_hooks``); no prefetch guesses."""
    import torch

    from workbench.interop.hf import _num_experts, hf_routing_hooks

    prompt_ids = torch.as_tensor(prompt_ids)
    check(prompt_ids.ndim == 2, "prompt_ids", "must be (B, P) token ids", tuple(prompt_ids.shape))
    B, P = prompt_ids.shape
    device = next(model.parameters()).device
    # transformers 5.x renamed past_key_values to cache (input and output alike)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    was_training = model.training
    model.eval()
    per_step: list[list[Any]] = []
    tokens = [prompt_ids]
    try:
        with torch.no_grad(), hf_routing_hooks(model) as hooks:
            out = model(input_ids=prompt_ids.to(device), use_cache=True)
            per_step.append([ids.reshape(B, P, -1) for ids, _, _ in hooks.routing()])
            for _ in range(max_new_tokens):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(nxt.cpu())
                out = model(input_ids=nxt, use_cache=True, **{cache_arg: getattr(out, cache_arg)})
                per_step.append([ids.reshape(B, 1, -1) for ids, _, _ in hooks.routing()])
    finally:
        model.train(was_training)
    ids = torch.stack([torch.cat([s[layer] for s in per_step], dim=1) for layer in range(len(per_step[0]))])
    return ExpertTrace(ids.cpu().numpy().astype(np.int64), _num_experts(model.config), P, {},
                       source or f"{model.config.model_type} (Hugging Face)", torch.cat(tokens, dim=1).numpy())
