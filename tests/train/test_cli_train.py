"""`workbench train`: bad values, SIGKILL + resume bit for bit, Ctrl-C, the run directory, --help."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.train.conftest import MICRO_FLAGS, one_line, run_cli, snapshot
from workbench.cli import build_parser
from workbench.train import load_checkpoint
from workbench.train.checkpoint import list_checkpoints

ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "workbench.cli", "train", *args]


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(*args), capture_output=True, text=True, timeout=timeout, env=ENV,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args, needle", [
    (["--router", "telepathy"], "router='telepathy' is invalid: allowed values are softmax_topk"),
    (["--lr", "-0.1"], "lr=-0.1 is invalid: must be a finite number > 0"),
    (["--data", "/no/such/corpus"], "data='/no/such/corpus' is invalid: the path does not exist"),
    (["--top-k", "9"], "top_k=9 is invalid: must be between 1 and num_experts=8"),
    (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["--balance", "magic"], "argument --balance: invalid choice: 'magic'"),
])
def test_bad_values_exit_2_with_one_line(tmp_path, args, needle):
    r = run("--run-dir", str(tmp_path / "run"), *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["--device", "cuda:99"], "device='cuda:99' is invalid: "),
    (["--device", "mps"], "device='mps' is invalid: MPS"),
    (["--device", "npu"], "device='npu' is invalid: Ascend NPUs need torch_npu"),
    (["--device", "cpu:abc"], "device='cpu:abc' is invalid: allowed values are auto, cpu, cuda[:N], npu[:N], mps"),
    (["--vocab-size", "200"], "vocab_size=200 is invalid: the data's tokenizer produces ids up to 255"),
    (["--data", ""], "data='' is invalid: give a text file or a folder"),
    (["--data", "{tiny}"], "data='{tiny}' is too small: its training split has 5 tokens"),
    (["--run-dir", "{file}"], "run_dir='{file}' is invalid: it is an existing file"),
])
def test_more_bad_values_exit_2_with_one_line_before_any_step(tmp_path, capsys, domain_folder, args, needle):
    if "npu" in args and "torch_npu" in sys.modules:
        pytest.skip("torch_npu is installed")
    if "mps" in args and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    paths = {"tiny": tmp_path / "tiny.txt", "file": tmp_path / "a-file"}
    paths["tiny"].write_text("abc")
    paths["file"].write_text("not a folder")
    args = [a.format(**paths) for a in args]
    run_dir = ["--run-dir", str(tmp_path / "run")] if "--run-dir" not in args else []
    data = ["--data", str(domain_folder)] if "--data" not in args else []
    code, out, err = run_cli(capsys, "train", *MICRO_FLAGS, *data, *run_dir, *args, "--no-progress")
    assert code == 2
    assert needle.format(**paths) in one_line(err)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_overwrite_with_unusable_data_or_device_keeps_the_old_run(tmp_path, capsys, domain_folder):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", str(domain_folder), *MICRO_FLAGS, "--steps", "2",
                           "--no-progress", "--run-dir", str(run_dir))
    assert code == 0, err
    before = snapshot(run_dir)
    (tmp_path / "tiny.txt").write_text("abc")
    for bad in (["--data", str(tmp_path / "tiny.txt")], ["--data", str(domain_folder), "--device", "cuda:99"]):
        code, _, err = run_cli(capsys, "train", *bad, *MICRO_FLAGS, "--steps", "2", "--no-progress",
                               "--run-dir", str(run_dir), "--overwrite")
        assert code == 2 and ("too small" in one_line(err) or "device=" in one_line(err))
        assert snapshot(run_dir) == before


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys, domain_folder):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", str(domain_folder), *MICRO_FLAGS, "--steps", "3",
                           "--eval-every", "3", "--no-progress", "--run-dir", str(run_dir))
    assert code == 0, err
    before = snapshot(run_dir)
    summary = json.loads(before["summary.json"][0], parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert summary["val_loss"] is not None and summary["tokens_per_s"] is not None
    code, out, err = run_cli(capsys, "train", "--resume", "--run-dir", str(run_dir), "--no-progress")
    assert code == 0 and err == ""
    assert f"{run_dir} is finished: step 3 of 3, nothing to do and nothing changed" in out
    assert snapshot(run_dir) == before


def test_a_foreign_checkpoint_alone_exits_2_naming_file_and_field(tmp_path, capsys, domain_folder):
    common = ["--data", str(domain_folder), *MICRO_FLAGS, "--steps", "2", "--no-progress"]
    assert run_cli(capsys, "train", *common, "--run-dir", str(tmp_path / "a"))[0] == 0
    assert run_cli(capsys, "train", *common, "--d-model", "64", "--run-dir", str(tmp_path / "b"))[0] == 0
    for _, path in list_checkpoints(tmp_path / "a"):
        path.unlink()
    shutil.copy(tmp_path / "b" / "ckpt-00000002.safetensors", tmp_path / "a" / "ckpt-00000002.safetensors")
    code, _, err = run_cli(capsys, "train", "--resume", "--run-dir", str(tmp_path / "a"))
    assert code == 2
    line = [x for x in err.strip().splitlines() if "error:" in x]
    assert len(line) == 1 and "Traceback" not in err
    assert re.search(r"ckpt-00000002\.safetensors belongs to another run: its model_config has d_model=64, "
                     r"the run's \(run.json\) has d_model=32", line[0]), err


def test_ctrl_c_stops_with_one_line_naming_the_last_checkpoint(tmp_path, domain_folder):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd("--data", str(domain_folder), *MICRO_FLAGS, "--steps", "100000",
                                      "--checkpoint-every", "3", "--eval-every", "100000", "--no-progress",
                                      "--run-dir", str(run_dir)),
                            env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            # a child started with SIGINT ignored (CI runners do that) would ignore Ctrl-C too
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and not list_checkpoints(run_dir) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    line = one_line(err)
    last = list_checkpoints(run_dir)[-1][1]
    assert re.fullmatch(rf"workbench train: interrupted at step \d+; the last checkpoint is {re.escape(str(last))} "
                        rf"\(continue with: workbench train --resume --run-dir {re.escape(str(run_dir))}\)", line)
    assert not list(run_dir.glob("*.tmp"))
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"


def test_help_gives_choices_help_text_and_a_plain_description():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    text = train.format_help()
    assert "``" not in train.description and "The ``workbench`` command" not in text
    assert train.description.startswith("Train a compact Mixture-of-Experts language model")
    for action in train._actions:
        if action.option_strings and action.dest != "help":
            words = re.sub(r"\(default: [^)]*\)", "", action.help or "").strip()
            assert len(words) >= 8, (action.option_strings, action.help)
    from workbench.moe import DISPATCHES, ROUTERS

    expected = {"router": list(ROUTERS), "dispatch": list(DISPATCHES), "drop_policy": ["position", "score"],
                "autocast": ["auto", "bf16", "none"], "device": ["auto", "cpu", "cuda[:N]", "npu[:N]", "mps"],
                "expert_choice_eval": ["expert_choice", "token_choice"]}
    by_dest = {a.dest: a for a in train._actions}
    for dest, values in expected.items():
        assert f"one of: {', '.join(values)}" in by_dest[dest].help, (dest, by_dest[dest].help)


def test_resume_without_checkpoint_exits_2(tmp_path):
    r = run("--resume", "--run-dir", str(tmp_path / "empty"))
    assert r.returncode == 2 and "no readable checkpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_help_lists_every_config_field_with_defaults():
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "train", "--help"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL,
                       env=ENV)
    assert r.returncode == 0
    for flag in ("--num-experts", "--router", "--capacity-factor", "--bias-update-rate", "--lr", "--grad-accum",
                 "--d-model", "--first-dense-layers", "--checkpoint-every", "--data", "--tie-embeddings"):
        assert flag in r.stdout, flag
    assert "(default: 8)" in r.stdout  # num_experts of the tiny preset


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, domain_folder):
    common = ["--data", str(domain_folder), *MICRO_FLAGS, "--steps", "150", "--checkpoint-every", "10",
              "--eval-every", "1000", "--no-progress", "--router", "noisy_topk", "--dropout", "0.1"]
    full = run(*common, "--run-dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(*common, "--run-dir", str(killed_dir)), env=ENV, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not any(step >= 30 for step, _ in list_checkpoints(killed_dir)):
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    steps = [s for s, _ in list_checkpoints(killed_dir)]
    assert steps and max(steps) < 150

    # `workbench show` tells a killed run from a running one, and leaves it as it was
    before = snapshot(killed_dir)
    shown = subprocess.run([sys.executable, "-m", "workbench.cli", "show", str(killed_dir)], capture_output=True,
                           text=True, env=ENV, stdin=subprocess.DEVNULL, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "status: interrupted: killed" in shown.stdout and f"of 150; last checkpoint: ckpt-{max(steps):08d}" \
        in shown.stdout
    assert snapshot(killed_dir) == before

    resumed = run("--resume", "--run-dir", str(killed_dir), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {max(steps)}" in resumed.stdout

    a = load_checkpoint(list_checkpoints(tmp_path / "full")[-1][1])
    b = load_checkpoint(list_checkpoints(killed_dir)[-1][1])
    assert a.step == b.step == 150
    assert a.model_state.keys() == b.model_state.keys()
    for k in a.model_state:
        assert torch.equal(a.model_state[k], b.model_state[k]), k


def test_run_directory_holds_metrics_checkpoint_report_and_summary(tmp_path, domain_folder):
    run_dir = tmp_path / "run"
    r = run("--data", str(domain_folder), *MICRO_FLAGS, "--steps", "6", "--eval-every", "3",
            "--no-progress", "--run-dir", str(run_dir), "--balance", "loss_free", "--router", "sigmoid")
    assert r.returncode == 0, r.stderr
    for name in ("metrics.jsonl", "report.png", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert list_checkpoints(run_dir)[-1][0] == 6
    assert "validation loss at step 6" in r.stdout and "MaxVio" in r.stdout and "report:" in r.stdout
    cfg = load_checkpoint(list_checkpoints(run_dir)[-1][1]).model_config
    assert cfg["moe"]["bias_update_rate"] == 1e-3 and cfg["moe"]["aux_loss_weight"] == 0.0
    # a second run into the same directory is refused unless --overwrite
    again = run("--data", str(domain_folder), *MICRO_FLAGS, "--steps", "2", "--run-dir", str(run_dir))
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr
    over = run("--data", str(domain_folder), *MICRO_FLAGS, "--steps", "2", "--run-dir", str(run_dir),
               "--overwrite", "--no-progress")
    assert over.returncode == 0, over.stderr
    assert [s for s, _ in list_checkpoints(run_dir)] == [2]
