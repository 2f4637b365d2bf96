"""What every fedlora strategy shares: Flower's FedAvg node sampling, the plan sent to
clients, the tensors a client keeps for the whole run, the round's replies validated (one
bad client is dropped, not the round) and checkpoints. Its neighbours hold the rest:
strategies/round.py the fold of a round's replies into the new global state,
strategies/replies.py what a usable reply is, strategies/server_privacy.py the server's
side of DP, strategies/evaluation.py federated evaluation, strategies/kept.py what the
clients keep.

A method is a subclass that sets what the client attaches and trains and overrides a few
small steps: :meth:`initialize`, :meth:`aggregate_means` (or :meth:`aggregate_states`),
and where needed :meth:`client_terms`, :meth:`expected_shapes`, :meth:`complete`,
:meth:`client_delta`, :meth:`round_delta`, :meth:`peft_adapter`, and
:meth:`initialize_shapes` (its traffic by shape, for the planner).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedlora import wire
from fedlora.adapters import fresh_lora_state, target_linears
from fedlora.aggregate import RunningMean, State, delta_weights
from fedlora.codec import Codec, Shapes, encode_payload
from fedlora.errors import FedLoraError
from fedlora.evaluate import Scores
from fedlora.privacy import Privacy
from fedlora.secure_aggregation import MIN_CLIENTS, error_bound, update_bound
from fedlora.wire import Plan, run_from_record
from strategies.evaluation import evaluation_messages, pool_evaluations
from strategies.kept import KeptTensors
from strategies.replies import decode_reply, lora_shapes
from strategies.round import Round
from strategies.server_privacy import ServerPrivacy

if TYPE_CHECKING:
    from fedlora.data import Example

log = logging.getLogger("fedlora")

# The built-in methods that --secure-aggregation serves (secure_refusal says why not).
SECURE_METHODS = "fedavg, ffa, fedsb, fedsa, fedsvd, rolora, hetlora"

@dataclass
class TrafficShapes:
    """What a method's messages carry beyond the plan, by shape and under the keys they
    travel with: how the planner (``fedlora.plan.plan_run``) counts a whole run of a
    model too large to run the method's math on, without a tensor. What varies with the
    round or the node (codecs, sampling, the reply's shapes, a node's own rank) comes from
    the strategy's own hooks.

    Attributes
    ----------
    sent : dict
        The global tensors sent each round (``arrays_to_send``, before ``node_arrays``).
    zero : set of str
        Those of ``sent`` that are zero in round 1 (a fresh LoRA's B): Flower sends equal
        arrays once per message.
    frozen : dict
        The kept batch every client receives once before it first trains (keys
        ``frozen/...``); empty: none.
    gradient : dict
        Each client's reply in the initialisation round (``init_reply_shapes``); empty: no
        such round.
    stacked : bool
        Whether each round adds a kept batch: the round's LoRAs stacked, of rank the sum
        of the replies' ranks, keys ``merge/<peft key>`` (FLoRA).
    residual : dict
        The base-delta increment each round adds, by module path; empty: none (FedEx-LoRA
        sends a dense out x in one).
    """

    sent: Shapes
    zero: set[str] = field(default_factory=set)
    frozen: Shapes = field(default_factory=dict)
    gradient: Shapes = field(default_factory=dict)
    stacked: bool = False
    residual: Shapes = field(default_factory=dict)


class LoraStrategy(FedAvg):
    """Base class of fedlora's strategies (Flower ``FedAvg`` underneath).

    Flower's ``configure_train`` and ``aggregate_train`` live here: node sampling, the plan,
    codecs, kept tensors and reply validation. A method is a subclass that sets the class
    attributes ``name`` (what ``--strategy`` and the outputs call it), ``adapter``,
    ``trainable``, ``personal`` (trained tensors each client keeps for itself: the
    adapter is then personalised, evaluated only by the clients), ``upload`` and
    ``heterogeneous_ranks`` where it differs from LoRA's defaults, ``default_lr``,
    ``default_rank`` and ``default_target_modules`` (what ``--lr``, ``--rank`` and
    ``--target-modules`` are when not given), and overrides some of these hooks:

    - The method's math, one of two (required):

      - ``aggregate_means(means, metrics)`` for a method that needs only weighted means:
        in, sum_k p_k ``client_terms(state_k, metrics_k)`` (default terms: the state
        itself, which with ``upload = "delta"`` is the global state plus the client's
        update); out, the new global state. The server folds each reply into running
        sums as it arrives, so it never holds every client's tensors.
      - ``aggregate_states(states, weights, metrics)`` for a method that needs each
        client (FLoRA's stacks, a trimmed mean): in, every valid client's state, its
        weight p_k and its reply metrics; out, the new global state.
    - ``config_arguments(config)``: constructor arguments from a RunConfig; a subclass adds
      its own parameters here.
    - ``initialize(model)``: the global state before round 1 (default: a fresh seeded LoRA).
    - ``initialize_shapes(model)``: what ``initialize`` sets up, by shape, and what the
      method's messages carry (TrafficShapes), for the planner (default: a fresh LoRA, B
      zero). A method whose messages carry more than LoRA's overrides it.
    - ``start_round(server_round)``: what changes with the round before its messages are
      built (default: nothing; the sparse method's densities).
    - ``record_reply(node_id, metrics)``: what the strategy notes of a usable reply
      (default: nothing; HetLoRA's and FlexLoRA's node ranks).
    - ``configure_init`` / ``aggregate_init``: an initialisation round (default: none).
    - ``arrays_to_send(arrays)``: what of the global state is sent each round (default: all).
    - ``trained(server_round)``: what the clients train and upload that round (default:
      ``trainable``; RoLoRA alternates).
    - ``expected_shapes(metrics)``: keys and shapes of a valid reply (default: those sent
      that the round trains).
    - ``client_weight(metrics)``: a client's weight before p_k = w_k / sum w (default:
      its examples).
    - ``complete(state)``: the frozen tensors that make a state a whole adapter (default: none).
    - ``client_delta`` / ``round_delta``: DeltaW for ``check_exactness`` (default: s B A).
    - ``peft_adapter(arrays)``: the global adapter as a PEFT LoRA (default: the completed
      state, r, alpha): what central and federated evaluation score.
    - ``configure_evaluate`` / ``aggregate_evaluate``: federated evaluation (default: every
      client scores the PEFT adapter on its held-out slice; the server pools the counts).

    docs/custom-strategies.md walks through a strategy written outside this package.

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
        Fraction of the connected clients sampled for training each round (Flower's
        FedAvg draws that many; under user-level DP each client joins independently with
        probability q instead: Poisson sampling, what the accountant's bound assumes).
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
    secure_aggregation : bool (default: False)
        Run each training round through Flower's SecAgg+ (server/secure.py): the server
        learns only the weighted mean of the clients' updates, and this strategy's
        ``aggregate_means`` gets that mean, never one client's update. Only for methods
        whose aggregate is a weighted mean of updates (``folds_updates``), with fp32
        uploads and without ``check_exactness``; clients clip their own updates
        (``max_update_norm``, user-level DP's clip).
    max_update_norm : float (default: 0.0)
        Bound each client's update to this L2 norm (all its tensors together) before it
        is aggregated, the robust-aggregation baseline against a scaled update; 0: none.
        Only for methods that upload updates; under user-level DP the clip does it.
    privacy : Privacy or None (default: None)
        Differential privacy (fedlora.privacy). "user": each round the server releases
        only the mean of the clients' updates clipped to C, plus N(0, (zC)^2) noise on their
        sum, with every client weighted equally (example counts would change the
        sensitivity), and divided by the expected number of clients, q x connected.
        "sample": clients train with DP-SGD and report its settings. Either
        way the metrics carry ``epsilon`` and ``delta`` so far.
    """

    name = "base"
    adapter = "lora"  # what the client attaches: "lora" (peft) or "lorasb"
    trainable: tuple[str, ...] = ("lora_A", "lora_B")  # what it trains and uploads
    upload = "delta"  # clients send trained - received ("delta") or what they trained
    heterogeneous_ranks = False  # whether clients may use different ranks
    personal: tuple[str, ...] = ()  # trained tensors each client keeps, never uploaded
    # Whether clients add to the base weights (kept merges, a base delta): on a quantised
    # base that goes into dense fp32 copies of the adapted layers (docs/quantization.md).
    changes_base = False
    # What --lr, --rank and --target-modules are when not given (docs/strategies.md says
    # where each built-in's come from; the learning rates from simulations/tune-lr.toml).
    # 3e-3 is what tune-lr chose for fedavg, flora, sparse, hetlora, flexlora and fedex
    # (1e-3 and 1e-2 validate lower); ffa and fedsb set their own.
    default_lr = 3e-3
    default_rank = 8
    default_target_modules = "q_proj,v_proj"

    def __init_subclass__(cls, **kwargs) -> None:
        """A strategy implements the method's math: ``aggregate_means`` or
        ``aggregate_states`` (its own or inherited), checked when the class is defined. A
        class that only shares steps with its subclasses (strategies/truncated.py) says
        ``abstract = True`` in its body."""
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("abstract", False):
            return
        if (cls.aggregate_states is LoraStrategy.aggregate_states
                and cls.aggregate_means is LoraStrategy.aggregate_means):  # the base only raises
            raise TypeError(f"strategy {cls.__qualname__} implements neither aggregate_states nor "
                            "aggregate_means (or say abstract = True in a class meant to be "
                            "subclassed)")

    @classmethod
    def default_lr_for(cls, config) -> float:
        """What ``--lr`` is when not given, for this run's other settings (Fed-SB's depends on
        its initialisation); ``default_lr`` unless a method overrides it."""
        return cls.default_lr

    @classmethod
    def resolve(cls, config):
        """``config`` with this method's own values where it leaves them to the strategy: a
        learning rate or rank of 0 and empty target modules (``default_lr_for(config)``,
        ``default_rank``, ``default_target_modules``: docs/strategies.md)."""
        if config.lr and config.rank and config.target_modules:
            return config
        return dataclasses.replace(config, lr=config.lr or cls.default_lr_for(config),
                                   rank=config.rank or cls.default_rank,
                                   target_modules=config.target_modules or cls.default_target_modules)

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
        weighted_by_key: str = wire.NUM_EXAMPLES,
        privacy: Privacy | None = None,
        max_update_norm: float = 0.0,
        secure_aggregation: bool = False,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=1.0,  # federated evaluation asks every client
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=1,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
        )
        self.rank, self.alpha, self.seed = rank, alpha, seed
        self.target_modules = tuple(target_modules)
        self.check_exactness = check_exactness
        self.upload_codec = Codec.parse(upload_codec)
        self.download_codec = Codec.parse(download_codec)
        self.server_round = 0  # the round being run
        self.global_state: State = {}  # its dense global tensors
        self.sent_shapes: dict[str, tuple[int, ...]] = {}
        self.dropped: list[tuple[int, str]] = []  # (node id, reason) of the last round
        # Tensors every client keeps for the whole run, and what each node lacks of them.
        self.kept = KeptTensors(self.download_codec)
        self.aggregated_rounds: dict[int, int] = {}  # node id -> last round its reply counted
        self.evaluated_clients: dict[str, Scores] = {}  # client-id -> counts, last evaluation
        self.privacy = privacy
        self.dp = ServerPrivacy(privacy) if privacy else None  # its sampling, noise, accountant
        self.sampled = self.available = 0  # clients sampled and connected, last round
        if privacy and privacy.mode == "user" and self.upload != "delta":
            raise FedLoraError(
                f"--dp user cannot protect --strategy {self.name}: its clients upload their "
                "own adapters, not updates the server can clip, sum and noise; use --dp sample"
            )
        self.secure_clip = 0.0  # secure aggregation: the plan's clipping range
        self.max_update_norm = max_update_norm
        if max_update_norm and self.upload != "delta":
            raise FedLoraError(f"--max-update-norm bounds updates, and --strategy {self.name}'s "
                               "clients upload their factors themselves; drop --max-update-norm")
        if max_update_norm and privacy and privacy.mode == "user":
            raise FedLoraError("--max-update-norm with --dp user: --dp-clip bounds every update "
                               "already; drop --max-update-norm")
        if self.upload == "weights" and self.upload_codec.kind == "topk":
            raise FedLoraError(
                f"--upload-codec {self.upload_codec.name}: --strategy {self.name}'s clients upload "
                "their factors themselves, not an update, and the server would read every entry "
                "a top-k leaves out as zero; valid choices: fp32, fp16, bf16, int8"
            )
        self.secure_aggregation = secure_aggregation
        if secure_aggregation:
            self.check_secure_aggregation()
        if privacy and privacy.mode == "user" and check_exactness:
            raise FedLoraError(
                "--check-exactness compares the aggregate with each client's update, which "
                "--dp user must not release; drop one of them"
            )

    def check_secure_aggregation(self) -> None:
        """FedLoraError unless SecAgg+'s weighted mean is all this method's aggregation
        needs (:meth:`secure_refusal`), of dense fp32 uploads, without
        ``check_exactness``."""
        flag = "--secure-aggregation"
        why = self.secure_refusal()
        if why:
            raise FedLoraError(f"{flag} cannot serve --strategy {self.name}: {why}; valid "
                               f"choices: {SECURE_METHODS}")
        if self.upload_codec.kind != "fp32":
            raise FedLoraError(f"{flag} sums dense fp32 values: --upload-codec "
                               f"{self.upload_codec.name} is not one; valid choice: fp32")
        if self.check_exactness:
            raise FedLoraError(f"{flag} hides each client's update, which --check-exactness "
                               "compares with the aggregate; drop one of them")

    def secure_refusal(self) -> str | None:
        """Why the weighted mean of the clients' updates cannot make this method's
        aggregate (None: it can, the method folds updates)."""
        if self.upload != "delta":
            return "its clients upload their factors themselves, and a mean of factors is not its aggregate"
        if not self.folds_updates:
            return ("its server needs each client's own tensors (stacks, products, a term of "
                    "each update), not their sum")
        return None

    @classmethod
    def from_config(cls, config) -> LoraStrategy:
        """Build the strategy from a RunConfig."""
        if len(set(config.rank_list)) > 1 and not cls.heterogeneous_ranks:
            raise FedLoraError(
                f"--ranks {config.ranks} gives clients different ranks, which "
                f"--strategy {cls.name} cannot aggregate; use --strategy flora, hetlora or flexlora, or drop --ranks"
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
            privacy=Privacy.from_config(config),
            max_update_norm=config.max_update_norm,
            secure_aggregation=config.secure_aggregation,
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
        self.kept.batches = [{f"frozen/{k}": v for k, v in frozen.items()}]

    def initialize(self, model) -> ArrayRecord:
        """The global state before round 1: by default a fresh LoRA (A seeded, B = 0)."""
        return ArrayRecord(
            fresh_lora_state(model, self.rank, self.alpha, list(self.target_modules), self.seed)
        )

    def initialize_shapes(self, model) -> TrafficShapes:
        """What :meth:`initialize` sets up, by shape alone (no tensor is made: ``model`` may
        be on the meta device), and what the method's messages carry: the strategy is then
        ready for :meth:`plan`, :meth:`expected_shapes` and :meth:`node_arrays` on shapes.
        By default a fresh LoRA of rank ``rank``, its B zero."""
        sent = lora_shapes(self.adapted_shapes(model), self.rank)
        return TrafficShapes(sent, zero={k for k in sent if k.endswith("lora_B.weight")})

    def configure_init(self, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        """Messages of an initialisation round before round 1; none by default."""
        return []

    def aggregate_init(self, replies: Iterable[Message]) -> ArrayRecord:
        """The global state from the initialisation round's replies (handed over as they
        arrive, like a training round's)."""
        raise NotImplementedError(f"{self.name} has no initialisation round")

    def aggregate_secure_init(self, mean: list | None) -> ArrayRecord:
        """The global state from a secure initialisation round (server/secure.py): the
        mean of what the clients sent, by sorted key (None: the protocol stopped)."""
        raise NotImplementedError(f"{self.name} has no initialisation round")

    def init_reply_shapes(self) -> dict[str, tuple[int, ...]]:
        """Keys and shapes of a valid reply in the initialisation round."""
        raise NotImplementedError(f"{self.name} has no initialisation round")

    # ---- a training round -----------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients; send each the plan, the global arrays and the kept tensors it lacks."""
        self.start_round(server_round)
        node_ids = self.sample_train_nodes(server_round, grid)
        self.server_round, self.sampled = server_round, len(node_ids)
        plan = self.plan(config, server_round, task="train")
        self.global_state = arrays.to_torch_state_dict() if arrays is not None else {}
        sent = self.arrays_to_send(arrays).to_torch_state_dict()
        self.sent_shapes = {k: tuple(v.shape) for k, v in sent.items()}
        payloads = {}  # one encoding per distinct tensor set
        messages = []
        for node in node_ids:
            state = self.node_arrays(node, sent)
            shapes = tuple((k, tuple(v.shape)) for k, v in state.items())
            if shapes not in payloads:
                payloads[shapes] = encode_payload(state, self.download_codec)
            messages.append(self.message(node, plan, *payloads[shapes]))
        return messages

    def start_round(self, server_round: int) -> None:
        """What changes with the round before its messages are built (default: nothing)."""

    def sample_train_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """The nodes that train this round, once ``min_available_nodes`` are connected.

        Flower's sampling draws a fixed number of them (``fraction_train`` of the
        connected ones, at least ``min_train_nodes``). Under user-level DP each node joins
        independently with probability q (Poisson sampling, ``ServerPrivacy.draw_clients``).
        """
        _, connected = sample_nodes(grid, self.min_available_nodes, 0)  # waits for them
        self.available = len(connected)
        if self.dp and self.dp.user_level:
            return self.dp.draw_clients(server_round, connected)
        num_nodes = max(int(self.available * self.fraction_train), self.min_train_nodes)
        return sample_nodes(grid, self.min_available_nodes, num_nodes)[0]

    def arrays_to_send(self, arrays: ArrayRecord) -> ArrayRecord:
        """What of the global state goes to the clients each round: by default all of it."""
        return arrays

    def node_arrays(self, node_id: int, sent: State) -> State:
        """What of ``sent`` one node gets (default: all of it; a method whose clients hold
        parts of the global state, such as their own rank's, narrows it here)."""
        return sent

    def plan(self, config: ConfigRecord, server_round: int, task: str) -> Plan:
        """What the clients must do this round (fedlora.wire.Plan): the run config of
        ``config`` (fedlora.wire.run_record) with the strategy's own adapter settings (so a
        strategy built by hand need not match the config), and the round's task. A method
        that tells its clients more sets the plan's other fields here."""
        run, label_words = run_from_record(config)
        run = dataclasses.replace(self.resolve(run), rank=self.rank, alpha=float(self.alpha),
                                  target_modules=",".join(self.target_modules), seed=self.seed,
                                  upload_codec=self.upload_codec.name)
        if self.secure_aggregation and task == "train":
            self.secure_clip = update_bound(run)
        return Plan(run, label_words, server_round, task, adapter=self.adapter,
                    trainable=self.trained(server_round), personal=self.personal,
                    upload=self.upload, kept_batches=len(self.kept.batches),
                    base_delta_version=self.kept.base_version,
                    secure_clip=self.secure_clip if self.secure_aggregation else None)

    def trained(self, server_round: int) -> tuple[str, ...]:
        """What the clients train and upload in ``server_round`` (default: ``trainable``;
        a method that alternates factors, RoLoRA, changes it by round)."""
        return self.trainable

    def message(self, node_id: int, plan: Plan, payload: dict, header: dict) -> Message:
        """One node's message: plan, encoded global tensors and the kept tensors it lacks."""
        # The fate of its last reply: error feedback keeps what the server never used.
        plan = dataclasses.replace(plan, aggregated_round=self.aggregated_rounds.get(node_id, 0))
        content = RecordDict({
            wire.CONFIG: plan.to_record(),
            wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in payload.items()}),
            wire.CODEC: ConfigRecord(header),
            **self.kept.batches_for(node_id),
            **self.kept.base_delta_for(node_id),
        })
        return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply as it comes, drop the bad ones, fold the rest in, aggregate.

        ``replies`` may be any iterable, such as replies handed over as they arrive
        (server/run.py): a method that streams (it implements ``aggregate_means``) then
        holds running sums of the round, never every client's tensors.

        Returns ``(None, None)`` when fewer than ``min_train_nodes`` replies are valid;
        else the new global state and the metrics ``train-loss`` (mean weighted by p_k),
        ``train-seconds`` (sum), with ``check_exactness`` ``aggregation-error``, and
        with ``privacy`` ``epsilon`` and ``delta``.
        """
        self.dropped = []
        round_ = Round(self, server_round)
        for reply in replies:
            round_.fold(reply)
            del reply  # let it go before the next one arrives
        return round_.finish()

    def aggregate_secure(self, server_round: int, messages: list[Message], summed) -> tuple[
            ArrayRecord | None, MetricRecord | None]:
        """``aggregate_train`` for a secure round: the new global state from the weighted
        mean of the updates (``summed``: server.secure.SecureSum), never one client's.
        The metrics add ``secure-error-bound`` (the most a value of that mean can differ
        from the exact mean of the same clients: fedlora.secure_aggregation.error_bound)
        and ``secure-clipped`` (values the clients found beyond the clipping range: the
        bound holds when it is 0)."""
        self.dropped = []
        round_ = Round(self, server_round)
        if summed.mean is not None:
            expected = self.secure_shapes()
            state = {k: torch.from_numpy(np.asarray(a, dtype=np.float64)).reshape(expected[k])
                     for k, a in zip(sorted(expected), summed.mean)}
            round_.fold_sum(self.secure_terms(state, summed.weights, summed.metrics),
                            summed.weights, summed.metrics, summed.nodes)
        elif self.dp and self.dp.user_level and len(messages) < MIN_CLIENTS:
            self.sampled = 0  # too few drawn to hide in a sum: released as an empty draw's
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in summed.nodes:
                self.drop(server_round, node, "no part in the secure sum (failed, silent or "
                                              "too few clients)")
        arrays, metrics = round_.finish()
        if metrics is not None and summed.mean is not None:
            metrics["secure-error-bound"] = error_bound(summed.ranges, summed.weights)
            metrics["secure-clipped"] = sum(int(m.get(wire.SECURE_CLIPPED, 0)) for m in summed.metrics)
        return arrays, metrics

    def secure_shapes(self) -> dict[str, tuple[int, ...]]:
        """Keys and shapes of what every client sends in a secure round (all alike: they
        are summed); by default a reply's expected shapes."""
        return self.expected_shapes(MetricRecord())

    def secure_terms(self, mean: State, weights: list[int], metrics: list[dict]) -> State:
        """The p_k-weighted mean of the method's terms, from the secure mean of what the
        clients sent (``weights``: their w_k; ``metrics``: theirs, in the clear); by
        default the mean itself (the clients' updates)."""
        return mean

    @property
    def streams(self) -> bool:
        """Whether the method needs only weighted means of the clients' terms (it
        implements ``aggregate_means``, not ``aggregate_states``)."""
        return type(self).aggregate_states is LoraStrategy.aggregate_states

    @property
    def folds_updates(self) -> bool:
        """Whether the round sums the clients' updates u_k themselves: for a method that
        averages the states (its ``client_terms`` are the states) with ``upload = "delta"``,
        sum_k p_k (g + u_k) = g + sum_k p_k u_k, so the global state g is added once."""
        return (self.streams and self.upload == "delta"
                and type(self).client_terms is LoraStrategy.client_terms)

    def epsilon_after_next_round(self) -> float | None:
        """The epsilon the next round would bring the run to; None without DP or where
        unknown (sample level, before the first round)."""
        return self.dp.epsilon_after_next_round() if self.dp else None

    def accept(self, server_round: int, reply: Message, expected_shapes,
               codec: Codec | None = None) -> State | None:
        """The reply's decoded tensors, or None if it is unusable: then the reason is
        logged and kept in ``dropped``, and the node is sent its kept tensors again (a
        usable reply confirms that the node holds what it was sent). ``codec``: the one the
        plan named for the reply (default: the round's upload codec)."""
        try:
            sample_level = self.privacy if self.privacy and self.privacy.mode == "sample" else None
            state = decode_reply(reply, expected_shapes, codec or self.upload_codec,
                                 self.weighted_by_key, dpsgd=sample_level)
            self.kept.confirm(reply.metadata.src_node_id)  # it holds what it was sent
            self.record_reply(reply.metadata.src_node_id, reply.content[wire.METRICS])
            return state
        except FedLoraError as err:
            self.drop(server_round, reply.metadata.src_node_id, str(err))
            return None

    def record_reply(self, node_id: int, metrics: MetricRecord) -> None:
        """What the strategy notes of a usable reply of ``node_id`` (default: nothing)."""

    def drop(self, server_round: int, node: int, reason: str) -> None:
        """Leave a node's reply out of the round: the reason is logged and kept in
        ``dropped``, and the node is sent its kept tensors again."""
        self.dropped.append((node, reason))
        self.kept.forget(node)  # it may have lost its kept tensors: resend
        log.warning("round %d: dropped the reply of node %d: %s", server_round, node, reason)

    def client_weight(self, metrics: MetricRecord) -> float:
        """A client's weight before normalisation (p_k = w_k / sum w): its examples."""
        return float(metrics[self.weighted_by_key])

    def expected_shapes(self, metrics: MetricRecord) -> dict[str, tuple[int, ...]]:
        """Keys and shapes a client's reply must have: by default, those sent that the
        round trains (all of them, for a method that sends only what it trains)."""
        trained = self.trained(self.server_round)
        return {k: shape for k, shape in self.sent_shapes.items()
                if any(f".{name}." in k for name in trained)}

    # ---- federated evaluation ---------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
        examples: list[Example] | None = None,
    ) -> list[Message]:
        """Send every connected client the global adapter as a PEFT LoRA (the form any
        client can attach), and the base delta where its own is behind, to evaluate on
        its held-out slice.

        With ``examples`` (central evaluation in the clients' processes), the clients
        are sent shares of those instead (plan ``eval-examples``, ``eval-shard``), with
        the whole base delta, which they use for this evaluation only: what they keep is
        left as it is.
        """
        state, rank, alpha = self.peft_adapter(arrays) if arrays else ({}, 0, 0.0)
        plan = self.plan(config, server_round, task="evaluate")
        plan.eval_rank, plan.eval_alpha = int(rank), float(alpha)
        sample_nodes(grid, self.min_available_nodes, 0)  # waits for the federation to connect
        adapter = ArrayRecord({k: Array(v.float().numpy()) for k, v in state.items()})
        return evaluation_messages(plan, adapter, sorted(grid.get_node_ids()), self.kept, examples)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message],
                           num_labels: int = 0) -> MetricRecord | None:
        """Pool the clients' counts (strategies.evaluation.pool_evaluations; bad replies are
        logged and left out); each client's counts stay in ``evaluated_clients``, by
        client-id."""
        metrics, self.evaluated_clients = pool_evaluations(server_round, replies, num_labels, self.kept)
        return metrics

    # ---- checkpoints ----------------------------------------------------------------

    def state_dict(self) -> dict:
        """What the strategy holds beyond the global arrays, as tensors and plain values:
        saved after every round, so that a run can resume. Subclasses add their own."""
        return {"kept": self.kept.state_dict(), "dp": self.dp.state_dict() if self.dp else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (after :meth:`initialize`)."""
        self.kept.load_state_dict(state["kept"])  # the clients of a resumed run hold nothing yet
        self.aggregated_rounds = {}
        if self.dp:
            self.dp.load_state_dict(state["dp"])

    # ---- the method -----------------------------------------------------------------

    def aggregate_states(
        self, states: list[dict], weights: list[float], metrics: list[MetricRecord]
    ) -> State:
        """The method's math on every valid client's state, with weights p_k: the new
        global state. A method that needs each client (FLoRA's stacks, a trimmed mean)
        overrides this; by default it is ``aggregate_means`` of the p_k-weighted mean of
        ``client_terms``, which the server can also fold one reply at a time."""
        mean = RunningMean()
        for state, weight, m in zip(states, weights, metrics):
            mean.add(self.client_terms(state, m), weight)
        return self.aggregate_means(mean.mean(), metrics)

    def client_terms(self, state: State, metrics: MetricRecord) -> State:
        """What of one client's state the method averages (default: the state itself)."""
        return state

    def aggregate_means(self, means: State, metrics: list[MetricRecord]) -> State:
        """The new global state from sum_k p_k client_terms_k (a method that streams)."""
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
