"""Nothing lost: the run directory survives every fault, and each fault is one clear error.

The trainer-level half of issue 9 (the CLI half is in ``test_cli_train.py``): overwrite only
after every check, a finished run left alone, checkpoints checked against their config and
their run, the same wandb run on resume, a full disk, an unwritable run directory, devices,
vocabulary size, missing validation windows and misleading messages.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.train.conftest import MICRO_FLAGS, MICRO_MODEL, one_line, run_cli, snapshot
from workbench.train import CheckpointError, TrainConfig, Trainer, load_checkpoint
from workbench.train import checkpoint as checkpoint_module
from workbench.train.checkpoint import list_checkpoints
from workbench.train.rundir import json_safe, read_run_info
from workbench.train.trainer import resolve_device


def make_trainer(run_dir, data_dir, model=MICRO_MODEL, overwrite=False, **kw) -> Trainer:
    cfg = TrainConfig(run_dir=str(run_dir), data=str(data_dir), batch_size=4, eval_windows=2, progress=False,
                      **{"steps": 4, "eval_every": 4, "checkpoint_every": 2, **kw})
    return Trainer(model, cfg, overwrite=overwrite)


@pytest.fixture
def finished_run(tmp_path, domain_folder) -> Path:
    make_trainer(tmp_path / "run", domain_folder).fit()
    return tmp_path / "run"


def strict_json(text: str):
    """``json.loads`` that refuses NaN / Infinity, which Python's json would otherwise accept."""
    def refuse(name):
        raise ValueError(f"bare {name} in JSON")
    return json.loads(text, parse_constant=refuse)


# --- overwrite: everything is checked before the old run is deleted ---------------------------


@pytest.mark.parametrize("bad", ["data", "device", "vocab_size"])
def test_overwrite_checks_everything_before_deleting_the_old_run(finished_run, tmp_path, bad):
    before = snapshot(finished_run)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abc")
    cfg = TrainConfig(run_dir=str(finished_run), data=str(tiny) if bad == "data" else str(tmp_path / "corpus"),
                      device="cuda:99" if bad == "device" else "cpu", batch_size=4, eval_windows=2, steps=2,
                      progress=False)
    model = MICRO_MODEL.replace(vocab_size=100) if bad == "vocab_size" else MICRO_MODEL
    with pytest.raises(ValueError, match={"data": "data=.*too small", "device": "device='cuda:99' is invalid",
                                          "vocab_size": "vocab_size=100 is invalid"}[bad]):
        Trainer(model, cfg, overwrite=True)
    assert snapshot(finished_run) == before


def test_overwrite_replaces_the_run_once_the_new_one_is_checked(finished_run, domain_folder):
    (finished_run / "notes.txt").write_text("mine")  # not the run's: kept
    trainer = make_trainer(finished_run, domain_folder, overwrite=True, steps=1, checkpoint_every=1)
    assert list_checkpoints(finished_run) == [] and not (finished_run / "metrics.jsonl").exists()
    assert not (finished_run / "run.json").exists()
    trainer.fit()
    assert [s for s, _ in list_checkpoints(finished_run)] == [1]
    assert (finished_run / "notes.txt").read_text() == "mine"


# --- a finished run is left alone -----------------------------------------------------------


def test_resuming_a_finished_run_trains_nothing_and_writes_nothing(finished_run):
    before = snapshot(finished_run)
    folder_mtime = finished_run.stat().st_mtime_ns  # not even a file created and removed
    trainer = Trainer.resume(finished_run)
    assert trainer.finished and trainer.step == 4
    history = trainer.fit()
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert snapshot(finished_run) == before and finished_run.stat().st_mtime_ns == folder_mtime


# --- checkpoints are checked against their own config and against the run ------------------


def test_a_checkpoint_whose_tensors_do_not_match_its_config_is_named(finished_run):
    newest = list_checkpoints(finished_run)[-1][1]
    from safetensors import safe_open

    with safe_open(str(newest), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(newest))
    key = "model/blocks.1.ffn.experts.w1"
    assert key in tensors, sorted(tensors)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1], tensors[key].shape[2] + 8)
    metadata["tensors_sha256"] = checkpoint_module.tensors_digest(tensors)  # consistent, only the shape is wrong
    save_file(tensors, str(newest), metadata=metadata)

    named = rf"{re.escape(str(newest))}.*'model/blocks\.1\.ffn\.experts\.w1' has shape"
    with pytest.raises(CheckpointError, match=named):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match=rf"{newest.name}.*experts\.w1.*falling back to the previous checkpoint"):
        resumed = Trainer.resume(finished_run)
    assert resumed.step == 2


def test_a_checkpoint_from_another_run_is_refused_naming_the_field(finished_run, tmp_path, domain_folder):
    other = MICRO_MODEL.replace(moe=dataclasses.replace(MICRO_MODEL.moe, num_experts=8))
    make_trainer(tmp_path / "other", domain_folder, model=other, steps=2).fit()
    foreign = list_checkpoints(tmp_path / "other")[-1][1]
    planted = finished_run / "ckpt-00000006.safetensors"
    shutil.copy(foreign, planted)

    with pytest.warns(UserWarning, match=rf"{planted.name} belongs to another run: .*num_experts=8"):
        resumed = Trainer.resume(finished_run)
    assert resumed.step == 4  # the run's own newest checkpoint

    for _, path in list_checkpoints(finished_run):  # only the foreign one left
        if path != planted:
            path.unlink()
    with pytest.raises(CheckpointError, match=r"belongs to another run.*num_experts"):  # the one line: no warning
        Trainer.resume(finished_run)


def test_a_broken_only_checkpoint_does_not_claim_a_fallback(tmp_path, domain_folder):
    make_trainer(tmp_path / "run", domain_folder, steps=2, checkpoint_every=2).fit()
    (_, only), = list_checkpoints(tmp_path / "run")
    only.write_bytes(only.read_bytes()[:100])
    with warnings.catch_warnings(record=True) as record, \
            pytest.raises(CheckpointError, match=rf"no readable checkpoint.*{only.name}"):
        warnings.simplefilter("always")
        Trainer.resume(tmp_path / "run")
    assert not record  # the error is the one line: no warning repeats it, none claims a fallback


# --- the same wandb run after a resume ------------------------------------------------------


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, domain_folder, monkeypatch):
    calls = []

    class FakeRun:
        def __init__(self, id):
            self.id = id

        def log(self, *args, **kwargs):
            pass

        def finish(self):
            pass

    def init(**kwargs):
        calls.append(kwargs)
        return FakeRun(kwargs.get("id") or f"run{len(calls)}")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setenv("WANDB_MODE", "offline")

    class Interrupt(Exception):
        pass

    def stop(trainer, row):
        if trainer.step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        make_trainer(tmp_path / "run", domain_folder, steps=6).fit(callback=stop)
    assert calls[0]["id"] is None
    assert read_run_info(tmp_path / "run")["wandb_run_id"] == "run1"
    Trainer.resume(tmp_path / "run").fit()
    assert calls[1]["id"] == "run1" and calls[1]["resume"] == "allow"


# --- a full disk ----------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(path: Path, size: int):
    """A tmpfs of ``size`` bytes mounted at ``path``; skips where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the patched-writer variant covers this")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, stdin=subprocess.DEVNULL)


def _checkpoint_size(tmp_path, domain_folder) -> int:
    trainer = make_trainer(tmp_path / "probe", domain_folder, steps=1)
    trainer.train_step()
    return trainer.save().stat().st_size


def _patch_writer_to_fill_the_disk(monkeypatch):
    """The checkpoint writer writes half a file, then fails as a full disk does."""
    real = checkpoint_module.save_file

    def full_disk(tensors, filename, metadata=None):
        if Path(filename).name.startswith("ckpt-00000004"):
            real(tensors, filename, metadata=metadata)
            Path(filename).write_bytes(Path(filename).read_bytes()[:1000])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)


@pytest.mark.parametrize("how", ["tmpfs", "patched_writer"])
def test_a_full_disk_keeps_the_previous_checkpoint_and_is_one_line(tmp_path, domain_folder, monkeypatch, capsys,
                                                                    how):
    if how == "tmpfs":
        size = _checkpoint_size(tmp_path, domain_folder)
        # room for one checkpoint and the small files, not for a second checkpoint
        stack = small_tmpfs(tmp_path / "disk", int(size * 1.5) // 4096 * 4096)
    else:
        _patch_writer_to_fill_the_disk(monkeypatch)
        stack = contextlib.nullcontext(tmp_path / "disk")
    with stack as disk:
        run_dir = disk / "run"
        code, out, err = run_cli(capsys, "train", "--data", str(domain_folder), *MICRO_FLAGS, "--steps", "6",
                                 "--checkpoint-every", "2", "--eval-every", "100", "--no-progress",
                                 "--run-dir", str(run_dir))
        assert code == 2
        line = one_line(err)
        assert "could not write checkpoint" in line and "ckpt-00000004" in line
        assert "No space left on device" in line and "ckpt-00000002.safetensors is kept" in line
        assert [s for s, _ in list_checkpoints(run_dir)] == [2]
        assert not list(run_dir.glob("*.tmp"))
        assert load_checkpoint(run_dir / "ckpt-00000002.safetensors").step == 2  # intact
        assert read_run_info(run_dir)["status"] == "failed"


# --- a run directory that cannot be written: found before the first step ------------------


@contextlib.contextmanager
def without_root_file_override():
    """Make permission bits bind this thread even as root (drop CAP_DAC_OVERRIDE from the effective
    set, restored after). A plain user needs nothing."""
    if os.geteuid() != 0:
        yield
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        header, data = Header(0x20080522, 0), (Data * 2)()
        if libc.capget(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), "capget")
        saved = data[0].effective
        data[0].effective &= ~((1 << 1) | (1 << 2))  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.capset(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), "capset")
    except (OSError, AttributeError) as err:
        pytest.skip(f"running as root without a way to drop CAP_DAC_OVERRIDE ({err})")
    try:
        yield
    finally:
        data[0].effective = saved
        libc.capset(ctypes.byref(header), data)


@pytest.mark.parametrize("case", ["existing_file", "parent_is_a_file", "permission_denied"])
def test_an_unwritable_run_dir_is_refused_before_the_first_step(tmp_path, domain_folder, case, monkeypatch):
    steps_run = []
    monkeypatch.setattr(Trainer, "train_step", lambda self: steps_run.append(1))
    guard = contextlib.nullcontext()
    if case == "existing_file":
        run_dir = tmp_path / "file"
        run_dir.write_text("x")
        needle = "it is an existing file"
    elif case == "parent_is_a_file":
        (tmp_path / "file").write_text("x")
        run_dir = tmp_path / "file" / "run"
        needle = "is a file, not a folder"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        run_dir = locked / "run"
        needle = "cannot be written (Permission denied)"
        guard = without_root_file_override()
    try:
        with guard, pytest.raises(ValueError, match=rf"run_dir='{re.escape(str(run_dir))}' is invalid: .*"
                                                   rf"{re.escape(needle)}"):
            make_trainer(run_dir, domain_folder)
    finally:
        if case == "permission_denied":
            locked.chmod(0o700)
    assert steps_run == []


# --- devices, vocabulary, data -------------------------------------------------------------


@pytest.mark.parametrize("name, needle", [
    ("cuda:99", "CUDA"), ("mps", "MPS"), ("npu", "torch_npu"), ("cpu:abc", "allowed values are auto, cpu"),
])
def test_a_device_this_torch_cannot_use_is_named(name, needle):
    if name == "npu" and "torch_npu" in sys.modules:
        pytest.skip("torch_npu is installed")
    if name == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(ValueError, match=rf"device={name!r} is invalid: .*{needle}"):
        if name == "cpu:abc":
            TrainConfig(device=name)
        resolve_device(name)


def test_cuda_without_cuda_is_named():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here (cuda:99 covers a missing device)")
    with pytest.raises(ValueError, match=r"device='cuda' is invalid: this torch build cannot use CUDA"):
        resolve_device("cuda")


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path, domain_folder):
    with pytest.raises(ValueError, match=r"vocab_size=255 is invalid: .*must be >= 256"):
        make_trainer(tmp_path / "run", domain_folder, model=MICRO_MODEL.replace(vocab_size=255))
    make_trainer(tmp_path / "run", domain_folder, model=MICRO_MODEL.replace(vocab_size=256))  # the boundary


def test_an_empty_data_path_is_refused():
    with pytest.raises(ValueError, match=r"data='' is invalid: give a text file or a folder"):
        TrainConfig(data="")
    with pytest.raises(ValueError, match=r"data='  ' is invalid"):
        TrainConfig(data="  ")


def test_too_little_builtin_text_blames_max_bytes_per_domain(tmp_path):
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), max_bytes_per_domain=10, progress=False)
    with pytest.raises(ValueError, match=r"^max_bytes_per_domain=10 is invalid: the built-in corpus then has 0 "
                                         r"training tokens, fewer than one window of seq_len \+ 1 = 33"):
        Trainer(MICRO_MODEL, cfg)


# --- no validation window: missing, never 0.000 -------------------------------------------


def test_without_validation_windows_the_loss_is_missing_with_a_reason(tmp_path, capsys):
    data = tmp_path / "notes.txt"
    data.write_text("a few words of text, repeated. " * 20)  # one short document: nothing held out
    code, out, err = run_cli(capsys, "train", "--data", str(data), *MICRO_FLAGS, "--steps", "2", "--eval-every", "1",
                             "--no-progress", "--run-dir", str(tmp_path / "run"))
    assert code == 0, err
    assert "0.000" not in out
    assert "validation loss at step 2 (nats/byte): notes n/a | all n/a" in out
    assert "notes: n/a, no document was held out for validation" in out
    summary = strict_json((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_loss"] is None and summary["val_loss_per_domain"] == {"notes": None}
    assert "no document was held out" in summary["val_missing"]["notes"]
    rows = [strict_json(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/loss"] for r in rows] == [None, None]
    assert all("notes" in r["val_missing"] for r in rows)


def test_json_never_gets_a_bare_nan(tmp_path):
    from workbench.train.loggers import JsonlLogger

    log = JsonlLogger(tmp_path / "m.jsonl")
    log.log({"step": 1, "loss": float("nan"), "load": [0.5, float("inf")]})
    assert strict_json(log.path.read_text()) == {"step": 1, "loss": None, "load": [0.5, None]}
    assert json_safe({"a": (1.0, -math.inf)}) == {"a": [1.0, None]}

