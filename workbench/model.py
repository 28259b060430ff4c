"""A compact decoder-only language model with MoE feed-forward layers.

Read it top to bottom: a token is embedded, goes through ``n_layers`` pre-norm blocks
(RMSNorm -> rotary causal attention -> residual, RMSNorm -> FFN -> residual), a final RMSNorm
and the LM head. The FFN of a block is a dense SwiGLU MLP or an ``MoELayer``
(``ModelConfig.is_moe_layer``); with ``moe=None`` the model is the dense baseline.

Shape legend: B batch, S sequence, D model dim, h heads, d head dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from workbench.config import ModelConfig
from workbench.kernels.cpu import convert_if_enabled
from workbench.moe import MoELayer, RoutingInfo, SwiGLUExperts, SwiGLUMLP

if TYPE_CHECKING:
    from workbench.inference.cache import KVCache, LayerKV


@dataclass
class ModelOutput:
    loss: torch.Tensor | None  # lm_loss + aux_loss: what training backpropagates
    logits: torch.Tensor  # (B, S, V)
    aux_loss: torch.Tensor  # weighted balancing losses, averaged over the MoE layers
    routing: list[RoutingInfo]  # one per MoE layer, in depth order
    lm_loss: torch.Tensor | None = None  # next-token cross-entropy alone


def rotary_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the RoPE angles, (S, d/2) each (Su et al. 2021)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x_BhSd: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head as pairs (the LLaMA / GPT-NeoX layout)."""
    x1, x2 = x_BhSd.chunk(2, dim=-1)
    cos, sin = cos_Sd.to(x_BhSd.dtype), sin_Sd.to(x_BhSd.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: LayerKV | None = None) -> torch.Tensor:
        """cos, sin: the rotary tables at the tokens' positions, (S, d/2), or (B, 1, S, d/2) in a
        cached step. ``kv``: this layer's part of a ``KVCache`` (generation); the step's keys and
        values are written into it and the queries attend over all its slots with its mask."""
        q, k, v = rearrange(self.qkv(x_BSD), "B S (qkv h d) -> qkv B h S d", qkv=3, h=self.n_heads)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is None:
            y_BhSd = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                    dropout_p=self.dropout if self.training else 0.0)
        else:
            keys, values = kv.store(k, v)
            y_BhSd = F.scaled_dot_product_attention(q, keys, values, attn_mask=kv.cache.mask_B1SW)
        return self.out(rearrange(y_BhSd, "B h S d -> B S (h d)"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.ffn = MoELayer(cfg.d_model, cfg.moe) if self.is_moe else SwiGLUMLP(cfg.d_model, cfg.dense_hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tokens: torch.Tensor,
                padding_mask: torch.Tensor | None,
                kv: LayerKV | None = None) -> tuple[torch.Tensor, RoutingInfo | None]:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, kv))
        if self.is_moe:
            # a cached step is inference: the dropless dispatch, no balancing losses
            ffn_out, routing = self.ffn(self.ffn_norm(x), tokens, padding_mask, inference=kv is not None)
        else:
            ffn_out, routing = self.ffn(self.ffn_norm(x)), None
        return x + self.drop(ffn_out), routing


class MoELM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rotary_tables(cfg.seq_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        # The fast path beside the readable one: on the CPU, fused kernels for the router, experts and
        # losses, swapped in by exact class (same parameters and function; WORKBENCH_FUSED_CPU=0: off).
        convert_if_enabled(self)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 / nanoGPT init: N(0, 0.02), residual-branch outputs scaled by 1/sqrt(2 n_layers).

        Routers keep their own init (std d^-1/2, unit-scale logits for unit-RMS inputs).
        """
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for module in self.modules():
            if isinstance(module, CausalSelfAttention):
                nn.init.normal_(module.qkv.weight, std=std)
                nn.init.normal_(module.out.weight, std=out_std)
            elif isinstance(module, SwiGLUMLP):
                nn.init.normal_(module.w1.weight, std=std)
                nn.init.normal_(module.w3.weight, std=std)
                nn.init.normal_(module.w2.weight, std=out_std)
            elif isinstance(module, SwiGLUExperts):
                module.reset_parameters(std=std, out_std=out_std)

    def _check_inputs(self, tokens: torch.Tensor, targets: torch.Tensor | None,
                      padding_mask: torch.Tensor | None) -> None:
        """``ValueError`` naming the argument, instead of an error from deep inside torch (an
        embedding index, a router's empty top-k) that names none."""
        if not isinstance(tokens, torch.Tensor):
            raise ValueError(f"tokens must be a (B, S) tensor of token ids, got {type(tokens).__name__}")
        if tokens.dtype not in (torch.long, torch.int32):
            raise ValueError(f"tokens must hold integer token ids (torch.long), got dtype {tokens.dtype}")
        if tokens.dim() != 2:
            hint = "; add a batch dimension with tokens[None]" if tokens.dim() == 1 else ""
            raise ValueError(f"tokens must be 2-D (B, S), got shape {tuple(tokens.shape)}{hint}")
        B, S = tokens.shape
        if B == 0 or S == 0:
            raise ValueError(f"tokens has shape {tuple(tokens.shape)}: an empty batch; need B >= 1 sequences "
                             "of S >= 1 tokens")
        if S > self.cfg.seq_len:
            raise ValueError(f"tokens has sequence length {S}, more than ModelConfig.seq_len={self.cfg.seq_len}")
        V = self.cfg.vocab_size
        lo, hi = (int(v) for v in torch.aminmax(tokens))  # one sync; the loss's .item() syncs anyway
        if lo < 0 or hi >= V:
            raise ValueError(f"tokens holds ids outside [0, vocab_size={V}): min {lo}, max {hi}")
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.shape != tokens.shape:
                got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
                raise ValueError(f"targets must have the shape of tokens {(B, S)}, got {got}")
            if targets.dtype not in (torch.long, torch.int32):
                raise ValueError(f"targets must hold integer token ids (torch.long), got dtype {targets.dtype}")
            real = targets[targets != -100]
            if real.numel():
                lo, hi = (int(v) for v in torch.aminmax(real))
                if lo < 0 or hi >= V:
                    raise ValueError(f"targets holds ids outside [0, vocab_size={V}) (other than -100, ignored): "
                                     f"min {lo}, max {hi}")
        if padding_mask is not None and (not isinstance(padding_mask, torch.Tensor)
                                         or padding_mask.shape != tokens.shape or padding_mask.dtype != torch.bool):
            got = (f"{tuple(padding_mask.shape)} {padding_mask.dtype}" if isinstance(padding_mask, torch.Tensor)
                   else type(padding_mask).__name__)
            raise ValueError(f"padding_mask must be a bool tensor of the shape of tokens {(B, S)}, got {got}")

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None) -> ModelOutput:
        """tokens, targets: (B, S) long; targets equal to -100 are ignored.
        padding_mask: (B, S) bool, True for real tokens; padding is left out of the balancing losses."""
        self._check_inputs(tokens, targets, padding_mask)
        x = self.embed(tokens)
        S = tokens.shape[1]
        routing: list[RoutingInfo] = []
        for block in self.blocks:
            x, info = block(x, self.rope_cos[:S], self.rope_sin[:S], tokens, padding_mask)
            if info is not None:
                routing.append(info)
        logits = self.lm_head(self.norm(x))

        aux_loss = (torch.stack([r.weighted_loss for r in routing]).mean() if routing
                    else logits.new_zeros((), dtype=torch.float32))
        if targets is None:
            return ModelOutput(None, logits, aux_loss, routing)
        lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return ModelOutput(lm_loss + aux_loss, logits, aux_loss, routing, lm_loss)

    @torch.no_grad()  # inference only: the cache buffers hold no graph
    def forward_cached(self, tokens: torch.Tensor, cache: KVCache,
                       padding_mask: torch.Tensor | None = None) -> ModelOutput:
        """One generation step: the logits of ``tokens`` (B, S) given everything ``cache`` holds,
        whose keys and values it then holds too. The prefill passes the (left-padded) prompts and
        their ``padding_mask``; a decode step passes one token per sequence. Equal to ``forward``
        of the whole text at the same positions (tests/inference), in evaluation mode, with the
        MoE layers' dropless dispatch and no balancing losses (``MoELayer.forward(inference=True)``).
        ``workbench.inference.generate`` drives it."""
        cos, sin = cache.begin_step(tokens.shape[1], padding_mask)
        x = self.embed(tokens)
        routing: list[RoutingInfo] = []
        for block, kv in zip(self.blocks, cache.layers, strict=True):
            x, info = block(x, cos, sin, tokens, padding_mask, kv)
            if info is not None:
                routing.append(info)
        logits = self.lm_head(self.norm(x))
        return ModelOutput(None, logits, logits.new_zeros((), dtype=torch.float32), routing)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if b.is_moe]

    @torch.no_grad()
    def finish_optimizer_step(self) -> None:
        """Call right after every ``optimizer.step()``: each MoE layer updates its loss-free
        balancing bias and resets its per-step counters (``MoELayer.finish_step``)."""
        for layer in self.moe_layers():
            layer.finish_step()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
