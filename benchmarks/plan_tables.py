"""docs/results.md's whole-run plans ("Planning a run"): every strategy's traffic over a
run and one client's peak memory at two published settings, from the models' shapes.

    python benchmarks/plan_tables.py [--setting flowertune|fedsb-paper|both]

- ``flowertune``: FlowerTune's general-NLP setting: Mistral-7B-v0.3's shapes
  (``benchmarks/models/mistral-7b-v0.3/config.json``), 4-bit (nf4) base on a GPU (bf16
  compute), LoRA r = 32, alpha 64 on q_proj and v_proj (peft's default for Mistral, which
  FlowerTune's template keeps), 200 rounds, 20 clients, fraction 0.1, batch 16 x 512
  tokens with gradient checkpointing.
- ``fedsb-paper``: the Fed-SB paper's Llama-3.2-3B (``benchmarks/models/llama-3.2-3b``),
  all 7 linear modules, Fed-SB at r = 200 and the LoRA methods at r = 32, bf16 on a GPU,
  the same federation and batches.

Each row is ``fedlora.plan.plan_run`` (what ``python -m fedlora.plan --json`` prints),
with the seconds it took.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

MODELS = Path(__file__).resolve().parent / "models"
STRATEGIES = ("fedavg", "ffa", "flora", "fedsb", "sparse", "hetlora", "flexlora", "fedex",
              "fedsa", "fedsvd", "rolora")
FEDERATION = ["--rounds", "200", "--num-clients", "20", "--fraction-train", "0.1",
              "--batch-size", "16", "--max-length", "512", "--gradient-checkpointing",
              "--device", "cuda", "--output", "/tmp/plan-tables", "--name", "plan"]
SETTINGS = {
    "flowertune": (MODELS / "mistral-7b-v0.3" / "config.json", "nf4",
                   ["--rank", "32", "--alpha", "64", "--target-modules", "q_proj,v_proj"], {}),
    "fedsb-paper": (MODELS / "llama-3.2-3b" / "config.json", "none",
                    ["--rank", "32", "--alpha", "64", "--target-modules",
                     "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"],
                    {"fedsb": ["--rank", "200"]}),
}


def plans(setting: str):
    """(strategy, the plan's summary, seconds) for every strategy of ``setting``."""
    from fedlora.cli import build_parser, study_from_args
    from fedlora.plan import plan_run

    model, quantize, flags, own = SETTINGS[setting]
    for strategy in STRATEGIES:
        argv = ["--strategy", strategy, *FEDERATION, *flags, *own.get(strategy, [])]
        [run] = study_from_args(vars(build_parser().parse_args(argv)))
        config = run.config
        config.model = str(model)  # a config.json: preflight leaves it to the planner
        config.quantize = quantize
        start = time.perf_counter()
        summary = plan_run(config).summary(config)
        yield strategy, summary, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="both", choices=(*SETTINGS, "both"))
    args = parser.parse_args(argv)
    for setting in SETTINGS if args.setting == "both" else [args.setting]:
        print(f"\n{setting}\n\n| strategy | upload, whole run | download, whole run | of which "
              "initialisation (up / down) | largest upload of a client in a round | client "
              "peak, checkpointing (without) | seconds |\n|---|---|---|---|---|---|---|")
        for strategy, s, seconds in plans(setting):
            print(f"| {strategy} | {s['upload_bytes_total'] / 1e9:,.2f} GB | "
                  f"{s['download_bytes_total'] / 1e9:,.2f} GB | "
                  f"{s['init_upload_bytes'] / 1e9:,.2f} / {s['init_download_bytes'] / 1e9:,.4f} GB | "
                  f"{s['upload_bytes_per_client_round'] / 1e6:,.1f} MB | "
                  f"{s['client_peak_memory_bytes_with_checkpointing'] / 2**30:,.1f} "
                  f"({s['client_peak_memory_bytes_without_checkpointing'] / 2**30:,.1f}) GiB | "
                  f"{seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
