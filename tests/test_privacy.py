"""Differential privacy: the Gaussian mechanism, DP-SGD's loss, accounting, and refusals.
(A DP-SGD simulation that learns, and whose clients' epsilon survives a restart: tests/test_study.py.)"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import train_reply
from flwr.app import ConfigRecord
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant
from safetensors.torch import load_file

from fedlora.codec import Codec
from fedlora.config import RunConfig
from fedlora.data import Example
from fedlora.errors import FedLoraError
from fedlora.privacy import DPSGD, Privacy, clip_update, default_delta, noised_mean, update_norm
from fedlora.seeds import stream_seed
from fedlora.train import answer_loss, make_batch, train_local
from server.run import over_budget
from strategies import build_strategy
from server.dry_run import DryRunGrid

ALPHAS = RDPAccountant.DEFAULT_ALPHAS


def independent_epsilon(noise, sample_rate, steps, delta):
    """Opacus' RDP analysis called directly, without fedlora's accountant."""
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise, steps=steps, orders=ALPHAS)
    return get_privacy_spent(orders=ALPHAS, rdp=rdp, delta=delta)[0]


def random_update(seed, scale=1.0, keys=("m.lora_A.weight", "m.lora_B.weight")):
    g = torch.Generator().manual_seed(seed)
    shapes = {"m.lora_A.weight": (4, 30), "m.lora_B.weight": (20, 4), "m.lora_R.weight": (4, 4)}
    return {k: scale * torch.randn(shapes[k], generator=g) for k in keys}


def test_clipped_updates_never_exceed_the_bound_and_small_ones_are_kept():
    for seed, scale in enumerate((0.001, 0.1, 1.0, 10.0, 1000.0)):
        update = random_update(seed, scale)
        clipped = clip_update(update, clip=2.0)
        assert update_norm(clipped) <= 2.0 * (1 + 1e-12)
        if update_norm(update) <= 2.0:
            for key in update:
                assert torch.equal(clipped[key].float(), update[key])
        else:  # scaled, not reshaped
            factor = 2.0 / update_norm(update)
            for key in update:
                torch.testing.assert_close(clipped[key].float(), update[key] * factor)


def test_the_added_noise_has_standard_deviation_z_c_over_n():
    clip, noise, sampled = 0.5, 1.3, 4
    updates = [{"w": torch.randn(1000, 250) * 0.01}, {"w": torch.randn(1000, 250) * 10},
               {"w": torch.zeros(1000, 250)}]
    generator = torch.Generator().manual_seed(0)
    total = {"w": sum(clip_update(u, clip)["w"] for u in updates)}  # what the server sums
    released = noised_mean(total, clip, noise, sampled, generator)["w"].double()
    signal = sum(clip_update(u, clip)["w"] for u in updates) / sampled
    added = released - signal
    expected = noise * clip / sampled
    assert abs(added.std().item() / expected - 1) < 0.03  # 250,000 draws: off by ~0.1%
    assert abs(added.mean().item()) < 0.01 * expected


def config(**values):
    base = {"model": "tiny-llama", "num-clients": 2, "rounds": 3}
    return RunConfig.from_dict({**base, **values})


def server_with_replies(strategy_name, **values):
    strategy = build_strategy(config(strategy=strategy_name, **values))
    # what the strategy sends and trains each round: R (fedsb), B (ffa; A is kept), A and B
    keys = {"fedsb": ["m.lora_R.weight"], "ffa": ["m.lora_B.weight"]}.get(
        strategy_name, ["m.lora_A.weight", "m.lora_B.weight"])
    strategy.global_state = random_update(9, keys=keys)
    strategy.sent_shapes = {k: tuple(v.shape) for k, v in strategy.global_state.items()}
    strategy.sampled = strategy.available = 2
    updates = [random_update(1, 0.01, keys), random_update(2, 5.0, keys)]
    return strategy, updates


@pytest.mark.parametrize("strategy_name", ["fedavg", "ffa", "fedsb", "sparse"])
def test_user_level_dp_releases_the_plain_mean_of_clipped_updates(strategy_name):
    # With z = 0 the release is exactly (clip(u_1) + clip(u_2)) / 2, equal weights
    # whatever the example counts; the sparse strategy clips what was sent (its top-k).
    strategy, updates = server_with_replies(strategy_name, dp="user", **{"dp-noise": 0.0, "dp-clip": 0.3})
    codec = "topk:0.5,fp32" if strategy_name == "sparse" else "fp32"
    strategy.upload_codec = Codec.parse(codec)  # the round's, as configure_train sets it
    replies = [train_reply(1, updates[0], 10, codec=codec), train_reply(2, updates[1], 990, codec=codec)]
    sent = [strategy.accept(1, reply, strategy.expected_shapes) for reply in replies]
    arrays, metrics = strategy.aggregate_train(1, replies)
    new = arrays.to_torch_state_dict()
    for key, value in strategy.global_state.items():
        expected = value + (clip_update(sent[0], 0.3)[key] + clip_update(sent[1], 0.3)[key]) / 2
        torch.testing.assert_close(new[key], expected.float())
    assert metrics["epsilon"] == math.inf  # no noise, no privacy


def test_user_level_dp_draws_each_client_independently_and_divides_by_the_expected_count():
    # Poisson sampling, which the accountant's amplification assumes: each of 40 clients
    # joins with probability q = 0.25 (10 expected, the count varies), independently.
    values = {"num-clients": 40, "fraction-train": 0.25, "dp-noise": 1.0, "dp-noise-seed": 3}
    strategy = build_strategy(config(strategy="fedavg", dp="user", **values))
    grid = DryRunGrid(range(1, 41))
    draws = [strategy.sample_train_nodes(r, grid) for r in range(1, 401)]
    counts = np.array([len(d) for d in draws])
    assert abs(counts.mean() - 10) < 0.5 and 5 < counts.var() < 10  # binomial: 10, 7.5
    frequency = np.array([sum(node in d for d in draws) for node in range(1, 41)]) / 400
    assert np.all(abs(frequency - 0.25) < 0.1)  # 4.6 standard deviations
    again = build_strategy(config(strategy="fedavg", dp="user", **values))
    assert [again.sample_train_nodes(r, grid) for r in range(1, 401)] == draws  # seeded
    plain = build_strategy(config(strategy="fedavg", **{"num-clients": 40, "fraction-train": 0.25}))
    assert {len(plain.sample_train_nodes(r, grid)) for r in range(1, 51)} == {10}  # Flower's

    class Connecting(DryRunGrid):  # 20 of the 40 nodes connected at first, all after a wait
        def get_node_ids(self):
            self.calls = getattr(self, "calls", 0) + 1
            return self.nodes[: 20 if self.calls == 1 else 40]

    # both count the connected nodes once the 40 are there: 10 drawn, not a quarter of 20
    assert len(plain.sample_train_nodes(1, Connecting(range(1, 41)))) == 10
    assert plain.available == 40

    # Three of 4 clients drawn at q = 0.5: the sum of their clipped updates is divided by
    # q x 4 = 2, not by 3; no client drawn releases the noise alone.
    strategy, updates = server_with_replies("fedavg", dp="user", **{
        "num-clients": 4, "fraction-train": 0.5, "dp-noise": 0.0, "dp-clip": 0.3})
    strategy.available, strategy.sampled = 4, 3
    updates.append(random_update(3, 0.02, ["m.lora_A.weight", "m.lora_B.weight"]))
    arrays, metrics = strategy.aggregate_train(1, [train_reply(i + 1, u, 10) for i, u in enumerate(updates)])
    for key, value in strategy.global_state.items():
        expected = value + sum(clip_update(u, 0.3)[key] for u in updates) / 2
        torch.testing.assert_close(arrays.to_torch_state_dict()[key], expected.float())
    strategy, _ = server_with_replies("fedavg", dp="user", **{
        "num-clients": 4, "fraction-train": 0.5, "dp-noise": 1.0, "dp-clip": 0.3})
    strategy.available, strategy.sampled = 4, 0
    arrays, metrics = strategy.aggregate_train(1, [])
    assert "train-loss" not in metrics  # no client trained
    released = arrays.to_torch_state_dict()
    for key, value in strategy.global_state.items():
        noise = (released[key] - value) * 2 / 0.3  # N(0, 1) per coordinate
        assert 0.5 < noise.std().item() < 1.5
    assert metrics["epsilon"] == pytest.approx(independent_epsilon(1.0, 0.5, 1, default_delta(4)), rel=1e-9)


def test_user_level_epsilon_matches_an_independent_computation():
    strategy, updates = server_with_replies("fedavg", dp="user", **{
        "dp-noise": 1.1, "dp-delta": 1e-3, "num-clients": 5, "fraction-train": 0.4})  # q = 0.4
    for server_round in (1, 2, 3):
        replies = [train_reply(1, updates[0], 10), train_reply(2, updates[1], 20)]
        _, metrics = strategy.aggregate_train(server_round, replies)
        expected = independent_epsilon(1.1, 0.4, server_round, 1e-3)
        assert metrics["epsilon"] == pytest.approx(expected, rel=1e-9)
        assert metrics["delta"] == 1e-3


def dpsgd_reply(node, update, num_examples, noise, rate, steps, client_id="auto"):
    reply = train_reply(node, update, num_examples)
    metrics = reply.content["metrics"]
    metrics.update({"dp-noise": noise, "dp-sample-rate": rate, "dp-steps": steps})
    if client_id is not None:  # the client names itself; by default after its node here
        reply.content["client"] = ConfigRecord(
            {"client-id": f"client-{node}" if client_id == "auto" else client_id})
    return reply


def test_sample_level_epsilon_is_the_largest_over_clients_at_the_default_delta():
    # The plan: batch 160 (rates 160 / n_k), 10 steps, noise 0.9; client 2 adds more noise.
    strategy, updates = server_with_replies("fedavg", dp="sample", **{"dp-noise": 0.9, "batch-size": 160})
    for server_round in (1, 2):
        replies = [dpsgd_reply(1, updates[0], 2_000, 0.9, 0.08, 10),
                   dpsgd_reply(2, updates[1], 20_000, 1.2, 0.008, 10)]
        _, metrics = strategy.aggregate_train(server_round, replies)
        assert not strategy.dropped, strategy.dropped
        steps = 10 * server_round
        # delta = min(1e-5, 1 / (10 n_k)): 1e-5 for 2,000 examples, 5e-6 for 20,000
        expected = max(independent_epsilon(0.9, 0.08, steps, 1e-5),
                       independent_epsilon(1.2, 0.008, steps, 5e-6))
        assert metrics["epsilon"] == pytest.approx(expected, rel=1e-9)
        assert metrics["delta"] == 1e-5


def test_sample_level_accounting_follows_the_client_not_its_node_id():
    """A restarted client (new node id, same client-id) composes with its past rounds,
    also across a checkpoint and resume; a new client-id starts its own accountant."""
    strategy, updates = server_with_replies("fedavg", dp="sample", **{"dp-noise": 0.9})
    strategy.aggregate_train(1, [dpsgd_reply(1, updates[0], 100, 0.9, 0.08, 10, "hospital-a")])
    resumed = build_strategy(config(strategy="fedavg", dp="sample", **{"dp-noise": 0.9}))
    resumed.load_state_dict(strategy.state_dict())
    resumed.global_state, resumed.sent_shapes = strategy.global_state, strategy.sent_shapes
    _, metrics = resumed.aggregate_train(2, [dpsgd_reply(77, updates[0], 100, 0.9, 0.08, 10, "hospital-a"),
                                             dpsgd_reply(78, updates[1], 100, 0.9, 0.08, 10, "hospital-b")])
    assert metrics["epsilon"] == pytest.approx(independent_epsilon(0.9, 0.08, 20, 1e-5), rel=1e-9)


def test_a_dpsgd_reply_without_its_settings_or_identity_is_dropped():
    strategy, updates = server_with_replies("fedavg", dp="sample", **{"dp-noise": 0.9})
    replies = [dpsgd_reply(1, updates[0], 100, 0.9, 0.08, 10), train_reply(2, updates[1], 100),
               dpsgd_reply(3, updates[1], 100, 0.9, 1.5, 10),
               dpsgd_reply(4, updates[1], 100, 0.9, 0.08, 10, client_id=None),
               dpsgd_reply(5, updates[1], 100, 0.9, 0.08, 10, client_id=""),
               # held to the plan (batch 8, 10 steps, noise 0.9): what a client claims is checked
               dpsgd_reply(6, updates[1], 100, 0.9, 0.08, 2**62),
               dpsgd_reply(7, updates[1], 100, 0.0, 0.08, 10),
               dpsgd_reply(8, updates[1], 100, 0.9, 0.5, 10),
               dpsgd_reply(9, updates[1], 100, 5.0, 0.08, 10)]  # more noise than planned: fine
    valid = [r for r in replies if strategy.accept(1, r, strategy.expected_shapes) is not None]
    assert [r.metadata.src_node_id for r in valid] == [1, 9]
    reasons = dict(strategy.dropped)
    assert "'dp-noise' must be a finite float" in reasons[2]
    assert "'dp-sample-rate' must be a float in (0, 1]" in reasons[3]
    assert reasons[4] == "the reply names no 'client-id' of 1 to 200 characters (got None)"
    assert reasons[5] == "the reply names no 'client-id' of 1 to 200 characters (got '')"
    assert reasons[6] == f"'dp-steps' {2**62} differs from the plan's 10 (--local-steps)"
    assert reasons[7] == "'dp-noise' 0.0 is below the plan's 0.9"
    assert reasons[8] == ("'dp-sample-rate' 0.5 differs from the plan's 0.08 (--batch-size 8 "
                          "over its 100 examples)")


def test_the_budget_stops_a_run_before_the_round_that_would_exceed_it():
    budget = independent_epsilon(2.0, 1.0, 3, 1e-3) + 1e-6  # room for exactly 3 rounds
    values = {"dp": "user", "dp-noise": 2.0, "dp-delta": 1e-3, "dp-max-epsilon": budget}
    run = config(**values)
    strategy, updates = server_with_replies("fedavg", **values)
    spent = []
    for server_round in range(1, 10):
        if over_budget(strategy, run, server_round):
            break
        _, metrics = strategy.aggregate_train(server_round, [train_reply(1, updates[0], 10)])
        spent.append(metrics["epsilon"])
    assert len(spent) == 3 and spent[-1] <= budget


def test_epsilon_is_never_negative():
    # Opacus' conversion returns a negative epsilon for a large delta (here 1/2).
    assert independent_epsilon(2.0, 1.0, 1, 0.5) < 0
    strategy, updates = server_with_replies("fedavg", dp="user", **{"dp-noise": 2.0, "dp-delta": 0.5})
    _, metrics = strategy.aggregate_train(1, [train_reply(1, updates[0], 10)])
    assert metrics["epsilon"] == 0.0 and metrics["delta"] == 0.5


def test_a_budget_spent_before_any_round_is_a_clear_error():
    run = config(dp="user", **{"dp-noise": 0.5, "dp-max-epsilon": 1.0})
    strategy = build_strategy(run)
    with pytest.raises(FedLoraError, match="round 1 would raise epsilon to .* over --dp-max-epsilon 1"):
        over_budget(strategy, run, 1)


def test_target_epsilon_sets_the_noise_that_ends_the_run_there():
    privacy = Privacy.from_config(config(dp="user", rounds=5, **{"dp-target-epsilon": 3.0}))
    assert independent_epsilon(privacy.noise, 1.0, 5, 1e-5) == pytest.approx(3.0, abs=0.03)
    client = Privacy.from_config(config(dp="sample", **{"dp-target-epsilon": 3.0, "local-steps": 7}))
    dpsgd = client.client_dpsgd(num_examples=500, server_round=1, partition=0)
    assert dpsgd.sample_rate == 8 / 500
    assert independent_epsilon(dpsgd.noise, 8 / 500, 3 * 7, 1e-5) == pytest.approx(3.0, abs=0.03)


def test_the_default_delta_is_well_below_one_over_n():
    assert [default_delta(n) for n in (2, 1000, 10_000, 200_000)] == [1e-5, 1e-5, 1e-5, 5e-7]


@pytest.mark.parametrize("values, message", [
    ({"dp": "user", "dp-clip": 0.0}, r"--dp-clip must be in \(0, 1e\+06\], got 0"),
    ({"dp": "user", "dp-clip": -1.0}, r"--dp-clip must be in \(0"),
    ({"dp": "user", "dp-noise": -0.5}, r"--dp-noise must be in \[0, 1e\+06\], got -0.5"),
    ({"dp": "user", "dp-delta": 1.0}, r"--dp-delta must be in \(0, 1\), or 0 for min\(1e-5, 1/\(10 n\)\); got 1"),
    ({"dp": "user", "dp-delta": -0.1}, r"--dp-delta must be in \(0, 1\)"),
    ({"dp": "user", "dp-target-epsilon": 8.0, "dp-max-epsilon": 3.0},
     "--dp-target-epsilon 8 exceeds the budget --dp-max-epsilon 3"),
    ({"dp": "user", "dp-target-epsilon": 8.0, "dp-noise": 2.0}, "not both"),
    ({"dp": "central"}, "unknown dp 'central'; valid choices: off, user, sample"),
])
def test_bad_dp_settings_are_one_line_errors(values, message):
    with pytest.raises(FedLoraError, match=message) as raised:
        config(**values)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("values, message", [
    ({"strategy": "flora", "dp": "user"}, "--dp user cannot protect --strategy flora: its clients upload"),
    ({"strategy": "fedsb", "dp": "user", "fedsb-init": "gradient"},
     "--fedsb-init gradient sends each client's full-weight gradient"),
    ({"strategy": "fedavg", "dp": "sample", "check-exactness": True}, None),
    ({"strategy": "fedavg", "dp": "user", "check-exactness": True}, "--check-exactness compares"),
])
def test_combinations_dp_cannot_protect_are_refused(values, message):
    if message is None:  # allowed: sample-level DP releases the clients' updates as they are
        build_strategy(config(**values))
        return
    with pytest.raises(FedLoraError, match=message):
        build_strategy(config(**values))


def test_noise_is_fresh_from_the_os_unless_a_noise_seed_is_given():
    # The clients know --seed; a noise they could recompute would protect nothing.
    fresh = Privacy.from_config(config(dp="user"))
    assert fresh.seed() != fresh.seed()
    one, two = (build_strategy(config(dp="user")) for _ in range(2))
    assert not torch.equal(torch.randn(8, generator=one.dp.noise_generator),
                           torch.randn(8, generator=two.dp.noise_generator))
    seeded = Privacy.from_config(config(dp="sample", **{"dp-noise-seed": 3}))
    dpsgd = seeded.client_dpsgd(100, server_round=2, partition=5)
    assert dpsgd.sampling_seed == stream_seed(3, 2, 5, "dp-sgd-sampling") == seeded.seed(2, 5, "dp-sgd-sampling")
    assert dpsgd.noise_seed == stream_seed(3, 2, 5, "dp-sgd-noise") != dpsgd.sampling_seed


def test_a_resumed_run_draws_fresh_noise_unless_a_noise_seed_is_given():
    # The same noise drawn twice cancels in the difference of two releases.
    for seed, same in ((-1, False), (7, True)):
        run = build_strategy(config(dp="user", **{"dp-noise-seed": seed}))
        torch.randn(8, generator=run.dp.noise_generator)  # round 1's noise
        state = run.state_dict()
        resumed = build_strategy(config(dp="user", **{"dp-noise-seed": seed}))
        resumed.load_state_dict(state)
        assert torch.equal(torch.randn(8, generator=run.dp.noise_generator),
                           torch.randn(8, generator=resumed.dp.noise_generator)) == same


def test_a_crash_after_the_noised_aggregate_left_resumes_without_drawing_it_again(tmp_path, monkeypatch):
    """Round 2's aggregate is checkpointed before its evaluation sends it to the clients;
    the server dies during that evaluation. The resumed run does not train round 2 again
    (a second noised release of a fresh client draw, with the first never charged): it
    scores the checkpointed aggregate and writes the row, and epsilon counts 2 rounds."""
    from fedlora.simulate import main
    from server.evaluation import Evaluation

    flags = ["--model", "tiny-llama", "--num-clients", "2", "--rounds", "2", "--local-steps", "2",
             "--max-length", "48", "--eval-size", "16", "--dp", "user", "--dp-noise", "1.5",
             "--central-eval-on", "server", "--output", str(tmp_path), "--name", "crash"]
    score = Evaluation.__call__

    def crash_in_round_2(self, arrays, server_round):
        if server_round == 2:
            raise RuntimeError("the server died while the clients scored round 2")
        return score(self, arrays, server_round)

    monkeypatch.setattr(Evaluation, "__call__", crash_in_round_2)
    with pytest.raises(RuntimeError, match="died while the clients scored round 2"):
        main(flags)
    folder = tmp_path / "crash"
    assert [json.loads(line)["round"] for line in (folder / "metrics.jsonl").open()] == [0, 1]
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert checkpoint["round"] == 2  # written before the release
    monkeypatch.setattr(Evaluation, "__call__", score)
    assert main(["--resume", str(folder)]) == 0
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == [0, 1, 2] and "eval_accuracy" in rows[2]
    # q = 1 (both clients each round), two events, not three
    assert rows[2]["epsilon"] == pytest.approx(independent_epsilon(1.5, 1.0, 2, default_delta(2)), rel=1e-9)
    saved = load_file(folder / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == checkpoint["arrays"].keys()
    for key, value in checkpoint["arrays"].items():  # the checkpointed aggregate, not a new one
        assert torch.equal(saved[key], value), key


def test_per_client_per_round_seeds_never_collide():
    # seed + 1000 * round + partition gave client p + 1000 in round r the seed of client p
    # in round r + 1, and a client's noise seed its neighbour's sampling seed.
    seeds = [stream_seed(0, server_round, partition, purpose)
             for server_round in range(1, 11) for partition in range(2002)
             for purpose in ("batches", "dp-sgd-sampling", "dp-sgd-noise")]
    assert len(set(seeds)) == len(seeds) == 10 * 2002 * 3
    assert all(0 <= s < 2**63 for s in seeds)


def test_fedsb_init_auto_is_random_under_dp_and_gradient_without():
    assert build_strategy(config(strategy="fedsb")).init == "gradient"
    assert build_strategy(config(strategy="fedsb", dp="user")).init == "random"
    assert build_strategy(config(strategy="fedsb", dp="sample")).init == "random"


def test_the_cli_refuses_flora_with_user_dp_in_one_line(tmp_path, capsys):
    from fedlora.simulate import main

    code = main(["--strategy", "flora", "--dp", "user", "--model", "tiny-llama",
                 "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: --dp user cannot protect --strategy flora")


# ---- DP-SGD -----------------------------------------------------------------------------

EXAMPLES = [Example(prompt=f"Question : which label fits this text {t} ? Answer :",
                    answer=" positive ." if label else " negative", label=label)
            for t, label in [("a good movie", 1), ("a very bad film", 0), ("fun", 1), ("boring plot", 0)]]


def test_the_per_example_loss_is_the_mean_of_each_example_alone(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = make_batch(EXAMPLES, tokenizer, 32)  # answers of 2 and 1 tokens
    together = answer_loss(model, batch, per_example=True)
    alone = [answer_loss(model, make_batch([e], tokenizer, 32)) for e in EXAMPLES]
    torch.testing.assert_close(together, torch.stack(alone).mean(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(together, answer_loss(model, batch))  # tokens are not examples


def test_dpsgd_steps_even_on_an_empty_poisson_sample(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.adapters import attach_lora

    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 4, 8.0,
                        ["q_proj", "v_proj"], seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    stats = train_local(model, tokenizer, EXAMPLES, steps=3, batch_size=2, lr=0.01, max_length=32,
                        seed=0, device=torch.device("cpu"),
                        dpsgd=DPSGD(noise=1.0, clip=1.0, sample_rate=1e-9, sampling_seed=0, noise_seed=1))
    assert math.isnan(stats["train_loss"])  # no example was ever sampled...
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed  # ...yet each step moved the adapter by the noise


@pytest.mark.parametrize("adapter", ["lora", "lorasb"])
def test_opacus_per_example_gradients_on_peft_llama_and_lora_sb_are_exact(tiny_model_dir, adapter):
    # What DP-SGD clips is each example's gradient: Opacus' hooks on peft's lora_A / lora_B
    # and on LoRA-SB's R must give the gradient of that example alone.
    from opacus import GradSampleModule
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.adapters import attach_lora, attach_lora_sb, target_linears
    from fedlora.aggregate import random_lora_sb

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(0)
    if adapter == "lora":
        model = attach_lora(base, 4, 8.0, ["q_proj", "v_proj"], seed=0)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # peft starts B at 0, which would hide A's gradient
                parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    else:
        factors = {}
        for path, linear in target_linears(base, ["q_proj", "v_proj"]).items():
            B, A, R = random_lora_sb(linear.out_features, linear.in_features, 4, generator)
            factors.update({f"{path}.lora_A.weight": A, f"{path}.lora_B.weight": B,
                            f"{path}.lora_R.weight": R + 0.1})
        model = attach_lora_sb(base, factors, ["q_proj", "v_proj"])
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_R" in name)
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapped = GradSampleModule(model)
    answer_loss(wrapped, make_batch(EXAMPLES, tokenizer, 32), per_example=True).backward()
    per_example = [p.grad_sample.clone() for p in trainable]
    wrapped.remove_hooks()
    for i, example in enumerate(EXAMPLES):
        model.zero_grad()
        answer_loss(model, make_batch([example], tokenizer, 32), per_example=True).backward()
        for parameter, samples in zip(trainable, per_example):
            torch.testing.assert_close(samples[i], parameter.grad, rtol=1e-4, atol=1e-6)


def test_the_client_and_server_apps_load_opacus_and_matplotlib_only_when_used():
    # A run without --dp never imports Opacus; plotting is imported to write the report.
    code = ("import sys, client.app, server.run; "
            "print(sorted(m for m in ('opacus', 'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
