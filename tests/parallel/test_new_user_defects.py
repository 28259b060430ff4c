"""Issue 26, defects 4 and 11 under torchrun: MFU over every rank's peak, and --grad-accum's default."""

from __future__ import annotations

import pytest

from tests.parallel.conftest import requires_gloo
from tests.parallel.new_user_workers import PEAK_PER_RANK, train_on_the_cli
from tests.train.conftest import MICRO_FLAGS, write_domain_folder
from workbench.parallel import run_local

pytestmark = requires_gloo


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory):
    """A 2-rank expert-parallel CLI run with no --grad-accum (the default was 1: refused on 2 ranks)."""
    root = tmp_path_factory.mktemp("ep2")
    corpus = write_domain_folder(root / "corpus")
    argv = [*MICRO_FLAGS, "--data", str(corpus), "--run-dir", str(root / "run"), "--steps", "1",
            "--eval-windows", "1", "--no-progress", "--expert-parallel", "2"]
    return run_local(train_on_the_cli, nprocs=2, args=(argv,), expert_parallel=2, timeout_s=120)


def test_mfu_divides_by_the_sum_of_the_ranks_peaks(ep2_run):
    summary = ep2_run[0]["summary"]
    total = PEAK_PER_RANK * (1 + 2)  # rank 0's peak alone overstated MFU 3 times here
    assert summary["matmul_peak_flops"] == total and summary["ranks"] == 2
    assert summary["mfu"] == pytest.approx(summary["flops_per_token"] * summary["tokens_per_s"] / total)
    assert "2 ranks' peaks summed" in ep2_run[0]["stdout"]


def test_grad_accum_defaults_to_the_number_of_ranks_said_in_one_line(ep2_run):
    assert [r["code"] for r in ep2_run] == [0, 0]
    said = [line for line in ep2_run[0]["stdout"].splitlines() if line.startswith("grad_accum:")]
    assert said == ["grad_accum: 2, one micro-batch per rank (the default under torchrun; --grad-accum sets "
                    "another multiple of the number of ranks)"]
    assert ep2_run[1]["stdout"] == ""  # rank 0 speaks for the run
