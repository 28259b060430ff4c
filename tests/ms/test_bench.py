"""The benchmark functions other benchmarks call (workbench.ms.bench): their keys and units. No timing
is asserted; the figures are a benchmark's business."""

from __future__ import annotations

import pytest

pytest.importorskip("mindspore", reason="MindSpore is not installed: pip install 'moe-workbench[mindspore]'")

from workbench.ms.bench import measure_layer, measure_train_step  # noqa: E402

COMMON = {"step_s_median", "step_s", "mode", "device", "mindspore_version"}


def test_measure_train_step(small_cfg):
    out = measure_train_step(small_cfg, batch_size=2, mode="pynative", steps=1, warmup=0)
    assert COMMON | {"tokens_per_step"} <= set(out)
    assert out["tokens_per_step"] == 2 * small_cfg.seq_len
    assert len(out["step_s"]) == 1 and all(t > 0 for t in out["step_s"])
    assert min(out["step_s"]) <= out["step_s_median"] <= max(out["step_s"])
    assert (out["mode"], out["device"]) == ("pynative", "CPU")


@pytest.mark.parametrize(("dispatch", "backward"), [("capacity", True), ("sorted", False)])
def test_measure_layer(small_cfg, dispatch, backward):
    out = measure_layer(small_cfg.moe, small_cfg.d_model, tokens=64, dispatch=dispatch, backward=backward,
                        repeats=1, warmup=0)
    assert COMMON | {"tokens"} <= set(out) and out["tokens"] == 64 and len(out["step_s"]) == 1


def test_bad_arguments_are_named(small_cfg):
    with pytest.raises(ValueError, match="^mode='eager' is invalid"):
        measure_train_step(small_cfg, 2, mode="eager")
    with pytest.raises(ValueError, match="^dispatch='soft' is invalid"):
        measure_layer(small_cfg.moe, 128, 64, dispatch="soft")
