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
