"""One default-job client in one process: its memory after loading, after training and after
evaluating, and its training time.

    python benchmarks/client_memory.py [--micro-batch-size M] [--gradient-checkpointing]
    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/client_memory.py   # the simulation's setting

What a simulated client actor does in a round of the default job: SmolLM2 in fp32 on the
CPU (one torch thread, as an actor with ``--client-cpus 1``), a LoRA r=8 on q_proj and
v_proj, 10 AdamW steps of batch 8 on partition 0 of 4 of Rotten Tomatoes, then the 200
held-out reviews scored in batches of 32. Prints, at each stage, the kernel's high-water
mark of resident memory (VmHWM) and the process's RSS, PSS and USS: what glibc keeps of
freed activations shows as RSS that stays at the training peak.
"""

from __future__ import annotations

import argparse
import time

import psutil
import torch

from fedlora.adapters import attach_lora
from fedlora.config import RunConfig
from fedlora.data import client_examples, load_task
from fedlora.evaluate import score
from fedlora.models import load_model
from fedlora.train import train_local


def memory() -> str:
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    info = psutil.Process().memory_full_info()
    return (f"VmHWM {int(status['VmHWM'].split()[0]) / 1024:,.0f} MiB, RSS {info.rss / 2**20:,.0f}, "
            f"PSS {info.pss / 2**20:,.0f}, USS {info.uss / 2**20:,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch-size", type=int, default=0)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("imported: ", memory(), flush=True)
    config, cpu = RunConfig(), torch.device("cpu")
    task = load_task(config)
    model, tokenizer = load_model(config.model, cpu)
    print("loaded:   ", memory(), flush=True)
    adapted = attach_lora(model, 8, 16, ["q_proj", "v_proj"], 0)
    for name, parameter in adapted.named_parameters():
        parameter.requires_grad_("lora_" in name)
    begin = time.perf_counter()
    stats = train_local(adapted, tokenizer, client_examples(task, config, 0, 4), steps=10,
                        batch_size=8, lr=3e-3, max_length=config.max_length, seed=0, device=cpu,
                        micro_batch_size=args.micro_batch_size,
                        gradient_checkpointing=args.gradient_checkpointing)
    print(f"trained:   {memory()} ({time.perf_counter() - begin:.1f} s, "
          f"loss {stats['train_loss']:.4f})", flush=True)
    score(adapted, tokenizer, task.eval, task.label_words, batch_size=32,
          max_length=config.max_length, device=cpu)
    print("evaluated:", memory(), flush=True)


if __name__ == "__main__":
    main()
