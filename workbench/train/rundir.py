"""The run directory: what a run writes there, ``run.json``, and the checks made before writing.

A run directory holds::

    run.json                  what the run is (both configs), its wandb id, and how it ended
    ckpt-<step>.safetensors   checkpoints (see ``checkpoint.py``)
    metrics.jsonl             one row per optimizer step
    summary.json, report.png  written by ``workbench train`` at the end
    wandb/                    wandb's offline files, when tracking is on

``run.json`` is written when training starts and rewritten (atomically) when it ends, so a
resumed run continues the same wandb run and ``workbench show`` can tell a finished run from
a diverged or interrupted one. JSON written here never holds a bare ``NaN``: non-finite
numbers become ``null``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
RUN_FORMAT = "moe-workbench-run-1"
# What a run writes besides its checkpoints; ``clear_run`` removes exactly these.
RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "report.png", RUN_FILE)


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
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "updated": None}


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


def clear_run(run_dir: Path) -> None:
    """Remove what a run wrote (checkpoints, their temporary files, ``RUN_OUTPUTS``, ``wandb/``);
    anything else in the folder stays."""
    from workbench.train.checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for _, path in list_checkpoints(run_dir):
        path.unlink(missing_ok=True)
    for path in run_dir.glob("ckpt-*.safetensors.tmp"):
        path.unlink(missing_ok=True)
    for name in RUN_OUTPUTS:
        (run_dir / name).unlink(missing_ok=True)
    if (run_dir / "wandb").is_dir():
        shutil.rmtree(run_dir / "wandb")


# run.json's fields besides the configs, and what each must be (JSON types): a hand-edited file
# is refused naming the field, rather than failing deep inside a resume or ``show``.
_RUN_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "status": ((str,), "a string"), "message": ((str, type(None)), "a string or null"),
    "step": ((int,), "an integer >= 0"), "wandb_run_id": ((str, type(None)), "a string or null"),
    "pid": ((int, type(None)), "an integer or null"), "host": ((str, type(None)), "a string or null"),
    "started": ((str, type(None)), "a string or null"), "updated": ((str, type(None)), "a string or null"),
    "last_checkpoint": ((str, type(None)), "a string or null"),
    "data_fingerprint": ((dict, type(None)), "an object or null"), "data_changes": ((list,), "a list"),
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
