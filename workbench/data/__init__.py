"""Data for MoE experiments: a labelled multi-domain corpus, a byte tokenizer and batch loaders.

Every token carries the domain of the document it came from, the ground truth that routing
and specialization analyses compare experts against::

    corpus = build_corpus()                      # code, prose, math, records; cached after the first call
    data = LMData(corpus, seq_len=128, batch_size=16, seed=0)
    batch = data.get_batch(step)                 # Batch(tokens, targets, domains, starts)
    for domain, batches in data.val_batches().items(): ...

Nothing is downloaded: the corpus comes from the Python installation itself, generated text,
or the user's own files (``load_text_corpus``). See ``data/README.md`` for the data card.
"""

from workbench.data.builtin import (
    BUILTIN_DOMAINS,
    DEFAULT_MAX_BYTES_PER_DOMAIN,
    ENV_DATA_DIR,
    build_corpus,
    default_cache_dir,
)
from workbench.data.corpus import Corpus, Document, DomainInfo, load_text_corpus, split_score
from workbench.data.loader import SEPARATOR, Batch, DataTooSmallError, LMData, TokenStream
from workbench.data.tokenizer import VOCAB_SIZE, ByteTokenizer

__all__ = [
    "BUILTIN_DOMAINS", "DEFAULT_MAX_BYTES_PER_DOMAIN", "ENV_DATA_DIR", "SEPARATOR", "VOCAB_SIZE", "Batch",
    "DataTooSmallError",
    "ByteTokenizer", "Corpus", "Document", "DomainInfo", "LMData", "TokenStream", "build_corpus",
    "default_cache_dir", "load_text_corpus", "split_score",
]
