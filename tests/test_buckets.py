"""Buckets of a weight-sync stream: sizes, the last-bucket marker, and expert groups kept whole."""

from __future__ import annotations

import re

import pytest
import torch

from bridge_ext import export_hf_buckets, export_hf_weights
from bridge_ext.export import buckets


def _stream(sizes: dict[str, int]):
    return ((name, torch.zeros(size, dtype=torch.uint8)) for name, size in sizes.items())


def _names(result) -> list[list[str]]:
    return [[name for name, _ in bucket.tensors] for bucket in result]


def test_buckets_cut_by_size_and_mark_only_the_last():
    result = list(buckets(_stream({"a": 4, "b": 4, "c": 4, "big": 20, "d": 1}), bucket_bytes=8))
    assert _names(result) == [["a", "b"], ["c"], ["big"], ["d"]]
    assert [bucket.is_last for bucket in result] == [False, False, False, True]
    assert [bucket.is_last for bucket in buckets(iter(()), 8)] == [True]


def test_a_group_is_never_split_even_past_the_bucket_size():
    sizes = {"x": 6, "g.0": 2, "g.1": 2, "g.2": 2, "y": 2, "z": 7}
    groups = {"g.0": "g", "g.1": "g", "g.2": "g"}
    result = _names(buckets(_stream(sizes), bucket_bytes=8, groups=groups))
    # without groups the cut would fall between g.0 and g.1
    assert _names(buckets(_stream(sizes), bucket_bytes=8)) == [["x", "g.0"], ["g.1", "g.2", "y"], ["z"]]
    assert result == [["x", "g.0", "g.1", "g.2"], ["y"], ["z"]]


def test_interleaved_groups_close_before_a_cut():
    sizes = {"a.0": 3, "b.0": 3, "a.1": 3, "b.1": 3, "c": 3}
    groups = {"a.0": "a", "a.1": "a", "b.0": "b", "b.1": "b"}
    assert _names(buckets(_stream(sizes), bucket_bytes=4, groups=groups)) == [["a.0", "b.0", "a.1", "b.1"], ["c"]]


# -- on a real export: per-expert adapters of a tiny Qwen3.5-MoE --------------------------------
EXPERT = re.compile(r"^(?P<group>.*\.experts)\.\d+\.")


@pytest.fixture(scope="module")
def moe_chunks(megatron_cpu, tmp_path_factory):
    from bridge_ext_testing import tiny_models
    from bridge_ext_testing.build import LoraSettings, build_megatron_model, randomize_lora

    hf_dir = tiny_models.tiny_qwen35_moe(tmp_path_factory.mktemp("qwen35_moe"))
    built = build_megatron_model(hf_dir, lora=LoraSettings(target_modules=("linear_fc1", "linear_fc2")))
    randomize_lora(built.chunks, seed=1)
    return built.chunks


@pytest.mark.parametrize("bucket_bytes", [1, 3000, 20000])
def test_per_expert_adapter_buckets_keep_each_layers_experts_together(moe_chunks, bucket_bytes):
    kwargs = dict(adapters_only=True, expert_adapter_layout="per_expert")
    result = list(export_hf_buckets(moe_chunks, bucket_bytes, **kwargs))
    bucket_of_group: dict[str, set[int]] = {}
    for index, bucket in enumerate(result):
        for name, _ in bucket.tensors:
            found = EXPERT.match(name)
            if found:
                bucket_of_group.setdefault(found["group"], set()).add(index)
    assert len(bucket_of_group) == 5  # 4 decoder layers and the MTP layer, 4 experts each
    assert all(len(indices) == 1 for indices in bucket_of_group.values()), bucket_of_group
    assert len(result) > 1  # the size still cuts between groups
    streamed = [name for bucket in result for name, _ in bucket.tensors]
    assert streamed == [name for name, _ in export_hf_weights(moe_chunks, **kwargs)]
