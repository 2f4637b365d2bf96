"""Top-k codec speed against a bare torch.topk on the same 10M-element update.

    python benchmarks/codec_speed.py [--elements 10000000] [--density 0.1] [--repeats 5]

The update is a dict of LoRA-shaped tensors totalling --elements values. Reported: the best
of --repeats wall times of (a) torch.topk of |x| on the flattened update, (b) fedlora's
encode and (c) decode with ``topk:DENSITY,fp16``, and the ratios (b)/(a), (b+c)/(a).
"""

from __future__ import annotations

import argparse
import time

import torch

from fedlora.codec import Codec


def best_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=10_000_000)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    module_size = 576 * 8 * 2  # one q_proj LoRA pair of SmolLM2 at r=8: A and B
    state = {}
    for i in range(args.elements // module_size):
        state[f"layer{i}.lora_A.weight"] = torch.randn(8, 576, generator=generator)
        state[f"layer{i}.lora_B.weight"] = torch.randn(576, 8, generator=generator)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    flat = torch.cat([v.flatten() for v in state.values()])
    k = int(args.density * flat.numel())
    codec = Codec.parse(f"topk:{args.density},fp16")
    payload = codec.encode(state)

    bare = best_time(lambda: torch.topk(flat.abs(), k, sorted=False), args.repeats)
    encoding = best_time(lambda: codec.encode(state), args.repeats)
    decoding = best_time(lambda: codec.decode(payload, shapes), args.repeats)
    print(f"{flat.numel():,} elements, density {args.density}, {torch.get_num_threads()} threads")
    print(f"torch.topk      {bare * 1e3:8.1f} ms")
    print(f"encode          {encoding * 1e3:8.1f} ms   {encoding / bare:.2f}x torch.topk")
    print(f"decode          {decoding * 1e3:8.1f} ms")
    print(f"encode + decode {(encoding + decoding) * 1e3:8.1f} ms   "
          f"{(encoding + decoding) / bare:.2f}x torch.topk")


if __name__ == "__main__":
    main()
