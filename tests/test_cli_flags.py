"""Flags come from config dataclasses: every field of a bench subcommand's config is one of its flags
(so a new field becomes a flag), a field parses back to its type, and the allowed values a ``--help``
lists are the configs' own (field metadata, or what the config's validation allows)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from workbench.bench.generate import GenerateBenchConfig
from workbench.bench.harness import LayerCase, ThroughputConfig
from workbench.bench.layer import LayerBenchConfig
from workbench.bench.train import TrainBenchConfig
from workbench.cli import build_parser
from workbench.cli.bench import DeviceTableArgs, ExpertParallelBenchArgs, ModelBenchArgs, ServeBenchArgs
from workbench.cli.common import Parser, add_config_flags, given
from workbench.config import ModelConfig, MoEConfig
from workbench.ms.bench import MindSporeBenchConfig
from workbench.train.config import AUTOCAST, TrainConfig

CONFIGS = {
    "layer": [LayerBenchConfig],
    "train": [TrainBenchConfig],
    "expert-parallel": [ExpertParallelBenchArgs],
    "throughput": [ThroughputConfig, LayerCase],
    "model": [ModelBenchArgs],
    "devices": [DeviceTableArgs],
    "mindspore": [MindSporeBenchConfig],
    "generate": [GenerateBenchConfig],
    "serve": [ServeBenchArgs],
}
# What a command does with its result, not what it measures: these flags are no config's.
RESULT_FLAGS = {"json", "figure", "smoke", "no_allocator_tuning"}
# throughput: the base LayerCase is flags of its own; its dispatch, routing and pass are set per measurement
NOT_FLAGS = {"throughput": {"base", "dispatch", "routing", "backward"}}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def flags(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}


def test_every_bench_subcommand_has_its_configs():
    assert set(subcommands(subcommands(build_parser())["bench"])) == set(CONFIGS)


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_bench_flags_are_exactly_the_fields_of_their_configs(command):
    parser = subcommands(subcommands(build_parser())["bench"])[command]
    fields = {f.name for cls in CONFIGS[command] for f in dataclasses.fields(cls)}
    assert flags(parser) - RESULT_FLAGS == fields - NOT_FLAGS.get(command, set())


def test_train_flags_are_the_fields_of_its_three_configs():
    train = subcommands(build_parser())["train"]
    fields = {f.name for cls in (ModelConfig, MoEConfig, TrainConfig) for f in dataclasses.fields(cls)} - {"moe"}
    assert fields <= flags(train)


def test_argument_dataclasses_follow_the_functions_they_call():
    """The CLI's argument dataclasses have the parameters (and defaults) of the function they feed."""
    from workbench.bench.expert_parallel import run_expert_parallel_bench
    from workbench.ms.bench import run_mindspore_bench

    def defaults(fn, renamed=None, leave_out=("log",)):
        params = {(renamed or {}).get(n, n): p.default for n, p in inspect.signature(fn).parameters.items()}
        return {n: d for n, d in params.items() if n not in leave_out}

    def field_defaults(cls):
        return {f.name: f.default for f in dataclasses.fields(cls)}

    assert field_defaults(ExpertParallelBenchArgs) == defaults(run_expert_parallel_bench)
    assert field_defaults(MindSporeBenchConfig) == defaults(run_mindspore_bench, {"preset_name": "preset"},
                                                            ("log", "model_cfg"))


@dataclass(kw_only=True)
class Demo:
    count: int = 1  # how many
    names: tuple[str, ...] = ("a", "b")
    cap: float | None = 1.5
    on: bool = True
    kind: str = field(default="x", metadata={"choices": ("x", "y"), "flag": "sort"})
    modes: tuple[str, ...] = field(default=("p",), metadata={"allowed": ("p", "q")})
    path: Path | None = None


def test_a_field_of_each_kind_becomes_a_flag_and_parses_back():
    parser = Parser(prog="demo")
    assert add_config_flags(parser, Demo) == [f.name for f in dataclasses.fields(Demo)]
    args = parser.parse_args(["--count", "3", "--names", "c,,d", "--cap", "none", "--no-on", "--sort", "y",
                              "--modes", "", "--path", "none"])
    assert Demo(**given(args, Demo)) == Demo(count=3, names=("c", "d"), cap=None, on=False, kind="y", modes=(),
                                             path=Path("none"))
    assert given(parser.parse_args([]), Demo) == {}  # a flag not given leaves the config's default
    text = parser.format_help()
    assert "how many (default: 1)" in text and "--sort {x,y}" in text and "one of: p, q (default: p)" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--sort", "z"])


def test_a_field_no_flag_can_parse_is_refused_loudly():
    @dataclass
    class Odd:
        table: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="Odd.table"):
        add_config_flags(Parser(prog="odd"), Odd)


def test_train_lists_the_values_each_config_allows():
    from workbench.moe import DISPATCHES, ROUTERS

    moe = MoEConfig.ALLOWED
    assert moe["router"] is ROUTERS and moe["dispatch"] is DISPATCHES  # the live registries
    str_fields = {f.name for f in dataclasses.fields(MoEConfig) if f.type in ("str", str)}
    assert set(moe) == str_fields  # every str field of MoEConfig is a choice
    for name, allowed in moe.items():  # and its validation refuses anything else, naming the values
        with pytest.raises(ValueError, match=f"{name}='nope' is invalid: allowed values are {', '.join(allowed)}"):
            MoEConfig(**{name: "nope"})
    train = TrainConfig.ALLOWED
    assert train["autocast"] == AUTOCAST and set(train) == {"autocast", "device"}  # run_dir, data: free text
    help_text = " ".join(subcommands(build_parser())["train"].format_help().split())
    assert f"one of: {', '.join(ROUTERS)}" in help_text and f"one of: {', '.join(AUTOCAST)}" in help_text
