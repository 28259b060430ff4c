"""Issue 27, item 13: sizes that cannot fit are refused before anything is allocated, and Ctrl-C
during the start (imports) ends with one line and the interrupted exit status."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.train.conftest import one_line, run_cli


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def test_a_vocabulary_too_large_for_the_machine_is_refused_before_allocating(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--vocab-size", "100000000000", "--steps", "1", "--no-progress",
                           "--run-dir", str(tmp_path / "run"))
    assert code == 2
    line = one_line(err)
    assert "vocab_size=100000000000 is invalid: training this model" in line and "GiB, more than" in line, line
    assert not (tmp_path / "run").exists()


def test_a_layer_bench_too_large_for_the_machine_is_refused_before_allocating(capsys):
    code, _, err = run_cli(capsys, "bench", "layer", "--tokens", "2000000000", "--repeats", "1", "--warmup", "0",
                           "--dispatches", "sorted", "--no-unfused")
    assert code == 2
    line = one_line(err)
    assert "tokens=2000000000 is invalid" in line and "GiB, more than" in line, line


def test_sizes_that_fit_are_not_refused():
    import torch

    from workbench.config import preset
    from workbench.resources import check_training_fits, memory_limit
    from workbench.train.config import TrainConfig

    assert memory_limit(torch.device("cpu")) is not None  # Linux, macOS: the check is live here
    check_training_fits(preset("small"), TrainConfig(), torch.device("cpu"))


# Ctrl-C while `python -m workbench` imports torch: an import hook raises KeyboardInterrupt there,
# where the signal's default handler would raise it.
_INTERRUPT_AT_TORCH = textwrap.dedent("""
    import runpy, sys

    class Interrupt:
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                raise KeyboardInterrupt
            return None

    sys.meta_path.insert(0, Interrupt())
    sys.argv = ["workbench", "train", "--steps", "1"]
    runpy.run_module("workbench", run_name="__main__", alter_sys=True)
""")


def test_ctrl_c_while_starting_is_one_line_and_exit_130():
    proc = subprocess.run([sys.executable, "-c", _INTERRUPT_AT_TORCH], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert one_line(proc.stderr) == "workbench: interrupted while starting"


def test_the_command_module_imports_no_torch():
    """The console script runs `from workbench.cli import main` before main can catch anything."""
    code = "import sys, workbench.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip() == "False"
