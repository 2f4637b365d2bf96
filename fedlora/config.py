"""The run config: one typed object, loaded from TOML and command-line flags, validated.

Every field has the same name in three places, with dashes: a CLI flag (``--num-clients``),
a key of a ``simulations/*.toml`` file (``num-clients = 4``) and a key of Flower's run
config (``[tool.flwr.app.config]`` in pyproject.toml). Values there are plain bool, int,
float or str, so a config travels unchanged through ``flwr run``.

A field's facts live in its ``metadata``, in one place: ``help``, ``bounds`` (lowest,
highest, whether the lowest is allowed), ``choices``, ``method`` (the built-in strategy
that alone reads it) and ``strategy_default`` (0 or empty means the strategy's own value,
which the strategy registry fills in: ``strategies.resolved``).

The config is plain data: building one checks only the values themselves
(:meth:`RunConfig.validate`). What needs files, models or the strategy registry is
checked once, before a run, by ``server.preflight``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.codec import Codec
from fedlora.codec import choices as codec_choices
from fedlora.errors import FedLoraError
from fedlora.privacy import check_settings
from fedlora.secure_aggregation import MIN_CLIENTS

ALL_LINEAR = "all-linear"  # --target-modules' name for every linear layer but the output head
# --data-format's choices (fedlora.data reads each)
DATA_FORMATS = ("auto", "classification", "prompt-response", "messages", "sharegpt", "alpaca")

_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}

@dataclass
class RunConfig:
    """Everything a federated run needs; see each field's ``help``."""

    strategy: str = field(
        default="fedavg",
        metadata={"help": "fedavg, ffa, flora, fedsb, sparse, hetlora, flexlora, fedex, fedsa, fedsvd, rolora, an entry point of the group "
                          "fedlora.strategies, or module:Class; a,b,c compares them"},
    )
    model: str = field(
        default="smollm2-135m",
        metadata={"help": "smollm2-135m, tiny-llama, a Hugging Face folder or a .gguf file"},
    )
    dataset: str = field(
        default="rotten-tomatoes",
        metadata={"help": "rotten-tomatoes, imdb, or a .jsonl / .csv / .parquet file or a "
                          "datasets.save_to_disk folder, partitioned over the clients"},
    )
    client_data: str = field(
        default="",
        metadata={"help": "simulation: one data file per client (a.jsonl,b.csv,...): client i "
                          "trains on file i instead of a partition of --dataset; sets --num-clients"},
    )
    eval_dataset: str = field(
        default="", metadata={"help": "a data file the server evaluates on (central evaluation)"}
    )
    labels: str = field(
        default="",
        metadata={"help": "the label words, comma-separated (default: those of the server's "
                          "evaluation data)"},
    )
    label_names: str = field(
        default="", metadata={"help": "words for raw labels, e.g. 0=negative,1=positive"}
    )
    text_column: str = field(default="text", metadata={"help": "input text column of a user file"})
    label_column: str = field(default="label", metadata={"help": "label column of a user file"})
    prompt_column: str = field(
        default="", metadata={"help": "prompt column of a user file (instead of text/label; "
                                      "default with --data-format prompt-response: prompt)"}
    )
    response_column: str = field(
        default="", metadata={"help": "response column of a user file (with --prompt-column; "
                                      "default with --data-format prompt-response: response)"}
    )
    data_format: str = field(
        default="auto",
        metadata={"choices": DATA_FORMATS,
                  "help": "the data files' rows: auto (recognised from the columns: messages, "
                          "conversations (ShareGPT), instruction and output (Alpaca), "
                          "--prompt-column, else text and label), classification, "
                          "prompt-response, messages, sharegpt or alpaca"},
    )
    chat_template: bool = field(
        default=False,
        metadata={"help": "classification and prompt/response examples through the model's "
                          "chat template (prompt as the user's turn, label word or response "
                          "as the assistant's); conversations always are"},
    )
    num_clients: int = field(default=4, metadata={"bounds": (1, 10_000, True), "help": "number of clients (data partitions)"})
    rounds: int = field(default=3, metadata={"bounds": (1, 100_000, True), "help": "federated rounds"})
    fraction_train: float = field(
        default=1.0, metadata={"bounds": (0.0, 1.0, False), "help": "fraction of clients that train each round"}
    )
    min_clients: int = field(
        default=1, metadata={"bounds": (1, 10_000, True), "help": "a round fails unless at least this many clients reply"}
    )
    rank: int = field(default=0, metadata={"bounds": (1, 4096, True), "strategy_default": True, "help": "LoRA rank r; 0: the strategy's own"})
    ranks: str = field(
        default="",
        metadata={"help": "per-client ranks for flora, hetlora, flexlora, e.g. 16,8,4 (cycled over clients)"},
    )
    alpha: float = field(default=16.0, metadata={"bounds": (0.0, 1e6, False), "help": "LoRA alpha (scale = alpha / r)"})
    target_modules: str = field(
        default="",
        metadata={"strategy_default": True, "help": f"comma-separated module names to adapt, or {ALL_LINEAR} (every "
                          "linear layer but the output head); empty: the strategy's own"},
    )
    local_steps: int = field(default=10, metadata={"bounds": (1, 1_000_000, True), "help": "optimizer steps per client per round"})
    batch_size: int = field(default=8, metadata={"bounds": (1, 65_536, True), "help": "local batch size"})
    lr: float = field(
        default=0.0,
        metadata={"bounds": (0.0, 1.0, False), "strategy_default": True, "help": "local AdamW learning rate; 0: the strategy's own (docs/strategies.md, "
                          "'Learning rates', says where each comes from)"},
    )
    max_length: int = field(default=96, metadata={"bounds": (8, 32_768, True), "help": "max tokens of a prompt and answer"})
    micro_batch_size: int = field(
        default=0,
        metadata={"bounds": (0, 65_536, True), "help": "split each batch into micro-batches of "
                          "this many examples and accumulate their gradients: the same update "
                          "(up to float rounding) with the activations of a micro-batch only; "
                          "0: the whole batch at once; not with --dp sample"},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute each layer's activations in the backward pass instead of "
                          "keeping them: less memory per training client (0.86 GB less on "
                          "SmolLM2 at the defaults), a third more training time; not with --dp "
                          "sample"},
    )
    partitioning: str = field(default="iid", metadata={"choices": ("iid", "dirichlet"), "help": "iid or dirichlet (label skew)"})
    dirichlet_alpha: float = field(
        default=0.5, metadata={"bounds": (0.0, 1e6, False), "help": "Dirichlet concentration; smaller is more skewed"}
    )
    flora_scale: str = field(
        default="per-rank",
        metadata={"choices": ("per-rank", "uniform"), "method": "flora", "help": "FLoRA's LoRA scale: per-rank (alpha / r_k, each client "
                          "its own) or uniform (alpha / --rank for every client; at alpha 16 and "
                          "rank 8 that is 2, the FLoRA reference's alpha = 2 r_k)"},
    )
    fedsb_init: str = field(
        default="auto",
        metadata={"choices": ("auto", "gradient", "random"), "method": "fedsb", "help": "Fed-SB init: gradient (a federated round), random, or auto "
                          "(gradient; random under --dp)"},
    )
    fedsb_weighting: str = field(
        default="examples", metadata={"choices": ("examples", "uniform"), "method": "fedsb", "help": "Fed-SB R average: examples (weighted) or uniform"}
    )
    fedsb_init_examples: int = field(
        default=64, metadata={"bounds": (1, 1_000_000, True), "method": "fedsb", "help": "examples per client for Fed-SB's gradient estimate"}
    )
    fedsb_init_codec: str = field(
        default="",
        metadata={"method": "fedsb", "help": "how Fed-SB's gradient round uploads each client's gradient: fp32 "
                          "(exact), fp16, bf16, or sign (1 bit per value: the server's rule then "
                          "takes the majority vote of the clients' signs); empty: sign "
                          "(docs/results.md, 'Fed-SB's gradient initialisation by codec')"},
    )
    upload_codec: str = field(
        default="fp32",
        metadata={"help": f"how updates travel: {codec_choices(True)}"},
    )
    download_codec: str = field(
        default="fp32", metadata={"help": "how the global adapter travels (same choices)"}
    )
    upload_density: float = field(
        default=0.1, metadata={"bounds": (0.0, 1.0, False), "method": "sparse", "help": "sparse: fraction of the update each client uploads"}
    )
    download_density: float = field(
        default=1.0, metadata={"bounds": (0.0, 1.0, False), "method": "sparse", "help": "sparse: fraction of the global adapter sent down"}
    )
    density_decay: float = field(
        default=1.0, metadata={"bounds": (0.0, 1.0, False), "method": "sparse", "help": "sparse: densities shrink by this factor every ..."}
    )
    density_decay_every: int = field(
        default=1, metadata={"bounds": (1, 1_000_000, True), "method": "sparse", "help": "sparse: ... this many rounds: d_t = d_0 * decay^((t - 1) // every)"}
    )
    server_optimizer: str = field(
        default="avg", metadata={"choices": ("avg", "adam"), "method": "sparse", "help": "sparse: avg (FedAvg) or adam (FedOpt) on the global adapter"}
    )
    server_lr: float = field(default=1e-3, metadata={"bounds": (0.0, 10.0, False), "method": "sparse", "help": "sparse: the server Adam's learning rate"})
    error_feedback: bool = field(
        default=False,
        metadata={"method": "sparse", "help": "sparse: clients keep what they did not send and add it next round"},
    )
    supernode_auth: bool = field(
        default=False,
        metadata={"help": "the SuperLink authenticates its SuperNodes (python -m fedlora.deploy "
                          "--auth, or your own SuperLink with --enable-supernode-auth): the DP "
                          "accountant keys each client by its node id, which it cannot choose, "
                          "not by the client-id it reports"},
    )
    max_update_norm: float = field(
        default=0.0,
        metadata={"bounds": (0.0, 1e6, True), "help": "bound each client's update to this L2 "
                  "norm before it is aggregated (the robust-aggregation baseline: one client "
                  "cannot move the average further than this); 0: no bound. For the methods "
                  "that average updates; under --dp user, --dp-clip does it"},
    )
    secure_aggregation: bool = field(
        default=False,
        metadata={"help": "Flower's SecAgg+: the server learns only the weighted sum of the "
                          "clients' updates, never one of them (docs/privacy.md); for the "
                          "methods whose aggregate is a weighted mean of updates (fedavg, ffa, "
                          "fedsb, fedsa, fedsvd, rolora, hetlora), fp32 uploads, at least 3 "
                          "clients"},
    )
    dp: str = field(
        default="off",
        metadata={"choices": ("off", "user", "sample"), "help": "differential privacy: off, user (clip and noise client updates at "
                          "the server) or sample (DP-SGD on each client)"},
    )
    dp_clip: float = field(
        default=1.0,
        metadata={"bounds": (0.0, 1e6, False), "help": "DP: L2 bound C of a client's update (user) or of an example's gradient (sample)"},
    )
    dp_noise: float = field(
        default=1.0, metadata={"bounds": (0.0, 1e6, True), "help": "DP: noise multiplier z (noise std = z * C)"}
    )
    dp_delta: float = field(
        default=0.0,
        metadata={"help": "DP: delta; 0 means min(1e-5, 1/(10 n)) (n: clients, or a client's examples)"},
    )
    dp_target_epsilon: float = field(
        default=0.0,
        metadata={"bounds": (0.0, 1e6, True), "help": "DP: choose z so that the whole run ends at this epsilon (0: use --dp-noise)"},
    )
    dp_max_epsilon: float = field(
        default=0.0, metadata={"bounds": (0.0, 1e6, True), "help": "DP: stop before a round that would exceed this epsilon (0: no limit)"}
    )
    dp_noise_seed: int = field(
        default=-1,
        metadata={"bounds": (-1, 2**31 - 1, True), "help": "DP: seed of the noise and of DP-SGD's sampling, for reproducible "
                          "experiments; -1: fresh from the OS, which privacy needs"},
    )
    check_exactness: bool = field(
        default=False,
        metadata={"help": "log each round's aggregation_error against sum_k p_k DeltaW_k"},
    )
    evaluation: str = field(
        default="auto",
        metadata={"choices": ("auto", "central", "federated", "both"), "help": "central (the server's data), federated (each client's held-out "
                          "slice), both, or auto: federated with --client-data and no "
                          "--eval-dataset, else central"},
    )
    central_eval_on: str = field(
        default="auto",
        metadata={"choices": ("auto", "server", "clients"), "help": "where central evaluation runs: server (its own copy of the model) "
                          "or clients (the clients' processes score shares of the server's "
                          "examples, sent to them, on the model they hold: one copy of the "
                          "weights); auto: clients under python -m fedlora.simulate, else server "
                          "(a deployment's examples stay on the server)"},
    )
    client_eval_fraction: float = field(
        default=0.1,
        metadata={"bounds": (0.0, 0.9, False), "help": "federated evaluation: seeded fraction of each client's data held "
                          "out (never trained on)"},
    )
    eval_every: int = field(
        default=1, metadata={"bounds": (1, 100_000, True), "help": "evaluate every K rounds (and always round 0 and the last)"}
    )
    eval_size: int = field(
        default=200, metadata={"bounds": (1, 1_000_000, True), "help": "held-out examples of --dataset for central evaluation"}
    )
    val_size: int = field(
        default=0,
        metadata={"bounds": (0, 1_000_000, True), "help": "validation examples the server holds apart from the evaluation ones "
                          "(from --dataset, else from --eval-dataset) and scores as val_* "
                          "metrics: a grid's values are chosen on them, never on the reported "
                          "evaluation. Taken from the training pool: every client's partition "
                          "is dealt anew, so runs of different --val-size train on different "
                          "examples (docs/results.md)"},
    )
    eval_batch_size: int = field(default=32, metadata={"bounds": (1, 65_536, True), "help": "batch size of evaluation"})
    eval_max_new_tokens: int = field(
        default=64,
        metadata={"bounds": (1, 4096, True), "help": "prompt/response data: tokens greedy decoding may generate for exact match"},
    )
    seed: int = field(default=0, metadata={"bounds": (0, 2**31 - 1, True), "help": "seed of data split, init and training"})
    round_timeout: float = field(
        default=3600.0, metadata={"bounds": (0.0, 1e7, False), "help": "seconds to wait for client replies in a round"}
    )
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda"), "help": "auto (CUDA if present), cpu or cuda"})
    dtype: str = field(
        default="auto",
        metadata={"choices": ("auto", "float32", "bfloat16"), "help": "the base model's weights: auto (bfloat16 on a GPU, float32 on the "
                          "CPU), float32 or bfloat16. Adapters and the label scores stay in "
                          "fp32. On this project's CPU (AVX-512 BF16) bfloat16 trains faster "
                          "but evaluates slower and peaks higher than float32 "
                          "(docs/results.md, 'Simulation layout')"},
    )
    quantize: str = field(
        default="none",
        metadata={"choices": ("none", "nf4", "int8"), "help": "load the frozen base model in 4 bits (nf4: QLoRA's NormalFloat) "
                          "or 8 bits (int8: LLM.int8) through bitsandbytes, on a GPU or the CPU; "
                          "adapters stay in fp32 (docs/quantization.md)"},
    )
    client_cpus: int = field(
        default=1,
        metadata={"bounds": (1, 1024, True), "help": "simulation: CPU cores (and torch threads) of each client actor; "
                          "cores / client-cpus clients train at once"},
    )
    client_gpus: float = field(
        default=0.0,
        metadata={"bounds": (0.0, 64.0, True), "help": "simulation: GPUs of each client actor, "
                          "fractions allowed (0.25: four clients share one GPU; a fraction is "
                          "no memory cap: size it by the planner's client memory); 0: one "
                          "whole GPU per client where the clients use CUDA, none on the CPU"},
    )
    output: str = field(default="runs", metadata={"help": "folder that holds run folders"})
    name: str = field(
        default="", metadata={"help": "run folder name (default: strategy and a timestamp)"}
    )
    resume: str = field(
        default="",
        metadata={"help": "a run folder (runs/<name>) to continue from its last completed round"},
    )

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def keys(cls) -> list[str]:
        """The dashed names of all fields, as flags and TOML keys spell them."""
        return [f.name.replace("_", "-") for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build a validated config from dashed (or underscored) keys; values may be strings."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise FedLoraError(
                    f"unknown config key '{key}'; valid keys: {', '.join(cls.keys())}"
                )
            kwargs[name] = _convert(key, value, type(fields[name].default))
        if kwargs.get("client_data") and "num_clients" not in kwargs:  # one client per file
            kwargs["num_clients"] = len(comma_list(kwargs["client_data"]))
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_toml(cls, path: str | Path) -> dict[str, Any]:
        """Read a config file's values (not yet validated, so flags can override them)."""
        path = Path(path)
        if not path.is_file():
            raise FedLoraError(f"config file not found: {path}")
        try:
            return tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise FedLoraError(f"config file {path} is not valid TOML: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """Dashed keys and plain values: a TOML file, a Flower run config, a plan."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    # ---- validation ---------------------------------------------------------------------

    def validate(self) -> None:
        """Raise FedLoraError naming the first bad value and what would be valid: the values
        themselves and how they combine, nothing that needs a file, a model or a strategy."""
        fields = dataclasses.fields(self)
        for f in fields:
            if "bounds" not in f.metadata:
                continue
            value, (low, high, low_ok) = getattr(self, f.name), f.metadata["bounds"]
            if value == 0 and f.metadata.get("strategy_default"):
                continue  # the strategy's own, filled in by strategies.resolved
            if value < low or (value == low and not low_ok) or value > high:
                lower = "[" if low_ok else "("
                raise FedLoraError(
                    f"--{f.name.replace('_', '-')} must be in {lower}{low:g}, {high:g}], got {value:g}"
                )
        for f in fields:
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value not in choices:
                raise FedLoraError(
                    f"unknown {f.name} '{value}'; valid choices: {', '.join(choices)}"
                )
        if self.client_data and len(self.client_data_list) != self.num_clients:
            raise FedLoraError(
                f"--client-data names {len(self.client_data_list)} files but --num-clients is "
                f"{self.num_clients}: one client per file (drop --num-clients)"
            )
        if self.client_data and self.partitioning != "iid":
            raise FedLoraError(
                f"--partitioning {self.partitioning} splits --dataset over the clients; with "
                "--client-data each client's file is its data: drop --partitioning"
            )
        if self.evaluation_mode in ("central", "both") and self.client_data and not self.eval_dataset:
            raise FedLoraError(
                f"--evaluation {self.evaluation} evaluates at the server, which holds no data "
                "with --client-data: give --eval-dataset FILE or --evaluation federated"
            )
        eval_size_default = next(f.default for f in dataclasses.fields(self) if f.name == "eval_size")
        if self.eval_size != eval_size_default and (self.client_data or self.eval_dataset):
            raise FedLoraError(
                f"--eval-size {self.eval_size} sets how many examples of --dataset the server holds "
                "out; with " + ("--eval-dataset it evaluates that file whole" if self.eval_dataset
                                else "--client-data it holds none") + ": drop --eval-size")
        if self.val_size and self.client_data and not self.eval_dataset:
            raise FedLoraError(f"--val-size {self.val_size}: the server holds no data with "
                               "--client-data to validate on; give --eval-dataset FILE")
        if self.min_clients > self.num_clients:
            raise FedLoraError(
                f"--min-clients {self.min_clients} exceeds --num-clients {self.num_clients}"
            )
        if self.target_modules and not self.target_module_list:
            raise FedLoraError("--target-modules is empty; give e.g. q_proj,v_proj")
        if self.micro_batch_size and self.dp == "sample":
            raise FedLoraError("--micro-batch-size with --dp sample: Opacus clips the per-example "
                               "gradients of a whole Poisson batch in one step; drop it, or use "
                               "--dp user")
        if self.gradient_checkpointing and self.dp == "sample":
            raise FedLoraError("--gradient-checkpointing runs each layer's forward pass twice, "
                               "which Opacus' per-example gradient hooks would record twice: "
                               "drop it, or use --dp user")
        _ = self.rank_list  # raises on a malformed --ranks
        if ALL_LINEAR in self.target_module_list and len(self.target_module_list) > 1:
            raise FedLoraError(f"--target-modules {self.target_modules}: {ALL_LINEAR} already "
                               "names every linear layer; give it alone or list names")
        for flag, value in (("--upload-codec", self.upload_codec),
                            ("--download-codec", self.download_codec)):
            if not Codec.parse(value).keeps_magnitudes:
                raise FedLoraError(f"{flag} {value} keeps no magnitudes; it serves only "
                                   f"--fedsb-init-codec; valid choices: {codec_choices(True)}")
        if self.fedsb_init_codec and Codec.parse(self.fedsb_init_codec).kind not in (
                "fp32", "fp16", "bf16", "sign"):
            raise FedLoraError(f"--fedsb-init-codec {self.fedsb_init_codec}: valid choices: "
                               "fp32, fp16, bf16, sign")
        if self.secure_aggregation:
            self.check_secure_aggregation()
        check_settings(self)
        if bool(self.prompt_column) != bool(self.response_column):
            raise FedLoraError("--prompt-column and --response-column go together; give both")
        if self.prompt_column and self.data_format not in ("auto", "prompt-response"):
            raise FedLoraError(f"--prompt-column names prompt/response data, but --data-format "
                               f"is {self.data_format}")

    def check_secure_aggregation(self) -> None:
        """FedLoraError where SecAgg+ could not hide one client in a round's sum (fewer than
        MIN_CLIENTS, where each would learn the others' update) or has no bound on the
        values (Fed-SB's gradient: only its sign vote is bounded)."""
        drawn = max(int(self.num_clients * self.fraction_train), self.min_clients)
        if self.dp != "user" and drawn < MIN_CLIENTS:
            raise FedLoraError(f"--secure-aggregation needs at least {MIN_CLIENTS} clients a round "
                               f"(with fewer each learns the others' update from the sum); "
                               f"--num-clients {self.num_clients} --fraction-train "
                               f"{self.fraction_train:g} draws {drawn}")
        if self.fedsb_init_codec and Codec.parse(self.fedsb_init_codec).kind != "sign":
            raise FedLoraError(f"--fedsb-init-codec {self.fedsb_init_codec} with "
                               "--secure-aggregation: a gradient's values have no bound for "
                               "SecAgg+'s clipping range, its sign vote has; valid choice: sign")

    @property
    def rank_list(self) -> list[int]:
        """``ranks`` parsed (every client gets ``rank`` when it is empty)."""
        if not self.ranks.strip():
            return [self.rank]
        try:
            ranks = [int(r) for r in self.ranks.split(",")]
        except ValueError:
            raise FedLoraError(f"--ranks must be comma-separated integers, got '{self.ranks}'") from None
        if any(not 1 <= r <= 4096 for r in ranks):
            raise FedLoraError(f"--ranks must all be in [1, 4096], got '{self.ranks}'")
        return ranks

    @property
    def target_module_list(self) -> list[str]:
        """``target_modules`` split at commas."""
        return comma_list(self.target_modules)

    @property
    def client_data_list(self) -> list[str]:
        """``client_data`` split at commas: client i's file is the i-th."""
        return comma_list(self.client_data)

    @property
    def evaluation_mode(self) -> str:
        """``evaluation`` with ``auto`` resolved: federated when the clients bring their
        own data and the server has none, else central."""
        if self.evaluation != "auto":
            return self.evaluation
        return "federated" if self.client_data and not self.eval_dataset else "central"


def comma_list(text: str) -> list[str]:
    """``a, b,,c`` as ["a", "b", "c"]: items stripped, empty ones dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _convert(key: str, value: Any, kind: type) -> Any:
    """Turn a flag string or TOML value into the field's type, or say why it cannot be."""
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is bool and isinstance(value, str) and value.lower() in _BOOLEANS:
        return _BOOLEANS[value.lower()]
    try:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and kind in (int, float):
            return kind(value)
    except ValueError:
        pass
    raise FedLoraError(f"--{key.replace('_', '-')} must be a {kind.__name__}, got {value!r}")
