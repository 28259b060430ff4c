"""``load_model``: a trained run's model, from its run directory or one of its checkpoint files.

    model = workbench.load_model("runs/demo")                               # the newest good checkpoint
    model = workbench.load_model("runs/demo/ckpt-00000300.safetensors")     # this one

A checkpoint holds the model's tensors under ``model/`` beside the optimizer's (``optim/``) and the
RNG states (``rng/``), so ``MoELM(cfg).load_state_dict(load_file(path), strict=False)`` matches no
key and silently loads nothing. ``load_model`` builds the model from the configuration the run
recorded and loads every tensor strictly, after the checks a resume makes
(``workbench.train.checkpoint``): the SHA-256 of the tensors, every shape against the recorded
config and, when the folder has a ``run.json``, that the checkpoint belongs to that run. In a run
directory a newer checkpoint that fails them is skipped with one warning, as a resume skips it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from workbench.model import MoELM


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> MoELM:
    """The trained ``MoELM`` of a run directory (its newest usable checkpoint) or of a checkpoint
    file, built from the run's recorded ``model_config``, on ``device``, in evaluation mode.

    Every problem is one ``CheckpointError`` (``workbench.train.CheckpointError``) naming the path:
    nothing there, a folder without a usable checkpoint, a file that is not a workbench checkpoint,
    a checksum or shape that does not match, a checkpoint that belongs to another run.
    """
    import torch

    from workbench.config import ModelConfig
    from workbench.model import MoELM
    from workbench.train.checkpoint import (
        CheckpointError,
        config_difference,
        latest_usable_checkpoint,
        list_checkpoints,
        load_checkpoint,
    )
    from workbench.train.rundir import check_run_info, read_run_info

    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: load_model takes a run directory (e.g. runs/demo) or "
                              "one of its checkpoint files (ckpt-<step>.safetensors)")
    run_dir = path if path.is_dir() else path.parent
    run_info = read_run_info(run_dir)
    if run_info is not None:
        try:
            check_run_info(run_dir, run_info)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
    if path.is_dir():
        if not list_checkpoints(path):
            raise CheckpointError(f"{path} holds no checkpoint (ckpt-<step>.safetensors): it is not a run "
                                  "directory, or its run has not saved one yet")
        ckpt, skipped = latest_usable_checkpoint(path, run_info)
        if ckpt is None:
            raise CheckpointError(f"no usable checkpoint in {path}: {'; '.join(skipped)}")
    else:
        ckpt = load_checkpoint(path)  # names the file when it is not a workbench checkpoint
        if run_info is not None and (diff := config_difference(ckpt, run_info)) is not None:
            raise CheckpointError(f"checkpoint {path} belongs to another run than {run_dir} holds: {diff}")

    with warnings.catch_warnings():  # e.g. expert choice's causality warning: said when the run was built
        warnings.simplefilter("ignore")
        model = MoELM(ModelConfig.from_dict(ckpt.model_config))
    try:
        model.load_state_dict(ckpt.model_state, strict=True)
    except (RuntimeError, ValueError, KeyError) as err:  # shapes were checked on load: a backstop
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {ckpt.path} does not fit the model it records: {first}") from err
    return model.to(torch.device(device)).eval()

