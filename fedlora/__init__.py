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

# Lines that say nothing about the run, silenced: bitsandbytes' CPU backend, imported by
# peft wherever it is installed, tries in every process to fetch a kernel from the Hugging
# Face hub (through the `kernels` package, where installed) and warns when it falls back to
# its own; its LLM.int8 warns at every layer call that fp32 inputs are cast to fp16
# (docs/quantization.md says it once).
for _logger in ("bitsandbytes.backends.cpu.ops", "kernels", "bitsandbytes.autograd._functions"):
    logging.getLogger(_logger).setLevel(logging.ERROR)
