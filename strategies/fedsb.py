"""Fed-SB: LoRA-SB adapters; only the r x r matrix R is trained and averaged, exactly."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedlora import wire
from fedlora.adapters import lora_sb_to_peft, target_linears
from fedlora.aggregate import State, lora_sb_from_gradient, random_lora_sb
from fedlora.codec import Codec
from fedlora.config import ALL_LINEAR
from fedlora.errors import FedLoraError
from fedlora.models import meta_model
from strategies.base import LoraStrategy, TrafficShapes


def resolved_init(init: str, private: bool) -> str:
    """What ``--fedsb-init auto`` means: random under DP (the gradient round would release
    each client's gradient unaccounted), else LoRA-SB's gradient initialisation."""
    if init != "auto":
        return init
    return "random" if private else "gradient"


@functools.cache
def smallest_adapted_dimension(model: str, target_modules: tuple[str, ...]) -> int:
    """The smallest side of any linear layer of ``model`` that ``target_modules`` adapts,
    read from the model's config alone (no weights are loaded)."""
    linears = target_linears(meta_model(model), list(target_modules))
    return min(min(linear.out_features, linear.in_features) for linear in linears.values())


class FedSB(LoraStrategy):
    """Train and average only R of h = W x + B R A x, with B and A frozen and shared.

    sum_k p_k B R_k A = B (sum_k p_k R_k) A, so averaging R is exact, and each client
    uploads r^2 values per module whatever the number of clients (Singhal et al.,
    Fed-SB, 2025). B and A go to each client once and are kept for the run.

    Initialisation ``gradient`` (LoRA-SB): a first federated round in which each client
    sends the gradient of the loss with respect to every adapted weight W on a few of
    its examples; the server sums them into G and sets B, A, R from the truncated SVD of
    -eta * sign(G). ``random``: B and A random orthonormal, R = 0. ``auto``: gradient,
    except under differential privacy, where it is random: the gradient round would
    release each client's full-weight gradient, and noise calibrated to protect it (z C
    on each of out x in coordinates, against a signal of norm at most C) leaves nothing
    of sign(G) to keep.

    Parameters
    ----------
    init : str (default: "auto")
        "gradient", "random", or "auto" (random under ``privacy``, else gradient).
    weighting : str (default: "examples")
        Average R weighted by examples ("examples") or uniformly ("uniform", the paper's
        choice); both are exact.
    init_examples : int (default: 64)
        Examples per client for the gradient estimate.
    init_codec : str (default: "", which is "sign")
        How clients upload their gradient: fp32 (exact), fp16, bf16, or sign (1 bit per
        value). The rule keeps only sign(G) of the sum, so with ``sign`` the server's sum
        of the clients' +-1 makes sign(G) the clients' majority vote, entry by entry (a
        tie gives 0), at 1/32 of fp32's upload; it cost no accuracy visible in
        docs/results.md ("Fed-SB's gradient initialisation by codec"), so it is the default.
    init_eta : float (default: 1e-3)
        eta of G_hat = -eta * sign(G): the size of Adam's first step (the learning rate).
    **kwargs
        See LoraStrategy; alpha is ignored (LoRA-SB's scale is 1).
    """

    name = "fedsb"
    adapter = "lorasb"
    trainable = ("lora_R",)
    default_lr = 1e-3  # simulations/tune-lr.toml, at r = 32 on q and v, gradient initialisation
    # simulations/tune-lr-fedsb-random.toml: from R = 0 and random B, A, R needs 10x the step
    default_lr_random_init = 1e-2
    # Chosen on the validation split (docs/results.md, "How Fed-SB's defaults are chosen":
    # claims-frontier-iid, every linear layer, 5 seeds): r = 32 was not within 2 points of
    # r = 64. Capped at the model's smallest adapted dimension (resolve).
    default_rank = 64
    default_target_modules = ALL_LINEAR

    def __init__(
        self,
        init: str = "auto",
        weighting: str = "examples",
        init_examples: int = 64,
        init_codec: str = "",
        init_eta: float = 1e-3,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if init not in ("auto", "gradient", "random"):
            raise FedLoraError(f"unknown Fed-SB init '{init}'; valid choices: auto, gradient, random")
        if init == "gradient" and self.privacy:
            raise FedLoraError(
                "--fedsb-init gradient sends each client's full-weight gradient, which --dp "
                "does not protect; use --fedsb-init random (what auto picks under --dp)"
            )
        init = resolved_init(init, private=self.privacy is not None)
        if weighting not in ("examples", "uniform"):
            raise FedLoraError(f"unknown Fed-SB weighting '{weighting}'; valid choices: examples, uniform")
        self.init, self.weighting = init, weighting
        if self.secure_aggregation and weighting == "uniform":
            raise FedLoraError("--secure-aggregation weighs each client inside the masked sum by "
                               "the examples it trained on; --fedsb-weighting uniform cannot "
                               "reweigh it: drop one of them")
        self.init_examples, self.init_eta = init_examples, init_eta
        self.init_codec = Codec.parse(init_codec or "sign")
        if init_codec and self.init_codec.kind != "fp32" and init != "gradient":
            raise FedLoraError(f"--fedsb-init-codec {init_codec} applies to the gradient "
                               f"initialisation, and --fedsb-init is {init}: drop one of them")
        self.module_shapes: dict[str, tuple[int, int]] = {}
        self.frozen: State = {}

    @classmethod
    def resolve(cls, config):
        """As LoraStrategy's, with the default rank capped at the smallest side of any
        adapted layer of ``config.model`` (LoRA-SB's R is r x r inside both B and A: a
        rank above it is refused, and a small model's k and v projections may be narrower
        than 64). A rank that is given is kept; ``adapt`` refuses it if it is too large."""
        filled = super().resolve(config)
        if config.rank:
            return filled
        smallest = smallest_adapted_dimension(filled.model, tuple(filled.target_module_list))
        return dataclasses.replace(filled, rank=min(filled.rank, smallest))

    @classmethod
    def default_lr_for(cls, config) -> float:
        private = config.dp != "off"
        if resolved_init(config.fedsb_init, private) == "random":
            return cls.default_lr_random_init
        return cls.default_lr

    @classmethod
    def config_arguments(cls, config) -> dict:
        return {
            **super().config_arguments(config),
            "init": config.fedsb_init,
            "weighting": config.fedsb_weighting,
            "init_examples": config.fedsb_init_examples,
            "init_codec": config.fedsb_init_codec,
            "init_eta": config.lr,
        }

    @property
    def scale(self) -> float:
        return 1.0

    def adapt(self, model) -> None:
        """Note the adapted modules' shapes; FedLoraError where the rank exceeds one."""
        self.module_shapes = self.adapted_shapes(model)
        smallest = min(min(shape) for shape in self.module_shapes.values())
        if self.rank > smallest:
            raise FedLoraError(
                f"--rank {self.rank} exceeds the smallest adapted dimension ({smallest}); "
                f"LoRA-SB needs rank <= {smallest}"
            )

    def initialize(self, model) -> ArrayRecord:
        self.adapt(model)
        if self.init == "gradient":
            return ArrayRecord()  # set by the initialisation round
        generator = torch.Generator().manual_seed(self.seed)
        factors = {
            path: random_lora_sb(out_features, in_features, self.rank, generator)
            for path, (out_features, in_features) in self.module_shapes.items()
        }
        return self.set_factors(factors)

    def initialize_shapes(self, model) -> TrafficShapes:
        self.adapt(model)
        r = self.rank
        frozen = {}
        for path, (out_features, in_features) in self.module_shapes.items():
            frozen[f"frozen/{path}.lora_A.weight"] = (r, in_features)
            frozen[f"frozen/{path}.lora_B.weight"] = (out_features, r)
        sent = {f"{path}.lora_R.weight": (r, r) for path in self.module_shapes}
        return TrafficShapes(sent, zero=set(sent) if self.init == "random" else set(), frozen=frozen,
                             gradient=self.init_reply_shapes() if self.init == "gradient" else {})

    def configure_init(self, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        """Ask every connected client for its gradient estimate (init "gradient")."""
        if self.init != "gradient":
            return []
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, self.min_available_nodes)
        plan = self.plan(config, 0, task="gradient")
        plan.gradient_examples, plan.gradient_codec = self.init_examples, self.init_codec.name
        if self.secure_aggregation:  # the clients' sign votes, each +-1
            plan.secure_clip = self.secure_clip = 1.0
        return [
            Message(content=RecordDict({wire.CONFIG: plan.to_record()}),
                    message_type=MessageType.TRAIN, dst_node_id=node)
            for node in node_ids
        ]

    def aggregate_init(self, replies: Iterable[Message]) -> ArrayRecord:
        """Sum the clients' gradients as they arrive (none is kept after its fold) and set
        B, A, R by the LoRA-SB rule."""
        shapes = self.init_reply_shapes()
        self.dropped, sums = [], {}
        for reply in replies:
            gradients = self.accept(0, reply, lambda _: shapes, self.init_codec)
            for key, gradient in (gradients or {}).items():
                if key in sums:
                    sums[key].add_(gradient.double())
                else:
                    sums[key] = gradient.double()
            del reply, gradients
        if not sums:
            reasons = "; ".join(reason for _, reason in self.dropped) or "no client replied"
            raise FedLoraError(f"Fed-SB's gradient initialisation got no usable reply: {reasons}")
        return self.factors_from_gradient(sums)

    def aggregate_secure_init(self, mean: list | None) -> ArrayRecord:
        """The initialisation from a secure round (server/secure.py): the mean of the
        clients' sign votes, by sorted key, whose sign is the plain round's (the sum of
        the sign codec's votes); FedLoraError where the protocol stopped."""
        if mean is None:
            raise FedLoraError("Fed-SB's gradient initialisation got no secure sum: too few "
                               "clients took part")
        shapes = self.init_reply_shapes()
        return self.factors_from_gradient({k: torch.from_numpy(a).reshape(shapes[k]).double()
                                           for k, a in zip(sorted(shapes), mean)})

    def factors_from_gradient(self, sums: dict[str, torch.Tensor]) -> ArrayRecord:
        """B, A (kept) and R (returned) by the LoRA-SB rule from the clients' summed
        gradients (only their signs matter)."""
        torch.manual_seed(self.seed)  # svd_lowrank is randomised
        factors = {
            path: lora_sb_from_gradient(sums[f"{path}.weight"], self.rank, self.init_eta)
            for path in self.module_shapes
        }
        return self.set_factors(factors)

    def init_reply_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each client's gradient of every adapted weight, out x in."""
        return {f"{path}.weight": shape for path, shape in self.module_shapes.items()}

    def set_factors(self, factors: dict[str, tuple[torch.Tensor, ...]]) -> ArrayRecord:
        """Keep B and A (sent once to each client); return R as the global state."""
        frozen = {}
        for path, (B, A, _) in factors.items():
            frozen[f"{path}.lora_A.weight"] = A
            frozen[f"{path}.lora_B.weight"] = B
        self.keep_frozen(frozen)
        return ArrayRecord({f"{path}.lora_R.weight": R for path, (_, _, R) in factors.items()})

    def state_dict(self) -> dict:
        return {**super().state_dict(), "frozen": self.frozen}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.frozen = state["frozen"]  # B and A, which a gradient init cannot recompute

    def client_weight(self, metrics: MetricRecord) -> float:
        return 1.0 if self.weighting == "uniform" else super().client_weight(metrics)

    def aggregate_means(self, means, metrics) -> State:
        return means  # R = sum_k p_k R_k: a fresh average each round, no carry-over

    def complete(self, state: State) -> State:
        return {**self.frozen, **state}

    def peft_adapter(self, arrays: ArrayRecord) -> tuple[State, int, float]:
        return lora_sb_to_peft(self.complete(arrays.to_torch_state_dict())), self.rank, float(self.rank)
