"""Language-model batches: random windows of a byte stream, every token labelled with its domain.

A split's documents are concatenated, grouped by domain in ``corpus.domains`` order, into one
stream of uint8 tokens with a parallel stream of domain ids. Each document is followed by
``SEPARATOR`` (two newline bytes, labelled with that document's domain), so a window that
crosses a document boundary sees a paragraph break rather than two texts glued mid-word.

Training batches are a pure function of ``(seed, step)``: the random window starts come from a
``torch.Generator`` seeded with a hash of both, so resuming at step ``n`` only needs ``n``.
Validation batches are fixed windows spread evenly over each domain's validation region.

Shape legend: B batch, S sequence length (``seq_len``), N tokens in a split's stream.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from workbench.data.corpus import Corpus, Document
from workbench.data.tokenizer import ByteTokenizer

SEPARATOR = b"\n\n"
SAMPLING = ("proportional", "balanced")


class DataTooSmallError(ValueError):
    """The train split holds fewer tokens than one window (``seq_len + 1``).

    A ``ValueError`` naming ``seq_len``; callers that know where the text came from (the
    trainer: ``data`` or ``max_bytes_per_domain``) re-raise it naming that setting instead.
    """

    def __init__(self, message: str, *, train_tokens: int, window: int):
        super().__init__(message)
        self.train_tokens, self.window = train_tokens, window


@dataclass
class Batch:
    """One batch of windows. ``targets`` is ``tokens`` shifted by one (the next byte)."""

    tokens: torch.Tensor  # (B, S) long
    targets: torch.Tensor  # (B, S) long
    domains: torch.Tensor  # (B, S) long: domain id of each token in ``tokens`` (index into LMData.domains)
    starts: torch.Tensor  # (B,) long: stream offset of each window's first token (to map tokens back to documents)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking)
                       for t in (self.tokens, self.targets, self.domains, self.starts)))


@dataclass
class TokenStream:
    """One split as a byte stream with per-token domain ids, kept in memory."""

    tokens: torch.Tensor  # (N,) uint8
    domains: torch.Tensor  # (N,) uint8 (int16 beyond 256 domains)
    doc_starts: torch.Tensor  # (num_docs,) long: offset of each document's first byte
    doc_ids: list[str]  # in stream order
    domain_ranges: torch.Tensor  # (num_domains, 2) long: [start, end) of each domain's region; empty if absent

    @classmethod
    def from_documents(cls, documents: Sequence[Document], domains: Sequence[str]) -> TokenStream:
        """Concatenate ``documents`` grouped by domain (in ``domains`` order), each followed by ``SEPARATOR``."""
        by_domain: dict[str, list[Document]] = {d: [] for d in domains}
        for doc in documents:
            by_domain[doc.domain].append(doc)
        ordered = [doc for d in domains for doc in by_domain[d]]
        encoded = [doc.text.encode("utf-8") + SEPARATOR for doc in ordered]
        lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
        doc_domain = torch.tensor([domains.index(doc.domain) for doc in ordered], dtype=torch.long)
        blob = bytearray(b"".join(encoded))
        # frombuffer shares memory with ``blob`` (no copy); it rejects an empty buffer.
        tokens = torch.frombuffer(blob, dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)
        id_dtype = torch.uint8 if len(domains) <= 256 else torch.int16
        doc_starts = torch.cumsum(lengths, 0) - lengths
        per_domain = torch.zeros(len(domains), dtype=torch.long).index_add_(0, doc_domain, lengths)
        ends = torch.cumsum(per_domain, 0)
        return cls(
            tokens=tokens,
            domains=torch.repeat_interleave(doc_domain, lengths).to(id_dtype),
            doc_starts=doc_starts,
            doc_ids=[doc.id for doc in ordered],
            domain_ranges=torch.stack([ends - per_domain, ends], dim=1),
        )

    def __len__(self) -> int:
        return self.tokens.numel()

    def document_index(self, positions: torch.Tensor) -> torch.Tensor:
        """Index (into ``doc_ids``) of the document holding each stream position; any shape."""
        return torch.searchsorted(self.doc_starts, positions, right=True) - 1

    def windows(self, starts_B: torch.Tensor, seq_len: int) -> Batch:
        """The windows of ``seq_len + 1`` tokens beginning at ``starts_B``: one gather, no Python loop."""
        # shape: (B, S+1)
        idx = starts_B[:, None] + torch.arange(seq_len + 1)
        window = self.tokens[idx].long()
        return Batch(window[:, :-1].contiguous(), window[:, 1:].contiguous(), self.domains[idx[:, :-1]].long(),
                     starts_B)


def _step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed from (seed, step); hashing makes neighbouring steps unrelated."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class LMData:
    """Training and validation batches over a corpus: ``get_batch(step)`` and ``val_batches()``.

    ``domain_weights`` chooses where training windows start:
    ``"proportional"`` (default) uniform over the train stream, so a domain's share of windows is
    its share of bytes; ``"balanced"`` a domain chosen uniformly, then a window inside it; or a
    mapping ``{domain: weight}`` (domains left out get weight 0). With weights, windows stay
    inside one domain's region; proportional windows may straddle a domain boundary (each token
    still carries its own domain id).

    ``train_domains`` restricts training windows to those domains (the others get weight 0, and
    the weights above are shared out among the ones named: proportional to their text); the
    validation batches still cover every domain, so what training on some domains does to the
    others can be measured (forgetting, in a fine-tuning on a domain shift).
    """

    def __init__(self, corpus: Corpus, *, seq_len: int = 128, batch_size: int = 16, seed: int = 0,
                 val_fraction: float = 0.05, val_windows_per_domain: int = 16,
                 domain_weights: str | Mapping[str, float] = "proportional",
                 train_domains: Sequence[str] | None = None):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name}={value!r} is invalid: must be >= 1")
        if val_windows_per_domain < 0:
            raise ValueError(f"val_windows_per_domain={val_windows_per_domain!r} is invalid: must be >= 0")
        self.corpus = corpus
        self.domains = list(corpus.domains)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.val_windows_per_domain, self.val_fraction = val_windows_per_domain, val_fraction
        self.tokenizer = ByteTokenizer()
        train, val = corpus.split(val_fraction)
        self.train = TokenStream.from_documents(train.documents, self.domains)
        self.val = TokenStream.from_documents(val.documents, self.domains)
        if len(self.train) < seq_len + 1:
            raise DataTooSmallError(f"seq_len={seq_len} is invalid: the train split has only {len(self.train)} "
                                    f"tokens, fewer than one window of seq_len + 1 = {seq_len + 1}",
                                    train_tokens=len(self.train), window=seq_len + 1)
        self.domain_weights = domain_weights
        self.train_domains = self._check_train_domains(train_domains)
        self._weights = self._resolve_weights(domain_weights)  # (num_domains,) float64, or None: proportional
        self._val_starts = {d: self._val_window_starts(i) for i, d in enumerate(self.domains)}
        self.val_missing = self._val_missing_reasons()
        if self.val_missing and val_fraction > 0 and val_windows_per_domain > 0:
            # each domain's own reason, the one the end-of-run summary gives for its missing loss
            why = "; ".join(f"{d}: {reason}" for d, reason in self.val_missing.items())
            warnings.warn(f"no validation window of {seq_len + 1} tokens for domain(s) {list(self.val_missing)}, "
                          f"left out of val_batches() ({why})", stacklevel=2)

    def _val_missing_reasons(self) -> dict[str, str]:
        """Why each domain without a validation window has none (domain -> one clause)."""
        reasons: dict[str, str] = {}
        val_sizes = self._region_sizes(self.val).tolist()
        val_docs = torch.bincount(self.val.domains[self.val.doc_starts].long(), minlength=len(self.domains)).tolist()
        for i, d in enumerate(self.domains):
            if self._val_starts[d].numel() > 0:
                continue
            if self.val_windows_per_domain == 0:
                reasons[d] = "no validation windows were asked for (val_windows_per_domain=0)"
            elif self.val_fraction == 0:
                reasons[d] = "val_fraction=0 holds out no validation text"
            elif val_docs[i] == 0:
                reasons[d] = ("no document was held out for validation (a domain needs at least 2 documents "
                              "to keep one on each side of the split)")
            else:
                reasons[d] = (f"its validation text has {val_sizes[i]} tokens, fewer than one window of "
                              f"seq_len + 1 = {self.seq_len + 1}")
        return reasons

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _region_sizes(self, stream: TokenStream) -> torch.Tensor:
        return stream.domain_ranges[:, 1] - stream.domain_ranges[:, 0]

    def _check_train_domains(self, train_domains: Sequence[str] | None) -> list[str] | None:
        """The domains named, in the corpus's order; ``ValueError`` listing the known ones for an unknown one."""
        if train_domains is None:
            return None
        if isinstance(train_domains, str):
            train_domains = [train_domains]
        unknown = [d for d in train_domains if d not in self.domains]
        if unknown or not train_domains:
            what = f"has unknown domain(s) {unknown}" if unknown else "is empty"
            raise ValueError(f"train_domains {what}: known domains are {', '.join(self.domains)}")
        return [d for d in self.domains if d in train_domains]

    def _resolve_weights(self, spec: str | Mapping[str, float]) -> torch.Tensor | None:
        if isinstance(spec, str):
            if spec not in SAMPLING:
                raise ValueError(f"domain_weights={spec!r} is invalid: allowed values are "
                                 f"{', '.join(SAMPLING)} or a mapping {{domain: weight}}")
            if spec == "proportional" and self.train_domains is None:
                return None
            sizes = self._region_sizes(self.train).tolist()
            spec = {d: float(sizes[i]) if spec == "proportional" else 1.0 for i, d in enumerate(self.domains)}
        unknown = sorted(set(spec) - set(self.domains))
        if unknown:
            raise ValueError(f"domain_weights has unknown domain(s) {unknown}: known domains are "
                             + ", ".join(self.domains))
        weights = torch.tensor([float(spec.get(d, 0.0)) for d in self.domains], dtype=torch.float64)
        if (weights < 0).any() or not torch.isfinite(weights).all() or weights.sum() <= 0:
            raise ValueError(f"domain_weights={dict(spec)!r} is invalid: weights must be finite, >= 0, "
                             "with a positive sum")
        source = "domain_weights"
        if self.train_domains is not None:
            weights *= torch.tensor([d in self.train_domains for d in self.domains], dtype=torch.float64)
            source = "train_domains"
            if weights.sum() <= 0:
                raise ValueError(f"train_domains={self.train_domains} is invalid: domain_weights={dict(spec)!r} "
                                 "gives none of them any weight")
        sizes = self._region_sizes(self.train)
        too_small = [d for d, w, n in zip(self.domains, weights, sizes, strict=True) if w > 0 and n < self.seq_len + 1]
        if too_small:
            raise ValueError(f"{source} gives weight to domain(s) {too_small} whose train split is shorter "
                             f"than one window of seq_len + 1 = {self.seq_len + 1} tokens")
        return weights / weights.sum()

    def get_batch(self, step: int, batch_size: int | None = None) -> Batch:
        """Training batch number ``step``: the same tensors for the same (seed, step), whatever ran before.

        Returns CPU tensors: ``tokens``, ``targets``, ``domains`` (B, S) long and ``starts`` (B,).
        """
        if step < 0:
            raise ValueError(f"step={step!r} is invalid: must be >= 0")
        B, S = batch_size or self.batch_size, self.seq_len
        g = torch.Generator().manual_seed(_step_seed(self.seed, step))
        if self._weights is None:
            starts_B = torch.randint(0, len(self.train) - S, (B,), generator=g)
        else:
            domain_B = torch.multinomial(self._weights, B, replacement=True, generator=g)
            lo_B = self.train.domain_ranges[domain_B, 0]
            n_starts_B = self._region_sizes(self.train)[domain_B] - S  # windows that fit inside the region
            # float64 uniforms scaled to the region: floor(u * n) is uniform over n starts
            starts_B = lo_B + (torch.rand(B, generator=g, dtype=torch.float64) * n_starts_B).long()
        return self.train.windows(starts_B, S)

    def _val_window_starts(self, domain_id: int) -> torch.Tensor:
        """Up to ``val_windows_per_domain`` starts, evenly spread over the domain's validation
        region and at least ``seq_len`` apart (windows share at most their edge token)."""
        lo, hi = self.val.domain_ranges[domain_id].tolist()
        S, length = self.seq_len, hi - lo
        n = min(self.val_windows_per_domain, max(0, (length - 1) // S))
        if n <= 1:
            return torch.full((n,), lo, dtype=torch.long)
        # integer floor keeps consecutive starts >= S apart: the spacing (length-S-1)/(n-1) is >= S
        return lo + torch.arange(n) * (length - S - 1) // (n - 1)

    def val_batches(self, batch_size: int | None = None) -> dict[str, list[Batch]]:
        """Fixed validation batches per domain (domains without validation text are left out).

        Each window lies inside one domain's validation region, so a batch's loss is that domain's.
        """
        B = batch_size or self.batch_size
        return {d: [self.val.windows(starts[i:i + B], self.seq_len) for i in range(0, starts.numel(), B)]
                for d, starts in self._val_starts.items() if starts.numel() > 0}

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per domain: documents and tokens in each split, validation windows, and the share of
        training windows that start in the domain."""
        train_sizes, val_sizes = self._region_sizes(self.train), self._region_sizes(self.val)
        if self._weights is None:
            share = train_sizes.double() / max(1, len(self.train))
        else:
            share = self._weights
        train_docs = torch.bincount(self.train.domains[self.train.doc_starts].long(), minlength=len(self.domains))
        val_docs = torch.bincount(self.val.domains[self.val.doc_starts].long(), minlength=len(self.domains))
        return {d: {"train_documents": int(train_docs[i]), "train_tokens": int(train_sizes[i]),
                    "val_documents": int(val_docs[i]), "val_tokens": int(val_sizes[i]),
                    "val_windows": int(self._val_starts[d].numel()), "train_share": round(float(share[i]), 4)}
                for i, d in enumerate(self.domains)}
