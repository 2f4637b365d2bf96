"""fedlora: federated LoRA fine-tuning of language models on Flower.

The package holds two layers (docs/architecture.md). The core: ``errors``, ``seeds``,
``config``, ``codec``, ``aggregate``, ``privacy``, ``data``, ``models``, ``train``,
``evaluate``, ``adapters`` and ``wire``, which import nothing from ``strategies``,
``server``, ``client`` or the commands. The commands, on top of everything: ``simulate``,
``deploy`` and ``plan`` (``python -m fedlora.<command>``), with ``cli``, ``study``,
``comparison`` and ``processes``. tests/test_architecture.py holds the rule.
"""

from fedlora.errors import FedLoraError

__all__ = ["FedLoraError"]
__version__ = "0.1.0"
