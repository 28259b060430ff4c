"""How a long notebook runs: on its committed results, as a smoke test, or in full.

The notebooks whose full mode trains for a long time (02 load balancing, 03 expert specialization)
read one parameter, ``MODE``, in their first code cell, from one environment variable:

- ``results`` (the default when nothing is set): read the committed full-mode results in
  ``notebooks/results/<notebook>/`` and draw every figure and claim from them, training nothing;
- ``smoke``: a few steps and fewer seeds, what CI runs (``WORKBENCH_SMOKE=1`` still selects it);
- ``full``: retrain through the run cache under ``runs/``; the committed results are replaced
  only when the notebook's ``SAVE_RESULTS`` is set too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

MODES = ("results", "smoke", "full")
ENV = "WORKBENCH_MODE"  # results | smoke | full
SMOKE_ENV = "WORKBENCH_SMOKE"  # "1" means smoke (what `make test` and CI set)


def notebook_mode(environ: Mapping[str, str] | None = None) -> str:
    """The mode that ``WORKBENCH_MODE`` selects; ``WORKBENCH_SMOKE=1`` means ``smoke``; nothing set
    means ``results``. Conflicting settings, or a value that is not a mode, raise ValueError."""
    env = os.environ if environ is None else environ
    mode = env.get(ENV, "").strip().lower() or None
    smoke = env.get(SMOKE_ENV, "").strip() == "1"
    if mode is not None and mode not in MODES:
        raise ValueError(f"{ENV}={env[ENV]!r} is not a notebook mode: choose one of {', '.join(MODES)}")
    if smoke and mode not in (None, "smoke"):
        raise ValueError(f"{SMOKE_ENV}=1 asks for smoke mode but {ENV}={mode}: unset one of them")
    return "smoke" if smoke else (mode or "results")


def check_mode(mode: str) -> str:
    """``mode`` if it is one of ``MODES`` (the notebook's ``MODE`` parameter may be set by hand)."""
    if mode not in MODES:
        raise ValueError(f"MODE={mode!r} is not a notebook mode: choose one of {', '.join(MODES)}")
    return mode


def require_files(folder: str | Path, names: Iterable[str]) -> Path:
    """``folder`` if it holds every file in ``names``; otherwise FileNotFoundError naming the
    missing ones and how to get them."""
    folder = Path(folder)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks the committed results {', '.join(missing)}: restore them from git "
                                f"(git checkout -- {folder}) or run the notebook with MODE = 'full' and "
                                "SAVE_RESULTS = True")
    return folder
