"""The README runs as written (issue 26, defects 1, 2, 6, 7).

Every ```python block of README.md runs, in order, in one namespace per ``##`` section, in a
temporary folder (so ``runs/...`` paths land there), with these substitutions and no others:

- ``steps=N`` becomes ``steps=2`` plus small batches, corpus and validation set (``SMALL``): the
  same code paths, in seconds;
- a list of seeds ``seeds=[0, 1, 2]`` keeps its first two (mean and std over seeds still exist);
- ``runs/demo`` is made first as ``make demo`` makes it (the Makefile's command), with the
  same small settings.

A block that needs an optional extra that is not installed (MindSpore, transformers) or a GPU is
skipped with that reason (the section's other blocks still run). Every ``workbench ...`` line of
the ```bash blocks (``torchrun ... -m workbench ...`` included) parses with the CLI's own parser;
the cheap ones (``show`` of a run the README made, ``--help``) run. Lines on GPUs or several
processes (``torchrun``) are only parsed.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
STEPS = 2
SMALL = {"batch_size": 4, "eval_windows": 1, "max_bytes_per_domain": 60_000}
# extra -> (what a block that needs it mentions, what pip installs it as)
EXTRAS = {"mindspore": (("workbench.ms", "mindspore"), "mindspore"),
          "transformers": (("transformers", "workbench.interop"), "hf")}
GPU = re.compile(r"""device=["'](cuda|npu)""")
# flags whose value is a file or folder a command writes
WRITES = ("--json", "--figure", "--out", "--cache", "--run-dir")


def fenced(lang: str) -> list[tuple[int, str, str]]:
    """(line number, ``##`` section, code) of every fenced block of ``lang``, in order."""
    blocks, section, inside, start, lines = [], "", None, 0, []
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if inside is None and line.startswith("## "):
            section = line[3:].strip()
        elif inside is None and line.startswith("```"):
            inside, start, lines = line[3:].strip(), number, []
        elif inside is not None and line.startswith("```"):
            if inside == lang:
                blocks.append((start, section, "\n".join(lines) + "\n"))
            inside = None
        elif inside is not None:
            lines.append(line)
    return blocks


def sections() -> list[str]:
    return list(dict.fromkeys(section for _, section, _ in fenced("python")))


def small(code: str) -> str:
    """The documented substitutions."""
    extra = "".join(f", {k}={v!r}" for k, v in SMALL.items())
    code = re.sub(r"\bsteps=\d+", f"steps={STEPS}{extra}", code)
    return re.sub(r"\bseeds=\[(\d+), (\d+)(, \d+)+\]", r"seeds=[\1, \2]", code)


def cannot_run(code: str) -> str | None:
    """Why a python block cannot run here (an optional extra not installed, a GPU), or None."""
    for extra, (markers, pip_extra) in EXTRAS.items():
        if any(m in code for m in markers) and importlib.util.find_spec(extra) is None:
            return f"needs {extra}, not installed (pip install 'moe-workbench[{pip_extra}]')"
    if GPU.search(code):
        return "needs a GPU or NPU"
    return None


def command_lines() -> list[tuple[int, str, list[str]]]:
    """(line number, the line, its ``workbench`` arguments) of every command line of the bash
    blocks that runs ``workbench`` (also as ``.venv/bin/workbench`` or ``torchrun ... -m workbench``)."""
    found = []
    for start, _, code in fenced("bash"):
        pending, first = "", 0
        for offset, line in enumerate(code.splitlines(), 1):
            first = first or start + offset
            if line.endswith("\\"):  # continued on the next line
                pending += line[:-1] + " "
                continue
            line, pending, number, first = pending + line, "", first, 0
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if Path(words[0]).name == "workbench":
                found.append((number, " ".join(line.split()), words[1:]))
            elif words[0] == "torchrun" and "workbench" in words:
                at = words.index("workbench")
                assert words[at - 1] == "-m", line
                found.append((number, " ".join(line.split()), words[at + 1:]))
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A temporary folder as the working directory, holding ``runs/demo`` as ``make demo`` makes it
    (its command's run, through the Python API: the CLI's report and summary are not needed here)."""
    import workbench
    from workbench.train import TrainConfig, Trainer

    demo = re.search(r"^demo:.*\n\t\$\(BIN\)/workbench (.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert demo and shlex.split(demo.group(1)) == ["train", "--preset", "tiny", "--run-dir", "runs/demo",
                                                    "--overwrite"], "make demo runs another command: update this"
    tmp = tmp_path_factory.mktemp("readme")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("WANDB_MODE", "disabled")
        mp.setenv("MPLBACKEND", "Agg")
        Trainer(workbench.preset("tiny"), TrainConfig(run_dir="runs/demo", steps=STEPS, progress=False, **SMALL),
                overwrite=True).fit()
        yield tmp


def run_section(section: str) -> list[str]:
    """Run the section's blocks in order in one namespace; the reasons of those skipped."""
    namespace, skipped = {"__name__": "__readme__"}, []
    for start, sec, code in fenced("python"):
        if sec != section:
            continue
        if (why := cannot_run(code)) is not None:
            skipped.append(f"README.md line {start}: {why}")
            continue
        t0 = time.perf_counter()
        exec(compile(small(code), f"README.md, block at line {start}", "exec"), namespace)
        print(f"README.md, block at line {start}: {time.perf_counter() - t0:.1f} s")
    return skipped


@pytest.mark.parametrize("section", sections())
def test_python_snippets_run_as_written(section, workdir, capsys):
    """Defect 2: ``results.routing_counts("aux 1e-2", 0)`` asked for a run named "aux 0.01"."""
    t0 = time.perf_counter()
    skipped = run_section(section)
    print(f"{section}: {time.perf_counter() - t0:.1f} s")
    if skipped:
        pytest.skip("; ".join(skipped))


def test_trainer_snippet_runs_twice(workdir):
    """Defect 6: a second run of the Trainer snippet met the first run's checkpoints in its run_dir
    ("already holds checkpoints"). Run once more when the snippets above have run it, else twice."""
    from workbench.train.checkpoint import list_checkpoints

    blocks = [(start, code) for start, _, code in fenced("python") if "Trainer(" in code and "Trainer, " in code]
    assert blocks, "the README shows the Trainer"
    start, code = blocks[0]
    lines = code.splitlines()  # the block up to its fit(): what a user runs again
    part = small("\n".join(lines[:next(i for i, line in enumerate(lines) if ".fit()" in line) + 1]) + "\n")
    run_dir = Path(re.search(r"""run_dir=["']([^"']+)""", part).group(1))
    for _ in range(1 if list_checkpoints(run_dir) else 2):
        exec(compile(part, f"README.md, block at line {start}", "exec"), {"__name__": "__readme__"})
    assert list_checkpoints(run_dir)


def test_every_workbench_command_parses_and_the_cheap_ones_run(workdir, capsys):
    from workbench.cli import build_parser, main

    lines = command_lines()
    assert any(args[:1] == ["show"] for _, _, args in lines)
    ran = []
    for number, line, args in lines:
        where = f"README.md line {number}: {line}"
        try:
            build_parser().parse_args(args)
        except SystemExit as err:
            assert err.code == 0 and "--help" in args, f"{where}: does not parse (exit {err.code})"
            ran.append(line)  # --help runs when it parses
            continue
        if args[0] == "show" and Path(args[1]).is_dir():
            assert main(args) == 0, where
            ran.append(line)
    assert any(" show " in f" {line} " for line in ran), "no `workbench show` of a run the README made ran"


def test_commands_run_as_written_after_make_demo():
    """Defect 1: right after ``make demo``, ``workbench ...`` was "command not found": the README must
    put .venv's ``workbench`` on PATH (``source .venv/bin/activate``) before its first bare command,
    and that line must do it."""
    text = README.read_text()
    first_command = min(number for number, _, _ in command_lines())
    activate = [n for n, line in enumerate(text.splitlines(), 1)
                if re.match(r"\s*(source|\.) \.venv/bin/activate", line)]
    assert activate and activate[0] < first_command, \
        "README.md shows `workbench ...` before it says to activate .venv (source .venv/bin/activate)"
    if not (ROOT / ".venv" / "bin" / "activate").is_file():
        pytest.skip("no .venv here to activate")
    line = text.splitlines()[activate[0] - 1].split("#")[0]
    out = subprocess.run(["bash", "-c", f"{line} && command -v workbench"], cwd=ROOT, capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert out.returncode == 0, out
    assert Path(out.stdout.strip()).resolve() == (ROOT / ".venv" / "bin" / "workbench").resolve(), out


def inline_commands() -> list[str]:
    """Every `workbench ...` in backticks of the README's text (a span may wrap a line)."""
    return [" ".join(m.split()) for m in re.findall(r"`(workbench [^`]*)`", README.read_text())]


def test_example_commands_write_under_runs():
    """Defect 7: example commands wrote over committed files (``--json benchmarks/...``) or into the
    repository's root (``--json report.json``); every file or folder a README command writes is
    under ``runs/``, and committing a result is a deliberate copy."""
    bad = []
    commands = [args for _, _, args in command_lines()] + [shlex.split(c)[1:] for c in inline_commands()]
    for args in commands:
        for i, word in enumerate(args):
            flag, _, value = word.partition("=")
            if flag in WRITES:
                value = value or (args[i + 1] if i + 1 < len(args) else "")
                if value and not value.startswith("-") and not value.startswith("runs/"):
                    bad.append(f"workbench {' '.join(args)}")
    assert not bad, "README commands that write outside runs/:\n" + "\n".join(bad)
