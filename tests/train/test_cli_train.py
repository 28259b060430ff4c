"""`workbench train`: bad values, SIGKILL + resume bit for bit, the run directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.train.conftest import MICRO_FLAGS
from workbench.train import load_checkpoint
from workbench.train.checkpoint import list_checkpoints

ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "workbench.cli", "train", *args]


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(*args), capture_output=True, text=True, timeout=timeout, env=ENV,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args, needle", [
    (["--router", "telepathy"], "router='telepathy' is invalid: allowed values are softmax_topk"),
    (["--lr", "-0.1"], "lr=-0.1 is invalid: must be > 0"),
    (["--data", "/no/such/corpus"], "data='/no/such/corpus' is invalid: the path does not exist"),
    (["--top-k", "9"], "top_k=9 is invalid: must be between 1 and num_experts=8"),
    (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["--balance", "magic"], "argument --balance: invalid choice: 'magic'"),
])
def test_bad_values_exit_2_with_one_line(tmp_path, args, needle):
    r = run("--run-dir", str(tmp_path / "run"), *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr


def test_resume_without_checkpoint_exits_2(tmp_path):
    r = run("--resume", "--run-dir", str(tmp_path / "empty"))
    assert r.returncode == 2 and "no readable checkpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_help_lists_every_config_field_with_defaults():
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "train", "--help"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL,
                       env=ENV)
    assert r.returncode == 0
    for flag in ("--num-experts", "--router", "--capacity-factor", "--bias-update-rate", "--lr", "--grad-accum",
                 "--d-model", "--first-dense-layers", "--checkpoint-every", "--data", "--tie-embeddings"):
        assert flag in r.stdout, flag
    assert "(default: 8)" in r.stdout  # num_experts of the tiny preset


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, domain_folder):
    common = ["--data", str(domain_folder), *MICRO_FLAGS, "--steps", "150", "--checkpoint-every", "10",
              "--eval-every", "1000", "--no-progress", "--router", "noisy_topk", "--dropout", "0.1"]
    full = run(*common, "--run-dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(*common, "--run-dir", str(killed_dir)), env=ENV, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not any(step >= 30 for step, _ in list_checkpoints(killed_dir)):
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    steps = [s for s, _ in list_checkpoints(killed_dir)]
    assert steps and max(steps) < 150

    resumed = run("--resume", "--run-dir", str(killed_dir), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {max(steps)}" in resumed.stdout

    a = load_checkpoint(list_checkpoints(tmp_path / "full")[-1][1])
    b = load_checkpoint(list_checkpoints(killed_dir)[-1][1])
    assert a.step == b.step == 150
    assert a.model_state.keys() == b.model_state.keys()
    for k in a.model_state:
        assert torch.equal(a.model_state[k], b.model_state[k]), k


def test_run_directory_holds_metrics_checkpoint_report_and_summary(tmp_path, domain_folder):
    run_dir = tmp_path / "run"
    r = run("--data", str(domain_folder), *MICRO_FLAGS, "--steps", "6", "--eval-every", "3",
            "--no-progress", "--run-dir", str(run_dir), "--balance", "loss_free", "--router", "sigmoid")
    assert r.returncode == 0, r.stderr
    for name in ("metrics.jsonl", "report.png", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert list_checkpoints(run_dir)[-1][0] == 6
    assert "validation loss at step 6" in r.stdout and "MaxVio" in r.stdout and "report:" in r.stdout
    cfg = load_checkpoint(list_checkpoints(run_dir)[-1][1]).model_config
    assert cfg["moe"]["bias_update_rate"] == 1e-3 and cfg["moe"]["aux_loss_weight"] == 0.0
    # a second run into the same directory is refused unless --overwrite
    again = run("--data", str(domain_folder), *MICRO_FLAGS, "--steps", "2", "--run-dir", str(run_dir))
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr
    over = run("--data", str(domain_folder), *MICRO_FLAGS, "--steps", "2", "--run-dir", str(run_dir),
               "--overwrite", "--no-progress")
    assert over.returncode == 0, over.stderr
    assert [s for s, _ in list_checkpoints(run_dir)] == [2]
