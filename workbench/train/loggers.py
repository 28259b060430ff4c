"""Where metrics go: memory (the history a notebook reads), ``metrics.jsonl`` and wandb.

wandb is optional and never fatal: ``WANDB_MODE`` decides (``offline``, ``online``,
``disabled``; unset means disabled for library use; the CLI sets ``offline``), and any error
it raises turns tracking off with one warning while training goes on.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from workbench.train.rundir import json_safe


class JsonlLogger:
    """Appends one JSON object per line; flushed at once so a killed run keeps its log."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")  # JSON has no NaN: null instead

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                break
        return rows

    def truncate_after(self, step: int) -> list[dict[str, Any]]:
        """Drop rows logged after ``step`` (a resumed run redoes them) and a line cut short by a
        kill; returns the rows kept. The file is rewritten only when something is dropped."""
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines(keepends=True)
        rows = self.read()
        kept = [r for r in rows if r.get("step", 0) <= step]
        if len(kept) == len(rows) == len(lines) and all(line.endswith("\n") for line in lines):
            return kept
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
        os.replace(tmp, self.path)
        return kept


class WandbLogger:
    """Scalars to wandb; silently absent when wandb is missing or disabled."""

    def __init__(self, project: str, run_dir: Path, config: dict[str, Any], resume_id: str | None = None):
        self.run = None
        mode = os.environ.get("WANDB_MODE", "disabled")
        if mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")  # keep the terminal for the progress bar and summary
        try:
            import wandb
        except ImportError:
            warnings.warn("WANDB_MODE is set but wandb is not installed (pip install 'moe-workbench[tracking]'); "
                          "tracking is off", stacklevel=2)
            return
        try:
            self.run = wandb.init(project=project, dir=str(run_dir), config=config, mode=mode,
                                  id=resume_id, resume="allow" if resume_id else None, reinit=True)
        except Exception as err:  # tracking must never stop training
            self._fail(err)

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def log(self, row: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        try:
            self.run.log(scalars, step=step)
        except Exception as err:
            self._fail(err)

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as err:
            self._fail(err)

    def _fail(self, err: Exception) -> None:
        warnings.warn(f"wandb failed ({type(err).__name__}: {err}); tracking is off, training continues",
                      stacklevel=3)
        self.run = None
