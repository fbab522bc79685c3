"""A live export checks what shapes cannot see, and refuses what it cannot do, before the first tensor.

One tiny Llama Megatron model (4 query heads of 16, 2 KV heads; no LoRA) for the whole module.
"""

from __future__ import annotations

import pytest
import torch

from bridge_ext import export_hf_weights
from bridge_ext_testing.build import build_megatron_model
from bridge_ext_testing.tiny_dense import tiny_dense
from bridge_ext.errors import ExportError


@pytest.fixture(scope="module")
def llama(megatron_cpu, tmp_path_factory):
    return build_megatron_model(tiny_dense(tmp_path_factory.mktemp("llama"), "llama"))


def _config(built, **changes):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(built.hf_dir))
    for key, value in changes.items():
        setattr(config, key, value)
    return config


LIES = {  # change to the Llama's config: what the message must say (every shape stays the same)
    "head grouping": ({"num_attention_heads": 8, "head_dim": 8, "num_key_value_heads": 4},
                      "attention: the Hugging Face config has num_attention_heads = 8, the model's TransformerConfig "
                      "has num_attention_heads = 4; attention: the Hugging Face config has num_key_value_heads = 4, "
                      "the model's TransformerConfig has num_query_groups = 2; attention: the Hugging Face config has "
                      "head_dim = 8, the model's TransformerConfig has kv_channels = 16"),
    "activation": ({"hidden_act": "gelu"},
                   "activation: the Hugging Face config has hidden_act = 'gelu' (torch.nn.functional.gelu), the "
                   "model's TransformerConfig has activation_func = 'torch.nn.functional.silu'"),
    "rope scaling": ({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
                     "rotary embedding: the Hugging Face config has rope_parameters.rope_type = 'linear', the model's "
                     "TransformerConfig has position_embedding_type = 'default' (position_embedding_type = 'rope', "
                     "rope_scaling = False)"),
}


@pytest.mark.parametrize("lie", LIES)
def test_a_config_that_lies_about_what_shapes_cannot_see_is_refused(llama, lie):
    changes, named = LIES[lie]
    with pytest.raises(ExportError) as refused:
        next(export_hf_weights(llama.chunks, hf_config=_config(llama, **changes)))
    assert str(refused.value) == (
        "the Hugging Face config describes another model than the Megatron model's own TransformerConfig "
        f"(exporting would silently compute something else): {named}. Pass the hf_config of the model that was "
        "trained.")


def test_the_true_config_is_accepted(llama):
    exported = dict(export_hf_weights(llama.chunks, hf_config=_config(llama)))
    assert exported["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)


@pytest.mark.parametrize("model", [None, [], torch.nn.Linear(2, 2), [torch.nn.Linear(2, 2)]])
def test_what_is_no_megatron_model_is_refused(model):
    with pytest.raises(ExportError) as refused:
        next(export_hf_weights(model, hf_config="/nonexistent"))
    shown = "an empty list" if model == [] else None
    if shown:
        assert str(refused.value) == "model is an empty list: give a Megatron-Core model or its virtual-pipeline chunks"
    else:
        assert str(refused.value) == (
            "model must be a Megatron-Core model (a torch.nn.Module whose .config is its TransformerConfig) or a "
            f"list of its virtual-pipeline chunks, not {'None' if model is None else 'Linear'}")


def test_an_hf_config_that_is_not_there_is_an_export_error(llama):
    with pytest.raises(ExportError, match=r"^hf_config '/nonexistent': transformers cannot read a config there: "):
        next(export_hf_weights(llama.chunks, hf_config="/nonexistent"))


@pytest.mark.parametrize(("option", "value", "message"), [
    ("dtype", torch.int8, "dtype must be a floating-point torch dtype (torch.bfloat16, torch.float16, "
                          "torch.float32...), not torch.int8"),
    ("device", "meta", "device must be None (tensors where the model is) or 'cpu', not 'meta'"),
    ("device", "no such device", "device must be None (tensors where the model is) or 'cpu', not 'no such device'"),
])
def test_casts_and_devices_that_yield_no_export_are_refused(llama, option, value, message):
    with pytest.raises(ExportError) as refused:
        next(export_hf_weights(llama.chunks, **{option: value}))
    assert str(refused.value) == message


def test_a_float16_cast_that_overflows_is_refused_unless_allowed(llama, tmp_path):
    from bridge_ext import save_hf_pretrained
    from bridge_ext.value_check import OverflowingCastError

    norm = llama.chunks[0].decoder.final_layernorm.weight
    original = norm.detach().clone()
    with torch.no_grad():
        norm[0] = 1e6  # beyond float16's 65504
    try:
        with pytest.raises(OverflowingCastError) as refused:
            dict(export_hf_weights(llama.chunks, dtype=torch.float16))
        assert str(refused.value) == (
            "model.norm.weight: casting torch.float32 to torch.float16 turns 1 finite value(s) into infinities "
            "(largest magnitude 1e+06; torch.float16 ends at 65504); keep the checkpoint's dtype, choose bfloat16 "
            "or float32, or pass allow_overflow=True to write them anyway")
        with pytest.raises(OverflowingCastError, match="^model.norm.weight: casting"):
            save_hf_pretrained(llama.chunks, tmp_path / "model", dtype=torch.float16)
        assert not (tmp_path / "model").exists()
        exported = dict(export_hf_weights(llama.chunks, dtype=torch.float16, allow_overflow=True))
        assert exported["model.norm.weight"][0] == float("inf")
        assert exported["model.norm.weight"].dtype == torch.float16
    finally:
        with torch.no_grad():
            norm.copy_(original)


def test_a_config_saying_zero_mtp_layers_matches_a_model_without_any(llama):
    """``num_nextn_predict_layers: 0`` (as Kimi-K2's config.json says) is a model without MTP
    layers, which megatron-core spells ``mtp_num_layers = None``."""
    assert "model.norm.weight" in dict(export_hf_weights(llama.chunks, hf_config=_config(
        llama, num_nextn_predict_layers=0)))
    with pytest.raises(ExportError, match=r"num_nextn_predict_layers = 1, the model's TransformerConfig has "
                                          r"mtp_num_layers = 0"):
        next(export_hf_weights(llama.chunks, hf_config=_config(llama, num_nextn_predict_layers=1)))


def test_a_field_the_table_cannot_compare_is_said_not_skipped(llama):
    from bridge_ext.config_compare import Attributes, compare
    from bridge_ext.tables.config_fields import standard

    fields = standard({"hidden_act": "this architecture's activation has no Megatron name"})
    comparison = compare(_config(llama, hidden_act="gelu"), Attributes(llama.chunks[0].config), fields)
    assert comparison.differences == []
    assert comparison.notes() == ["config field hidden_act not compared with the Megatron model's: this "
                                  "architecture's activation has no Megatron name"]
    with pytest.raises(ValueError, match=r"no such config fields to leave uncompared: \['hidden_activation'\]"):
        standard({"hidden_activation": "no such field in the list"})
    with pytest.raises(ValueError, match=r"no such config fields to default: \['rotary_dim'\]"):
        standard(defaults={"rotary_dim": 1.0})


def test_save_hf_pretrained_refuses_the_same_lie_and_writes_nothing(llama, tmp_path):
    from bridge_ext import save_hf_pretrained

    config = _config(llama, num_attention_heads=8, head_dim=8, num_key_value_heads=4)
    with pytest.raises(ExportError, match=r"attention: the Hugging Face config has num_attention_heads = 8, "):
        save_hf_pretrained(llama.chunks, tmp_path / "model", hf_config=config)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("groups", "differences"), [((1, 1), []), ((8, 4), [
    "mixture of experts: config.json has n_group = 8, run_config.yaml has moe_router_num_groups = None (no "
    "group limit: one group)",
    "mixture of experts: config.json has topk_group = 4, run_config.yaml has moe_router_group_topk = None (no "
    "group limit: one group)"])])
def test_megatron_s_ungrouped_routing_is_one_group_of_experts(groups, differences):
    """megatron-core routes with no group limit where moe_router_num_groups / group_topk are None
    (GLM-4.5V's provider leaves them unset): the top k of all experts, as n_group = topk_group = 1."""
    from types import SimpleNamespace

    from bridge_ext.config_compare import compare
    from bridge_ext.tables.config_fields import STANDARD

    config = SimpleNamespace(n_group=groups[0], topk_group=groups[1], n_routed_experts=4)
    megatron = {"num_moe_experts": 4, "moe_router_num_groups": None, "moe_router_group_topk": None}
    assert compare(config, megatron, STANDARD).differences == differences
