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
    """Appends one JSON object per line; flushed at once so a killed run keeps its log.

    Reading keeps every line that holds a JSON object and skips the others (a line cut short by a
    kill, an edited one). Rewriting (``truncate_after``, on resume) never loses a line silently: the
    lines it cannot read go to ``<name>.unreadable`` first, and each dropped line is warned about.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def unreadable_path(self) -> Path:
        """Where ``truncate_after`` sets aside the lines it cannot read."""
        return self.path.with_name(self.path.name + ".unreadable")

    def log(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")  # JSON has no NaN: null instead

    def _scan(self) -> tuple[list[str], list[tuple[int, str, dict[str, Any] | None]]]:
        """The file's lines (with their line endings) and, for each, (line number, text, row or None)."""
        if not self.path.exists():
            return [], []
        with open(self.path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            lines = f.read().splitlines(keepends=True)
        parsed = []
        for number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            readable = isinstance(row, dict) and type(row.get("step", 0)) is int  # a row's step orders it
            parsed.append((number, line, row if readable else None))
        return lines, parsed

    def read(self) -> list[dict[str, Any]]:
        """Every row the file holds; lines that are not a JSON object (with an integer step) are skipped."""
        return [row for _, _, row in self._scan()[1] if row is not None]

    def truncate_after(self, step: int) -> list[dict[str, Any]]:
        """Keep the rows up to ``step`` (a resumed run redoes the later ones) and return them.

        The file is rewritten (atomically) only when something is dropped, and nothing goes
        without a warning naming it: lines that cannot be read (cut short by a kill, edited) are
        appended to ``unreadable_path`` before the rewrite; rows after ``step`` are named by step.
        """
        lines, parsed = self._scan()
        kept = [(line, row) for _, line, row in parsed if row is not None and row.get("step", 0) <= step]
        bad = [(number, line) for number, line, row in parsed if row is None]
        later = [row.get("step") for _, _, row in parsed if row is not None and row.get("step", 0) > step]
        if len(kept) == len(lines) and all(line.endswith("\n") for line in lines):
            return [row for _, row in kept]
        if bad:
            with open(self.unreadable_path, "a", encoding="utf-8", errors="surrogateescape", newline="") as f:
                f.write("".join(line if line.endswith("\n") else line + "\n" for _, line in bad))
                f.flush()
                os.fsync(f.fileno())
            numbers = ", ".join(str(n) for n, _ in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            warnings.warn(f"{self.path}: line{'s' if len(bad) > 1 else ''} {numbers} cannot be read (not a JSON "
                          f"object: cut short by a kill, or edited); set aside in {self.unreadable_path}, every "
                          "other row is kept", stacklevel=2)
        if later:
            which = f"steps {later[0]} to {later[-1]}" if len(later) > 1 else f"step {later[0]}"
            warnings.warn(f"{self.path}: {len(later)} row{'s' if len(later) > 1 else ''} logged after step {step} "
                          f"({which}) dropped: the run resumes from its checkpoint at step {step} and logs "
                          f"{'those steps' if len(later) > 1 else 'that step'} again", stacklevel=2)
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
                f.write("".join(line if line.endswith("\n") else line + "\n" for line, _ in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        return [row for _, row in kept]


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

    @property
    def folders(self) -> list[Path]:
        """The folder wandb writes this run's files to (``wandb/offline-run-<time>-<id>``), for the
        run's manifest; none when tracking is off."""
        folder = getattr(self.run, "dir", None)  # <folder>/files, relative to the working directory or absolute
        return [Path(os.path.abspath(folder)).parent] if isinstance(folder, str) and folder else []

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
