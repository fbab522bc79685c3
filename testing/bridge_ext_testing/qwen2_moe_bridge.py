"""A Megatron-Bridge model bridge for Qwen2-MoE, which Megatron-Bridge 0.6.2 does not ship.

Declared from Megatron-Bridge's own building blocks (``GPTModelProvider`` settings as its
Qwen3-MoE / Qwen3-Next bridges set them, its ``AutoMapping`` / ``QKVMapping`` /
``GatedMLPMapping``), so that a ``qwen2_moe`` folder builds, loads and exports through
``AutoBridge`` like the shipped types. Importing this module registers it (the CPU builder does,
for a ``qwen2_moe`` folder): support for the CPU demo and tests; the exporter does not use it.

Qwen2-MoE against Qwen3-MoE: qkv bias, no q/k norms, a shared expert scaled by
``sigmoid(shared_expert_gate(x))`` (Megatron's ``moe_shared_expert_gate``), router softmax over
all experts without renormalising the top k (``norm_topk_prob=False`` -> Megatron's
``moe_router_pre_softmax``), dense layers where ``mlp_only_layers`` / ``decoder_sparse_step``
say (``moe_layer_freq``).
"""

from __future__ import annotations

from megatron.bridge.models.conversion.mapping_registry import MegatronMappingRegistry
from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge
from megatron.bridge.models.conversion.param_mapping import AutoMapping, GatedMLPMapping, QKVMapping, ReplicatedMapping
from megatron.core.models.gpt.gpt_model import GPTModel
from transformers import Qwen2MoeForCausalLM


def moe_layer_pattern(config) -> list[int]:
    """1 for a sparse (MoE) layer, 0 for a dense one, as ``Qwen2MoeDecoderLayer`` decides."""
    return [
        int(i not in config.mlp_only_layers and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0)
        for i in range(config.num_hidden_layers)
    ]


@MegatronModelBridge.register_bridge(source=Qwen2MoeForCausalLM, target=GPTModel, model_type="qwen2_moe")
class Qwen2MoEBridge(MegatronModelBridge):
    def provider_bridge(self, hf_pretrained):
        config = hf_pretrained.config
        provider = super().provider_bridge(hf_pretrained)
        provider.normalization = "RMSNorm"
        provider.gated_linear_unit = True
        provider.add_bias_linear = False
        provider.add_qkv_bias = True
        provider.qk_layernorm = False
        provider.hidden_dropout = 0.0
        provider.ffn_hidden_size = config.intermediate_size
        provider.moe_ffn_hidden_size = config.moe_intermediate_size
        provider.moe_layer_freq = moe_layer_pattern(config)
        provider.moe_router_pre_softmax = not config.norm_topk_prob
        provider.moe_router_load_balancing_type = "aux_loss"
        provider.moe_shared_expert_intermediate_size = config.shared_expert_intermediate_size
        provider.moe_shared_expert_gate = True
        return provider

    def mapping_registry(self) -> MegatronMappingRegistry:
        layer = "decoder.layers.*."
        hf = "model.layers.*."
        direct = {
            "embedding.word_embeddings.weight": "model.embed_tokens.weight",
            "output_layer.weight": "lm_head.weight",
            "decoder.final_layernorm.weight": "model.norm.weight",
            f"{layer}self_attention.linear_qkv.layer_norm_weight": f"{hf}input_layernorm.weight",
            f"{layer}pre_mlp_layernorm.weight": f"{hf}post_attention_layernorm.weight",
            f"{layer}mlp.linear_fc1.layer_norm_weight": f"{hf}post_attention_layernorm.weight",
            f"{layer}self_attention.linear_proj.weight": f"{hf}self_attn.o_proj.weight",
            f"{layer}mlp.router.weight": f"{hf}mlp.gate.weight",
            f"{layer}mlp.shared_experts.linear_fc2.weight": f"{hf}mlp.shared_expert.down_proj.weight",
            f"{layer}mlp.linear_fc2.weight": f"{hf}mlp.down_proj.weight",
        }
        mappings = [AutoMapping(megatron_param=m, hf_param=h) for m, h in direct.items()]
        mappings.append(ReplicatedMapping(megatron_param=f"{layer}mlp.shared_experts.gate_weight",
                                          hf_param=f"{hf}mlp.shared_expert_gate.weight"))
        for kind in ("weight", "bias"):
            mappings.append(QKVMapping(megatron_param=f"{layer}self_attention.linear_qkv.{kind}",
                                       q=f"{hf}self_attn.q_proj.{kind}", k=f"{hf}self_attn.k_proj.{kind}",
                                       v=f"{hf}self_attn.v_proj.{kind}"))
        mappings += [
            GatedMLPMapping(megatron_param=f"{layer}mlp.shared_experts.linear_fc1.weight",
                            gate=f"{hf}mlp.shared_expert.gate_proj.weight", up=f"{hf}mlp.shared_expert.up_proj.weight"),
            GatedMLPMapping(megatron_param=f"{layer}mlp.linear_fc1.weight",
                            gate=f"{hf}mlp.gate_proj.weight", up=f"{hf}mlp.up_proj.weight"),
        ]
        for fc1, fc2 in (("mlp.experts.linear_fc1.weight*", "mlp.experts.linear_fc2.weight*"),
                         ("mlp.experts.local_experts.*.linear_fc1.weight", "mlp.experts.local_experts.*.linear_fc2.weight")):
            mappings += [
                GatedMLPMapping(megatron_param=layer + fc1, gate=f"{hf}mlp.experts.*.gate_proj.weight",
                                up=f"{hf}mlp.experts.*.up_proj.weight"),
                AutoMapping(megatron_param=layer + fc2, hf_param=f"{hf}mlp.experts.*.down_proj.weight"),
            ]
        return MegatronMappingRegistry(*mappings)
