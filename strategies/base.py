"""What every fedlora strategy shares: Flower's FedAvg node sampling, the plan sent to
clients, per-reply validation (one bad client is dropped, not the round), the tensors a
client keeps for the whole run, and the exactness check.

A method is a subclass that sets what the client attaches and trains and overrides a few
small steps: :meth:`initialize`, :meth:`aggregate_states`, and where needed
:meth:`expected_shapes`, :meth:`complete`, :meth:`client_delta`, :meth:`round_delta`,
:meth:`peft_adapter`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedlora.adapters import check_adapter_state, fresh_lora_state, target_linears
from fedlora.aggregate import State, aggregation_error, delta_weights, example_weights
from fedlora.codec import Codec, decode_payload, encode_payload
from fedlora.errors import FedLoraError

log = logging.getLogger("fedlora")


class LoraStrategy(FedAvg):
    """Base class of fedlora's strategies (Flower ``FedAvg`` underneath).

    Parameters
    ----------
    rank : int (default: 8)
        LoRA rank r.
    alpha : float (default: 16.0)
        LoRA alpha; the adapter's scale is alpha / r.
    target_modules : tuple of str (default: ("q_proj", "v_proj"))
        Names of the linear layers that get an adapter.
    seed : int (default: 0)
        Seed of the adapter's initialisation.
    fraction_train : float (default: 1.0)
        Fraction of the connected clients sampled for training each round.
    min_train_nodes : int (default: 1)
        A round fails unless at least this many clients return a valid reply.
    min_available_nodes : int (default: 1)
        Clients that must be connected before a round starts.
    check_exactness : bool (default: False)
        Compute each round's ``aggregation-error``: the relative distance between the
        aggregated weight change and sum_k p_k DeltaW_k of the clients.
    upload_codec, download_codec : str (default: "fp32")
        How replies and the global tensors travel (fedlora.codec): fp32, fp16, bf16, int8,
        topk:DENSITY[,fp16][,per-tensor]. A lossy download sends the clients an
        approximation; the server keeps the dense global state and adds the clients' updates
        to it.
    weighted_by_key : str (default: "num-examples")
        The reply metric that holds a client's number of training examples.
    """

    name = "base"
    adapter = "lora"  # what the client attaches: "lora" (peft) or "lorasb"
    trainable: tuple[str, ...] = ("lora_A", "lora_B")  # what it trains and uploads
    upload = "delta"  # clients send trained - received ("delta") or what they trained
    heterogeneous_ranks = False  # whether clients may use different ranks

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
        seed: int = 0,
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        min_available_nodes: int = 1,
        check_exactness: bool = False,
        upload_codec: str = "fp32",
        download_codec: str = "fp32",
        weighted_by_key: str = "num-examples",
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=0.0,  # evaluation is central, on the server's held-out split
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=0,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
        )
        self.rank, self.alpha, self.seed = rank, alpha, seed
        self.target_modules = tuple(target_modules)
        self.check_exactness = check_exactness
        self.upload_codec = Codec.parse(upload_codec)
        self.download_codec = Codec.parse(download_codec)
        self.global_state: State = {}  # the dense global tensors of the round being run
        self.sent_shapes: dict[str, tuple[int, ...]] = {}
        self.dropped: list[tuple[int, str]] = []  # (node id, reason) of the last round
        # Tensors every client keeps for the whole run (frozen factors, merged deltas), as
        # an append-only list of batches; each node is sent the batches it lacks.
        self.kept_batches: list[dict[str, torch.Tensor]] = []
        self.node_batches: dict[int, int] = {}  # node id -> batches it holds

    @classmethod
    def from_config(cls, config) -> LoraStrategy:
        """Build the strategy from a RunConfig."""
        if len(set(config.rank_list)) > 1 and not cls.heterogeneous_ranks:
            raise FedLoraError(
                f"--ranks {config.ranks} gives clients different ranks, which "
                f"--strategy {cls.name} cannot aggregate; use --strategy flora or drop --ranks"
            )
        return cls(**cls.config_arguments(config))

    @classmethod
    def config_arguments(cls, config) -> dict:
        """Constructor arguments taken from a RunConfig; subclasses add their own."""
        return dict(
            rank=config.rank_list[0],
            alpha=config.alpha,
            target_modules=tuple(config.target_module_list),
            seed=config.seed,
            fraction_train=config.fraction_train,
            min_train_nodes=config.min_clients,
            min_available_nodes=config.num_clients,
            check_exactness=config.check_exactness,
            upload_codec=config.upload_codec,
            download_codec=config.download_codec,
        )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    # ---- set-up ---------------------------------------------------------------------

    def adapted_shapes(self, model) -> dict[str, tuple[int, int]]:
        """(out, in) of every adapted linear layer of ``model``, by module path."""
        return {
            path: (linear.out_features, linear.in_features)
            for path, linear in target_linears(model, list(self.target_modules)).items()
        }

    def keep_frozen(self, frozen: State) -> None:
        """Make ``frozen`` the first kept batch: each client receives it once."""
        self.frozen = frozen
        self.kept_batches = [{f"frozen/{k}": v for k, v in frozen.items()}]

    def initialize(self, model) -> ArrayRecord:
        """The global state before round 1: by default a fresh LoRA (A seeded, B = 0)."""
        return ArrayRecord(
            fresh_lora_state(model, self.rank, self.alpha, list(self.target_modules), self.seed)
        )

    def configure_init(self, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        """Messages of an initialisation round before round 1; none by default."""
        return []

    def aggregate_init(self, replies: list[Message]) -> ArrayRecord:
        """The global state from the initialisation round's replies."""
        raise NotImplementedError(f"{self.name} has no initialisation round")

    # ---- a training round -----------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients; send each the plan, the global arrays and the kept tensors it lacks."""
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, self.min_train_nodes))
        plan = self.plan(config, server_round, task="train")
        self.global_state = arrays.to_torch_state_dict() if arrays is not None else {}
        sent = self.arrays_to_send(arrays).to_torch_state_dict()
        self.sent_shapes = {k: tuple(v.shape) for k, v in sent.items()}
        payload, header = encode_payload(sent, self.download_codec)
        return [self.message(node, plan, payload, header) for node in node_ids]

    def arrays_to_send(self, arrays: ArrayRecord) -> ArrayRecord:
        """What of the global state goes to the clients each round: by default all of it."""
        return arrays

    def plan(self, config: ConfigRecord, server_round: int, task: str) -> ConfigRecord:
        """The run config plus what the client must do this round (the adapter settings
        are the strategy's own, so a strategy built by hand need not match the config)."""
        return ConfigRecord({
            **config,
            "rank": self.rank,
            "alpha": float(self.alpha),
            "target-modules": ",".join(self.target_modules),
            "seed": self.seed,
            "server-round": server_round,
            "task": task,
            "adapter": self.adapter,
            "trainable": ",".join(self.trainable),
            "upload": self.upload,
            "upload-codec": self.upload_codec.name,
            "kept-batches": len(self.kept_batches),
        })

    def message(self, node_id: int, plan: ConfigRecord, payload: dict, header: dict) -> Message:
        """One node's message: plan, encoded global tensors and the kept batches it lacks."""
        first = self.node_batches.get(node_id, 0)
        keep = {
            f"{i}/{key}": value
            for i, batch in enumerate(self.kept_batches[first:], start=first)
            for key, value in batch.items()
        }
        self.node_batches[node_id] = len(self.kept_batches)
        content = RecordDict({
            "config": plan,
            "arrays": ArrayRecord({k: Array(v) for k, v in payload.items()}),
            "codec": ConfigRecord(header),
            "keep": ArrayRecord(keep),
        })
        return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, drop the bad ones, aggregate the rest.

        Returns ``(None, None)`` when fewer than ``min_train_nodes`` replies are valid;
        else the new global state and the metrics ``train-loss`` (mean weighted by p_k),
        ``train-seconds`` (sum) and, with ``check_exactness``, ``aggregation-error``.
        """
        valid, states = self.valid_replies(server_round, replies)  # as sent: updates
        if not valid or len(valid) < self.min_train_nodes:
            return None, None
        if self.upload == "delta":  # a client's state: the dense global plus its update
            states = [{k: self.global_state[k] + u for k, u in update.items()} for update in states]
        metrics = [r.content["metrics"] for r in valid]
        weights = self.weights(metrics)
        new_state = self.aggregate_states(states, weights, metrics)
        aggregated = MetricRecord({
            "train-loss": sum(w * float(m.get("train-loss", 0.0)) for m, w in zip(metrics, weights)),
            "train-seconds": sum(float(m.get("train-seconds", 0.0)) for m in metrics),
        })
        if self.check_exactness:
            error = aggregation_error(
                self.round_delta(new_state),
                [self.client_delta(s, m) for s, m in zip(states, metrics)],
                weights,
            )
            aggregated["aggregation-error"] = error
        return ArrayRecord(new_state), aggregated

    def valid_replies(self, server_round: int, replies: Iterable[Message], expected_shapes=None):
        """The usable replies and their states; the others are logged and dropped.

        ``expected_shapes(metrics)`` gives the keys and shapes a reply must have
        (default: :meth:`expected_shapes`).
        """
        valid, states, self.dropped = [], [], []
        for reply in replies:
            node = reply.metadata.src_node_id
            try:
                states.append(self.check_reply(reply, expected_shapes or self.expected_shapes))
                valid.append(reply)
            except FedLoraError as err:
                self.dropped.append((node, str(err)))
                self.node_batches.pop(node, None)  # it may have lost its kept tensors: resend
                log.warning("round %d: dropped the reply of node %d: %s", server_round, node, err)
        return valid, states

    def weights(self, metrics: list[MetricRecord]) -> list[float]:
        """p_k: each valid client's share of the examples."""
        return example_weights([int(m[self.weighted_by_key]) for m in metrics])

    def check_reply(self, reply: Message, expected_shapes) -> dict[str, torch.Tensor]:
        """The reply's decoded tensors, or FedLoraError saying why the reply is unusable."""
        if reply.has_error():
            raise FedLoraError(f"the client failed: {reply.error.reason}")
        content = reply.content
        if not isinstance(content.get("arrays"), ArrayRecord):
            raise FedLoraError("the reply has no ArrayRecord 'arrays'")
        metrics = content.get("metrics")
        if not isinstance(metrics, MetricRecord):
            raise FedLoraError("the reply has no MetricRecord 'metrics'")
        num_examples = metrics.get(self.weighted_by_key)
        if not isinstance(num_examples, int) or num_examples <= 0:
            raise FedLoraError(f"'{self.weighted_by_key}' must be a positive int, got {num_examples!r}")
        for key in ("train-loss", "train-seconds"):
            value = metrics.get(key, 0.0)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise FedLoraError(f"'{key}' must be a finite number, got {value!r}")
        if not isinstance(content.get("codec"), ConfigRecord):
            raise FedLoraError("the reply has no ConfigRecord 'codec'")
        try:
            arrays = {k: a.numpy() for k, a in content["arrays"].items()}
        except Exception as err:  # a hostile payload can fail in many ways inside Flower
            raise FedLoraError(f"the arrays do not decode: {err}") from None
        expected = expected_shapes(metrics)
        try:
            state = decode_payload(arrays, dict(content["codec"]), expected)
        except (ValueError, TypeError, IndexError, RuntimeError) as err:  # hostile, not a bug
            raise FedLoraError(f"the payload does not decode: {err}") from None
        check_adapter_state(state, expected)
        return state

    def expected_shapes(self, metrics: MetricRecord) -> dict[str, tuple[int, ...]]:
        """Keys and shapes a client's reply must have: by default, those sent."""
        return self.sent_shapes

    # ---- the method -----------------------------------------------------------------

    def aggregate_states(
        self, states: list[dict], weights: list[float], metrics: list[MetricRecord]
    ) -> State:
        """The method's math: client states and weights p_k in, the new global state out."""
        raise NotImplementedError

    def complete(self, state: State) -> State:
        """A trainable state with the frozen tensors it needs to be a whole adapter."""
        return state

    def client_delta(self, state: State, metrics: MetricRecord) -> State:
        """DeltaW of each module for one client's reply."""
        return delta_weights(self.complete(state), self.scale)

    def round_delta(self, new_state: State) -> State:
        """DeltaW of each module that this round's aggregate stands for."""
        return delta_weights(self.complete(new_state), self.scale)

    def peft_adapter(self, arrays: ArrayRecord) -> tuple[State, int, float]:
        """The global adapter as a PEFT LoRA: (state with peft keys, rank, alpha)."""
        return self.complete(arrays.to_torch_state_dict()), self.rank, self.alpha
