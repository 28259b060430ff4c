"""The workbench command: runs, writes JSON, and rejects bad values with status 2 and one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def workbench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL,
                          timeout=300)


def test_bench_layer_runs_and_writes_json(tmp_path):
    out = tmp_path / "layer.json"
    r = workbench("bench", "layer", "--tokens", "256", "--d-model", "32", "--expert-hidden", "64",
                  "--num-experts", "4", "--repeats", "2", "--warmup", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    variants = {"dense", "sorted", "capacity", "loop"}
    if result["expert_kernel"] == "fused_cpu":  # the kernel built: sorted is also timed without it
        variants.add("sorted_unfused")
        assert result["ratios"]["sorted_vs_sorted_unfused"] > 0
    else:
        assert result["expert_kernel"] == "grouped_mm"
    assert set(result["median_ms"]) == variants
    assert result["ratios"]["sorted_vs_dense"] > 0 and result["ratios"]["sorted_vs_loop"] > 0
    assert "sorted_vs_loop" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["bench", "layer", "--dispatches", "sorted,warp"], "allowed values are loop, capacity, sorted"),
    (["bench", "layer", "--tokens", "many"], "--tokens"),
    (["bench", "nothing"], "invalid choice"),
])
def test_bad_values_exit_2_with_one_line(args, needle):
    r = workbench(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["bench", "layer", "--top-k", "0"], "top_k=0 is invalid"),
    (["bench", "layer", "--top-k", "5", "--num-experts", "4"], "top_k=5 is invalid: must be between 1 and "
                                                              "num_experts=4"),
    (["bench", "layer", "--num-experts", "0"], "num_experts=0 is invalid"),
    (["bench", "layer", "--expert-hidden", "0"], "expert_hidden=0 is invalid"),
    (["bench", "layer", "--tokens", "0"], "tokens=0 is invalid: must be an integer >= 1"),
    (["bench", "layer", "--d-model", "-4"], "d_model=-4 is invalid: must be an integer >= 1"),
    (["bench", "layer", "--repeats", "0"], "repeats=0 is invalid: must be an integer >= 1"),
    (["bench", "layer", "--warmup", "-1"], "warmup=-1 is invalid: must be an integer >= 0"),
    (["bench", "layer", "--device", "cuda:99"], "device='cuda:99' is invalid"),
    (["bench", "train", "--steps", "0"], "steps=0 is invalid: must be >= 1"),
    (["bench", "train", "--batch-size", "0"], "batch_size=0 is invalid: must be >= 1"),
    (["bench", "train", "--presets", ","], "presets=[] is invalid"),
    (["bench", "train", "--presets", "tiny,huge"], "preset='huge' is invalid"),
])
def test_bench_flags_are_validated_before_anything_runs(args, needle, capsys):
    """Checked in-process (cheap): an exception escaping ``main`` would fail the test as a traceback would."""
    from workbench.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
