"""Why the default job differs between the learning-rate studies and the DP-SGD study
(docs/results.md, "Why the same configuration differs between studies"): ``--val-size``
changes which reviews each client trains on, not which reviews are scored.

    python benchmarks/val_size_split.py

Part 1 splits Rotten Tomatoes as a run of the default job does (fedlora.data: the
server's evaluation examples, each client's ``local_examples``, and the examples
``fedlora.train.train_local`` draws in each of the 3 rounds of 10 steps of 8, from the
same batch seeds), once with ``--val-size 0`` (the DP-SGD study, simulations/dp.toml) and
once with ``--val-size 200`` (simulations/tune-lr.toml, tune-lr-fedsb-random.toml), for
seeds 0, 1, 2. No model is loaded; a few seconds.

Part 2 reads the committed runs: the round-0 eval loss (the base model on the evaluation
reviews), the round-1 train loss (10 steps from that same start on the clients' own
batches) and the final accuracy of the same strategy and learning rate under the two
settings, and of two controls that keep the setting and change only the code's date.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fedlora.comparison import Summary  # noqa: E402
from fedlora.config import RunConfig  # noqa: E402
from fedlora.data import load_task, local_examples, server_data  # noqa: E402
from fedlora.seeds import stream_seed  # noqa: E402

RESULTS = ROOT / "docs" / "results"
DEFAULT_JOB = {"model": "smollm2-135m", "dataset": "rotten-tomatoes", "num-clients": 4,
               "rounds": 3, "local-steps": 10, "batch-size": 8, "eval-size": 200,
               "partitioning": "iid"}
PAIRS = [  # (A, B, what differs)
    ("dp-sgd/fedavg-no-dp/fedavg", "tune-lr/fedavg/lr0.003", "val-size 0 against 200"),
    ("dp-sgd/fedsb-no-dp/fedsb", "tune-lr-fedsb-random/fedsb/lr0.01", "val-size 0 against 200"),
    ("dp-sgd/ffa-no-dp/ffa", "tune-lr/ffa/lr0.01", "val-size 0 against 200"),
    ("chat-template/plain/fedavg", "dp-sgd/fedavg-no-dp/fedavg", "control: both val-size 0; "
     "ran at 5c5f749 (2026-12-05) against committed 2026-12-02 and 03"),
    ("tune-lr/hetlora/lr0.003", "tune-lr/fedavg/lr0.003", "control: both val-size 200; "
     "committed 2026-12-05 against 2026-12-01 (HetLoRA at one rank is FedAvg's arithmetic)"),
    # within one setting: the pairs the page may make
    ("dp-sgd/fedsb-no-dp/fedsb", "dp-sgd/fedavg-no-dp/fedavg", "both val-size 0"),
    ("tune-lr-fedsb-random/fedsb/lr0.01", "tune-lr/fedavg/lr0.003", "both val-size 200"),
    ("tune-lr-fedsb-random/fedsb/lr0.01", "tune-lr/fedsb/lr0.001", "both val-size 200: "
     "the random initialisation against the gradient one"),
]


def key(example) -> tuple[str, str]:
    return example.prompt, example.answer


def split(seed: int, val_size: int):
    """(evaluation examples, each client's training examples, each client's batches by round)."""
    config = RunConfig.from_dict({**DEFAULT_JOB, "seed": seed, "val-size": val_size})
    task = load_task(config)
    evaluation = server_data(config).examples
    clients, drawn = [], []
    for partition in range(config.num_clients):
        train, _ = local_examples(config, None, partition, config.num_clients, task.label_words, task)
        rounds = []
        for server_round in range(1, config.rounds + 1):  # train_local's draw without DP
            generator = torch.Generator().manual_seed(
                stream_seed(seed, server_round, partition, "batches"))
            order = torch.randperm(len(train), generator=generator)
            rounds.append([train[i] for i in order[: config.local_steps * config.batch_size].tolist()])
        clients.append(train)
        drawn.append(rounds)
    return task, evaluation, clients, drawn


def part1() -> None:
    print("Part 1: the default job's data, --val-size 0 against --val-size 200\n")
    for seed in (0, 1, 2):
        task0, eval0, clients0, drawn0 = split(seed, 0)
        task2, eval2, clients2, drawn2 = split(seed, 200)
        same_eval = [key(e) for e in eval0] == [key(e) for e in eval2]
        validation_trained = len(set(map(key, task2.validation)) & set(map(key, task0.train)))
        print(f"seed {seed}: {len(eval0)} evaluation reviews, the same in the same order: {same_eval}; "
              f"training pool {len(task0.train)} against {len(task2.train)} "
              f"(the 200 validation reviews are in the val-size-0 pool: {validation_trained})")
        for p in range(len(clients0)):
            a, b = set(map(key, clients0[p])), set(map(key, clients2[p]))
            same_slot = [sum(key(x) == key(y) for x, y in zip(r0, r2))
                         for r0, r2 in zip(drawn0[p], drawn2[p])]
            t0 = {key(x) for r in drawn0[p] for x in r}
            t2 = {key(x) for r in drawn2[p] for x in r}
            print(f"  client {p}: partition {len(a)} against {len(b)} reviews, {len(a & b)} in both; "
                  f"batch slots holding the same review, rounds 1-3: "
                  f"{'/'.join(map(str, same_slot))} of 80; distinct reviews trained on "
                  f"{len(t0)} against {len(t2)}, {len(t0 & t2)} in both")
    print()


def rows(run: str, seed: int) -> list[dict]:
    path = RESULTS / run / f"seed{seed}" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def part2() -> None:
    print("Part 2: committed runs, A against B, seeds 0 / 1 / 2\n")
    for a, b, what in PAIRS:
        print(f"{a}  against  {b}  ({what})")
        for label, pick in (
            ("round-0 eval loss", lambda r: f"{r[0]['eval_loss']:.6f}"),
            ("round-1 train loss", lambda r: f"{next(x for x in r if x['round'] == 1)['train_loss']:.6f}"),
            ("final accuracy", lambda r: f"{r[-1]['eval_accuracy']:.3f}"),
            ("final eval loss", lambda r: f"{r[-1]['eval_loss']:.6f}"),
        ):
            cells = [f"{pick(rows(a, s))} / {pick(rows(b, s))}" for s in (0, 1, 2)]
            print(f"  {label:18}  " + "   ".join(cells))
        points = Summary([100 * (rows(a, s)[-1]["eval_accuracy"] - rows(b, s)[-1]["eval_accuracy"])
                          for s in (0, 1, 2)])
        low, high = points.interval()
        print(f"  {'A - B, points':18}  " + " / ".join(f"{v:+.1f}" for v in points.values)
              + f", mean {points.mean:+.1f} [{low:+.1f}, {high:+.1f}]")
    print()


def main() -> None:
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    part1()
    part2()


if __name__ == "__main__":
    main()
