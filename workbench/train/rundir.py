"""The run directory: what a run writes there, ``run.json``, and the checks made before writing.

A run directory holds::

    run.json                  what the run is (both configs), its wandb id, and how it ended; for a
                              fine-tuning, where its weights came from and what it trained
    ckpt-<step>.safetensors   checkpoints (see ``checkpoint.py``)
    metrics.jsonl             one row per optimizer step
    summary.json, report.png  written by ``workbench train`` at the end
    wandb/                    wandb's offline files, when tracking is on
    run.lock                  the run's lock (``RunLock``): kept, empty of meaning once its process ends

``run.json`` is written when training starts and rewritten (atomically) when it ends, so a
resumed run continues the same wandb run and ``workbench show`` can tell a finished run from
a diverged or interrupted one. JSON written here never holds a bare ``NaN``: non-finite
numbers become ``null``.

``run.json`` also lists what the run wrote (``outputs``, besides its checkpoints): replacing a
run (``clear_run``, ``--overwrite``) deletes exactly that, and only in a folder that holds a run.
While a process trains, it holds an OS-level lock on ``run.lock`` (``RunLock``), so a second
trainer on the same folder is refused naming the first one's pid and host; the OS drops the lock
when its process ends, however it ends, so a lock is never stale.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked
    fcntl = None

RUN_FILE = "run.json"
RUN_FORMAT = "moe-workbench-run-1"
LOCK_FILE = "run.lock"
# The files a run writes under fixed names besides its checkpoints (``metrics.jsonl.unreadable``:
# the lines of metrics.jsonl a resume could not read, set aside). ``clear_run`` removes these and
# what ``run.json`` lists as the run's ``outputs`` (its wandb folder), in a folder that holds a run.
RUN_OUTPUTS = ("metrics.jsonl", "metrics.jsonl.unreadable", "summary.json", "report.png", RUN_FILE)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """Strict JSON (``allow_nan=False`` after ``json_safe``), written to a temporary file and renamed."""
    path = Path(path)
    text = json.dumps(json_safe(data), indent=2, allow_nan=False)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_run_info(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``run.json``, or None when there is none (a run from before it existed) or it is unreadable."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        warnings.warn(f"{path} is unreadable ({err}); it is ignored", stacklevel=2)
        return None
    return info if isinstance(info, dict) and info.get("format") == RUN_FORMAT else None


def new_run_info(model_config: dict[str, Any], train_config: dict[str, Any]) -> dict[str, Any]:
    return {"format": RUN_FORMAT, "model_config": model_config, "train_config": train_config,
            "wandb_run_id": None, "status": "running", "message": None, "step": 0,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "updated": None, "outputs": [RUN_FILE]}


def add_outputs(run_dir: Path, info: dict[str, Any], *paths: str | Path) -> None:
    """List ``paths`` (files or folders the run wrote) among ``info``'s ``outputs``, the manifest
    ``clear_run`` deletes; ``run.json`` is rewritten by the next ``update_run_info``. A path outside
    ``run_dir`` is not the run's to delete and is left out."""
    run_dir = Path(run_dir)
    outputs = [o for o in info.get("outputs") or [] if isinstance(o, str)]
    for path in paths:
        path = Path(path)
        relative = os.path.relpath(path, run_dir) if path.is_absolute() else str(path)
        if _inside(run_dir, relative) and relative not in outputs:
            outputs.append(relative)
    info["outputs"] = outputs


def _inside(run_dir: Path, relative: str) -> bool:
    """``relative`` names something strictly inside ``run_dir`` (no absolute path, no ``..``)."""
    if not relative or os.path.isabs(relative) or ".." in Path(relative).parts:
        return False
    return Path(relative).parts not in ((), (".",))


def update_run_info(run_dir: Path, info: dict[str, Any], **changes: Any) -> None:
    """Record ``changes`` in ``info`` and rewrite ``run.json``. Best effort: a failed write (the
    disk that just filled up) warns, since the run's own error is the one to report."""
    info.update(changes, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    try:
        write_json_atomic(Path(run_dir) / RUN_FILE, info)
    except OSError as err:
        warnings.warn(f"could not update {Path(run_dir) / RUN_FILE}: {err.strerror or err}", stacklevel=2)


def check_run_dir(run_dir: Path) -> None:
    """``run_dir`` is, or can be made, a folder this process can write; else ``ValueError`` naming it.

    Creates the folder (and its parents) when missing, and writes and removes one probe file:
    permissions, read-only mounts and a full disk's missing inodes show up here, before the
    first step, rather than at the first checkpoint.
    """
    run_dir = Path(run_dir)
    shown = str(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir={shown!r} is invalid: it is an existing file, not a folder")
    for parent in run_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"run_dir={shown!r} is invalid: {str(parent)!r} is a file, not a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise ValueError(f"run_dir={shown!r} is invalid: it cannot be written "
                         f"({err.strerror or type(err).__name__})") from err


def check_run_dir_name(run_dir: str | Path) -> None:
    """``ValueError`` for an empty ``run_dir``: ``Path("")`` is the current directory, where a run
    (and ``overwrite``) would mix with whatever is there."""
    if not str(run_dir).strip():
        raise ValueError(f"run_dir={str(run_dir)!r} is invalid: give a folder name (it would be the current "
                         "directory); e.g. runs/demo")


def holds_run(run_dir: Path) -> bool:
    """``run_dir`` holds a workbench run: a ``run.json`` of ours, or checkpoints (runs from before
    ``run.json`` existed)."""
    from workbench.train.checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    if (run_dir / RUN_FILE).is_file():
        with warnings.catch_warnings():  # an unreadable run.json is reported where it is used
            warnings.simplefilter("ignore")
            if read_run_info(run_dir) is not None:
                return True
    return bool(list_checkpoints(run_dir))


def check_new_run_dir(run_dir: Path, overwrite: bool) -> None:
    """What a new run may do in ``run_dir``, checked before anything is written; ``ValueError``
    naming ``run_dir`` and the files in the way.

    Without ``overwrite`` a folder must not hold a run's checkpoints, nor any file a run writes
    (``RUN_OUTPUTS``: a run without checkpoints would lose them silently). With ``overwrite`` it
    must hold a run (its files are deleted, nothing else) or be empty.
    """
    from workbench.train.checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    shown = str(run_dir)
    if not run_dir.is_dir():
        return
    if overwrite:
        if holds_run(run_dir):
            return
        others = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)
        if others:
            listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise ValueError(f"run_dir={shown!r} is invalid for overwrite: it holds no workbench run (no {RUN_FILE} "
                             f"or checkpoint) but other files ({listed}), and overwrite deletes only a run's "
                             "files; choose an empty or new folder")
        return
    if list_checkpoints(run_dir):
        raise ValueError(f"run_dir={shown!r} already holds checkpoints: resume it (--resume / Trainer.resume), "
                         "replace it (--overwrite / overwrite=True) or choose another run_dir")
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if found:
        advice = ("replace that run (--overwrite / overwrite=True)" if holds_run(run_dir)
                  else "move them away")
        raise ValueError(f"run_dir={shown!r} already holds {', '.join(found)} (no checkpoint to resume from), "
                         f"which a new run would replace: {advice} or choose another run_dir")


def clear_run(run_dir: Path) -> None:
    """Remove what the run in ``run_dir`` wrote: its checkpoints (and their temporary files),
    ``RUN_OUTPUTS``, and the ``outputs`` its ``run.json`` lists (its wandb folders); anything else
    in the folder stays. ``run.json`` goes last, so a clear cut short can be run again.

    Refuses (``ValueError``) a folder that holds no run but other files (``check_new_run_dir``).
    """
    from workbench.train.checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    check_new_run_dir(run_dir, overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = read_run_info(run_dir) or {}
    recorded = [o for o in info.get("outputs") or [] if isinstance(o, str) and _inside(run_dir, o)]
    run_id = info.get("wandb_run_id")
    if "outputs" not in info and isinstance(run_id, str) and run_id:  # a run from before the manifest
        recorded += [str(p.relative_to(run_dir)) for p in (run_dir / "wandb").glob(f"*run-*-{run_id}")]
    for _, path in list_checkpoints(run_dir):
        path.unlink(missing_ok=True)
    for path in run_dir.glob("ckpt-*.safetensors.tmp"):
        path.unlink(missing_ok=True)
    for name in [*recorded, *RUN_OUTPUTS, *(f"{n}.tmp" for n in RUN_OUTPUTS)]:
        if name != RUN_FILE:
            _remove(run_dir / name)
    wandb = run_dir / "wandb"
    if wandb.is_dir() and not wandb.is_symlink():  # wandb's latest-run and debug*.log links, when dangling now
        for link in wandb.iterdir():
            if link.is_symlink() and not link.exists():
                link.unlink()
        with contextlib.suppress(OSError):
            wandb.rmdir()  # only when empty
    (run_dir / RUN_FILE).unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


# --- the lock ----------------------------------------------------------------------------------


class RunDirBusy(ValueError):
    """Another process holds the run directory's lock: a run is training there."""


def _holder(path: Path) -> str:
    """Who holds the lock at ``path``, from what its holder wrote in it."""
    try:
        holder = json.loads(path.read_text())
        return f"pid {int(holder['pid'])} on host {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # its holder is just writing it
        return "a process that has just started"


def _busy(run_dir: Path) -> RunDirBusy:
    return RunDirBusy(f"run_dir={str(run_dir)!r} is in use: a workbench run is training there "
                      f"({_holder(Path(run_dir) / LOCK_FILE)}); wait for it to end, stop it, or choose another "
                      "run_dir")


def check_not_locked(run_dir: Path) -> None:
    """``RunDirBusy`` when a live process holds ``run_dir``'s lock. Read only: creates and writes nothing."""
    path = Path(run_dir) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # unreadable: taking the lock will tell
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a shared lock conflicts only with a holder's
    except BlockingIOError:
        raise _busy(run_dir) from None
    except OSError:
        pass  # a file system without locks (some network mounts): nothing to check
    finally:
        os.close(fd)


class RunLock:
    """An exclusive lock on a run directory for as long as a run trains there.

    ``run.lock`` is created if missing and locked with ``fcntl.flock``; the holder writes its pid,
    host and start time in it so a refused process can say who holds it. The OS releases the lock
    when the holder's process ends (even by SIGKILL), so a leftover ``run.lock`` is never stale; the
    file itself stays (deleting it would let two processes lock two different files). Another
    process, or another ``RunLock`` in this one, gets ``RunDirBusy`` naming the holder.

        with RunLock(run_dir):
            ...  # train
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if fcntl is None or self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ValueError(f"run_dir={str(self.run_dir)!r} is invalid: its lock file {self.path} cannot be "
                             f"written ({err.strerror or type(err).__name__})") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(self.run_dir) from None
        except OSError as err:  # a file system without locks: train unlocked rather than not at all
            warnings.warn(f"cannot lock {self.path} ({err.strerror or err}); this run directory is not "
                          "protected from a second trainer", stacklevel=2)
        self._fd = fd
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with contextlib.suppress(OSError):  # who holds it is a courtesy; the lock is what counts
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        return self

    def release(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:  # a trainer dropped mid-fit must not keep its folder locked
        self.release()


# run.json's fields besides the configs, and what each must be (JSON types): a hand-edited file
# is refused naming the field, rather than failing deep inside a resume or ``show``.
_RUN_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "status": ((str,), "a string"), "message": ((str, type(None)), "a string or null"),
    "step": ((int,), "an integer >= 0"), "wandb_run_id": ((str, type(None)), "a string or null"),
    "pid": ((int, type(None)), "an integer or null"), "host": ((str, type(None)), "a string or null"),
    "started": ((str, type(None)), "a string or null"), "updated": ((str, type(None)), "a string or null"),
    "last_checkpoint": ((str, type(None)), "a string or null"),
    "data_fingerprint": ((dict, type(None)), "an object or null"), "data_changes": ((list,), "a list"),
    # where a fine-tuning's weights came from (--init-from) and what it trained (--trainable, ESFT's experts)
    "init_from": ((dict, type(None)), "an object or null"), "trainable": ((dict, type(None)), "an object or null"),
}


def check_run_info(run_dir: Path, info: dict[str, Any]) -> None:
    """``ValueError`` naming ``run.json`` and the field when ``info`` (as ``read_run_info`` gave it)
    is not what a run writes: configs that do not load, a status that is not a string..."""
    from workbench.train.checkpoint import config_problem

    path = Path(run_dir) / RUN_FILE
    for section in ("model_config", "train_config"):
        if (problem := config_problem(section, info.get(section))) is not None:
            raise ValueError(f"{path} is invalid: its {section} is not one a run writes: {problem}")
    for name, (types_, what) in _RUN_FIELDS.items():
        if name not in info:
            continue
        value = info[name]
        ok = isinstance(value, types_) and not isinstance(value, bool) and not (name == "step" and value < 0)
        if not ok:
            raise ValueError(f"{path} is invalid: {name}={value!r}, must be {what}")
