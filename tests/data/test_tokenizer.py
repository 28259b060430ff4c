"""The byte tokenizer round-trips any text, and its plot labels are one printable string per token."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from workbench.data import ByteTokenizer

tok = ByteTokenizer()


@given(st.text())
def test_round_trip_any_unicode(text):
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    as_tensor = tok.encode(text, as_tensor=True)
    assert as_tensor.dtype == torch.long and as_tensor.tolist() == ids
    assert tok.decode(as_tensor) == text


@given(st.text(alphabet=st.characters(min_codepoint=0x80, codec="utf-8"), min_size=1))
def test_cut_multibyte_sequence_decodes_with_replacement(text):
    ids = tok.encode(text)[:-1]  # the last character is 2-4 bytes: drop its final byte
    decoded = tok.decode(ids)
    assert decoded.endswith("\ufffd")
    assert decoded[:-1] == text[:-1]


def test_token_strings_one_printable_distinct_label_per_byte():
    ids = list(range(256))
    labels = tok.token_strings(ids)
    assert len(labels) == 256
    assert all(label.isprintable() and label for label in labels)
    assert len(set(labels)) == 256  # distinct bytes never share a label
    for b in range(0x21, 0x7F):  # printable ASCII other than space shows as itself
        assert labels[b] == chr(b)


@given(st.text())
def test_token_strings_align_with_tokens(text):
    ids = tok.encode(text, as_tensor=True)
    assert len(tok.token_strings(ids)) == ids.numel()


def test_decode_rejects_non_byte_ids():
    with pytest.raises(ValueError, match="256"):
        tok.decode([65, 256])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 2, dtype=torch.long))
