"""The experiment runner: cached runs are reused, any change to a run's config or code retrains it."""

from __future__ import annotations

import dataclasses
import math

import pytest

from tests.train.conftest import one_line, run_cli
from workbench import experiments as ex
from workbench.config import ModelConfig, MoEConfig, preset
from workbench.experiments import Experiment, Results, load_sweep, run_experiments, run_key
from workbench.moe.routers import ROUTERS
from workbench.train.config import TrainConfig
from workbench.train.trainer import Trainer


@pytest.fixture(autouse=True)
def _pinned_code_version(monkeypatch):
    """The code version hashes the package source; pin it so that an edit made while the tests run
    cannot turn a cache hit into a miss (the test of code changes sets its own)."""
    monkeypatch.setattr(ex, "code_version", lambda: "pinned")


REAL_CODE_VERSION = ex.code_version


def test_code_version_follows_the_training_code_not_the_plots(tmp_path):
    import shutil
    from pathlib import Path

    package = tmp_path / "workbench"
    shutil.copytree(Path(ex.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    before = REAL_CODE_VERSION(package)
    (package / "viz.py").write_text((package / "viz.py").read_text() + "\n# a new plot\n")
    (package / "cli" / "train.py").write_text((package / "cli" / "train.py").read_text() + "\n# a new flag\n")
    (package / "experiments.py").write_text((package / "experiments.py").read_text() + "\n# a new table\n")
    assert REAL_CODE_VERSION(package) == before
    (package / "moe" / "balance.py").write_text((package / "moe" / "balance.py").read_text() + "\n# changed\n")
    assert REAL_CODE_VERSION(package) != before


def small_model(**moe) -> ModelConfig:
    return preset("tiny", expert_hidden=16, **moe).replace(seq_len=32, d_model=32, n_layers=2, n_heads=2,
                                                          dense_hidden=32)


def small_train(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 3, "batch_size": 2, "eval_every": 2, "eval_windows": 1,
                          "max_bytes_per_domain": 200_000, "progress": False, **kw})


def two_experiments() -> list[Experiment]:
    return [Experiment(name="aux", model=small_model(), train=small_train(), tags={"method": "aux"}),
            Experiment(name="free", model=small_model(aux_loss_weight=0.0, bias_update_rate=1e-2),
                       train=small_train(), tags={"method": "loss-free"})]


def test_second_call_reuses_every_run_and_trains_nothing(tmp_path, monkeypatch):
    first = run_experiments(two_experiments(), seeds=[0, 1], cache_dir=tmp_path, log=None)
    assert not first.runs["cached"].any()

    def must_not_train(self, *args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(Trainer, "fit", must_not_train)
    lines = []
    second = run_experiments(two_experiments(), seeds=[0, 1], cache_dir=tmp_path, log=lines.append)
    assert second.runs["cached"].all()
    assert all("cached" in line for line in lines) and len(lines) == 4
    assert second.runs["val_loss"].tolist() == first.runs["val_loss"].tolist()
    assert second.steps.drop(columns=["step_time_s", "tokens_per_s"]).equals(
        first.steps.drop(columns=["step_time_s", "tokens_per_s"]))


def test_a_changed_config_field_retrains_only_that_run(tmp_path):
    run_experiments(two_experiments(), seeds=[0], cache_dir=tmp_path, log=None)
    changed = two_experiments()
    changed[1] = dataclasses.replace(changed[1], train=small_train(lr=1e-3))
    again = run_experiments(changed, seeds=[0], cache_dir=tmp_path, log=None)
    assert again.runs.set_index("name")["cached"].to_dict() == {"aux": True, "free": False}


def test_a_new_seed_trains_and_known_seeds_are_reused(tmp_path):
    run_experiments(two_experiments()[:1], seeds=[0], cache_dir=tmp_path, log=None)
    again = run_experiments(two_experiments()[:1], seeds=[0, 5], cache_dir=tmp_path, log=None)
    assert again.runs.set_index("seed")["cached"].to_dict() == {0: True, 5: False}


def test_a_code_change_retrains(tmp_path, monkeypatch):
    run_experiments(two_experiments()[:1], seeds=[0], cache_dir=tmp_path, log=None)
    monkeypatch.setattr(ex, "code_version", lambda: "edited")
    assert not run_experiments(two_experiments()[:1], seeds=[0], cache_dir=tmp_path, log=None).runs["cached"].any()


def test_settings_that_do_not_change_the_result_keep_the_cache(tmp_path):
    run_experiments(two_experiments()[:1], seeds=[0], cache_dir=tmp_path, log=None)
    e = two_experiments()[0]
    e = dataclasses.replace(e, train=dataclasses.replace(e.train, run_dir="elsewhere", progress=True,
                                                         wandb_project="x", checkpoint_every=1, keep_checkpoints=5))
    assert run_experiments([e], seeds=[0], cache_dir=tmp_path, log=None).runs["cached"].all()


def _other_value(cls, name: str, value):
    """A different value of field ``name`` that ``cls``'s validation accepts (tried in order)."""
    if isinstance(value, bool):
        candidates = [not value]
    elif value is None:
        candidates = [True, 2, 0.5, "x", 1.0]
    elif isinstance(value, int):
        candidates = [value + 1, value * 2, value - 1, 1]
    elif isinstance(value, float):
        candidates = [value * 2, value + 0.5, value / 2, 0.5]
    elif name == "router":
        candidates = [r for r in ROUTERS if r != value]
    else:
        candidates = ["sequence", "global_batch", "proportional", "score", "capacity", "loop", "token_choice",
                      "bf16", "none", "cpu", "some/file.txt", "experts"]
    return candidates


def _vary(cfg, name: str):
    for candidate in _other_value(type(cfg), name, getattr(cfg, name)):
        if candidate == getattr(cfg, name):
            continue
        try:
            return dataclasses.replace(cfg, **{name: candidate})
        except (ValueError, TypeError):
            continue
    return None


def test_every_config_field_is_part_of_the_run_key():
    base = Experiment(name="x", model=preset("tiny"), train=TrainConfig())
    key = run_key(base, 0, "v")
    assert run_key(base, 1, "v") != key, "the seed"
    assert run_key(base, 0, "w") != key, "the code version"
    unvaried = []
    # a base where every field can change alone: capacity_scope needs the capacity dispatch, the group
    # fields a router with expert groups, the shared-expert fields a shared expert
    moe_cfg = dataclasses.replace(base.model.moe, dispatch="capacity", router="sigmoid", num_groups=2,
                                  num_shared_experts=1)
    base_capacity = dataclasses.replace(base, model=base.model.replace(moe=moe_cfg))
    for f in dataclasses.fields(MoEConfig):
        for start, exp in ((moe_cfg, base_capacity), (base.model.moe, base)):  # the router: from the default
            varied = _vary(start, f.name)
            if varied is not None:
                changed = dataclasses.replace(exp, model=base.model.replace(moe=varied))
                assert run_key(changed, 0, "v") != run_key(exp, 0, "v"), f"moe.{f.name}"
                break
        else:
            unvaried.append(f"moe.{f.name}")
    for f in dataclasses.fields(ModelConfig):
        if f.name == "moe":
            continue
        varied = _vary(base.model, f.name)
        if varied is None:
            unvaried.append(f"model.{f.name}")
            continue
        assert run_key(dataclasses.replace(base, model=varied), 0, "v") != key, f"model.{f.name}"
    # the ESFT fields go together (trainable=esft, init_from, a domain and one rule): bases where each can change
    esft = {"trainable": "esft", "init_from": "runs/x", "esft_domain": "code"}
    train_bases = [base.train, *(TrainConfig(**esft, **rule) for rule in
                                 ({"esft_top_n": 1}, {"esft_threshold": 0.5}, {"esft_top_p": 0.5}))]
    for f in dataclasses.fields(TrainConfig):
        start = next((t for t in train_bases if _vary(t, f.name) is not None), base.train)
        varied = _vary(start, f.name)
        if varied is None:
            unvaried.append(f"train.{f.name}")
            continue
        exp = dataclasses.replace(base, train=start)
        same = run_key(dataclasses.replace(base, train=varied), 0, "v") == run_key(exp, 0, "v")
        if f.name in ex.NOT_IN_KEY or f.name == "seed":  # the seed is the sweep's, not the config's
            assert same, f"train.{f.name} should not change the key"
        else:
            assert not same, f"train.{f.name}"
    assert not unvaried, f"no valid alternative value found for {unvaried}"


def test_tables_have_one_row_per_run_and_per_step(tmp_path):
    exps = two_experiments()
    exps[1] = dataclasses.replace(exps[1], seeds=(3,))
    r = run_experiments(exps, seeds=[0, 1], cache_dir=tmp_path, log=None)
    assert sorted(zip(r.runs["name"], r.runs["seed"], strict=True)) == [("aux", 0), ("aux", 1), ("free", 3)]
    assert len(r.steps) == 3 * 3 and set(r.steps["step"]) == {1, 2, 3}
    assert set(r.evals["step"]) == {2, 3}
    for metric in ("cv", "entropy", "unused_experts", "dropped_fraction"):  # means over the MoE layers
        assert r.steps[metric].tolist() == pytest.approx(r.steps[[f"L0/{metric}", f"L1/{metric}"]].mean(axis=1))
    assert r.runs["method"].tolist() == ["aux", "aux", "loss-free"]
    assert (r.runs["tokens"] == 3 * 2 * 32).all()
    assert r.runs["max_vio_global"].notna().all() and (r.runs["max_vio_global"] >= 0).all()
    assert len(r.detail("free", 3)["bias"]["0"]) == 3  # one bias vector per step
    assert "bias" not in r.detail("aux", 0) or not r.detail("aux", 0)["bias"]
    with pytest.raises(KeyError, match="seeds"):
        r.detail("free", 0)


def test_global_max_vio_is_computed_from_the_validation_counts(tmp_path):
    r = run_experiments(two_experiments()[:1], seeds=[0], cache_dir=tmp_path, log=None)
    ev = r.detail("aux", 0)["evals"][-1]
    per_layer = []
    for layer in ev["routing_matrix"]:
        loads = [sum(col) for col in zip(*layer, strict=True)]
        per_layer.append(max(loads) / (sum(loads) / len(loads)) - 1)
    assert r.runs["max_vio_global"].iloc[0] == pytest.approx(sum(per_layer) / len(per_layer))


def test_results_save_and_load_round_trip(tmp_path):
    r = run_experiments(two_experiments(), seeds=[0], cache_dir=tmp_path / "cache", log=None)
    loaded = Results.load(r.save(tmp_path / "out"))
    assert loaded.runs["val_loss"].tolist() == pytest.approx(r.runs["val_loss"].tolist())
    assert loaded.detail("free", 0)["bias"] == r.detail("free", 0)["bias"]
    assert len(loaded.steps) == len(r.steps)
    for column in ("tokens_seen", "tokens_per_s", "lm_loss"):  # derived again on load, or kept to 5 digits
        assert loaded.steps[column].tolist() == pytest.approx(r.steps[column].tolist(), rel=1e-4)


def test_parallel_workers_give_the_serial_results(tmp_path):
    serial = run_experiments(two_experiments(), seeds=[0], cache_dir=tmp_path / "a", jobs=1, log=None)
    lines = []
    parallel = run_experiments(two_experiments(), seeds=[0], cache_dir=tmp_path / "b", jobs=2, log=lines.append)
    assert [line.split(":")[0] for line in lines if "training" in line and "[" in line] == [
        "[1/2] training aux, seed 0", "[2/2] training free, seed 0"]
    # one thread per worker vs this process's threads: equal up to float summation order
    assert parallel.runs["val_loss"].tolist() == pytest.approx(serial.runs["val_loss"].tolist(), abs=1e-4)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"seeds": []}, "seeds"), ({"seeds": [0, 0]}, "seeds"), ({"seeds": [True]}, "seeds"), ({"jobs": 0}, "jobs"),
])
def test_bad_arguments_name_the_argument(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        run_experiments(two_experiments(), **{"seeds": [0], **kwargs}, cache_dir=tmp_path, log=None)


def test_duplicate_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="distinct names"):
        run_experiments(two_experiments()[:1] * 2, seeds=[0], cache_dir=tmp_path, log=None)


def test_experiment_checks_its_fields():
    with pytest.raises(ValueError, match="name"):
        Experiment(name=" ", model=small_model())
    with pytest.raises(ValueError, match="tags"):
        Experiment(name="a", model=small_model(), tags={"seed": 1})
    with pytest.raises(ValueError, match="seeds"):
        Experiment(name="a", model=small_model(), seeds=())


# --- sweep files --------------------------------------------------------------------------------

SWEEP = """
preset: tiny
seeds: [0, 1]
model: {seq_len: 32, d_model: 32, n_layers: 2, n_heads: 2, dense_hidden: 32}
moe: {expert_hidden: 16, aux_loss_weight: 0.0}
train: {steps: 2, batch_size: 2, eval_every: 2, eval_windows: 1, max_bytes_per_domain: 200000}
runs:
  - name: none
  - name: aux
    moe: {aux_loss_weight: 0.01}
    seeds: [7]
  - name: dense
    dense: true
    tags: {kind: dense}
jobs: 1
"""


def test_load_sweep_builds_the_experiments(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SWEEP)
    sweep = load_sweep(path)
    assert [e.name for e in sweep.experiments] == ["none", "aux", "dense"]
    none, aux, dense = sweep.experiments
    assert none.model.moe.aux_loss_weight == 0.0 and aux.model.moe.aux_loss_weight == 0.01
    assert aux.seeds == (7,) and none.seeds is None and sweep.seeds == [0, 1]
    assert none.model.n_layers == 2 and none.model.moe.expert_hidden == 16 and none.train.steps == 2
    assert dense.model.moe is None and dense.tags == {"kind": "dense"}
    assert sweep.out_dir.name == "s" and sweep.jobs == 1


@pytest.mark.parametrize(("text", "match"), [
    ("runs: []", "runs"),
    ("runz: [{name: a}]", "unknown keys"),
    ("runs: [{name: a, moe: {aux_loss_weight: -1}}]", "aux_loss_weight"),
    ("runs: [{name: a, train: {stepz: 3}}]", "stepz"),
    ("runs: [{name: a, model: {moe: 3}}]", "moe"),
    ("runs: [{name: a}]\nseeds: [1, 1]", "seeds"),
    ("runs: [{name: a}]\njobs: 0", "jobs"),
    ("runs: [{name: a}\n", "not valid YAML"),
    ("- a\n- b", "mapping"),
])
def test_bad_sweep_files_name_the_key(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_sweep(path)


def test_cli_sweep_trains_then_reuses(tmp_path, capsys):
    from workbench.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(SWEEP.replace("seeds: [0, 1]", "seeds: [0]"))
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert "training" in first and (out / "runs.csv").exists() and (out / "details.json.gz").exists()
    assert main(["sweep", str(path), "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    second = capsys.readouterr().out
    assert "training" not in second and second.count("cached") == 3
    loaded = Results.load(out)
    assert loaded.runs["name"].tolist() == ["none", "aux", "dense"]
    assert math.isnan(loaded.runs.set_index("name").loc["dense", "max_vio_global"])


def test_cli_sweep_bad_file_is_one_line(tmp_path, capsys):
    from workbench.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("runs: [{name: a, train: {stepz: 3}}]")
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stepz" in err


def test_capacity_runs_record_validation_drops_and_the_dropless_loss(tmp_path):
    never_drops = Experiment(name="never", model=small_model(dispatch="capacity", capacity_factor=None),
                             train=small_train())
    drops = Experiment(name="drops", model=small_model(dispatch="capacity", capacity_factor=0.25),
                       train=small_train())
    r = run_experiments([never_drops, drops, two_experiments()[0]], seeds=[0], cache_dir=tmp_path, log=None)
    by = r.runs.set_index("name")
    # nothing dropped: the dropless copy of the same weights computes the same function
    assert by.loc["never", "eval_dropped_fraction"] == 0.0
    assert by.loc["never", "dropless_val_loss"] == pytest.approx(by.loc["never", "val_loss"], abs=1e-5)
    assert by.loc["drops", "eval_dropped_fraction"] > 0.3  # C is a quarter of the mean load
    assert by.loc["drops", "dropless_val_loss"] != pytest.approx(by.loc["drops", "val_loss"], abs=1e-4)
    assert math.isnan(by.loc["aux", "eval_dropped_fraction"])  # not a capacity dispatch


def test_traced_runs_record_the_validation_routing_and_saturation(tmp_path):
    exps = two_experiments()[:1]
    r = run_experiments(exps, seeds=[0], cache_dir=tmp_path, log=None, traces=True)
    counts = r.routing_counts("aux", 0)
    final = r.detail("aux", 0)["evals"][-1]
    # the trainer's own validation counted the same windows: its domain x expert matrix must agree
    assert counts.domain_expert_LDE.tolist() == final["routing_matrix"]
    assert counts.domains == final["domains"] and counts.layers == [0, 1]
    assert counts.tokens == 4 * 1 * 32  # four domains x one window x seq_len
    sat = r.saturation()
    assert sorted(sat["step"].unique()) == [2, 3] and set(sat["layer"]) == {0, 1}
    assert (sat.loc[sat["step"] == 3, "saturation"] == 1.0).all()  # the final routing against itself
    assert ((sat["baseline"] > 0) & (sat["baseline"] <= 1)).all()
    # a run cached without traces is not reused for a traced sweep, and vice versa
    plain = run_experiments(exps, seeds=[0], cache_dir=tmp_path, log=None)
    assert not plain.runs["cached"].any() and "traces" not in plain.detail("aux", 0)
    with pytest.raises(ValueError, match="traces=True"):
        plain.routing_counts("aux", 0)
    assert plain.saturation().empty
    assert run_key(exps[0], 0, "v", traces=True) != run_key(exps[0], 0, "v")


# --- sweep files that used to pass a check and fail later (issue 27, items 7, 11 and 16) ---------

BASE = """
model: {seq_len: 32, d_model: 32, n_layers: 2, n_heads: 2, dense_hidden: 32}
moe: {expert_hidden: 16}
train: {steps: 2, batch_size: 2, eval_every: 2, eval_windows: 1, max_bytes_per_domain: 200000}
jobs: 1
"""


def sweep_cli(capsys, tmp_path, text: str, *flags: str) -> tuple[int, str, str]:
    path = tmp_path / "s.yaml"
    path.write_text(BASE + text)
    return run_cli(capsys, "sweep", str(path), "--cache", str(tmp_path / "cache"), *flags)


@pytest.mark.parametrize(("text", "needle"), [
    ('runs: [{name: a, dense: "no"}]', "dense='no' is invalid: must be true or false"),
    ("runs: [{name: a, train: {steps: true}}]", "train.steps=True is invalid: must be an integer"),
    ('runs: [{name: a, train: {lr: "0.1"}}]', "train.lr='0.1' is invalid: must be a number"),
    ('runs: [{name: a, moe: {normalize_topk: "no"}}]', "normalize_topk='no' is invalid: must be true or false or null"),
    ("runs: [{name: a, model: {tie_embeddings: 1}}]", "tie_embeddings=1 is invalid: must be true or false"),
    ("out: 5\nruns: [{name: a}]", "out=5 is invalid: must be a folder path"),
    ("cache: [a, b]\nruns: [{name: a}]", "cache=['a', 'b'] is invalid: must be a folder path"),
    ('runs: [{name: a, tags: "x"}]', "tags='x' is invalid: must be a mapping"),
    ("runs: [{name: a}, {name: a}]", "runs=['a'] is invalid: need distinct names"),
    ("seeds: 3\nruns: [{name: a}]", "seeds=3 is invalid: must be a list of the seeds to run, such as [0, 1, 2]"),
    ("runs: [{name: a, seeds: 3}]", "seeds=3 is invalid: must be a list"),
])
def test_sweep_values_are_checked_by_type_before_a_dry_run(tmp_path, capsys, text, needle):
    """Items 7 and 11: each of these passed --dry-run (or raised TypeError, or trained the dense
    twin for dense: "no"); now --dry-run refuses them with one line naming the file and the key."""
    code, out, err = sweep_cli(capsys, tmp_path, text, "--dry-run")
    assert code == 2, out + err
    line = one_line(err)
    assert needle in line and "s.yaml" in line, line


def test_a_diverging_run_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    """Item 11: a run whose loss turns NaN used to end the sweep in a TrainingDiverged traceback."""
    text = "runs:\n  - name: boom\n    train: {lr: 1.0e+30, warmup_steps: 0, grad_clip: 0}\n  - name: ok\n"
    code, out, err = sweep_cli(capsys, tmp_path, text, "--out", str(tmp_path / "out"))
    assert code == 1, err
    assert "diverged boom, seed 0: gradient norm is nan at step 2; the sweep goes on" in out
    assert "done     ok, seed 0" in out
    line = one_line(err)
    assert "1 of 2 runs diverged: boom seed 0: gradient norm is nan at step 2" in line
    runs = Results.load(tmp_path / "out").runs.set_index("name")
    assert runs.loc["boom", "diverged"] == "gradient norm is nan at step 2"
    assert runs["diverged"].isna()["ok"]


def test_a_corrupt_cache_entry_is_retrained_with_one_line(tmp_path, capsys, recwarn):
    """Item 11: joblib printed its unpickling traceback (as a warning) and retrained without a word."""
    code, _, _ = sweep_cli(capsys, tmp_path, "runs: [{name: a}]", "--out", str(tmp_path / "out"))
    assert code == 0
    [pkl] = (tmp_path / "cache").rglob("output.pkl")
    pkl.write_bytes(b"\x80\x04 not a pickle")
    code, out, err = sweep_cli(capsys, tmp_path, "runs: [{name: a}]", "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert "a, seed 0: its cache entry cannot be read" in out and "training it again" in out
    assert "Traceback" not in out + err and not [w for w in recwarn if "joblib" in str(w.message).lower()
                                                  or "Exception while loading" in str(w.message)]
    code, out, _ = sweep_cli(capsys, tmp_path, "runs: [{name: a}]", "--out", str(tmp_path / "out"))
    assert code == 0 and "cached   a, seed 0" in out  # retrained into the cache


def test_a_binary_sweep_file_names_the_file(tmp_path, capsys):
    """Item 16: a binary file gave 'utf-8 codec can't decode...', naming neither file nor key."""
    path = tmp_path / "s.yaml"
    path.write_bytes(b"runs: [{name: a}]\n\xff\xfe\x00binary")
    code, _, err = run_cli(capsys, "sweep", str(path), "--dry-run")
    assert code == 2
    line = one_line(err)
    assert str(path) in line and "not UTF-8 text" in line


@pytest.mark.parametrize("where", ["flag", "file", "below a file"])
def test_a_sweep_out_that_is_a_file_is_refused_before_training(tmp_path, capsys, monkeypatch, where):
    """Item 16: --out pointing at a file failed only after training, with '[Errno 17] File exists'."""
    monkeypatch.setattr(ex, "train_run", lambda *a, **k: pytest.fail("a run was trained"))
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    out = taken if where != "below a file" else taken / "sub"
    if where == "file":
        code, _, err = sweep_cli(capsys, tmp_path, f"out: {out}\nruns: [{{name: a}}]")
    else:
        code, _, err = sweep_cli(capsys, tmp_path, "runs: [{name: a}]", "--out", str(out))
    assert code == 2
    line = one_line(err)
    assert ("--out=" if where != "file" else "out (in ") in line and "must be a folder" in line, line
