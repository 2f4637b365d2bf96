"""Payload codecs: how a dict of tensors travels, and exactly how many bytes it costs.

A codec is named by a short text, which the payload carries so the receiver decodes without
guessing. Each kind is one small class, registered in :data:`CODECS` by its name:

- ``fp32``, ``fp16``, ``bf16`` (:class:`FP32`, :class:`FP16`, :class:`BF16`): every value.
  bf16 travels as its int16 bit pattern (Flower refuses torch.bfloat16).
- ``int8`` (:class:`Int8`): every value, each tensor scaled by max|x| / 127 and rounded; the
  scale travels as fp32.
- ``topk:D[,fp16|fp32][,per-tensor]`` (:class:`TopK`): the fraction D of entries with the
  largest magnitude, chosen across all tensors of the payload (``global``, the default) or
  within each tensor, as values (fp16 or fp32) plus indices in the smallest unsigned
  integer type that holds them.
- ``sign`` (:class:`Sign`): one bit per value, its sign (+1 for x >= 0, else -1), packed
  eight to a byte. It keeps no magnitude: it serves only Fed-SB's gradient initialisation,
  whose rule needs sign(G) alone (``--fedsb-init-codec``).

A codec's ``encode`` turns ``{name: tensor}`` into ``{key: numpy array}`` (what an
ArrayRecord holds); ``decode`` needs the names and shapes the receiver expects and raises
FedLoraError on any payload that does not fit them; ``encoded_shapes`` is the keys, dtypes
and shapes of the arrays ``encode`` makes for tensors of given shapes (from which
``payload_bytes`` follows), without any tensor: what the planner counts a 7B model's
messages from. A new codec is a subclass with its ``kind`` registered in :data:`CODECS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from fedlora.errors import FedLoraError

State = dict[str, torch.Tensor]
Shapes = dict[str, tuple[int, ...]]
Encoded = dict[str, tuple[np.dtype, tuple[int, ...]]]  # key -> dtype and shape of an array


class Codec:
    """A payload codec. ``Codec.parse(text)`` gives the registered codec a name stands for."""

    kind: ClassVar[str] = ""
    options: ClassVar[str] = ""  # how its options are written after the ':', for help texts
    keeps_magnitudes: ClassVar[bool] = True  # False: only Fed-SB's sign vote can use it

    @staticmethod
    def parse(text: str) -> Codec:
        """``fp16`` or ``topk:0.1,fp16,per-tensor``; raises FedLoraError naming the choices."""
        kind, _, options = text.strip().partition(":")
        if kind not in CODECS:
            raise FedLoraError(f"unknown codec '{text}'; valid choices: {choices()}")
        return CODECS[kind].from_options(options, text)

    @classmethod
    def from_options(cls, options: str, text: str) -> Codec:
        """The codec with the options after its ':' (``text`` is the whole name); none by
        default."""
        if options:
            raise FedLoraError(f"codec {cls.kind} takes no options, got '{text}'")
        return cls()

    @property
    def name(self) -> str:
        """The canonical text, as the payload carries it: ``parse(name)`` gives it back."""
        return self.kind

    @property
    def separate(self) -> bool:
        """Whether each tensor encodes to arrays of its own (so two zero tensors of one
        shape encode to equal arrays, which Flower sends once: the planner counts a fresh
        LoRA's B so); a global top-k mixes all tensors into one pair of arrays."""
        return True

    def encode(self, state: State) -> dict[str, np.ndarray]:
        """The arrays that carry ``state`` (keys sorted, so both ends agree)."""
        raise NotImplementedError

    def decode(self, arrays: dict[str, np.ndarray], shapes: Shapes) -> State:
        """fp32 tensors of the expected ``shapes`` from a payload; FedLoraError on keys, types,
        lengths or indices that do not fit."""
        raise NotImplementedError

    def encoded_shapes(self, shapes: Shapes) -> Encoded:
        """The key, dtype and shape of each array that ``encode`` makes of tensors of
        ``shapes``."""
        raise NotImplementedError

    def payload_bytes(self, shapes: Shapes) -> int:
        """The bytes of the arrays that ``encode`` makes of tensors of ``shapes``."""
        return sum(math.prod(shape) * dtype.itemsize
                   for dtype, shape in self.encoded_shapes(shapes).values())


class Dense(Codec):
    """Every value, as ``dtype`` (a subclass per type)."""

    dtype: ClassVar[type] = np.float32

    def encode(self, state: State) -> dict[str, np.ndarray]:
        return {name: self.to_array(state[name].detach().cpu()) for name in sorted(state)}

    def decode(self, arrays: dict[str, np.ndarray], shapes: Shapes) -> State:
        names = sorted(shapes)
        _expect_keys(arrays, names)
        out = {}
        for name in names:
            array = _typed(arrays, name, self.dtype, math.prod(shapes[name]))
            # A received array is the receiver's own: share it rather than copy (fp32).
            tensor = self.from_array(array if array.flags.writeable else array.copy())
            out[name] = tensor.float().reshape(shapes[name])
        return out

    def encoded_shapes(self, shapes: Shapes) -> Encoded:
        return {name: (np.dtype(self.dtype), tuple(shapes[name])) for name in sorted(shapes)}

    def to_array(self, tensor: torch.Tensor) -> np.ndarray:
        return tensor.to(torch.float32).numpy().astype(self.dtype)

    def from_array(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array)


@dataclass(frozen=True)
class FP32(Dense):
    """Every value as fp32: exact."""

    kind: ClassVar[str] = "fp32"
    dtype: ClassVar[type] = np.float32


@dataclass(frozen=True)
class FP16(Dense):
    """Every value as fp16."""

    kind: ClassVar[str] = "fp16"
    dtype: ClassVar[type] = np.float16


@dataclass(frozen=True)
class BF16(Dense):
    """Every value as bf16, carried as its int16 bit pattern (Flower refuses bfloat16)."""

    kind: ClassVar[str] = "bf16"
    dtype: ClassVar[type] = np.int16

    def to_array(self, tensor: torch.Tensor) -> np.ndarray:
        return tensor.to(torch.bfloat16).view(torch.int16).numpy()

    def from_array(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).view(torch.bfloat16)


@dataclass(frozen=True)
class Int8(Codec):
    """Every value as an int8 step of max|x| / 127 (per tensor), the step as fp32."""

    kind: ClassVar[str] = "int8"

    def encode(self, state: State) -> dict[str, np.ndarray]:
        out = {}
        for name in sorted(state):
            tensor = state[name].detach().cpu().float()
            scale = float(tensor.abs().max()) / 127 or 1.0
            out[name] = torch.round(tensor / scale).to(torch.int8).numpy()
            out[f"{name}/scale"] = np.array([scale], dtype=np.float32)
        return out

    def decode(self, arrays: dict[str, np.ndarray], shapes: Shapes) -> State:
        names = sorted(shapes)
        _expect_keys(arrays, names + [f"{n}/scale" for n in names])
        out = {}
        for name in names:
            values = _typed(arrays, name, np.int8, math.prod(shapes[name]))
            scale = _typed(arrays, f"{name}/scale", np.float32, 1)
            out[name] = torch.from_numpy(values.astype(np.float32) * scale[0]).reshape(shapes[name])
        return out

    def encoded_shapes(self, shapes: Shapes) -> Encoded:
        out = {}
        for name in sorted(shapes):
            out[name] = (np.dtype(np.int8), tuple(shapes[name]))
            out[f"{name}/scale"] = (np.dtype(np.float32), (1,))
        return out


@dataclass(frozen=True)
class TopK(Codec):
    """The fraction ``density`` of entries of largest magnitude, as values and indices."""

    density: float = 1.0  # the fraction of entries kept
    values: str = "fp32"  # the value type, fp32 or fp16
    per_tensor: bool = False  # choose the entries within each tensor, not across all

    kind: ClassVar[str] = "topk"
    options: ClassVar[str] = "DENSITY[,fp16|fp32][,per-tensor]"

    @classmethod
    def from_options(cls, options: str, text: str) -> Codec:
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
        return cls(fraction, "fp16" if "fp16" in flags else "fp32", "per-tensor" in flags)

    @property
    def name(self) -> str:
        """The density is written in full (Python's shortest round-trip repr), so that
        ``parse(name)`` gives back the very same float and both ends count the same
        k = ceil(density * n)."""
        return f"topk:{float(self.density)!r},{self.values}" + (",per-tensor" if self.per_tensor else "")

    @property
    def separate(self) -> bool:
        return self.per_tensor

    @property
    def value_type(self) -> type:
        return np.float16 if self.values == "fp16" else np.float32

    def encode(self, state: State) -> dict[str, np.ndarray]:
        names = sorted(state)
        if self.per_tensor:
            out = {}
            for name in names:
                flat = state[name].detach().cpu().float().flatten()
                chosen = topk_indices(flat, self.density)
                out[f"{name}/values"] = self._values(flat[chosen])
                out[f"{name}/indices"] = chosen.numpy().astype(index_dtype(flat.numel()))
            return out
        flat = torch.cat([state[name].detach().cpu().float().flatten() for name in names])
        chosen = topk_indices(flat, self.density)
        return {"values": self._values(flat[chosen]),
                "indices": chosen.numpy().astype(index_dtype(flat.numel()))}

    def decode(self, arrays: dict[str, np.ndarray], shapes: Shapes) -> State:
        names = sorted(shapes)
        if self.per_tensor:
            _expect_keys(arrays, [f"{n}/{part}" for n in names for part in ("values", "indices")])
            return {name: self._scatter(arrays[f"{name}/values"], arrays[f"{name}/indices"],
                                        math.prod(shapes[name])).reshape(shapes[name])
                    for name in names}
        _expect_keys(arrays, ["indices", "values"])
        sizes = [math.prod(shapes[name]) for name in names]
        flat = self._scatter(arrays["values"], arrays["indices"], sum(sizes))
        return {name: part.reshape(shapes[name])
                for name, part in zip(names, torch.split(flat, sizes))}

    def encoded_shapes(self, shapes: Shapes) -> Encoded:
        names = sorted(shapes)
        groups = ({f"{name}/": math.prod(shapes[name]) for name in names} if self.per_tensor
                  else {"": sum(math.prod(shapes[name]) for name in names)})
        out = {}
        for prefix, size in groups.items():
            out[f"{prefix}values"] = (np.dtype(self.value_type), (kept(self.density, size),))
            out[f"{prefix}indices"] = (index_dtype(size), (kept(self.density, size),))
        return out

    def _values(self, values: torch.Tensor) -> np.ndarray:
        return values.to(torch.float16 if self.values == "fp16" else torch.float32).numpy()

    def _scatter(self, values: np.ndarray, indices: np.ndarray, size: int) -> torch.Tensor:
        expected = kept(self.density, size)
        if values.dtype != np.dtype(self.value_type) or indices.dtype != index_dtype(size):
            raise FedLoraError(f"top-k payload has {values.dtype} values and {indices.dtype} "
                               f"indices, expected {np.dtype(self.value_type)} and {index_dtype(size)}")
        if values.size != expected or indices.size != expected:
            raise FedLoraError(f"top-k payload has {values.size} values and {indices.size} "
                               f"indices, expected {expected} of each")
        index = torch.from_numpy(indices.reshape(-1).astype(np.int64))
        if len(index) and int(index.max()) >= size:
            raise FedLoraError(f"top-k indices exceed the {size} entries")
        written = torch.zeros(size, dtype=torch.bool)  # repeats write fewer entries (no sort)
        written[index] = True
        if int(written.sum()) != len(index):
            raise FedLoraError(f"top-k indices repeat: {len(index)} indices, "
                               f"{int(written.sum())} distinct")
        flat = torch.zeros(size)
        flat[index] = torch.from_numpy(values.reshape(-1).astype(np.float32))
        return flat


@dataclass(frozen=True)
class Sign(Codec):
    """One bit per value, its sign, packed eight to a byte; decoded as +-1."""

    kind: ClassVar[str] = "sign"
    keeps_magnitudes: ClassVar[bool] = False

    def encode(self, state: State) -> dict[str, np.ndarray]:
        return {name: np.packbits(state[name].detach().cpu().numpy().reshape(-1) >= 0)
                for name in sorted(state)}

    def decode(self, arrays: dict[str, np.ndarray], shapes: Shapes) -> State:
        names = sorted(shapes)
        _expect_keys(arrays, names)
        out = {}
        for name in names:
            size = math.prod(shapes[name])
            bits = np.unpackbits(_typed(arrays, name, np.uint8, math.ceil(size / 8)))[:size]
            out[name] = torch.from_numpy(bits.astype(np.float32) * 2 - 1).reshape(shapes[name])
        return out

    def encoded_shapes(self, shapes: Shapes) -> Encoded:
        return {name: (np.dtype(np.uint8), (math.ceil(math.prod(shapes[name]) / 8),))
                for name in sorted(shapes)}


CODECS: dict[str, type[Codec]] = {cls.kind: cls for cls in (FP32, FP16, BF16, Int8, TopK, Sign)}


def choices(magnitudes_only: bool = False) -> str:
    """The registered codecs as a user writes them (``topk:DENSITY[...]``), for messages;
    with ``magnitudes_only``, those that keep magnitudes (every codec but sign)."""
    return ", ".join(kind + (f":{cls.options}" if cls.options else "")
                     for kind, cls in CODECS.items()
                     if cls.keeps_magnitudes or not magnitudes_only)


def kept(density: float, size: int) -> int:
    """How many of ``size`` entries a top-k of ``density`` keeps: ceil(density * size), at
    least one."""
    return max(1, math.ceil(density * size))


def index_dtype(size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every index of ``size`` entries."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def topk_indices(flat: torch.Tensor, density: float) -> torch.Tensor:
    """Indices of the ceil(density * n) entries of largest magnitude (in no set order)."""
    return torch.topk(flat.abs(), kept(density, flat.numel()), sorted=False).indices


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


def encode_payload(state: State, codec: Codec) -> tuple[dict[str, np.ndarray], dict]:
    """``state`` as arrays plus the header that names the codec, the tensors and their shapes
    (so the receiver decodes without guessing). Nothing non-finite is sent: a NaN would
    travel as a sign's -1 or an int8's clipped step (FedLoraError)."""
    for name, tensor in state.items():  # an fp64 sum of finite values cannot overflow
        if not torch.isfinite(tensor.detach().sum(dtype=torch.float64)):
            raise FedLoraError(f"tensor {name} holds NaN or Inf; nothing non-finite is sent")
    return codec.encode(state), payload_header(state, codec)


def payload_header(state: State, codec: Codec) -> dict:
    """The header of ``state``'s payload: the codec's name, the tensors' names and shapes."""
    names = sorted(state)
    return {"codec": codec.name, "keys": names,
            "shapes": ["x".join(map(str, state[n].shape)) for n in names]}


def decode_payload(arrays: dict[str, np.ndarray], header: dict,
                   expected: Shapes | None = None) -> State:
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
    return codec.decode(arrays, declared)
