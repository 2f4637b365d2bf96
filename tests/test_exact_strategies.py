"""FFA-LoRA, FLoRA and Fed-SB: exact aggregation, checked against sum_k p_k DeltaW_k computed
here from the client updates; FedAvg's error measured by the same test."""

import math

import pytest
import torch
from conftest import train_reply
from flwr.app import ArrayRecord

from fedlora.aggregate import delta_weights, lora_sb_from_gradient
from fedlora.config import RunConfig
from fedlora.errors import FedLoraError
from fedlora.models import load_model
from server.transport import payload_bytes
from strategies import build_strategy
from strategies.fedavg import FedAvgLoRA
from strategies.fedsb import FedSB
from strategies.ffa import FFALoRA
from strategies.flora import FLoRA
from server.dry_run import DryRunGrid

EXAMPLES = [120, 300, 580]  # three clients with different amounts of data
TARGETS = ("q_proj", "v_proj")


pytestmark = pytest.mark.usefixtures("task_identity")  # conftest: messages need a run


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    return load_model(str(tiny_model_dir), torch.device("cpu"))[0]


def perturbed(state, seed):
    """A client's trained version of ``state`` (random, different per client)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def p(examples):
    return [n / sum(examples) for n in examples]


def global_delta(strategy, arrays):
    state, rank, alpha = strategy.peft_adapter(arrays)
    return delta_weights(state, alpha / rank)


def relative_error(got, expected):
    num = sum(float((got[m] - expected[m].double()).pow(2).sum()) for m in expected)
    den = sum(float(expected[m].double().pow(2).sum()) for m in expected)
    return (num / den) ** 0.5


def one_round(strategy, base_model, client_states, ranks=None):
    """Initialise, send round 1 to nodes 1-3, and aggregate their replies, which carry what
    a client sends for ``client_states(arrays)``: the update (trained - received) or, for
    FLoRA, the trained tensors. Returns (messages, trained states, new arrays, metrics)."""
    arrays = strategy.initialize(base_model)
    messages = list(strategy.configure_train(1, arrays, RunConfig().to_dict(), DryRunGrid([1, 2, 3])))
    trained = client_states(arrays)
    received = arrays.to_torch_state_dict()
    replies = []
    for i, (state, n) in enumerate(zip(trained, EXAMPLES)):
        sent = {k: v - received[k] for k, v in state.items()} if strategy.upload == "delta" else state
        replies.append(train_reply(i + 1, sent, n, rank=(ranks[i] if ranks else strategy.rank)))
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    return messages, trained, new_arrays, metrics


def test_ffa_average_of_b_is_exact(base_model):
    strategy = FFALoRA(rank=4, alpha=8, target_modules=TARGETS, check_exactness=True)
    states = lambda arrays: [perturbed(arrays.to_torch_state_dict(), s) for s in range(3)]  # noqa: E731
    _, trained, arrays, metrics = one_round(strategy, base_model, states)
    A = strategy.frozen
    expected = {}
    for B, w in zip(trained, p(EXAMPLES)):
        for key, value in B.items():
            a = A[key.replace("lora_B", "lora_A")]
            module = key.removeprefix("base_model.model.").rsplit(".lora_B", 1)[0]
            expected[module] = expected.get(module, 0) + w * 2.0 * value.double() @ a.double()
    assert relative_error(global_delta(strategy, arrays), expected) < 1e-5
    assert metrics["aggregation-error"] < 1e-5
    assert all(".lora_B." in k for k in trained[0])  # half the upload


@pytest.mark.parametrize("scale", ["per-rank", "uniform"])
def test_flora_stacking_is_exact_with_three_different_ranks(base_model, scale):
    ranks = [8, 4, 2]
    strategy = FLoRA(ranks=tuple(ranks), scale=scale, rank=8, alpha=16, target_modules=TARGETS,
                     check_exactness=True)

    def states(_):
        out = []
        for i, r in enumerate(ranks):
            g = torch.Generator().manual_seed(i)
            out.append({
                f"base_model.model.{path}.lora_{x}.weight": torch.randn(shape, generator=g)
                for path, (m, n) in strategy.module_shapes.items()
                for x, shape in (("A", (r, n)), ("B", (m, r)))
            })
        return out

    messages, trained, arrays, metrics = one_round(strategy, base_model, states, ranks)
    # per-rank: s_k = alpha / r_k; uniform: alpha / rank = 2 for all, and the plan tells
    # the clients so (their peft alpha is then 2 r_k)
    scales = [16 / r for r in ranks] if scale == "per-rank" else [2.0] * 3
    assert {m.content["config"].get("lora-scale") for m in messages} == (
        {None} if scale == "per-rank" else {2.0})
    expected = {}
    for state, w, s_k in zip(trained, p(EXAMPLES), scales):
        for module, delta in delta_weights(state, s_k).items():
            expected[module] = expected.get(module, 0) + w * delta
    assert relative_error(global_delta(strategy, arrays), expected) < 1e-5
    assert metrics["aggregation-error"] < 1e-5
    state, rank, alpha = strategy.peft_adapter(arrays)
    assert rank == alpha == sum(ranks)


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_fedsb_average_of_r_is_exact(base_model, weighting):
    strategy = FedSB(init="random", weighting=weighting, rank=4, target_modules=TARGETS,
                     check_exactness=True)
    states = lambda arrays: [perturbed(arrays.to_torch_state_dict(), s) for s in range(3)]  # noqa: E731
    _, trained, arrays, metrics = one_round(strategy, base_model, states)
    weights = p(EXAMPLES) if weighting == "examples" else [1 / 3] * 3
    expected = {}
    for state, w in zip(trained, weights):
        for key, R in state.items():
            path = key.rsplit(".lora_R", 1)[0]
            B, A = strategy.frozen[f"{path}.lora_B.weight"], strategy.frozen[f"{path}.lora_A.weight"]
            expected[path] = expected.get(path, 0) + w * (B.double() @ R.double() @ A.double())
    assert relative_error(global_delta(strategy, arrays), expected) < 1e-5
    assert metrics["aggregation-error"] < 1e-5


def test_fedavg_is_not_exact_and_its_error_is_reported(base_model, capsys):
    strategy = FedAvgLoRA(rank=4, alpha=8, target_modules=TARGETS, check_exactness=True)

    def states(arrays):  # trained clients: B moved away from zero, A moved too
        return [{k: v + torch.randn(v.shape, generator=torch.Generator().manual_seed(s))
                 for k, v in arrays.to_torch_state_dict().items()} for s in range(3)]

    _, trained, arrays, metrics = one_round(strategy, base_model, states)
    expected = {}
    for state, w in zip(trained, p(EXAMPLES)):
        for module, delta in delta_weights(state, 2.0).items():
            expected[module] = expected.get(module, 0) + w * delta
    error = relative_error(global_delta(strategy, arrays), expected)
    assert error > 0.05
    assert abs(metrics["aggregation-error"] - error) < 1e-6
    with capsys.disabled():
        print(f"\n[fedavg] relative aggregation error of FedAvg-LoRA, one round, 3 clients: {error:.3f}")


def test_fedsb_upload_is_r_squared_per_module_and_independent_of_clients(base_model):
    modules = 2 * 2  # 2 layers x (q_proj, v_proj)
    sizes = {}
    for rank in (2, 4, 8):
        for clients in (2, 3):
            strategy = FedSB(init="random", rank=rank, target_modules=TARGETS)
            arrays = strategy.initialize(base_model)
            replies = [train_reply(i, perturbed(arrays.to_torch_state_dict(), i), 10)
                       for i in range(clients)]
            per_client = {payload_bytes(r) for r in replies}
            assert len(per_client) == 1  # every client uploads the same number of bytes
            sizes[rank, clients] = per_client.pop()
    for rank in (2, 4, 8):
        assert sizes[rank, 2] == sizes[rank, 3]
    # bytes = r^2 x modules x 4 bytes + an overhead that does not depend on r
    overheads = {sizes[rank, 2] - rank**2 * modules * 4 for rank in (2, 4, 8)}
    assert len(overheads) == 1


def test_flora_download_grows_with_the_sum_of_the_clients_ranks(base_model):
    downloads = {}
    for ranks in ((2, 2, 2), (8, 4, 2), (16, 16, 16)):
        strategy = FLoRA(ranks=ranks, rank=8, alpha=16, target_modules=TARGETS)

        def states(_, strategy=strategy, ranks=ranks):
            return [{f"base_model.model.{path}.lora_{x}.weight": torch.randn(shape)
                     for path, (m, n) in strategy.module_shapes.items()
                     for x, shape in (("A", (r, n)), ("B", (m, r)))} for r in ranks]

        one_round(strategy, base_model, states, list(ranks))
        messages = list(strategy.configure_train(2, None, RunConfig().to_dict(), DryRunGrid([1, 2, 3])))
        downloads[sum(ranks)] = payload_bytes(messages[0])
    (r1, b1), (r2, b2), (r3, b3) = sorted(downloads.items())
    assert b1 < b2 < b3
    # linear in the sum of ranks: (m + n) values of 4 bytes per rank and module
    assert (b3 - b2) / (r3 - r2) == pytest.approx((b2 - b1) / (r2 - r1), rel=0.01)


def test_flora_drops_a_reply_whose_rank_differs_from_the_announced_one(base_model):
    strategy = FLoRA(ranks=(4,), rank=4, target_modules=TARGETS)
    strategy.initialize(base_model)

    def lora(r):
        return {f"base_model.model.{path}.lora_{x}.weight": torch.randn(shape)
                for path, (m, n) in strategy.module_shapes.items()
                for x, shape in (("A", (r, n)), ("B", (m, r)))}

    replies = [train_reply(1, lora(4), 10, rank=4), train_reply(2, lora(8), 10, rank=4),
               train_reply(3, lora(4), 10, rank=4)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and [node for node, _ in strategy.dropped] == [2]
    assert "expected (4," in strategy.dropped[0][1]


@pytest.mark.parametrize("name", ["fedavg", "ffa", "fedsb"])
def test_heterogeneous_ranks_are_refused_except_by_flora(name):
    config = RunConfig.from_dict({"strategy": name, "ranks": "16,8,4"})
    with pytest.raises(FedLoraError, match=f"--strategy {name} cannot aggregate; use --strategy flora"):
        build_strategy(config)
    assert isinstance(build_strategy(RunConfig.from_dict({"strategy": "flora", "ranks": "16,8,4"})), FLoRA)


def test_fedsb_initialises_with_the_runs_learning_rate():
    assert build_strategy(RunConfig.from_dict({"strategy": "fedsb", "lr": 0.02})).init_eta == 0.02


def test_flora_refuses_a_download_codec_it_would_not_use():
    with pytest.raises(FedLoraError) as err:
        build_strategy(RunConfig.from_dict({"strategy": "flora", "download-codec": "fp16"}))
    assert str(err.value).startswith("--download-codec fp16: --strategy flora sends only its stacks")


def test_flora_client_that_missed_a_round_catches_up_exactly(tiny_model_dir):
    """Round 1: nodes 1-3 train; round 2: only nodes 1-2; round 3: node 3 returns and must be
    sent both stacks, so that its merged base equals the server's global base."""
    from flwr.app import Context, RecordDict

    from client.node_state import keep_tensors
    from fedlora.adapters import merge_lora

    model = load_model(str(tiny_model_dir), torch.device("cpu"))[0]
    strategy = FLoRA(ranks=(4, 2), rank=4, alpha=8, target_modules=TARGETS)
    arrays = strategy.initialize(model)

    def lora(r, seed):
        g = torch.Generator().manual_seed(seed)
        return {f"base_model.model.{path}.lora_{x}.weight": torch.randn(shape, generator=g)
                for path, (m, n) in strategy.module_shapes.items()
                for x, shape in (("A", (r, n)), ("B", (m, r)))}

    context = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})
    for server_round, nodes in ((1, [1, 2, 3]), (2, [1, 2]), (3, [3])):
        messages = strategy.configure_train(server_round, arrays, RunConfig().to_dict(), DryRunGrid(nodes))
        for message in messages:
            if message.metadata.dst_node_id == 3:
                plan = message.content["config"]
                kept_keys = {k.split("/")[0] for k in message.content["keep"]}
                assert kept_keys == ({"0", "1"} if server_round == 3 else set())
                _, merges = keep_tensors(context, message.content["keep"], int(plan["kept-batches"]))
        if server_round < 3:
            replies = [train_reply(n, lora(4 if n % 2 else 2, 10 * server_round + n), 100 * n,
                                   rank=4 if n % 2 else 2) for n in nodes]
            arrays, _ = strategy.aggregate_train(server_round, replies)

    client_model = load_model(str(tiny_model_dir), torch.device("cpu"))[0]
    for merge in merges:
        merge_lora(client_model, merge)
    state, rank, alpha = strategy.peft_adapter(arrays)
    weights = dict(model.named_parameters())
    for path, delta in delta_weights(state, alpha / rank).items():
        expected = weights[f"{path}.weight"].double() + delta
        got = client_model.get_submodule(path).weight.double()
        assert ((got - expected).norm() / expected.norm()) < 1e-6


@pytest.mark.parametrize("codec", ["fp32", "bf16", "sign"])
def test_fedsb_gradient_init_by_each_codec(base_model, codec):
    """The initialisation round's replies, encoded by --fedsb-init-codec: fp32 gives the
    sign of the summed gradients, sign the clients' majority vote, bf16 the sign of the
    sum of bf16-rounded gradients; B R A is the rule's rank-r approximation of each."""
    strategy = FedSB(init="gradient", init_codec=codec, rank=4, target_modules=TARGETS)
    strategy.initialize(base_model)
    messages = strategy.configure_init(ArrayRecord(), RunConfig().to_dict(), DryRunGrid([1, 2, 3]))
    assert {m.content["config"]["gradient-codec"] for m in messages} == {codec}
    shapes = {f"{path}.weight": shape for path, shape in strategy.module_shapes.items()}
    generator = torch.Generator().manual_seed(0)
    gradients = [{k: torch.randn(s, generator=generator) for k, s in shapes.items()} for _ in range(3)]
    replies = [train_reply(n + 1, g, 16, codec=codec) for n, g in enumerate(gradients)]
    arrays = strategy.aggregate_init(replies)
    up = sum(payload_bytes(r) for r in replies)
    values = sum(math.prod(s) for s in shapes.values())
    assert up > 3 * values * {"fp32": 4, "bf16": 2, "sign": 1 / 8}[codec]  # payload and headers
    assert up < 3 * values * {"fp32": 4, "bf16": 2, "sign": 1 / 8}[codec] + 3 * 4000
    torch.manual_seed(strategy.seed)  # svd_lowrank is randomised: the server's order
    for path in strategy.module_shapes:
        key = f"{path}.weight"
        stacked = torch.stack([g[key] for g in gradients])
        if codec == "sign":  # each client one vote, a tie gives 0
            vote = torch.sign(torch.where(stacked >= 0, 1.0, -1.0).sum(dim=0))
        elif codec == "bf16":
            vote = torch.sign(stacked.bfloat16().float().sum(dim=0))
        else:
            vote = torch.sign(stacked.sum(dim=0))
        B, A, R = lora_sb_from_gradient(vote.double(), 4, strategy.init_eta)
        got = (strategy.frozen[f"{path}.lora_B.weight"] @ torch.from_numpy(arrays[f"{path}.lora_R.weight"].numpy())
               @ strategy.frozen[f"{path}.lora_A.weight"])
        torch.testing.assert_close(got, B @ R @ A, rtol=1e-4, atol=1e-7)
