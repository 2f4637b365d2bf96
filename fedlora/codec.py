"""Payload codecs: how a dict of tensors travels, and exactly how many values it costs.

A codec is named by a short text, which the payload carries so the receiver decodes without
guessing:

- ``fp32``, ``fp16``, ``bf16``: dense. bf16 travels as its int16 bit pattern (Flower refuses
  torch.bfloat16).
- ``int8``: dense, each tensor scaled by max|x| / 127 and rounded; the scale travels as fp32.
- ``topk:D[,fp16|fp32][,per-tensor]``: the fraction D of entries with the largest magnitude,
  chosen across all tensors of the payload (``global``, the default) or within each tensor,
  as values (fp16 or fp32) plus indices in the smallest unsigned integer type that holds them.
- ``sign``: one bit per value, its sign (+1 for x >= 0, else -1), packed eight to a byte.
  It keeps no magnitude: it serves only Fed-SB's gradient initialisation, whose rule needs
  sign(G) alone (``--fedsb-init-codec``).

``encode`` turns ``{name: tensor}`` into ``{key: numpy array}`` (what an ArrayRecord holds);
``decode`` needs the names and shapes the receiver expects and raises FedLoraError on any
payload that does not fit them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedlora.errors import FedLoraError

DENSE = {"fp32": np.float32, "fp16": np.float16, "bf16": np.int16}
KINDS = ("fp32", "fp16", "bf16", "int8", "topk", "sign")


@dataclass(frozen=True)
class Codec:
    """A parsed codec name."""

    kind: str = "fp32"
    density: float = 1.0  # topk: the fraction of entries kept
    values: str = "fp32"  # topk: the value type, fp32 or fp16
    per_tensor: bool = False  # topk: choose the entries within each tensor

    @classmethod
    def parse(cls, text: str) -> Codec:
        """``fp16`` or ``topk:0.1,fp16,per-tensor``; raises FedLoraError naming the choices."""
        kind, _, options = text.strip().partition(":")
        if kind not in KINDS:
            raise FedLoraError(f"unknown codec '{text}'; valid choices: fp32, fp16, bf16, int8, "
                               "topk:DENSITY[,fp16|fp32][,per-tensor], sign")
        if kind != "topk":
            if options:
                raise FedLoraError(f"codec {kind} takes no options, got '{text}'")
            return cls(kind)
        density, *flags = [part.strip() for part in options.split(",")]
        try:
            fraction = float(density)
        except ValueError:
            fraction = -1.0
        if not 0.0 < fraction <= 1.0:
            raise FedLoraError(f"top-k density must be in (0, 1], got '{density}' in '{text}'")
        unknown = [f for f in flags if f not in ("fp16", "fp32", "per-tensor", "global")]
        if unknown:
            raise FedLoraError(f"unknown top-k option '{unknown[0]}' in '{text}'; "
                               "valid: fp16, fp32, per-tensor, global")
        values = "fp16" if "fp16" in flags else "fp32"
        return cls("topk", fraction, values, "per-tensor" in flags)

    @property
    def name(self) -> str:
        """The canonical text, as the payload carries it. A top-k density is written in
        full (Python's shortest round-trip repr), so that ``parse(name)`` gives back the
        very same float and both ends count the same k = ceil(density * n)."""
        if self.kind != "topk":
            return self.kind
        return f"topk:{float(self.density)!r},{self.values}" + (",per-tensor" if self.per_tensor else "")


def index_dtype(size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every index of ``size`` entries."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def topk_indices(flat: torch.Tensor, density: float) -> torch.Tensor:
    """Indices of the ceil(density * n) entries of largest magnitude (in no set order)."""
    k = max(1, math.ceil(density * flat.numel()))
    return torch.topk(flat.abs(), k, sorted=False).indices


def encode(state: dict[str, torch.Tensor], codec: Codec) -> dict[str, np.ndarray]:
    """The arrays that carry ``state`` under ``codec`` (keys sorted, so both ends agree)."""
    names = sorted(state)
    if codec.kind in DENSE:
        out = {}
        for name in names:
            tensor = state[name].detach().cpu()
            if codec.kind == "bf16":
                out[name] = tensor.to(torch.bfloat16).view(torch.int16).numpy()
            else:
                out[name] = tensor.to(torch.float32).numpy().astype(DENSE[codec.kind])
        return out
    if codec.kind == "sign":
        return {name: np.packbits(state[name].detach().cpu().numpy().reshape(-1) >= 0)
                for name in names}
    if codec.kind == "int8":
        out = {}
        for name in names:
            tensor = state[name].detach().cpu().float()
            scale = float(tensor.abs().max()) / 127 or 1.0
            out[name] = torch.round(tensor / scale).to(torch.int8).numpy()
            out[f"{name}/scale"] = np.array([scale], dtype=np.float32)
        return out
    value_type = np.float16 if codec.values == "fp16" else np.float32
    if codec.per_tensor:
        out = {}
        for name in names:
            flat = state[name].detach().cpu().float().flatten()
            chosen = topk_indices(flat, codec.density)
            out[f"{name}/values"] = _values(flat[chosen], value_type)
            out[f"{name}/indices"] = chosen.numpy().astype(index_dtype(flat.numel()))
        return out
    flat = torch.cat([state[name].detach().cpu().float().flatten() for name in names])
    chosen = topk_indices(flat, codec.density)
    return {"values": _values(flat[chosen], value_type),
            "indices": chosen.numpy().astype(index_dtype(flat.numel()))}


def decode(arrays: dict[str, np.ndarray], codec: Codec,
           shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """fp32 tensors of the expected ``shapes`` from a payload; entries a sparse payload did
    not carry are zero. Raises FedLoraError on keys, types, lengths or indices that do not fit."""
    names = sorted(shapes)
    if codec.kind in DENSE:
        _expect_keys(arrays, names)
        out = {}
        for name in names:
            array = _typed(arrays, name, DENSE[codec.kind], math.prod(shapes[name]))
            # A received array is the receiver's own: share it rather than copy (fp32).
            tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
            if codec.kind == "bf16":
                tensor = tensor.view(torch.bfloat16)
            out[name] = tensor.float().reshape(shapes[name])
        return out
    if codec.kind == "sign":
        _expect_keys(arrays, names)
        out = {}
        for name in names:
            size = math.prod(shapes[name])
            bits = np.unpackbits(_typed(arrays, name, np.uint8, math.ceil(size / 8)))[:size]
            out[name] = torch.from_numpy(bits.astype(np.float32) * 2 - 1).reshape(shapes[name])
        return out
    if codec.kind == "int8":
        _expect_keys(arrays, names + [f"{n}/scale" for n in names])
        out = {}
        for name in names:
            values = _typed(arrays, name, np.int8, math.prod(shapes[name]))
            scale = _typed(arrays, f"{name}/scale", np.float32, 1)
            out[name] = torch.from_numpy(values.astype(np.float32) * scale[0]).reshape(shapes[name])
        return out
    value_type = np.float16 if codec.values == "fp16" else np.float32
    if codec.per_tensor:
        _expect_keys(arrays, [f"{n}/{part}" for n in names for part in ("values", "indices")])
        return {name: _scatter(arrays[f"{name}/values"], arrays[f"{name}/indices"], value_type,
                               math.prod(shapes[name]), codec).reshape(shapes[name])
                for name in names}
    _expect_keys(arrays, ["indices", "values"])
    sizes = [math.prod(shapes[name]) for name in names]
    flat = _scatter(arrays["values"], arrays["indices"], value_type, sum(sizes), codec)
    return {name: part.reshape(shapes[name])
            for name, part in zip(names, torch.split(flat, sizes))}


def _values(values: torch.Tensor, value_type) -> np.ndarray:
    dtype = torch.float16 if value_type is np.float16 else torch.float32
    return values.to(dtype).numpy()


def _expect_keys(arrays: dict, keys: list[str]) -> None:
    if sorted(arrays) != sorted(keys):
        missing = sorted(set(keys) - set(arrays))
        extra = sorted(set(arrays) - set(keys))
        raise FedLoraError(f"payload keys differ: missing {missing[:3]}, unexpected {extra[:3]}")


def _typed(arrays: dict, key: str, dtype, size: int) -> np.ndarray:
    array = arrays[key]
    if array.dtype != np.dtype(dtype) or array.size != size:
        raise FedLoraError(f"payload array {key} is {array.dtype} x {array.size}, "
                           f"expected {np.dtype(dtype)} x {size}")
    return array.reshape(-1)


def _scatter(values: np.ndarray, indices: np.ndarray, value_type, size: int, codec: Codec):
    expected = max(1, math.ceil(codec.density * size))
    if values.dtype != np.dtype(value_type) or indices.dtype != index_dtype(size):
        raise FedLoraError(f"top-k payload has {values.dtype} values and {indices.dtype} "
                           f"indices, expected {np.dtype(value_type)} and {index_dtype(size)}")
    if values.size != expected or indices.size != expected:
        raise FedLoraError(f"top-k payload has {values.size} values and {indices.size} "
                           f"indices, expected {expected} of each")
    index = torch.from_numpy(indices.reshape(-1).astype(np.int64))
    if len(index) and (int(index.max()) >= size or len(torch.unique(index)) != len(index)):
        raise FedLoraError(f"top-k indices repeat or exceed the {size} entries")
    flat = torch.zeros(size)
    flat[index] = torch.from_numpy(values.reshape(-1).astype(np.float32))
    return flat


def encode_payload(state: dict[str, torch.Tensor], codec: Codec) -> tuple[dict[str, np.ndarray], dict]:
    """``state`` as arrays plus the header that names the codec, the tensors and their shapes
    (so the receiver decodes without guessing)."""
    names = sorted(state)
    header = {
        "codec": codec.name,
        "keys": names,
        "shapes": ["x".join(map(str, state[n].shape)) for n in names],
    }
    return encode(state, codec), header


def decode_payload(arrays: dict[str, np.ndarray], header: dict,
                   expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a payload. With ``expected`` (names and shapes the receiver expects),
    a header that names other tensors or shapes is rejected before anything is decoded."""
    codec = Codec.parse(str(header.get("codec", "")))
    keys, shapes = list(header.get("keys", [])), list(header.get("shapes", []))
    if len(keys) != len(shapes):
        raise FedLoraError(f"payload header lists {len(keys)} tensors but {len(shapes)} shapes")
    try:
        declared = {k: tuple(int(d) for d in str(s).split("x") if d) for k, s in zip(keys, shapes)}
    except ValueError:
        raise FedLoraError(f"payload header has a malformed shape among {shapes[:3]}") from None
    if expected is not None:
        missing = sorted(set(expected) - set(declared))
        extra = sorted(set(declared) - set(expected))
        if missing or extra:
            raise FedLoraError(f"payload tensors differ: missing {missing[:3]}, unexpected {extra[:3]}")
        for key, shape in declared.items():
            if shape != tuple(expected[key]):
                raise FedLoraError(f"payload tensor {key} has shape {shape}, "
                                   f"expected {tuple(expected[key])}")
    return decode(arrays, codec, declared)
