"""The workbench's compact MoE LM in MindSpore: the same maths as ``workbench.model.MoELM``, as ``nn.Cell``s.

Read it top to bottom, as the PyTorch model: embedding -> ``n_layers`` pre-norm blocks (RMSNorm
-> rotary causal attention -> residual, RMSNorm -> SwiGLU FFN or MoE layer -> residual) -> RMSNorm
-> LM head. Built from the same ``ModelConfig``; weights convert both ways by
``workbench.ms.convert``, and ``workbench.ms.parity`` checks every piece against the PyTorch
reference on random inputs, forward and gradients.

Everything runs on CPU, GPU and Ascend with ``mindspore.ops`` (on CPU several ``mint`` kernels,
``mint.topk`` among them, are not registered), in PyNative and in GRAPH mode: shapes are static
(the capacity is a Python int computed from the static token count, and the dropless dispatch
pads each expert's rows to whole blocks inside a buffer of fixed size), and every branch on the
config is settled in ``__init__`` (which router, too: one class per router). No dispatch builds a
one-hot T x E x C tensor: slots are computed with one cumulative sum over an (N, E) one-hot of the
pairs, and rows move by ``gather`` and ``tensor_scatter_update`` (linear in tokens).

The framework-free pieces are the PyTorch side's own, imported, not copied: the RoPE tables
(``workbench.model.rotary_tables``), the capacity (``workbench.moe.dispatch.expert_capacity``),
the gate-sum floor, each router's facts (``workbench.moe.routers``), the balancing losses' names
and the loss-free bias step (``workbench.moe.balance``).

What the MindSpore side expresses (``check_supported`` refuses the rest by field name):

- routers ``softmax_topk``, ``switch``, ``sigmoid`` (selection bias, groups, route scale), ``uniform``:
  one Cell class each, registered in ``ROUTERS`` under the PyTorch names (a new one is a class and a line);
- dispatch ``sorted`` (dropless; also serves ``loop``, the same function) and ``capacity``
  (``drop_policy="position"``, ``capacity_scope="batch"``);
- the Switch aux loss over the micro-batch, DeepSeek-V3's sequence-wise loss, the router z-loss,
  and the loss-free bias (updated by the trainer after the optimizer step, from the loads the
  forward returns: a GRAPH-compiled forward keeps no side effects);
- shared experts, plain and gated (Qwen2-MoE); tied embeddings; no dropout, no router jitter
  (both random: parity could not be checked), no padding mask (the trainers' batches have none).

The forward returns plain tuples (GRAPH mode compiles tuples, not dataclasses);
``ModelOutputs`` / ``LayerRouting`` name their fields.

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, h heads, d head dim, V vocabulary,
E experts, K experts per token, N = T*K token-expert pairs (pair n is token n // K), C capacity,
R rows of the dropless block buffer, b rows per block, H expert hidden.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from workbench.config import ModelConfig
from workbench.model import rotary_tables
from workbench.moe.balance import BALANCE_LOSSES
from workbench.moe.balance import update_router_bias as torch_update_router_bias
from workbench.moe.config import MoEConfig
from workbench.moe.dispatch import expert_capacity
from workbench.moe.routers import GATE_SUM_FLOOR, router_class
from workbench.ms._import import require_mindspore
from workbench.validation import check

ms = require_mindspore()
from mindspore import Parameter, Tensor, nn, ops  # noqa: E402

DISPATCHES = ("sorted", "loop", "capacity")  # "loop" is the same function as "sorted": it runs sorted
NEG_INF = float("-inf")


def check_supported(cfg: ModelConfig) -> None:
    """``ValueError`` naming the first field of ``cfg`` the MindSpore model cannot express, and what it allows."""
    check(cfg.dropout == 0, "dropout", "the MindSpore model has no dropout (it would make parity uncheckable): "
          "must be 0.0", cfg.dropout)
    m = cfg.moe
    if m is None:
        return
    # the routers are the registry's, ROUTERS below: a router registered there is supported
    check(m.router in ROUTERS, "router", "the MindSpore model supports " + ", ".join(ROUTERS), m.router)
    check(m.dispatch in DISPATCHES, "dispatch", "the MindSpore model supports " + ", ".join(DISPATCHES), m.dispatch)
    check(m.router_jitter == 0, "router_jitter", "the MindSpore model has no router jitter: must be 0.0",
          m.router_jitter)
    check(m.aux_loss_scope == "micro_batch", "aux_loss_scope", "the MindSpore model supports 'micro_batch'",
          m.aux_loss_scope)
    if m.dispatch == "capacity":
        check(m.drop_policy == "position", "drop_policy", "the MindSpore capacity dispatch supports 'position'",
              m.drop_policy)
        check(m.capacity_scope == "batch", "capacity_scope", "the MindSpore capacity dispatch supports 'batch'",
              m.capacity_scope)


def device_target() -> str:
    """``"CPU"``, ``"GPU"`` or ``"Ascend"``: where MindSpore runs this process's kernels."""
    return ms.get_context("device_target")


_RUNTIME_TUNED = False


def tune_cpu_runtime() -> None:
    """On CPU, launch MindSpore's kernels synchronously (``mindspore.runtime.launch_blocking``), once per process.

    By default PyNative hands every operation to a pipeline of runtime threads (five by default), which on
    a machine of a few cores compete with the threads that run the kernels; launching in the calling thread
    made PyNative steps several times faster on 2 cores, with GRAPH mode unchanged (see ``workbench bench
    mindspore``). Elsewhere (GPU, Ascend) asynchronous launch is what keeps the device busy: left alone.
    ``MSTrainer``, the parity suite and the benchmark functions call it; the workbench's PyTorch side
    tunes glibc's allocator the same way (``workbench.runtime``).
    """
    global _RUNTIME_TUNED
    if _RUNTIME_TUNED or device_target() != "CPU":
        return
    try:
        ms.runtime.launch_blocking()
    except RuntimeError:  # the runtime refused the change at this point: keep its defaults
        pass
    _RUNTIME_TUNED = True


# --- small pieces -----------------------------------------------------------------------------


def linear(x: Tensor, w_OI: Tensor) -> Tensor:
    """``x @ w.T`` for a torch-layout (out, in) weight, any leading dims."""
    lead = x.shape[:-1]
    y = ops.matmul(x.reshape(-1, x.shape[-1]), w_OI.T)
    return y.reshape(lead + (w_OI.shape[0],))


def apply_rotary(x_BhSd: Tensor, cos_Sd: Tensor, sin_Sd: Tensor) -> Tensor:
    """Rotate the two halves of each head as pairs (the LLaMA / GPT-NeoX layout)."""
    half = x_BhSd.shape[-1] // 2
    x1, x2 = x_BhSd[..., :half], x_BhSd[..., half:]
    return ops.concat((x1 * cos_Sd - x2 * sin_Sd, x2 * cos_Sd + x1 * sin_Sd), axis=-1)


def rotate_half_matrix(head_dim: int) -> np.ndarray:
    """R with x @ R = (-x2, x1) for x = (x1, x2): the rotation of ``apply_rotary`` as a matmul, so that
    RoPE needs no slices of the activations (slow on MindSpore's CPU backend). Every output entry is
    one input entry times +-1 plus zeros, so ``x cos + (x @ R) sin`` rounds exactly as ``apply_rotary``."""
    half = head_dim // 2
    r = np.zeros((head_dim, head_dim), np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return r


class RMSNorm(nn.Cell):
    """y = x / sqrt(mean(x^2) + eps) * g (Zhang and Sennrich 2019), as ``torch.nn.RMSNorm``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(Tensor(np.ones(dim, np.float32)), name="weight")

    def construct(self, x: Tensor) -> Tensor:
        return x * ops.rsqrt((x * x).mean(axis=-1, keep_dims=True) + self.eps) * self.weight


class CausalSelfAttention(nn.Cell):
    """Rotary causal self-attention, as ``workbench.model.CausalSelfAttention`` (one (3D, D) ``qkv`` weight).

    ``construct(x_BSD, cos_Sd, sin_Sd)`` takes the half-width RoPE tables of ``rotary_tables``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.d_model = cfg.n_heads, cfg.head_dim, cfg.d_model
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        D = cfg.d_model
        self.qkv = Parameter(Tensor(np.zeros((3 * D, D), np.float32)), name="qkv")
        self.out = Parameter(Tensor(np.zeros((D, D), np.float32)), name="out")
        # additive causal mask: 0 on and below the diagonal, -inf above (the diagonal keeps softmax finite)
        self.mask = Tensor(np.triu(np.full((cfg.seq_len, cfg.seq_len), NEG_INF, np.float32), k=1))
        self.max_len = cfg.seq_len
        self.rotate = Tensor(rotate_half_matrix(cfg.head_dim))

    def heads(self, x_BSD: Tensor, w_OI: Tensor, cos_Sd: Tensor, sin_Sd: Tensor, rope: bool) -> Tensor:
        """One of q, k, v as (B, h, S, d): the weight is sliced, not the activations."""
        B, S, _ = x_BSD.shape
        y_BhSd = linear(x_BSD, w_OI).reshape(B, S, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        if not rope:
            return y_BhSd
        # x cos + rotate_half(x) sin, with the tables repeated to the full head width
        cos = ops.concat((cos_Sd, cos_Sd), axis=-1)
        sin = ops.concat((sin_Sd, sin_Sd), axis=-1)
        rotated = ops.matmul(y_BhSd.reshape(-1, self.head_dim), self.rotate).reshape(y_BhSd.shape)
        return y_BhSd * cos + rotated * sin

    def construct(self, x_BSD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, S, D = x_BSD.shape
        if S != self.max_len:
            cos, sin, mask = cos[:S], sin[:S], self.mask[:S, :S]
        else:
            mask = self.mask
        q = self.heads(x_BSD, self.qkv[:D], cos, sin, True)
        k = self.heads(x_BSD, self.qkv[D:2 * D], cos, sin, True)
        v = self.heads(x_BSD, self.qkv[2 * D:], cos, sin, False)
        scores_BhSS = ops.matmul(q, k.swapaxes(-1, -2)) * self.scale + mask
        y_BhSd = ops.matmul(ops.softmax(scores_BhSS, axis=-1), v)
        return linear(y_BhSd.transpose(0, 2, 1, 3).reshape(B, S, D), self.out)


class SwiGLUMLP(nn.Cell):
    """Dense SwiGLU FFN (Shazeer 2020, "GLU Variants Improve Transformer"): w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = Parameter(Tensor(np.zeros((hidden, d_model), np.float32)), name="w1")
        self.w3 = Parameter(Tensor(np.zeros((hidden, d_model), np.float32)), name="w3")
        self.w2 = Parameter(Tensor(np.zeros((d_model, hidden), np.float32)), name="w2")

    def construct(self, x: Tensor) -> Tensor:
        return linear(ops.silu(linear(x, self.w1)) * linear(x, self.w3), self.w2)


# --- routers ----------------------------------------------------------------------------------


class Router(nn.Cell):
    """Base class, as ``workbench.moe.routers.Router``: a linear gate ``logits = x W^T`` in fp32,
    then ``route``, then the gates times ``route_scale`` (DeepSeek-V2/V3's routed scaling factor).

    The router's facts (the rows of ``weight``, the default of ``normalize_topk``, whether it has a
    selection bias) are those of the PyTorch class of the same name (``workbench.moe.routers.router_class``),
    so both frameworks build the same parameters from one ``MoEConfig``. ``bias`` (E,) is the
    loss-free balancing state (Wang et al. 2024, arXiv:2408.15664), a Parameter without gradient,
    present when ``bias_update_rate > 0``; it selects and never weights.

    A new router is one subclass of this (``route``) or of ``SoftmaxGatedRouter`` (``select``) and
    one line in ``ROUTERS``. Every branch on the config is settled in ``__init__``, so GRAPH mode
    compiles ``construct`` with the subclass's methods inlined. The model passes no token ids.

    ``construct(x_TD) -> (expert_ids_TK int32, weights_TK, scores_TE, logits_TE)``.
    """

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        facts = router_class(cfg.router)
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        default = facts.default_normalize_topk
        self.normalize_topk = bool(default if cfg.normalize_topk is None else cfg.normalize_topk)
        self.route_scale = float(cfg.route_scale)
        self.weight = Parameter(Tensor(np.zeros((facts.gate_rows(cfg), d_model), np.float32)), name="weight")
        self.use_bias = facts.has_selection_bias and cfg.bias_update_rate > 0
        if self.use_bias:
            self.bias = Parameter(Tensor(np.zeros(cfg.num_experts, np.float32)), name="bias", requires_grad=False)

    def construct(self, x_TD: Tensor):
        x32_TD = x_TD.astype(ms.float32)
        expert_ids_TK, weights_TK, scores_TE, logits_TE = self.route(x32_TD, self.gate_logits(x32_TD))
        if self.route_scale != 1.0:
            weights_TK = weights_TK * self.route_scale
        return expert_ids_TK, weights_TK, scores_TE, logits_TE

    def gate_logits(self, x32_TD: Tensor) -> Tensor:
        return linear(x32_TD, self.weight)

    def route(self, x32_TD: Tensor, logits_TE: Tensor):
        """``(expert_ids_TK int32, weights_TK, scores_TE, logits_TE)`` from the gate's logits."""
        raise NotImplementedError

    def gates(self, scores_TE: Tensor, expert_ids_TK: Tensor) -> Tensor:
        """The scores of the chosen experts, renormalised to sum to one over the k when
        ``normalize_topk``: the one renormalisation rule, as ``workbench.moe.routers.Router.gates``."""
        weights_TK = ops.gather_elements(scores_TE, 1, expert_ids_TK)
        if self.normalize_topk:
            weights_TK = weights_TK / (weights_TK.sum(axis=-1, keepdims=True) + GATE_SUM_FLOOR)
        return weights_TK

    def biased(self, scores_TE: Tensor) -> Tensor:
        """``score + bias`` where loss-free balancing is on: what selection ranks, never the gates."""
        return scores_TE + self.bias if self.use_bias else scores_TE

    def highest(self, ranked_TE: Tensor) -> Tensor:
        """(T, K) int32: the K highest entries of each row. Top-k is not differentiable: it ranks a
        copy outside the graph."""
        return ops.topk(ops.stop_gradient(ranked_TE), self.top_k)[1].astype(ms.int32)


class SoftmaxGatedRouter(Router):
    """Softmax over all experts, a selection, and the probabilities of the selected experts as
    gates (``Router.gates``), as ``workbench.moe.routers.SoftmaxGatedRouter``. A subclass says only
    how it selects, in ``select``."""

    def route(self, x32_TD: Tensor, logits_TE: Tensor):
        probs_TE = ops.softmax(logits_TE, axis=-1)
        expert_ids_TK = self.select(logits_TE, probs_TE)
        return expert_ids_TK, self.gates(probs_TE, expert_ids_TK), probs_TE, logits_TE

    def select(self, logits_TE: Tensor, probs_TE: Tensor) -> Tensor:
        """(T, K) int32: the experts of each token."""
        raise NotImplementedError


class SoftmaxTopKRouter(SoftmaxGatedRouter):
    """GShard (Lepikhin et al. 2020) / Mixtral: p = softmax(x W^T), keep = top-k(p + b), g = p[keep],
    renormalised over the k when ``normalize_topk``."""

    def select(self, logits_TE: Tensor, probs_TE: Tensor) -> Tensor:
        return self.highest(self.biased(probs_TE))


class SwitchRouter(SoftmaxTopKRouter):
    """Switch Transformer (Fedus et al. 2021): top-1 with the raw probability as gate. Both are facts
    of the PyTorch class (``fixed_top_k``, ``default_normalize_topk``), which ``MoEConfig`` applies."""


class SigmoidRouter(Router):
    """DeepSeek-V3 routing (arXiv:2412.19437, section 2.1.2, eq. 12-16): s = sigmoid(x W^T),
    keep = top-k(s + b) within the ``topk_groups`` best of ``num_groups`` groups (a group scored by
    the sum of its two highest biased affinities), g = s[keep] / sum s[keep]."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        self.num_groups, self.topk_groups = cfg.num_groups, cfg.topk_groups

    def route(self, x32_TD: Tensor, logits_TE: Tensor):
        scores_TE = ops.sigmoid(logits_TE)
        ranked_TE = self.biased(scores_TE)
        if self.num_groups > 1:
            ranked_TE = self._mask_to_kept_groups(ranked_TE)
        expert_ids_TK = self.highest(ranked_TE)
        return expert_ids_TK, self.gates(scores_TE, expert_ids_TK), scores_TE, logits_TE

    def _mask_to_kept_groups(self, ranked_TE: Tensor) -> Tensor:
        T, E = ranked_TE.shape
        G = self.num_groups
        per_group = min(2, E // G)
        group_score_TG = ops.topk(ranked_TE.reshape(T, G, E // G), per_group)[0].sum(axis=-1)
        kept_TG = ops.topk(group_score_TG, self.topk_groups)[1]
        # (T, G) 0/1 of the kept groups, repeated over each group's experts
        kept_mask_TG = ops.one_hot(kept_TG, G, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32)).sum(axis=1)
        kept_mask_TE = ops.broadcast_to(kept_mask_TG.reshape(T, G, 1), (T, G, E // G)).reshape(T, E)
        return ops.masked_fill(ranked_TE, kept_mask_TE < 0.5, NEG_INF)


class UniformRouter(SoftmaxGatedRouter):
    """Forced round-robin, for throughput benchmarks: pair n = t K + k goes to expert n mod E; the
    gates are the probabilities of those experts."""

    def select(self, logits_TE: Tensor, probs_TE: Tensor) -> Tensor:
        T = probs_TE.shape[0]
        return (ops.arange(T * self.top_k, dtype=ms.int32) % self.num_experts).reshape(T, self.top_k)


# One line per router, keyed by the names of ``workbench.moe.routers.ROUTERS``; ``check_supported``
# refuses the others. A new router: a subclass of Router (or SoftmaxGatedRouter) and a line here.
ROUTERS: dict[str, type[Router]] = {
    "softmax_topk": SoftmaxTopKRouter,
    "switch": SwitchRouter,
    "sigmoid": SigmoidRouter,
    "uniform": UniformRouter,
}


# --- experts and dispatch ------------------------------------------------------------------------


def _rank_within_expert(expert_of_pair_N: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """(rank_N, counts_E): how many earlier pairs (in the given order) chose the same expert, and each
    expert's pairs. One cumulative sum over an (N, E) one-hot: linear in tokens."""
    one_hot_NE = ops.one_hot(expert_of_pair_N, num_experts, Tensor(1, ms.int32), Tensor(0, ms.int32))
    before_NE = ops.cumsum(one_hot_NE, 0) - one_hot_NE
    return (before_NE * one_hot_NE).sum(axis=1), one_hot_NE.sum(axis=0)


def _scatter_rows(index_R: Tensor, at_N: Tensor, values_N: Tensor) -> Tensor:
    """``index_R`` with ``index_R[at_N[n]] = values_N[n]`` (duplicate targets: only where the row is discarded)."""
    return ops.tensor_scatter_update(index_R, at_N.reshape(-1, 1), values_N)


def combine(rows_RD: Tensor, row_of_pair_TK: Tensor, weights_TK: Tensor) -> Tensor:
    """y_t = sum_k w_tk * rows[row_of_pair[t, k]], one gather per k (K is small and static): no (T, K, D)
    intermediate and no reduction over K, which MindSpore's CPU backend runs slowly."""
    K = row_of_pair_TK.shape[1]
    rows_KT, weights_KT = row_of_pair_TK.T, weights_TK.astype(rows_RD.dtype).T
    y_TD = ops.gather(rows_RD, rows_KT[0], 0) * weights_KT[0].reshape(-1, 1)
    for k in range(1, K):
        y_TD = y_TD + ops.gather(rows_RD, rows_KT[k], 0) * weights_KT[k].reshape(-1, 1)
    return y_TD


class SwiGLUExperts(nn.Cell):
    """E SwiGLU experts with stacked weights (``w1``, ``w3``: E x D x H, ``w2``: E x H x D), the
    PyTorch layout: expert_e(x) = (silu(x W1_e) * (x W3_e)) W2_e."""

    def __init__(self, num_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.w1 = Parameter(Tensor(np.zeros((num_experts, d_model, hidden), np.float32)), name="w1")
        self.w3 = Parameter(Tensor(np.zeros((num_experts, d_model, hidden), np.float32)), name="w3")
        self.w2 = Parameter(Tensor(np.zeros((num_experts, hidden, d_model), np.float32)), name="w2")

    def batched(self, x_ECD: Tensor) -> Tensor:
        """A fixed-capacity buffer, C rows per expert: batched matmuls (GShard's layout)."""
        return ops.bmm(ops.silu(ops.bmm(x_ECD, self.w1)) * ops.bmm(x_ECD, self.w3), self.w2)

    def blocked(self, x_nbD: Tensor, block_expert_n: Tensor) -> Tensor:
        """n blocks of b rows, block j all of expert ``block_expert[j]``: each block's expert weights
        gathered, then batched matmuls (the dropless dispatch's static-shape grouped GEMM)."""
        w1 = ops.gather(self.w1, block_expert_n, 0)
        w3 = ops.gather(self.w3, block_expert_n, 0)
        w2 = ops.gather(self.w2, block_expert_n, 0)
        return ops.bmm(ops.silu(ops.bmm(x_nbD, w1)) * ops.bmm(x_nbD, w3), w2)

    def grouped(self, x_ND: Tensor, group_end_E: Tensor) -> Tensor:
        """Ascend: rows sorted by expert, expert e's rows end at ``group_end_E[e]``; one grouped matmul
        per weight (``GroupedMatmul``, Ascend only, with a backward for split_item=3, group_type=0)."""
        from mindspore.ops.auto_generate import grouped_matmul

        def gmm(x, w):
            return grouped_matmul([x], [w], group_list=group_end_E, split_item=3, group_type=0)[0]

        return gmm(ops.silu(gmm(x_ND, self.w1)) * gmm(x_ND, self.w3), self.w2)


def capacity_dispatch(experts: SwiGLUExperts, capacity_factor: float | None, x_TD: Tensor, expert_ids_TK: Tensor,
                      weights_TK: Tensor):
    """GShard / Switch capacity dispatch with static shapes: C slots per expert
    (``expert_capacity``), overflow dropped, as ``workbench.moe.dispatch.capacity_dispatch`` with
    ``drop_policy="position"`` (every token's first choice before any second choice, in token
    order: GShard, Lepikhin et al. 2020, Algorithm 1).

    Slots are ranks from one cumulative sum over the (N, E) one-hot of the pairs in priority order;
    the (E*C, D) buffer is gathered from x through a slot -> token map (empty slots read a zero row),
    and each token gathers its K outputs back (dropped pairs read a zero row). No T x E x C tensor.
    Returns ``(y_TD, tokens_per_expert_E, kept_per_expert_E)``.
    """
    T, K = expert_ids_TK.shape
    E, D = experts.num_experts, x_TD.shape[1]
    C = expert_capacity(T, K, E, capacity_factor)
    # priority order: pair k * T + t (all first choices, then all second choices, ...)
    rank_KT, counts_E = _rank_within_expert(expert_ids_TK.T.reshape(-1), E)
    rank_TK = rank_KT.reshape(K, T).T
    kept_TK = rank_TK < C
    # slot of each pair; a dropped pair points at the extra zero slot E * C
    slot_TK = ops.select(kept_TK, expert_ids_TK * C + rank_TK, ops.full_like(rank_TK, E * C))
    token_TK = ops.broadcast_to(ops.arange(T, dtype=ms.int32).reshape(T, 1), (T, K))
    slot_to_token = _scatter_rows(ops.full((E * C + 1,), T, dtype=ms.int32), slot_TK.reshape(-1),
                                  token_TK.reshape(-1))
    x_pad = ops.concat((x_TD, ops.zeros((1, D), x_TD.dtype)), axis=0)
    buffer_ECD = ops.gather(x_pad, slot_to_token[: E * C], 0).reshape(E, C, D)
    out_ECD = experts.batched(buffer_ECD)
    out_pad = ops.concat((out_ECD.reshape(E * C, D), ops.zeros((1, D), out_ECD.dtype)), axis=0)
    y_TD = combine(out_pad, slot_TK, weights_TK)
    kept_E = ops.minimum(counts_E, C)
    return y_TD, counts_E, kept_E


def sorted_dispatch(experts: SwiGLUExperts, block_rows: int, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor):
    """Dropless dispatch (MegaBlocks, Gale et al. 2022, arXiv:2211.15841) with static shapes.

    Pairs are grouped by expert into a buffer of R = ceil((N + E (b - 1)) / b) * b rows, each
    expert's group padded to whole blocks of b = ``block_rows`` rows (the most padding any routing
    can need), so the shapes never depend on the routing. Every block belongs to one expert; the
    experts run as one batched matmul over the blocks with each block's expert weights gathered
    (``SwiGLUExperts.blocked``): MegaBlocks' block-sparse grouped GEMM in dense ops. Padding rows
    are zero (SwiGLU maps zero to zero) and are never read back.
    Returns ``(y_TD, tokens_per_expert_E, kept_per_expert_E)`` (kept = all: nothing drops).
    """
    T, K = expert_ids_TK.shape
    E, D = experts.num_experts, x_TD.shape[1]
    N, b = T * K, block_rows
    blocks = (N + E * (b - 1) + b - 1) // b
    rank_N, counts_E = _rank_within_expert(expert_ids_TK.reshape(-1), E)
    padded_E = (counts_E + (b - 1)) // b * b
    end_E = ops.cumsum(padded_E, 0)
    row_N = ops.gather(end_E - padded_E, expert_ids_TK.reshape(-1), 0) + rank_N
    token_N = ops.arange(N, dtype=ms.int32) // K
    row_to_token = _scatter_rows(ops.full((blocks * b,), T, dtype=ms.int32), row_N, token_N)
    x_pad = ops.concat((x_TD, ops.zeros((1, D), x_TD.dtype)), axis=0)
    x_nbD = ops.gather(x_pad, row_to_token, 0).reshape(blocks, b, D)
    # block j belongs to the first expert whose padded rows end after j * b (trailing empty blocks: the last)
    block_start = ops.arange(blocks, dtype=ms.int32) * b
    block_expert = (block_start.reshape(-1, 1) >= end_E.reshape(1, -1)).astype(ms.int32).sum(axis=1)
    block_expert = ops.minimum(block_expert, E - 1)
    out_RD = experts.blocked(x_nbD, block_expert).reshape(blocks * b, D)
    y_TD = combine(out_RD, row_N.reshape(T, K), weights_TK)
    return y_TD, counts_E, counts_E


def grouped_dispatch(experts: SwiGLUExperts, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor):
    """Dropless dispatch on Ascend: pairs sorted by expert, no padding, ``GroupedMatmul``.

    Chosen by ``MoELayer`` where ``device_target() == "Ascend"`` (the kernel exists only there);
    not exercised on the CPU machines this project is tested on.
    """
    T, K = expert_ids_TK.shape
    E = experts.num_experts
    expert_of_pair_N = expert_ids_TK.reshape(-1)
    # sort by (expert, pair): a unique key, so any sort is the stable one
    key_N = expert_of_pair_N * (T * K) + ops.arange(T * K, dtype=ms.int32)
    sorted_to_pair_N = ops.argsort(key_N)
    pair_to_sorted_N = ops.argsort(sorted_to_pair_N)
    counts_E = ops.one_hot(expert_of_pair_N, E, Tensor(1, ms.int32), Tensor(0, ms.int32)).sum(axis=0)
    x_ND = ops.gather(x_TD, sorted_to_pair_N // K, 0)
    out_ND = experts.grouped(x_ND, ops.cumsum(counts_E, 0).astype(ms.int64))
    y_TD = combine(out_ND, pair_to_sorted_N.reshape(T, K), weights_TK)
    return y_TD, counts_E, counts_E


# --- balancing losses -----------------------------------------------------------------------------


def _as_distribution(scores_TE: Tensor) -> Tensor:
    """Softmax probabilities pass (up to rounding); sigmoid affinities are normalised to sum to one
    (DeepSeek-V3, eq. 19). As the PyTorch code, the division is part of the graph for every router."""
    return scores_TE / scores_TE.sum(axis=-1, keepdims=True)


def switch_aux_loss(scores_TE: Tensor, counts_E: Tensor, top_k: int) -> Tensor:
    """Switch / GShard loss (Fedus et al. 2021, eq. 4-6): L = E * sum_i f_i P_i, f_i the share of the
    T K assignments that go to expert i (no gradient), P_i the mean router probability of expert i."""
    T, E = scores_TE.shape
    f_E = ops.stop_gradient(counts_E.astype(ms.float32) / max(1, T * top_k))
    return E * (f_E * _as_distribution(scores_TE).mean(axis=0)).sum()


def sequence_aux_loss(scores_BSE: Tensor, expert_ids_BSK: Tensor) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss (arXiv:2412.19437, eq. 17-20), per sequence then averaged:
    L = sum_i f_i P_i, f_i = E / (K S) * (assignments of the sequence to i), P_i = mean_t s'_ti."""
    B, S, E = scores_BSE.shape
    K = expert_ids_BSK.shape[-1]
    one_hot = ops.one_hot(expert_ids_BSK.reshape(B, S * K), E, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
    f_BE = ops.stop_gradient(one_hot.sum(axis=1) * (E / (K * max(1, S))))
    return (f_BE * _as_distribution(scores_BSE).mean(axis=1)).sum(axis=-1).mean()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean_t (log sum_i exp(x_ti))^2."""
    return ops.square(ops.logsumexp(logits_TE, -1)).mean()


def update_router_bias(bias_E: Parameter, load_E: np.ndarray, rate: float, recenter: bool, rule: str) -> Parameter:
    """The auxiliary-loss-free balancing step (Wang et al. 2024, arXiv:2408.15664, Algorithm 1) of
    ``workbench.moe.balance.update_router_bias``, applied to a MindSpore bias in place, on the host:
    the PyTorch function runs on a copy, which is assigned back (a compiled step keeps reading the
    Parameter's memory). ``load_E``: the tokens per expert since the last update. Returns ``bias_E``."""
    bias = torch.from_numpy(bias_E.asnumpy().copy())
    torch_update_router_bias(bias, torch.from_numpy(np.asarray(load_E)), rate, recenter, rule)
    ops.assign(bias_E, Tensor(bias.numpy()))
    return bias_E


# --- the MoE layer, the block, the model -----------------------------------------------------------


class LayerRouting(NamedTuple):
    """What one MoE layer returns beside its output (names for the tuple ``MoELayer`` returns)."""

    expert_ids_TK: Tensor
    weights_TK: Tensor
    scores_TE: Tensor
    logits_TE: Tensor
    tokens_per_expert: Tensor  # (E,) int32, before drops
    kept_per_expert: Tensor  # (E,) int32
    aux_loss: Tensor  # raw, unweighted; these three are BALANCE_LOSSES, in its order
    seq_aux_loss: Tensor
    z_loss: Tensor
    weighted_loss: Tensor


class MoELayer(nn.Cell):
    """Router -> dispatch -> experts -> combine (+ shared experts), as ``workbench.moe.MoELayer``.

    ``construct(x_BSD) -> (y_BSD, LayerRouting fields as a tuple)``.
    """

    def __init__(self, d_model: int, cfg: MoEConfig, block_rows: int = 64):
        super().__init__()
        self.cfg = cfg
        self.top_k = cfg.top_k
        self.router = ROUTERS[cfg.router](d_model, cfg)
        self.experts = SwiGLUExperts(cfg.num_experts, d_model, cfg.expert_hidden)
        # the dispatch, settled here: "capacity", or dropless (the grouped matmul kernel where it exists)
        self.dispatch_kind = "capacity" if cfg.dispatch == "capacity" else (
            "grouped" if device_target() == "Ascend" else "sorted")
        self.capacity_factor, self.block_rows = cfg.capacity_factor, block_rows
        self.has_shared = cfg.shared_hidden > 0
        if self.has_shared:
            self.shared_experts = SwiGLUMLP(d_model, cfg.shared_hidden)
        self.has_shared_gate = bool(cfg.shared_expert_gate)
        if self.has_shared_gate:
            # Qwen2-MoE gates the shared expert per token with sigmoid(x . w_g); torch's nn.Linear(D, 1) layout
            self.shared_gate = Parameter(Tensor(np.zeros((1, d_model), np.float32)), name="shared_gate")
        # one weight per raw loss, in the order of BALANCE_LOSSES (and of LayerRouting's loss fields)
        self.loss_weights = tuple(cfg.loss_weights[name] for name in BALANCE_LOSSES)

    def construct(self, x_BSD: Tensor):
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        expert_ids_TK, weights_TK, scores_TE, logits_TE = self.router(x_TD)
        if self.dispatch_kind == "capacity":
            y_TD, counts_E, kept_E = capacity_dispatch(self.experts, self.capacity_factor, x_TD, expert_ids_TK,
                                                       weights_TK)
        elif self.dispatch_kind == "grouped":
            y_TD, counts_E, kept_E = grouped_dispatch(self.experts, x_TD, expert_ids_TK, weights_TK)
        else:
            y_TD, counts_E, kept_E = sorted_dispatch(self.experts, self.block_rows, x_TD, expert_ids_TK, weights_TK)
        if self.has_shared:
            shared_TD = self.shared_experts(x_TD)
            if self.has_shared_gate:
                shared_TD = shared_TD * ops.sigmoid(linear(x_TD, self.shared_gate))
            y_TD = y_TD + shared_TD

        raw = (switch_aux_loss(scores_TE, counts_E, self.top_k),  # in the order of BALANCE_LOSSES
               sequence_aux_loss(scores_TE.reshape(B, S, -1), expert_ids_TK.reshape(B, S, -1)),
               router_z_loss(logits_TE))
        # only the weighted losses carry gradient, as in the PyTorch layer
        weighted = ops.zeros((), ms.float32)
        for i, weight in enumerate(self.loss_weights):
            if weight > 0:
                weighted = weighted + weight * raw[i]
        routing = (expert_ids_TK, weights_TK, scores_TE, logits_TE, counts_E, kept_E,
                   ops.stop_gradient(raw[0]), ops.stop_gradient(raw[1]), ops.stop_gradient(raw[2]), weighted)
        return y_TD.reshape(B, S, D), routing


class Block(nn.Cell):
    def __init__(self, cfg: ModelConfig, layer_idx: int, block_rows: int = 64):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.ffn = MoELayer(cfg.d_model, cfg.moe, block_rows) if self.is_moe else SwiGLUMLP(cfg.d_model,
                                                                                               cfg.dense_hidden)

    def construct(self, x: Tensor, cos: Tensor, sin: Tensor):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        if self.is_moe:
            ffn_out, routing = self.ffn(self.ffn_norm(x))
            return x + ffn_out, routing
        return x + self.ffn(self.ffn_norm(x)), ()


class ModelOutputs(NamedTuple):
    """Names for the tuple ``MoELM.construct`` returns (``ModelOutputs(*out)``)."""

    loss: Tensor  # lm_loss + aux_loss (zero when no targets were given)
    logits: Tensor  # (B, S, V)
    aux_loss: Tensor  # weighted balancing losses averaged over the MoE layers
    lm_loss: Tensor
    routing: tuple  # one LayerRouting-shaped tuple per MoE layer


def cross_entropy(logits_NV: Tensor, targets_N: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the targets that are not -100 (ignored), in fp32."""
    logp_NV = ops.log_softmax(logits_NV.astype(ms.float32), -1)
    valid_N = targets_N != -100
    safe_N = ops.select(valid_N, targets_N, ops.zeros_like(targets_N))
    nll_N = -ops.gather_elements(logp_NV, 1, safe_N.reshape(-1, 1)).reshape(-1)
    valid = valid_N.astype(ms.float32)
    return (nll_N * valid).sum() / ops.maximum(valid.sum(), Tensor(1.0, ms.float32))


class MoELM(nn.Cell):
    """The compact decoder LM of ``workbench.model.MoELM`` from the same ``ModelConfig``.

    ``construct(tokens_BS, targets_BS=None) -> (loss, logits, aux_loss, lm_loss, routing)``
    (``ModelOutputs`` names them; loss and lm_loss are 0 without targets). Parameters start at
    zero: load weights with ``workbench.ms.convert`` (``from_torch`` or a safetensors file) or
    call ``init_weights(seed)``. ``block_rows``: rows per block of the dropless dispatch.
    """

    def __init__(self, cfg: ModelConfig, block_rows: int = 64):
        super().__init__()
        check_supported(cfg)
        self.cfg = cfg
        self.tie = cfg.tie_embeddings
        self.embed = Parameter(Tensor(np.zeros((cfg.vocab_size, cfg.d_model), np.float32)), name="embed")
        self.blocks = nn.CellList([Block(cfg, i, block_rows) for i in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not self.tie:
            self.lm_head = Parameter(Tensor(np.zeros((cfg.vocab_size, cfg.d_model), np.float32)), name="lm_head")
        cos, sin = rotary_tables(cfg.seq_len, cfg.head_dim, cfg.rope_base)  # the PyTorch model's, float32
        self.rope_cos, self.rope_sin = Tensor(cos.numpy()), Tensor(sin.numpy())
        self.n_moe = len(cfg.moe_layers)

    def init_weights(self, seed: int = 0) -> None:
        """The PyTorch model's initialisation scheme (normal, std 0.02; output projections
        0.02 / sqrt(2 n_layers); router std D^-0.5; norms 1), drawn from numpy with ``seed``: the same
        distributions, not the same numbers (``convert.from_torch`` gives the same numbers)."""
        rng = np.random.default_rng(seed)
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for p in self.get_parameters():
            name = p.name
            if name.endswith("norm.weight"):
                continue
            if name.endswith("router.bias"):
                value = np.zeros(p.shape, np.float32)
            elif name.endswith("router.weight"):
                value = rng.normal(0, self.cfg.d_model ** -0.5, p.shape)
            elif name.endswith((".out", ".w2")) or name.endswith("experts.w2"):
                value = rng.normal(0, out_std, p.shape)
            elif name.endswith("shared_gate"):
                bound = self.cfg.d_model ** -0.5  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))
                value = rng.uniform(-bound, bound, p.shape)
            else:
                value = rng.normal(0, std, p.shape)
            p.set_data(Tensor(np.asarray(value, np.float32)))

    def construct(self, tokens_BS: Tensor, targets_BS: Tensor = None):
        x = ops.gather(self.embed, tokens_BS, 0)
        routing = ()
        for block in self.blocks:
            x, info = block(x, self.rope_cos, self.rope_sin)
            if block.is_moe:
                routing = routing + (info,)
        head = self.embed if self.tie else self.lm_head
        logits = linear(self.norm(x), head)
        aux_loss = ops.zeros((), ms.float32)
        if self.n_moe > 0:
            for info in routing:
                aux_loss = aux_loss + info[9]
            aux_loss = aux_loss / self.n_moe
        if targets_BS is None:
            zero = ops.zeros((), ms.float32)
            return zero, logits, aux_loss, zero, routing
        V = logits.shape[-1]
        lm_loss = cross_entropy(logits.reshape(-1, V), targets_BS.reshape(-1))
        return lm_loss + aux_loss, logits, aux_loss, lm_loss, routing

    def moe_routers(self) -> list[Router]:
        return [b.ffn.router for b in self.blocks if b.is_moe]
