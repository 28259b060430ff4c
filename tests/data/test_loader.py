"""Batches: a pure function of (seed, step), shifted targets, and domain ids true to the source text."""

from __future__ import annotations

import re

import pytest
import torch

from workbench.data import SEPARATOR, LMData

S, B = 64, 8


@pytest.fixture(scope="module")
def data(small_corpus):
    return LMData(small_corpus, seq_len=S, batch_size=B, seed=3, val_fraction=0.1, val_windows_per_domain=5)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in ((a.tokens, b.tokens), (a.targets, b.targets), (a.domains, b.domains)))


def test_shapes_and_dtypes(data):
    batch = data.get_batch(0)
    for t in (batch.tokens, batch.targets, batch.domains):
        assert t.shape == (B, S) and t.dtype == torch.long
    assert batch.tokens.max() < data.vocab_size and batch.domains.max() < len(data.domains)


def test_batches_are_a_pure_function_of_seed_and_step(data, small_corpus):
    first = [data.get_batch(step) for step in range(6)]
    torch.manual_seed(1234)  # the global RNG plays no part
    torch.rand(10)
    fresh = LMData(small_corpus, seq_len=S, batch_size=B, seed=3, val_fraction=0.1)
    for step in (5, 2, 0, 4, 1, 3):  # out of order, on a new instance
        assert _same(fresh.get_batch(step), first[step])
    assert not any(_same(first[i], first[j]) for i in range(6) for j in range(i))
    other_seed = LMData(small_corpus, seq_len=S, batch_size=B, seed=4, val_fraction=0.1)
    assert not _same(other_seed.get_batch(0), first[0])


def test_targets_are_the_next_tokens(data):
    batch = data.get_batch(7)
    assert torch.equal(batch.tokens[:, 1:], batch.targets[:, :-1])
    offsets = batch.starts[:, None] + torch.arange(S)
    assert torch.equal(batch.targets, data.train.tokens[offsets + 1].long())


def _check_against_documents(stream, batch, corpus):
    """Every token equals the byte of the document it came from, and carries that document's domain."""
    texts = {d.id: d.text.encode("utf-8") + SEPARATOR for d in corpus.documents}
    domain_of = {d.id: corpus.domains.index(d.domain) for d in corpus.documents}
    positions = batch.starts[:, None] + torch.arange(batch.tokens.shape[1])
    doc_index = stream.document_index(positions)
    for row in range(positions.shape[0]):
        for col in range(positions.shape[1]):
            i = int(doc_index[row, col])
            doc_id = stream.doc_ids[i]
            offset = int(positions[row, col] - stream.doc_starts[i])
            assert texts[doc_id][offset] == int(batch.tokens[row, col])
            assert domain_of[doc_id] == int(batch.domains[row, col])


def test_domain_ids_match_the_source_documents(data, small_corpus):
    batch = data.get_batch(11)
    _check_against_documents(data.train, batch, small_corpus)
    # random windows rarely touch a domain boundary: check windows straddling each one too
    boundaries = data.train.domain_ranges[1:, 0]
    _check_against_documents(data.train, data.train.windows(boundaries - S // 2, S), small_corpus)
    train_ids = {d.id for d in small_corpus.split(0.1)[0].documents}
    assert set(data.train.doc_ids) == train_ids  # the train stream holds exactly the train documents


def test_validation_batches_are_fixed_pure_and_held_out(data, small_corpus):
    val = data.val_batches()
    assert list(val) == small_corpus.domains
    again = LMData(small_corpus, seq_len=S, batch_size=B, seed=99, val_fraction=0.1,
                   val_windows_per_domain=5).val_batches()
    train_ids = set(data.train.doc_ids)
    for domain, batches in val.items():
        windows = sum(b.tokens.shape[0] for b in batches)
        assert 1 <= windows <= 5
        assert all(_same(x, y) for x, y in zip(batches, again[domain], strict=True))  # seed plays no part
        for batch in batches:
            assert (batch.domains == small_corpus.domains.index(domain)).all()
            _check_against_documents(data.val, batch, small_corpus)
            docs = {data.val.doc_ids[i] for i in data.val.document_index(batch.starts).tolist()}
            assert not docs & train_ids


def test_balanced_and_weighted_sampling(small_corpus):
    balanced = LMData(small_corpus, seq_len=S, batch_size=256, domain_weights="balanced")
    first_domain = torch.cat([balanced.get_batch(step).domains[:, 0] for step in range(8)])
    share = torch.bincount(first_domain, minlength=4).double() / first_domain.numel()
    assert (share - 0.25).abs().max() < 0.05
    for step in range(4):  # weighted windows stay inside one domain's region
        d = balanced.get_batch(step).domains
        assert (d == d[:, :1]).all()
    math_only = LMData(small_corpus, seq_len=S, batch_size=B, domain_weights={"math": 1.0})
    assert (math_only.get_batch(0).domains == small_corpus.domains.index("math")).all()


def test_invalid_options_name_the_field(small_corpus):
    with pytest.raises(ValueError, match="domain_weights='uniform' .*proportional, balanced"):
        LMData(small_corpus, domain_weights="uniform")
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['poetry'\].*code, prose, math, records"):
        LMData(small_corpus, domain_weights={"poetry": 1.0})
    with pytest.raises(ValueError, match="seq_len=0"):
        LMData(small_corpus, seq_len=0)
    with pytest.raises(ValueError, match="step=-1"):
        LMData(small_corpus, seq_len=S).get_batch(-1)


def test_no_validation_split(small_corpus):
    data = LMData(small_corpus, seq_len=S, batch_size=B, val_fraction=0.0)
    assert data.val_batches() == {} and len(data.val) == 0
    assert set(data.train.doc_ids) == {d.id for d in small_corpus.documents}


def test_missing_validation_windows_come_with_their_reason(tmp_path):
    from workbench.data import Corpus, Document

    docs = [Document("big/0", "big", "lorem ipsum " * 200, "t"), Document("big/1", "big", "dolor sit " * 200, "t"),
            Document("one/0", "one", "a single document " * 50, "t"),
            Document("short/0", "short", "x" * 10, "t"), Document("short/1", "short", "y" * 10, "t")]
    corpus = Corpus(["big", "one", "short"], docs)
    with pytest.warns(UserWarning, match=r"no validation window of 33 tokens for domain\(s\) \['one', 'short'\]"):
        data = LMData(corpus, seq_len=32, batch_size=2, val_fraction=0.3, val_windows_per_domain=2)
    assert set(data.val_batches()) == {"big"}
    assert set(data.val_missing) == {"one", "short"}
    assert "no document was held out" in data.val_missing["one"]
    assert re.fullmatch(r"its validation text has \d+ tokens, fewer than one window of seq_len \+ 1 = 33",
                        data.val_missing["short"])
    assert LMData(corpus, seq_len=32, val_fraction=0.0).val_missing["big"] == \
        "val_fraction=0 holds out no validation text"


def test_too_little_text_is_a_value_error_that_carries_the_counts(small_corpus):
    from workbench.data import DataTooSmallError

    tiny = small_corpus.subset(["math"])
    with pytest.raises(DataTooSmallError, match=r"seq_len=10000000 is invalid: the train split has only") as err:
        LMData(tiny, seq_len=10_000_000)
    assert isinstance(err.value, ValueError) and err.value.window == 10_000_001 and err.value.train_tokens > 0
