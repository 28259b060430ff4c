"""The model config (``ModelConfig``), its exact parameter and FLOP counts, and presets.

Configs are keyword-only dataclasses that validate themselves in ``__post_init__``: a bad value
raises ``ValueError`` naming the field and what is allowed, before any tensor is built.
``MoEConfig`` lives beside the MoE code (``workbench.moe.config``) and is re-exported here. What
differs by router type (parameters, experts per token, token mixing) is asked of the router
class (``workbench.moe.routers``), so this file names no router.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from workbench.moe.config import MoEConfig
from workbench.moe.routers import Router, router_class
from workbench.validation import check, check_choice, check_int, check_real

__all__ = ["PRESETS", "ModelConfig", "MoEConfig", "dense_baseline", "preset", "small", "tiny"]

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
        check(self.moe is None or isinstance(self.moe, MoEConfig), "moe", "must be a MoEConfig, a dict of its "
              "fields, or None for a dense model", self.moe)
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "dense_hidden"):
            check_int(name, getattr(self, name), 1)
        check(self.d_model % self.n_heads == 0, "n_heads", f"must divide d_model={self.d_model}", self.n_heads)
        check((self.d_model // self.n_heads) % 2 == 0, "n_heads",
               "d_model / n_heads must be even for rotary embeddings", self.n_heads)
        # a NaN, infinite or zero RoPE base or norm epsilon would stop the run at step 1 naming no field
        check_real("rope_base", self.rope_base, 0, above=True)
        check_real("norm_eps", self.norm_eps, 0, above=True)
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)", self.dropout)
        check(self.moe_every >= 1, "moe_every", "must be >= 1", self.moe_every)
        check(0 <= self.first_dense_layers <= self.n_layers, "first_dense_layers",
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

    def _router_class(self) -> type[Router]:
        return router_class(self.moe.router)

    def experts_per_token(self) -> float:
        """Expert passes per token, on average: ``top_k``; expert choice's capacity factor c;
        soft MoE's slots per token, E * slots_per_expert / seq_len, at full-length sequences."""
        if self.moe is None:
            return 0.0
        return self._router_class().experts_per_token(self.moe, self.seq_len)

    def _moe_params(self) -> tuple[int, float]:
        """(total, active per token) parameters of one MoE FFN, router and shared experts included.

        Active counts the expert parameters a token's compute goes through on average, so it is
        fractional for expert choice and soft MoE."""
        m, d = self.moe, self.d_model
        expert = 3 * d * m.expert_hidden
        shared = 3 * d * m.shared_hidden + (d if m.shared_expert_gate and m.shared_hidden else 0)
        router = self._router_class().num_params(d, m)
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
        counted by PaLM (Chowdhery et al. 2022, appendix B) and nanoGPT's MFU estimate. A router
        that mixes tokens adds its products the same way (``Router.token_mixing_macs``; soft MoE:
        6 x 2 x slots x d_model per layer).
        Expert choice and soft MoE give the average over full-length sequences, rounded.
        """
        d = self.d_model
        matmul: float = self.vocab_size * d  # LM head (tied or not, it is a matmul)
        mixing = 2 * self.n_layers * self.seq_len * d  # attention scores and values
        for i in range(self.n_layers):
            matmul += self._attention_params()
            if self.is_moe_layer(i):
                router = self._router_class()
                # the router's parameters that multiply no token (a temperature) are not matmul work
                matmul += self._moe_params()[1] - router.num_params(d, self.moe) + router.num_matmul_params(d, self.moe)
                mixing += router.token_mixing_macs(self.moe, d)
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
    """A preset's MoE fields with the caller's overrides on top; a router that routes to a fixed
    number of experts (switch: one) gets that ``top_k`` unless the caller says otherwise."""
    if "router" in overrides:
        fixed = router_class(overrides["router"]).fixed_top_k
        if fixed is not None:
            defaults["top_k"] = fixed
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
    check_choice("preset", name, PRESETS)
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
    check(not has_dense_layers or cfg.dense_hidden == hidden, "dense_hidden",
           f"the model mixes dense and MoE layers, and its dense layers must already have the MoE's active "
           f"width {hidden} to make an equal-active-parameter dense model", cfg.dense_hidden)
    return cfg.replace(moe=None, dense_hidden=hidden)
