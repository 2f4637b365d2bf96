"""FedSA-LoRA: A shared and averaged, B kept by each client: a personalised adapter."""

from __future__ import annotations

from flwr.app import ArrayRecord

from fedlora.aggregate import State
from fedlora.errors import FedLoraError
from strategies.base import LoraStrategy, TrafficShapes


class FedSALoRA(LoraStrategy):
    """Share A, keep B (Guo et al., "Selective Aggregation for Low-Rank Adaptation in
    Federated Learning", ICLR 2025).

    Clients train both factors of a LoRA, but upload only A's update; the server averages
    A = sum_k p_k A_k and sends it back. Each client's B stays on the client for the whole
    run (the plan's ``personal``: kept in its node state, starting at zero), so client k's
    model is W + s B_k A: the paper's finding is that A learns what clients share and B
    what is their own. There is no single global model: evaluation is federated (each
    client scores A with its own B on its held-out data), and the run saves the shared A
    with a note. ``--check-exactness`` has no global weight change to check and is refused.

    Parameters: see LoraStrategy.
    """

    name = "fedsa"
    personal = ("lora_B",)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.check_exactness:
            raise FedLoraError("--check-exactness compares the global weight change with the "
                               "clients'; --strategy fedsa has none (each client keeps its own "
                               "B): drop --check-exactness")
        self.module_shapes: dict[str, tuple[int, int]] = {}

    def initialize(self, model) -> ArrayRecord:
        self.module_shapes = self.adapted_shapes(model)
        fresh = super().initialize(model).to_torch_state_dict()
        return ArrayRecord({k: v for k, v in fresh.items() if k.endswith("lora_A.weight")})

    def initialize_shapes(self, model) -> TrafficShapes:
        self.module_shapes = self.adapted_shapes(model)
        lora = super().initialize_shapes(model)
        return TrafficShapes({k: v for k, v in lora.sent.items() if k.endswith("lora_A.weight")})

    def aggregate_means(self, means, metrics) -> State:
        return means

    def complete(self, state: State) -> State:
        """The shared A with B = 0: what a client without a B of its own (or the server)
        holds; each client puts its own B in its place."""
        zeros = {}
        for key, value in state.items():
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            zeros[key.replace("lora_A", "lora_B")] = value.new_zeros(self.module_shapes[path][0],
                                                                     value.shape[0])
        return {**state, **zeros}
