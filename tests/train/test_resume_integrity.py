"""Resume continues the same run or says why not (issue 27, items 5, 6, 8, 12 and 15).

- checkpoints carry a checksum of their tensors: a corrupt one is skipped with one line and
  never called "the last good checkpoint";
- run.json records a fingerprint of the training data: a resume on other data is refused;
- a flag that contradicts the run (``--preset``) is refused under ``--resume``;
- hand-edited run files (run.json, metrics.jsonl, checkpoint metadata) are one line naming the file;
- the advice given on resume can be followed (``--device``, the number of ranks, ``--data`` paths).

One small run is trained per module and copied for each test, so the file stays fast.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.train.conftest import MICRO_MODEL, one_line, run_cli, write_domain_folder
from workbench.train import CheckpointError, TrainConfig, Trainer, TrainingDiverged, load_checkpoint


def micro_config(run_dir, data, **kw) -> TrainConfig:
    return TrainConfig(run_dir=str(run_dir), data=str(data), batch_size=4, eval_windows=2, progress=False,
                       **{"steps": 6, "eval_every": 6, "checkpoint_every": 2, "keep_checkpoints": 3, **kw})


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A finished 6-step run (checkpoints at steps 2, 4 and 6) and its data, trained once."""
    root = tmp_path_factory.mktemp("base")
    write_domain_folder(root / "corpus")
    Trainer(MICRO_MODEL, micro_config(root / "run", root / "corpus")).fit()
    return root


@pytest.fixture
def run(base, tmp_path) -> Path:
    """A copy of the base run, stopped after step 4 (its last checkpoint removed); same data."""
    shutil.copytree(base / "run", tmp_path / "run")
    (tmp_path / "run" / "ckpt-00000006.safetensors").unlink()
    return tmp_path / "run"


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def edit_metadata(path: Path, change) -> None:
    """Rewrite a checkpoint with ``change(metadata)`` applied to its metadata; tensors unchanged."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(path))
    change(metadata)
    save_file(tensors, str(path), metadata=metadata)


def corrupt(path: Path, pattern: bytes = b"\x00\x00\x40\x40") -> None:
    """Overwrite 64 bytes in the middle of the file: inside the tensor data, the header intact."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(pattern * 16)


# --- item 5: checkpoints carry a checksum of their tensors --------------------------------------


def test_a_corrupt_checkpoint_is_skipped_and_the_resume_stays_exact(run, base):
    newest = run / "ckpt-00000004.safetensors"
    corrupt(newest)
    with pytest.raises(CheckpointError, match=rf"{newest.name} is corrupt: its tensors do not match the SHA-256"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match=rf"{newest.name} is corrupt.*falling back to the previous checkpoint "
                                         r"ckpt-00000002") as record:
        trainer = Trainer.resume(run)
    assert len(record) == 1 and trainer.step == 2
    trainer.fit()
    assert losses(run) == losses(base / "run")  # bit for bit the uninterrupted run


def test_show_verifies_the_checkpoint_it_names_last(run, capsys):
    corrupt(run / "ckpt-00000004.safetensors")
    code, out, err = run_cli(capsys, "show", str(run))
    assert code == 0, err
    assert "last checkpoint: ckpt-00000002.safetensors (step 2)" in out
    assert "ckpt-00000004.safetensors is skipped on resume: " in out and "is corrupt" in out


def test_a_diverged_run_never_names_a_corrupt_checkpoint_as_good(run):
    trainer = Trainer.resume(run)
    corrupt(run / "ckpt-00000004.safetensors", b"\xff" * 4)
    with pytest.raises(TrainingDiverged, match=r"the last good checkpoint is .*ckpt-00000002\.safetensors$"):
        trainer._diverged("loss is nan")


def test_a_checkpoint_without_a_checksum_still_loads_silently(run):
    newest = run / "ckpt-00000004.safetensors"
    edit_metadata(newest, lambda m: m.pop("tensors_sha256"))  # as written before checksums existed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Trainer.resume(run).step == 4


def test_resuming_a_corrupt_checkpoint_from_the_cli_is_one_line(run, capsys, no_summary):
    corrupt(run / "ckpt-00000004.safetensors")
    code, out, err = run_cli(capsys, "train", "--resume", "--run-dir", str(run), "--no-progress")
    assert code == 0, err
    # one line for the corrupt file (metrics.jsonl may say in its own line that steps are redone)
    named = [line for line in err.splitlines() if "ckpt-00000004" in line]
    assert len(named) == 1 and "is corrupt" in named[0] and "Traceback" not in err, err
    assert "resuming" in out and "from step 2" in out


# --- item 8: a flag that contradicts the run is refused under --resume ----------------------------


@pytest.mark.parametrize("flags", [["--preset", "small"], ["--preset", "tiny"], ["--balance", "loss_free"],
                                   ["--dense"], ["--lr", "0.01"]])
def test_a_flag_that_would_change_the_run_is_refused_on_resume(run, capsys, flags):
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, out, err = run_cli(capsys, "train", "--resume", "--run-dir", str(run), "--no-progress", *flags)
    assert code == 2 and out == "", (code, out)
    assert f"{flags[0]} cannot be given" in one_line(err)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing trained, nothing written


# --- item 12: hand-edited run files are one line naming the file ----------------------------------


def edit_run_json(run_dir: Path, change) -> None:
    path = run_dir / "run.json"
    info = json.loads(path.read_text())
    change(info)
    path.write_text(json.dumps(info))


@pytest.fixture
def no_summary(monkeypatch):
    """The end-of-run summary (a matmul measurement and a plot) is not under test here: skip it."""
    import workbench.cli.train as cli_train

    monkeypatch.setattr(cli_train, "summarize", lambda trainer: "summary skipped")


@pytest.mark.parametrize("change, needle", [
    (lambda i: i.update(model_config="tiny"), "model_config is not one a run writes: 'tiny' is not an object"),
    (lambda i: i["train_config"].update(steps=40.5), "train_config is not one a run writes: steps=40.5 is invalid: "
                                                      "must be an integer"),
    (lambda i: i.update(status=5), "status=5, must be a string"),
])
def test_an_edited_run_json_is_one_line_naming_it(run, capsys, change, needle):
    edit_run_json(run, change)
    for command in (["show", str(run)], ["train", "--resume", "--no-progress", "--run-dir", str(run)]):
        code, out, err = run_cli(capsys, *command)
        assert code == 2 and out == "", (command, code, out)
        line = one_line(err)
        assert f"{run / 'run.json'} is invalid: " in line and needle in line, (command, line)


def test_a_metrics_line_that_is_not_a_row_is_named_not_a_traceback(run, capsys, no_summary):
    path = run / "metrics.jsonl"
    path.write_text("42\n" + path.read_text())
    code, out, err = run_cli(capsys, "show", str(run))
    assert code == 0 and "steps: 6 of 6" in out
    assert "metrics.jsonl: line 1 is not a metrics row" in one_line(err)
    code, out, err = run_cli(capsys, "train", "--resume", "--no-progress", "--run-dir", str(run))
    assert code == 0 and "Traceback" not in err, err
    assert all("metrics.jsonl" in line for line in err.splitlines()), err
    assert "line 1 cannot be read" in err  # set aside, named


@pytest.mark.parametrize("change, needle", [
    (lambda m: m.update(train_config="null"), "records an invalid train_config: None is not an object"),
    (lambda m: m.update(train_config=json.dumps({**json.loads(m["train_config"]), "steps": "abc"})),
     "records an invalid train_config: steps='abc' is invalid: must be an integer"),
])
def test_edited_checkpoint_metadata_is_one_line_naming_the_checkpoint(run, capsys, change, needle):
    newest, older = run / "ckpt-00000004.safetensors", run / "ckpt-00000002.safetensors"
    edit_metadata(newest, change)
    with pytest.warns(UserWarning, match=rf"{newest.name} {needle}.*falling back to .*{older.name}") as record:
        assert Trainer.resume(run).step == 2
    assert len(record) == 1
    code, out, err = run_cli(capsys, "show", str(run))
    assert code == 0 and f"{newest.name} is skipped on resume: checkpoint {newest} {needle}" in out, (out, err)

    edit_metadata(older, change)  # nothing left to fall back to: the one error
    code, out, err = run_cli(capsys, "train", "--resume", "--no-progress", "--run-dir", str(run))
    line = one_line(err)
    assert code == 2 and f"no readable checkpoint in {run}" in line and f"{older} {needle}" in line, line
    (run / "run.json").unlink()  # show then reads the configs from the checkpoints themselves
    code, out, err = run_cli(capsys, "show", str(run))
    assert code == 0 and "last checkpoint: none" in out and "Traceback" not in err, (out, err)


# --- item 6: run.json records a fingerprint of the data; a resume on other data is refused ---------


@pytest.fixture
def own_data_run(base, tmp_path) -> tuple[Path, Path]:
    """A 2-step run on its own copy of the data, stopped after step 1: (run folder, data folder)."""
    data = shutil.copytree(base / "corpus", tmp_path / "corpus")
    Trainer(MICRO_MODEL, micro_config(tmp_path / "run", data, steps=2, checkpoint_every=1, eval_every=2)).fit()
    (tmp_path / "run" / "ckpt-00000002.safetensors").unlink()
    return tmp_path / "run", data


def test_the_data_fingerprint_is_in_run_json(own_data_run):
    run, data = own_data_run
    fingerprint = json.loads((run / "run.json").read_text())["data_fingerprint"]
    assert fingerprint["source"] == "files" and fingerprint["path"] == str(data)
    import hashlib

    doc = data / "words" / "doc0.txt"
    assert fingerprint["files"]["words/doc0.txt"] == {"bytes": doc.stat().st_size,
                                                      "sha256": hashlib.sha256(doc.read_bytes()).hexdigest()}


def test_a_resume_on_edited_data_is_refused_unless_accepted(own_data_run, capsys, no_summary):
    run, data = own_data_run
    doc = data / "words" / "doc0.txt"
    doc.write_text(doc.read_text().replace("alpha", "omega"))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(ValueError, match=r"is not the data this run trained on .*file 'words/doc0.txt' was \d+ "
                                         r"bytes \(sha256 \w+\), now \d+ bytes"):
        Trainer.resume(run)
    code, out, err = run_cli(capsys, "train", "--resume", "--no-progress", "--run-dir", str(run))
    line = one_line(err)
    assert code == 2 and "words/doc0.txt" in line and "--accept-data-change" in line, line
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # refused: nothing written

    code, out, err = run_cli(capsys, "train", "--resume", "--no-progress", "--accept-data-change",
                             "--run-dir", str(run))
    named = [line for line in err.splitlines() if "words/doc0.txt" in line]
    assert code == 0 and len(named) == 1 and "recorded in run.json" in named[0], err
    info = json.loads((run / "run.json").read_text())
    (change,) = info["data_changes"]
    assert change["step"] == 1 and "words/doc0.txt" in change["change"]
    assert info["data_fingerprint"]["files"]["words/doc0.txt"]["bytes"] == doc.stat().st_size
    assert info["status"] == "finished"


def test_accept_data_change_is_for_resume_only(tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", "--accept-data-change", "--run-dir", str(tmp_path / "r"))
    assert code == 2 and "--accept-data-change is for --resume" in one_line(err)


def test_a_run_from_before_fingerprints_resumes_and_gets_one(run):
    edit_run_json(run, lambda i: i.pop("data_fingerprint"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = Trainer.resume(run)
    assert trainer.run_info["data_fingerprint"] == trainer.data_fingerprint


def test_the_builtin_corpus_is_fingerprinted_per_domain():
    from workbench.data import Corpus, Document
    from workbench.data.fingerprint import corpus_fingerprint, fingerprint_difference

    def corpus(text, python="3.11.4"):
        return Corpus(["code", "math"], [Document("code/a", "code", text, "a"), Document("math/0", "math", "1+1", "m")],
                      metadata={"python": python, "unicode": "15.0.0", "max_bytes_per_domain": 100})

    old = corpus_fingerprint(corpus("x = 1"), builtin=True)
    assert set(old["domains"]) == {"code", "math"} and old["source"] == "built-in"
    assert fingerprint_difference(old, corpus_fingerprint(corpus("x = 1"), builtin=True)) is None
    why = fingerprint_difference(old, corpus_fingerprint(corpus("x = 2", python="3.12.1"), builtin=True))
    assert why.startswith("built-in domain 'code' was 5 bytes") and "python 3.11.4 -> 3.12.1" in why
    files = corpus_fingerprint(corpus("x = 1"), builtin=False)
    assert "the run trained on the built-in corpus, this is the files of" in fingerprint_difference(old, files)


# --- item 15: the advice a resume gives can be followed ------------------------------------------


def test_a_run_recorded_on_cuda_resumes_here_with_device(run, capsys, no_summary):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA, where a run recorded with device=cuda cannot go on as it is")
    edit_run_json(run, lambda i: i["train_config"].update(device="cuda"))
    for _, ckpt in ((2, run / "ckpt-00000002.safetensors"), (4, run / "ckpt-00000004.safetensors")):
        edit_metadata(ckpt, lambda m: m.update(train_config=json.dumps({**json.loads(m["train_config"]),
                                                                       "device": "cuda"})))
    code, out, err = run_cli(capsys, "train", "--resume", "--no-progress", "--run-dir", str(run))
    line = one_line(err)
    assert code == 2 and "usable here: auto, cpu" in line and "resume it here with --device" in line, line

    code, out, err = run_cli(capsys, "train", "--resume", "--no-progress", "--device", "cpu", "--run-dir", str(run))
    assert code == 0 and "resuming" in out and "from step 4" in out, err
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["train_config"]["device"] == "cpu"
    # checkpoints of either device belong to the run (run.json now says cpu, ckpt-4 cuda)
    assert Trainer.resume(run).step == 6
    (run / "ckpt-00000006.safetensors").unlink()
    assert Trainer.resume(run, device="cpu").step == 4


def test_a_resume_on_more_ranks_than_grad_accum_is_told_what_works(run, monkeypatch):
    """Told "e.g. --grad-accum 2", which --resume refuses: the run keeps its grad_accum."""
    import torch

    import workbench.parallel.trainer as ep
    from workbench.parallel.context import ParallelConfig, ParallelContext

    ctx = ParallelContext(config=ParallelConfig(world_size=2), rank=0, local_rank=0, device=torch.device("cpu"),
                          backend="gloo", ep_group=None, expert_dp_group=None)
    monkeypatch.setattr(ep, "current_context", lambda: ctx)

    def agree(ctx, error):  # one rank, no process group: its own error is what every rank would raise
        if error is not None:
            raise error

    monkeypatch.setattr(ep, "agree", agree)
    with pytest.raises(ValueError, match=r"grad_accum=1 is invalid: must be a multiple of the 2 ranks") as info:
        ep.ExpertParallelTrainer.resume(run)
    assert "--grad-accum" not in str(info.value)
    assert "which --resume keeps" in str(info.value) and "in one process" in str(info.value)
    advice = ep.grad_accum_advice(4, 8, 2, resume=True)
    assert "on 2 or 4 ranks" in advice and "--expert-parallel 2" in advice
    assert ep.grad_accum_advice(1, 2, 1, resume=False).endswith("e.g. --grad-accum 2")


def test_a_relative_data_path_is_recorded_absolute(base, tmp_path, monkeypatch):
    shutil.copytree(base / "corpus", tmp_path / "corpus")
    monkeypatch.chdir(tmp_path)
    Trainer(MICRO_MODEL, micro_config("run", "corpus", steps=1, checkpoint_every=1, eval_every=1)).fit()
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["train_config"]["data"]
    assert recorded == str(tmp_path / "corpus")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # a resume from another folder reads the same files
    assert Trainer.resume(tmp_path / "run").cfg.data == str(tmp_path / "corpus")
