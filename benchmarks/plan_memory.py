"""One training client's peak memory, measured, against what ``python -m fedlora.plan``
plans for it (``fedlora.memory``).

    python benchmarks/plan_memory.py [--model smollm2-135m] [--batch-sizes 4,8]
                                     [--max-length 128] [--steps 3] [--strategy fedavg]

For each batch size (and, at the largest, with gradient checkpointing too), a fresh
process does what a ClientApp's training message does: it imports the client stack,
loads the model (fp32 on the CPU), attaches the strategy's adapter at its defaults and
trains ``--steps`` AdamW steps with ``fedlora.train.train_local``. Its peak resident
memory is the kernel's high-water mark (``ru_maxrss``), which counts the model's
safetensors pages once they are read. The examples are long enough that every one fills
``--max-length`` tokens, so a packed batch holds batch size x max length tokens: the
planner's bound. The plan comes from ``fedlora.plan.plan_run`` with the same settings.
Prints one line per case: measured, planned, their ratio, and the planner's parts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, torch
import client.app  # the client's imports: what a client process holds before its model
from fedlora.adapters import attach_lora
from fedlora.data import Example
from fedlora.models import load_model
from fedlora.train import train_local
settings = json.loads(sys.argv[1])
torch.set_num_threads(1)
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model, tokenizer = load_model(settings["model"], torch.device("cpu"), "float32")
model = attach_lora(model, settings["rank"], settings["alpha"], settings["targets"], 0)
examples = [Example("word " * (4 * settings["max_length"]), " positive", 0)] * 64
train_local(model, tokenizer, examples, steps=settings["steps"], batch_size=settings["batch"],
            lr=1e-3, max_length=settings["max_length"], seed=0, device=torch.device("cpu"),
            gradient_checkpointing=settings["checkpointing"])
print(json.dumps({"imported": imported,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def planned(strategy: str, model: str, batch: int, max_length: int, checkpointing: bool):
    """The planner's figure for one client of this setting (fedlora.plan.plan_run)."""
    from fedlora.cli import build_parser, study_from_args
    from fedlora.plan import plan_run

    flags = ["--strategy", strategy, "--model", model, "--num-clients", "2", "--rounds", "1",
             "--batch-size", str(batch), "--max-length", str(max_length), "--dtype", "float32",
             "--device", "cpu", "--output", "/tmp/plan-memory", "--eval-size", "16"]
    [run] = study_from_args(vars(build_parser().parse_args(flags)))
    plan = plan_run(run.config)
    return run.config, plan.memory_checkpointed if checkpointing else plan.memory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--batch-sizes", default="4,8")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    cases = [(b, False) for b in batches] + [(max(batches), True)]
    print("batch  checkpointing  measured_MiB  planned_MiB  planned/measured  "
          "imported_MiB  planner's parts (MiB)")
    for batch, checkpointing in cases:
        config, plan = planned(args.strategy, args.model, batch, args.max_length, checkpointing)
        settings = {"model": args.model, "rank": config.rank, "alpha": config.alpha,
                    "targets": config.target_module_list, "steps": args.steps, "batch": batch,
                    "max_length": args.max_length, "checkpointing": checkpointing}
        child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)],
                               capture_output=True, text=True, check=True)
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        parts = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in plan.as_dict().items() if k != "total")
        print(f"{batch:>5}  {str(checkpointing):>13}  {measured['peak'] / 2**20:>12.0f}  "
              f"{plan.total / 2**20:>11.0f}  {plan.total / measured['peak']:>16.2f}  "
              f"{measured['imported'] / 2**20:>12.0f}  {parts}", flush=True)


if __name__ == "__main__":
    main()
