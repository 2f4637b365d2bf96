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

__all__ = ["FedLoraError"]
__version__ = "0.1.0"

# bitsandbytes' CPU backend, imported by peft wherever it is installed, tries in every
# process to fetch a kernel from the Hugging Face hub (through the `kernels` package, where
# installed) and logs warnings when it falls back to its own: lines that say nothing about
# the run.
for _logger in ("bitsandbytes.backends.cpu.ops", "kernels"):
    logging.getLogger(_logger).setLevel(logging.ERROR)
