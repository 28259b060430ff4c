"""The parallel flags of the CLI refuse what cannot run with one line, before any process starts."""

from __future__ import annotations

import json

import pytest

from tests.parallel.conftest import requires_gloo
from tests.train.conftest import one_line, run_cli


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")


def test_expert_parallel_without_a_launch_names_the_torchrun_command(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--expert-parallel", "2", "--run-dir", str(tmp_path / "run"))
    assert code == 2
    assert "torchrun --nproc-per-node 2 -m workbench train ... --expert-parallel 2" in one_line(err)
    assert not (tmp_path / "run").exists()


def test_expert_parallel_below_1_is_refused(capsys):
    code, _, err = run_cli(capsys, "train", "--expert-parallel", "0")
    assert code == 2 and "--expert-parallel=0 is invalid" in one_line(err)


@pytest.mark.parametrize("args, needle", [
    (["--expert-parallel", "3"], "expert_parallel=3 is invalid: must divide the number of ranks, world_size=2"),
    (["--grad-accum", "3"], "grad_accum=3 is invalid: must be a multiple of nprocs=2"),
    (["--nprocs", "4", "--expert-parallel", "4", "--grad-accum", "4", "--preset", "tiny", "--steps", "1"], None),
])
def test_bench_expert_parallel_checks_its_flags_first(capsys, monkeypatch, args, needle):
    import workbench.parallel.launch as launch

    def no_launch(*a, **k):
        raise AssertionError("a process was started")

    monkeypatch.setattr(launch, "run_local", no_launch)
    if needle is None:  # valid flags get as far as starting processes
        with pytest.raises(AssertionError, match="a process was started"):
            run_cli(capsys, "bench", "expert-parallel", *args)
        return
    code, _, err = run_cli(capsys, "bench", "expert-parallel", *args)
    assert code == 2 and needle in one_line(err)


@requires_gloo
def test_bench_expert_parallel_runs_and_writes_json(capsys, tmp_path):
    """A smoke run (one step per side, tiny batch): the figures are there, not their values."""
    out = tmp_path / "ep.json"
    code, stdout, err = run_cli(capsys, "bench", "expert-parallel", "--preset", "tiny", "--batch-size", "1",
                                "--steps", "1", "--warmup", "0", "--rounds", "1", "--json", str(out))
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["single"]["threads"] == 2 and result["expert_parallel"]["processes"] == 2
    assert result["expert_parallel"]["bytes_moved_per_step"] > 0 and result["ratio"] > 0
    assert {"cpu", "cores", "torch"} <= set(result["machine"]) and result["date"]
    assert "tokens/s" in stdout
