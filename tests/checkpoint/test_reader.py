"""The torch_dist checkpoint reader against real megatron-core saves of a tiny Qwen3 (TP=1 and TP=2).

Checkpoints come from megatron-core's own ``dist_checkpointing.save`` (see ckpt_factory.py):
TP=1 in this process, TP=2 by a 2-process gloo torchrun. Expectations come from the live
models' ``named_parameters`` (TP shards concatenated by hand), not from Megatron's
sharded-state-dict code.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bridge_ext  # noqa: F401  (before megatron: works around TE / Triton imports)
from bridge_ext.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReader,
    CorruptCheckpointError,
    MissingIterationError,
    MissingKeyError,
    MissingMetadataError,
    MissingRunConfigError,
    NotACheckpointError,
    UnsafeObjectError,
    UnsafePickleError,
    UnsupportedFormatError,
    load_run_config,
    locate_checkpoint,
    safe_unpickle,
)

sys.path.insert(0, str(Path(__file__).parent))
import ckpt_factory  # noqa: E402

HERE = Path(__file__).parent
ITER = f"iter_{ckpt_factory.ITERATION:07d}"
FC1_GATE_UP = ("linear_fc1.weight", "linear_fc1.adapter.linear_out.weight")
NORM_KEYS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return ckpt_factory.tiny_qwen3(tmp_path_factory.mktemp("hf") / "qwen3")


@pytest.fixture(scope="module")
def tp1(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tp1")
    ckpt_factory.save_all(hf_dir, out, tensor_parallel=1)
    return out


@pytest.fixture(scope="module")
def tp2(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tp2")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(HERE / "ckpt_factory.py"), str(hf_dir), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


def expected_globals(out: Path, variant: str, ranks: int) -> dict[str, torch.Tensor]:
    """Stored key -> global tensor, from the live parameters each rank dumped."""
    dumped = "lora" if variant == "adapter" else variant  # the adapter save is of the LoRA model
    params = [torch.load(out / f"params_{dumped}_rank{r}.pt") for r in range(ranks)]
    layers: dict[str, dict[int, torch.Tensor]] = {}
    flat: dict[str, torch.Tensor] = {}
    for name, (tensor, tensor_parallel, dim) in params[0].items():
        shards = [p[name][0] for p in params]
        name = name.replace(".to_wrap.", ".")
        if not tensor_parallel or ranks == 1:
            full = tensor
        elif name.endswith(FC1_GATE_UP):  # each rank holds [gate_r; up_r]; global is [gate; up]
            halves = [shard.chunk(2, dim=0) for shard in shards]
            full = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        else:
            full = torch.cat(shards, dim=dim)
        match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name)
        if match is None:
            flat[name] = full
        else:
            rest = NORM_KEYS.get(match.group(2), match.group(2))
            layers.setdefault(f"decoder.layers.{rest}", {})[int(match.group(1))] = full
    for key, by_layer in layers.items():
        flat[key] = torch.stack([by_layer[i] for i in sorted(by_layer)])
    if variant == "adapter":
        flat = {k: v for k, v in flat.items() if ".adapter." in k}
    return flat


def copy_iteration(src_root: Path, dst: Path) -> Path:
    shutil.copytree(src_root / ITER, dst)
    return dst


# ---------------------------------------------------------------- reading
@pytest.mark.parametrize("variant", ["dense", "lora", "adapter"])
def test_tp1_reads_equal_live_parameters(tp1, variant):
    reader = CheckpointReader(tp1 / variant)
    assert reader.location.iteration == ckpt_factory.ITERATION
    assert reader.path == tp1 / variant / ITER
    expected = expected_globals(tp1, variant, 1)
    assert set(reader.tensors) == set(expected)
    for key, tensor in reader.iter_tensors():
        info = reader.tensors[key]
        assert info.shape == tuple(expected[key].shape) and info.dtype == torch.float32, key
        assert torch.equal(tensor, expected[key]), key


@pytest.mark.parametrize("variant", ["dense", "lora", "adapter"])
def test_tp2_reads_equal_concatenated_shards(tp2, variant):
    reader = CheckpointReader(tp2 / variant)
    expected = expected_globals(tp2, variant, 2)
    assert set(reader.tensors) == set(expected)
    for key, tensor in reader.iter_tensors():
        assert torch.equal(tensor, expected[key]), key


def test_tp2_base_weights_equal_tp1(tp1, tp2):
    """Same HF weights saved at TP=1 and TP=2 read back identical (dense, and base of the LoRA save)."""
    one = CheckpointReader(tp1 / "dense")
    for variant in ("dense", "lora"):
        two = CheckpointReader(tp2 / variant)
        assert set(two.base_keys) == set(one.tensors)
        for key in one.tensors:
            assert torch.equal(two.read_tensor(key), one.read_tensor(key)), (variant, key)


def test_matches_torch_dcp_loader(tp2):
    """Cross-check with torch's own DCP load (bare pickle: fine for checkpoints this test wrote)."""
    import torch.distributed.checkpoint as dcp

    folder = tp2 / "lora" / ITER
    reader = CheckpointReader(folder)
    for key, info in reader.tensors.items():
        target = torch.empty(info.shape, dtype=info.dtype)
        dcp.load({key: target}, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
        assert torch.equal(reader.read_tensor(key), target), key


def test_first_axis_slices(tp2, monkeypatch):
    reader = CheckpointReader(tp2 / "lora")
    for key, info in reader.tensors.items():
        full = reader.read_tensor(key)
        if len(info.shape) < 2:
            continue
        for i in range(info.shape[0]) if key.startswith("decoder.layers.") else (0, info.shape[0] - 1):
            assert torch.equal(reader.read_tensor(key, i), full[i]), (key, i)
        assert torch.equal(reader.read_tensor(key, -1), full[-1])
        assert torch.equal(reader.read_tensor(key, (1, 3)), full[1, 3])
    # a slice across the TP=2 vocab boundary of the (128, 64) output layer (chunks at rows 0 and 64)
    full = reader.read_tensor("output_layer.weight")
    assert torch.equal(reader.read_tensor("output_layer.weight", slice(60, 70)), full[60:70])
    assert [i for i, _ in reader.iter_slices("decoder.layers.mlp.linear_fc2.weight")] == [0, 1]

    # one layer of fc1 at TP=2 (8 chunks: layer x {gate, up} x rank) reads only that layer's 4 chunks
    loaded = []
    original = CheckpointReader._load_chunk

    def counting(self, info, chunk, handles, *args, **kwargs):
        loaded.append(chunk.offsets)
        return original(self, info, chunk, handles, *args, **kwargs)

    monkeypatch.setattr(CheckpointReader, "_load_chunk", counting)
    layer = reader.read_tensor("decoder.layers.mlp.linear_fc1.weight", 1)
    assert layer.shape == (192, 64)
    assert sorted(loaded) == [(1, 0, 0), (1, 48, 0), (1, 96, 0), (1, 144, 0)]
    with pytest.raises(IndexError):
        reader.read_tensor("decoder.layers.mlp.linear_fc1.weight", 2)


def test_byte_objects_and_common_state(tp1, tp2):
    for out in (tp1, tp2):
        reader = CheckpointReader(out / "lora")
        common = reader.common_state()
        assert common["iteration"] == ckpt_factory.ITERATION and common["checkpoint_version"] == 3.0
        assert common["content_metadata"]["singleton_local_shards"] is False
        extra = [k for k in reader.objects if "_extra_state/shard_" in k]
        assert len(extra) == 2 * 12  # 12 modules (4 bases, 8 adapters) x 2 layers
        assert reader.read_object(extra[0]) is None  # local (non-TE) layers: [None]
    adapter = CheckpointReader(tp1 / "adapter")
    assert adapter.objects == ("common_state/shard_0_1",)
    with pytest.raises(MissingKeyError, match="no byte object"):
        adapter.read_object("decoder.layers.mlp.linear_fc1._extra_state/shard_0_2")
    with pytest.raises(MissingKeyError, match="no global tensor"):
        adapter.read_tensor("decoder.layers.mlp.linear_fc1.weight")


def test_tp2_layout_facts(tp2):
    reader = CheckpointReader(tp2 / "lora")
    shapes = reader.tensor_shapes()
    assert shapes["decoder.layers.self_attention.linear_qkv.weight"] == ((2, 128, 64), torch.float32)
    assert shapes["decoder.layers.mlp.linear_fc1.weight"][0] == (2, 192, 64)
    assert shapes["decoder.layers.self_attention.linear_qkv.adapter.linear_in.weight"][0] == (2, 4, 64)
    assert shapes["decoder.layers.mlp.linear_fc1.adapter.linear_out.weight"][0] == (2, 192, 4)
    fc1 = reader.tensors["decoder.layers.mlp.linear_fc1.weight"]
    layer0 = sorted(c.offsets for c in fc1.chunks if c.offsets[0] == 0)
    assert layer0 == [(0, 0, 0), (0, 48, 0), (0, 96, 0), (0, 144, 0)]
    assert all(c.sizes == (1, 48, 64) for c in fc1.chunks)
    # rank 1 stores the second half of gate and of up
    assert {c.offsets[1] for c in fc1.chunks if c.stored.file == "__1_0.distcp"} == {48, 144}


# ---------------------------------------------------------------- run_config / PEFT
def test_run_config_and_adapter_only(tp1, tp2):
    for out in (tp1, tp2):
        dense, lora, adapter = (CheckpointReader(out / v) for v in ckpt_factory.VARIANTS[:3])
        assert not dense.is_adapter_only and not lora.is_adapter_only and adapter.is_adapter_only
        config = adapter.require_run_config()
        assert config.model_target == "megatron.bridge.models.gpt_provider.GPTModelProvider"
        model = config.model
        assert (model["num_layers"], model["hidden_size"], model["ffn_hidden_size"]) == (2, 64, 96)
        assert (model["num_attention_heads"], model["num_query_groups"], model["kv_channels"]) == (4, 2, 16)
        assert model["vocab_size"] == 128 and model["qk_layernorm"] is True
        assert model["share_embeddings_and_output_weights"] is False
        assert model["params_dtype"] == "torch.float32" and config.params_dtype == torch.float32
        assert config.hf_model_id and Path(config.hf_model_id).name == "qwen3"
        peft = config.peft
        assert peft.kind == "LoRA" and peft.dim == 4 and peft.alpha == 8 and peft.scale == 2.0
        assert set(peft.target_modules) == {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}
        assert peft.dropout == 0.0 and peft.dropout_position == "pre"
        assert config.pretrained_checkpoint == str(out / "dense")
        assert dense.run_config.peft is None


def test_adapter_only_without_run_config(tp1, tmp_path):
    folder = copy_iteration(tp1 / "adapter", tmp_path / ITER)
    (folder / "run_config.yaml").unlink()
    reader = CheckpointReader(folder)
    assert reader.run_config is None
    with pytest.raises(MissingRunConfigError, match="run_config.yaml") as error:
        _ = reader.is_adapter_only
    assert error.value.path == folder / "run_config.yaml"
    with pytest.raises(MissingRunConfigError):
        reader.require_run_config()
    # a full checkpoint without run_config.yaml is simply not adapter-only
    full = copy_iteration(tp1 / "dense", tmp_path / "dense" / ITER)
    (full / "run_config.yaml").unlink()
    assert CheckpointReader(full).is_adapter_only is False


def test_small_run_config(tmp_path):
    path = tmp_path / "run_config.yaml"
    path.write_text(
        "model:\n  _target_: megatron.bridge.models.gpt_provider.GPTModelProvider\n"
        "  hf_model_id: Qwen/Qwen3-0.6B\n  num_layers: 28\n  hidden_size: 1024\n"
        "  params_dtype:\n    _call_: false\n    _target_: torch.bfloat16\n"
        "peft:\n  _target_: megatron.bridge.peft.lora.LoRA\n  target_modules: [linear_qkv, linear_proj]\n"
        "  dim: 16\n  alpha: 32\n  dropout: 0.1\n  dropout_position: post\n  exclude_modules: []\n"
        "  params_to_save: !!set {}\n"
        "checkpoint:\n  ckpt_format: torch_dist\n  pretrained_checkpoint: /base\n"
    )
    config = load_run_config(path)
    assert config.hf_model_id == "Qwen/Qwen3-0.6B" and config.params_dtype == torch.bfloat16
    assert config.peft.target_modules == ("linear_qkv", "linear_proj") and config.peft.scale == 2.0
    assert config.pretrained_checkpoint == "/base"
    path.write_text("model: {num_layers: 2}\npeft: null\n")
    assert load_run_config(path).peft is None
    path.write_text("!!python/object/apply:os.system ['echo unsafe']\n")
    with pytest.raises(CheckpointError, match="not valid YAML"):
        load_run_config(path)
    path.write_text("peft: null\n")
    with pytest.raises(CheckpointError, match="no 'model' section"):
        load_run_config(path)


# ---------------------------------------------------------------- locating: bad inputs
def test_locate_root_and_iteration_folder(tp1):
    root = tp1 / "lora"
    by_root = locate_checkpoint(root)
    by_folder = locate_checkpoint(root / ITER)
    assert by_root.path == by_folder.path == root / ITER
    assert by_root.root == root and by_folder.root is None
    assert by_root.iteration == by_folder.iteration == ckpt_factory.ITERATION
    assert locate_checkpoint(root, iteration=ckpt_factory.ITERATION).path == root / ITER


def test_bad_locations(tp1, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointNotFoundError, match=str(missing)):
        CheckpointReader(missing)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(CheckpointNotFoundError, match="not a directory"):
        CheckpointReader(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotACheckpointError, match="latest_checkpointed_iteration.txt") as error:
        CheckpointReader(empty)
    assert error.value.path == empty

    root = tmp_path / "root"
    root.mkdir()
    (root / "latest_checkpointed_iteration.txt").write_text("20\n")
    with pytest.raises(MissingIterationError, match="iter_0000020"):
        CheckpointReader(root)
    with pytest.raises(MissingIterationError, match="iter_0000007"):
        CheckpointReader(tp1 / "lora", iteration=7)
    (root / "latest_checkpointed_iteration.txt").write_text("garbage")
    with pytest.raises(CheckpointError, match="garbage"):
        CheckpointReader(root)

    no_backend = copy_iteration(tp1 / "dense", tmp_path / "no_backend")
    (no_backend / "metadata.json").unlink()
    with pytest.raises(UnsupportedFormatError, match="fsdp_dtensor.*metadata.json is missing"):
        CheckpointReader(no_backend)
    other = copy_iteration(tp1 / "dense", tmp_path / "zarr")
    (other / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr", "sharded_backend_version": 1}))
    with pytest.raises(UnsupportedFormatError, match="zarr"):
        CheckpointReader(other)
    no_meta = copy_iteration(tp1 / "dense", tmp_path / "no_meta")
    (no_meta / ".metadata").unlink()
    with pytest.raises(MissingMetadataError, match=r"\.metadata is missing") as error:
        CheckpointReader(no_meta)
    assert error.value.path == no_meta / ".metadata"


# ---------------------------------------------------------------- unsafe and corrupted data
class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_metadata_pickle_is_refused(tp1, tmp_path):
    marker = tmp_path / "pwned"
    folder = copy_iteration(tp1 / "dense", tmp_path / "evil")
    (folder / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(UnsafePickleError, match=r"posix\.system|os\.system") as error:
        CheckpointReader(folder)
    assert error.value.path == folder / ".metadata"
    assert not marker.exists()
    # nested inside an otherwise valid-looking Metadata, and other classic gadgets
    real = (tp1 / "dense" / ITER / ".metadata").read_bytes()
    assert safe_unpickle(real).version  # the real file passes the allowlist
    for payload in (
        pickle.dumps({"state_dict_metadata": _Exploit(marker)}),
        b"cbuiltins\neval\n(S'1+1'\ntR.",
        b"ctorch\nload\n(S'x'\ntR.",
        b"csubprocess\nPopen\n(S'true'\ntR.",
    ):
        with pytest.raises(UnsafePickleError):
            safe_unpickle(payload, "x")
    assert not marker.exists()
    # allowed classes, impossible content: a chunk reaching past its tensor
    metadata = pickle.loads(real)
    entry = metadata.state_dict_metadata["output_layer.weight"]
    entry.chunks[0].sizes = torch.Size([129, 64])
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="malformed DCP metadata: .*output_layer.weight"):
        CheckpointReader(folder)


def test_unsafe_byte_object_is_refused(tp1, tmp_path):
    """A byte object whose pickle needs more than weights_only allows raises, and runs nothing.

    Megatron stores a byte object as the raw ``torch.save([obj])`` bytes; here the common_state
    entry of a real checkpoint is pointed at such bytes holding an exploit.
    """
    marker = tmp_path / "pwned"
    folder = copy_iteration(tp1 / "adapter", tmp_path / "evil")
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # our own file: bare pickle is fine
    (index,) = [i for i in metadata.storage_data if i.fqn == "common_state/shard_0_1"]
    info = metadata.storage_data[index]
    buffer = io.BytesIO()
    torch.save([_Exploit(marker)], buffer)
    data = folder / info.relative_path
    offset = data.stat().st_size
    with open(data, "ab") as handle:
        handle.write(buffer.getvalue())
    info.offset, info.length = offset, len(buffer.getvalue())
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    reader = CheckpointReader(folder)
    with pytest.raises(UnsafeObjectError, match=r"common_state/shard_0_1.*posix\.system") as error:
        reader.common_state()
    assert error.value.path == data
    assert not marker.exists()
    assert reader.read_tensor(reader.adapter_keys[0]).shape[0] == 2  # tensors still read


def test_truncated_and_corrupted_distcp(tp2, tmp_path):
    key = "output_layer.weight"
    folder = copy_iteration(tp2 / "lora", tmp_path / "trunc")
    reader = CheckpointReader(folder)
    last = next(c for c in reader.tensors[key].chunks if c.offsets == (64, 0))  # rank 1's vocab half
    data = folder / last.stored.file
    with open(data, "r+b") as handle:
        handle.truncate(last.stored.offset + last.stored.length // 2)
    with pytest.raises(CorruptCheckpointError, match=rf"{re.escape(str(data))}: truncated: {key}") as error:
        reader.read_tensor(key)
    assert error.value.path == data
    assert reader.read_tensor(key, 0).shape == (64,)  # the other rank's chunk is intact

    folder = copy_iteration(tp2 / "lora", tmp_path / "garbled")
    reader = CheckpointReader(folder)
    chunk = reader.tensors[key].chunks[0]
    data = folder / chunk.stored.file
    with open(data, "r+b") as handle:
        handle.seek(chunk.stored.offset)
        handle.write(b"\0" * 64)
    with pytest.raises(CorruptCheckpointError, match=rf"{re.escape(str(data))}: corrupted data for {key}"):
        reader.read_tensor(key)

    folder = copy_iteration(tp2 / "lora", tmp_path / "missing")
    (folder / "__1_0.distcp").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"__1_0\.distcp: data file missing \(needed for output_layer"):
        CheckpointReader(folder).read_tensor(key)
