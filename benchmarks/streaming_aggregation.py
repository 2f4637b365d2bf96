"""Streaming aggregation: 100 clients of Llama-7B-shaped rank-16 LoRA updates on q and v.

    python benchmarks/streaming_aggregation.py [--clients 100] [--rank 16] [--strategy fedavg] [--repeats 3]

No model: the global adapter and the clients' updates are random tensors of Llama-7B's
shapes (32 layers, q_proj and v_proj 4096 x 4096), 33.5 MB per client in fp32. The replies
are real Flower messages built by the client's own ``reply`` and go through the
strategy's ``aggregate_train`` (validation, decoding, folding), as in a run.

Reported:

- **time** (best of ``--repeats``): ``aggregate_train`` over the replies, held in memory beforehand, against a
  plain numpy weighted sum (fp64 accumulation, as the strategy's) of the same update
  arrays, deserialized from Flower's ``Array`` beforehand, and deserialized as it goes
  (``Array.numpy()``, which any server must do), and the ratios;
- **memory**: the process's peak RSS above its level before the round while the replies
  are made one at a time and handed over as they are made (as ``server/run.py`` hands
  them over as they arrive), less the peak of making them alone: the aggregation's own
  memory, in units of one client's adapter.
"""

from __future__ import annotations

import argparse
import timeit
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from client.app import reply
from fedlora.codec import Codec, encode_payload
from fedlora.config import RunConfig
from server.dry_run import DryRunGrid, dry_run
from strategies import build_strategy

LAYERS, WIDTH = 32, 4096  # Llama-7B: q_proj and v_proj are 4096 x 4096


def adapter_shapes(rank: int) -> dict[str, tuple[int, int]]:
    return {f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{x}.weight": shape
            for i in range(LAYERS) for m in ("q_proj", "v_proj")
            for x, shape in (("A", (rank, WIDTH)), ("B", (WIDTH, rank)))}


def random_state(shapes, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.01 * torch.randn(shape, generator=g) for k, shape in shapes.items()}


def best_time(function, repeats: int) -> float:
    return min(timeit.repeat(function, number=1, repeat=repeats))


def peak_rss() -> int:
    """The process's peak resident set size so far, in bytes (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--repeats", type=int, default=3, help="timings: the best of this many")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with dry_run():  # messages belong to a run
        measure(args)


def measure(args) -> None:
    """Build the clients' replies and aggregate them, watching memory and time."""
    shapes = adapter_shapes(args.rank)
    adapter_bytes = sum(np.prod(s) for s in shapes.values()) * 4
    strategy = build_strategy(RunConfig(strategy=args.strategy, rank=args.rank))
    grid = DryRunGrid(range(1, args.clients + 1))
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        1, ArrayRecord(random_state(shapes, 0)), RunConfig().to_dict(), grid)}
    codec = Codec.parse("fp32")
    examples = [50 + 7 * (node % 13) for node in range(1, args.clients + 1)]

    def client_reply(node: int) -> Message:
        payload, header = encode_payload(random_state(shapes, node), codec)
        metrics = {"num-examples": examples[node - 1], "train-loss": 1.0, "train-seconds": 1.0,
                   "rank": args.rank}
        return reply(messages[node], payload, header, metrics, str(node), torch.device("cpu"))

    def made_one_at_a_time():
        for node in range(1, args.clients + 1):
            message = client_reply(node)
            yield message
            del message

    # Memory first, while nothing else is held: the peak of making the replies alone,
    # then of making them and aggregating them as they come; the difference is the
    # aggregation's own.
    reset_peak_rss()
    baseline = peak_rss()
    for _ in made_one_at_a_time():
        pass
    making_peak = peak_rss() - baseline
    reset_peak_rss()
    baseline = peak_rss()
    arrays, _ = strategy.aggregate_train(1, made_one_at_a_time())
    streamed_peak = peak_rss() - baseline
    assert arrays is not None and not strategy.dropped, strategy.dropped

    # Time: the replies made beforehand, then aggregated, against numpy on the same arrays.
    replies = [client_reply(node) for node in range(1, args.clients + 1)]
    strategy_seconds = best_time(lambda: strategy.aggregate_train(1, replies), args.repeats)
    arrays, _ = strategy.aggregate_train(1, replies)
    weights = np.array(examples, dtype=np.float64) / sum(examples)

    def numpy_sum(updates):
        sums = {k: np.zeros(shapes[k], dtype=np.float64) for k in shapes}
        for update, weight in zip(updates, weights):
            for key, value in update.items():
                sums[key] += weight * value.reshape(shapes[key])
        return sums

    deserializing_seconds = best_time(lambda: numpy_sum(  # deserializing as it goes
        {k: a.numpy() for k, a in r.content["arrays"].items()} for r in replies), args.repeats)
    updates = [{k: a.numpy() for k, a in r.content["arrays"].items()} for r in replies]
    numpy_seconds = best_time(lambda: numpy_sum(updates), args.repeats)  # deserialized before
    sums = numpy_sum(updates)
    check = arrays.to_torch_state_dict()
    key = next(iter(shapes))
    expected = strategy.global_state[key].double().numpy() + sums[key]
    assert np.allclose(check[key].numpy(), expected, rtol=1e-5, atol=1e-7)

    print(f"{args.clients} clients, {args.strategy}, rank {args.rank} on q and v of "
          f"{LAYERS} layers of {WIDTH} x {WIDTH}: {adapter_bytes / 1e6:.1f} MB per client")
    print(f"aggregate_train: {strategy_seconds:.2f} s; numpy weighted sum of the arrays "
          f"deserialized beforehand: {numpy_seconds:.2f} s (ratio "
          f"{strategy_seconds / numpy_seconds:.2f}), deserializing Flower's arrays as it goes: "
          f"{deserializing_seconds:.2f} s (ratio {strategy_seconds / deserializing_seconds:.2f})")
    own = streamed_peak - making_peak
    print(f"peak memory above the level before: making the replies one at a time "
          f"{making_peak / 1e6:.0f} MB, making and aggregating them {streamed_peak / 1e6:.0f} MB; "
          f"the aggregation's own {own / 1e6:.0f} MB = {own / adapter_bytes:.2f} adapters")


if __name__ == "__main__":
    main()
