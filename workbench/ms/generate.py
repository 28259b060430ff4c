"""Greedy generation with a KV cache for the MindSpore model, and its parity with PyTorch's ``generate``.

    new_tokens = ms_greedy_generate(ms_model, ["def ", "12 + 35 ="], max_new_tokens=32, mode="graph")
    out = ms_greedy_decode(ms_model, ["def "], 32)      # also the logits of every step, and timings
    report = generation_parity(torch_model, ["def ", "The "], 32, mode="pynative")
    print(report.format()); report.passed

The same decode as ``workbench.inference`` (read ``workbench/inference/cache.py`` first), written for
``workbench.ms.model.MoELM`` without changing it: the functions below reuse the model's cells and
parameters (its norms, the attention's ``qkv``/``out`` weights and rotary ``heads``, the routers,
experts and dropless dispatch) and add only the cached path.

- The cache: per layer, a keys and a values buffer of static shape (B, h, W, d), allocated once
  (W = prompt + new tokens, at most ``seq_len``). A step writes its S new keys and values into their
  slots and attends over all W slots with a mask, never over a slice of growing length, so a
  compiled step has one shape for the prefill and one for every decode step.
- The step is a pure function (cache in, cache out): GRAPH mode (``mindspore.jit``) compiles a
  function with no side effects, and PyNative runs the very same code op by op. The write is a
  gather + select, not a matmul with a one-hot, so it moves values exactly on every backend
  (accelerators may run fp32 matmuls in reduced precision).
- The bookkeeping stays on the host, in numpy (``MSKVCache``): positions, slots and the mask of a
  step are a few hundred integers, as ``KVCache`` keeps its ``written`` count on the host. The
  compiled step does only arithmetic.
- Left-padded prompts: a padding slot holds position -1 and is never attended to; a sequence's
  real tokens get positions 0, 1, 2, ... from its first real token, so its rotary angles are those
  of the sequence alone. A padding query attends to every slot (an all-masked softmax row is NaN);
  its output is never read.
- MoE layers run the dropless dispatch and compute no balancing losses (PyTorch's
  ``MoELayer.forward(inference=True)``); routers that cannot decode token by token are refused with
  PyTorch's reason (``Router.decode_refusal``).
- Greedy: the next token is the argmax of the last position's logits (the first index on ties, as
  ``torch.argmax``); generation stops after ``max_new_tokens`` or when the context (``seq_len``)
  is full, whichever comes first.

Generation parity (``generation_parity``): the PyTorch model is converted (``convert.from_torch``),
both frameworks greedy-decode the same prompts, and per prompt the report says whether the tokens
are equal, the first step where they differ, and whether that step was a *near tie*: the gap
between PyTorch's two highest logits there is at most ``NEAR_TIE_LOGIT`` = 1e-4 (absolute). Why
1e-4: the two frameworks' logits differ by a few 1e-7 to a few 1e-6 (fp32 rounding in a different
order; measured on the tiny preset, see ``tests/ms/test_generate.py``), and the argmax can flip only
where the top-2 gap is at most twice the largest difference; 1e-4 leaves a margin of more than 10x
over that, while a wrong weight moves logits by far more (1e-3 and up), so a divergence it causes
is no near tie. ``max_logit_diff`` is the largest |ms - torch| logit difference over the steps
before the first divergence (all steps when there is none), and ``diff_at_divergence`` that of the
divergent step itself: its inputs (the prompt and the tokens before it) are still the same in both
frameworks, so its difference says whether rounding or a real difference flipped the argmax.

Shape legend: B sequences, P longest prompt, S new tokens of a step, W cache slots, D model dim,
h heads, d head dim, V vocabulary, L layers, T = B*S tokens, N generated steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workbench.ms._import import require_mindspore
from workbench.validation import check, check_choice

ms = require_mindspore()
from mindspore import Tensor, ops  # noqa: E402

from workbench.ms import model as msm  # noqa: E402

MODES = ("pynative", "graph")
NEAR_TIE_LOGIT = 1e-4  # absolute top-2 logit gap below which a divergence is put down to rounding (see above)
# a few bytes from each built-in domain (code, prose, math, records), of different lengths
PARITY_PROMPTS = ("def ", "The ", "12 + 35 =", "U+00")


# --- the cache: host-side bookkeeping ---------------------------------------------------------------


class MSKVCache:
    """Keys and values of ``batch_size`` sequences for every layer, ``slots`` slots each, and the
    bookkeeping of ``workbench.inference.KVCache`` (positions, slots, mask) in numpy.

    ``keys``, ``values``: tuples of L MindSpore tensors (B, h, W, d), replaced by each step's output
    (the step is a pure function). ``key_pos_BW``: the position of the token in each slot, -1 for
    an empty or padding slot.
    """

    def __init__(self, cfg, batch_size: int, slots: int):
        check(isinstance(slots, int) and 1 <= slots <= cfg.seq_len, "slots",
              f"must be between 1 and the model's context seq_len={cfg.seq_len}", slots)
        self.batch_size, self.slots = batch_size, slots
        zeros = np.zeros((batch_size, cfg.n_heads, slots, cfg.head_dim), np.float32)
        self.keys = tuple(Tensor(zeros) for _ in range(cfg.n_layers))
        self.values = tuple(Tensor(zeros) for _ in range(cfg.n_layers))
        self.key_pos_BW = np.full((batch_size, slots), -1, np.int32)
        self.next_pos_B = np.zeros(batch_size, np.int32)  # the position of each sequence's next real token
        self.written = 0  # tokens written per sequence so far, padding included

    def begin_step(self, num_tokens: int, real_BS: np.ndarray | None = None) -> dict[str, Tensor]:
        """Place the step's ``num_tokens`` new tokens per sequence (``real_BS``: False for left
        padding, prefill only). Returns the step's inputs: ``positions_BS`` (int32, clamped to 0 for
        the rotary tables), ``source_W`` and ``new_W`` (which of the S new rows each slot takes, and
        whether it takes one), and the additive mask ``mask_B1SW`` (0 attended, -inf not)."""
        S, W = num_tokens, self.slots
        check(self.written + S <= W, "max_new_tokens", f"the sequence would hold {self.written + S} tokens, more "
              f"than the cache's {W} slots", S)
        if real_BS is None:
            positions_BS = self.next_pos_B[:, None] + np.arange(S, dtype=np.int32)
            self.next_pos_B = self.next_pos_B + S
        else:
            counts_BS = np.cumsum(real_BS, axis=1, dtype=np.int32)
            positions_BS = np.where(real_BS, self.next_pos_B[:, None] + counts_BS - 1, -1).astype(np.int32)
            self.next_pos_B = self.next_pos_B + counts_BS[:, -1]
        slots_S = np.arange(self.written, self.written + S)
        self.key_pos_BW[:, slots_S] = positions_BS
        self.written += S

        key_pos_B1W = self.key_pos_BW[:, None, :]
        allowed_BSW = (key_pos_B1W >= 0) & (key_pos_B1W <= positions_BS[:, :, None])
        allowed_BSW |= ~allowed_BSW.any(axis=-1, keepdims=True)  # a padding query: every slot (never read)
        mask_BSW = np.where(allowed_BSW, 0.0, -np.inf).astype(np.float32)
        new_W = np.zeros(W, bool)
        new_W[slots_S] = True
        source_W = np.clip(np.arange(W) - (self.written - S), 0, S - 1).astype(np.int32)
        return {"positions_BS": Tensor(np.maximum(positions_BS, 0)), "source_W": Tensor(source_W),
                "new_W": Tensor(new_W.reshape(1, 1, W, 1)), "mask_B1SW": Tensor(mask_BSW[:, None])}


# --- the cached forward: the MindSpore model's cells, one step --------------------------------------


def write_slots(buffer_BhWd: Tensor, new_BhSd: Tensor, source_W: Tensor, new_W: Tensor) -> Tensor:
    """The buffer with slot w replaced by new row ``source_W[w]`` where ``new_W[w]``: a gather and a
    select, exact on every backend and of one shape whatever the slots."""
    return ops.select(ops.broadcast_to(new_W, buffer_BhWd.shape), ops.gather(new_BhSd, source_W, 2), buffer_BhWd)


def cached_attention(attn: msm.CausalSelfAttention, x_BSD: Tensor, cos: Tensor, sin: Tensor, mask_B1SW: Tensor,
                     source_W: Tensor, new_W: Tensor, keys_BhWd: Tensor, values_BhWd: Tensor):
    """``attn`` (its weights and rotary ``heads``) over the step's tokens and every slot of the cache.
    cos, sin: (B, 1, S, d/2) at the tokens' positions. Returns ``(y_BSD, keys_BhWd, values_BhWd)``,
    the buffers with the step's keys (rotated) and values written in."""
    B, S, D = x_BSD.shape
    q = attn.heads(x_BSD, attn.qkv[:D], cos, sin, True)
    k = attn.heads(x_BSD, attn.qkv[D:2 * D], cos, sin, True)
    v = attn.heads(x_BSD, attn.qkv[2 * D:], cos, sin, False)
    keys_BhWd = write_slots(keys_BhWd, k, source_W, new_W)
    values_BhWd = write_slots(values_BhWd, v, source_W, new_W)
    scores_BhSW = ops.matmul(q, keys_BhWd.swapaxes(-1, -2)) * attn.scale + mask_B1SW
    y_BhSd = ops.matmul(ops.softmax(scores_BhSW, axis=-1), values_BhWd)
    return msm.linear(y_BhSd.transpose(0, 2, 1, 3).reshape(B, S, D), attn.out), keys_BhWd, values_BhWd


def moe_inference(layer: msm.MoELayer, x_BSD: Tensor) -> Tensor:
    """The MoE layer as generation runs it: router, the dropless dispatch whatever the training
    dispatch (a decode step holds too few tokens for a capacity), shared experts; no balancing losses."""
    B, S, D = x_BSD.shape
    x_TD = x_BSD.reshape(B * S, D)
    expert_ids_TK, weights_TK, _, _ = layer.router(x_TD)
    if layer.dispatch_kind == "grouped":
        y_TD = msm.grouped_dispatch(layer.experts, x_TD, expert_ids_TK, weights_TK)[0]
    else:
        # blocks of about N / E rows: the buffer pads every expert to whole blocks, and the training
        # size (64 rows) would make a decode step of B tokens run E * 64 rows (same function, any size)
        pairs, experts = B * S * layer.top_k, layer.experts.num_experts
        block_rows = min(layer.block_rows, math.ceil(pairs / experts))
        y_TD = msm.sorted_dispatch(layer.experts, block_rows, x_TD, expert_ids_TK, weights_TK)[0]
    if layer.has_shared:
        shared_TD = layer.shared_experts(x_TD)
        if layer.has_shared_gate:
            shared_TD = shared_TD * ops.sigmoid(msm.linear(x_TD, layer.shared_gate))
        y_TD = y_TD + shared_TD
    return y_TD.reshape(B, S, D)


def forward_cached(model: msm.MoELM, tokens_BS: Tensor, positions_BS: Tensor, mask_B1SW: Tensor, source_W: Tensor,
                   new_W: Tensor, keys: tuple, values: tuple):
    """One generation step of ``model``: ``(logits_BSV, keys, values)``, the logits of the S new
    tokens given the cache, and the cache with their keys and values. The inputs are those of
    ``MSKVCache.begin_step``. The same blocks as ``MoELM.construct``, with cached attention."""
    B, S = tokens_BS.shape
    half = model.rope_cos.shape[-1]
    cos = ops.gather(model.rope_cos, positions_BS, 0).reshape(B, 1, S, half)
    sin = ops.gather(model.rope_sin, positions_BS, 0).reshape(B, 1, S, half)
    x = ops.gather(model.embed, tokens_BS, 0)
    new_keys, new_values = (), ()
    for i, block in enumerate(model.blocks):
        y, k_i, v_i = cached_attention(block.attn, block.attn_norm(x), cos, sin, mask_B1SW, source_W, new_W,
                                       keys[i], values[i])
        x = x + y
        h = block.ffn_norm(x)
        x = x + (moe_inference(block.ffn, h) if block.is_moe else block.ffn(h))
        new_keys, new_values = new_keys + (k_i,), new_values + (v_i,)
    head = model.embed if model.tie else model.lm_head
    return msm.linear(model.norm(x), head), new_keys, new_values


def step_function(model: msm.MoELM, mode: str):
    """``forward_cached`` bound to ``model``; compiled with ``mindspore.jit`` in GRAPH mode (once per
    shape: the prefill's and the decode step's). Kept on the model, so that a second generation with
    it compiles nothing, and goes with it."""
    check_choice("mode", mode, MODES)
    # in the instance's __dict__, past Cell.__setattr__: a plain cache, no part of the cell
    per_model = model.__dict__.setdefault("_generation_steps", {})
    if mode not in per_model:
        def step(tokens_BS, positions_BS, mask_B1SW, source_W, new_W, keys, values):
            return forward_cached(model, tokens_BS, positions_BS, mask_B1SW, source_W, new_W, keys, values)

        per_model[mode] = ms.jit(step) if mode == "graph" else step
    return per_model[mode]


# --- greedy decode ----------------------------------------------------------------------------------


@dataclass
class MSGeneration:
    """What ``ms_greedy_decode`` returns: the tokens, the logits that chose them, and timings."""

    prompt_tokens: list[list[int]]
    new_tokens: list[list[int]]  # greedy ids of each sequence
    step_logits: np.ndarray  # (N, B, V) fp32: the logits each new token is the argmax of
    prefill_logits: np.ndarray  # (B, P, V) fp32: every prompt position (left-padded: row b starts at P - len)
    mode: str
    stopped_at_context: bool  # fewer than max_new_tokens: the context (seq_len) is full
    prefill_s: float  # the prefill's seconds (GRAPH mode: compilation included on a model's first call)
    step_s: list[float] = field(default_factory=list)  # each decode step's seconds (the first: compilation)

    @property
    def tokens(self) -> list[list[int]]:
        """Prompt and generated ids of each sequence."""
        return [p + n for p, n in zip(self.prompt_tokens, self.new_tokens, strict=True)]

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens per second of the decode steps after the first (which compiles in GRAPH mode)."""
        steady = self.step_s[1:]
        return len(self.prompt_tokens) * len(steady) / sum(steady) if steady and sum(steady) > 0 else None


def decode_refusal(cfg) -> str | None:
    """PyTorch's reason why the model's router cannot generate token by token, or None."""
    from workbench.moe.routers import router_class

    if cfg.moe is None:
        return None
    reason = router_class(cfg.moe.router).decode_refusal(cfg.moe)
    return None if reason is None else f"router={cfg.moe.router!r} cannot generate token by token: {reason}"


def ms_greedy_generate(ms_model: msm.MoELM, prompt_token_lists: Sequence, max_new_tokens: int, *,
                       mode: str = "pynative") -> list[list[int]]:
    """Greedy-decode each prompt by up to ``max_new_tokens`` tokens with the MindSpore model, in one
    left-padded batch, with a KV cache (see the module docstring); stops early when the context
    (``seq_len``) is full. Returns the generated ids of each prompt; ``ms_greedy_decode`` also
    returns the logits and timings.

    prompt_token_lists: lists of token ids (or str / bytes, as ``workbench.inference.generate``
    takes them). mode: "pynative" runs op by op, "graph" compiles the step (``mindspore.jit``).
    ``ValueError`` names a bad argument or a router that cannot decode token by token.
    """
    return ms_greedy_decode(ms_model, prompt_token_lists, max_new_tokens, mode=mode).new_tokens


def ms_greedy_decode(ms_model: msm.MoELM, prompt_token_lists: Sequence, max_new_tokens: int, *,
                     mode: str = "pynative") -> MSGeneration:
    """``ms_greedy_generate`` with everything it saw: an ``MSGeneration`` (tokens, the logits of the
    prefill and of every step, timings)."""
    from workbench.inference.generation import encode_prompts

    cfg = ms_model.cfg
    check_choice("mode", mode, MODES)
    prompts = encode_prompts(prompt_token_lists, cfg.vocab_size)
    check(isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) and max_new_tokens >= 1,
          "max_new_tokens", "must be an integer >= 1", max_new_tokens)
    P = max(len(p) for p in prompts)
    check(P < cfg.seq_len, "prompts", f"the longest prompt ({P} tokens) leaves no room in the model's context "
          f"seq_len={cfg.seq_len}", P)
    if (reason := decode_refusal(cfg)) is not None:
        raise ValueError(reason)
    msm.tune_cpu_runtime()
    N = min(max_new_tokens, cfg.seq_len - P)  # as PyTorch: prompt + new tokens fit the context
    B = len(prompts)
    step = step_function(ms_model, mode)
    cache = MSKVCache(cfg, B, P + N)

    tokens_BP = np.zeros((B, P), np.int32)
    real_BP = np.zeros((B, P), bool)
    for b, ids in enumerate(prompts):
        tokens_BP[b, P - len(ids):] = ids
        real_BP[b, P - len(ids):] = True

    def run(tokens_BS: np.ndarray, real_BS: np.ndarray | None) -> np.ndarray:
        inputs = cache.begin_step(tokens_BS.shape[1], real_BS)
        # mutable: GRAPH mode would take a tuple of tensors for constants, and compile again at every step
        logits, cache.keys, cache.values = step(Tensor(tokens_BS), inputs["positions_BS"], inputs["mask_B1SW"],
                                                inputs["source_W"], inputs["new_W"], ms.mutable(cache.keys),
                                                ms.mutable(cache.values))
        return logits.asnumpy()  # the host needs the argmax: this also waits for an asynchronous device

    start = time.perf_counter()
    prefill = run(tokens_BP, None if real_BP.all() else real_BP)
    prefill_s = time.perf_counter() - start
    step_logits = [prefill[:, -1]]
    new_BN = [prefill[:, -1].argmax(axis=-1).astype(np.int32)]
    step_s = []
    for _ in range(N - 1):  # the last new token is not fed: nothing reads its logits
        start = time.perf_counter()
        logits = run(new_BN[-1][:, None], None)
        step_s.append(time.perf_counter() - start)
        step_logits.append(logits[:, -1])
        new_BN.append(step_logits[-1].argmax(axis=-1).astype(np.int32))
    new_tokens = np.stack(new_BN, axis=1).tolist()
    return MSGeneration(prompts, new_tokens, np.stack(step_logits).astype(np.float32), prefill.astype(np.float32),
                        mode, N < max_new_tokens, prefill_s, step_s)


# --- generation parity -------------------------------------------------------------------------------


@dataclass
class PromptParity:
    """One prompt's greedy continuation in both frameworks."""

    prompt_tokens: list[int]
    torch_tokens: list[int]
    ms_tokens: list[int]
    first_divergence: int | None  # the first step whose tokens differ; None: all equal
    top2_gap: float | None  # PyTorch's top-2 logit gap at that step; None: no divergence
    max_logit_diff: float  # max |ms - torch| logit difference over the steps before the divergence (all: none)
    diff_at_divergence: float | None  # the same at the divergent step (its inputs still agree); None: none
    min_top2_gap: float  # PyTorch's smallest top-2 gap over the steps up to the divergence: the closest call
    near_tie: float = NEAR_TIE_LOGIT

    @property
    def equal(self) -> bool:
        return self.first_divergence is None

    @property
    def at_near_tie(self) -> bool:
        return self.top2_gap is not None and self.top2_gap <= self.near_tie

    @property
    def passed(self) -> bool:
        return self.equal or self.at_near_tie

    @property
    def prompt(self) -> str:
        return bytes(t for t in self.prompt_tokens if t < 256).decode("utf-8", "replace")

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "prompt_tokens": self.prompt_tokens, "torch_tokens": self.torch_tokens,
                "ms_tokens": self.ms_tokens, "equal": self.equal, "first_divergence": self.first_divergence,
                "top2_gap": self.top2_gap, "near_tie": self.at_near_tie, "max_logit_diff": self.max_logit_diff,
                "diff_at_divergence": self.diff_at_divergence, "min_top2_gap": self.min_top2_gap,
                "passed": self.passed}


@dataclass
class GenerationParityReport:
    """Greedy generation in MindSpore (``mode``) against PyTorch's ``generate`` on the same weights."""

    mode: str
    config: dict[str, Any]
    max_new_tokens: int  # the steps decoded (the request, cut to the context)
    prompts: list[PromptParity]
    near_tie: float = NEAR_TIE_LOGIT
    ms_prefill_s: float = 0.0
    ms_decode_tokens_per_s: float | None = None  # after the first decode step (GRAPH mode compiles there)

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.prompts)

    @property
    def max_logit_diff(self) -> float:
        return max((p.max_logit_diff for p in self.prompts), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "config": self.config, "max_new_tokens": self.max_new_tokens,
                "near_tie": self.near_tie, "passed": self.passed, "max_logit_diff": self.max_logit_diff,
                "ms_prefill_s": self.ms_prefill_s, "ms_decode_tokens_per_s": self.ms_decode_tokens_per_s,
                "prompts": [p.to_dict() for p in self.prompts]}

    def format(self) -> str:
        lines = [f"{'prompt':<14} {'tokens equal':>12} {'first diff':>10} {'top-2 gap':>10} {'|dlogit| there':>14} "
                 f"{'min gap':>9} {'max |dlogit|':>12}  result"]
        for p in self.prompts:
            same = len(p.torch_tokens) if p.equal else p.first_divergence
            diff = "-" if p.equal else str(p.first_divergence)
            gap = "-" if p.top2_gap is None else f"{p.top2_gap:.2e}"
            there = "-" if p.diff_at_divergence is None else f"{p.diff_at_divergence:.2e}"
            result = "pass" if p.equal else ("pass (near tie)" if p.at_near_tie else "FAIL")
            lines.append(f"{p.prompt!r:<14} {f'{same}/{len(p.torch_tokens)}':>12} {diff:>10} {gap:>10} {there:>14} "
                         f"{p.min_top2_gap:9.2e} {p.max_logit_diff:12.2e}  {result}")
        speed = ("" if self.ms_decode_tokens_per_s is None
                 else f"; MindSpore decode {self.ms_decode_tokens_per_s:.0f} tokens/s")
        lines.append("(top-2 gap, |dlogit| there: PyTorch's top-2 logit gap and the largest MindSpore - PyTorch "
                     "logit difference at the first differing step; min gap: PyTorch's smallest top-2 gap up to it; "
                     "max |dlogit|: the largest logit difference before it)")
        lines.append(f"generation parity ({self.mode}, {self.max_new_tokens} greedy tokens, near tie: top-2 gap <= "
                     f"{self.near_tie:g}{speed}): {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)


def _torch_greedy(torch_model, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], np.ndarray]:
    """PyTorch's ``generate`` (greedy) and the logits each token is the argmax of, (N, B, V): read from
    the LM head by a forward hook, so they are the very logits of the cached decode."""
    import torch

    from workbench.inference import generate

    seen: list[np.ndarray] = []
    hook = torch_model.lm_head.register_forward_hook(
        lambda module, args, out: seen.append(out[:, -1].detach().float().cpu().numpy()))
    try:
        with torch.no_grad():
            result = generate(torch_model, prompts, max_new_tokens, temperature=0.0, record_routing=False)
    finally:
        hook.remove()
    return result.new_tokens, np.stack(seen[:max_new_tokens])


def _top2_gap(logits_V: np.ndarray) -> float:
    top = np.partition(logits_V, -2)[-2:]
    return float(top[1] - top[0])


def generation_parity(torch_model, prompts: Sequence = PARITY_PROMPTS, max_new_tokens: int = 32,
                      mode: str = "pynative", *, ms_model: msm.MoELM | None = None,
                      near_tie: float = NEAR_TIE_LOGIT) -> GenerationParityReport:
    """Greedy-decode ``prompts`` with ``torch_model`` (``workbench.inference.generate``) and with its
    MindSpore conversion (``ms_greedy_generate`` in ``mode``) and compare them per prompt (see the
    module docstring). ``ms_model``: the MindSpore model to compare instead of the conversion (a
    test injects a wrong weight this way). ``max_new_tokens`` is cut to what the context holds.
    """
    from workbench.inference.generation import encode_prompts
    from workbench.ms.convert import from_torch

    check_choice("mode", mode, MODES)
    cfg = torch_model.cfg
    encoded = encode_prompts(prompts, cfg.vocab_size)
    if ms_model is None:
        msm.check_supported(cfg)
        ms_model = from_torch(torch_model)
    ms_out = ms_greedy_decode(ms_model, encoded, max_new_tokens, mode=mode)
    N = len(ms_out.new_tokens[0])
    torch_tokens, torch_logits = _torch_greedy(torch_model, encoded, N)

    rows = []
    for b, ids in enumerate(encoded):
        ours, theirs = ms_out.new_tokens[b], torch_tokens[b]
        differ = [j for j in range(N) if ours[j] != theirs[j]]
        first = differ[0] if differ else None
        compared = N if first is None else first + 1  # steps whose inputs agree (the divergent one included)
        diff_j = np.abs(ms_out.step_logits[:compared, b] - torch_logits[:compared, b]).max(axis=-1)
        before = diff_j if first is None else diff_j[:first]
        gaps = [_top2_gap(torch_logits[j, b]) for j in range(compared)]
        rows.append(PromptParity(ids, theirs, ours, first, None if first is None else gaps[first],
                                 float(before.max()) if before.size else 0.0,
                                 None if first is None else float(diff_j[first]), min(gaps), near_tie))
    return GenerationParityReport(mode, cfg.to_dict(), N, rows, near_tie, ms_out.prefill_s,
                                  ms_out.decode_tokens_per_s)
