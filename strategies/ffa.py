"""FFA-LoRA: A frozen at its seeded initialisation, only B trained and averaged."""

from __future__ import annotations

from flwr.app import ArrayRecord

from fedlora.aggregate import State
from strategies.base import LoraStrategy, TrafficShapes


class FFALoRA(LoraStrategy):
    """Freeze A at a shared random initialisation; train and average B only.

    With A shared, sum p_k B_k A = (sum p_k B_k) A: the average is exact, and clients
    upload half of LoRA (Sun et al., "Improving LoRA in privacy-preserving federated
    learning", ICLR 2024). The server sends A to each client once (kept for the run),
    then only B each round. Parameters: see LoraStrategy.
    """

    name = "ffa"
    trainable = ("lora_B",)
    default_lr = 1e-2  # simulations/tune-lr.toml: B alone takes a larger step than A and B

    def initialize(self, model) -> ArrayRecord:
        state = super().initialize(model).to_torch_state_dict()
        self.keep_frozen({k: v for k, v in state.items() if ".lora_A." in k})
        return ArrayRecord({k: v for k, v in state.items() if ".lora_B." in k})

    def initialize_shapes(self, model) -> TrafficShapes:
        lora = super().initialize_shapes(model)
        return TrafficShapes({k: v for k, v in lora.sent.items() if ".lora_B." in k}, lora.zero,
                             frozen={f"frozen/{k}": v for k, v in lora.sent.items() if ".lora_A." in k})

    def aggregate_means(self, means, metrics) -> State:
        return means

    def complete(self, state: State) -> State:
        return {**self.frozen, **state}
