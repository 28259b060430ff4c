"""``init_from``: another run's weights, exactly, with a new optimizer and schedule; the record in
run.json; shapes that do not fit named; ``train_domains``; the CLI's one-line refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from tests.train.conftest import MICRO_FLAGS, MICRO_MODEL, one_line, run_cli, snapshot, write_domain_folder
from workbench.data import LMData
from workbench.train import TrainConfig, Trainer
from workbench.train.checkpoint import list_checkpoints
from workbench.train.trainer import build_data, lr_factor


def _cfg(run_dir, folder, **kw) -> TrainConfig:
    return TrainConfig(run_dir=str(run_dir), data=str(folder), batch_size=4, eval_windows=2, warmup_steps=2,
                       progress=False, **{"steps": 3, "eval_every": 3, "checkpoint_every": 3, **kw})


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Trainer:
    """A finished 3-step run (its weights differ from any initialisation), shared by the module's tests:
    none of them may change it."""
    root = tmp_path_factory.mktemp("source")
    trainer = Trainer(MICRO_MODEL, _cfg(root / "run", write_domain_folder(root / "corpus"), seed=5))
    trainer.fit()
    return trainer


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("by", ["run_dir", "file"])
def test_init_from_loads_the_weights_exactly_and_starts_a_new_schedule(tmp_path, domain_folder, source, by):
    init_from = source.run_dir if by == "run_dir" else list_checkpoints(source.run_dir)[-1][1]
    cfg = _cfg(tmp_path / "ft", domain_folder, init_from=str(init_from), seed=0, lr=1e-3, steps=5)
    trainer = Trainer(MICRO_MODEL, cfg)
    assert _same_weights(trainer.model.state_dict(), source.model.state_dict())
    assert trainer.step == 0 and trainer.optimizer.state_dict()["state"] == {}  # no moments carried over
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(1e-3 * lr_factor(0, cfg))  # the new warmup's start
    trainer.fit()
    assert trainer.step == 5 and [r["step"] for r in trainer.history] == [1, 2, 3, 4, 5]
    info = json.loads((trainer.run_dir / "run.json").read_text())
    record = info["init_from"]
    ckpt = list_checkpoints(source.run_dir)[-1][1]
    with safe_open(str(ckpt), framework="pt") as f:
        sha = f.metadata()["tensors_sha256"]
    assert record["path"] == str(ckpt.resolve()) and record["step"] == 3 and record["tensors_sha256"] == sha
    assert record["run_dir"] == str(source.run_dir.resolve())
    assert record["run_started"] == json.loads((source.run_dir / "run.json").read_text())["started"]
    assert info["trainable"]["group"] == "all" and info["trainable"]["parameters"] == info["trainable"]["of"]
    # the source run is untouched, and the fine-tuning's checkpoints are its own run's
    assert [s for s, _ in list_checkpoints(trainer.run_dir)] == [3, 5]


def test_a_resumed_fine_tuning_continues_from_its_own_checkpoint(tmp_path, domain_folder, source, monkeypatch):
    cfg = _cfg(tmp_path / "ft", domain_folder, init_from=str(source.run_dir), steps=2, checkpoint_every=1,
               eval_every=2)
    first = Trainer(MICRO_MODEL, cfg)
    first.fit()

    def never(*args, **kwargs):
        raise AssertionError("a resume must not read init_from again")

    monkeypatch.setattr("workbench.train.trainer.find_init_checkpoint", never)
    resumed = Trainer.resume(tmp_path / "ft", steps=3)
    assert resumed.step == 2 and _same_weights(resumed.model.state_dict(), first.model.state_dict())
    assert resumed.run_info["init_from"]["step"] == 3  # the record stays
    resumed.fit()
    assert resumed.step == 3


@pytest.mark.parametrize("change, needle", [
    ({"moe": dataclasses.replace(MICRO_MODEL.moe, num_experts=8)},
     "tensor 'blocks.0.ffn.router.weight' has shape (4, 32) there and (8, 32) here"),
    ({"moe": dataclasses.replace(MICRO_MODEL.moe, expert_hidden=16)},
     "tensor 'blocks.0.ffn.experts.w1' has shape (4, 32, 32) there and (4, 32, 16) here"),
    ({"moe": dataclasses.replace(MICRO_MODEL.moe, num_shared_experts=1)},
     "it has no tensor 'blocks.0.ffn.shared_experts.w1.weight'"),
    ({"n_layers": 1}, "its tensor 'blocks.1.attn.out.weight' has no place in this run's model"),
])
def test_a_checkpoint_of_another_shape_is_refused_naming_the_tensor(tmp_path, domain_folder, source, change,
                                                                    needle):
    model = dataclasses.replace(MICRO_MODEL, **change)
    with pytest.raises(ValueError) as err:
        Trainer(model, _cfg(tmp_path / "ft", domain_folder, init_from=str(source.run_dir)))
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"init_from={str(source.run_dir)!r} does not fit this run's model")
    assert not (tmp_path / "ft").exists()  # refused before the run directory is touched


def test_a_dense_checkpoint_into_an_moe_model_names_the_router(tmp_path, domain_folder):
    dense = Trainer(dataclasses.replace(MICRO_MODEL, moe=None), _cfg(tmp_path / "dense", domain_folder))
    dense.save()
    with pytest.raises(ValueError, match=r"it has no tensor 'blocks.0.ffn.router.weight' \(a dense checkpoint\?"):
        Trainer(MICRO_MODEL, _cfg(tmp_path / "ft", domain_folder, init_from=str(tmp_path / "dense")))


@pytest.mark.parametrize("where, needle", [
    ("missing", "the path does not exist"),
    ("empty", "holds no checkpoint"),
    ("not_a_checkpoint", "is not a moe-workbench-checkpoint-1 file"),
])
def test_init_from_that_is_no_checkpoint_is_refused(tmp_path, domain_folder, where, needle):
    path = tmp_path / where
    if where == "empty":
        path.mkdir()
    elif where == "not_a_checkpoint":
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match=f"init_from='{path}' is invalid: .*{needle}"):
        Trainer(MICRO_MODEL, _cfg(tmp_path / "ft", domain_folder, init_from=str(path)))


def test_overwrite_may_not_delete_the_checkpoint_it_starts_from(tmp_path, domain_folder, source):
    before = snapshot(source.run_dir)
    with pytest.raises(ValueError, match="its checkpoint is in run_dir=.*which overwrite would delete"):
        Trainer(MICRO_MODEL, _cfg(source.run_dir, domain_folder, init_from=str(source.run_dir)), overwrite=True)
    assert snapshot(source.run_dir) == before


# --- train_domains -------------------------------------------------------------------------------


def test_train_domains_choose_the_training_batches_and_validation_keeps_every_domain(tmp_path, domain_folder):
    cfg = _cfg(tmp_path / "run", domain_folder, train_domains=("numbers",))
    data = build_data(cfg, MICRO_MODEL.seq_len)
    numbers = data.domains.index("numbers")
    for step in range(5):
        assert bool((data.get_batch(step).domains == numbers).all())
    assert set(data.val_batches()) == set(data.domains) == {"words", "numbers"}
    assert data.stats()["words"]["train_share"] == 0 and data.stats()["numbers"]["train_share"] == 1
    trainer = Trainer(MICRO_MODEL, cfg, data)
    trainer.fit()
    assert {"val/words", "val/numbers"} <= set(trainer.history[-1])
    recorded = json.loads((trainer.run_dir / "run.json").read_text())["train_config"]["train_domains"]
    assert recorded == ["numbers"]
    assert Trainer.resume(trainer.run_dir, steps=4).cfg.train_domains == ("numbers",)


def test_train_domains_proportional_to_text_among_those_named(tmp_path, domain_folder):
    cfg = _cfg(tmp_path / "run", domain_folder)
    everything = build_data(cfg, MICRO_MODEL.seq_len)
    both = LMData(everything.corpus, seq_len=32, batch_size=4, train_domains=["words", "numbers"])
    sizes = {d: s["train_tokens"] for d, s in everything.stats().items()}
    total = sum(sizes.values())
    assert both.stats()["words"]["train_share"] == pytest.approx(sizes["words"] / total, abs=1e-4)
    assert both.train_domains == everything.domains == ["numbers", "words"]  # the corpus's order


@pytest.mark.parametrize("value, needle", [
    (("code",), "train_domains has unknown domain(s) ['code']: known domains are numbers, words"),
])
def test_unknown_train_domains_are_refused_listing_the_known_ones(tmp_path, domain_folder, value, needle):
    with pytest.raises(ValueError) as err:
        Trainer(MICRO_MODEL, _cfg(tmp_path / "run", domain_folder, train_domains=value))
    assert str(err.value) == needle


def test_train_domains_must_match_data_given_to_the_trainer(tmp_path, domain_folder):
    cfg = _cfg(tmp_path / "run", domain_folder, train_domains=("words",))
    data = build_data(dataclasses.replace(cfg, train_domains=None), MICRO_MODEL.seq_len)
    with pytest.raises(ValueError, match=r"train_domains=\['words'\] is invalid for the data given"):
        Trainer(MICRO_MODEL, cfg, data)


@pytest.mark.parametrize("value, needle", [
    ((), "train_domains=() is invalid: must name at least one domain"),
    (("words", "words"), "must not repeat a domain"),
])
def test_train_config_refuses_bad_train_domains(value, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(train_domains=value)


# --- the CLI: one line, exit status 2 ------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["--trainable", "everything"], "argument --trainable: invalid choice: 'everything'"),
    (["--trainable", "esft", "--esft-domain", "words", "--esft-threshold", "1.5", "--init-from", "{src}"],
     "esft_threshold=1.5 is invalid: must be a fraction in [0, 1]"),
    (["--trainable", "esft", "--esft-domain", "words", "--esft-top-p", "-0.5", "--init-from", "{src}"],
     "esft_top_p=-0.5 is invalid"),
    (["--trainable", "esft", "--esft-domain", "code", "--esft-top-n", "2", "--init-from", "{src}"],
     "esft_domain='code' is invalid: known domains are numbers, words"),
    (["--esft-top-n", "2"], "esft_top_n=2 is invalid: applies only with trainable=esft"),
    (["--init-from", "{src}", "--num-experts", "8"],
     "does not fit this run's model: tensor 'blocks.0.ffn.router.weight' has shape (4, 32) there and (8, 32) here"),
    (["--init-from", "{src}", "--resume"], "--init-from starts a new run from another run's weights"),
    (["--train-domains", "words,code"], "train_domains has unknown domain(s) ['code']: known domains are"),
    (["--trainable", "experts", "--dense"], "trainable='experts' is invalid: the model has no MoE layer"),
])
def test_bad_fine_tuning_flags_exit_2_with_one_line(tmp_path, capsys, domain_folder, source, args, needle):
    args = [a.replace("{src}", str(source.run_dir)) for a in args]
    code, _, err = run_cli(capsys, "train", *MICRO_FLAGS, "--data", str(domain_folder), "--steps", "1",
                           "--no-progress", "--run-dir", str(tmp_path / "ft"), *args)
    assert code == 2
    assert needle in one_line(err)


def test_cli_fine_tunes_with_esft_and_says_what_trains(tmp_path, capsys, domain_folder, source):
    code, out, err = run_cli(capsys, "train", *MICRO_FLAGS, "--data", str(domain_folder), "--steps", "1",
                             "--no-progress", "--run-dir", str(tmp_path / "ft"), "--init-from", str(source.run_dir),
                             "--trainable", "esft", "--esft-domain", "numbers", "--esft-top-n", "1",
                             "--train-domains", "numbers")
    assert code == 0, err
    assert f"init from: {list_checkpoints(source.run_dir)[-1][1].resolve()} (step 3)" in out
    assert "training batches from: numbers (validation: every domain)" in out
    assert "trainable: esft, 6,144 of" in out and "ESFT experts for 'numbers' per MoE layer: " in out
    info = json.loads((tmp_path / "ft" / "run.json").read_text())
    experts = info["trainable"]["esft"]["experts"]
    assert [len(row) for row in experts] == [1, 1]
    assert info["trainable"]["esft"]["rule"] == "top_n" and info["trainable"]["router_bias"] == "frozen"
    # workbench show reads both records back from run.json
    code, out, err = run_cli(capsys, "show", str(tmp_path / "ft"))
    assert code == 0, err
    assert f"started from: {info['init_from']['path']} (step 3, weights only" in out
    assert f"trainable: esft, {info['trainable']['parameters']:,} of" in out
    assert "ESFT experts per MoE layer: " + " | ".join(str(row) for row in experts) in out


def test_a_balancing_bias_the_checkpoint_lacks_starts_at_zero_and_one_it_has_must_be_kept(tmp_path, domain_folder,
                                                                                           source):
    biased = dataclasses.replace(MICRO_MODEL, moe=dataclasses.replace(MICRO_MODEL.moe, bias_update_rate=1e-3))
    trainer = Trainer(biased, _cfg(tmp_path / "ft", domain_folder, init_from=str(source.run_dir)))
    assert all(torch.equal(layer.router.bias, torch.zeros(4)) for layer in trainer.model.moe_layers())
    assert trainer.init_from["zero_balancing_bias"] == ["blocks.0.ffn.router.bias", "blocks.1.ffn.router.bias"]
    trainer.save()  # a checkpoint with the bias: a run without loss-free balancing would drop it
    with pytest.raises(ValueError, match=r"its tensor 'blocks.0.ffn.router.bias' has no place in this run's model "
                                         r"\(its loss-free balancing bias: keep it with bias_update_rate > 0\)"):
        Trainer(MICRO_MODEL, _cfg(tmp_path / "ft2", domain_folder, init_from=str(tmp_path / "ft")))
