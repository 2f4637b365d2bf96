"""fedlora: federated LoRA fine-tuning of language models on Flower."""

from fedlora.errors import FedLoraError

__all__ = ["FedLoraError"]
__version__ = "0.1.0"
