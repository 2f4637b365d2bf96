"""Model loading: packaged names, GGUF files, Hugging Face folders, the cache."""

import os

import pytest
import torch

from fedlora.errors import FedLoraError
from fedlora.models import _smollm2_file, load_model, pick_device, resolve_model


def test_hf_folder_loads_frozen_in_eval_mode(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), torch.device("cpu"))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token is not None


def test_a_gguf_file_is_dequantised_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    gguf = _smollm2_file()
    folder = resolve_model(str(gguf))
    assert folder.parent == tmp_path / "models" and (folder / "config.json").is_file()
    stamp = os.stat(folder / "config.json").st_mtime_ns
    assert resolve_model(str(gguf)) == folder  # cached: not converted again
    assert os.stat(folder / "config.json").st_mtime_ns == stamp
    model, tokenizer = load_model(str(gguf), torch.device("cpu"))
    assert model.config.model_type == "llama" and len(tokenizer) == 49152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not hasattr(model.config, "quantization_config")


def test_device_choice():
    assert pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert pick_device("auto").type == "cpu"
        with pytest.raises(FedLoraError, match="--device cuda was asked for"):
            pick_device("cuda")
