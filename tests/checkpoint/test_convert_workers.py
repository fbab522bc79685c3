"""``convert --workers N``: the same bytes whatever N, errors and stops in a worker leave nothing behind.

The tiny checkpoints would convert in one process by default (too small to share), so every case
asks for its workers; a spy on :func:`write_in_workers` proves they were used.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from pathlib import Path

import pytest

from bridge_ext.checkpoint import CheckpointReader, parallel_write
from bridge_ext.checkpoint.parallel_write import WorkerError, split_evenly
from bridge_ext.cli import EXIT_OUTPUT_IO
from bridge_ext.convert import convert_checkpoint
from bridge_ext.errors import CheckpointError
from bridge_ext.value_check import ValueCheck

sys.path.insert(0, str(Path(__file__).parent))
from test_convert_bad_input import ITER, convert, copy_checkpoint, replace_chunk  # noqa: E402
from test_convert_outputs import convert_command, listing, staging_folders, start, wait_until_writing  # noqa: E402


@pytest.fixture
def parts(monkeypatch) -> list[int]:
    """How many workers each parallel write started."""
    started: list[int] = []
    original = parallel_write.write_in_workers

    def spy(work, *args, **kwargs):
        started.append(len(work))
        return original(work, *args, **kwargs)

    monkeypatch.setattr(parallel_write, "write_in_workers", spy)
    return started


def workers_left() -> list:
    """Conversion workers still running (other children, e.g. megatron's sync manager, do not count)."""
    return [child for child in multiprocessing.active_children() if child.name.startswith("bridge-ext-convert")]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize("case, options", [
    ("dense", {}),
    ("lora", {"merge": True}),
    ("dense", {"dtype": "float16"}),
])
def test_any_number_of_workers_writes_the_same_bytes(qwen3_ckpts, qwen3_hf, tmp_path, parts, case, options):
    import torch

    options = {**options, "dtype": getattr(torch, options["dtype"])} if "dtype" in options else options
    written = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        convert_checkpoint(qwen3_ckpts / case, model_dir=out, hf_base=qwen3_hf, max_shard_size="100kB",
                           workers=workers, **options)
        written[workers] = folder_bytes(out)
    assert parts == [2, 3]  # one worker writes in this process, as before
    assert len([name for name in written[1] if name.endswith(".safetensors")]) > 1  # several shards
    assert written[2] == written[1] and written[3] == written[1]
    assert not workers_left()


def test_full_checkpoint_with_adapters_writes_both_folders(qwen3_ckpts, qwen3_hf, tmp_path, parts):
    serial = convert_checkpoint(qwen3_ckpts / "lora", model_dir=tmp_path / "m1", adapter_dir=tmp_path / "a1",
                                hf_base=qwen3_hf, workers=1)
    parallel = convert_checkpoint(qwen3_ckpts / "lora", model_dir=tmp_path / "m2", adapter_dir=tmp_path / "a2",
                                  hf_base=qwen3_hf, workers=2)
    assert parts == [2]
    assert (serial.tensors, serial.bytes) == (parallel.tensors, parallel.bytes)
    assert folder_bytes(tmp_path / "m1") == folder_bytes(tmp_path / "m2")
    adapter = (tmp_path / "a1" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "a2" / "adapter_model.safetensors").read_bytes() == adapter


def test_non_finite_values_found_by_workers_are_reported(qwen3_ckpts, tmp_path, parts):
    import torch

    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)

    def poison(chunk):
        chunk.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        return chunk

    replace_chunk(root, "decoder.layers.mlp.linear_fc2.weight", (1, 0, 0), poison)
    code, message = convert(root, "--model-out", tmp_path / "out" / "model", "--workers", "2")
    assert code == 0, message
    assert parts == [2]
    assert ("warning: 3 non-finite value(s) (NaN or Inf) in 1 tensor(s): model.layers.1.mlp.down_proj.weight (3)"
            in message), message


def test_a_corrupt_record_read_by_a_worker_fails_the_conversion(qwen3_ckpts, tmp_path, parts):
    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)
    chunks = [chunk.stored for info in CheckpointReader(root).tensors.values() for chunk in info.chunks
              if chunk.stored is not None and chunk.stored.length > 16384]
    last = max(chunks, key=lambda stored: stored.offset)  # the last large record: a late worker reads it
    data = root / ITER / last.file
    content = bytearray(data.read_bytes())
    content[last.offset + last.length // 2] ^= 0x01  # inside its data member
    data.write_bytes(bytes(content))
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="CRC-32 mismatch"):
        convert_checkpoint(root, model_dir=tmp_path / "out" / "model", workers=3)
    assert parts == [3]
    assert listing(tmp_path / "out") == []
    assert not workers_left()


def test_a_worker_killed_by_the_system_fails_the_conversion(qwen3_ckpts, tmp_path, parts, monkeypatch):
    parent, check = os.getpid(), ValueCheck.__call__

    def die_in_a_worker(self, name, tensor):
        if os.getpid() != parent and name.endswith("down_proj.weight"):
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
        return check(self, name, tensor)

    monkeypatch.setattr(ValueCheck, "__call__", die_in_a_worker)
    (tmp_path / "out").mkdir()
    with pytest.raises(WorkerError, match="ended without a word"):
        convert_checkpoint(qwen3_ckpts / "dense", model_dir=tmp_path / "out" / "model", workers=2)
    assert listing(tmp_path / "out") == []
    code, message = convert(qwen3_ckpts / "dense", "--model-out", tmp_path / "out" / "model", "--workers", "2")
    assert code == EXIT_OUTPUT_IO and "killed by the system" in message, message
    assert listing(tmp_path / "out") == []
    assert not workers_left()


def test_a_stop_signal_with_workers_removes_the_staging_folder(qwen3_ckpts, tmp_path):
    folder = tmp_path / "signalled"
    folder.mkdir()
    marker = tmp_path / "started"
    process = start(convert_command(qwen3_ckpts / "dense", "--model-out", folder / "model", "--workers", "2",
                                    marker=marker, pause=60))
    try:
        wait_until_writing(process, marker)
        assert len(staging_folders(folder)) == 1
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert listing(folder) == []


@pytest.mark.parametrize("sizes, parts, expected", [
    ([1, 1, 1, 1], 2, [range(0, 2), range(2, 4)]),
    ([10, 1, 1, 1, 1], 2, [range(0, 1), range(1, 5)]),
    ([1, 1, 1], 5, [range(0, 1), range(1, 2), range(2, 3)]),
    ([5], 3, [range(0, 1)]),
    ([3, 3, 3, 3, 3, 3], 3, [range(0, 2), range(2, 4), range(4, 6)]),
])
def test_split_evenly(sizes, parts, expected):
    assert split_evenly(sizes, parts) == expected
