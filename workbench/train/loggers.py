"""Where metrics go: memory (the history a notebook reads), ``metrics.jsonl`` and wandb.

wandb is optional and never fatal: ``WANDB_MODE`` decides (``offline``, ``online``,
``disabled``; unset means disabled for library use; the CLI sets ``offline``), and any error
it raises turns tracking off with one warning while training goes on.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / inf
    return value


class JsonlLogger:
    """Appends one JSON object per line; flushed at once so a killed run keeps its log."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")

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
        """Drop rows logged after ``step`` (a resumed run redoes them); returns the rows kept."""
        rows = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.path)
        return rows


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
