"""What --quantize nf4 and int8 cost and save a client on the CPU, against the fp32 base.

    python benchmarks/quantize.py [--steps 10] [--eval-examples 64] [--repeats 2]
                                  [--modes none,nf4,int8]

One client of the default job (SmolLM2-135M, Rotten Tomatoes, partition 0 of 4, LoRA r=8
on q_proj and v_proj, batch 8, max length 96, FedAvg's learning rate), on one torch thread
as a default client actor has (--client-cpus 1). Each measurement is a process of its
own, as a client is: load the base (quantised as it loads), train a fresh LoRA for one
uncounted warm-up step and then ``--steps`` steps, score ``--eval-examples`` evaluation
examples as a round's evaluation does. The modes alternate, ``--repeats`` times, so that
they share the machine's state. Prints, per mode, the median seconds per training step
and per evaluated example, the bytes of the model's tensors, and the process's peak
memory, sampled every 0.5 s: resident (RSS) and proportional (PSS). The fp32 base is read
from the cache through a memory map, whose pages count in the RSS of every client process
that touches them but are one copy for all of them; PSS divides shared pages among the
processes that share them, so it is what a client process takes from the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import psutil
import torch

from fedlora.adapters import attach_lora
from fedlora.config import RunConfig
from fedlora.data import client_examples, load_task
from fedlora.evaluate import score
from fedlora.models import load_model
from fedlora.train import train_local
from strategies import resolved


def measure(quantize: str, steps: int, eval_examples: int) -> dict:
    """One mode's figures, in this process."""
    torch.set_num_threads(1)
    config = resolved(RunConfig(quantize=quantize))
    task = load_task(config)
    examples = client_examples(task, config, 0, config.num_clients)
    device = torch.device("cpu")
    begin = time.perf_counter()
    model, tokenizer = load_model(config.model, device, config.dtype, config.quantize)
    load_seconds = time.perf_counter() - begin
    weights_mb = sum(t.numel() * t.element_size()
                     for t in [*model.parameters(), *model.buffers()]) / 2**20
    adapted = attach_lora(model, config.rank, config.alpha, config.target_module_list, seed=0)
    train = dict(batch_size=config.batch_size, lr=config.lr, max_length=config.max_length,
                 device=device)
    train_local(adapted, tokenizer, examples, steps=1, seed=1, **train)  # warm-up
    stats = train_local(adapted, tokenizer, examples, steps=steps, seed=0, **train)
    begin = time.perf_counter()
    scores = score(adapted, tokenizer, task.eval[:eval_examples], task.label_words,
                   batch_size=config.eval_batch_size, max_length=config.max_length,
                   device=device)
    eval_seconds = time.perf_counter() - begin
    return {
        "quantize": quantize,
        "load_s": load_seconds,
        "s_per_step": stats["train_seconds"] / steps,
        "first_loss": stats["first_loss"],
        "last_loss": stats["last_loss"],
        "s_per_eval_example": eval_seconds / eval_examples,
        "eval_accuracy": scores.metrics("")["accuracy"],
        "weights_mb": weights_mb,
    }


def peak_memory(command: list[str]) -> tuple[str, float, float]:
    """Run ``command``; its output, and its peak RSS and PSS in MB (sampled every 0.5 s:
    reading a process's PSS walks its memory map, which costs CPU the child shares)."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    process, rss, pss = psutil.Process(child.pid), 0.0, 0.0
    while child.poll() is None:
        try:
            memory = process.memory_full_info()
            rss, pss = max(rss, memory.rss / 2**20), max(pss, memory.pss / 2**20)
        except psutil.Error:  # it has just ended
            pass
        time.sleep(0.5)
    if child.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({child.returncode})")
    return child.stdout.read(), rss, pss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default="none,nf4,int8")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one mode
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.eval_examples)))
        return
    modes = args.modes.split(",")
    rows: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:
            out, rss, pss = peak_memory(
                [sys.executable, __file__, "--one", mode, "--steps", str(args.steps),
                 "--eval-examples", str(args.eval_examples)])
            rows[mode].append({**json.loads(out.strip().splitlines()[-1]),
                               "peak_rss_mb": rss, "peak_pss_mb": pss})
    for mode, runs in rows.items():
        median = {key: statistics.median(run[key] for run in runs)
                  for key in ("s_per_step", "s_per_eval_example", "load_s")}
        first = runs[0]
        print(f"{mode:>4}: {median['s_per_step']:.2f} s/step (loss {first['first_loss']:.3f} -> "
              f"{first['last_loss']:.3f}), {median['s_per_eval_example'] * 1000:.0f} ms per "
              f"evaluated example (accuracy {first['eval_accuracy']:.3f}), load "
              f"{median['load_s']:.1f} s, model tensors {first['weights_mb']:.0f} MB, peak RSS "
              f"{max(r['peak_rss_mb'] for r in runs):.0f} MB, peak PSS "
              f"{max(r['peak_pss_mb'] for r in runs):.0f} MB", flush=True)
    print(f"(medians of {args.repeats}; {args.steps} steps after a warm-up, "
          f"{args.eval_examples} evaluated examples, 1 torch thread)")


if __name__ == "__main__":
    main()
