"""A strategy of your own: the coordinate-wise trimmed mean of the clients' adapters.

From the repository root (docs/custom-strategies.md)::

    python -m fedlora.simulate --strategy examples.trimmed_mean:TrimmedMean
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from fedlora.aggregate import State
from fedlora.errors import FedLoraError
from strategies.base import LoraStrategy


class TrimmedMean(LoraStrategy):
    """Coordinate-wise trimmed mean of A and B (Yin et al., ICML 2018).

    For every entry of every tensor the server sorts the K clients' values, drops the
    floor(trim * K) smallest and the floor(trim * K) largest and averages the rest. A client
    that sends extreme values (a bug, a diverged run, an attacker) is cut off instead of
    pulling the global adapter. The mean is unweighted, so no client gains weight by
    claiming many examples. Like fedavg it averages A and B separately: not exact.

    Parameters
    ----------
    trim : float (default: 0.25)
        Fraction of the clients cut at each end, in [0, 0.5); Flower's FedTrimmedAvg calls
        it ``beta``. 0 is the plain mean; with the default 4 clients, 0.25 cuts one client
        at each end of every coordinate.
    **kwargs
        See LoraStrategy.
    """

    name = "trimmed-mean"

    def __init__(self, trim: float = 0.25, **kwargs) -> None:
        if not 0.0 <= trim < 0.5:
            raise FedLoraError(f"trim must be in [0, 0.5), got {trim}")
        super().__init__(**kwargs)
        self.trim = trim

    def aggregate_states(self, states, weights, metrics) -> State:
        new_state = {}
        for key in states[0]:
            # Flower's FedTrimmedAvg has the math, along the first axis: the clients.
            stacked = np.stack([state[key].double().numpy() for state in states])
            new_state[key] = torch.from_numpy(trim_mean(stacked, self.trim)).float()
        return new_state
