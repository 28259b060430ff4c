"""A fingerprint of the text a run trains on, so that a resume can tell it is the same data.

Batches are a pure function of (seed, step) *and the corpus*: a resume on edited files would
continue bit for bit from the checkpoint, then train on other text. The fingerprint is taken
from the corpus as loaded (what training actually reads), and recorded in ``run.json``::

    {"source": "files", "path": "/abs/data", "files": {"words/doc0.txt": {"bytes": 2400, "sha256": "..."}}}
    {"source": "built-in", "max_bytes_per_domain": 2000000, "python": "3.11.4", "unicode": "15.0.0",
     "domains": {"code": {"bytes": 2000000, "sha256": "..."}, ...}}

For the user's files each entry is the file's size and the SHA-256 of its bytes (``sha256sum``
gives the same), for every file the corpus holds (binary and other skipped files do not count:
they are not trained on). The built-in corpus is summed up per domain, with what its content
depends on (the Python and Unicode versions).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from workbench.data.corpus import Corpus

# load_text_corpus cuts a long file into documents "<domain>/<file>#00001", ...: one file again
_CHUNK = re.compile(r"#\d{5}$")


def corpus_fingerprint(corpus: Corpus, *, builtin: bool) -> dict[str, Any]:
    """The fingerprint of ``corpus``: per file for the user's data, per domain for the built-in corpus."""
    if builtin:
        domains: dict[str, Any] = {}
        for domain in corpus.domains:
            h, size = hashlib.sha256(), 0
            for doc in corpus.documents:
                if doc.domain == domain:
                    text = doc.text.encode("utf-8")
                    h.update(f"{doc.id}\0{len(text)}\0".encode())
                    h.update(text)
                    size += len(text)
            domains[domain] = {"bytes": size, "sha256": h.hexdigest()}
        meta = corpus.metadata
        return {"source": "built-in", "max_bytes_per_domain": meta.get("max_bytes_per_domain"),
                "python": meta.get("python"), "unicode": meta.get("unicode"), "domains": domains}
    pieces: dict[str, list[str]] = {}
    for doc in corpus.documents:  # the chunks of a file are in order; joined they are the file's text
        pieces.setdefault(_CHUNK.sub("", doc.id), []).append(doc.text)
    files = {}
    for name, texts in sorted(pieces.items()):
        data = "".join(texts).encode("utf-8")
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return {"source": "files", "path": corpus.metadata.get("path"), "files": files}


def fingerprint_difference(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """How ``current`` differs from ``recorded`` (the first difference, and how many more), or None."""
    if recorded.get("source") != current.get("source"):
        return f"the run trained on {_source(recorded)}, this is {_source(current)}"
    kind = "files" if current.get("source") == "files" else "domains"
    old, new = recorded.get(kind) or {}, current.get(kind) or {}
    if not isinstance(old, dict):
        return None  # not a fingerprint this code wrote: nothing to compare
    differences = []
    for name in sorted(set(old) | set(new)):
        was, now = old.get(name), new.get(name)
        if was == now:
            continue
        unit = "file" if kind == "files" else "built-in domain"
        if now is None:
            differences.append(f"{unit} {name!r} is gone")
        elif was is None:
            differences.append(f"{unit} {name!r} is new")
        else:
            differences.append(f"{unit} {name!r} was {_size(was)}, now {_size(now)}")
    if not differences:
        return None
    why = differences[0] + (f" (and {len(differences) - 1} more)" if len(differences) > 1 else "")
    if kind == "domains":
        versions = [f"{k} {recorded.get(k)} -> {current.get(k)}" for k in ("python", "unicode")
                    if recorded.get(k) != current.get(k)]
        if versions:
            why += f"; the built-in corpus is built from this Python installation: {', '.join(versions)}"
    return why


def _source(fingerprint: dict[str, Any]) -> str:
    if fingerprint.get("source") == "built-in":
        return "the built-in corpus"
    return f"the files of {fingerprint.get('path')!r}"


def _size(entry: Any) -> str:
    if not isinstance(entry, dict):
        return repr(entry)
    return f"{entry.get('bytes')} bytes (sha256 {str(entry.get('sha256'))[:12]})"
