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


def _run_with(tmp_path, model_cfg) -> dict:
    """What ``workbench show`` finds in a run whose run.json records ``model_config`` (nothing else)."""
    import json

    from workbench.train import TrainConfig
    from workbench.train.show import describe_run

    (tmp_path / "run.json").write_text(json.dumps({"model_config": model_cfg.to_dict(),
                                                   "train_config": TrainConfig().to_dict()}))
    return describe_run(tmp_path)


def test_show_compares_a_run_with_the_preset_it_was_built_from(tmp_path):
    """Defect 8: an untouched run listed dense_hidden=256, moe.expert_hidden=128 (the tiny preset's,
    which `workbench train --help` shows as the defaults) as settings not at their defaults."""
    from workbench.config import preset
    from workbench.train.show import format_run

    info = _run_with(tmp_path, preset("tiny"))
    assert info["non_default"] == {} and info["defaults_preset"] == "tiny"
    assert "not at their defaults" not in format_run(info)
    info = _run_with(tmp_path, preset("tiny", num_experts=16).replace(dense_hidden=64))
    assert info["non_default"] == {"dense_hidden": 64, "moe.num_experts": 16}
    assert "settings not at their defaults (the tiny preset's): dense_hidden=64, moe.num_experts=16" in format_run(info)
    assert _run_with(tmp_path, preset("small"))["non_default"] == {}  # --preset small
    assert _run_with(tmp_path, preset("tiny").replace(moe=None))["non_default"] == {"moe": None}  # --dense


def test_a_traced_sweep_says_why_it_retrains_runs_cached_without_traces(tmp_path, monkeypatch):
    """Defect 5: run_experiments(..., traces=True) said "training 1 of 1 runs" for a run already in the
    cache (without traces), though a second call is said to train nothing."""
    import workbench.experiments as experiments
    from tests.test_experiments import small_model, small_train
    from workbench.experiments import Experiment, run_experiments

    monkeypatch.setattr(experiments, "code_version", lambda root=None: "pinned")
    exps = [Experiment(name="aux", model=small_model(), train=small_train(steps=2))]
    run_experiments(exps, seeds=[0], cache_dir=tmp_path, log=None)
    lines: list[str] = []
    run_experiments(exps, seeds=[0], cache_dir=tmp_path, log=lines.append, traces=True)
    assert ("training 1 of 1 runs, 1 at a time (1 of them is cached without routing traces, and traces=True "
            "records them during training: router saturation at every validation)") in lines
    lines.clear()
    run_experiments(exps, seeds=[0], cache_dir=tmp_path, log=lines.append, traces=True)
    assert not any(line.startswith("training") for line in lines)  # now cached with its traces


def test_every_train_flag_has_a_help_text():
    """Defect 11: --expert-choice-capacity had an empty help, only its name ("expert choice capacity"):
    its field's comment sat on the line above, and the CLI takes a field's trailing comment as help."""
    from workbench.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    empty = [a.option_strings[0] for a in train._actions if a.option_strings and
             (a.help or "").split(" (default")[0].strip() in ("", a.dest.replace("_", " "))]
    assert empty == []


def test_routing_counts_show_as_one_line():
    """Defect 11: a RoutingCounts displayed in a notebook printed about 900 lines of sparse tensors."""
    from tests.train.conftest import MICRO_MODEL
    from workbench.analysis.traces import collect
    from workbench.model import MoELM

    torch.manual_seed(0)
    model = MoELM(MICRO_MODEL)
    counts = collect(model, [torch.randint(0, MICRO_MODEL.vocab_size, (2, MICRO_MODEL.seq_len))])
    text = repr(counts)
    assert "\n" not in text and len(text) < 200, text
    assert text == "RoutingCounts(64 tokens, domains ['all'], MoE layers [0, 1], 4 experts, top-2, vocab 256)"


def test_predicted_mfu_lies_within_its_own_band():
    """Defect 11: `workbench bench model` printed Ascend MFU outside its own range, 73.1% (77-80%): each
    end divided that end's throughput by that end's peak, and the Ascend peak band is the wider one."""
    from workbench.bench import perfmodel as pm

    table = pm.load_devices()
    for name in pm.SHAPES:
        for key, dev in table.items():
            try:
                low, value, high = (pm.predict(pm.shape(name), dev, ep=8, dtype="bf16", end=e).mfu
                                    for e in pm.BAND_ENDS)
            except ValueError:  # a device without a bf16 figure
                continue
            if value is not None:
                assert low <= value <= high, (name, key, low, value, high)


def test_the_kernel_build_says_what_it_does_before_the_progress_bar(tmp_path, monkeypatch, capsys):
    """Defect 9: the fused CPU kernels compiled inside the first training step, so the progress bar
    timed the build as a step and estimated hours; the build now runs, saying so, before the bar."""
    import torch.utils.cpp_extension as cpp_extension

    import workbench.kernels.cpu.build as build
    import workbench.train.trainer as trainer_module
    from tests.train.conftest import MICRO_MODEL, write_domain_folder
    from workbench.kernels.cpu import fused_cpu_kernel
    from workbench.train import TrainConfig, Trainer

    events: list[str] = []

    def compile_fails(*args, **kwargs):  # as where there is no compiler: the readable path runs
        events.append("build")
        raise RuntimeError("no compiler here")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))  # nothing built there yet
    monkeypatch.setattr(cpp_extension, "load", compile_fails)
    monkeypatch.setattr(build, "_module", None)
    monkeypatch.setattr(build, "_build_failed", False)
    monkeypatch.setattr(trainer_module, "_progress", lambda *a: events.append("progress bar"))
    corpus = write_domain_folder(tmp_path / "corpus")
    with fused_cpu_kernel(True):
        trainer = Trainer(MICRO_MODEL, TrainConfig(run_dir=str(tmp_path / "run"), data=str(corpus), steps=1,
                                                   batch_size=2, eval_windows=1))
    with pytest.warns(RuntimeWarning, match="could not be built"):
        trainer.fit()
    assert events == ["build", "progress bar"]
    assert "workbench: compiling the CPU kernels, about a minute, once" in capsys.readouterr().err


def test_the_first_setup_says_it_is_installing():
    """Defect 9: the first `make demo` printed nothing for about 90 s of setup."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("no make here")
    root = Path(__file__).resolve().parents[1]
    # as a user's shell runs it: not as a sub-make of `make test` (which prints "Entering directory")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = subprocess.run(["make", "--no-print-directory", "-n", "-B", "setup"], cwd=root, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0].startswith('echo "workbench: installing'), out


def test_a_finished_run_is_extended_with_resume_and_steps(tmp_path, capsys, monkeypatch):
    """Defect 11: `workbench train --resume --steps N` refused --steps, so a finished run could not go on."""
    import json

    import workbench.cli.train as cli_train
    from tests.train.conftest import MICRO_FLAGS, one_line, run_cli, write_domain_folder

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(cli_train, "summarize", lambda trainer: "summary skipped")  # no matmul peak: fast
    run = str(tmp_path / "run")
    corpus = str(write_domain_folder(tmp_path / "corpus"))
    base = ["train", *MICRO_FLAGS, "--data", corpus, "--run-dir", run, "--no-progress"]
    assert run_cli(capsys, *base, "--steps", "2", "--eval-every", "2")[0] == 0
    code, out, err = run_cli(capsys, "train", "--resume", "--run-dir", run, "--no-progress", "--steps", "3")
    assert code == 0, err
    assert "resuming" in out and "from step 2 (ckpt-00000002.safetensors), extended to 3 steps" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["train_config"]["steps"] == 3
    code, _, err = run_cli(capsys, "train", "--resume", "--run-dir", run, "--no-progress", "--steps", "1")
    assert code == 2 and "steps=1 is invalid: the run is at step 3" in one_line(err)


def test_the_missing_validation_warning_gives_the_summarys_reason(tmp_path):
    """Defect 11: the tiny-corpus warning blamed "too little validation text" where the summary said
    that no document was held out for validation: one reason, the same in both."""
    from workbench.data import LMData, load_text_corpus

    for domain, files in (("many", 6), ("one", 1)):
        (tmp_path / domain).mkdir()
        for i in range(files):
            (tmp_path / domain / f"{i}.txt").write_text(f"document {i} of {domain}. " * 40)
    with pytest.warns(UserWarning) as caught:
        data = LMData(load_text_corpus(tmp_path), seq_len=16, batch_size=2, val_fraction=0.3)
    assert set(data.val_missing) == {"one"}
    assert "no document was held out for validation" in data.val_missing["one"]  # what the summary prints
    text = " ".join(str(w.message) for w in caught if "validation window" in str(w.message))
    assert f"one: {data.val_missing['one']}" in text


def test_show_opens_a_sweeps_results_folder(tmp_path, capsys):
    """Defect 11: `workbench show` on a sweep's results folder said it held no run.json: a sweep's runs
    train in temporary folders, so its tables are what show gives."""
    import gzip
    import json

    from tests.train.conftest import run_cli

    (tmp_path / "runs.csv").write_text("name,seed,val_loss,max_vio_global,tokens_per_s,diverged\n"
                                       "aux,0,2.5,0.4,1000,\naux,1,2.7,0.6,1200,\nfree,0,2.6,0.3,1100,\n")
    (tmp_path / "details.json.gz").write_bytes(gzip.compress(b"[]"))
    code, out, err = run_cli(capsys, "show", str(tmp_path))
    assert code == 0, err
    assert out.splitlines()[0] == f"sweep results in {tmp_path}: 3 runs of 2 experiments"
    assert "aux" in out and "2.6000 ± 0.1414" in out and "Results.load(" in out
    code, out, _ = run_cli(capsys, "show", str(tmp_path), "--json")
    assert code == 0 and [r["name"] for r in json.loads(out)] == ["aux", "aux", "free"]
