"""``bridge-ext convert`` on bad input: a clear message, the documented exit code, and no output folder.

Each test damages a copy of a real checkpoint (or its config) in one way, runs the command and
checks that neither the output folder nor a staging folder beside it was left behind.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bridge_ext.checkpoint import CheckpointReader, CorruptCheckpointError, UnsafePickleError, safe_unpickle
from bridge_ext.cli import EXIT_CHECKPOINT, EXIT_MISMATCH, EXIT_OUTPUT_EXISTS, EXIT_USAGE, main
from bridge_ext.convert import convert_checkpoint

ITER = "iter_0000010"


def convert(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["convert", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, " ".join(result.output.split())  # unwrap terminal line breaks


@pytest.fixture
def out(tmp_path) -> Path:
    """The output parent: must hold nothing but what a test put there."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def assert_nothing_written(out: Path, *kept: str) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(kept)  # no model/, no .model.partial-*


def copy_checkpoint(root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(root, copy)
    return copy


def test_unknown_architecture(qwen3_ckpts, tmp_path, out):
    config = tmp_path / "gpt2"
    config.mkdir()
    (config / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    code, message = convert(qwen3_ckpts / "dense", "--hf-config", config, "--model-out", out / "model")
    assert code == EXIT_MISMATCH
    assert "unknown architecture: no mapping table for model_type 'gpt2'" in message and "qwen3" in message
    assert_nothing_written(out)


def without_run_config(root: Path, tmp_path: Path) -> Path:
    """A copy without run_config.yaml (as Megatron-LM writes them): only the shapes can tell a wrong config."""
    copy = copy_checkpoint(root, tmp_path)
    (copy / ITER / "run_config.yaml").unlink()
    return copy


def test_checkpoint_and_config_disagree_names_tensor_and_both_shapes(qwen3_ckpts, qwen3_hf, tmp_path, out):
    config = tmp_path / "config"
    shutil.copytree(qwen3_hf, config)
    settings = json.loads((config / "config.json").read_text())
    (config / "config.json").write_text(json.dumps({**settings, "intermediate_size": 128}))
    root = without_run_config(qwen3_ckpts / "dense", tmp_path)
    code, message = convert(root, "--hf-config", config, "--model-out", out / "model")
    assert code == EXIT_MISMATCH
    assert ("the checkpoint and the Hugging Face config disagree on model.layers.0.mlp.gate_proj.weight: "
            "decoder.layers.0.mlp.linear_fc1.weight (192, 64) gives (96, 64), the config implies (128, 64)") in message
    assert_nothing_written(out)


def test_config_whose_heads_cannot_split_the_checkpoint(qwen3_ckpts, qwen3_hf, tmp_path, out):
    config = tmp_path / "config"
    shutil.copytree(qwen3_hf, config)
    settings = json.loads((config / "config.json").read_text())
    (config / "config.json").write_text(json.dumps({**settings, "num_key_value_heads": 1}))
    root = without_run_config(qwen3_ckpts / "dense", tmp_path)
    code, message = convert(root, "--hf-config", config, "--model-out", out / "model")
    assert code == EXIT_MISMATCH
    assert re.search(r"decoder\.layers\.0\.self_attention\.linear_qkv\.weight has shape \(128, 64\), "
                     r"which cannot become \{'model\.layers\.0\.self_attn\.q_proj\.weight': \(64, 64\), "
                     r"'model\.layers\.0\.self_attn\.k_proj\.weight': \(16, 64\)", message), message
    assert_nothing_written(out)


@pytest.mark.parametrize("outputs", [("--model-out", "model", "--merge"), ("--adapter-out", "adapter")])
def test_lora_that_does_not_fit_its_base_weight(qwen3_ckpts, tmp_path, out, outputs):
    root = copy_checkpoint(qwen3_ckpts / "lora", tmp_path)
    metadata_file = root / ITER / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())  # our own test file
    lora_a = metadata.state_dict_metadata["decoder.layers.self_attention.linear_proj.adapter.linear_in.weight"]
    lora_a.size = torch.Size([*lora_a.size[:-1], 32])  # A must be (rank, 64) to fit o_proj (64, 64)
    for chunk in lora_a.chunks:
        chunk.sizes = torch.Size([*chunk.sizes[:-1], 32])
    metadata_file.write_bytes(pickle.dumps(metadata))
    option, folder, *rest = outputs
    code, message = convert(root, option, out / folder, *rest)
    assert code == EXIT_MISMATCH, message
    assert ("decoder.layers.0.self_attention.linear_proj.weight has shape (64, 64) with LoRA "
            "decoder.layers.0.self_attention.linear_proj.adapter.linear_in.weight (4, 32) and "
            "decoder.layers.0.self_attention.linear_proj.adapter.linear_out.weight (64, 4), which cannot become "
            "{'model.layers.0.self_attn.o_proj.weight': (64, 64)}") in message, message
    assert_nothing_written(out)


def test_missing_tensors(qwen3_ckpts, tmp_path, out):
    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)
    metadata_file = root / ITER / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())  # our own test file
    del metadata.state_dict_metadata["decoder.layers.mlp.linear_fc2.weight"]
    metadata_file.write_bytes(pickle.dumps(metadata))
    code, message = convert(root, "--model-out", out / "model")
    assert code == EXIT_MISMATCH
    assert ("missing ['model.layers.0.mlp.down_proj.weight', 'model.layers.1.mlp.down_proj.weight']"
            in message)
    assert_nothing_written(out)


def test_truncated_file_fails_mid_write_and_leaves_nothing(qwen3_ckpts, tmp_path, out):
    root = copy_checkpoint(qwen3_ckpts / "lora", tmp_path)
    data = root / ITER / "__0_0.distcp"
    size = data.stat().st_size
    with open(data, "r+b") as handle:
        handle.truncate(size * 3 // 5)
    written = []
    with pytest.raises(CorruptCheckpointError, match=rf"{re.escape(str(data))}: truncated: "):
        convert_checkpoint(root, model_dir=out / "model", adapter_dir=out / "adapter",
                           on_tensor=lambda name, nbytes: written.append(name))
    assert written  # the failure came after tensors had been written to the staging folder
    assert_nothing_written(out)
    code, message = convert(root, "--model-out", out / "model", "--adapter-out", out / "adapter")
    assert code == EXIT_CHECKPOINT and "truncated" in message and "error:" in message
    assert_nothing_written(out)


def test_corrupted_file(qwen3_ckpts, tmp_path, out):
    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)
    key = "decoder.layers.mlp.linear_fc2.weight"
    chunk = next(c for c in CheckpointReader(root).tensors[key].chunks if c.offsets[0] == 1)
    data = root / ITER / chunk.stored.file
    with open(data, "r+b") as handle:  # the archive header of layer 1's chunk: DCP has no checksum
        handle.seek(chunk.stored.offset)
        handle.write(b"\xff" * 64)
    code, message = convert(root, "--model-out", out / "model")
    assert code == EXIT_CHECKPOINT
    assert f"{data}: corrupted data for {key} chunk at offset (1, 0, 0)" in message, message
    assert_nothing_written(out)


def test_adapter_only_checkpoint_without_run_config(qwen3_ckpts, qwen3_hf, tmp_path, out):
    root = copy_checkpoint(qwen3_ckpts / "adapter", tmp_path)
    (root / ITER / "run_config.yaml").unlink()
    code, message = convert(root, "--hf-base", qwen3_hf, "--adapter-out", out / "adapter")
    assert code == EXIT_CHECKPOINT
    assert f"{root / ITER / 'run_config.yaml'}: missing, but {root / ITER} holds only adapter weights" in message
    assert_nothing_written(out)


def test_adapter_only_merge_needs_the_hf_base(qwen3_ckpts, out):
    code, message = convert(qwen3_ckpts / "adapter", "--model-out", out / "model", "--merge")
    assert code == EXIT_MISMATCH and "LoRA adapter-only checkpoint" in message and "--hf-base" in message
    assert_nothing_written(out)


def test_output_folder_exists_and_is_not_empty(qwen3_ckpts, qwen3_hf, out):
    (out / "model").mkdir()
    (out / "model" / "keep.txt").write_text("mine")
    args = (qwen3_ckpts / "lora", "--hf-base", qwen3_hf, "--model-out", out / "model", "--adapter-out", out / "adapter")
    code, message = convert(*args)
    assert code == EXIT_OUTPUT_EXISTS
    assert f"{out / 'model'} exists and is not empty (pass --overwrite to replace it)" in message
    assert (out / "model" / "keep.txt").read_text() == "mine"
    assert_nothing_written(out, "model")
    code, message = convert(*args, "--overwrite")  # keep.txt is no part of an earlier output
    assert code == EXIT_OUTPUT_EXISTS and "(keep.txt): --overwrite replaces only an earlier output" in message
    code, message = convert(*args, "--overwrite-any")
    assert code == 0, message
    assert not (out / "model" / "keep.txt").exists() and (out / "model" / "config.json").is_file()
    assert_nothing_written(out, "model", "adapter")


def test_output_inside_an_input_is_refused_even_with_overwrite(qwen3_ckpts, qwen3_hf, out):
    code, message = convert(qwen3_ckpts / "dense", "--hf-base", qwen3_hf, "--model-out", qwen3_hf, "--overwrite")
    assert code == EXIT_USAGE and "would overlap the input" in message
    assert (qwen3_hf / "model.safetensors").is_file()


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_never_loaded(qwen3_ckpts, tmp_path, out):
    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)
    marker = tmp_path / "pwned"
    (root / ITER / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    code, message = convert(root, "--model-out", out / "model")
    assert code == EXIT_CHECKPOINT
    assert re.search(r"refusing to unpickle global (posix|os)\.system", message), message
    assert not marker.exists()
    assert_nothing_written(out)


def test_usage_errors(qwen3_ckpts, out):
    assert convert(qwen3_ckpts / "dense")[0] == EXIT_USAGE
    code, message = convert(qwen3_ckpts / "lora", "--model-out", out / "m", "--adapter-out", out / "a", "--merge")
    assert code == EXIT_USAGE and "--merge" in message
    assert convert(qwen3_ckpts / "dense", "--model-out", out / "m", "--max-shard-size", "lots")[0] == EXIT_USAGE
    assert_nothing_written(out)


# ---------------------------------------------------------------- hostile and unlucky checkpoints
def edit_metadata(root: Path, change) -> None:
    """Apply ``change`` to the test checkpoint's own Metadata object and write it back."""
    metadata_file = root / ITER / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())  # our own test file
    change(metadata)
    metadata_file.write_bytes(pickle.dumps(metadata))


def test_overlapping_chunks_whose_counts_add_up_are_refused(qwen3_ckpts, tmp_path, out):
    """Layer 1's chunk moved onto layer 0's: the element counts still add up, layer 1 is a gap."""
    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)
    key = "decoder.layers.mlp.linear_fc2.weight"

    def overlap(metadata):
        first, second = metadata.state_dict_metadata[key].chunks
        second.offsets = first.offsets

    edit_metadata(root, overlap)
    code, message = convert(root, "--model-out", out / "model")
    assert code == EXIT_CHECKPOINT, message
    assert (f"{root / ITER / '.metadata'}: {key} (2, 64, 96) (data in __0_0.distcp): the chunk at offset "
            "(0, 0, 0) (size (1, 64, 96)) overlaps the chunk at offset (0, 0, 0)") in message, message
    assert_nothing_written(out)


@pytest.mark.parametrize("boxes, problem", [
    ([((0, 0), (2, 4)), ((2, 0), (2, 4))], None),  # layers
    ([((0, 0), (4, 2)), ((0, 2), (4, 2))], None),  # columns
    ([((0, 0), (2, 2)), ((0, 2), (2, 2)), ((2, 0), (2, 4))], None),  # not a grid, still a tiling
    ([((0, 0), (2, 4)), ((0, 0), (2, 4))], "overlaps"),  # the same box twice: counts add up to 16
    ([((0, 0), (3, 4)), ((2, 0), (1, 4))], "overlaps"),  # partly: counts add up, row 3 is a gap
    ([((0, 0), (3, 3)), ((1, 1), (3, 3)), ((0, 3), (1, 1)), ((3, 0), (1, 1))], "overlaps"),  # staggered
    ([((0, 0), (2, 4))], "cover 8 of its 16 elements"),
])
def test_chunk_coverage_on_boxes(boxes, problem):
    from bridge_ext.checkpoint.coverage import coverage_problem

    found = coverage_problem((4, 4), boxes)
    assert found is None if problem is None else problem in found, found


def test_chunk_record_too_small_for_an_absurd_size(qwen3_ckpts, tmp_path, out):
    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)

    def absurd(metadata):
        entry = metadata.state_dict_metadata["output_layer.weight"]
        entry.size = torch.Size([10**12, 64])
        entry.chunks[0].sizes = torch.Size([10**12, 64])

    edit_metadata(root, absurd)
    code, message = convert(root, "--model-out", out / "model")
    assert code == EXIT_CHECKPOINT, message
    assert re.search(r"output_layer\.weight chunk at offset \(0, 0\) of size \(1000000000000, 64\) needs "
                     r"256000000000000 bytes, but its record in __0_0\.distcp has \d+", message), message
    assert_nothing_written(out)


def test_non_string_state_dict_key(qwen3_ckpts, tmp_path, out):
    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)
    edit_metadata(root, lambda m: m.state_dict_metadata.__setitem__(7, m.state_dict_metadata.pop("output_layer.weight")))
    code, message = convert(root, "--model-out", out / "model")
    assert code == EXIT_CHECKPOINT, message
    assert "malformed DCP metadata" in message and "a state dict key is a int (7), not a name" in message
    assert_nothing_written(out)


def deep_tuple_key_pickle(depth: int) -> bytes:
    """``{((((),),)...): None}``, the tuple nested ``depth`` deep: built opcode by opcode (pickle.dumps recurses)."""
    return b"\x80\x04}" + b")" + b"\x85" * depth + b"Ns."


@pytest.mark.parametrize("depth", [20_000])
def test_deeply_nested_metadata_pickle(qwen3_ckpts, tmp_path, out, depth):
    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)
    (root / ITER / ".metadata").write_bytes(deep_tuple_key_pickle(depth))
    code, message = convert(root, "--model-out", out / "model")
    assert code == EXIT_CHECKPOINT, message
    assert "refusing to unpickle: objects nested more than 100 deep" in message, message
    assert_nothing_written(out)


def test_million_deep_pickle_is_refused_before_anything_is_built():
    """A million deep: hashing that key overflows the C stack (the process dies with SIGSEGV)."""
    started = time.perf_counter()
    with pytest.raises(UnsafePickleError, match="objects nested more than 100 deep"):
        safe_unpickle(deep_tuple_key_pickle(1_000_000), "deep.pickle")
    assert time.perf_counter() - started < 1


@pytest.mark.parametrize("name, limit", [(".metadata", "1 GiB"), ("run_config.yaml", "16 MiB"),
                                         ("metadata.json", "1 MiB")])
def test_huge_sparse_control_file_is_refused_quickly(qwen3_ckpts, tmp_path, out, name, limit):
    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)
    with open(root / ITER / name, "r+b") as handle:
        handle.truncate(8 << 30)  # sparse: 8 GiB on paper, nothing on disk
    started = time.perf_counter()
    code, message = convert(root, "--model-out", out / "model")
    assert code == EXIT_CHECKPOINT, message
    assert f"{root / ITER / name}: 8589934592 bytes, more than the {limit} such a file may hold" in message
    assert time.perf_counter() - started < 5
    assert_nothing_written(out)


@pytest.mark.parametrize("tracker", ["\u00b9\u2070", "\uff11\uff10", "9" * 5000, "1e1", "-10", "", "10 release"],
                         ids=["superscript", "full-width", "5000-digits", "exponent", "negative", "empty", "two-words"])
def test_tracker_holds_ascii_digits_or_release_only(qwen3_ckpts, tmp_path, out, tracker):
    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)
    (root / "latest_checkpointed_iteration.txt").write_text(tracker, encoding="utf-8")
    code, message = convert(root, "--model-out", out / "model")
    assert code == EXIT_CHECKPOINT, message
    assert f"{root / 'latest_checkpointed_iteration.txt'}: " in message
    assert ("expected an iteration number (ASCII digits, at most 18) or 'release'" in message
            or "5000 bytes, more than the 4 KiB such a file may hold" in message), message
    assert_nothing_written(out)


def test_tracker_with_surrounding_whitespace_is_fine(qwen3_ckpts, tmp_path, out):
    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)
    (root / "latest_checkpointed_iteration.txt").write_text(" 10\n")
    code, message = convert(root, "--model-out", out / "model")
    assert code == 0, message


def test_distcp_that_is_a_directory(qwen3_ckpts, tmp_path, out):
    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)
    data = root / ITER / "__0_0.distcp"
    data.unlink()
    data.mkdir()
    code, message = convert(root, "--model-out", out / "model")
    assert code == EXIT_CHECKPOINT, message
    assert f"{data}: a directory, but the metadata stores tensor data in it" in message
    assert_nothing_written(out)


def test_billion_laughs_run_config_fails_fast(qwen3_ckpts, tmp_path, out):
    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)
    laughs = ["  lol0: &lol0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    laughs += [f"  lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 10)}]" for i in range(1, 10)]
    run_config = root / ITER / "run_config.yaml"
    run_config.write_text(run_config.read_text().replace("model:\n", "model:\n" + "\n".join(laughs) + "\n", 1))
    started = time.perf_counter()
    code, message = convert(root, "--model-out", out / "model")
    assert time.perf_counter() - started < 2
    assert code == EXIT_CHECKPOINT, message
    assert f"{run_config}: expands to more than 100000 values (aliases repeating aliases)" in message
    assert_nothing_written(out)


# ---------------------------------------------------------------- the config against run_config.yaml
def changed_config(qwen3_hf: Path, tmp_path: Path, change) -> Path:
    config = tmp_path / "config"
    shutil.copytree(qwen3_hf, config)
    settings = json.loads((config / "config.json").read_text())
    change(settings)
    (config / "config.json").write_text(json.dumps(settings))
    return config


CONFIG_DISAGREEMENTS = {  # family: (change to the tiny Qwen3's config.json, what the message must name)
    # same q/k/v widths (8 x 8 = 4 x 16, 4 x 8 = 2 x 16): the shapes agree, the heads do not
    "attention heads and groups": (
        {"num_attention_heads": 8, "head_dim": 8, "num_key_value_heads": 4},
        ["attention: config.json has num_attention_heads = 8, run_config.yaml has num_attention_heads = 4",
         "config.json has num_key_value_heads = 4, run_config.yaml has num_query_groups = 2",
         "config.json has head_dim = 8, run_config.yaml has kv_channels = 16"]),
    "widths": (
        {"intermediate_size": 128, "num_hidden_layers": 3, "layer_types": ["full_attention"] * 3},
        ["layers and widths: config.json has num_hidden_layers = 3, run_config.yaml has num_layers = 2",
         "config.json has intermediate_size = 128, run_config.yaml has ffn_hidden_size = 96"]),
    "rotary": (
        {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5}},
        ["rotary embedding: config.json has rope_theta = 500000.0, run_config.yaml has rotary_base = 10000.0",
         "config.json has partial_rotary_factor = 0.5, run_config.yaml has rotary_percent = 1.0"]),
    "norm": (
        {"rms_norm_eps": 1e-5},
        ["normalization: config.json has rms_norm_eps = 1e-05, run_config.yaml has layernorm_epsilon = 1e-06"]),
    "vocabulary and tying": (
        {"tie_word_embeddings": True, "vocab_size": 256},
        ["config.json has vocab_size = 256, run_config.yaml has vocab_size = 128",
         "config.json has tie_word_embeddings = True, run_config.yaml has share_embeddings_and_output_weights = False"]),
}


@pytest.mark.parametrize("family", CONFIG_DISAGREEMENTS)
def test_config_that_is_another_model_than_run_config_is_refused(qwen3_ckpts, qwen3_hf, tmp_path, out, family):
    change, expected = CONFIG_DISAGREEMENTS[family]
    config = changed_config(qwen3_hf, tmp_path, lambda settings: settings.update(change))
    code, message = convert(qwen3_ckpts / "dense", "--hf-config", config, "--model-out", out / "model")
    assert code == EXIT_MISMATCH, message
    assert (f"{config / 'config.json'} describes another model than the checkpoint's "
            f"{qwen3_ckpts / 'dense' / ITER / 'run_config.yaml'}") in message, message
    for fragment in expected:
        assert fragment in message, (fragment, message)
    assert_nothing_written(out)


def test_moe_settings_are_cross_checked(qwen3_ckpts):
    """Expert count, expert width, top-k and shared expert of a Qwen3-MoE config against a run config."""
    from dataclasses import replace

    from transformers import Qwen3MoeConfig

    from bridge_ext.checkpoint.config_check import ConfigMismatchError, check_config_matches_run_config

    recorded = CheckpointReader(qwen3_ckpts / "dense").run_config
    # softmax before the top-k: Qwen3MoeConfig's default norm_topk_prob=False (qwen3_moe_bridge.py)
    trained = replace(recorded, model={**recorded.model, "num_moe_experts": 8, "moe_ffn_hidden_size": 32,
                                       "moe_router_topk": 2, "moe_router_pre_softmax": True})
    def moe_config(experts: int, width: int, top_k: int) -> Qwen3MoeConfig:
        return Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                              num_experts=experts, moe_intermediate_size=width, num_experts_per_tok=top_k)

    check_config_matches_run_config(moe_config(8, 32, 2), trained, "moe/config.json")  # the same model: accepted
    config = moe_config(16, 16, 4)
    with pytest.raises(ConfigMismatchError) as error:
        check_config_matches_run_config(config, trained, "moe/config.json")
    message = str(error.value)
    for fragment in ("mixture of experts: config.json has num_experts = 16, run_config.yaml has num_moe_experts = 8",
                     "config.json has moe_intermediate_size = 16, run_config.yaml has moe_ffn_hidden_size = 32",
                     "config.json has num_experts_per_tok = 4, run_config.yaml has moe_router_topk = 2"):
        assert fragment in message, (fragment, message)


# ---------------------------------------------------------------- a hostile --hf-base
BAD_FIELDS = {
    "num_attention_heads": (0, "num_attention_heads is 0; it must be an integer from 1 to"),
    "head_dim": (0, "head_dim is 0; it must be an integer from 1 to"),
    "vocab_size": (-5, "vocab_size is -5; it must be an integer from 1 to"),
    "hidden_size": ("abc", "hidden_size is 'abc'; it must be an integer from 1 to"),
    "num_hidden_layers": (10**9, "num_hidden_layers is 1000000000; it must be an integer from 1 to 10000"),
    "rms_norm_eps": (-1.0, "rms_norm_eps is -1.0; it must be a positive number"),
    "num_key_value_heads": (3, "num_attention_heads (4) is not a multiple of num_key_value_heads (3)"),
    "rope_parameters": ({"rope_type": "default", "rope_theta": float("nan")},
                        "rope_parameters.rope_theta is nan; it must be a positive number"),
}


@pytest.mark.parametrize("field", BAD_FIELDS)
def test_hf_base_config_with_impossible_values(qwen3_ckpts, qwen3_hf, tmp_path, out, field):
    value, expected = BAD_FIELDS[field]
    base = changed_config(qwen3_hf, tmp_path, lambda settings: settings.update({field: value}))
    code, message = convert(qwen3_ckpts / "dense", "--hf-base", base, "--model-out", out / "model")
    assert code == EXIT_MISMATCH, message
    assert f"{base / 'config.json'}: {expected}" in message, message
    assert_nothing_written(out)


def hf_base_copy(qwen3_hf: Path, tmp_path: Path) -> Path:
    base = tmp_path / "base"
    shutil.copytree(qwen3_hf, base)
    return base


def _break_index(base: Path) -> None:
    (base / "model.safetensors.index.json").write_text('{"weight_map": {"model.embed_tokens.weight": ')


def _garble_safetensors_header(base: Path) -> None:
    with open(base / "model.safetensors", "r+b") as handle:
        handle.write(b"\xff" * 64)


@pytest.mark.parametrize(("damage", "file", "complaint"), [
    (_break_index, "model.safetensors.index.json", "not valid JSON"),
    (_garble_safetensors_header, "model.safetensors", "not a readable safetensors file"),
])
def test_hf_base_with_a_damaged_file(qwen3_ckpts, qwen3_hf, tmp_path, out, damage, file, complaint):
    base = hf_base_copy(qwen3_hf, tmp_path)
    damage(base)
    code, message = convert(qwen3_ckpts / "adapter", "--hf-base", base, "--model-out", out / "model", "--merge")
    assert code == EXIT_MISMATCH, message
    assert f"{base / file}: {complaint}" in message, message
    assert_nothing_written(out)


def test_hf_config_folder_with_broken_index(qwen3_ckpts, qwen3_hf, tmp_path, out):
    config = hf_base_copy(qwen3_hf, tmp_path)
    (config / "model.safetensors.index.json").write_text("[1, 2")
    code, message = convert(qwen3_ckpts / "dense", "--hf-config", config, "--model-out", out / "model")
    assert code == EXIT_MISMATCH, message
    assert f"{config / 'model.safetensors.index.json'}: not valid JSON" in message, message
    assert_nothing_written(out)


def test_hf_base_index_pointing_outside_the_folder_is_refused(qwen3_ckpts, qwen3_hf, tmp_path, out):
    base = hf_base_copy(qwen3_hf, tmp_path)
    (tmp_path / "other").mkdir()
    (base / "model.safetensors").rename(tmp_path / "other" / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "other" / "model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "../other/model.safetensors")}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    code, message = convert(qwen3_ckpts / "adapter", "--hf-base", base, "--model-out", out / "model", "--merge")
    assert code == EXIT_MISMATCH, message
    assert (f"{base / 'model.safetensors.index.json'}: weight_map points at '../other/model.safetensors', "
            f"outside {base}; refusing to read it") in message, message
    assert_nothing_written(out)


# ---------------------------------------------------------------- NaN, Inf and casts that overflow
def replace_chunk(root: Path, key: str, offsets: tuple[int, ...], change) -> None:
    """Store ``change(chunk)`` as a new record of that chunk (appended to its .distcp, as DCP writes records)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    reader = CheckpointReader(root)
    chunk = next(c for c in reader.tensors[key].chunks if c.offsets == offsets)
    index = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))
    value = change(reader.read_tensor(key)[index].clone())
    buffer = io.BytesIO()
    torch.save(value, buffer)
    data = root / ITER / chunk.stored.file
    start = data.stat().st_size
    with open(data, "ab") as handle:
        handle.write(buffer.getvalue())

    def point_at_new_record(metadata):
        info = metadata.storage_data[MetadataIndex(key, torch.Size(offsets))]
        info.offset, info.length = start, len(buffer.getvalue())

    edit_metadata(root, point_at_new_record)


def test_nan_and_inf_are_counted_and_reported(qwen3_ckpts, tmp_path, out):
    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)

    def poison(chunk):
        chunk.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        return chunk

    replace_chunk(root, "decoder.layers.mlp.linear_fc2.weight", (1, 0, 0), poison)
    code, message = convert(root, "--model-out", out / "model")
    assert code == 0, message
    assert ("warning: 3 non-finite value(s) (NaN or Inf) in 1 tensor(s): model.layers.1.mlp.down_proj.weight (3)"
            in message), message


def test_float16_cast_beyond_its_range_is_refused_unless_allowed(qwen3_ckpts, tmp_path, out):
    root = copy_checkpoint(qwen3_ckpts / "dense", tmp_path)
    replace_chunk(root, "decoder.layers.mlp.linear_fc2.weight", (0, 0, 0), lambda chunk: chunk.mul_(0).add_(1e5))
    code, message = convert(root, "--model-out", out / "model", "--dtype", "float16")
    assert code == EXIT_MISMATCH, message
    assert ("model.layers.0.mlp.down_proj.weight: casting torch.float32 to torch.float16 turns 6144 finite value(s) "
            "into infinities (largest magnitude 1e+05; torch.float16 ends at 65504)") in message, message
    assert "--allow-overflow" in message
    assert_nothing_written(out)
    code, message = convert(root, "--model-out", out / "model", "--dtype", "float16", "--allow-overflow")
    assert code == 0, message
    assert "warning: 6144 non-finite value(s) (NaN or Inf) in 1 tensor(s): model.layers.0.mlp.down_proj.weight" in message
    code, message = convert(root, "--model-out", out / "bf16", "--dtype", "bfloat16")  # in range: no warning
    assert code == 0 and "warning" not in message, message


def test_merged_lora_beyond_float16_is_refused(qwen3_ckpts, qwen3_hf, tmp_path, out):
    """Base and adapter are in range; W + alpha/r * B A is not (the merge is computed in float32)."""
    root = copy_checkpoint(qwen3_ckpts / "adapter", tmp_path)
    replace_chunk(root, "decoder.layers.mlp.linear_fc2.adapter.linear_out.weight", (1, 0, 0),
                  lambda chunk: chunk.mul_(0).add_(1e6))
    code, message = convert(root, "--hf-base", qwen3_hf, "--model-out", out / "model", "--merge", "--dtype", "float16")
    assert code == EXIT_MISMATCH, message
    assert re.search(r"model\.layers\.1\.mlp\.down_proj\.weight: casting torch\.float32 to torch\.float16 turns "
                     r"\d+ finite value\(s\) into infinities", message), message
    assert_nothing_written(out)


def test_a_peft_type_that_cannot_be_exported_is_refused_naming_it(qwen3_ckpts, tmp_path, out):
    root = copy_checkpoint(qwen3_ckpts / "adapter", tmp_path)
    run_config = root / ITER / "run_config.yaml"
    run_config.write_text(run_config.read_text().replace("megatron.bridge.peft.lora.LoRA",
                                                         "megatron.bridge.peft.ia3.IA3", 1))
    code, message = convert(root, "--adapter-out", out / "adapter")
    assert code == EXIT_CHECKPOINT, message
    assert f"{run_config}: peft is IA3; only LoRA, VLMLoRA, DoRA, CanonicalLoRA adapters can be exported" in message
    assert_nothing_written(out)
