"""One listing of a safetensors folder: single file, sharded with an index, adapter file; and the
folders it refuses, each named."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from bridge_ext.errors import BridgeExtError
from bridge_ext.hf_files import ADAPTER_FILE, INDEX_FILE, StoredTensor, index_weight_map, list_safetensors

FIRST, SECOND = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def sharded(folder, weight_map=None):
    save_file({"a.weight": torch.zeros(4, 4)}, str(folder / FIRST))
    save_file({"b.weight": torch.zeros(1, 7), "c.weight": torch.zeros(2)}, str(folder / SECOND))
    weight_map = weight_map or {"a.weight": FIRST, "b.weight": SECOND, "c.weight": SECOND}
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_single_file(tmp_path):
    save_file({"a.weight": torch.zeros(3, 2), "b.bias": torch.zeros(5)}, str(tmp_path / "model.safetensors"))
    assert list_safetensors(tmp_path) == {
        "a.weight": StoredTensor(tmp_path / "model.safetensors", (3, 2)),
        "b.bias": StoredTensor(tmp_path / "model.safetensors", (5,)),
    }


def test_sharded_folder_is_read_through_its_index(tmp_path):
    # A stray single file beside the index is not part of the model.
    save_file({"stray": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    listed = list_safetensors(sharded(tmp_path))
    assert {name: (entry.file.name, entry.shape) for name, entry in listed.items()} == {
        "a.weight": (FIRST, (4, 4)), "b.weight": (SECOND, (1, 7)), "c.weight": (SECOND, (2,))}


def test_adapter_file(tmp_path):
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 8)}, str(tmp_path / ADAPTER_FILE))
    assert list_safetensors(tmp_path, ADAPTER_FILE)["base_model.model.x.lora_A.weight"].shape == (2, 8)


def test_index_outside_the_folder_is_refused(tmp_path):
    (tmp_path / "other").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other" / "model.safetensors"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / INDEX_FILE).write_text(json.dumps({"weight_map": {"x": "../other/model.safetensors"}}))
    with pytest.raises(BridgeExtError, match=r"weight_map points at '\.\./other/model\.safetensors', outside"):
        list_safetensors(tmp_path / "model")


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: (d / INDEX_FILE).write_text("{"), "not valid JSON"),
    (lambda d: (d / INDEX_FILE).write_text('{"weight_map": ["a"]}'), "expected {\"weight_map\""),
    (lambda d: (d / SECOND).write_bytes(b"\xff" * 16), f"{SECOND}: not a readable safetensors file"),
    (lambda d: (os.remove(d / SECOND), os.mkdir(d / SECOND)),
     rf"{SECOND} \(named in .*{INDEX_FILE}\): not a regular file"),
    (lambda d: (d / INDEX_FILE).write_text(json.dumps({"weight_map": {"a.weight": SECOND}})),
     r"1 tensor\(s\) are not in the file the index names, e.g. \['a.weight'\]"),
])
def test_damaged_folder_is_named(tmp_path, damage, message):
    damage(sharded(tmp_path))
    with pytest.raises(BridgeExtError, match=message):
        list_safetensors(tmp_path)


def test_a_folder_without_safetensors_is_named(tmp_path):
    with pytest.raises(BridgeExtError, match=f"{tmp_path}: no model.safetensors and no {INDEX_FILE}"):
        list_safetensors(tmp_path)


def test_verifying_a_folder_without_safetensors_names_it(tmp_path):
    from bridge_ext.errors import VerificationError
    from bridge_ext.verify import folder_tensor_names

    with pytest.raises(VerificationError, match=f"{tmp_path}: no model.safetensors and no {INDEX_FILE}"):
        folder_tensor_names(tmp_path)


def test_an_index_alone_gives_its_names_and_still_refuses_outside_files(tmp_path):
    """A download without weights: the index's names, without the files; a name outside is refused."""
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a.weight": FIRST, "b.weight": SECOND}}))
    assert index_weight_map(tmp_path) == {"a.weight": FIRST, "b.weight": SECOND}
    assert index_weight_map(tmp_path / "missing") is None
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a.weight": "/etc/model.safetensors"}}))
    with pytest.raises(BridgeExtError, match="outside"):
        index_weight_map(tmp_path)
