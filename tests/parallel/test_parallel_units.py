"""The parts of expert parallelism that need no second process: layouts, validation, refusals."""

from __future__ import annotations

import pytest
import torch

from workbench.moe import MoEConfig
from workbench.moe.experts import SwiGLUExperts
from workbench.parallel import BACKENDS, ParallelConfig, backend_for, init_parallel
from workbench.parallel.context import rank_device
from workbench.parallel.layer import shard_experts, source_to_expert_order


@pytest.mark.parametrize("P, L", [(2, 2), (3, 4), (4, 1), (1, 3)])
def test_source_to_expert_order_regroups_rows_by_expert_then_source(P, L):
    counts_PL = torch.randint(0, 4, (P, L))
    counts_PL[0, 0] = 0  # empty segments must not shift the others
    # label every received row with its (source, expert) segment, in the received order
    labels = [(p, e) for p in range(P) for e in range(L) for _ in range(int(counts_PL[p, e]))]
    order = source_to_expert_order(counts_PL)
    regrouped = [labels[i] for i in order.tolist()]
    assert regrouped == sorted(labels, key=lambda pe: (pe[1], pe[0]))
    assert sorted(order.tolist()) == list(range(len(labels)))  # a permutation


def test_shard_experts_copies_a_slice_and_leaves_the_random_generator_alone():
    torch.manual_seed(0)
    full = SwiGLUExperts(6, 4, 8)
    state = torch.get_rng_state()
    local = shard_experts(full, 2, 4)
    assert torch.equal(torch.get_rng_state(), state)
    assert local.num_experts == 2 and torch.equal(local.w2, full.w2[2:4])
    assert local.w1.data_ptr() != full.w1[2:4].data_ptr()  # a copy: the rank owns it


def test_parallel_config_names_the_field_and_what_is_allowed():
    assert ParallelConfig(world_size=8, expert_parallel=4).data_parallel == 2
    with pytest.raises(ValueError, match=r"expert_parallel=3 is invalid: must divide the number of ranks"):
        ParallelConfig(world_size=4, expert_parallel=3)
    with pytest.raises(ValueError, match=r"expert_parallel=0 is invalid"):
        ParallelConfig(world_size=4, expert_parallel=0)


@pytest.mark.parametrize("fields, field", [
    ({"num_experts": 6}, "num_experts=6 is invalid: must be a multiple of expert_parallel=4"),
    ({"dispatch": "capacity"}, "dispatch='capacity' is invalid"),
    ({"router": "soft_moe", "top_k": 1}, "router='soft_moe' is invalid"),
])
def test_models_that_cannot_be_split_are_refused(fields, field):
    config = ParallelConfig(world_size=4, expert_parallel=4)
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(")", r"\)")):
        config.check_model(MoEConfig(**{"num_experts": 8, **fields}))
    ParallelConfig(world_size=4, expert_parallel=1).check_model(MoEConfig(**{"num_experts": 8, **fields}))


def test_backend_follows_the_device_and_a_pinned_accelerator_is_refused():
    # torch knows the npu device type only once torch_npu is imported: the table says it
    assert [backend_for(torch.device(d)) for d in ("cpu", "cuda")] == ["gloo", "nccl"]
    assert BACKENDS["npu"] == "hccl"
    assert rank_device("cpu", 3) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"without an index"):
        rank_device("cuda:0", 1)
    with pytest.raises(ValueError, match=r"device='mps' is invalid"):
        rank_device("mps", 0)


def test_init_parallel_outside_a_launch_says_how_to_launch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"torchrun --nproc-per-node 2 -m workbench train --expert-parallel 2"):
        init_parallel(expert_parallel=2)
