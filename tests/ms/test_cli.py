"""``workbench parity`` and ``workbench bench mindspore`` from the command line."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mindspore", reason="MindSpore is not installed: pip install 'moe-workbench[mindspore]'")

from workbench.cli import main  # noqa: E402


def test_parity_command_passes_and_writes_its_report(tmp_path, capsys):
    out = tmp_path / "parity.json"
    rc = main(["parity", "--preset", "tiny", "--router", "switch", "--dispatch", "capacity", "--batch-size", "1",
               "--curve-steps", "0", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "parity (pynative): PASS" in text
    report = json.loads(out.read_text())
    assert report["passed"] and report["config"]["moe"]["router"] == "switch"
    assert len(report["selection"]) == 4 and {r["operator"] for r in report["checks"]} >= {"attention", "end to end"}


@pytest.mark.parametrize(("argv", "message"), [
    (["parity", "--router", "hash"], "router='hash' is invalid: the MindSpore model supports"),
    (["parity", "--dispatch", "loopy"], "dispatch='loopy' is invalid"),
    (["parity", "--mode", "eager"], "--mode='eager' is invalid: allowed values are pynative, graph"),
    (["bench", "mindspore", "--modes", "graph,eager"], "modes='eager' is invalid"),
])
def test_bad_flags_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_bench_command_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "mindspore", "--batch-size", "1", "--steps", "1", "--warmup", "0", "--rounds", "1",
               "--modes", "pynative", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert set(result["step_s_median"]) == {"torch", "mindspore_pynative"}
    assert result["ratio_pynative"] > 0 and result["machine"]["mindspore"] and result["date"]
