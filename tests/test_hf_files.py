"""One listing of a safetensors folder: single file, sharded with an index, adapter file, none."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from bridge_ext.errors import BridgeExtError
from bridge_ext.hf_files import ADAPTER_FILE, INDEX_FILE, StoredTensor, list_safetensors


def test_single_file(tmp_path):
    save_file({"a.weight": torch.zeros(3, 2), "b.bias": torch.zeros(5)}, str(tmp_path / "model.safetensors"))
    assert list_safetensors(tmp_path) == {
        "a.weight": StoredTensor(tmp_path / "model.safetensors", (3, 2)),
        "b.bias": StoredTensor(tmp_path / "model.safetensors", (5,)),
    }


def test_sharded_folder_is_read_through_its_index(tmp_path):
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({"a.weight": torch.zeros(4, 4)}, str(tmp_path / first))
    save_file({"b.weight": torch.zeros(1, 7), "c.weight": torch.zeros(2)}, str(tmp_path / second))
    # A stray single file beside the index is not part of the model.
    save_file({"stray": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    weight_map = {"a.weight": first, "b.weight": second, "c.weight": second}
    (tmp_path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    listed = list_safetensors(tmp_path)
    assert {name: (entry.file.name, entry.shape) for name, entry in listed.items()} == {
        "a.weight": (first, (4, 4)), "b.weight": (second, (1, 7)), "c.weight": (second, (2,))}


def test_adapter_file(tmp_path):
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 8)}, str(tmp_path / ADAPTER_FILE))
    assert list_safetensors(tmp_path, ADAPTER_FILE)["base_model.model.x.lora_A.weight"].shape == (2, 8)


def test_a_folder_without_safetensors_is_named(tmp_path):
    with pytest.raises(BridgeExtError, match=f"{tmp_path} holds neither model.safetensors nor {INDEX_FILE}"):
        list_safetensors(tmp_path)
