"""The streaming safetensors writer: header from the layout first, each tensor written at its offset.

The reference is safetensors itself: its loader (``safe_open``) must read back every tensor
bit-exactly, and the files must follow its format (8-byte header length, JSON header with
``__metadata__``, padded with spaces to 8 bytes, data without gaps, each tensor aligned to its
element size).
"""

from __future__ import annotations

import json
import struct
import weakref

import pytest
import torch
from safetensors import safe_open

from bridge_ext.checkpoint.read_ahead import ReadAhead
from bridge_ext.convert import convert_checkpoint
from bridge_ext.errors import ExportError
from bridge_ext.hf_folder import INDEX_FILE, SINGLE_FILE, SafetensorsFile, ShardedSafetensorsWriter, TensorSpec


def sample_tensors() -> dict[str, torch.Tensor]:
    """Mixed dtypes and odd sizes, so that alignment and ordering matter."""
    generator = torch.Generator().manual_seed(0)
    return {
        "model.norm.weight": torch.randn(7, generator=generator).to(torch.bfloat16),
        "a.bias": torch.randn(3, generator=generator),  # fp32 after an odd number of bf16 values
        "b.count": torch.tensor(5, dtype=torch.int64),  # 0-dim
        "c.mask": torch.tensor([True, False, True]),
        "d.half": torch.randn(5, 3, generator=generator).to(torch.float16),
        "e.empty": torch.empty(0, 4),
        "f.weight": torch.randn(33, 17, generator=generator).to(torch.bfloat16),
        "g.double": torch.randn(2, 2, generator=generator, dtype=torch.float64),
    }


def read_header(path) -> tuple[int, dict]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        text = handle.read(length)
    assert text == text.rstrip(b" ") + b" " * (len(text) - len(text.rstrip(b" ")))  # padded with spaces only
    return length, json.loads(text)


def test_file_loads_bit_exactly_and_follows_the_format(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "x.safetensors"
    file = SafetensorsFile(path, [TensorSpec.of(name, t) for name, t in tensors.items()], {"format": "pt"})
    for name in reversed(list(tensors)):  # any order: each tensor lands at its own offset
        file.write(name, tensors[name])
    file.close()

    length, header = read_header(path)
    assert length % 8 == 0
    assert header.pop("__metadata__") == {"format": "pt"}
    spans = sorted((info["data_offsets"], name) for name, info in header.items())
    assert spans[0][0][0] == 0 and all(a[0][1] == b[0][0] for a, b in zip(spans, spans[1:]))  # no gap, no overlap
    assert path.stat().st_size == 8 + length + spans[-1][0][1]
    for (start, _), name in spans:
        assert (8 + length + start) % tensors[name].element_size() == 0, name
    with safe_open(str(path), "pt") as handle:
        assert set(handle.keys()) == set(tensors)
        for name, tensor in tensors.items():
            loaded = handle.get_tensor(name)
            assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape, name
            assert torch.equal(loaded.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("max_shard_bytes", [1, 120, 10**9])
def test_planned_shards_equal_the_collected_ones(tmp_path, max_shard_bytes):
    """With a layout the shard split, names and index are those of the collecting writer."""
    tensors = sample_tensors()
    folders = {}
    for mode in ("collect", "stream"):
        folder = folders[mode] = tmp_path / mode
        folder.mkdir()
        layout = [TensorSpec.of(name, t) for name, t in tensors.items()] if mode == "stream" else None
        writer = ShardedSafetensorsWriter(folder, max_shard_bytes, layout=layout)
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.close()
    files = sorted(p.name for p in folders["stream"].iterdir())
    assert files == sorted(p.name for p in folders["collect"].iterdir())
    assert (files == [SINGLE_FILE]) == (max_shard_bytes == 10**9)
    if INDEX_FILE in files:
        index = json.loads((folders["stream"] / INDEX_FILE).read_text())
        assert index == json.loads((folders["collect"] / INDEX_FILE).read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(str(folders["stream"] / name), "pt") as a, safe_open(str(folders["collect"] / name), "pt") as b:
                assert set(a.keys()) == set(b.keys())
                for key in a.keys():
                    assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_streaming_writer_keeps_no_tensor(tmp_path):
    """Memory is bounded by the tensors in flight: a written tensor is not referenced by the writer."""
    tensors = sample_tensors()
    writer = ShardedSafetensorsWriter(tmp_path, 10**9, layout=[TensorSpec.of(n, t) for n, t in tensors.items()])
    name = "f.weight"
    tensor = tensors.pop(name)
    alive = weakref.ref(tensor)
    writer.add(name, tensor)
    del tensor
    assert alive() is None


def test_writer_refuses_what_the_layout_does_not_say(tmp_path):
    tensors = sample_tensors()
    layout = [TensorSpec.of(n, t) for n, t in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path, 10**9, layout=layout)
    with pytest.raises(ExportError, match=r"f\.weight: planned as torch\.bfloat16 \(33, 17\), produced as torch\.float32"):
        writer.add("f.weight", tensors["f.weight"].float())
    with pytest.raises(ExportError, match="not in the planned layout"):
        writer.add("unknown.weight", torch.zeros(1))
    writer.add("a.bias", tensors["a.bias"])
    with pytest.raises(ExportError, match="a.bias was written twice"):
        writer.add("a.bias", tensors["a.bias"])
    with pytest.raises(ExportError, match="planned tensor.*never written"):
        writer.close()


@pytest.mark.parametrize("variant, merge", [("dense", False), ("lora", True)])
def test_convert_streams_and_reads_ahead_without_a_miss(qwen3_ckpts, qwen3_hf, tmp_path, monkeypatch,
                                                         variant, merge):
    """The checkpoint path plans every shard (nothing collected) and reads exactly in the stream's order."""
    def no_collecting(self):
        raise AssertionError("a shard was collected in memory")

    monkeypatch.setattr(ShardedSafetensorsWriter, "_flush", no_collecting)
    misses = []
    original_close = ReadAhead.close

    def close(self):
        misses.append(self.misses)
        original_close(self)

    monkeypatch.setattr(ReadAhead, "close", close)
    out = tmp_path / "model"
    convert_checkpoint(qwen3_ckpts / variant, model_dir=out, hf_base=qwen3_hf, merge=merge, max_shard_size="20kB")
    assert misses == [0]
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and (out / INDEX_FILE).is_file()
    weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    with safe_open(str(qwen3_hf / SINGLE_FILE), "pt") as original:
        assert set(weight_map) == set(original.keys())
        for shard in shards:
            with safe_open(str(shard), "pt") as handle:
                for key in handle.keys():
                    assert weight_map[key] == shard.name
                    written, expected = handle.get_tensor(key), original.get_tensor(key)
                    if merge:  # merged values: tests/checkpoint/test_convert.py compares them
                        assert (written.shape, written.dtype) == (expected.shape, expected.dtype), key
                    else:
                        assert torch.equal(written, expected), key


def test_read_ahead_stays_within_its_bytes_and_hands_errors_to_their_request():
    taken = []
    started = []

    def read(request):
        started.append(request)
        # 25 bytes hold two requests of 10; plus one taken but not yet recorded in ``taken``
        assert len(started) - len(taken) <= 3, "read more than max_bytes ahead"
        if request == 5:
            raise OSError("disk error at 5")
        return torch.full((10,), request, dtype=torch.uint8)

    with ReadAhead(read, list(range(8)), lambda request: 10, max_bytes=25) as ahead:
        for request in range(5):
            assert torch.equal(ahead.take(request), torch.full((10,), request, dtype=torch.uint8))
            taken.append(request)
        with pytest.raises(OSError, match="disk error at 5"):
            ahead.take(5)
        taken.append(5)
        assert ahead.take(7) is None  # not the next planned request: read-ahead stops, the caller reads
        assert ahead.misses == 1 and ahead.take(6) is None
    assert started == list(range(len(started))) and len(started) <= 8
