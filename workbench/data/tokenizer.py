"""Byte-level tokenizer: a token is one UTF-8 byte, so the vocabulary is exactly 256.

Why bytes: no vocabulary file to ship or download, every text in every script is encodable, and
a routing decision can be traced back to an exact byte of the source text. The price is longer
sequences (about 1 token per ASCII character, 2-4 per character of other scripts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

VOCAB_SIZE = 256

# How token_strings shows bytes that do not print as themselves: whitespace gets a visible
# symbol or its escape, every other non-printable or non-ASCII byte its \xNN escape.
_SPECIAL_DISPLAY = {0x20: "␣", 0x0A: "\\n", 0x09: "\\t", 0x0D: "\\r"}


def _display(byte: int) -> str:
    if byte in _SPECIAL_DISPLAY:
        return _SPECIAL_DISPLAY[byte]
    if 0x21 <= byte <= 0x7E:
        return chr(byte)
    return f"\\x{byte:02x}"


_DISPLAY_TABLE = [_display(b) for b in range(VOCAB_SIZE)]


def _as_id_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D, got a tensor of shape {tuple(ids.shape)}")
        ids = ids.tolist()
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
    if bad:
        raise ValueError(f"ids must be byte values in [0, {VOCAB_SIZE}), got {bad[:5]}")
    return ids


class ByteTokenizer:
    """UTF-8 bytes as tokens: ``encode`` / ``decode`` round-trip any Python string exactly."""

    vocab_size = VOCAB_SIZE

    def encode(self, text: str, *, as_tensor: bool = False) -> list[int] | torch.Tensor:
        """``text`` -> its UTF-8 bytes, as a list of ints or a (S,) long tensor."""
        data = text.encode("utf-8")
        if not as_tensor:
            return list(data)
        if not data:  # frombuffer rejects an empty buffer
            return torch.zeros(0, dtype=torch.long)
        # bytearray: frombuffer wants a writable buffer; .long() copies out of it.
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """(S,) byte ids -> text. A sequence cut inside a multi-byte character (as a model's sample
        or a training window can be) decodes with U+FFFD in place of the broken bytes."""
        return bytes(_as_id_list(ids)).decode("utf-8", errors="replace")

    def token_strings(self, ids: Sequence[int] | torch.Tensor) -> list[str]:
        """(S,) byte ids -> one printable label per token, for plot axes and tables.

        Printable ASCII shows as itself, space as ``␣``, newline/tab/CR as ``\\n``/``\\t``/``\\r``,
        and every other byte, including each byte of a multi-byte character, as ``\\xNN``
        (so ``"Ж"`` gives ``["\\xd0", "\\x96"]``): one label per token keeps labels aligned with
        per-token routing data.
        """
        return [_DISPLAY_TABLE[i] for i in _as_id_list(ids)]
