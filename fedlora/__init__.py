"""fedlora: federated LoRA fine-tuning of language models on Flower.

The package holds two layers (docs/architecture.md). The core: ``errors``, ``seeds``,
``config``, ``codec``, ``aggregate``, ``privacy``, ``data``, ``models``, ``train``,
``evaluate``, ``adapters`` and ``wire``, which import nothing from ``strategies``,
``server``, ``client`` or the commands. The commands, on top of everything: ``simulate``,
``deploy`` and ``plan`` (``python -m fedlora.<command>``), with ``cli``, ``study``,
``comparison`` and ``processes``. tests/test_architecture.py holds the rule.
"""

import logging

from fedlora.errors import FedLoraError

# bitsandbytes' CPU backend, imported by peft wherever it is installed, tries to fetch a
# kernel from the Hugging Face hub (offline here) and logs a warning each time it falls
# back to its own, in every process: a line that says nothing about the run.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["FedLoraError"]
__version__ = "0.1.0"
