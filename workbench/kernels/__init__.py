"""Fast paths beside the readable model: kernels that compute what ``workbench.moe`` computes.

``workbench.moe`` is pure PyTorch and imports nothing from here; the kernels import it and apply
themselves to a built model (``cpu.convert``), as torchtitan's float8 converter does. Each is
tested against the readable code it replaces, forward and backward.
"""
