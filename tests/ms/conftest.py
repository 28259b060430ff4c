import pytest

from workbench.ms import INSTALL_HINT, have_mindspore


def pytest_report_header(config):
    # every module here but test_optional.py skips without MindSpore (pytest.importorskip, with the reason)
    return None if have_mindspore() else f"tests/ms: {INSTALL_HINT}"


@pytest.fixture(scope="session")
def small_cfg():
    """tiny's widths with 2 layers of 32 tokens: every MoE piece, seconds per test."""
    from workbench.config import preset

    return preset("tiny").replace(n_layers=2, seq_len=32)
