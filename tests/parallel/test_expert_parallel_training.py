"""Training on 2 gloo processes follows the single-process run, and checkpoints move between the two.

- expert parallelism (EP=2) and plain data parallelism (EP=1, DP=2): the loss of every step equals
  the single-process run's within 1e-4 (same TrainConfig: the global batch is the same);
- an EP=2 checkpoint resumes in one process, and a single-process checkpoint on 2 ranks, each
  continuing the single-process curve;
- the step rows carry the per-rank load, all-to-all traffic and timings;
- ``torchrun -m workbench train --expert-parallel 2`` trains and writes one run directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.parallel.conftest import requires_gloo
from tests.parallel.workers import train_runs
from tests.train.conftest import MICRO_MODEL, write_domain_folder
from workbench.config import MoEConfig
from workbench.parallel import run_local
from workbench.parallel.launch import free_port
from workbench.train import TrainConfig, Trainer
from workbench.train.checkpoint import list_checkpoints, load_checkpoint

pytestmark = requires_gloo

LOSS_TOL = 1e-4
STEPS, RESUME_AT = 5, 3
# loss-free balancing and the micro-batch aux loss both on: the bias update must agree across ranks
MODEL = MICRO_MODEL.replace(moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, aux_loss_weight=0.01,
                                          bias_update_rate=1e-2))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_domain_folder(tmp_path_factory.mktemp("parallel") / "corpus")


def train_config(run_dir, corpus, **kw) -> TrainConfig:
    return TrainConfig(**{"run_dir": str(run_dir), "data": str(corpus), "steps": STEPS, "batch_size": 4,
                          "grad_accum": 2, "warmup_steps": 1, "eval_every": STEPS, "eval_windows": 2,
                          "checkpoint_every": RESUME_AT, "keep_checkpoints": 2, "progress": False, **kw})


@pytest.fixture(scope="module")
def single(tmp_path_factory, corpus):
    """The single-process reference run, with checkpoints at steps 3 and 5."""
    run_dir = tmp_path_factory.mktemp("parallel") / "single"
    trainer = Trainer(MODEL, train_config(run_dir, corpus))
    trainer.fit()
    return run_dir, [r["loss"] for r in trainer.history]


def stopped_at(run_dir, step: int, into):
    """A copy of a run as if it had stopped after its checkpoint at ``step``."""
    shutil.copytree(run_dir, into)
    for s, path in list_checkpoints(into):
        if s > step:
            path.unlink()
    return into


@pytest.fixture(scope="module")
def expert_parallel(tmp_path_factory, corpus, single):
    """EP=2: a run from scratch, then the single-process run resumed from its step-3 checkpoint."""
    root = tmp_path_factory.mktemp("parallel")
    resume_dir = stopped_at(single[0], RESUME_AT, root / "single-resumed-on-2-ranks")
    cfg = train_config(root / "ep2", corpus)
    out = run_local(train_runs, nprocs=2, args=(MODEL.to_dict(), dataclasses.asdict(cfg), str(resume_dir)),
                    expert_parallel=2, timeout_s=300)
    return root / "ep2", out


def losses(history):
    return [row["loss"] for row in history]


def test_expert_parallel_training_follows_the_single_process_loss_curve(single, expert_parallel):
    _, want = single
    _, out = expert_parallel
    for rank, result in enumerate(out):
        got = losses(result["scratch"])
        assert len(got) == STEPS
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= LOSS_TOL, (rank, got, want)
    assert out[0]["local_experts"][0] == (2, MODEL.d_model, MODEL.moe.expert_hidden)  # 4 experts over 2 ranks


def test_data_parallel_training_follows_the_single_process_loss_curve(tmp_path, corpus, single):
    _, want = single
    cfg = train_config(tmp_path / "dp2", corpus)
    out = run_local(train_runs, nprocs=2, args=(MODEL.to_dict(), dataclasses.asdict(cfg), None), expert_parallel=1,
                    timeout_s=300)
    got = losses(out[0]["scratch"])
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= LOSS_TOL, (got, want)
    assert "ep/bytes_moved" not in out[0]["scratch"][-1]  # no expert parallelism: no all-to-all


def test_step_rows_report_load_traffic_and_time_per_rank(expert_parallel):
    _, out = expert_parallel
    row = out[0]["scratch"][-1]
    for key in ("ep/expert_rows", "ep/rows_sent", "ep/rows_received", "ep/bytes_sent", "ep/bytes_received",
                "ep/a2a_time_s", "comm/grad_sync_s"):
        assert isinstance(row[key], list) and len(row[key]) == 2, key
    # every rank's forward dispatch: the micro-batch's pairs, B * S * K, minus those kept at home
    pairs_per_rank = 4 * MODEL.seq_len * MODEL.moe.top_k * len(MODEL.moe_layers)
    assert sum(row["ep/expert_rows"]) == 2 * pairs_per_rank
    assert row["ep/rows_sent"] == row["ep/rows_received"][::-1]  # what one rank sends, the other receives
    assert row["ep/bytes_moved"] == sum(row["ep/bytes_sent"]) == sum(row["ep/bytes_received"]) > 0
    assert row["ep/load_max_over_mean"] >= 1.0
    assert all(t > 0 for t in row["ep/a2a_time_s"])


def test_checkpoint_of_two_ranks_is_the_single_process_layout(expert_parallel):
    run_dir, _ = expert_parallel
    ckpt = load_checkpoint(list_checkpoints(run_dir)[-1][1])  # checks every shape against the model config
    assert ckpt.model_state["blocks.0.ffn.experts.w1"].shape[0] == MODEL.moe.num_experts
    moment = ckpt.optimizer_state["state"]
    assert any(v["exp_avg"].shape[0] == MODEL.moe.num_experts for v in moment.values() if v["exp_avg"].dim() == 3)


def test_two_rank_checkpoint_resumes_in_one_process(tmp_path, single, expert_parallel):
    _, want = single
    run_dir, _ = expert_parallel
    resumed = Trainer.resume(stopped_at(run_dir, RESUME_AT, tmp_path / "ep2-resumed-in-one-process"))
    assert resumed.step == RESUME_AT
    got = losses([r for r in resumed.fit() if r["step"] > RESUME_AT])
    assert max(abs(a - b) for a, b in zip(got, want[RESUME_AT:], strict=True)) <= LOSS_TOL, (got, want)


def test_single_process_checkpoint_resumes_on_two_ranks(single, expert_parallel):
    _, want = single
    _, out = expert_parallel
    for result in out:
        assert result["resumed_from_step"] == RESUME_AT
        got = losses(result["resumed"])
        assert max(abs(a - b) for a, b in zip(got, want[RESUME_AT:], strict=True)) <= LOSS_TOL, (got, want)


def test_torchrun_launch_of_the_cli(tmp_path, corpus):
    """The documented command line: torchrun, python -m workbench, --expert-parallel 2."""
    run_dir = tmp_path / "cli"
    flags = ["--seq-len", "32", "--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--dense-hidden", "64",
             "--num-experts", "4", "--expert-hidden", "32", "--batch-size", "4", "--grad-accum", "2",
             "--steps", "2", "--eval-windows", "2", "--data", str(corpus), "--run-dir", str(run_dir), "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "workbench", "train", *flags, "--expert-parallel", "2"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    if os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # one writer: rank 0
    assert len(rows[-1]["ep/expert_rows"]) == 2
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert proc.stdout.count("model:") == 1  # only rank 0 speaks
