"""A run directory that cannot be used as it is, resumed or shown (issue 27, item 16): one line naming the
file or the field, never a codec error or a temporary file's name."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.train.conftest import MICRO_MODEL, one_line, run_cli, write_domain_folder


@pytest.fixture
def cut_run(tmp_path, monkeypatch) -> Path:
    """A micro run of 4 steps with checkpoints at 2 and 4, the last one removed: it resumes from 2.
    (The end-of-run summary, a matmul measurement and a plot, is not under test: it is skipped.)"""
    import workbench.cli.train as cli_train
    from workbench.train import TrainConfig, Trainer

    monkeypatch.setattr(cli_train, "summarize", lambda trainer: "summary skipped")
    run, data = tmp_path / "run", write_domain_folder(tmp_path / "corpus")
    cfg = TrainConfig(steps=4, checkpoint_every=2, batch_size=4, eval_windows=2, data=str(data), progress=False,
                      run_dir=str(run))
    Trainer(MICRO_MODEL, cfg).fit()
    (run / "ckpt-00000004.safetensors").unlink()
    return run


def test_a_binary_metrics_file_is_named_on_resume(cut_run, capsys):
    """Resume said "'utf-8' codec can't decode byte ..." and stopped, naming no file."""
    (cut_run / "metrics.jsonl").write_bytes(bytes(range(256)) * 8)
    code, _, err = run_cli(capsys, "train", "--resume", "--no-progress", "--run-dir", str(cut_run))
    assert "codec can't decode" not in err and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert all("metrics.jsonl" in line for line in lines) and (code == 0 or len(lines) == 1), (code, err)


def _read_only(folder: Path):
    """Make ``folder`` read-only for this process: chmod for a user, a read-only tmpfs for root
    (root writes through permissions); None (with the reason) where neither works."""
    if os.geteuid() != 0:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        return lambda: [p.chmod(p.stat().st_mode | 0o200) for p in [folder, *folder.rglob("*")]], None
    copy = folder.with_name(folder.name + "-files")
    shutil.copytree(folder, copy)
    shutil.rmtree(folder)
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        return None, f"running as root, and a read-only tmpfs cannot be mounted here: {mount.stderr.strip()}"
    shutil.copytree(copy, folder, dirs_exist_ok=True)
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    return lambda: subprocess.run(["umount", str(folder)], check=True), None


def test_a_read_only_run_directory_on_resume_is_named(cut_run, capsys):
    """Resume said "[Errno 30] Read-only file system: 'run/metrics.jsonl.tmp'": a temporary file."""
    for stale in cut_run.glob("*.lock"):  # a lock file left by the first run may not be removable
        stale.unlink()
    undo, why = _read_only(cut_run)
    if undo is None:
        pytest.skip(why)
    try:
        code, _, err = run_cli(capsys, "train", "--resume", "--no-progress", "--run-dir", str(cut_run))
    finally:
        undo()
    assert code == 2
    line = one_line(err)
    assert f"run_dir={str(cut_run)!r}" in line and "cannot be written" in line, line


def test_a_binary_metrics_file_is_named_by_show(cut_run, capsys):
    """`show` said "'utf-8' codec can't decode byte ..." and exited 2, naming no file."""
    (cut_run / "metrics.jsonl").write_bytes(bytes(range(256)) * 8)
    code, out, err = run_cli(capsys, "show", str(cut_run))
    assert code == 0, err
    line = one_line(err)
    assert f"{cut_run}/metrics.jsonl: lines" in line and "left out" in line, line
    assert "last checkpoint: ckpt-00000002.safetensors" in out
