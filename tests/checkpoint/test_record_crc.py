"""Every tensor record read is checked against the CRC-32s its zip structure stores.

torch's own loader checks none, so a flipped bit inside a tensor's bytes loaded silently. The
reference for where a record's bytes lie is Python's :mod:`zipfile`, reading the record on its
own; the reference for the values is the Hugging Face original the checkpoint was built from.
"""

from __future__ import annotations

import io
import re
import shutil
import zipfile

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from bridge_ext.checkpoint import CheckpointReader
from bridge_ext.checkpoint.errors import CorruptCheckpointError
from bridge_ext.cli import main

KEY = "decoder.layers.mlp.linear_fc2.weight"  # one chunk per layer at TP=1


def copy_root(qwen3_ckpts, variant, destination):
    return shutil.copytree(qwen3_ckpts / variant, destination)


def member_offset(reader: CheckpointReader, key: str, layer: int, suffix: str):
    """(data file, absolute offset, size) of the member ending in ``suffix`` in ``key``'s chunk of ``layer``."""
    chunk = next(c for c in reader.tensors[key].chunks if c.offsets[0] == layer)
    return record_member(reader.path / chunk.stored.file, chunk.stored.offset, chunk.stored.length, suffix)


def record_member(file, offset: int, length: int, suffix: str):
    """(file, absolute offset, size) of a member's bytes in the zip record at ``offset`` of ``file``."""
    with open(file, "rb") as handle:
        handle.seek(offset)
        record = handle.read(length)
    archive = zipfile.ZipFile(io.BytesIO(record))
    info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    local = info.header_offset  # the local header's name and extra lengths (its extra is torch's padding)
    name_length = int.from_bytes(record[local + 26 : local + 28], "little")
    extra_length = int.from_bytes(record[local + 28 : local + 30], "little")
    return file, offset + local + 30 + name_length + extra_length, info.file_size


def flip_bit(file, offset: int, bit: int = 3) -> None:
    with open(file, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ (1 << bit)]))


def convert(root, hf, out):
    result = CliRunner().invoke(main, ["convert", str(root), "--hf-base", str(hf), "--model-out", str(out)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_flipped_payload_bit_fails_naming_tensor_and_file(qwen3_ckpts, qwen3_hf, tmp_path):
    root = copy_root(qwen3_ckpts, "dense", tmp_path / "ckpt")
    reader = CheckpointReader(root)
    file, start, size = member_offset(reader, KEY, 1, "/data/0")
    flip_bit(file, start + size // 2)

    code, output = convert(root, qwen3_hf, tmp_path / "out")
    assert code == 3, output
    assert re.search(rf"{re.escape(str(file))}: corrupted data for {re.escape(KEY)} chunk at offset \(1, 0, 0\).*"
                     r"CRC-32 mismatch in \S+/data/0", output), output
    assert not (tmp_path / "out").exists()
    assert torch.equal(reader.read_tensor(KEY, 0), CheckpointReader(qwen3_ckpts / "dense").read_tensor(KEY, 0))


def test_flipped_pickle_bit_is_found_too(qwen3_ckpts, tmp_path):
    root = copy_root(qwen3_ckpts, "dense", tmp_path / "ckpt")
    reader = CheckpointReader(root)
    file, start, size = member_offset(reader, KEY, 0, "/data.pkl")
    flip_bit(file, start + size - 2, bit=0)  # inside the pickle, before its STOP opcode
    with pytest.raises(CorruptCheckpointError, match=rf"corrupted data for {re.escape(KEY)} chunk at offset \(0, 0, 0\)") as error:
        reader.read_tensor(KEY, 0)
    assert error.value.path == file


def test_record_that_is_not_what_the_metadata_says(qwen3_ckpts, tmp_path):
    """A record of another size than the metadata's chunk (here: two chunks' records swapped) is refused."""
    root = copy_root(qwen3_ckpts, "dense", tmp_path / "ckpt")
    reader = CheckpointReader(root)
    small = next(iter(reader.tensors["decoder.final_layernorm.weight"].chunks))
    big = next(c for c in reader.tensors[KEY].chunks if c.offsets[0] == 0)
    object.__setattr__(big, "stored", small.stored)  # the metadata now points the fc2 chunk at a norm's record
    with pytest.raises(CorruptCheckpointError, match=rf"{re.escape(KEY)} chunk at offset \(0, 0, 0\).*holds \(64,\)"):
        reader.read_tensor(KEY, 0)


def test_intact_checkpoint_converts_bit_exactly(qwen3_ckpts, qwen3_hf, tmp_path):
    code, output = convert(qwen3_ckpts / "dense", qwen3_hf, tmp_path / "out")
    assert code == 0, output
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    original = load_file(str(qwen3_hf / "model.safetensors"))
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)


def test_flipped_bit_in_a_byte_object_is_found(qwen3_ckpts, tmp_path):
    root = copy_root(qwen3_ckpts, "dense", tmp_path / "ckpt")
    reader = CheckpointReader(root)
    key = "common_state/shard_0_1"
    stored = reader._stored[(key, None)]
    file, start, size = record_member(reader.path / stored.file, stored.offset, stored.length, "/data.pkl")
    flip_bit(file, start + size // 2)
    with pytest.raises(CorruptCheckpointError, match=rf"corrupted data for byte object {key}.*CRC-32 mismatch"):
        reader.common_state()
