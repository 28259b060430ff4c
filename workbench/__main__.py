"""``python -m workbench``: the ``workbench`` command, for launchers that start modules (torchrun -m workbench)."""

import sys

from workbench.cli import main

# The guard matters: processes started with the "spawn" method import this module again (as
# __mp_main__), and must not run the command a second time.
if __name__ == "__main__":
    sys.exit(main())
