"""The interop package imports without transformers, and says how to install it when it is needed."""

from __future__ import annotations

import sys

import pytest


def test_missing_transformers_says_how_to_install_it(monkeypatch):
    import workbench.interop  # no transformers needed to import
    from workbench.interop.hf import require_transformers

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'moe-workbench\[hf\]'"):
        require_transformers()
    with pytest.raises(ImportError, match="transformers"):
        workbench.interop.moe_config_from_hf(object())
