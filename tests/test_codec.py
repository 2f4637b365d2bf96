"""Payload codecs: round trips, error bounds, top-k selection, bytes, hostile payloads."""

import math

import numpy as np
import pytest
import torch

from flwr.app import ArrayRecord, RecordDict

from fedlora.codec import Codec, decode_payload, encode_payload, index_dtype
from fedlora.errors import FedLoraError
from server.dry_run import DryRunGrid

SHAPES = {"b.lora_B.weight": (64, 8), "a.lora_A.weight": (8, 96), "c.lora_R.weight": (8, 8)}


@pytest.fixture
def state():
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g) for k, shape in SHAPES.items()}


def round_trip(state, text):
    codec = Codec.parse(text)
    return codec.decode(codec.encode(state), {k: tuple(v.shape) for k, v in state.items()})


def test_fp32_is_exact(state):
    out = round_trip(state, "fp32")
    assert all(torch.equal(out[k], state[k]) for k in state)


@pytest.mark.parametrize("text, relative", [("fp16", 2**-11), ("bf16", 2**-8)])
def test_half_precisions_within_their_rounding(state, text, relative):
    out = round_trip(state, text)
    for k in state:
        assert ((out[k] - state[k]).abs() <= relative * state[k].abs() + 1e-7).all()
        assert out[k].dtype == torch.float32


def test_int8_error_is_at_most_half_a_step(state):
    out = round_trip(state, "int8")
    for k in state:
        step = state[k].abs().max() / 127
        assert (out[k] - state[k]).abs().max() <= step / 2 + 1e-7


@pytest.mark.parametrize("text", ["topk:0.1,fp32", "topk:0.25,fp32,per-tensor"])
def test_topk_keeps_exactly_the_k_largest_magnitudes(state, text):
    codec = Codec.parse(text)
    out = round_trip(state, text)
    groups = [[k] for k in sorted(state)] if codec.per_tensor else [sorted(state)]
    for names in groups:
        sent = torch.cat([state[k].flatten() for k in names])
        got = torch.cat([out[k].flatten() for k in names])
        k = int(np.ceil(codec.density * sent.numel()))
        kept = got != 0
        assert int(kept.sum()) == k
        assert torch.equal(got[kept], sent[kept])  # kept entries are exact in fp32
        assert sent[kept].abs().min() >= sent[~kept].abs().max()  # and they are the largest


def test_sparse_payload_bytes_are_values_plus_indices_plus_fixed_overhead(state):
    """Serialized bytes = kept entries x (value size + index size) + an overhead that is
    fixed but for protobuf's varint length prefix of each array's data (one more byte once
    an array's data passes 128, 16384, ... bytes)."""
    from flwr.app import Array

    from server.transport import serialized_bytes  # the count the run reports

    total = sum(v.numel() for v in state.values())  # 1352 entries: indices fit uint16
    assert index_dtype(total) == np.uint16

    def size(density, values):
        arrays = Codec.parse(f"topk:{density},{values}").encode(state)
        assert arrays["indices"].dtype == np.uint16
        return serialized_bytes(RecordDict({"arrays": ArrayRecord(
            {k: Array(a) for k, a in arrays.items()})}))

    for values, value_size in (("fp32", 4), ("fp16", 2)):
        overheads = []
        for density in (0.1, 0.2, 0.3, 0.6):
            k = int(np.ceil(density * total))
            overheads.append(size(density, values) - k * (value_size + 2))
        assert max(overheads) - min(overheads) <= 2  # two arrays: values and indices


@pytest.mark.parametrize("text", ["fp32", "fp16", "bf16", "int8", "sign", "topk:0.1", "topk:0.37,fp16",
                                  "topk:0.05,per-tensor", "topk:1e-4,fp16,per-tensor"])
def test_a_codec_describes_its_payload_from_shapes_alone(state, text):
    """encoded_shapes (what the planner counts a 7B model's messages from) names every
    array encode makes, with its dtype and shape; payload_bytes follows from it."""
    codec = Codec.parse(text)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    encoded = codec.encode(state)
    assert codec.encoded_shapes(shapes) == {k: (a.dtype, a.shape) for k, a in encoded.items()}
    assert codec.payload_bytes(shapes) == sum(a.nbytes for a in encoded.values())


def test_a_new_codec_is_one_registered_class(state, monkeypatch):
    """A codec outside fedlora: halves every value on the way (a toy, but it travels)."""
    from dataclasses import dataclass
    from typing import ClassVar

    from fedlora import codec as codecs

    @dataclass(frozen=True)
    class Halved(codecs.Codec):
        kind: ClassVar[str] = "halved"

        def encode(self, tensors):
            return {k: (v / 2).numpy() for k, v in sorted(tensors.items())}

        def decode(self, arrays, shapes):
            return {k: torch.from_numpy(arrays[k] * 2).reshape(shapes[k]) for k in sorted(shapes)}

    monkeypatch.setitem(codecs.CODECS, "halved", Halved)
    payload, header = encode_payload(state, Codec.parse("halved"))
    assert header["codec"] == "halved"
    for key, value in decode_payload(payload, header, {k: tuple(v.shape) for k, v in state.items()}).items():
        torch.testing.assert_close(value, state[key])


def test_index_type_is_the_smallest_that_fits():
    assert index_dtype(256) == np.uint8 and index_dtype(257) == np.uint16
    assert index_dtype(65536) == np.uint16 and index_dtype(65537) == np.uint32


@pytest.mark.parametrize("text, message", [
    ("gzip", "unknown codec 'gzip'; valid choices: fp32, fp16, bf16, int8, topk"),
    ("topk:1.5", "top-k density must be in (0, 1]"),
    ("topk:abc", "top-k density must be in (0, 1]"),
    ("topk:0.1,fp8", "unknown top-k option 'fp8'"),
    ("fp16:0.5", "codec fp16 takes no options"),
])
def test_bad_codec_names(text, message):
    with pytest.raises(FedLoraError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Codec.parse(text)


def test_names_are_canonical():
    assert Codec.parse("topk:0.10,fp16").name == "topk:0.1,fp16"
    assert Codec.parse(Codec.parse("topk:0.5,per-tensor").name) == Codec.parse("topk:0.5,fp32,per-tensor")


def test_hostile_payloads_are_rejected_with_a_reason(state):
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    sparse = Codec.parse("topk:0.1,fp32")
    good = sparse.encode(state)
    cases = [  # (payload, what the error says)
        ({"values": good["values"]}, "payload keys differ"),
        ({**good, "values": good["values"][:-1]}, "134 values and 135 indices, expected 135 of each"),
        ({**good, "indices": good["indices"].astype(np.int64)}, "int64 indices, expected"),
        ({**good, "indices": np.full_like(good["indices"], 60000)}, "indices exceed the"),
        ({**good, "indices": np.zeros_like(good["indices"])}, "indices repeat: 135 indices, 1 distinct"),
    ]
    for arrays, message in cases:
        with pytest.raises(FedLoraError, match=message):
            sparse.decode(arrays, shapes)
    dense = Codec.parse("fp16").encode(state)
    with pytest.raises(FedLoraError, match="expected float16"):
        Codec.parse("fp16").decode(
            {**dense, "c.lora_R.weight": dense["c.lora_R.weight"].astype(np.float32)}, shapes)


def test_reported_bytes_are_flowers_serialization_of_the_content(task_identity):
    """payload_bytes (what metrics.jsonl sums) = Flower's serialized message minus the
    message's own envelope (ids, timestamps), for a real round-1 message of each codec."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from fedlora.config import RunConfig
    from server.transport import payload_bytes
    from strategies.fedavg import FedAvgLoRA

    g = torch.Generator().manual_seed(0)
    global_state = {f"l{i}.lora_{x}.weight": torch.randn(shape, generator=g)
                    for i in range(4) for x, shape in (("A", (8, 96)), ("B", (64, 8)))}
    for codec in ("fp32", "fp16", "int8", "topk:0.1,fp16"):
        strategy = FedAvgLoRA(download_codec=codec)
        [message] = strategy.configure_train(1, ArrayRecord(global_state), RunConfig().to_dict(),
                                             DryRunGrid([7]))
        whole = sum(len(o.deflate()) for o in get_all_nested_objects(message).values())
        envelope = len(message.deflate())
        assert payload_bytes(message) == whole - envelope
        assert envelope < 1200  # Flower's ~1.1 KB of ids and headers per message


def test_sign_codec_is_one_bit_per_value_and_decodes_to_plus_or_minus_one():
    g = torch.Generator().manual_seed(0)
    state = {"g": torch.randn(7, 9, generator=g), "h": torch.tensor([0.0, -0.0, 2.0, -3.0, 1e-30])}
    payload, header = encode_payload(state, Codec.parse("sign"))
    assert payload["g"].dtype == np.uint8 and payload["g"].size == math.ceil(63 / 8)
    assert payload["h"].size == 1
    decoded = decode_payload(payload, header, {"g": (7, 9), "h": (5,)})
    assert torch.equal(decoded["g"], torch.where(state["g"] >= 0, 1.0, -1.0))
    assert decoded["h"].tolist() == [1.0, 1.0, 1.0, -1.0, 1.0]
    with pytest.raises(FedLoraError, match="expected uint8 x 8"):
        decode_payload({**payload, "g": np.zeros(9, dtype=np.uint8)}, header)


def test_sign_is_refused_for_training_payloads():
    from fedlora.config import RunConfig

    with pytest.raises(FedLoraError, match="--upload-codec sign keeps no magnitudes"):
        RunConfig(upload_codec="sign").validate()
    with pytest.raises(FedLoraError, match="--fedsb-init-codec int8: valid choices: fp32, fp16, bf16, sign"):
        RunConfig(fedsb_init_codec="int8").validate()
