"""Nothing lost, nothing hangs (issue 27, items 1, 2, 3, 10 and 17): an overwrite deletes only what
a run wrote, one trainer at a time holds a run directory, a resume keeps every readable metrics
row, a closed stdout is a normal end, and SIGTERM / SIGHUP end a run as Ctrl-C does.

Trainers run in this process on micro configs; a subprocess only where the behaviour belongs to a
process: a lock held by another one, a signal, a closed pipe.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from tests.train.conftest import MICRO_FLAGS, MICRO_MODEL, one_line, run_cli, snapshot
from workbench.train import TrainConfig, Trainer
from workbench.train.checkpoint import list_checkpoints
from workbench.train.rundir import (
    LOCK_FILE,
    RunDirBusy,
    RunLock,
    new_run_info,
    read_run_info,
    write_json_atomic,
)

ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
HOST = socket.gethostname()


def make_trainer(run_dir, data_dir, overwrite=False, **kw) -> Trainer:
    cfg = TrainConfig(run_dir=str(run_dir), data=str(data_dir), batch_size=4, eval_windows=2, progress=False,
                      **{"steps": 4, "eval_every": 4, "checkpoint_every": 2, **kw})
    return Trainer(MICRO_MODEL, cfg, overwrite=overwrite)


def train_flags(data_dir: Path, run_dir: Path | str, *more: str) -> list[str]:
    return ["train", "--data", str(data_dir), *MICRO_FLAGS, "--no-progress", "--run-dir", str(run_dir), *more]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "workbench.cli", *args]


@pytest.fixture
def fake_wandb(monkeypatch):
    """wandb in offline mode, as far as the run directory sees it: each run gets its own folder
    ``wandb/offline-run-<n>-<id>/files`` (and wandb's ``latest-run`` link next to it)."""
    started = []

    def init(dir, id=None, **kwargs):
        run_id = id or f"id{len(started)}"
        started.append(run_id)
        folder = Path(dir) / "wandb" / f"offline-run-2026-{run_id}"  # as relative as dir is
        (folder / "files").mkdir(parents=True, exist_ok=True)
        latest = Path(dir) / "wandb" / "latest-run"
        latest.unlink(missing_ok=True)
        latest.symlink_to(folder.name)
        return types.SimpleNamespace(id=run_id, dir=str(folder / "files"), log=lambda *a, **k: None,
                                     finish=lambda: None)

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setenv("WANDB_MODE", "offline")


# --- 1. overwrite deletes only a run's files -------------------------------------------------------


def test_overwrite_refuses_a_folder_that_holds_no_run(tmp_path, domain_folder, capsys):
    folder = tmp_path / "p"
    (folder / "wandb" / "other").mkdir(parents=True)
    (folder / "wandb" / "other" / "f").write_text("keep")
    (folder / "summary.json").write_text("mine")
    before = snapshot(folder)
    with pytest.raises(ValueError, match=r"run_dir='.*p' is invalid for overwrite: it holds no workbench run .*"
                                         r"\(summary.json, wandb\)"):
        make_trainer(folder, domain_folder, overwrite=True)
    code, _, err = run_cli(capsys, *train_flags(domain_folder, folder, "--steps", "1", "--overwrite"))
    assert code == 2 and "holds no workbench run" in one_line(err)
    assert snapshot(folder) == before
    # an empty folder (or one with only a lock left behind) is fine to overwrite
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / LOCK_FILE).write_text("")
    make_trainer(tmp_path / "empty", domain_folder, overwrite=True, steps=1).fit()
    assert [s for s, _ in list_checkpoints(tmp_path / "empty")] == [1]


def test_an_empty_run_dir_is_refused(tmp_path, domain_folder, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "summary.json").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"run_dir='' is invalid: give a folder name"):
            make_trainer("", domain_folder, overwrite=overwrite)
    with pytest.raises(ValueError, match=r"run_dir='' is invalid"):
        Trainer.resume("")
    code, _, err = run_cli(capsys, *train_flags(domain_folder, "", "--overwrite"))
    assert code == 2 and "run_dir='' is invalid" in one_line(err)
    assert sorted(os.listdir(tmp_path)) == ["corpus", "summary.json"]


def test_a_run_without_checkpoints_keeps_its_files_without_overwrite(tmp_path, domain_folder):
    folder = tmp_path / "run"  # a run stopped before its first checkpoint
    folder.mkdir()
    write_json_atomic(folder / "run.json", new_run_info(MICRO_MODEL.to_dict(), TrainConfig().to_dict()))
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (folder / "summary.json").write_text("{}")
    before = snapshot(folder)
    with pytest.raises(ValueError, match=r"already holds metrics.jsonl, summary.json, run.json \(no checkpoint "
                                         r"to resume from\), which a new run would replace: replace that run "
                                         r"\(--overwrite"):
        make_trainer(folder, domain_folder)
    assert snapshot(folder) == before
    # files a run writes, in a folder that holds no run: never replaced either
    (folder / "run.json").unlink()
    with pytest.raises(ValueError, match=r"already holds metrics.jsonl, summary.json .*: move them away"):
        make_trainer(folder, domain_folder)


def test_overwrite_deletes_what_the_run_wrote_and_nothing_else(tmp_path, domain_folder, fake_wandb, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = Path("run")  # relative, as wandb then reports its folder
    make_trainer(folder, domain_folder).fit()
    ours = folder / "wandb" / "offline-run-2026-id0"
    assert ours.is_dir()
    (folder / "wandb" / "other").mkdir()
    (folder / "wandb" / "other" / "f").write_text("keep")
    (folder / "notes.txt").write_text("keep")
    (tmp_path / "outside").write_text("keep")
    info = read_run_info(folder)
    manifest = set(info.get("outputs", ()))
    info["outputs"] = [*info.get("outputs", ()), "../outside"]  # an edited manifest cannot reach out of the folder
    write_json_atomic(folder / "run.json", info)

    trainer = make_trainer(folder, domain_folder, overwrite=True, steps=1, checkpoint_every=1)
    assert not ours.exists() and not (folder / "wandb" / "latest-run").is_symlink()
    assert not list_checkpoints(folder) and not (folder / "metrics.jsonl").exists()
    assert not (folder / "run.json").exists()
    assert (folder / "wandb" / "other" / "f").read_text() == "keep"
    assert (folder / "notes.txt").read_text() == "keep" and (tmp_path / "outside").read_text() == "keep"
    assert {"run.json", "metrics.jsonl", "wandb/offline-run-2026-id0"} <= manifest
    trainer.fit()
    assert [s for s, _ in list_checkpoints(folder)] == [1]


# --- 2. one trainer at a time ------------------------------------------------------------------------


def test_a_running_fit_holds_the_run_dir(tmp_path, domain_folder, capsys):
    folder = tmp_path / "run"
    refused = []

    def second_trainer(trainer, row):
        if trainer.step != 2:
            return
        for attempt in (lambda: make_trainer(folder, domain_folder, overwrite=True),
                        lambda: make_trainer(folder, domain_folder),
                        lambda: Trainer.resume(folder)):
            with pytest.raises(RunDirBusy) as err:
                attempt()
            refused.append(str(err.value))
        code, _, err = run_cli(capsys, *train_flags(domain_folder, folder, "--overwrite"))
        refused.append((code, one_line(err)))

    make_trainer(folder, domain_folder, steps=3).fit(callback=second_trainer)
    assert len(refused) == 4
    for message in refused[:3]:
        assert f"run_dir={str(folder)!r} is in use: a workbench run is training there (pid {os.getpid()} on " \
               f"host {HOST}" in message
    assert refused[3][0] == 2 and f"pid {os.getpid()} on host {HOST}" in refused[3][1]
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and read_run_info(folder)["status"] == "finished"
    Trainer.resume(folder)  # the lock went with the fit


def test_a_lock_held_by_another_process_names_it_and_dies_with_it(tmp_path, domain_folder, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from workbench.train.rundir import RunLock; lock = "
                               "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)",
         str(folder)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        named = f"pid {holder.pid} on host {HOST}"
        with pytest.raises(RunDirBusy, match=re.escape(named)):
            make_trainer(folder, domain_folder, overwrite=True)
        code, _, err = run_cli(capsys, *train_flags(domain_folder, folder, "--overwrite"))
        assert code == 2 and named in one_line(err)
        with pytest.raises(RunDirBusy, match=re.escape(named)):
            RunLock(folder).acquire()
    finally:
        holder.kill()
        holder.wait()
    # the OS dropped the lock with its process: the file left behind is not a stale lock
    assert (folder / LOCK_FILE).exists()
    make_trainer(folder, domain_folder, steps=1).fit()
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()


# --- 3. a resume keeps every readable metrics row ---------------------------------------------------


def test_resume_sets_aside_unreadable_metrics_lines_and_keeps_every_other_row(tmp_path, domain_folder):
    folder = tmp_path / "run"
    make_trainer(folder, domain_folder, steps=6, keep_checkpoints=3).fit()
    list_checkpoints(folder)[-1][1].unlink()  # resumes from step 4
    path = folder / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = '{"loss": 5.1, "lm_lo\n'  # step 2, cut short
    lines[2] = "42\n"  # step 3, not a row
    lines.append('{"step": 7, "lo')  # a kill in the middle of a write
    path.write_text("".join(lines))

    trainer = Trainer.resume(folder)
    assert [r["step"] for r in trainer.history] == [1, 4]
    with pytest.warns(UserWarning) as caught:
        trainer.fit()
    said = [str(w.message) for w in caught]
    assert any(re.search(r"metrics.jsonl: lines 2, 3, 7 cannot be read .*set aside in .*metrics.jsonl.unreadable",
                         s) for s in said), said
    assert any("2 rows logged after step 4 (steps 5 to 6) dropped" in s for s in said), said
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 4, 5, 6]
    assert (folder / "metrics.jsonl.unreadable").read_text() == '{"loss": 5.1, "lm_lo\n42\n{"step": 7, "lo\n'
    assert "metrics.jsonl.unreadable" in read_run_info(folder)["outputs"]


def test_a_clean_metrics_file_is_not_rewritten(tmp_path, domain_folder):
    folder = tmp_path / "run"
    trainer = make_trainer(folder, domain_folder, steps=2, checkpoint_every=2)
    trainer.fit()
    before = (folder / "metrics.jsonl").stat().st_mtime_ns
    assert [r["step"] for r in trainer.metrics_log.truncate_after(2)] == [1, 2]
    assert (folder / "metrics.jsonl").stat().st_mtime_ns == before
    assert not (folder / "metrics.jsonl.unreadable").exists()


# --- 10. a closed stdout is a normal end ---------------------------------------------------------------


def test_show_into_a_closed_pipe_ends_quietly(tmp_path, domain_folder):
    folder = tmp_path / "run"
    make_trainer(folder, domain_folder, steps=2).fit()
    proc = subprocess.Popen(cli("show", str(folder)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=ENV)
    proc.stdout.close()  # `| true`: the reader is gone before the first line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err == b"", err.decode()


def test_train_into_head_trains_and_writes_its_summary(tmp_path, domain_folder):
    folder = tmp_path / "run"
    proc = subprocess.Popen(cli(*train_flags(domain_folder, folder, "--steps", "2")), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=ENV, text=True)
    assert proc.stdout.readline().startswith("model: ")
    proc.stdout.close()  # `| head -1`
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "summary failed" not in err and "Broken pipe" not in err, err
    assert json.loads((folder / "summary.json").read_text())["step"] == 2


# --- 17. SIGTERM and SIGHUP end a run as Ctrl-C does -----------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_with_one_line_naming_the_last_checkpoint(tmp_path, domain_folder, signum):
    folder = tmp_path / "run"
    proc = subprocess.Popen(cli(*train_flags(domain_folder, folder, "--steps", "100000", "--checkpoint-every", "3",
                                             "--eval-every", "100000")),
                            env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and not list_checkpoints(folder) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    last = list_checkpoints(folder)[-1][1]
    assert re.fullmatch(rf"workbench train: interrupted by {name} at step (\d+); the last checkpoint is "
                        rf"{re.escape(str(last))} \(continue with: workbench train --resume --run-dir "
                        rf"{re.escape(str(folder))}\)", one_line(err))
    run = read_run_info(folder)
    assert run["status"] == "interrupted" and re.fullmatch(rf"stopped by {name} at step \d+", run["message"])
    assert not list(folder.glob("*.tmp"))


def test_show_says_when_no_checkpoint_is_readable(tmp_path, domain_folder, capsys):
    folder = tmp_path / "run"
    make_trainer(folder, domain_folder, steps=4, keep_checkpoints=2).fit()
    older, newest = (p for _, p in list_checkpoints(folder))
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    code, out, _ = run_cli(capsys, "show", str(folder))
    assert code == 0 and f"last checkpoint: {older.name} (step 2)" in out
    # a folder holding only a truncated checkpoint holds no readable checkpoint, and says so
    alone = tmp_path / "alone"
    alone.mkdir()
    newest.rename(alone / newest.name)
    code, _, err = run_cli(capsys, "show", str(alone))
    assert code == 2
    assert f"holds no readable checkpoint: {newest.name} is unreadable" in one_line(err)
