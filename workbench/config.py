"""Configuration dataclasses and presets.

Configs are keyword-only dataclasses that validate themselves in ``__post_init__``: a bad value
raises ``ValueError`` naming the field and what is allowed, before any tensor is built.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

DROP_POLICIES = ("position", "score")
EXPERT_CHOICE_EVAL = ("expert_choice", "token_choice")


def _check(ok: bool, field_name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{field_name}={value!r} is invalid: {allowed}")


def _check_choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, field_name, "allowed values are " + ", ".join(choices), value)


@dataclass(kw_only=True)
class MoEConfig:
    """One MoE feed-forward layer: router, experts, dispatch and load balancing."""

    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 256  # H; fine-grained experts = many experts with a small H

    # --- router -------------------------------------------------------------------------
    router: str = "softmax_topk"
    normalize_topk: bool = True  # renormalise the k selected weights to sum to one (Mixtral)
    router_jitter: float = 0.0  # Switch: multiplicative input noise U(1-eps, 1+eps) in training
    num_groups: int = 1  # sigmoid router: experts split into groups (DeepSeek-V3 node-limited routing)
    topk_groups: int = 1  # ... of which this many are kept per token
    route_scale: float = 1.0  # sigmoid router: gates are multiplied by this after renormalising
    # expert choice: the paper's capacity factor c (average experts per token), C = ceil(c T / E);
    # None = top_k, the expert compute of top-k token choice
    expert_choice_capacity: float | None = None
    expert_choice_eval: str = "expert_choice"  # or "token_choice": evaluate causally (top-k of the same scores)
    hash_vocab_size: int = 256  # hash router: rows of the token id -> experts table; >= the vocabulary size
    sinkhorn_iters: int = 10  # sinkhorn router: balancing iterations (fixed, in log space)
    soft_slots_per_expert: int = 1  # soft MoE: slots per expert, per sequence
    cosine_dim: int = 16  # cosine router: dimension of the hypersphere that tokens and experts meet on

    # --- shared experts (DeepSeekMoE / Qwen2-MoE) --------------------------------------
    num_shared_experts: int = 0
    shared_expert_hidden: int | None = None  # default: num_shared_experts * expert_hidden
    shared_expert_gate: bool = False  # Qwen2-MoE: scale shared output by sigmoid(x . w)

    # --- dispatch -----------------------------------------------------------------------
    dispatch: str = "sorted"
    capacity_factor: float = 1.25  # used by the capacity dispatch only
    drop_policy: str = "position"  # which assignments keep their slot when an expert is full

    # --- load balancing (weights of the raw per-layer losses; 0 disables) --------------
    aux_loss_weight: float = 0.01  # Switch / GShard
    seq_aux_loss_weight: float = 0.0  # DeepSeek-V3 sequence-wise
    z_loss_weight: float = 0.0  # ST-MoE router z-loss
    bias_update_rate: float = 0.0  # auxiliary-loss-free balancing (Wang et al. 2024); 0 disables
    bias_recenter: bool = False  # subtract the mean bias after each update

    def __post_init__(self) -> None:
        _check(self.num_experts >= 1, "num_experts", "must be >= 1", self.num_experts)
        _check(
            1 <= self.top_k <= self.num_experts,
            "top_k",
            f"must be between 1 and num_experts={self.num_experts}",
            self.top_k,
        )
        _check(self.expert_hidden >= 1, "expert_hidden", "must be >= 1", self.expert_hidden)
        # The registries are the single source of the names; imported here to avoid a cycle.
        from workbench.moe.dispatch import DISPATCHES
        from workbench.moe.routers import ROUTERS, BiasedTopKRouter

        _check_choice("router", self.router, tuple(ROUTERS))
        _check_choice("dispatch", self.dispatch, tuple(DISPATCHES))
        _check_choice("drop_policy", self.drop_policy, DROP_POLICIES)
        _check(self.capacity_factor > 0, "capacity_factor", "must be > 0", self.capacity_factor)
        _check(0 <= self.router_jitter < 1, "router_jitter", "must be in [0, 1)", self.router_jitter)
        _check(self.route_scale > 0, "route_scale", "must be > 0", self.route_scale)
        if self.router == "switch":
            _check(self.top_k == 1, "top_k", "the switch router routes each token to 1 expert", self.top_k)
        _check(self.num_groups >= 1, "num_groups", "must be >= 1", self.num_groups)
        _check(
            self.num_experts % self.num_groups == 0,
            "num_groups",
            f"must divide num_experts={self.num_experts}",
            self.num_groups,
        )
        _check(
            1 <= self.topk_groups <= self.num_groups,
            "topk_groups",
            f"must be between 1 and num_groups={self.num_groups}",
            self.topk_groups,
        )
        kept_experts = self.topk_groups * (self.num_experts // self.num_groups)
        _check(
            self.top_k <= kept_experts,
            "top_k",
            f"must be <= the {kept_experts} experts in the topk_groups={self.topk_groups} kept groups",
            self.top_k,
        )
        if self.num_groups > 1:
            _check(self.router == "sigmoid", "num_groups", "group-limited routing needs router='sigmoid'",
                   self.num_groups)
        _check(self.num_shared_experts >= 0, "num_shared_experts", "must be >= 0", self.num_shared_experts)
        if self.shared_expert_hidden is not None:
            _check(self.shared_expert_hidden >= 1, "shared_expert_hidden", "must be >= 1 or None",
                   self.shared_expert_hidden)
        if self.bias_update_rate > 0:
            biased = tuple(n for n, cls in ROUTERS.items() if issubclass(cls, BiasedTopKRouter))
            _check(self.router in biased, "router",
                   "loss-free balancing (bias_update_rate > 0) needs a router with a selection bias: "
                   + ", ".join(biased), self.router)
        for name in ("aux_loss_weight", "seq_aux_loss_weight", "z_loss_weight", "bias_update_rate"):
            _check(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        if self.expert_choice_capacity is not None:
            _check(0 < self.expert_choice_capacity <= self.num_experts, "expert_choice_capacity",
                   f"must be None or in (0, num_experts={self.num_experts}]", self.expert_choice_capacity)
        _check_choice("expert_choice_eval", self.expert_choice_eval, EXPERT_CHOICE_EVAL)
        for name in ("hash_vocab_size", "sinkhorn_iters", "soft_slots_per_expert", "cosine_dim"):
            _check(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))

    def router_params(self, d_model: int) -> int:
        """Parameters of one router (they differ by router type); equals the module's count."""
        E = self.num_experts
        if self.router == "noisy_topk":
            return 2 * d_model * E  # gate and noise projections
        if self.router == "cosine":
            return d_model * self.cosine_dim + E * self.cosine_dim + 1  # projection, expert embeddings, temperature
        if self.router == "soft_moe":
            return d_model * E * self.soft_slots_per_expert  # one column of Phi per slot
        return d_model * E

    @property
    def experts_per_token(self) -> float:
        """Expert passes per token on average: top_k; the capacity factor c for expert choice
        (soft MoE's E * slots / S depends on the sequence length, see ``dense_baseline``)."""
        if self.router == "expert_choice":
            return float(self.expert_choice_capacity or self.top_k)
        return float(self.top_k)

    @property
    def loss_weights(self) -> dict[str, float]:
        """The weight of each raw balancing loss, keyed as ``RoutingInfo.losses`` is."""
        return {"aux_loss": self.aux_loss_weight, "seq_aux_loss": self.seq_aux_loss_weight,
                "z_loss": self.z_loss_weight}

    @property
    def shared_hidden(self) -> int:
        """Hidden size of the (merged) shared expert; 0 when there is none."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_expert_hidden or self.num_shared_experts * self.expert_hidden


@dataclass(kw_only=True)
class ModelConfig:
    """A compact decoder-only LM; MoE feed-forward layers where ``moe`` says so."""

    vocab_size: int = 256  # byte-level by default
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    dense_hidden: int = 512  # hidden size of the dense SwiGLU FFN layers
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = False

    moe: MoEConfig | None = field(default_factory=MoEConfig)  # None: a dense model
    moe_every: int = 1  # every n-th layer (after the first dense ones) is MoE
    first_dense_layers: int = 0  # the first k layers keep a dense FFN (DeepSeek-V3 keeps 3)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # from JSON / checkpoints
            self.moe = MoEConfig(**self.moe)
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "dense_hidden"):
            _check(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        _check(self.d_model % self.n_heads == 0, "n_heads", f"must divide d_model={self.d_model}", self.n_heads)
        _check((self.d_model // self.n_heads) % 2 == 0, "n_heads",
               "d_model / n_heads must be even for rotary embeddings", self.n_heads)
        _check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)", self.dropout)
        _check(self.moe_every >= 1, "moe_every", "must be >= 1", self.moe_every)
        _check(0 <= self.first_dense_layers <= self.n_layers, "first_dense_layers",
               f"must be between 0 and n_layers={self.n_layers}", self.first_dense_layers)

    def is_moe_layer(self, i: int) -> bool:
        """Layer ``i`` has an MoE FFN: after ``first_dense_layers``, every ``moe_every``-th one."""
        if self.moe is None or i < self.first_dense_layers:
            return False
        return (i - self.first_dense_layers) % self.moe_every == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    # --- parameter and FLOP accounting (exact; tests check it against the module) -----
    def _attention_params(self) -> int:
        return 4 * self.d_model * self.d_model  # q, k, v, o projections, no biases

    def experts_per_token(self) -> float:
        """Expert passes per token, on average: ``top_k``; expert choice's capacity factor c;
        soft MoE's slots per token, E * slots_per_expert / seq_len, at full-length sequences."""
        m = self.moe
        if m is None:
            return 0.0
        if m.router == "soft_moe":
            return m.num_experts * m.soft_slots_per_expert / self.seq_len
        return m.experts_per_token

    def _moe_params(self) -> tuple[int, float]:
        """(total, active per token) parameters of one MoE FFN, router and shared experts included.

        Active counts the expert parameters a token's compute goes through on average, so it is
        fractional for expert choice and soft MoE."""
        m, d = self.moe, self.d_model
        expert = 3 * d * m.expert_hidden
        shared = 3 * d * m.shared_hidden + (d if m.shared_expert_gate and m.shared_hidden else 0)
        router = m.router_params(d)
        return router + m.num_experts * expert + shared, router + self.experts_per_token() * expert + shared

    def _layer_params(self, i: int) -> tuple[int, float]:
        norms = 2 * self.d_model
        if self.is_moe_layer(i):
            ffn_total, ffn_active = self._moe_params()
        else:
            ffn_total = ffn_active = 3 * self.d_model * self.dense_hidden
        base = norms + self._attention_params()
        return base + ffn_total, base + ffn_active

    def _embedding_params(self) -> tuple[int, int]:
        embed = self.vocab_size * self.d_model
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return embed, head

    def num_params(self) -> int:
        """All parameters (embeddings included); equals ``sum(p.numel() for p in model.parameters())``."""
        embed, head = self._embedding_params()
        return embed + head + self.d_model + sum(self._layer_params(i)[0] for i in range(self.n_layers))

    def num_active_params(self) -> int:
        """Parameters that one token's compute goes through: ``top_k`` of the routed experts
        (the average number of expert passes for expert choice and soft MoE), rounded."""
        embed, head = self._embedding_params()
        return round(embed + head + self.d_model + sum(self._layer_params(i)[1] for i in range(self.n_layers)))

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward = 3x forward).

        Matmul FLOPs are 6 x the active matmul parameters (Kaplan et al. 2020), the LM head
        included and embedding lookups and norms excluded. Attention scores and values add
        6 x 2 x n_layers x seq_len x d_model, the full (unmasked) ``QK^T`` and ``AV`` products as
        counted by PaLM (Chowdhery et al. 2022, appendix B) and nanoGPT's MFU estimate. Soft MoE
        adds its two token-slot mixing products the same way (6 x 2 x slots x d_model per layer).
        Expert choice and soft MoE give the average over full-length sequences, rounded.
        """
        d = self.d_model
        matmul: float = self.vocab_size * d  # LM head (tied or not, it is a matmul)
        mixing = 2 * self.n_layers * self.seq_len * d  # attention scores and values
        for i in range(self.n_layers):
            matmul += self._attention_params()
            if self.is_moe_layer(i):
                matmul += self._moe_params()[1]
                if self.moe.router == "cosine":
                    matmul -= 1  # the temperature is a parameter but not a matmul weight
                if self.moe.router == "soft_moe":
                    mixing += 2 * self.moe.num_experts * self.moe.soft_slots_per_expert * d
            else:
                matmul += 3 * d * self.dense_hidden
        return round(6 * (matmul + mixing))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


# --- presets ------------------------------------------------------------------------------
# Plain functions, as minGPT and torchtitan do: easy to read and to call with overrides.


def _preset_moe(overrides: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    """A preset's MoE fields with the caller's overrides on top; the switch router routes to one
    expert, so it gets ``top_k=1`` unless the caller says otherwise."""
    if overrides.get("router") == "switch":
        defaults["top_k"] = 1
    return {**defaults, **overrides}


def tiny(**moe_overrides: Any) -> ModelConfig:
    """Trains a few hundred steps on 2 CPU cores in about a minute."""
    moe = MoEConfig(**_preset_moe(num_experts=8, top_k=2, expert_hidden=128, overrides=moe_overrides))
    return ModelConfig(seq_len=128, d_model=128, n_layers=4, n_heads=4, dense_hidden=256, moe=moe)


def small(**moe_overrides: Any) -> ModelConfig:
    """The layer benchmark's shape (16 experts, top-2, d_model 256, hidden 512) in a 6-layer LM."""
    moe = MoEConfig(**_preset_moe(num_experts=16, top_k=2, expert_hidden=512, overrides=moe_overrides))
    return ModelConfig(seq_len=256, d_model=256, n_layers=6, n_heads=8, dense_hidden=1024, moe=moe)


PRESETS = {"tiny": tiny, "small": small}


def preset(name: str, **moe_overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is invalid: allowed values are {', '.join(PRESETS)}")
    return PRESETS[name](**moe_overrides)


def dense_baseline(cfg: ModelConfig) -> ModelConfig:
    """The dense model with the MoE model's *active* expert parameters and FLOPs per token.

    Every MoE FFN becomes a dense SwiGLU FFN of hidden size ``experts_per_token * expert_hidden
    + shared_hidden`` (top-k: ``top_k * H``; expert choice: ``c * H``; soft MoE:
    ``E * slots * H / seq_len`` at full-length sequences), rounded to an integer. A token then
    meets the same number of expert weights in both models, in the same matmul shapes up to
    the split into experts (Switch Transformer's FLOP-matched comparison, Fedus et al. 2021).

    Not matched: the router (``moe.router_params(d_model)`` per MoE layer) and the shared-expert
    gate (d_model), which the dense model does not have; ``num_active_params`` and
    ``flops_per_token`` differ by exactly those. A ModelConfig has one ``dense_hidden``, so a
    model that mixes dense and MoE layers can be converted only when its dense layers already
    have that width.
    """
    m = cfg.moe
    if m is None:
        return cfg
    hidden = max(1, round(cfg.experts_per_token() * m.expert_hidden)) + m.shared_hidden
    has_dense_layers = len(cfg.moe_layers) < cfg.n_layers
    _check(not has_dense_layers or cfg.dense_hidden == hidden, "dense_hidden",
           f"the model mixes dense and MoE layers, and its dense layers must already have the MoE's active "
           f"width {hidden} to make an equal-active-parameter dense model", cfg.dense_hidden)
    return cfg.replace(moe=None, dense_hidden=hidden)
