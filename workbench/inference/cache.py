"""``KVCache``: the keys and values of every attention layer, preallocated, for token-by-token decode.

A decode step feeds one new token per sequence; attention needs the keys and values of all earlier
tokens, which the cache keeps instead of recomputing the whole prefix at every step. What a step
does, in order (``MoELM.forward_cached``):

    cache.begin_step(S, padding_mask_BS)    positions of the S new tokens, the slots they go to,
                                            the attention mask over every slot (once, for all layers)
    layer.store(k, v)                       each layer writes its keys and values into those slots
    sdpa(q, keys, values, attn_mask)        and attends over all W slots of its cache

Static shapes: the buffers are allocated once, ``(B, h, W, d)`` per layer, and a step always
attends over all W slots with a mask, never over a slice of growing length. The same code then
runs on CPU, CUDA and NPU and under ``torch.compile`` without a new shape per step, and a step
allocates nothing the size of the cache.

Positions: a batch of prompts of different lengths is left-padded. A padding slot holds position
-1, which the mask never attends to, and a sequence's real tokens get positions 0, 1, 2, ... from
its first real token, so its rotary angles (and hence its logits) are those of the sequence alone.

Sliding window (``window=W``): the cache becomes a ring of W slots; a token attends to the W most
recent positions of its sequence (Mistral 7B's sliding-window attention, Jiang et al. 2023) and
generation can go past the trained context ``seq_len``. Keys are stored already rotated, and RoPE
scores depend only on the distance between positions (Su et al. 2021), so a query never sees a
distance of ``W`` or more: W <= ``seq_len`` keeps every distance within what the model was
trained on. Beyond ``seq_len`` it is not the model's own function any more (each kept key was
computed from its own window): a documented approximation, off by default.

Shape legend: L layers, B sequences, h heads, W slots, d head dim, S new tokens of a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.validation import check


@dataclass
class LayerKV:
    """One attention layer's view of the cache: its two buffers and the step it writes in."""

    keys_BhWd: torch.Tensor
    values_BhWd: torch.Tensor
    cache: KVCache

    def store(self, k_BhSd: torch.Tensor, v_BhSd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys and values into their slots; returns the whole buffers to attend over."""
        slots_S = self.cache.slots_S
        self.keys_BhWd.index_copy_(2, slots_S, k_BhSd.to(self.keys_BhWd.dtype))
        self.values_BhWd.index_copy_(2, slots_S, v_BhSd.to(self.values_BhWd.dtype))
        return self.keys_BhWd, self.values_BhWd


class KVCache:
    """Keys and values of ``batch_size`` sequences for every layer of ``model``, W slots each.

    ``slots``: how many tokens (padding included) a sequence can hold, prompt and generated
    together, at most ``model.cfg.seq_len``; with ``window`` it is the window, and generation can
    run past it (see the module docstring). ``max_positions``: the largest position the rotary
    tables must cover (``slots`` without a window).
    """

    def __init__(self, model: torch.nn.Module, batch_size: int, slots: int, *, window: int | None = None,
                 max_positions: int | None = None):
        from workbench.model import rotary_tables

        cfg = model.cfg
        check(isinstance(batch_size, int) and batch_size >= 1, "batch_size", "must be an integer >= 1", batch_size)
        if window is None:
            check(isinstance(slots, int) and 1 <= slots <= cfg.seq_len, "slots",
                  f"must be between 1 and the model's context seq_len={cfg.seq_len} (prompt and generated tokens "
                  "together); a longer generation needs a sliding window", slots)
            max_positions = slots
        else:
            check(isinstance(window, int) and 1 <= window <= cfg.seq_len, "window",
                  f"must be between 1 and the model's context seq_len={cfg.seq_len}", window)
            slots = window
            max_positions = max(max_positions or 0, window)
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        self.batch_size, self.slots, self.window = batch_size, slots, window
        shape = (cfg.n_layers, batch_size, cfg.n_heads, slots, cfg.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.layers = [LayerKV(self.keys[i], self.values[i], self) for i in range(cfg.n_layers)]
        # absolute position of the token in each slot; -1: empty, or a padding token
        self.key_pos_BW = torch.full((batch_size, slots), -1, dtype=torch.long, device=device)
        self.next_pos_B = torch.zeros(batch_size, dtype=torch.long, device=device)  # next real token's position
        # tokens written per sequence so far, padding included: a host int for the bounds check (no
        # device sync) and the same count as a tensor for the slot arithmetic (so that a compiled step
        # does not specialise on its value and recompile at every step)
        self.written = 0
        self.written_t = torch.zeros((), dtype=torch.long, device=device)
        cos, sin = rotary_tables(max_positions, cfg.head_dim, cfg.rope_base)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)
        self._arange = torch.arange(cfg.seq_len, device=device)
        # set by begin_step, read by every layer of the step
        self.slots_S: torch.Tensor | None = None
        self.mask_B1SW: torch.Tensor | None = None

    @property
    def free_slots(self) -> int | None:
        """Tokens a sequence can still take; None with a window (it never fills)."""
        return None if self.window else self.slots - self.written

    def begin_step(self, num_tokens: int, padding_mask_BS: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Place the step's ``num_tokens`` new tokens per sequence: their positions, slots and the
        attention mask of every layer. Returns the rotary (cos, sin) at their positions, (B, 1, S, d/2).

        ``padding_mask_BS``: True for a real token; a False (padding) token gets position -1 and is
        never attended to. Only the prefill should hold padding, on the left.
        """
        S, W = num_tokens, self.slots
        self._reserve(S)
        if padding_mask_BS is None:
            positions_BS = self.next_pos_B[:, None] + self._arange[:S]
            self.next_pos_B += S
        else:
            real_BS = padding_mask_BS.to(torch.bool)
            counts_BS = real_BS.long().cumsum(1)
            positions_BS = torch.where(real_BS, self.next_pos_B[:, None] + counts_BS - 1, -1)
            self.next_pos_B += counts_BS[:, -1]
        self.slots_S = (self._arange[:S] + self.written_t) % W
        self.key_pos_BW.index_copy_(1, self.slots_S, positions_BS)
        self.written_t += S

        key_pos_B1W = self.key_pos_BW[:, None, :]
        query_pos_BS1 = positions_BS[:, :, None]
        mask_BSW = (key_pos_B1W >= 0) & (key_pos_B1W <= query_pos_BS1)
        if self.window is not None:
            mask_BSW &= key_pos_B1W > query_pos_BS1 - self.window
        # a padding query (position -1) has no key to attend to, and an all-masked row is NaN in
        # scaled_dot_product_attention: let it attend to every slot; its output is never read
        mask_BSW |= ~mask_BSW.any(dim=-1, keepdim=True)
        self.mask_B1SW = mask_BSW[:, None]
        index_BS = positions_BS.clamp(min=0)
        return self.rope_cos[index_BS][:, None], self.rope_sin[index_BS][:, None]

    @torch.compiler.disable  # host bookkeeping: run as Python, not traced into a compiled step
    def _reserve(self, S: int) -> None:
        """Check that ``S`` more tokens fit, and count them."""
        W = self.slots
        if self.window is None:
            check(self.written + S <= W, "max_new_tokens", f"the sequence would hold {self.written + S} tokens, "
                  f"more than the cache's {W} slots (the model's context is seq_len; choose a sliding window to "
                  "generate past it)", S)
        else:
            # a step of several tokens that wraps would overwrite keys its own later queries still read
            check(S == 1 or self.written + S <= W, "prompt length",
                  f"a chunk of {S} tokens does not fit the window of {W} after {self.written} tokens", S)
        self.written += S
