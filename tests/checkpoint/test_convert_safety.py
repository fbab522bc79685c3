"""``bridge-ext convert`` on inputs that used to pass silently or crash: malformed names,
run_config.yaml that is not a file, numbers out of range, configs that lie about fields
shapes cannot see, and ``--overwrite`` of folders that are no earlier output.

Full-message asserts, as in test_convert_bad_input.py, whose helpers these tests share.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from bridge_ext.cli import EXIT_CHECKPOINT, EXIT_MISMATCH
from test_convert_bad_input import ITER, assert_nothing_written, convert, copy_checkpoint, hf_base_copy


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


# ---------------------------------------------------------------- malformed names
def test_nul_byte_in_a_data_file_name_is_malformed_metadata(qwen3_ckpts, tmp_path, out):
    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)
    metadata_file = root / ITER / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())  # our own test file
    first = next(iter(metadata.storage_data))
    metadata.storage_data[first].relative_path = "__0_0.distcp\x00x"
    metadata_file.write_bytes(pickle.dumps(metadata))
    code, message = convert(root, "--model-out", out / "model")
    assert code == EXIT_CHECKPOINT, message
    assert message == (f"error: {metadata_file}: the data file name '__0_0.distcp\\x00x' holds a NUL byte, "
                       "which no file name can"), message
    assert_nothing_written(out)


def test_nul_byte_in_an_index_file_name_is_malformed_input(qwen3_ckpts, qwen3_hf, tmp_path, out):
    from safetensors import safe_open

    base = hf_base_copy(qwen3_hf, tmp_path)
    with safe_open(str(base / "model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    index = base / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(names, "model.safetensors\x00x")}))
    code, message = convert(qwen3_ckpts / "adapter", "--hf-base", base, "--model-out", out / "model", "--merge")
    assert code == EXIT_MISMATCH, message
    assert message == (f"error: {index}: the file name 'model.safetensors\\x00x' holds a NUL byte, "
                       "which no file name can"), message
    assert_nothing_written(out)


# ---------------------------------------------------------------- run_config.yaml that is not a file
@pytest.mark.parametrize("kind", ["a directory", "a pipe"])
def test_run_config_that_is_not_a_file_is_named_not_taken_as_absent(qwen3_ckpts, qwen3_hf, tmp_path, out, kind):
    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)
    run_config = root / ITER / "run_config.yaml"
    run_config.unlink()
    run_config.mkdir() if kind == "a directory" else os.mkfifo(run_config)
    code, message = convert(root, "--hf-base", qwen3_hf, "--model-out", out / "model")
    assert code == EXIT_CHECKPOINT, message
    named = "a directory, where a file is expected" if kind == "a directory" else "not a regular file (a pipe)"
    assert message == f"error: {run_config}: {named}", message
    assert_nothing_written(out)


# ---------------------------------------------------------------- numbers
def with_run_config(root: Path, tmp_path: Path, section: str, **changes) -> Path:
    import yaml

    copy = copy_checkpoint(root, tmp_path)
    file = copy / ITER / "run_config.yaml"
    settings = yaml.safe_load(file.read_text())
    settings[section].update(changes)
    file.write_text(yaml.safe_dump(settings))
    return copy


@pytest.mark.parametrize(("field", "value", "wanted"), [
    ("alpha", float("nan"), "nan; it must be a finite number above 0"),
    ("alpha", float("inf"), "inf; it must be a finite number above 0"),
    ("alpha", -8, "-8; it must be a finite number above 0"),
    ("dropout", 7.5, "7.5; it must be a probability from 0 to 1"),
    ("dim", 4.5, "4.5; it must be an integer of at least 1"),
    ("dim", True, "True; it must be an integer of at least 1"),
])
def test_lora_numbers_out_of_range_are_refused(qwen3_ckpts, tmp_path, out, field, value, wanted):
    root = with_run_config(qwen3_ckpts / "lora", tmp_path, "peft", **{field: value})
    code, message = convert(root, "--adapter-out", out / "adapter", "--model-out", out / "model")
    assert code == EXIT_CHECKPOINT, message
    assert message == f"error: {root / ITER / 'run_config.yaml'}: peft.{field} is {wanted}", message
    assert_nothing_written(out)


def test_a_live_adapter_config_with_a_nan_alpha_is_refused():
    from types import SimpleNamespace

    from bridge_ext.errors import ExportError
    from bridge_ext.peft_config import _check_lora_numbers
    from bridge_ext.source import Adapter

    adapter = Adapter(module="decoder.layers.0.mlp.linear_fc1", lora_a="a", lora_b="b", alpha=float("nan"),
                      rank=4, dropout=1.5)
    with pytest.raises(ExportError) as refused:
        _check_lora_numbers(adapter)
    assert str(refused.value) == ("LoRA adapter of decoder.layers.0.mlp.linear_fc1: alpha nan (must be a finite "
                                  "number above 0), dropout 1.5 (must be a probability from 0 to 1); "
                                  "PEFT cannot load it")
    _check_lora_numbers(SimpleNamespace(module="m", rank=4, alpha=8.0, dropout=0.1))  # accepted


def test_a_config_with_a_nan_is_not_written_as_non_standard_json(qwen3_ckpts, qwen3_hf, tmp_path, out):
    base = hf_base_copy(qwen3_hf, tmp_path)
    settings = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**settings, "initializer_range": float("nan")}))
    code, message = convert(qwen3_ckpts / "dense", "--hf-base", base, "--model-out", out / "model")
    assert code == EXIT_MISMATCH, message
    assert message == ("error: the Hugging Face config holds a non-finite number (initializer_range = nan); "
                       "config.json would not be standard JSON"), message
    assert_nothing_written(out)
