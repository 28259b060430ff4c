"""The one place ``workbench.ms`` imports MindSpore, so that a missing install says one clear sentence."""

from __future__ import annotations

INSTALL_HINT = ("workbench.ms needs MindSpore, which is not installed: "
                "pip install 'moe-workbench[mindspore]'")


def require_mindspore():
    """The ``mindspore`` module, or ``ImportError`` with the install command."""
    try:
        import mindspore
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return mindspore


def have_mindspore() -> bool:
    try:
        require_mindspore()
    except ImportError:
        return False
    return True
