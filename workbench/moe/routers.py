"""Routers: which experts each token goes to, and with what weight.

Every router follows one contract, ``router(x_TD, token_ids_T=None) -> RouterOutput``, so the MoE
layer never branches on the router type, and one registry (``ROUTERS``) selects them by name.
Routing maths runs in fp32, also under bf16 autocast: small logit differences decide the top-k,
and the softmax / sigmoid of bf16 logits would change which experts win.

The zoo (``ROUTERS``):

=================  ==========================================  ==================================
name               selects                                     gate (combine weight)
=================  ==========================================  ==================================
``softmax_topk``   top-k softmax probabilities (+ bias)        probabilities, renormalised or not
``switch``         top-1 (+ bias), jittered input              the raw probability
``noisy_topk``     top-k of noisy logits                       softmax over the k noisy logits
``sigmoid``        top-k sigmoid affinities (+ bias, groups)   affinities, renormalised, scaled
``expert_choice``  each expert its top-C tokens (not causal)   the softmax probability
``hash``           a fixed random map of the token id          probabilities of the hashed experts
``sinkhorn``       top-k of the Sinkhorn-balanced matrix       probabilities (unbalanced softmax)
``soft_moe``       every token to every slot (not causal)      softmax over slots (in ``soft_dispatch``)
``cosine``         top-k cosine / learned temperature (+ bias) probabilities of the scaled cosines
``uniform``        forced round-robin, exactly balanced        probabilities of the forced experts
``random``         k uniformly random experts, every forward   probabilities of the random experts
=================  ==========================================  ==================================

"Probabilities" means ``softmax(logits)`` of the router's own linear gate gathered at the selected
experts, renormalised over the k when ``normalize_topk`` (so the gate is 1 for k=1). The routers
whose selection ignores the logits (hash, uniform, random) keep that gate so that the router
still runs, costs the same FLOPs and gets a gradient from the LM loss, and a comparison with
``softmax_topk`` changes only the selection. ``SoftmaxGatedRouter`` does that softmax and those
gates once; its subclasses say only how they select.

Options every router honours where they make sense, and refuses (``check_config``) where not:
``normalize_topk`` (the renormalisation rule lives in ``Router.gates``; ``None`` takes the
router's published default), ``route_scale`` (gates times a constant, as DeepSeek-V2/V3 do),
``router_jitter`` (Switch's multiplicative input noise in training), ``bias_update_rate``
(routers with a selection bias only), ``num_groups`` (group-limited routing, sigmoid only).

A new router is one class plus one registry line: the class states its facts (parameters,
matmul weights, experts per token, token-mixing work, fixed top-k, selection bias) as class
attributes and classmethods, and ``MoEConfig`` and ``ModelConfig`` ask the registry for them.

Two routers stretch the contract, both documented on the classes:

- ``expert_choice`` gives a token anywhere from 0 to E experts: ``RouterOutput.mask_TK`` marks the
  real slots of a (T, K) output padded to the most experts any token received in the batch.
  Every dispatch, balancing loss and metric honours the mask; ``None`` (every other router)
  means every slot is real, and costs nothing.
- ``soft_moe`` does not send tokens to experts at all: every slot is a weighted average of the
  tokens of a sequence. Its router sets ``mixes_tokens = True``, which makes ``MoELayer`` run
  ``workbench.moe.dispatch.soft_dispatch``; its ``RouterOutput`` summarises the mixing per expert
  so that the metrics and analyses still read it.

Two routers let a token's output depend on later tokens (``expert_choice``, ``soft_moe``): they
warn with ``CausalLeakWarning`` when built, since the workbench's model is a causal LM.
``sinkhorn`` balances over the batch in training, so there its *selection* (not its gates)
depends on the other tokens of the batch too; it routes causally at evaluation.

Shape legend: T tokens, D model dim, E experts, K experts per token, G expert groups,
C tokens per expert (expert choice), P cosine routing dim, L = E * slots_per_expert (soft MoE).
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from workbench.moe.types import RouterOutput, SoftRouterOutput
from workbench.validation import check, check_choice

if TYPE_CHECKING:
    from workbench.moe.config import MoEConfig


class CausalLeakWarning(UserWarning):
    """A router whose output for one token depends on later tokens, used in the causal LM.

    Silence it, once you have read it, with
    ``warnings.simplefilter("ignore", workbench.moe.routers.CausalLeakWarning)``.
    """


def _warn_causal_leak(name: str, how: str, fix: str) -> None:
    warnings.warn(
        f"router={name!r} is not causal: {how}, so in the workbench's causal LM a token's output "
        "depends on later tokens and the training loss is optimistic (the model can read the future "
        "through the routing). Options: (1) use it for research on balance and routing only, knowing "
        f"the LM loss is not comparable with causal routers; (2) {fix}; (3) use it in a non-causal "
        "(encoder) setting.",
        CausalLeakWarning,
        stacklevel=3,
    )


# Added to the sum of the selected gates before renormalising: when every selected score
# underflows to 0 (sigmoid logits below about -104) the gates become 0, not 0/0 = NaN, as in
# Hugging Face's DeepSeek-V3 block; next to a sum of order 1 it changes nothing in fp32.
GATE_SUM_FLOOR = 1e-20


class Router(nn.Module):
    """Base class: a linear gate ``logits = x W_r`` computed in fp32, then ``route``.

    ``weight`` is always the router's input projection, (rows, D): the expert logits for most
    routers, a low-dimensional projection for ``cosine``, the slot logits for ``soft_moe``.

    The class attributes and classmethods below are the router's facts, read by ``MoEConfig``
    (validation) and ``ModelConfig`` (exact parameter and FLOP counts) without building it.
    """

    # --- facts about the router type --------------------------------------------------------
    mixes_tokens: ClassVar[bool] = False  # soft MoE: MoELayer dispatches with soft_dispatch
    pads_slots: ClassVar[bool] = False  # expert choice: a token's K slots are padded (RouterOutput.mask_TK)
    has_selection_bias: ClassVar[bool] = False  # selects by score + bias: loss-free balancing applies
    supports_expert_groups: ClassVar[bool] = False  # group-limited routing (num_groups > 1)
    supports_route_scale: ClassVar[bool] = True
    fixed_top_k: ClassVar[int | None] = None  # the router routes to exactly this many experts
    # normalize_topk=None takes this; None here: the router has no top-k renormalisation to switch
    default_normalize_topk: ClassVar[bool | None] = True

    @classmethod
    def gate_rows(cls, cfg: MoEConfig) -> int:
        """Output rows of the linear gate ``weight``."""
        return cfg.num_experts

    @classmethod
    def num_params(cls, d_model: int, cfg: MoEConfig) -> int:
        """Parameters of one router; equals ``sum(p.numel() for p in router.parameters())``."""
        return cls.gate_rows(cfg) * d_model

    @classmethod
    def num_matmul_params(cls, d_model: int, cfg: MoEConfig) -> int:
        """Multiply-accumulates per token of the router's forward (its matmul weights)."""
        return cls.num_params(d_model, cfg)

    @classmethod
    def experts_per_token(cls, cfg: MoEConfig, seq_len: int) -> float:
        """Expert passes per token, on average, at full-length sequences."""
        return float(cfg.top_k)

    @classmethod
    def token_mixing_macs(cls, cfg: MoEConfig, d_model: int) -> int:
        """Multiply-accumulates per token that mix tokens with each other (soft MoE's slots)."""
        return 0

    @classmethod
    def check_config(cls, name: str, cfg: MoEConfig) -> None:
        """Refuse the options this router cannot honour (``ValueError`` naming the field)."""
        if cls.fixed_top_k is not None:
            check(cfg.top_k == cls.fixed_top_k, "top_k", f"router={name!r} routes each token to "
                  f"{cls.fixed_top_k} expert{'s' if cls.fixed_top_k > 1 else ''}", cfg.top_k)
        if cfg.bias_update_rate > 0:
            biased = [n for n, c in ROUTERS.items() if c.has_selection_bias]
            check(cls.has_selection_bias, "router", "loss-free balancing (bias_update_rate > 0) needs a router "
                  "with a selection bias: " + ", ".join(biased), name)
        if cfg.num_groups > 1:
            grouped = [n for n, c in ROUTERS.items() if c.supports_expert_groups]
            check(cls.supports_expert_groups, "num_groups",
                  "group-limited routing needs router=" + " or ".join(repr(n) for n in grouped), cfg.num_groups)
        if cfg.normalize_topk is not None and cls.default_normalize_topk is None:
            check(False, "normalize_topk", f"router={name!r} has no top-k renormalisation: leave it None",
                  cfg.normalize_topk)
        if cfg.route_scale != 1.0:
            check(cls.supports_route_scale, "route_scale", f"router={name!r} has no gates to scale: must be 1.0",
                  cfg.route_scale)
        if cfg.capacity_scope == "sequence":
            # per-sequence capacity exists to make drops causal; these routers compare tokens across
            # the batch (or mix them) already, so it could not, and its dispatch does not take masks
            check(not cls.pads_slots and not cls.mixes_tokens, "capacity_scope", f"router={name!r} is not causal "
                  "(it compares or mixes tokens across the sequence), so per-sequence capacity cannot make it so: "
                  "leave it 'batch'", cfg.capacity_scope)

    @classmethod
    def decode_refusal(cls, cfg: MoEConfig) -> str | None:
        """Why this router cannot generate token by token with a KV cache, or None when it can.

        Decoding routes each new token alone, so it reproduces the full forward's routing only
        where a token's experts depend on that token (and the layer's fixed state) alone. Every
        token-choice router does, in evaluation mode (``workbench.generate``).
        """
        return None

    # --- the module -------------------------------------------------------------------------
    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.normalize_topk = (self.default_normalize_topk if cfg.normalize_topk is None
                               else cfg.normalize_topk)
        self.route_scale = float(cfg.route_scale)
        self.jitter = float(cfg.router_jitter)
        self.weight = nn.Parameter(torch.empty(self.gate_rows(cfg), d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)
        # Loss-free balancing state: a buffer, never a gradient, only where it is used (so a
        # plain state dict of a model without it loads with strict=True).
        uses_bias = self.has_selection_bias and cfg.bias_update_rate > 0
        self.register_buffer("bias", torch.zeros(cfg.num_experts) if uses_bias else None)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        device = x_TD.device.type
        # fp32 routing: under autocast, step out of it (entering the context costs, so only then)
        with torch.autocast(device_type=device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext():
            out = self.gate_and_route(self.jittered(x_TD).float(), token_ids_T)
        if self.route_scale != 1.0:
            out.weights_TK = out.weights_TK * self.route_scale
        return out

    def jittered(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Switch Transformer's jitter (Fedus et al. 2021, section 2.4): in training, the router
        input times U(1 - eps, 1 + eps) noise, eps = ``router_jitter``; the experts see clean x."""
        if self.training and self.jitter > 0:
            return x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return x_TD

    def gate_and_route(self, x32_TD: torch.Tensor, token_ids_T: torch.Tensor | None) -> RouterOutput:
        """The linear gate, then ``route``. (``workbench.kernels.cpu`` replaces this method, for the
        exact classes it knows, with one op that does both.)"""
        return self.route(x32_TD, self.gate_logits(x32_TD), token_ids_T)

    def gate_logits(self, x32_TD: torch.Tensor) -> torch.Tensor:
        return F.linear(x32_TD, self.weight.float())

    def route(self, x32_TD: torch.Tensor, logits_TE: torch.Tensor,
              token_ids_T: torch.Tensor | None) -> RouterOutput:
        raise NotImplementedError

    def gates(self, scores_TE: torch.Tensor, expert_ids_TK: torch.Tensor) -> torch.Tensor:
        """The combine weights of the chosen experts: their scores, renormalised to sum to one over
        the k when ``normalize_topk`` (Mixtral, Qwen3-MoE, DeepSeek-V3); raw otherwise (Switch,
        Qwen2-MoE, DeepSeek-V2). The one renormalisation rule of the zoo."""
        weights_TK = scores_TE.gather(1, expert_ids_TK)
        if self.normalize_topk:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + GATE_SUM_FLOOR)
        return weights_TK

    def biased(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """``score + bias`` where loss-free balancing is on: what selection ranks, never the gates."""
        return scores_TE if self.bias is None else scores_TE + self.bias


class SoftmaxGatedRouter(Router):
    """Softmax over all experts in fp32, a selection, and the probabilities of the selected
    experts as gates (``Router.gates``). A subclass says only how it selects, in ``select``."""

    def route(self, x32_TD: torch.Tensor, logits_TE: torch.Tensor,
              token_ids_T: torch.Tensor | None) -> RouterOutput:
        probs_TE = logits_TE.softmax(dim=-1)
        expert_ids_TK = self.select(logits_TE, probs_TE, token_ids_T)
        return RouterOutput(expert_ids_TK, self.gates(probs_TE, expert_ids_TK), probs_TE, logits_TE)

    def select(self, logits_TE: torch.Tensor, probs_TE: torch.Tensor,
               token_ids_T: torch.Tensor | None) -> torch.Tensor:
        """(T, K) long: the experts of each token."""
        raise NotImplementedError


class SoftmaxTopKRouter(SoftmaxGatedRouter):
    """Softmax over all experts, keep the top-k (GShard, Lepikhin et al. 2020; Mixtral, Jiang et al. 2024).

    ``normalize_topk`` renormalises the kept probabilities to sum to one, which equals a softmax
    over the k selected logits (Mixtral, Qwen3-MoE). Without it the weights are the raw
    probabilities (Switch, Qwen2-MoE, DeepSeek-V2, which multiplies them by ``route_scale``).
    With k=1 and renormalising, every gate is exactly 1 and the router learns only from the
    auxiliary losses.

    Selection is by ``probability + bias``: the bias is the auxiliary-loss-free balancing state
    (Wang et al. 2024, arXiv:2408.15664), a buffer that gradients never touch, that changes only
    *which* experts are selected, and that ``workbench.moe.balance.update_router_bias`` moves at
    the optimizer step (present only when ``bias_update_rate > 0``).
    """

    has_selection_bias = True

    def select(self, logits_TE, probs_TE, token_ids_T):
        return torch.topk(self.biased(probs_TE), self.top_k, dim=-1, sorted=False).indices


class SwitchRouter(SoftmaxTopKRouter):
    """Top-1 routing with the raw softmax probability as gate (Switch Transformer, Fedus et al. 2021),
    usually trained with ``router_jitter`` (section 2.4)."""

    fixed_top_k = 1
    default_normalize_topk = False  # the paper's gate is the raw probability


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", eq. 3-5).

        H(x)_i = (x W_g)_i + StandardNormal() * Softplus((x W_noise)_i)     (training only)
        G(x)   = Softmax(KeepTopK(H(x), k))

    The softmax over the k kept noisy logits is ``Router.gates`` of ``softmax(H(x))`` with
    ``normalize_topk`` (the default); without it the gates are the noisy probabilities over
    all experts. ``scores_TE`` is the softmax of the clean logits, which the balancing losses
    and metrics read.
    """

    @classmethod
    def num_params(cls, d_model, cfg):
        return 2 * d_model * cfg.num_experts  # gate and noise projections

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        # Zero init: the noise starts at softplus(0) = 0.69 and is learned from there.
        self.noise_weight = nn.Parameter(torch.zeros(cfg.num_experts, d_model))

    def route(self, x32_TD, logits_TE, token_ids_T):
        noisy_TE = logits_TE
        if self.training:
            noise_std_TE = F.softplus(F.linear(x32_TD, self.noise_weight.float()))
            noisy_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        expert_ids_TK = torch.topk(noisy_TE, self.top_k, dim=-1, sorted=False).indices
        weights_TK = self.gates(noisy_TE.softmax(dim=-1), expert_ids_TK)
        return RouterOutput(expert_ids_TK, weights_TK, logits_TE.softmax(dim=-1), logits_TE)


class SigmoidRouter(Router):
    """DeepSeek-V3 routing (DeepSeek-AI 2024, arXiv:2412.19437, section 2.1.2, eq. 12-16).

        s_i   = sigmoid(u . e_i)                                   affinity of expert i
        keep  = top-k over (s_i + b_i), within the top ``topk_groups`` of ``num_groups``
                groups, a group scored by the sum of its two highest biased affinities
        g_i   = route_scale * s_i / sum_{j in keep} s_j            gates from the *unbiased* s

    The bias ``b`` comes from auxiliary-loss-free balancing; it selects, it never weights.
    """

    has_selection_bias = True
    supports_expert_groups = True

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        self.num_groups = cfg.num_groups
        self.topk_groups = cfg.topk_groups

    def route(self, x32_TD, logits_TE, token_ids_T):
        scores_TE = logits_TE.sigmoid()
        biased_TE = self.biased(scores_TE)
        if self.num_groups > 1:
            biased_TE = self._mask_to_kept_groups(biased_TE)
        expert_ids_TK = torch.topk(biased_TE, self.top_k, dim=-1, sorted=False).indices
        return RouterOutput(expert_ids_TK, self.gates(scores_TE, expert_ids_TK), scores_TE, logits_TE)

    def _mask_to_kept_groups(self, biased_TE: torch.Tensor) -> torch.Tensor:
        T, E = biased_TE.shape
        grouped_TGe = biased_TE.view(T, self.num_groups, E // self.num_groups)
        # A group's score is the sum of its top-2 experts (top-1 when a group has one expert).
        per_group = min(2, E // self.num_groups)
        group_score_TG = grouped_TGe.topk(per_group, dim=-1).values.sum(dim=-1)
        kept_groups_TG = group_score_TG.topk(self.topk_groups, dim=-1).indices
        group_mask_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, kept_groups_TG, True)
        expert_mask_TE = group_mask_TG.repeat_interleave(E // self.num_groups, dim=1)
        return biased_TE.masked_fill(~expert_mask_TE, float("-inf"))


class ExpertChoiceRouter(Router):
    """Expert choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing",
    arXiv:2202.09368): experts pick tokens.

        S    = Softmax(X W_g)            (T, E) token-to-expert affinities, softmax over experts
        I_e  = TopK(S[:, e], C)          expert e takes the C tokens with the highest affinity
        y_t  = sum_{e : t in I_e} S[t, e] * expert_e(x_t)      gate = the affinity, as in the paper

    Capacity: ``C = ceil(c * T / E)`` with ``c = expert_choice_capacity``, the paper's capacity
    factor (the average number of experts per token; the paper's EC-CF2 is c = 2). ``None``
    takes c = top_k, the same expert compute as top-k token choice. C is clamped to [1, T].
    T is every token of the batch: experts choose across sequences. The router does not see
    the padding mask, so padding tokens compete for capacity like real ones.

    Every expert gets exactly C tokens; a token gets 0 to E experts. The output is padded to
    K = the most experts any token got in this batch, with ``mask_TK`` marking the real slots
    (padding: weight 0 and an expert that did not choose the token). A token no expert chose
    keeps only its residual path (and the shared experts). The Switch auxiliary loss is
    identically 1 here, with zero gradient: the balance is built in.

    **Not causal**: whether expert e takes token t depends on how t's affinity ranks among
    *all* tokens, later ones included, so a later token can push an earlier one out of an
    expert (``tests/moe/test_router_zoo.py`` demonstrates the leak). It warns when built.
    ``expert_choice_eval="token_choice"`` routes evaluation causally (top-k over the same S,
    gates S, not renormalised): an honest next-token loss, at the price of a train/test
    mismatch; the default ``"expert_choice"`` evaluates as it trains.
    """

    default_normalize_topk = None  # a token's gates are its affinities; nothing to renormalise
    pads_slots = True

    @classmethod
    def experts_per_token(cls, cfg, seq_len):
        return float(cfg.expert_choice_capacity or cfg.top_k)

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        self.capacity_factor = float(cfg.expert_choice_capacity or cfg.top_k)
        self.eval_mode = cfg.expert_choice_eval
        _warn_causal_leak("expert_choice", "each expert picks its top-C tokens among all tokens of the batch",
                          "evaluate with token choice (MoEConfig.expert_choice_eval='token_choice')")

    @classmethod
    def decode_refusal(cls, cfg):
        if cfg.expert_choice_eval == "token_choice":
            return None  # its causal evaluation form: top-k over the same scores
        return ("each expert picks its top-C tokens among all tokens of the batch, so a token's experts depend on "
                "tokens not generated yet; evaluate causally with expert_choice_eval='token_choice'")

    def capacity(self, num_tokens: int) -> int:
        """C = ceil(c * T / E), at least 1 and at most T."""
        return min(num_tokens, max(1, math.ceil(self.capacity_factor * num_tokens / self.num_experts)))

    def route(self, x32_TD, logits_TE, token_ids_T):
        probs_TE = logits_TE.softmax(dim=-1)
        T, E = probs_TE.shape
        if not self.training and self.eval_mode == "token_choice":
            expert_ids_TK = probs_TE.topk(self.top_k, dim=-1, sorted=False).indices
            return RouterOutput(expert_ids_TK, probs_TE.gather(1, expert_ids_TK), probs_TE, logits_TE)

        # shape: (E, C) the tokens each expert takes
        token_ids_EC = probs_TE.t().topk(self.capacity(T), dim=1, sorted=False).indices
        chosen_TE = torch.zeros(E, T, dtype=torch.bool, device=probs_TE.device).scatter_(1, token_ids_EC, True).t()
        K = max(1, int(chosen_TE.sum(dim=1).max()))
        # A stable descending sort puts each token's experts first (in expert order), padding after.
        mask_TE, expert_ids_TE = chosen_TE.to(torch.uint8).sort(dim=1, descending=True, stable=True)
        mask_TK, expert_ids_TK = mask_TE[:, :K].bool(), expert_ids_TE[:, :K]
        weights_TK = probs_TE.gather(1, expert_ids_TK) * mask_TK
        return RouterOutput(expert_ids_TK, weights_TK, probs_TE, logits_TE, mask_TK)


class HashRouter(SoftmaxGatedRouter):
    """Hash layers (Roller et al. 2021, "Hash Layers For Large Sparse Models", arXiv:2106.04426).

        e_t = hash(token_id_t)                          a fixed random map, never learned

    The map is a random lookup table, which the paper found to work well ("Random Hash"): row v
    holds the K distinct experts of token id v (the first K of a random permutation of the
    experts). It is drawn from torch's global generator at construction (so ``torch.manual_seed``
    before building the model fixes it, and each layer gets its own) and kept as the buffer
    ``expert_table`` (``hash_vocab_size`` x K), so checkpoints keep it. Token ids must be below
    ``MoEConfig.hash_vocab_size`` (256, the byte tokenizer's vocabulary, by default).

    Gates: the paper has none (top-1, weight 1). Here the gate is the softmax probability of the
    hashed experts, renormalised over the k when ``normalize_topk``: exactly 1 for k = 1 (the
    paper), and for k > 1 a learned mixture of the hashed experts, so the router still learns.
    The layer must pass the token ids (``MoELayer.forward(x, token_ids_BS)``; ``MoELM`` does).
    """

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        table = torch.rand(cfg.hash_vocab_size, cfg.num_experts).argsort(dim=1)[:, : cfg.top_k]
        self.register_buffer("expert_table", table)

    def select(self, logits_TE, probs_TE, token_ids_T):
        if token_ids_T is None:
            raise ValueError("router='hash' routes by token id: pass token_ids_BS to MoELayer.forward "
                             "(MoELM does), or token_ids_T to the router")
        vocab = self.expert_table.shape[0]
        if token_ids_T.numel() and (int(token_ids_T.max()) >= vocab or int(token_ids_T.min()) < 0):
            raise ValueError(f"token id {int(token_ids_T.max())} is outside the hash table: "
                             f"MoEConfig.hash_vocab_size={vocab} must be at least the vocabulary size")
        return self.expert_table[token_ids_T]


@torch.no_grad()
def sinkhorn_log(logits_TE: torch.Tensor, num_iters: int) -> torch.Tensor:
    """Log of the Sinkhorn-balanced routing matrix (Sinkhorn and Knopp 1967, in log space).

        log A <- log A - logsumexp_e(log A)                  every token carries mass 1
        log A <- log A - logsumexp_t(log A) + log(T / E)     every expert receives mass T / E

    ``num_iters`` rounds of both, ending with the expert step, so the expert loads of A are
    exact and the token masses approximate. Working with logs avoids the overflow of exp(logits).
    """
    T, E = logits_TE.shape
    log_a = logits_TE.float()
    for _ in range(num_iters):
        log_a = log_a - log_a.logsumexp(dim=1, keepdim=True)
        log_a = log_a - log_a.logsumexp(dim=0, keepdim=True) + math.log(T / E)
    return log_a


class SinkhornRouter(SoftmaxGatedRouter):
    """Sinkhorn-balanced routing, S-BASE (Clark et al. 2022, "Unified Scaling Laws for Routed
    Language Models", arXiv:2202.01169), after BASE layers (Lewis et al. 2021, "BASE Layers:
    Simplifying Training of Large, Sparse Models", arXiv:2103.16716), which solve the balanced
    token-to-expert assignment exactly as a linear assignment problem.

        A      = Sinkhorn(exp(logits))        tokens carry mass 1, experts receive T / E each
        keep_t = top-k_e A[t, e]              training: selection from the balanced matrix
        keep_t = top-k_e logits[t, e]         evaluation: plain top-k, causal
        g      = softmax(logits)[t, keep_t]   gates from the *unbalanced* softmax (renormalised
                                              over the k when ``normalize_topk``)

    Selection only: the Sinkhorn matrix is computed without gradient. Since top-k is invariant to
    a per-token shift, the selection equals top-k of ``logits + v`` with one balancing offset
    ``v_e`` per expert, computed for this batch (compare the loss-free bias, which is learned
    over steps). ``sinkhorn_iters`` fixed iterations (default 10), in log space for stability.
    In training the offsets depend on every token of the batch, later ones included: a weak,
    selection-only dependence on the future, absent at evaluation.
    """

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        self.num_iters = cfg.sinkhorn_iters

    def select(self, logits_TE, probs_TE, token_ids_T):
        balanced_TE = sinkhorn_log(logits_TE.detach(), self.num_iters) if self.training else logits_TE.detach()
        return balanced_TE.topk(self.top_k, dim=-1, sorted=False).indices


class SoftMoERouter(Router):
    """Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts", arXiv:2308.00951):
    every expert has ``soft_slots_per_expert`` slots; a slot is a weighted average
    of all the tokens of a sequence, and a token's output a weighted average of all slot outputs.

        logits = X Phi                      (S, L) per sequence, L = E * slots, Phi = ``weight``^T
        D      = softmax over tokens (each column)   dispatch weights: slot l = sum_s D[s, l] x_s
        C      = softmax over slots (each row)       combine weights: y_s = sum_l C[s, l] out_l
        out_l  = expert_{l // slots}(slot l)

    The router computes the slot logits; ``workbench.moe.dispatch.soft_dispatch`` does the mixing
    per sequence (``mixes_tokens = True`` makes ``MoELayer`` use it; ``MoEConfig.dispatch`` does
    not apply). Every expert processes exactly ``slots`` rows per sequence: balanced by
    construction, nothing dropped. Expert compute per token is E * slots / S expert passes
    (``soft_slots_per_expert``, default 1; the paper studies the trade-off).

    The common fields summarise the mixing for the metrics and analyses:

    - ``logits_TE``: logsumexp of each expert's slot logits, so ``softmax(logits_TE)`` is the
      token's total combine weight on each expert's slots, and the z-loss over ``logits_TE``
      equals the z-loss over all slot logits;
    - ``scores_TE``: that combine mass per expert (a distribution over experts for each token);
    - ``expert_ids_TK`` / ``weights_TK``: the top_k experts by combine mass, largest first, and
      their mass. So ``tokens_per_expert`` counts attribution (where a token's output mostly
      comes from), not compute load, and ``gate_mass`` is the mass of those top_k.

    **Not causal**: a slot averages all tokens of a sequence, later ones included, so every
    output depends on the future. It warns when built; it is meant for encoders and teaching.
    """

    mixes_tokens = True
    supports_route_scale = False  # the combine weights are a softmax over slots
    default_normalize_topk = None

    @classmethod
    def decode_refusal(cls, cfg):
        return ("every slot is a weighted average of all tokens of the sequence, later ones included, so there is "
                "no token-by-token form of it")

    @classmethod
    def gate_rows(cls, cfg):
        return cfg.num_experts * cfg.soft_slots_per_expert

    @classmethod
    def experts_per_token(cls, cfg, seq_len):
        return cfg.num_experts * cfg.soft_slots_per_expert / seq_len

    @classmethod
    def token_mixing_macs(cls, cfg, d_model):
        # dispatch (slots from tokens) and combine (tokens from slots): L * D each, per token
        return 2 * cfg.num_experts * cfg.soft_slots_per_expert * d_model

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        self.slots_per_expert = cfg.soft_slots_per_expert
        _warn_causal_leak("soft_moe", "every slot is a weighted average of all tokens of the sequence",
                          "use a token-choice router for language modelling")

    def route(self, x32_TD, slot_logits_TL, token_ids_T):
        T = slot_logits_TL.shape[0]
        logits_TE = slot_logits_TL.view(T, self.num_experts, self.slots_per_expert).logsumexp(dim=-1)
        scores_TE = logits_TE.softmax(dim=-1)
        weights_TK, expert_ids_TK = scores_TE.topk(self.top_k, dim=-1, sorted=True)
        return SoftRouterOutput(expert_ids_TK, weights_TK, scores_TE, logits_TE, None, slot_logits_TL)


class CosineRouter(SoftmaxTopKRouter):
    """Cosine routing (X-MoE: Chi et al. 2022, "On the Representation Collapse of Sparse Mixture
    of Experts", arXiv:2204.09179; Tutel's ``CosineTopKGate``, Hwang et al. 2023, arXiv:2206.03382).

        s_e = cos(W x, w_e) / tau          W: D -> P (P = ``cosine_dim``, low), w_e in R^P
        g   = softmax(s) at the top-k       (renormalised when ``normalize_topk``)

    Routing on a low-dimensional hypersphere keeps the router from pulling token
    representations toward the expert embeddings (X-MoE's "representation collapse").
    ``weight`` is the projection W (P x D), ``expert_embed`` the w_e (E x P). The temperature is
    learned as ``log(1 / tau)``, initialised at tau = 0.5 and clamped to 1 / tau <= 100, as
    Tutel does, so the logits stay in [-100, 100]. Supports the loss-free balancing bias.
    """

    init_temperature = 0.5
    max_log_inv_temperature = math.log(100.0)

    @classmethod
    def gate_rows(cls, cfg):
        return cfg.cosine_dim

    @classmethod
    def num_params(cls, d_model, cfg):
        # projection, expert embeddings, temperature
        return d_model * cfg.cosine_dim + cfg.num_experts * cfg.cosine_dim + 1

    @classmethod
    def num_matmul_params(cls, d_model, cfg):
        return cls.num_params(d_model, cfg) - 1  # the temperature scales; it multiplies no token

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        # unit-norm rows on average; only their direction matters
        self.expert_embed = nn.Parameter(torch.randn(cfg.num_experts, cfg.cosine_dim) * cfg.cosine_dim**-0.5)
        self.log_inv_temperature = nn.Parameter(torch.tensor(math.log(1 / self.init_temperature)))

    def gate_logits(self, x32_TD: torch.Tensor) -> torch.Tensor:
        tokens_TP = F.normalize(F.linear(x32_TD, self.weight.float()), dim=-1)
        experts_EP = F.normalize(self.expert_embed.float(), dim=-1)
        inv_tau = self.log_inv_temperature.float().clamp(max=self.max_log_inv_temperature).exp()
        return inv_tau * (tokens_TP @ experts_EP.t())


class UniformRouter(SoftmaxGatedRouter):
    """Forced round-robin assignment, for throughput benchmarks: the forced balance that
    MegaBlocks (``uniform_expert_assignment``), torchtitan and OLMo-core offer for the same purpose.

        e_{t,k} = (t * K + k) mod E          pair n = t K + k goes to expert n mod E

    The K experts of a token are distinct (K <= E consecutive residues), and every expert gets
    exactly T K / E pairs when E divides T K (else the counts differ by at most one). The linear
    gate still runs, so FLOPs match a learned router, and its probabilities are the gates.
    """

    @classmethod
    def decode_refusal(cls, cfg):
        return ("it assigns experts by a token's index in the batch (round-robin), not by the token, so a decode "
                "step of one token per sequence cannot reproduce the routing of the full forward")

    def select(self, logits_TE, probs_TE, token_ids_T):
        T, E = probs_TE.shape
        pairs_TK = torch.arange(T * self.top_k, device=probs_TE.device).view(T, self.top_k)
        return pairs_TK.remainder(E)


class RandomRouter(SoftmaxGatedRouter):
    """A baseline: K distinct experts drawn uniformly at random for every token, at every forward
    (training and evaluation), from torch's global generator. As for ``uniform``, the linear gate
    runs and its probabilities are the gates."""

    @classmethod
    def decode_refusal(cls, cfg):
        return ("it draws new experts for every token at every forward, so the routing kept in a KV cache and that "
                "of a recomputed prefix differ: a cached decode has no reference to equal")

    def select(self, logits_TE, probs_TE, token_ids_T):
        # the top-k of i.i.d. uniform keys is a uniformly random k-subset
        return torch.rand_like(probs_TE).topk(self.top_k, dim=-1, sorted=False).indices


# One line per router. A new router: a subclass of Router (or SoftmaxGatedRouter) and a line here.
ROUTERS: dict[str, type[Router]] = {
    "softmax_topk": SoftmaxTopKRouter,
    "switch": SwitchRouter,
    "noisy_topk": NoisyTopKRouter,
    "sigmoid": SigmoidRouter,
    "expert_choice": ExpertChoiceRouter,
    "hash": HashRouter,
    "sinkhorn": SinkhornRouter,
    "soft_moe": SoftMoERouter,
    "cosine": CosineRouter,
    "uniform": UniformRouter,
    "random": RandomRouter,
}


def router_class(name: str) -> type[Router]:
    """The registered router class, or ``ValueError`` listing the known names."""
    check_choice("router", name, ROUTERS)
    return ROUTERS[name]


def build_router(d_model: int, cfg: MoEConfig) -> Router:
    return router_class(cfg.router)(d_model, cfg)
