"""What each rank runs in tests/parallel/test_new_user_defects.py (spawned processes import it by name)."""

from __future__ import annotations

from typing import Any

from workbench.parallel.context import ParallelContext

PEAK_PER_RANK = 1e9  # rank r "measures" (r + 1) x this


def train_on_the_cli(ctx: ParallelContext, argv: list[str]) -> dict[str, Any]:
    """``workbench train ARGV`` on this rank as torchrun runs it, each rank's matmul peak a known number;
    what rank 0 printed and the run's summary.json."""
    import contextlib
    import io
    import json
    import sys
    from pathlib import Path

    import workbench.bench.peak as peak
    from workbench.cli import build_parser
    from workbench.cli.train import _train

    peak.measure_matmul_peak = lambda *a, **k: PEAK_PER_RANK * (ctx.rank + 1)
    sys.modules["workbench.viz"] = None  # no report.png: the summary skips it (matplotlib takes seconds)
    args = build_parser().parse_args(["train", *argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = _train(args, "workbench train", ctx)
    summary = Path(args.run_dir) / "summary.json"
    return {"code": code, "stdout": out.getvalue(),
            "summary": json.loads(summary.read_text()) if ctx.is_main else None}
