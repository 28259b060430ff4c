"""The expert-parallel layer on 2 gloo processes equals the single-process layer: outputs, balancing
losses, every gradient and the loss-free bias update (fp32, 1e-5).

One launch runs every case (starting processes is the slow part); each case is its own test.
"""

from __future__ import annotations

import pytest
import torch

from tests.parallel.conftest import assert_pairs_close, requires_gloo
from tests.parallel.workers import LAYER_CASES, layer_equivalence
from workbench.parallel import run_local

pytestmark = [requires_gloo, pytest.mark.filterwarnings("ignore::workbench.moe.routers.CausalLeakWarning")]


@pytest.fixture(scope="module")
def results():
    """Per rank, per case: (expert-parallel, single-process) pairs."""
    return run_local(layer_equivalence, nprocs=2, args=(LAYER_CASES,), expert_parallel=2, timeout_s=300)


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.name)
def test_expert_parallel_layer_equals_the_single_process_layer(results, case, fp32):
    for rank, per_case in enumerate(results):
        pairs = per_case[case.name]
        assert {"y", "x.grad", "loss/aux_loss", "loss/seq_aux_loss", "loss/z_loss", "grad/router.weight",
                "grad/experts.w1", "grad/experts.w2", "grad/experts.w3"} <= set(pairs)
        assert_pairs_close(pairs, **fp32, what=f"{case.name}, rank {rank}")


def test_silent_experts_really_get_no_token_and_a_zero_gradient(results):
    # rank 1 holds experts 2 and 3; in this case neither is ever selected
    pairs = results[1]["sigmoid, rank 1's experts get no token"]
    for rank in range(2):
        assert results[rank]["sigmoid, rank 1's experts get no token"]["tokens_per_expert"][0][2:].sum() == 0
    for name in ("grad/experts.w1", "grad/experts.w2", "grad/experts.w3"):
        got, _ = pairs[name]
        assert got.abs().max() == 0, name


def test_the_expert_parallel_layer_keeps_everything_its_constructor_built():
    """Expert parallelism changes a built layer's experts, dispatch and rank sum, nothing else: a
    buffer that a subclass's (or a future) constructor registers is there on every rank."""
    from tests.parallel.workers import parallel_layer_keeps_what_the_constructor_built

    results = run_local(parallel_layer_keeps_what_the_constructor_built, nprocs=2, expert_parallel=2, timeout_s=120)
    for rank, got in enumerate(results):
        assert got["class"] == "_LayerWithANewBuffer"
        assert torch.equal(got["buffers"]["decode_cache"], torch.full((3,), 7.0))
        assert {"load_since_update", "aux_counts_since_step"} <= set(got["buffers"])
        assert got["dispatch"] == "ExpertParallelDispatch"
        assert (got["first_expert"], got["local_experts"]) == (2 * rank, 2)
        assert got["y_shape"] == (2, 6, 8)
