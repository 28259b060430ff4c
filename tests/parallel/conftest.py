"""The expert-parallel tests run 2 gloo processes on 127.0.0.1; they skip where that cannot work."""

from __future__ import annotations

import pytest
import torch


def gloo_missing() -> str | None:
    """Why two local gloo processes cannot run here, or None when they can."""
    import torch.distributed as dist

    if not dist.is_available():
        return "this torch build has no torch.distributed"
    if not dist.is_gloo_available():
        return "this torch build has no gloo backend"
    return None


requires_gloo = pytest.mark.skipif(gloo_missing() is not None, reason=gloo_missing() or "")


@pytest.fixture
def fp32():
    """The tolerance of the equivalence tests: fp32, 1e-5 (absolute and relative)."""
    return {"atol": 1e-5, "rtol": 1e-5}


def assert_pairs_close(pairs: dict, atol: float, rtol: float, what: str) -> None:
    """Every (got, want) pair of ``pairs`` equal within the tolerance; the message names the entry."""
    for name, (got, want) in pairs.items():
        got, want = torch.as_tensor(got), torch.as_tensor(want)
        if not got.dtype.is_floating_point:
            assert torch.equal(got, want), f"{what}: {name}: {got.tolist()} != {want.tolist()}"
            continue
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{what}: {n}: {m}")
