"""`workbench show RUN_DIR`: what a run did, from its files, on finished, interrupted and diverged runs."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.train.conftest import MICRO_FLAGS, MICRO_MODEL, one_line, run_cli, snapshot
from workbench.train import TrainConfig, Trainer, TrainingDiverged


def make_trainer(run_dir, data_dir, **kw) -> Trainer:
    cfg = TrainConfig(run_dir=str(run_dir), data=str(data_dir), batch_size=4, eval_windows=2, progress=False,
                      **{"steps": 6, "eval_every": 3, "checkpoint_every": 2, **kw})
    return Trainer(MICRO_MODEL, cfg)


def show(capsys, run_dir, *flags) -> str:
    before = snapshot(run_dir)
    code, out, err = run_cli(capsys, "show", str(run_dir), *flags)
    assert code == 0, err
    assert snapshot(run_dir) == before  # read only
    return out


def test_show_a_finished_run(tmp_path, capsys, domain_folder):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", str(domain_folder), *MICRO_FLAGS, "--steps", "6",
                           "--eval-every", "3", "--router", "sigmoid", "--no-progress", "--run-dir", str(run_dir))
    assert code == 0, err
    out = show(capsys, run_dir)
    assert "status: finished" in out
    assert "steps: 6 of 6; last checkpoint: ckpt-00000006.safetensors (step 6)" in out
    assert "router sigmoid" in out and "moe.router=sigmoid" in out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    m = re.search(r"validation loss at step 6 \(nats/byte\): (.*)", out)
    assert m, out
    for domain in ("numbers", "words"):
        assert f"{domain} {last[f'val/{domain}']:.3f}" in m.group(1)
    assert f"all {last['val/loss']:.3f}" in m.group(1)
    vio = sum(r["L0/max_vio"] for r in rows) / len(rows)
    assert f"L0 MaxVio {vio:.2f}" in out and "L1 MaxVio" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"MFU {100 * summary['mfu']:.1f}%" in out
    assert re.search(r"throughput: [\d,]+ tokens/s", out)

    info = json.loads(show(capsys, run_dir, "--json"), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert info["status"] == "finished" and info["step"] == 6 and info["steps"] == 6
    assert info["validation"]["per_domain"] == {"numbers": last["val/numbers"], "words": last["val/words"]}
    assert info["balance"]["L0"]["max_vio"] == pytest.approx(sum(r["L0/max_vio"] for r in rows[-10:]) / 6)


def test_show_an_interrupted_run(tmp_path, capsys, domain_folder):
    def ctrl_c(trainer, row):
        if trainer.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "run", domain_folder).fit(callback=ctrl_c)
    out = show(capsys, tmp_path / "run")
    assert "status: interrupted" in out
    assert "steps: 3 of 6; last checkpoint: ckpt-00000002.safetensors (step 2)" in out
    # step 3 was evaluated: its losses are shown, not some later or missing value
    assert "validation loss at step 3" in out


def test_show_a_diverged_run(tmp_path, capsys, domain_folder):
    def poison(trainer, row):
        if trainer.step == 2:  # after step 2's checkpoint: step 3's loss is NaN
            with torch.no_grad():
                trainer.model.embed.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged):
        make_trainer(tmp_path / "run", domain_folder).fit(callback=poison)
    out = show(capsys, tmp_path / "run")
    assert "status: diverged: loss is nan at step 3; training stopped, the last good checkpoint is" in out
    assert "steps: 2 of 6; last checkpoint: ckpt-00000002.safetensors (step 2)" in out
    assert "validation loss: n/a (no validation ran before the run stopped)" in out
    assert re.search(r"throughput: [\d,]+ tokens/s", out)


def test_show_refuses_what_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for target, needle in ((tmp_path / "empty", "holds no run.json, checkpoint or metrics.jsonl"),
                           (tmp_path / "nothing", "no such folder")):
        code, _, err = run_cli(capsys, "show", str(target))
        assert code == 2 and needle in one_line(err)
