"""Under torchrun (issue 27, items 4 and 9): a rank that stops answering ends the run with one line
naming it and the last checkpoint, after the collective timeout (not gloo's 30 minutes); a refused
value and a full disk give rank 0's one line and nothing from the other ranks. What torchrun itself
prints after a failed launch (its ChildFailedError report) is torchrun's, and stays (README)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.parallel.conftest import requires_gloo
from tests.train.conftest import MICRO_FLAGS, write_domain_folder

pytestmark = [requires_gloo, pytest.mark.skipif(not sys.platform.startswith("linux"),
                                                reason="finds the ranks through /proc (Linux)")]

ERROR = "workbench train: error:"


def torchrun(tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    from workbench.parallel.launch import free_port

    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(free_port()), "-m", "workbench", "train", *MICRO_FLAGS,
                             "--no-progress", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def our_lines(stderr: str) -> list[str]:
    """What the workbench processes printed: not torchrun's log lines nor its ChildFailedError report."""
    ours = stderr.split("Traceback (most recent call last):")[0]  # torchrun's own traceback comes last
    return [line for line in ours.splitlines() if line.strip() and not line.startswith(("W1", "E1", "I1", "*"))]


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no rank {rank} under torchrun")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_stopped_rank_ends_the_run_with_one_line_naming_it(tmp_path):
    """Item 4: kill -STOP one rank; rank 0 used to wait silently for gloo's 30 minutes."""
    data = write_domain_folder(tmp_path / "corpus")
    run = tmp_path / "ep"
    launcher = torchrun(tmp_path, "--data", str(data), "--steps", "100000", "--grad-accum", "2",
                        "--expert-parallel", "2", "--checkpoint-every", "3", "--eval-every", "100000",
                        "--collective-timeout", "3", "--run-dir", str(run))
    stopped = None
    try:
        deadline = time.monotonic() + 90
        while not (run / "ckpt-00000003.safetensors").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
            time.sleep(0.1)
        rank0, stopped = rank_pid(launcher, 0), rank_pid(launcher, 1)
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        while alive(rank0) and time.monotonic() - t0 < 60:
            time.sleep(0.1)
        waited = time.monotonic() - t0
    finally:
        if stopped is not None:  # torchrun's SIGTERM cannot end a stopped process
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGKILL)
        out, err = launcher.communicate(timeout=60)
    assert launcher.returncode != 0
    lines = our_lines(err)
    assert len(lines) == 1 and lines[0].startswith(ERROR), err
    assert "rank 1 did not answer within the collective timeout of 3 s" in lines[0]
    assert f"the last checkpoint is {run}/ckpt-" in lines[0], lines[0]
    assert waited < 20, f"rank 0 waited {waited:.0f} s for a 3 s timeout"


def test_a_value_refused_under_torchrun_is_one_line_from_rank_0(tmp_path):
    """Item 9: every rank used to print the refusal; it is refused before any process group, on every
    rank alike, and only rank 0 says so."""
    launcher = torchrun(tmp_path, "--lr", "inf", "--run-dir", str(tmp_path / "run"))
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert our_lines(err) == [f"{ERROR} lr=inf is invalid: must be a finite number > 0"], err
    assert "exitcode  : 2" in err  # torchrun's report: both ranks ended with the bad-input status


def _mount_tmpfs(folder: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` on ``folder``; the reason it cannot be, or None."""
    if os.geteuid() != 0:
        return "mounting a small tmpfs (a full disk) needs root"
    folder.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else f"no tmpfs can be mounted here: {done.stderr.strip()}"


def test_a_full_disk_under_torchrun_is_one_line_from_rank_0(tmp_path):
    """Item 9: rank 0 printed the right line and rank 1 a 60-line traceback from parallel/comm.py."""
    disk = tmp_path / "disk"
    why = _mount_tmpfs(disk, "200k")
    if why:
        pytest.skip(why)
    try:
        data = write_domain_folder(tmp_path / "corpus")
        launcher = torchrun(tmp_path, "--data", str(data), "--steps", "20", "--grad-accum", "2",
                            "--expert-parallel", "2", "--checkpoint-every", "2", "--eval-every", "100000",
                            "--run-dir", str(disk / "run"))
        _, err = launcher.communicate(timeout=120)
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    assert launcher.returncode != 0
    lines = our_lines(err)
    assert len(lines) == 1 and lines[0].startswith(ERROR) and "training stopped at step 2" in lines[0], err
    assert "comm.py" not in err and "rank 1" not in err


def test_a_rank_that_sleeps_is_named_by_its_heartbeat_step():
    """Item 4: a rank asleep in Python still beats; it is named because its step is behind."""
    from tests.parallel.workers import heartbeat_names_the_sleeping_rank
    from workbench.parallel.launch import run_local
    from workbench.parallel.trainer import is_collective_failure

    first, _ = run_local(heartbeat_names_the_sleeping_rank, nprocs=2, args=(4.0,), collective_timeout_s=1.5,
                         timeout_s=60)
    assert first["silent"] == [1], first
    assert is_collective_failure(RuntimeError(first["error"])), first["error"]
