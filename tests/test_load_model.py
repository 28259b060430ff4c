"""``workbench.load_model`` (issue 26, defect 3): a run's model from its run directory or a checkpoint
file gives the trained model's logits exactly; a bad path is one ``CheckpointError`` naming it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import workbench
from workbench.model import MoELM
from workbench.train import CheckpointError, TrainConfig, Trainer

SMALL = {"batch_size": 4, "eval_windows": 1, "max_bytes_per_domain": 60_000, "progress": False}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step run of ``tiny`` with the loss-free bias (a buffer that training changes), checkpointed
    at steps 2 and 3, and its model's logits on a batch after training."""
    run_dir = tmp_path_factory.mktemp("load") / "run"
    cfg = workbench.preset("tiny", router="sigmoid", bias_update_rate=1e-2, aux_loss_weight=0.0)
    trainer = Trainer(cfg, TrainConfig(steps=3, checkpoint_every=2, run_dir=str(run_dir), **SMALL))
    trainer.fit()
    tokens = trainer.data.get_batch(0).tokens[:4]
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(tokens).logits
    return run_dir, tokens, logits, trainer.model


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_run_dir_gives_the_trained_models_logits_exactly(trained):
    run_dir, tokens, logits, trained_model = trained
    model = workbench.load_model(run_dir)
    assert isinstance(model, MoELM) and not model.training
    assert model.cfg == trained_model.cfg
    assert torch.equal(_logits(model, tokens), logits)
    for name, buf in trained_model.named_buffers():  # the loss-free bias moved in training and was loaded
        assert torch.equal(dict(model.named_buffers())[name], buf), name
    assert workbench.load_model(str(run_dir)).cfg == model.cfg  # a string path too


def test_checkpoint_file_loads_that_checkpoint(trained):
    run_dir, tokens, logits, _ = trained
    last = workbench.load_model(run_dir / "ckpt-00000003.safetensors")
    assert torch.equal(_logits(last, tokens), logits)
    earlier = workbench.load_model(run_dir / "ckpt-00000002.safetensors")
    assert not torch.equal(_logits(earlier, tokens), logits)  # one step earlier: other weights


def test_the_undocumented_way_loads_nothing(trained):
    """Why load_model exists: the checkpoint's keys sit under model/, so strict=False matches none."""
    run_dir, tokens, logits, trained_model = trained
    model = MoELM(trained_model.cfg)
    result = model.load_state_dict(load_file(run_dir / "ckpt-00000003.safetensors"), strict=False)
    assert len(result.missing_keys) == len(model.state_dict())  # nothing was loaded


def test_missing_path_is_one_error_naming_it(tmp_path):
    missing = tmp_path / "runs" / "nope"
    with pytest.raises(CheckpointError) as err:
        workbench.load_model(missing)
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)
    assert "\n" not in str(err.value)


def test_folder_without_checkpoint_is_one_error_naming_it(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(CheckpointError, match="holds no checkpoint") as err:
        workbench.load_model(tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_file_that_is_not_a_checkpoint_is_one_error_naming_it(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError) as err:
        workbench.load_model(bad)
    assert str(bad) in str(err.value)


def test_corrupt_checkpoint_is_refused_as_the_trainer_refuses_it(trained, tmp_path):
    """The SHA-256 of the tensors is checked: bytes changed on disk are one error naming the file; in
    a run directory the newest checkpoint that fails is skipped with one warning, as a resume skips it."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    newest = run_dir / "ckpt-00000003.safetensors"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF  # a byte of the last tensor's data: the file still parses
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256") as err:
        workbench.load_model(newest)
    assert str(newest) in str(err.value)
    with pytest.warns(UserWarning, match="falling back to the previous checkpoint ckpt-00000002"):
        model = workbench.load_model(run_dir)
    earlier = workbench.load_model(trained[0] / "ckpt-00000002.safetensors")
    assert torch.equal(_logits(model, trained[1]), _logits(earlier, trained[1]))
    (run_dir / "ckpt-00000002.safetensors").write_bytes(bytes(data))  # no usable one left
    with pytest.raises(CheckpointError, match=f"no usable checkpoint in {run_dir}"):
        workbench.load_model(run_dir)


def test_checkpoint_of_another_run_is_refused(trained, tmp_path):
    """A checkpoint file copied into another run's folder is refused by that run's run.json."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    info["train_config"]["lr"] = 1e-4
    (run_dir / "run.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="belongs to another run.*lr"):
        workbench.load_model(run_dir / "ckpt-00000003.safetensors")


def test_load_model_keeps_import_workbench_light():
    """``workbench.load_model`` is a lazy name: ``import workbench`` still imports no torch."""
    assert "load_model" in workbench.__all__
    code = "import sys, workbench; assert 'torch' not in sys.modules; print(callable(workbench.load_model))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
