from __future__ import annotations

import pytest

from tests.data.helpers import SMALL_BUDGET
from workbench.data import build_corpus


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session")
def small_corpus(small_cache):
    return build_corpus(small_cache, max_bytes_per_domain=SMALL_BUDGET)
