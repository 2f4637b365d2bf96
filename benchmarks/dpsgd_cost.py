"""What DP-SGD costs a client per local step, against the same training without DP.

    python benchmarks/dpsgd_cost.py [--steps 10] [--repeats 3] [--model smollm2-135m]

One client's partition of the default job (SmolLM2-135M, Rotten Tomatoes, LoRA r=8 on
q_proj and v_proj, batch 8), trained in one process, alternating plain AdamW and DP-SGD
(Opacus: Poisson batches of expected size 8, per-example clipping, noise) so that both see
the same machine state, after one uncounted warm-up of each. Prints seconds per step of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from fedlora.adapters import attach_lora
from fedlora.config import RunConfig
from fedlora.data import client_examples, load_task
from fedlora.models import load_model
from fedlora.privacy import DPSGD
from fedlora.train import train_local
from strategies import resolved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    config = resolved(RunConfig(model=args.model))
    examples = client_examples(load_task(config), config, 0, config.num_clients)
    device = torch.device("cpu")
    dpsgd = DPSGD(noise=1.0, clip=1.0, sample_rate=config.batch_size / len(examples),
                  sampling_seed=0, noise_seed=1)
    seconds: dict[str, list[float]] = {"no DP": [], "DP-SGD": []}
    for repeat in range(args.repeats + 1):  # the first round warms up, uncounted
        for label, private in (("no DP", None), ("DP-SGD", dpsgd)):
            model, tokenizer = load_model(config.model, device, config.dtype)
            adapted = attach_lora(model, config.rank, config.alpha, config.target_module_list, seed=0)
            stats = train_local(adapted, tokenizer, examples, steps=args.steps,
                                batch_size=config.batch_size, lr=config.lr,
                                max_length=config.max_length, seed=repeat, device=device,
                                dpsgd=private)
            if repeat > 0:
                seconds[label].append(stats["train_seconds"] / args.steps)
                print(f"{label:>6}: {seconds[label][-1]:.3f} s/step", flush=True)
    plain, private = (statistics.median(seconds[k]) for k in ("no DP", "DP-SGD"))
    print(f"median s/step: no DP {plain:.3f}, DP-SGD {private:.3f}, ratio {private / plain:.2f} "
          f"({len(examples)} examples, expected batch {config.batch_size}, {args.steps} steps, "
          f"{args.repeats} repeats, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
