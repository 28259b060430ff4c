"""Documents with a domain label, the deterministic train/validation split, and user data.

A ``Corpus`` is a list of ``Document``s plus the ordered list of domain names; a domain's id
(what ``LMData`` puts in ``Batch.domains``) is its index in ``corpus.domains``. The built-in
corpus lives in ``builtin.py``; ``load_text_corpus`` reads the user's own files.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

USER_LICENCE = "user-supplied: check the licence of your files"


@dataclass(frozen=True)
class Document:
    """One unit of the split: a document is wholly in train or wholly in validation.

    ``id`` is stable across runs and machines (domain + path, topic name, block start...),
    because the split hashes it. ``source`` says where the text came from (a file path, a topic).
    """

    id: str
    domain: str
    text: str
    source: str

    @property
    def num_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclass(frozen=True)
class DomainInfo:
    """Provenance of one domain, for the data card: where its text comes from and its licence."""

    source: str
    licence: str


@dataclass
class Corpus:
    """Labelled documents. ``domains`` fixes the domain ids; documents keep their given order."""

    domains: list[str]
    documents: list[Document]
    info: dict[str, DomainInfo] = field(default_factory=dict)  # per domain; missing ones show as unknown
    metadata: dict[str, Any] = field(default_factory=dict)  # build parameters, cache file, Python version

    def __post_init__(self) -> None:
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains={self.domains!r} is invalid: domain names must be unique")
        known = set(self.domains)
        seen: set[str] = set()
        for doc in self.documents:
            if doc.domain not in known:
                raise ValueError(f"document {doc.id!r} has domain={doc.domain!r}: allowed values are "
                                 + ", ".join(self.domains))
            if doc.id in seen:
                raise ValueError(f"document id {doc.id!r} appears twice: ids must be unique (the split hashes them)")
            seen.add(doc.id)

    def __len__(self) -> int:
        return len(self.documents)

    def domain_id(self, domain: str) -> int:
        if domain not in self.domains:
            raise ValueError(f"domain={domain!r} is invalid: allowed values are {', '.join(self.domains)}")
        return self.domains.index(domain)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per domain: ``documents``, ``bytes`` (UTF-8), ``source`` and ``licence``, in domain order."""
        out: dict[str, dict[str, Any]] = {}
        for d in self.domains:
            info = self.info.get(d, DomainInfo("unknown", "unknown"))
            out[d] = {"documents": 0, "bytes": 0, "source": info.source, "licence": info.licence}
        for doc in self.documents:
            out[doc.domain]["documents"] += 1
            out[doc.domain]["bytes"] += doc.num_bytes
        return out

    def subset(self, domains: Iterable[str]) -> Corpus:
        """Only the given domains, in the given order (their ids are renumbered accordingly)."""
        domains = list(domains)
        for d in domains:
            self.domain_id(d)  # validates the name
        keep = set(domains)
        return Corpus(domains, [doc for doc in self.documents if doc.domain in keep],
                      {d: i for d, i in self.info.items() if d in keep}, dict(self.metadata))

    def split(self, val_fraction: float = 0.05) -> tuple[Corpus, Corpus]:
        """Deterministic split by document: ``(train, val)``, both keeping all of ``domains``.

        A document goes to validation when ``split_score(doc.id) < val_fraction``: the score is
        a hash of the id (blake2b, not Python's per-process randomised ``hash()``), so the split
        is the same on every run and machine and a document is never on both sides. So that
        every domain can report a validation loss, a domain with at least two documents keeps
        at least one on each side: if the hash puts none in validation, its lowest-scoring
        document moves there (and, symmetrically, the highest-scoring one back to train). A
        domain with a single document keeps it in train.
        """
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction!r} is invalid: must be in [0, 1)")
        scores = {doc.id: split_score(doc.id) for doc in self.documents}
        val_ids: set[str] = set()
        for domain in self.domains:
            ids = sorted((doc.id for doc in self.documents if doc.domain == domain), key=scores.__getitem__)
            chosen = {i for i in ids if scores[i] < val_fraction}
            if val_fraction > 0 and len(ids) >= 2:
                if not chosen:
                    chosen = {ids[0]}
                elif len(chosen) == len(ids):
                    chosen.discard(ids[-1])
            val_ids |= chosen
        train = [doc for doc in self.documents if doc.id not in val_ids]
        val = [doc for doc in self.documents if doc.id in val_ids]
        meta = {**self.metadata, "val_fraction": val_fraction}
        return (Corpus(list(self.domains), train, dict(self.info), {**meta, "split": "train"}),
                Corpus(list(self.domains), val, dict(self.info), {**meta, "split": "val"}))


def split_score(doc_id: str) -> float:
    """A stable pseudo-random number in [0, 1) for a document id (the first 8 bytes of its blake2b)."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# --- user data -------------------------------------------------------------------------------


def chunk_text(text: str, max_bytes: int | None) -> list[str]:
    """Cut ``text`` at line ends into pieces of at most ``max_bytes`` UTF-8 bytes (a single longer
    line stays whole). ``None`` keeps the text in one piece."""
    if max_bytes is None or len(text.encode("utf-8")) <= max_bytes:
        return [text]
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if current and size + n > max_bytes:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += n
    if current:
        pieces.append("".join(current))
    return pieces


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is not usable text (binary, not UTF-8, or blank)."""
    data = path.read_bytes()
    if b"\x00" in data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.strip() else None


def _utf8_name(name: str) -> bool:
    """A file name that is text: Python keeps undecodable bytes of a name as lone surrogates."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(path: Path) -> str:
    """A path for a message, undecodable bytes as \\xNN (printing the raw name would fail)."""
    return "'" + str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") + "'"


def _documents_from_file(path: Path, domain: str, rel: str, max_doc_bytes: int | None) -> list[Document]:
    text = _read_text(path)
    if text is None:
        return []
    pieces = chunk_text(text, max_doc_bytes)
    if len(pieces) == 1:
        return [Document(f"{domain}/{rel}", domain, text, str(path))]
    return [Document(f"{domain}/{rel}#{k:05d}", domain, piece, f"{path}#{k}") for k, piece in enumerate(pieces)]


def load_text_corpus(path: str | Path, *, max_doc_bytes: int | None = 8192) -> Corpus:
    """The user's own text as a ``Corpus``.

    - a file: one domain named after the file stem (``notes.txt`` -> ``notes``);
    - a folder: each subfolder is a domain named after it, and every UTF-8 text file under it
      (recursively; hidden files and folders, binary and non-UTF-8 files skipped) is a document
      of that domain. Files directly in the folder are ignored.

    Files longer than ``max_doc_bytes`` are cut at line ends into several documents, so that a
    single file can still be split into train and validation; ``None`` keeps whole files.
    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` when nothing usable is found.
    """
    if isinstance(path, str) and not path.strip():  # Path("") is the current directory: never meant
        raise ValueError(f"path={path!r} is invalid: give a text file or a folder of domain subfolders")
    root = Path(path).expanduser()
    if max_doc_bytes is not None and max_doc_bytes < 1:
        raise ValueError(f"max_doc_bytes={max_doc_bytes!r} is invalid: must be >= 1 or None")
    if not root.exists():
        raise FileNotFoundError(f"data path {str(root)!r} does not exist: expected a text file or a folder "
                                "whose subfolders are named after the domains")
    if not root.is_file() and not root.is_dir():  # a FIFO, a socket, a device: reading one may block
        raise ValueError(f"data={str(root)!r} is invalid: it is neither a regular file nor a folder (a FIFO, socket "
                         "or device); give a text file or a folder of domain subfolders")
    if root.is_file():
        domain = root.stem
        docs = _documents_from_file(root, domain, root.name, max_doc_bytes)
        if not docs:
            raise ValueError(f"data file {str(root)!r} is not usable text: it is empty, binary or not UTF-8")
        return Corpus([domain], docs, {domain: DomainInfo(str(root.resolve()), USER_LICENCE)},
                      {"path": str(root.resolve())})

    domains: list[str] = []
    docs = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not _utf8_name(sub.name):
            warnings.warn(f"data folder {_shown(sub)} skipped: its name is not valid UTF-8 (a domain name must be "
                          "text; rename it)", stacklevel=2)
            continue
        files = sorted(f for f in sub.rglob("*")
                       if f.is_file() and not any(part.startswith(".") for part in f.relative_to(sub).parts))
        for f in [f for f in files if not _utf8_name(str(f.relative_to(sub)))]:
            # the name becomes the document's id, which is hashed as UTF-8 for the split
            warnings.warn(f"data file {_shown(f)} skipped: its name is not valid UTF-8 (rename it)", stacklevel=2)
            files.remove(f)
        found = [d for f in files
                 for d in _documents_from_file(f, sub.name, f.relative_to(sub).as_posix(), max_doc_bytes)]
        if found:
            domains.append(sub.name)
            docs.extend(found)
        else:
            warnings.warn(f"data folder {str(sub)!r} holds no usable UTF-8 text files; domain {sub.name!r} skipped",
                          stacklevel=2)
    if not docs:
        loose = [p.name for p in root.iterdir() if p.is_file()]
        hint = (f" (the {len(loose)} file(s) directly in it are ignored: put them in a subfolder named after "
                "their domain)" if loose else "")
        raise ValueError(f"data folder {str(root)!r} has no usable text files: expected subfolders named after "
                         f"the domains, each holding UTF-8 text files{hint}")
    return Corpus(domains, docs, {d: DomainInfo(str((root / d).resolve()), USER_LICENCE) for d in domains},
                  {"path": str(root.resolve())})
