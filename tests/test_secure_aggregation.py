"""Secure aggregation (Flower's SecAgg+): the ranges and their bound, the client's side,
the refusals, and a real simulation in which one client drops out mid-protocol."""

import json
import math

import pytest
import torch

from client.app import secure_update
from fedlora.config import RunConfig
from fedlora.errors import FedLoraError
from fedlora.privacy import update_norm
from fedlora.secure_aggregation import (MAX_WEIGHT, MODULUS, adam_update_bound, error_bound,
                                        secure_ranges, update_bound)
from strategies import STRATEGIES, resolved


def adam_changes(gradients: torch.Tensor, lr: float) -> torch.Tensor:
    """How far torch's AdamW (no weight decay, fedlora's) moves each value over the rows
    of ``gradients`` (one row a step)."""
    value = torch.nn.Parameter(torch.zeros(gradients.shape[1], dtype=torch.float64))
    optimizer = torch.optim.AdamW([value], lr=lr, weight_decay=0.0)
    for gradient in gradients:
        value.grad = gradient.clone()
        optimizer.step()
    return value.detach()


def test_the_adam_bound_holds_for_any_gradients_and_is_reached_at_step_one():
    generator = torch.Generator().manual_seed(0)
    steps, lr = 10, 3e-3
    bound = adam_update_bound(lr, steps)
    # 4,000 values at once: signs at random, magnitudes over 12 orders; and Cauchy-Schwarz's
    # equality case, a gradient growing by b2 / b1 a step, which reaches the bound.
    signs = torch.randint(0, 2, (steps, 4000), generator=generator, dtype=torch.float64) * 2 - 1
    magnitudes = 10 ** (torch.rand(steps, 4000, generator=generator, dtype=torch.float64) * 12 - 6)
    growing = ((0.999 / 0.9) ** torch.arange(steps, dtype=torch.float64))[:, None]
    changes = adam_changes(torch.cat([signs * magnitudes, growing, -growing], dim=1), lr).abs()
    assert changes.max() <= bound * (1 + 1e-12)
    assert changes[-1] == pytest.approx(bound, rel=1e-6)  # no looser than it must be
    assert adam_update_bound(lr, 1) == pytest.approx(lr, rel=1e-12)
    assert adam_changes(torch.tensor([[5.0]], dtype=torch.float64), lr).abs().item() == pytest.approx(lr, rel=1e-6)


def test_the_ranges_never_wrap_the_modulus_and_weights_travel_exactly():
    for clients in (3, 4, 5, 100, 1000, 2048):
        ranges = secure_ranges(clients, 0.1)
        assert clients * ranges.levels <= MODULUS // 2  # the sum of quantised values fits
        assert ranges.levels >= MAX_WEIGHT and ranges.levels % MAX_WEIGHT == 0  # w L / MAX integral
    assert secure_ranges(4, 0.1).levels == 2**29
    with pytest.raises(ValueError, match="at most 2048"):
        secure_ranges(2049, 0.1)
    # n steps over the weight ratios' sum: 4 clients of 1,024 examples
    ranges = secure_ranges(4, 0.5)
    assert error_bound(ranges, [1024] * 4) == pytest.approx(4 * (1.0 / 2**29) / (4 * 1024 / MAX_WEIGHT))


def test_the_clipping_range_is_the_tightest_bound_the_client_keeps():
    config = RunConfig(lr=3e-3, local_steps=10)
    assert update_bound(config) == adam_update_bound(3e-3, 10)
    assert update_bound(RunConfig(lr=3e-3, local_steps=10, dp="user", dp_clip=0.01)) == 0.01
    assert update_bound(RunConfig(lr=3e-3, local_steps=10, max_update_norm=0.02)) == 0.02
    assert update_bound(RunConfig(lr=3e-3, local_steps=10, max_update_norm=0.05)) == adam_update_bound(3e-3, 10)


def test_a_client_clips_its_own_update_and_weighs_one_under_user_dp():
    update = {"a": torch.full((10,), 1.0), "b": torch.full((5,), -2.0)}
    clipped, weight = secure_update(update, RunConfig(dp="user", dp_clip=0.5), 40, [])
    assert weight == MAX_WEIGHT and update_norm(clipped) == pytest.approx(0.5, rel=1e-6)
    bounded, weight = secure_update(update, RunConfig(max_update_norm=0.25), 40, [])
    assert weight == 40 and update_norm(bounded) == pytest.approx(0.25, rel=1e-6)
    scaled, _ = secure_update(update, RunConfig(), 40, ["scale"])  # the drill: unclipped x 1,000
    assert torch.equal(scaled["a"], update["a"] * 1000)


@pytest.mark.parametrize("flags, message", [
    ({"strategy": "flora"}, "cannot serve --strategy flora: its clients upload their factors"),
    ({"strategy": "flexlora"}, "cannot serve --strategy flexlora"),
    ({"strategy": "fedex"}, "cannot serve --strategy fedex: its server needs each client's own"),
    ({"strategy": "sparse"}, "top-k at entries each client picks"),
    ({"strategy": "fedavg", "upload_codec": "fp16"}, "--upload-codec fp16 is not one; valid choice: fp32"),
    ({"strategy": "fedavg", "check_exactness": True}, "drop one of them"),
    ({"strategy": "fedavg", "num_clients": 2}, "at least 3 clients a round"),
    ({"strategy": "fedavg", "num_clients": 4, "fraction_train": 0.5}, "draws 2"),
    ({"strategy": "fedsb", "fedsb_init_codec": "fp32"}, "its sign vote has; valid choice: sign"),
    ({"strategy": "fedsb", "fedsb_weighting": "uniform"}, "cannot reweigh it: drop one of them"),
])
def test_what_a_sum_cannot_serve_is_refused_in_one_line(flags, message):
    config = RunConfig(**{"num_clients": 4, "secure_aggregation": True, **flags})
    with pytest.raises(FedLoraError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        config.validate()
        STRATEGIES[config.strategy].from_config(resolved(config))
    assert "\n" not in str(err.value)


def aggregate_securely(strategy, sent: list[dict], weights: list[int], examples=None, ranks=None):
    """``strategy.aggregate_secure`` of round 1 as SecAgg+ hands it what the clients
    ``sent`` (values by key) with ``weights`` in the mean: their weighted mean by sorted key,
    and each client's metrics in the clear (``examples`` and ``ranks``: default, its weight
    and rank 8), at the ranges of the strategy's ``secure_clip``."""
    from types import SimpleNamespace

    from server.secure import SecureSum

    examples, ranks = examples or weights, ranks or [8] * len(sent)
    mean = [sum(w * values[k].double() for w, values in zip(weights, sent)).numpy() / sum(weights)
            for k in sorted(sent[0])]
    metrics = [{"num-examples": e, "train-loss": 1.0, "train-seconds": 0.1, "rank": r,
                "client-id": str(i)} for i, (e, r) in enumerate(zip(examples, ranks))]
    nodes = list(range(1, len(sent) + 1))
    messages = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node)) for node in nodes]
    summed = SecureSum(mean, list(weights), metrics, nodes,
                       ranges=secure_ranges(len(sent), strategy.secure_clip))
    return strategy.aggregate_secure(1, messages, summed)


def test_user_dp_noises_the_secure_sum_as_it_noises_the_clipped_replies():
    """The server adds the same noise to the unmasked sum of the clients' own clips as to
    the sum of the clips it makes itself, and the accountant counts the round alike."""
    from conftest import train_reply
    from strategies import build_strategy

    generator = torch.Generator().manual_seed(0)
    shapes = {"m.lora_A.weight": (4, 30), "m.lora_B.weight": (20, 4)}
    updates = [{k: scale * torch.randn(shape, generator=generator) for k, shape in shapes.items()}
               for scale in (0.001, 0.5, 3.0)]
    released, epsilons = [], []
    for secure in (False, True):
        config = RunConfig.from_dict({"model": "tiny-llama", "num-clients": 3, "rounds": 3,
                                      "dp": "user", "dp-clip": 0.3, "dp-noise": 0.8,
                                      "dp-noise-seed": 5, "secure-aggregation": secure})
        strategy = build_strategy(config)
        strategy.global_state = {k: torch.ones(shape) for k, shape in shapes.items()}
        strategy.sent_shapes = shapes
        strategy.sampled = strategy.available = 3
        if secure:  # what SecAgg+ unmasks: the mean of the clients' own clips, equal weights
            clipped = [secure_update(u, config, 10, [])[0] for u in updates]
            strategy.secure_clip = update_bound(strategy.resolve(config))
            arrays, result = aggregate_securely(strategy, clipped, [MAX_WEIGHT] * 3, [10] * 3)
            assert result["secure-clipped"] == 0 and result["secure-error-bound"] < 1e-9
        else:
            arrays, result = strategy.aggregate_train(
                1, [train_reply(i + 1, u, 10 * (i + 1)) for i, u in enumerate(updates)])
        released.append(arrays.to_torch_state_dict())
        epsilons.append(result["epsilon"])
    for key in shapes:
        torch.testing.assert_close(released[1][key], released[0][key], rtol=0, atol=1e-6)
    assert epsilons[0] == epsilons[1] > 0


@pytest.mark.parametrize("name, trained", [
    ("fedavg", ["lora_A", "lora_B"]), ("ffa", ["lora_B"]), ("fedsb", ["lora_R"]),
    ("fedsa", ["lora_A"]), ("fedsvd", ["lora_B"]), ("rolora", ["lora_B"]),
])
def test_every_method_a_sum_serves_aggregates_the_secure_mean_as_its_replies(name, trained):
    """The same updates, as replies and as SecAgg+'s mean of them: the same new global
    state (FedSVD's SVD, RoLoRA's round-1 factor, Fed-SB's R, FedSA's A included)."""
    from conftest import train_reply
    from strategies import build_strategy

    shapes = {"lora_A": (4, 30), "lora_B": (20, 4), "lora_R": (4, 4)}
    keys = {f"base_model.model.m.{t}.weight": shapes[t] for t in trained}
    others = {f"base_model.model.m.{t}.weight": shapes[t] for t in ("lora_A", "lora_B")
              if t not in trained and name in ("ffa", "fedsvd", "rolora")}
    weights = [10, 30, 60]
    results = []
    for secure in (False, True):
        config = RunConfig.from_dict({"model": "tiny-llama", "num-clients": 3, "strategy": name,
                                      "secure-aggregation": secure})
        strategy = build_strategy(config)
        generator = torch.Generator().manual_seed(3)
        strategy.server_round = 1
        strategy.global_state = {k: torch.randn(v, generator=generator) for k, v in {**keys, **others}.items()}
        strategy.sent_shapes = {k: tuple(v.shape) for k, v in strategy.global_state.items()}
        strategy.sampled = strategy.available = 3
        strategy.frozen = {}
        updates = [{k: 0.01 * torch.randn(v, generator=generator) for k, v in keys.items()}
                   for _ in weights]
        if secure:
            strategy.secure_clip = 0.1
            arrays, _ = aggregate_securely(strategy, updates, weights)
        else:
            arrays, _ = strategy.aggregate_train(
                1, [train_reply(i + 1, u, w) for i, (u, w) in enumerate(zip(updates, weights))])
        results.append(arrays.to_torch_state_dict())
    assert results[1].keys() == results[0].keys()
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=0, atol=1e-6)


def test_hetlora_through_a_secure_sum_is_its_zero_padded_mean():
    """Clients of ranks 2, 4 and 4 (of R = 8) send their updates padded to R; with the
    global components each held added back, the server gets HetLoRA's mean of the padded
    factors exactly, and components no client held keep their global value."""
    from conftest import train_reply
    from fedlora.aggregate import pad_lora, truncate_lora
    from strategies.hetlora import HetLoRA
    from strategies.replies import lora_shapes

    generator = torch.Generator().manual_seed(1)
    module_shapes = {"m": (20, 30)}
    ranks, weights = [2, 4, 4], [10, 30, 60]
    results = []
    for secure in (False, True):
        strategy = HetLoRA(ranks=(2, 4, 8), secure_aggregation=secure)
        strategy.module_shapes = module_shapes
        strategy.server_round = 1
        strategy.global_state = {k: torch.randn(shape, generator=torch.Generator().manual_seed(7))
                                 for k, shape in lora_shapes(module_shapes, 8).items()}
        strategy.sent_shapes = {k: tuple(v.shape) for k, v in strategy.global_state.items()}
        strategy.sampled = strategy.available = 3
        generator.manual_seed(1)
        updates = [{k: 0.01 * torch.randn(v.shape, generator=generator)
                    for k, v in truncate_lora(strategy.global_state, r).items()} for r in ranks]
        trained = [{k: truncate_lora(strategy.global_state, r)[k] + u[k] for k in u}
                   for r, u in zip(ranks, updates)]
        if secure:
            strategy.secure_clip = 0.1
            arrays, _ = aggregate_securely(strategy, [pad_lora(u, 8) for u in updates], weights,
                                           ranks=ranks)
        else:
            arrays, _ = strategy.aggregate_train(1, [train_reply(i + 1, t, w, rank=r) for i, (t, w, r)
                                                     in enumerate(zip(trained, weights, ranks))])
        results.append(arrays.to_torch_state_dict())
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=0, atol=1e-6)
    kept = results[1]["base_model.model.m.lora_A.weight"][4:]  # rows 5-8: no client held them
    assert torch.equal(kept, strategy.global_state["base_model.model.m.lora_A.weight"][4:])


def test_a_secure_round_equals_the_plain_mean_with_a_client_dropping_out(tmp_path, monkeypatch):
    """Fed-SB, gradient initialisation by sign vote, 4 clients; in round 1 one of them
    fails after it shared its keys (SecAgg+'s stage 2): its masks are rebuilt from the
    others' shares. The secure run's initialisation equals the plain run's exactly (votes
    of +-1 quantise exactly) and its R is the plain R within the reported bound; the
    strategy's aggregation hook gets that mean and never decodes one client's reply."""
    import dataclasses

    from conftest import parse_configs
    from fedlora.simulate import simulate
    from strategies.base import LoraStrategy
    from strategies.fedsb import FedSB

    monkeypatch.setenv("FEDLORA_INJECT_FAULTS", "raise:2@1")
    [plain] = parse_configs([
        "--model", "tiny-llama", "--strategy", "fedsb", "--fedsb-init", "gradient", "--rank", "4",
        "--num-clients", "4", "--min-clients", "3", "--rounds", "1", "--local-steps", "3",
        "--max-length", "48", "--eval-size", "16", "--output", str(tmp_path), "--name", "plain"])
    secure = dataclasses.replace(plain, name="secure", secure_aggregation=True)
    means, accepted = [], []  # of the secure run
    aggregate_means, accept = FedSB.aggregate_means, LoraStrategy.accept

    def recorded_means(self, m, metrics):
        if self.secure_aggregation:
            means.append(m)
        return aggregate_means(self, m, metrics)

    def recorded_accept(self, *args, **kwargs):
        if self.secure_aggregation:
            accepted.append(args)
        return accept(self, *args, **kwargs)

    monkeypatch.setattr(FedSB, "aggregate_means", recorded_means)
    monkeypatch.setattr(LoraStrategy, "accept", recorded_accept)
    simulate([plain, secure])  # one engine serves both runs

    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
            for name in ("plain", "secure")}
    assert [(r["clients"], r["dropped"]) for r in rows["secure"][1:]] == [(3, 1)]
    assert [(r["clients"], r["dropped"]) for r in rows["plain"][1:]] == [(3, 1)]
    assert rows["secure"][0]["clients"] == 4
    secure_row = rows["secure"][1]
    assert secure_row["secure_clipped"] == 0
    # keys and masked vectors cost more than the plain upload, all counted
    assert secure_row["bytes_up"] > rows["plain"][1]["bytes_up"] > 0
    assert rows["secure"][0]["bytes_up"] > rows["plain"][0]["bytes_up"] > 0

    plain, secure = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
                     for name in ("plain", "secure"))
    for key, value in plain["strategy"]["frozen"].items():  # B and A from the votes
        assert torch.equal(secure["strategy"]["frozen"][key], value), key
    bound = secure_row["secure_error_bound"]
    assert 0 < bound < 1e-6
    for key, value in plain["arrays"].items():  # R
        rounding = 2 * value.abs().max().item() * 2**-24  # both stored in fp32
        assert (secure["arrays"][key] - value).abs().max().item() <= bound + rounding, key
        assert (secure["arrays"][key] - value).abs().max().item() < 1e-2 * value.abs().max().item()
    assert accepted == []  # no client's reply was decoded
    assert len(means) == 1 and means[0].keys() == secure["arrays"].keys()
    for key, value in means[0].items():
        assert torch.equal(value, secure["arrays"][key])
    assert not math.isnan(secure_row["train_loss"])
