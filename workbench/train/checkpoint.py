"""Checkpoints: one safetensors file per save, written atomically, loaded with integrity checks.

A checkpoint holds everything needed to continue a run bit for bit: model parameters and
buffers (the loss-free balancing bias included), AdamW moments, the schedule position, the
RNG states, the data position (the step: batches are a pure function of seed and step) and
both configs. Tensors go in the safetensors body; the rest is JSON in its metadata header.

Writing goes to ``<name>.tmp`` first, is fsynced, then renamed over the final name, so a
crash (even SIGKILL) leaves either the previous checkpoint or the new one, never half a file.
A write that fails (disk full, permission lost) removes its temporary file and raises
``CheckpointError``; older checkpoints are pruned only after the new one is in place.

Every checkpoint records a SHA-256 of its tensors (``tensors_sha256`` in its metadata, so it is
written atomically with them). Loading checks a checkpoint against that checksum (bytes changed
on disk are caught before they change the run), against itself (every tensor has the shape its
recorded ``model_config`` gives, optimizer moments match their parameters, both configs are
valid) and, when the run directory has a ``run.json``, against the run (a checkpoint copied in
from another run is refused). Checkpoints written before the checksum existed load unchecked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "moe-workbench-checkpoint-1"
_NAME = re.compile(r"^ckpt-(\d{8})\.safetensors$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or not one of ours."""


@dataclass
class Checkpoint:
    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    rng_state: dict[str, Any]
    model_config: dict[str, Any]
    train_config: dict[str, Any]
    path: Path | None = None


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt-{step:08d}.safetensors"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints in ``run_dir`` (temporary files ignored), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order.

    Computed from the tensors (not the file) so that the digest can go in the file's own
    metadata; loading recomputes it from what it read.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def capture_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _optimizer_to_flat(optimizer: torch.optim.Optimizer, param_names: dict[int, str],
                       state_dict: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdamW's state keyed by parameter *name* (robust to parameter order) plus its groups."""
    sd = optimizer.state_dict() if state_dict is None else state_dict
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        name = param_names[idx]
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim/{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [param_names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Back to a ``torch.optim`` state dict, parameters numbered by their order in the groups."""
    index: dict[str, int] = {}
    groups = []
    for g in meta["param_groups"]:
        ids = []
        for name in g["params"]:
            index[name] = len(index)
            ids.append(index[name])
        groups.append({**g, "params": ids})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, name, field = key.split("/", 2)
        state.setdefault(index[name], {})[field] = value
    for name, scalars in meta["scalars"].items():
        state.setdefault(index[name], {}).update(scalars)
    return {"state": state, "param_groups": groups}


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, model_config: dict[str, Any], train_config: dict[str, Any],
                    keep: int | None = None, *, model_state: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write ``ckpt-<step>.safetensors`` atomically; then keep only the newest ``keep`` files.

    ``model_state`` and ``optimizer_state`` replace ``model.state_dict()`` and
    ``optimizer.state_dict()`` when given: an expert-parallel run passes its experts gathered
    into the single-process layout (``workbench.parallel.state``), so every checkpoint has it.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if model_state is None:
        model_state = model.state_dict()
    # Shared storage (tied embeddings) cannot be saved twice by safetensors: clone each entry.
    tensors = {f"model/{k}": v.detach().cpu().clone().contiguous() for k, v in model_state.items()}
    # The optimizer numbers parameters by their order in its groups, not in the model: map
    # each one to its name through its identity.
    by_id = {id(p): n for n, p in model.named_parameters()}
    ordered = [p for g in optimizer.param_groups for p in g["params"]]
    param_names = {i: by_id[id(p)] for i, p in enumerate(ordered)}
    optim_tensors, optim_meta = _optimizer_to_flat(optimizer, param_names, optimizer_state)
    tensors.update(optim_tensors)
    rng = capture_rng_state()
    tensors["rng/torch"] = rng["torch"]
    for i, s in enumerate(rng.get("cuda", [])):
        tensors[f"rng/cuda/{i}"] = s
    metadata = {
        "format": FORMAT,
        "tensors_sha256": tensors_digest(tensors),
        "step": str(step),
        # batches are a pure function of (seed, batch index): this many have been consumed
        "data_position": str(step * train_config.get("grad_accum", 1)),
        "model_config": json.dumps(model_config),
        "train_config": json.dumps(train_config),
        "optimizer": json.dumps(optim_meta),
        "scheduler": json.dumps(scheduler.state_dict()),
        "rng_python": json.dumps(rng["python"]),
    }
    final = checkpoint_path(run_dir, step)
    try:
        write_atomically(tensors, metadata, final)
    except BaseException as err:
        if isinstance(err, OSError) or _is_io_error(err):
            previous = list_checkpoints(run_dir)
            kept = (f"the previous checkpoint {previous[-1][1]} is kept" if previous
                    else "no earlier checkpoint exists")
            raise CheckpointError(f"could not write checkpoint {final}: {_describe_os_error(err)}; {kept}") from err
        raise
    if keep is not None:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return final


def write_atomically(tensors: dict[str, torch.Tensor], metadata: dict[str, str], final: Path) -> None:
    """Write a safetensors file so that ``final`` is either what it was or complete: a temporary
    file beside it, fsynced, renamed over it, then the folder fsynced. On any error, Ctrl-C
    included, the temporary file is removed and the error raised as it came (callers word it)."""
    tmp = final.with_name(final.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        # safetensors creates its file 0600; give it the mode every other run file gets (0666 less
        # the umask), so colleagues who can read the run directory can read its checkpoints
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:  # KeyboardInterrupt too: never leave a temporary file behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


def _umask() -> int:
    """This process's umask, read without changing it where Linux tells it (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_io_error(err: BaseException) -> bool:
    """safetensors reports a failed write (``ENOSPC``...) as its own exception type, not OSError."""
    return type(err).__name__ == "SafetensorError"


def _describe_os_error(err: BaseException) -> str:
    """``No space left on device``, from an OSError or from safetensors' wrapped I/O error text."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err)
    m = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", text)
    return m.group(1) if m else (text or type(err).__name__)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _python_rng(value: Any) -> Any:
    """JSON turned random.getstate()'s tuples into lists; rebuild them."""
    version, internal, gauss = value
    return (version, tuple(internal), gauss)


def load_checkpoint(path: Path, *, check_shapes: bool = True) -> Checkpoint:
    """Read and verify one checkpoint; ``CheckpointError`` names the file when it is unusable.

    With ``check_shapes`` (the default) every model tensor must have the shape that the
    checkpoint's own ``model_config`` gives, and every optimizer moment its parameter's shape.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt): {err}") from err
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} file (format={metadata.get('format')!r})")
    recorded = metadata.get("tensors_sha256")  # absent in checkpoints written before it existed
    if recorded is not None and tensors_digest(tensors) != recorded:
        raise CheckpointError(f"checkpoint {path} is corrupt: its tensors do not match the SHA-256 recorded "
                              "when it was written (its bytes changed on disk)")
    try:
        rng: dict[str, Any] = {"torch": tensors.pop("rng/torch"),
                               "python": _python_rng(json.loads(metadata["rng_python"]))}
        cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
        if cuda:
            rng["cuda"] = [tensors.pop(k) for k in cuda]
        model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        optim_tensors = {k: v for k, v in tensors.items() if k.startswith("optim/")}
        ckpt = Checkpoint(
            step=int(metadata["step"]),
            model_state=model_state,
            optimizer_state=_optimizer_from_flat(optim_tensors, json.loads(metadata["optimizer"])),
            scheduler_state=json.loads(metadata["scheduler"]),
            rng_state=rng,
            model_config=json.loads(metadata["model_config"]),
            train_config=json.loads(metadata["train_config"]),
            path=path,
        )
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing or bad entry {err}") from err
    for section in ("model_config", "train_config"):
        if (problem := config_problem(section, getattr(ckpt, section))) is not None:
            raise CheckpointError(f"checkpoint {path} records an invalid {section}: {problem}")
    if check_shapes:
        _check_shapes(path, ckpt.model_config, model_state, optim_tensors)
    return ckpt


def _type_problem(kind: Any, value: Any) -> str | None:
    """What is wrong with ``value`` for a config field annotated ``kind`` (as JSON gives it back)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) < len(typing.get_args(kind)):
        return None if value is None else _type_problem(args[0], value)  # X | None
    if kind is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if kind is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if kind is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "must be a number"
    if kind is str:
        return None if isinstance(value, str) else "must be a string"
    if typing.get_origin(kind) is tuple:
        return None if isinstance(value, list) else "must be a list"
    if dataclasses.is_dataclass(kind):
        return None if isinstance(value, dict) else "must be an object of its fields"
    return None


def config_problem(section: str, value: Any) -> str | None:
    """Why ``value`` is not a valid recorded ``model_config`` / ``train_config`` (a run file edited
    by hand, a field of the wrong type), naming the field; None when it is valid."""
    from workbench.config import ModelConfig, MoEConfig
    from workbench.train.config import TrainConfig

    cls = {"model_config": ModelConfig, "train_config": TrainConfig}[section]
    if not isinstance(value, dict):
        return f"{value!r} is not an object of {cls.__name__} fields"
    checks: list[tuple[type, dict[str, Any], str]] = [(cls, value, "")]
    if isinstance(value.get("moe"), dict) and cls is ModelConfig:
        checks.append((MoEConfig, value["moe"], "moe."))
    for kind, fields, prefix in checks:
        hints = typing.get_type_hints(kind)
        for name, v in fields.items():
            if name in hints and (why := _type_problem(hints[name], v)) is not None:
                return f"{prefix}{name}={v!r} is invalid: {why}"
    try:
        cls.from_dict(value)
    except (ValueError, TypeError) as err:
        return " ".join(str(err).split())
    return None


def expected_shapes(model_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shape of every state-dict entry of ``MoELM`` built from ``model_config``.

    The model is built on the meta device: no memory, no initialisation cost.
    """
    from workbench.config import ModelConfig
    from workbench.model import MoELM

    cfg = ModelConfig.from_dict(model_config)
    with warnings.catch_warnings():  # e.g. expert choice's causality warning: not news when loading
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = MoELM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_shapes(path: Path, model_config: dict[str, Any], model_state: dict[str, torch.Tensor],
                  optim_tensors: dict[str, torch.Tensor]) -> None:
    try:
        want = expected_shapes(model_config)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} records an invalid model_config: {err}") from err
    prefix = f"checkpoint {path} does not match its recorded model_config"
    missing = sorted(set(want) - set(model_state))
    if missing:
        raise CheckpointError(f"{prefix}: tensor 'model/{missing[0]}' is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(set(model_state) - set(want))
    if extra:
        raise CheckpointError(f"{prefix}: tensor 'model/{extra[0]}' is not part of that model"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name, shape in want.items():
        got = tuple(model_state[name].shape)
        if got != shape:
            raise CheckpointError(f"{prefix}: tensor 'model/{name}' has shape {got}, the config gives {shape}")
    for key, value in optim_tensors.items():
        _, name, field = key.split("/", 2)
        if name not in want:
            raise CheckpointError(f"{prefix}: optimizer state {key!r} names no parameter of that model")
        if value.dim() > 0 and tuple(value.shape) != want[name]:
            raise CheckpointError(f"{prefix}: optimizer state {key!r} has shape {tuple(value.shape)}, "
                                  f"its parameter has {want[name]}")


# Settings that may differ between a run's checkpoints: where the run lives, how it shows progress,
# and the device it runs on (a resume may move it: Trainer.resume(device=...)).
# what a resume may change: how this process runs the run, and its length (--resume --steps N)
_PER_PROCESS = ("run_dir", "progress", "device", "steps")


def config_difference(ckpt: Checkpoint, run: dict[str, Any]) -> str | None:
    """The first field where ``ckpt``'s configs differ from the run's (``run.json``), or None."""
    for section in ("model_config", "train_config"):
        ours, theirs = _flatten(run.get(section) or {}), _flatten(getattr(ckpt, section))
        for key in sorted(set(ours) | set(theirs)):
            if key in _PER_PROCESS:
                continue
            if ours.get(key, "<unset>") != theirs.get(key, "<unset>"):
                return (f"its {section} has {key}={theirs.get(key, '<unset>')!r}, "
                        f"the run's (run.json) has {key}={ours.get(key, '<unset>')!r}")
    return None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def latest_usable_checkpoint(run_dir: Path, run: dict[str, Any] | None = None
                             ) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint that loads and, when ``run`` (``run.json``) is given, belongs to that
    run; plus one line for each newer checkpoint that was skipped and why.

    When one is found, each skipped one is warned about (one line: the file, why, the fallback).
    When none is, nothing is warned: the caller reports ``skipped`` as its one error.
    """
    skipped: list[str] = []
    candidates = list(reversed(list_checkpoints(run_dir)))
    for i, (_, path) in enumerate(candidates):
        try:
            ckpt = load_checkpoint(path)
            if run is not None and (diff := config_difference(ckpt, run)) is not None:
                raise CheckpointError(f"checkpoint {path} belongs to another run: {diff}")
        except CheckpointError as err:
            skipped.append(f"{err}")
            continue
        for why, older in zip(skipped, candidates[1:i + 1], strict=True):
            warnings.warn(f"{why}; falling back to the previous checkpoint {older[1].name}", stacklevel=3)
        return ckpt, skipped
    return None, skipped


def last_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint in ``run_dir`` that loads and matches its checksum, or None: what a
    message may call "the last good checkpoint" (never a corrupt or truncated file)."""
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            load_checkpoint(path)
        except CheckpointError:
            continue
        return path
    return None


def load_latest_checkpoint(run_dir: Path, run: dict[str, Any] | None = None) -> Checkpoint | None:
    """The newest usable checkpoint (see ``latest_usable_checkpoint``); unusable newer ones are
    skipped with a warning that names the file and why, and None comes with one saying why."""
    ckpt, skipped = latest_usable_checkpoint(run_dir, run)
    if ckpt is None and skipped:
        warnings.warn(f"no usable checkpoint in {run_dir}: {'; '.join(skipped)}", stacklevel=2)
    return ckpt
