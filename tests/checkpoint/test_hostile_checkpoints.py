"""Crafted checkpoints, small on disk, cost no more time or memory than their size.

Costs are measured by counting, not by the clock: the coverage check reports its operations, and
memory is bounded by an address-space limit (``RLIMIT_AS``) set in a subprocess just above what
its imports use. Messages are asserted whole: one line, naming the file and what is wrong.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import hostile_factory
from bridge_ext.checkpoint import CheckpointReader, UnsafePickleError
from bridge_ext.checkpoint import entry_limits
from bridge_ext.checkpoint.coverage import check_coverage
from bridge_ext.cli import EXIT_CHECKPOINT, EXIT_MISMATCH, EXIT_OUTPUT_IO, main

ITER = "iter_0000010"
NORM = "decoder.final_layernorm.weight"
HEADROOM = 100 << 20  # memory allowed above the imports (the figures: 1.85 GB and 1.37 GB)


def convert(*args: str | Path) -> tuple[int, str]:
    """Exit code and stderr of ``bridge-ext convert`` (stderr kept as it is: one line is asserted)."""
    result = CliRunner().invoke(main, ["convert", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stderr


@pytest.fixture
def ckpt(qwen3_ckpts, tmp_path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(qwen3_ckpts / "dense", copy)
    return copy


LIMITED = """
import re, resource, sys
from bridge_ext.checkpoint import CheckpointReader
from bridge_ext.errors import BridgeExtError

size = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) << 10
resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[1]), size + int(sys.argv[1])))
try:
    reader = CheckpointReader(sys.argv[2])
    for key in sys.argv[3:]:
        print("read", key, reader.read_tensor(key).tolist())
except BridgeExtError as error:
    print("refused:", error)
"""


def run_limited(*args: str | Path) -> str:
    """Open a checkpoint (and read tensors) in a subprocess allowed HEADROOM bytes above its imports."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}
    result = subprocess.run([sys.executable, "-c", LIMITED, str(HEADROOM), *map(str, args)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]  # a MemoryError is a traceback and exit 1
    return result.stdout


# ---------------------------------------------------------------- staggered chunks: linear coverage check
def staggered(rows: int, columns: int) -> list:
    boxes = []
    for column in range(columns):
        split = 1 + column % (rows - 1)
        boxes += [((0, column), (split, 1)), ((split, column), (rows - split, 1))]
    return boxes


@pytest.mark.parametrize("columns", [500, 4000])
def test_staggered_chunks_are_checked_in_linear_operations(columns):
    boxes = staggered(8, columns)
    found = check_coverage((8, columns), boxes)
    assert found.problem is None  # an exact tiling
    # 2 chunks per column; a pairwise check makes (2 * columns)^2 / 4 comparisons (4,000,000 at 2,000)
    assert found.operations <= 12 * len(boxes), found.operations
    overlapping = boxes[:-2] + [((0, columns - 1), (8, 1)), boxes[-1]]  # the last column's top chunk covers it all
    found = check_coverage((8, columns), overlapping)
    split = 1 + (columns - 1) % 7
    assert found.problem == (f"the chunk at offset (0, {columns - 1}) (size (8, 1)) overlaps the chunk at offset "
                             f"({split}, {columns - 1}) (size ({8 - split}, 1)) at element ({split}, {columns - 1})")
    assert found.operations <= 12 * len(boxes), found.operations


def test_staggered_tensor_in_a_checkpoint_is_checked_fast_and_named(ckpt, tmp_path, monkeypatch):
    folder = ckpt / ITER
    key = hostile_factory.add_staggered_tensor(folder, rows=8, columns=2000, overlap=True)
    operations = []

    def counted(shape, boxes):
        found = check_coverage(shape, boxes)
        operations.append(found.operations)
        return found.problem

    monkeypatch.setattr("bridge_ext.checkpoint.reader.coverage_problem", counted)
    code, message = convert(ckpt, "--model-out", tmp_path / "model")
    assert code == EXIT_CHECKPOINT, message
    assert message == (f"error: {folder / '.metadata'}: {key} (8, 2000) (data in no file): the chunk at offset "
                       "(0, 1999) (size (6, 1)) overlaps the chunk at offset (5, 1999) (size (3, 1)) at element "
                       "(5, 1999); the metadata is damaged or was not written by torch DCP\n")
    assert max(operations) <= 12 * 4000, operations


def test_chunks_per_tensor_and_entries_are_bounded(ckpt, tmp_path, monkeypatch):
    folder = ckpt / ITER
    key = hostile_factory.add_staggered_tensor(folder, rows=8, columns=600)
    monkeypatch.setattr(entry_limits, "MAX_CHUNKS_PER_TENSOR", 1000)
    code, message = convert(ckpt, "--model-out", tmp_path / "model")
    assert code == EXIT_CHECKPOINT, message
    assert message == (f"error: {folder / '.metadata'}: {key} lists 1200 chunks, more than the 1000 a tensor may "
                       "have (real checkpoints have at most about 10^5; the metadata is damaged or crafted)\n")
    monkeypatch.setattr(entry_limits, "MAX_CHUNKS_PER_TENSOR", 2000)
    monkeypatch.setattr(entry_limits, "MAX_ENTRIES", 1000)
    code, message = convert(ckpt, "--model-out", tmp_path / "model")
    assert code == EXIT_CHECKPOINT, message
    assert re.fullmatch(rf"error: {re.escape(str(folder / '.metadata'))}: (\d+) entries \(tensors, chunks and "
                        r"storage entries\), more than the 1000 a checkpoint may have \(real checkpoints have at "
                        r"most about 10\^6; the metadata is damaged or crafted\)\n", message), message


# ---------------------------------------------------------------- one chunk repeated through the pickle memo
def test_chunk_repeated_through_the_memo_is_refused_before_it_is_built(ckpt, tmp_path):
    folder = ckpt / ITER
    size = hostile_factory.repeat_chunk(folder, NORM, 1_000_000)
    assert size < 6 << 20  # small on disk: a few bytes a reference
    expected = (f"{folder / '.metadata'}: refusing to unpickle: its {size} bytes describe more than {2 * size} "
                "objects through memo references (at most 2 per byte; real metadata describes about 0.5) "
                "(file not trusted)")
    assert run_limited(ckpt) == f"refused: {expected}\n"
    code, message = convert(ckpt, "--model-out", tmp_path / "model")
    assert (code, message) == (EXIT_CHECKPOINT, f"error: {expected}\n")
    with pytest.raises(UnsafePickleError):
        CheckpointReader(ckpt)


def test_real_metadata_describes_far_fewer_objects_than_the_bound(qwen3_ckpts):
    from bridge_ext.checkpoint.safe_pickle import MAX_OBJECTS_PER_BYTE, check_pickle_shape

    for variant in ("dense", "lora", "adapter"):
        data = (qwen3_ckpts / variant / ITER / ".metadata").read_bytes()
        assert check_pickle_shape(data, max_objects=len(data)) < MAX_OBJECTS_PER_BYTE * len(data) / 3


# ---------------------------------------------------------------- a view of a large storage
def test_view_of_a_large_storage_reads_only_the_viewed_bytes(ckpt, tmp_path):
    folder = ckpt / ITER
    values = hostile_factory.view_of_large_storage(folder, NORM, storage_bytes=1 << 30)
    assert os.stat(folder / "__0_0.distcp").st_blocks * 512 < 8 << 20  # sparse: the storage is a hole
    assert run_limited(ckpt, NORM) == f"read {NORM} {values.tolist()}\n"  # 1 GiB storage, 100 MiB allowed
    assert torch.equal(CheckpointReader(ckpt).read_tensor(NORM), values)
    code, message = convert(ckpt, "--model-out", tmp_path / "model")
    assert (code, message) == (0, "")


# ---------------------------------------------------------------- out of memory: one line, exit 7
@pytest.mark.parametrize("failure, what", [
    (MemoryError(), "an allocation failed"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                  "you tried to allocate 1125899906842624 bytes. Error code 12 (Cannot allocate memory)"),
     "allocating 1125899906842624 bytes failed"),
], ids=["MemoryError", "torch-allocator"])
def test_out_of_memory_is_one_line_and_exit_7(qwen3_ckpts, tmp_path, monkeypatch, failure, what):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr("bridge_ext.convert.convert_checkpoint", fail)
    code, message = convert(qwen3_ckpts / "dense", "--model-out", tmp_path / "model")
    assert (code, message) == (EXIT_OUTPUT_IO, f"error: out of memory: {what}; the conversion needs about one shard "
                               "plus the largest tensor (lower --max-shard-size, or raise the memory limit: "
                               "ulimit -v, the job's allocation)\n")


# ---------------------------------------------------------------- messages: one line each
def test_run_config_yaml_errors_are_one_line(ckpt, tmp_path):
    run_config = ckpt / ITER / "run_config.yaml"
    run_config.write_text("model:\n  a: [1, 2\n  b: 3\n")
    code, message = convert(ckpt, "--model-out", tmp_path / "model")
    assert (code, message) == (EXIT_CHECKPOINT, f"error: {run_config}: not valid YAML (safe loader): did not find "
                               "expected ',' or ']' at line 3, column 4 (while parsing a flow sequence from line 2, "
                               "column 6)\n")
    run_config.write_text("model:\n  x: " + "[" * 5000 + "]" * 5000 + "\n")
    code, message = convert(ckpt, "--model-out", tmp_path / "model")
    assert (code, message) == (EXIT_CHECKPOINT, f"error: {run_config}: not valid YAML (safe loader): exceeded "
                               "maximum nesting depth at line 2, column 1004 (while increasing flow level)\n")


def test_config_json_errors_from_transformers_are_one_line(qwen3_ckpts, qwen3_hf, tmp_path):
    import json

    config = tmp_path / "config"
    shutil.copytree(qwen3_hf, config)
    settings = json.loads((config / "config.json").read_text())
    (config / "config.json").write_text(json.dumps({**settings, "layer_types": ["full_attention"] * 3}))
    code, message = convert(qwen3_ckpts / "dense", "--hf-config", config, "--model-out", tmp_path / "model")
    assert (code, message) == (EXIT_MISMATCH, f"error: {config / 'config.json'}: transformers cannot read it: "
                               "ValueError: `num_hidden_layers` (2) must be equal to the number of `layer_types` "
                               "(3)\n")
    (config / "config.json").write_text(json.dumps({**settings, "model_type": "nosuchmodel"}))
    code, message = convert(qwen3_ckpts / "dense", "--hf-config", config, "--model-out", tmp_path / "model")
    assert (code, message) == (EXIT_MISMATCH, f"error: {config / 'config.json'}: unknown architecture: transformers "
                               "has no model type 'nosuchmodel'\n")


@pytest.mark.parametrize("size, nbytes", [("1PiB", 1 << 50), ("1PB", 10**15), ("1125899906842624B", 1 << 50),
                                          ("0.5PiB", 1 << 49)])
def test_shard_sizes_up_to_one_pib_are_accepted(size, nbytes):
    from bridge_ext.hf_folder import parse_size

    assert parse_size(size) == nbytes


def test_shard_size_limit_in_the_message_is_the_one_accepted(qwen3_ckpts, tmp_path):
    code, message = convert(qwen3_ckpts / "dense", "--model-out", tmp_path / "model", "--max-shard-size", "1PiB")
    assert (code, message) == (0, "")
    code, message = convert(qwen3_ckpts / "dense", "--model-out", tmp_path / "other", "--max-shard-size", "1.5PiB")
    assert code == 2
    assert ("Invalid value for '--max-shard-size': '1.5PiB' is not a size from 1 byte to 1 PiB, such as 500MB or "
            "2GiB (a number, optionally with B, KB, MB, GB, TB, PB, KiB, MiB, GiB, TiB or PiB)") in message, message


@pytest.mark.parametrize("view", ["offset", "strided", "transposed", "every_other"])
def test_record_views_read_their_own_values(tmp_path, view):
    """Each way of reading a view (one run, run by run, a dense span) gives the view's values, into a result or not."""
    from bridge_ext.checkpoint.record import RecordFile, read_tensor_record

    storage = torch.arange(1 << 16, dtype=torch.float32)
    tensor = {"offset": storage[1000:1064], "strided": storage[::4096], "transposed": storage[:4096].view(64, 64).t(),
              "every_other": storage[:8192:2]}[view]
    path = tmp_path / "record.bin"
    with open(path, "wb") as handle:
        handle.write(b"x" * 100)  # a record starts inside its file
        torch.save(tensor, handle)
    record = RecordFile(path)
    try:
        length = path.stat().st_size - 100
        assert torch.equal(read_tensor_record(record, 100, length, view), tensor)
        into = torch.empty(tensor.shape, dtype=tensor.dtype)
        assert read_tensor_record(record, 100, length, view, into) is into and torch.equal(into, tensor)
    finally:
        record.close()
