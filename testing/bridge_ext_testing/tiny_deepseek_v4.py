"""A tiny DeepSeek-V4 (``DeepseekV4ForCausalLM``) folder in the published checkpoint's names.

Cut down from DeepSeek-V4-Flash's config.json with every structural feature kept: 4 layers
(sliding, compressed sparse with its indexer, heavily compressed, compressed sparse), hash
routing on the first layer then top-k with the correction bias, 4 experts top-2 and 1 shared,
hyper-connections (``hc_mult`` 2), the grouped output projection (2 groups), sinks, YaRN on the
compressed layers, 1 MTP layer. The head widths and compression rates are the published ones (attention 512 with a
rope part of 64, indexer 128; 4 and 128): vLLM 0.34's compressor builds no other (``Unsupported
head_dim for fused quant+cache``, ``assert compress_ratio in [4, 128]``).

transformers' ``save_pretrained`` writes its renames reverted key by key, which leaves a mixture
(see bridge_ext/tables/deepseek_v4.py); the table's ``PUBLISHED_RENAMES`` turn that into the published
names, and the proof loads the folder back with ``from_pretrained`` and compares every tensor
with the model it came from, so these fix-ups are checked, not trusted.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bridge_ext_testing.tiny_gpt_families import HIDDEN, INIT_STD, NORM_NOISE, ROUTER_STD, VOCAB
from bridge_ext_testing.tiny_models import update_saved_config

LAYER_TYPES = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
               "compressed_sparse_attention"]


def tiny_config():
    from transformers import DeepseekV4Config

    return DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, moe_intermediate_size=32, num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4, num_key_value_heads=1, head_dim=512, q_lora_rank=24, num_experts_per_tok=2,
        n_routed_experts=4, n_shared_experts=1, layer_types=list(LAYER_TYPES),
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"], hc_mult=2, sliding_window=8, o_groups=2,
        o_lora_rank=16, index_n_heads=2, index_head_dim=128, index_topk=4, num_nextn_predict_layers=1,
        partial_rotary_factor=0.125, max_position_embeddings=256, tie_word_embeddings=False,
        # YaRN on the compressed layers as published (factor 16 over 65536 there)
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "beta_fast": 32.0, "beta_slow": 1.0},
        initializer_range=INIT_STD,
    )


def _perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter random (transformers leaves some at constants), norms around 1, routers
    well separated; the hash table a fixed random assignment."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + torch.randn(param.shape, generator=generator) * NORM_NOISE)
            elif name.endswith("gate.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * ROUTER_STD)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)
        for name, buffer in model.named_buffers():
            if name.endswith("tid2eid"):
                buffer.copy_(torch.randint(0, model.config.n_routed_experts, buffer.shape, generator=generator))


def _mtp(published: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The MTP layer as Megatron-Bridge and vLLM's drafter name it: a sliding-attention decoder
    layer with a top-k MoE (layer 0's attention, layer 1's MLP shapes), ``enorm`` / ``hnorm``,
    ``e_proj`` / ``h_proj``, its final ``norm`` and hyper-connection head."""
    def like(name: str) -> torch.Tensor:
        tensor = published[name]
        if name.endswith("norm.weight"):
            return 1 + torch.randn(tensor.shape, generator=generator) * NORM_NOISE
        return torch.randn(tensor.shape, generator=generator) * INIT_STD

    out = {}
    for name in sorted(published):
        for layer, keep in ((0, lambda rest: rest.startswith(("attn.", "attn_norm", "hc_attn_"))),
                            (1, lambda rest: rest.startswith(("ffn.", "ffn_norm", "hc_ffn_")))):
            prefix = f"layers.{layer}."
            if name.startswith(prefix) and keep(name[len(prefix):]):
                out["mtp.0." + name[len(prefix):]] = like(name)
    for name in ("hc_head_fn", "hc_head_base", "hc_head_scale", "norm.weight"):
        out["mtp.0." + name] = like(name)
    for name in ("enorm.weight", "hnorm.weight"):
        out["mtp.0." + name] = 1 + torch.randn(HIDDEN, generator=generator) * NORM_NOISE
    for name in ("e_proj.weight", "h_proj.weight"):
        out["mtp.0." + name] = torch.randn(HIDDEN, HIDDEN, generator=generator) * INIT_STD
    return out


def tiny_deepseek_v4(directory: str | Path, *, seed: int = 0) -> Path:
    """The folder: transformers' config.json (plus ``topk_method`` as published), model.safetensors
    in the published names, MTP included."""
    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV4ForCausalLM

    from bridge_ext.tables import table_for

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(tiny_config()).float().eval()
    _perturb(model, torch.Generator().manual_seed(seed))
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    published_name = table_for(model.config).published_name
    published = {published_name(name): tensor for name, tensor in load_file(str(out / "model.safetensors")).items()}
    published.update(_mtp(published, torch.Generator().manual_seed(seed + 1000)))
    save_file(published, str(out / "model.safetensors"), metadata={"format": "pt"})
    # as published; vLLM 0.34 builds the router's correction bias only for it
    update_saved_config(out, {"topk_method": "noaux_tc"})
    return out
