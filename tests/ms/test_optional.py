"""Without MindSpore: ``import workbench`` (and ``workbench.ms``) work, and every MindSpore feature says
in one sentence how to install it. These tests run with or without MindSpore installed."""

from __future__ import annotations

import subprocess
import sys

from workbench.ms import INSTALL_HINT


def test_importing_workbench_does_not_import_mindspore():
    code = "import sys, workbench, workbench.ms, workbench.cli; print('mindspore' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# Runs where "import mindspore" fails as if it were not installed (None in sys.modules): each MindSpore
# module's import, a conversion, and the two commands print what they raise or write.
_WITHOUT = """
import contextlib, io, sys
sys.modules['mindspore'] = None
for module in ('workbench.ms.model', 'workbench.ms.parity', 'workbench.ms.train', 'workbench.ms.bench'):
    try:
        __import__(module)
        print('imported', module)
    except ImportError as e:
        print(e)
from workbench.ms.convert import load_numpy_state
try:
    load_numpy_state(None, {})
except ImportError as e:
    print(e)
from workbench.cli import main
for argv in (['parity', '--curve-steps', '0'], ['bench', 'mindspore']):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    print(rc, err.getvalue().strip())
"""


def test_missing_mindspore_says_how_to_install_it():
    assert "pip install 'moe-workbench[mindspore]'" in INSTALL_HINT
    out = subprocess.run([sys.executable, "-c", _WITHOUT], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    # workbench.ms.bench imports (the throughput lab asks it); its functions need MindSpore
    assert lines[:5] == [INSTALL_HINT] * 3 + ["imported workbench.ms.bench", INSTALL_HINT]
    assert lines[5:] == [f"2 workbench parity: error: {INSTALL_HINT}",
                         f"2 workbench bench mindspore: error: {INSTALL_HINT}"]
