"""A live export refuses bad inputs before the first tensor leaves; persistent buffers are state.

One tiny dense Qwen3 Megatron model (no LoRA) for the whole module.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bridge_ext import export_hf_weights
from bridge_ext.cpu.build import build_megatron_model
from bridge_ext.cpu.tiny_dense import tiny_dense
from bridge_ext.errors import ExportError
from bridge_ext.live import LiveModelSource
from bridge_ext.table import ExtraWeights, rule


@pytest.fixture(scope="module")
def built(megatron_cpu, tmp_path_factory):
    return build_megatron_model(tiny_dense(tmp_path_factory.mktemp("qwen3"), "qwen3"))


@pytest.fixture()
def mlp(built):
    """Layer 1's MLP; buffers a test registers there are removed afterwards."""
    module = built.chunks[0].decoder.layers[1].mlp
    before = set(module._buffers)
    yield module
    for name in set(module._buffers) - before:
        del module._buffers[name]
        module._non_persistent_buffers_set.discard(name)


def test_persistent_buffers_are_model_state_and_refused_when_unmapped(built, mlp):
    mlp.register_buffer("token_counts", torch.zeros(4), persistent=False)  # runtime state: ignored
    assert "decoder.layers.1.mlp.token_counts" not in LiveModelSource(built.chunks).base_names()
    assert len(dict(export_hf_weights(built.chunks))) > 0
    mlp.register_buffer("router_bias", torch.arange(4.0))
    source = LiveModelSource(built.chunks)
    assert "decoder.layers.1.mlp.router_bias" in source.base_names()
    assert torch.equal(source.shards("decoder.layers.1.mlp.router_bias")[0], torch.arange(4.0))
    with pytest.raises(ExportError, match=r"decoder\.layers\.1\.mlp\.router_bias"):
        next(export_hf_weights(built.chunks))


def test_a_rule_maps_a_buffer(built, mlp, monkeypatch):
    import model_mappings

    mlp.register_buffer("router_bias", torch.arange(4.0))
    table = model_mappings.table_for("qwen3")
    extended = dataclasses.replace(
        table, rules=(*table.rules, rule("decoder.layers.{layer}.mlp.router_bias", "extra.layers.{layer}.bias",
                                         tp="replicated")),
        extra_weights=ExtraWeights(prefixes=("extra.",), count_key="num_hidden_layers"))
    monkeypatch.setattr(model_mappings, "_REGISTERED", {})
    model_mappings.register_table(extended, overwrite=True)
    exported = dict(export_hf_weights(built.chunks))
    assert torch.equal(exported["extra.layers.1.bias"], torch.arange(4.0))
