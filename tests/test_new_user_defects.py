"""Issue 26: defects found by trying the README as a new user would (those not under torchrun:
tests/parallel/test_new_user_defects.py has those)."""

from __future__ import annotations

import os
import stat

import pytest
import torch


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_checkpoints_keep_the_umasks_permissions(tmp_path, umask_022):
    """Defect 10: safetensors wrote checkpoints 0600 while the other run files were 0644."""
    from workbench.train.checkpoint import save_checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {}, {})
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
