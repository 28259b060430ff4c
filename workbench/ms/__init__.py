"""The workbench's MoE LM in MindSpore: model, weight conversion, parity with PyTorch, training, benchmarks.

Every submodule imports MindSpore; without it, importing one raises ``ImportError`` with the
install command (``pip install 'moe-workbench[mindspore]'``). ``import workbench`` and
``import workbench.ms`` import nothing of MindSpore.

- ``workbench.ms.model``: ``MoELM`` and its cells, from the same ``ModelConfig``;
- ``workbench.ms.convert``: weights both ways through safetensors (the name table);
- ``workbench.ms.parity``: operator-level and end-to-end checks against PyTorch (``workbench parity``);
- ``workbench.ms.train``: ``MSTrainer``, PyNative or GRAPH, metrics as the PyTorch trainer writes them;
- ``workbench.ms.bench``: ``measure_train_step``, ``measure_layer``, ``workbench bench mindspore``;
- ``workbench.ms.generate``: greedy decode with a KV cache (PyNative or GRAPH) and
  ``generation_parity``, the same greedy tokens as PyTorch's (``workbench parity --generate``).
"""

from workbench.ms._import import INSTALL_HINT, have_mindspore, require_mindspore

__all__ = ["INSTALL_HINT", "have_mindspore", "require_mindspore"]
