"""A live export checks what shapes cannot see, and refuses what it cannot do, before the first tensor.

One tiny Llama Megatron model (4 query heads of 16, 2 KV heads; no LoRA) for the whole module.
"""

from __future__ import annotations

import pytest
import torch

from bridge_ext import export_hf_weights
from bridge_ext.cpu.build import build_megatron_model
from bridge_ext.cpu.tiny_dense import tiny_dense
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
