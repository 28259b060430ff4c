import pytest

from workbench.ms import INSTALL_HINT, have_mindspore

# Every module here but test_optional.py needs MindSpore; without it they skip with the install command.
collect_ignore = [] if have_mindspore() else ["test_model.py", "test_parity.py", "test_convert.py",
                                              "test_train.py", "test_bench.py", "test_cli.py"]


def pytest_report_header(config):
    return None if have_mindspore() else f"tests/ms: skipped, {INSTALL_HINT}"


@pytest.fixture(scope="session")
def small_cfg():
    """tiny's widths with 2 layers of 32 tokens: every MoE piece, seconds per test."""
    from workbench.config import preset

    return preset("tiny").replace(n_layers=2, seq_len=32)
