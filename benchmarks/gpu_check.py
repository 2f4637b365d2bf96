"""The CUDA path in one command: bf16 training, DP-SGD, evaluation, FLoRA merge precision,
and GPU memory between the ClientApp's messages; with ``--quantize nf4`` (or int8) all of
it on a base quantised by bitsandbytes (QLoRA).

    python benchmarks/gpu_check.py [--model smollm2-135m] [--steps 10] [--cpu-steps 3]
                                   [--quantize nf4]

Skips with one line when torch sees no CUDA device (``--device cpu`` runs the same checks
on the CPU, to try the script itself, e.g. with ``--model tiny-llama``). Each check prints
one line of what it measured:

- train: LoRA (the default job: r=8 on q_proj, v_proj, batch 8) in bf16 on the GPU (or on
  the quantised base), seconds per step against the same on the CPU, the first and last
  batch loss, and the peak GPU memory;
- dp-sgd: the same with Opacus' DP-SGD (Poisson batches, per-example clipping, noise);
- evaluation: the trained adapter evaluated in bf16 on the GPU and in fp32 on the CPU
  (loss and accuracy of each);
- flora merge: five rounds of stacked deltas merged into the bf16 model, the relative
  error of the merged delta against an fp64 sum (and what merging in bf16 would give); on
  a quantised base, the merges go into fp32 copies of the dequantised layers and the
  error is against the dequantised weights plus the fp64 sum;
- messages: the ClientApp's train handler on two messages in one process (as a Ray
  actor or SuperNode serves them), seconds each and GPU memory left allocated after each.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from fedlora.adapters import (
    adapter_state,
    attach_lora,
    dense_weight,
    is_quantized,
    lora_applied,
    merge_lora,
    target_linears,
)
from fedlora.config import RunConfig
from fedlora.data import client_examples, load_task
from fedlora.models import load_model
from fedlora.privacy import DPSGD
from fedlora.evaluate import evaluate
from fedlora.train import train_local
from strategies import resolved

GiB = 2**30


def peak_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a on the CPU"
    return f"{torch.cuda.max_memory_allocated() / GiB:.2f} GiB"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def seconds_per_step(config, examples, device, steps, dpsgd=None):
    """Train a fresh LoRA for ``steps`` steps (after one uncounted step); return
    (seconds per step, the adapted model, its tokenizer)."""
    model, tokenizer = load_model(config.model, device, quantize=config.quantize)
    adapted = attach_lora(model, config.rank, config.alpha, config.target_module_list, seed=0)
    common = dict(batch_size=config.batch_size, lr=config.lr, max_length=config.max_length,
                  seed=0, device=device, dpsgd=dpsgd)
    train_local(adapted, tokenizer, examples, steps=1, **common)  # warm-up: kernels, caches
    reset_peak(device)
    stats = train_local(adapted, tokenizer, examples, steps=steps, **common)
    return stats["train_seconds"] / steps, adapted, tokenizer, stats


def check_training(config, examples, device, args):
    gpu_step, adapted, tokenizer, stats = seconds_per_step(config, examples, device, args.steps)
    memory = peak_memory(device)
    cpu_step, _, _, _ = seconds_per_step(config, examples, torch.device("cpu"), args.cpu_steps)
    base = (f"{config.quantize} base" if config.quantize != "none"
            else str(next(adapted.parameters()).dtype))
    print(f"train (LoRA r={config.rank} on {config.target_modules}, batch {config.batch_size}, "
          f"{base}): {gpu_step:.4f} s/step on {device} vs {cpu_step:.4f} s/step on cpu "
          f"({cpu_step / gpu_step:.1f}x), loss {stats['first_loss']:.3f} -> "
          f"{stats['last_loss']:.3f}; peak GPU memory {memory}", flush=True)
    return adapted, tokenizer


def check_dpsgd(config, examples, device, args):
    dpsgd = DPSGD(noise=1.0, clip=1.0, sample_rate=config.batch_size / len(examples),
                  sampling_seed=0, noise_seed=1)
    step, _, _, _ = seconds_per_step(config, examples, device, args.steps, dpsgd)
    print(f"dp-sgd (Opacus, Poisson batch {config.batch_size} of {len(examples)}): {step:.4f} "
          f"s/step on {device}; peak GPU memory {peak_memory(device)}", flush=True)


def check_evaluation(config, task, adapted, tokenizer, device):
    state = adapter_state(adapted)
    results = {}
    for where in (device, torch.device("cpu")):
        model, _ = load_model(config.model, where, quantize=config.quantize)
        with lora_applied(model, state, config.rank, config.alpha, config.target_module_list) as m:
            results[where.type] = evaluate(m, tokenizer, task.eval, task.label_words,
                                           batch_size=config.eval_batch_size,
                                           max_length=config.max_length, device=where)
    gpu, cpu = results[device.type], results["cpu"]
    line = (f"evaluation ({len(task.eval)} examples): eval loss {gpu['eval_loss']:.4f} on "
            f"{device} vs {cpu['eval_loss']:.4f} on cpu")
    if "eval_accuracy" in gpu:
        line += f", accuracy {gpu['eval_accuracy']:.3f} vs {cpu['eval_accuracy']:.3f}"
    print(line, flush=True)


def check_flora_merge(config, device, rounds=5, clients=4):
    """Merge ``rounds`` random stacks (``clients`` x rank r, entries of a trained LoRA's
    size) into the model as loaded on ``device``; compare with the fp64 sum (on a
    quantised base: added to the dequantised weights)."""
    model, _ = load_model(config.model, device, quantize=config.quantize)
    linears = target_linears(model, config.target_module_list)
    quantized = any(is_quantized(linear) for linear in linears.values())
    base = {p: dense_weight(l).double().cpu() for p, l in linears.items()}
    reference = {p: w.clone() for p, w in base.items()}
    # merging in the model's dtype, which a 4- or 8-bit layer cannot do
    rounded = {} if quantized else {p: l.weight.detach().clone() for p, l in linears.items()}
    generator = torch.Generator().manual_seed(0)
    for _ in range(rounds):
        stack = {}
        for path, weight in base.items():
            out_features, in_features = weight.shape
            A = torch.randn(clients * config.rank, in_features, generator=generator) * 0.02
            B = torch.randn(out_features, clients * config.rank, generator=generator) * 2e-4
            stack[f"{path}.lora_A.weight"], stack[f"{path}.lora_B.weight"] = A, B
            reference[path] += B.double() @ A.double()
            if path in rounded:
                delta = (B @ A).to(device)
                rounded[path] = (rounded[path].float() + delta).to(rounded[path].dtype)
        merge_lora(model, stack)

    def relative_error(weights):
        error = sum(float((weights[p].double().cpu() - reference[p]).pow(2).sum()) for p in base)
        size = sum(float((reference[p] - base[p]).pow(2).sum()) for p in base)
        return (error / size) ** 0.5

    merged = {p: model.get_submodule(p).weight.detach() for p in base}
    if quantized:
        print(f"flora merge ({rounds} rounds of {clients} x rank {config.rank} into {len(base)} "
              f"{config.quantize} layers on {device}, as fp32 copies of their dequantised "
              f"weights): relative error of the merged delta {relative_error(merged):.2e}",
              flush=True)
        return
    dtype = next(iter(linears.values())).weight.dtype
    print(f"flora merge ({rounds} rounds of {clients} x rank {config.rank} into {len(base)} "
          f"{dtype} layers on {device}): relative error of the merged delta "
          f"{relative_error(merged):.2e} (merging in {dtype}: {relative_error(rounded):.2e})",
          flush=True)


def check_messages(config, device):
    """The ClientApp's train handler, twice in this process, on real plans from FedAvg."""
    from flwr.app import ConfigRecord, Context, RecordDict

    from client.app import train
    from server.dry_run import DryRunGrid, dry_run
    from strategies import build_strategy

    strategy = build_strategy(RunConfig(**{**vars(config), "num_clients": 1}))
    model, _ = load_model(config.model, torch.device("cpu"), quantize=config.quantize)
    arrays = strategy.initialize(model)
    del model
    plan = ConfigRecord({k: v for k, v in config.to_dict().items() if k != "resume"})
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, "num-partitions": config.num_clients,
                                   "device": device.type})
    gc.collect()
    baseline = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    report = []
    with dry_run():  # messages belong to a run
        for server_round in (1, 2):
            message = strategy.configure_train(server_round, arrays, plan, DryRunGrid([1]))[0]
            start = time.perf_counter()
            reply = train(message, context)
            seconds = time.perf_counter() - start
            arrays, _ = strategy.aggregate_train(server_round, [reply])
            if device.type == "cuda":
                left = (torch.cuda.memory_allocated() - baseline) / GiB
                reserved = torch.cuda.memory_reserved() / GiB
                report.append(f"{seconds:.1f} s, {left:.3f} GiB left allocated, "
                              f"{reserved:.2f} GiB reserved")
            else:
                report.append(f"{seconds:.1f} s")
    print(f"messages (ClientApp train handler on {device}): " + "; ".join(report), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=10, help="timed training steps on the device")
    parser.add_argument("--cpu-steps", type=int, default=3, help="timed training steps on the CPU")
    parser.add_argument("--quantize", default="none", choices=("none", "nf4", "int8"),
                        help="the base in 4 or 8 bits through bitsandbytes (QLoRA)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: skipped: torch sees no CUDA device")
        return 0
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"gpu_check on {name} (torch {torch.__version__}, CUDA {torch.version.cuda}), "
          f"model {args.model}, --quantize {args.quantize}", flush=True)
    config = resolved(RunConfig(model=args.model, device=args.device, quantize=args.quantize))
    task = load_task(config)
    examples = client_examples(task, config, 0, config.num_clients)
    adapted, tokenizer = check_training(config, examples, device, args)
    check_evaluation(config, task, adapted, tokenizer, device)
    del adapted
    check_dpsgd(config, examples, device, args)
    check_flora_merge(config, device)
    check_messages(config, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
