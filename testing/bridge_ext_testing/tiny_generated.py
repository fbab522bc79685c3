"""Tiny Hugging Face models of the architectures whose tables are generated from Megatron-Bridge.

Supports ``bridge-ext tables generate`` (which resolves on such a model what Megatron-Bridge's
registry leaves to run time) and the generated tables' conformance module; the exporter does
not use it. One entry per ``model_type``: the config fields that differ from :data:`BASE`.
transformers' own config class, initialiser and ``save_pretrained`` make the folder, so its
names and layouts are what transformers writes.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: Small and lopsided: query heads != KV heads, 2 * intermediate != hidden.
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
AUDIO = dict(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=48, d_model=32,
             max_source_positions=20)
VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14)
MROPE = [2, 3, 3]  # head_dim 16: 8 rotary frequencies
#: the published Qwen2.5-Omni / Qwen3-Omni value, which Megatron-Bridge 0.6.2 takes: it reads
#: ``text_config.rope_theta``, absent in transformers 5's configs (``rope_parameters``), and falls back to it
OMNI_ROPE_THETA = 1000000.0
THINKER_TOKENS = dict(audio_token_id=100, audio_token_index=100, image_token_id=101, image_token_index=101,
                      video_token_id=102, video_token_index=102, vision_start_token_id=103,
                      audio_start_token_id=104, audio_end_token_id=105)

#: MiMo-V2-Flash as XiaomiMiMo/MiMo-V2-Flash's config.json spells it, scaled down: transformers'
#: fields (layer_types, mlp_layer_types, per-layer-type rope_parameters) and, saying the same, the
#: published fields Megatron-Bridge's bridge reads (hybrid_layer_pattern, moe_layer_freq,
#: rope_theta / swa_rope_theta, swa_num_key_value_heads: transformers doubles the KV heads of
#: sliding layers itself, layernorm_epsilon; vLLM reads the swa_* and sink fields). Asymmetric head dims (q/k 24, v 16), the published
#: rotary fraction and thetas, a learnable sink on sliding layers.
MIMO_V2_FLASH = dict(
    MOE, n_routed_experts=4, head_dim=24, v_head_dim=16, attention_value_scale=0.707,
    layer_types=["full_attention", "sliding_attention"], mlp_layer_types=["dense", "sparse"],
    rope_parameters={kind: {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.334}
                     for kind, theta in (("full_attention", 5e6), ("sliding_attention", 1e4))},
    hybrid_layer_pattern=[0, 1], moe_layer_freq=[0, 1], rope_theta=5e6, swa_rope_theta=1e4,
    partial_rotary_factor=0.334, swa_num_key_value_heads=4, layernorm_epsilon=1e-5, rms_norm_eps=1e-5,
    swa_num_attention_heads=4, swa_head_dim=24, swa_v_head_dim=16, add_swa_attention_sink_bias=True,
    add_full_attention_sink_bias=False, scoring_func="sigmoid", topk_method="noaux_tc")

#: model_type -> config overrides of :data:`BASE` (the entry a new generated architecture adds).
TINY: dict[str, dict] = {
    "mistral": dict(sliding_window=None),
    # MLA: transformers' attention has as many key/value heads as query heads
    "deepseek_v2": dict(MOE, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                        kv_lora_rank=32, q_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        topk_method="greedy"),
    "exaone_moe": dict(MOE, num_shared_experts=1, first_k_dense_replace=1, sliding_window=4),
    "gemma": dict(tie_word_embeddings=True),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, num_key_value_heads=4),  # experts: intermediate_size
    # EXAONE-4.0-1.2B: full attention only, as Megatron-Bridge's bridge builds it
    "exaone4": dict(sliding_window=None, layer_types=["full_attention"] * 2, tie_word_embeddings=True),
    "nemotron": dict(),
    "gemma2": dict(sliding_window=4, tie_word_embeddings=True),  # window 4 < the 11 test tokens
    # six layers: five sliding (window 4 < the 11 test tokens), one global, as Gemma 3 alternates
    "gemma3_text": dict(sliding_window=4, tie_word_embeddings=True, num_hidden_layers=6),
    # layer 0 dense, layer 1 MoE (moe_layer_start_index 1), one shared expert
    "ernie4_5_moe": dict(MOE, moe_num_shared_experts=1),
    # layer 0 dense, layer 1 MoE; first_k_dense_replace, expert_hidden_dim, route_norm and qk_norm
    # are fields of the published config.json that HYV3Config lacks (Megatron-Bridge's provider and
    # vLLM's HYV3ForCausalLM read them)
    "hy_v3": dict(MOE, num_shared_experts=1, router_scaling_factor=2.5, mlp_layer_types=["dense", "sparse"],
                  first_k_dense_replace=1, expert_hidden_dim=32, route_norm=True, qk_norm=True),
    # window 16 > the 11 test tokens: Megatron-Bridge's window is one token narrower than transformers'
    # (architecture_notes.UNCOMPARED); the conformance module shows that difference on its own
    "mimo_v2_flash": dict(MIMO_V2_FLASH, sliding_window_size=16),
    # SigLIP tower of 2 layers on 16x16 images (16 patches, pooled to 4 image tokens); no pooling
    # head, as Megatron-Bridge builds it (and Gemma 3's checkpoints have none)
    "gemma3": dict(text_config=dict(sliding_window=4, num_hidden_layers=6, tie_word_embeddings=True),
                   vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=16, patch_size=4, vision_use_head=False),
                   mm_tokens_per_image=4, boi_token_index=120, eoi_token_index=121, image_token_index=122),
    # Ministral-3: its text model (yarn rope, Llama-4 query scaling: the defaults Megatron-Bridge's
    # provider assumes); Pixtral tower of 2 layers on 16x16 images; the image token outside the test tokens
    "mistral3": dict(text_config=dict(model_type="ministral3"),
                     vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, head_dim=16, image_size=16, patch_size=4),
                     image_token_index=122, tie_word_embeddings=False),
    # Gemma 4 E2B / E4B-shaped: sliding layers of head dim 16 (window 4 < the 11 test tokens), global
    # ones of 512 (Megatron-Bridge's default, E2B / E4B's), as many KV heads; the last two layers read
    # the keys / values of earlier ones (no k_proj / v_proj / k_norm), double-wide MLP there,
    # per-layer embeddings, logit softcapping; transformers 5.23 reads the head dims only with
    # allow_global_per_layer_attribute_access (in config.json, where every reader finds it)
    "gemma4_text": dict(num_hidden_layers=4, global_head_dim=512, layer_types=["sliding_attention", "full_attention"] * 2,
                        sliding_window=4, num_kv_shared_layers=2, hidden_size_per_layer_input=8,
                        vocab_size_per_layer_input=128, use_double_wide_mlp=True, final_logit_softcapping=30.0,
                        tie_word_embeddings=True, allow_global_per_layer_attribute_access=True),
    # Falcon-H1: every layer parallel Mamba-2 + attention + MLP; mixer of 8 heads of 8 in 2 groups,
    # its gated norm on (after the gate, as the published configs and megatron-core have it); muP multipliers away from 1 (both sides apply them in the forward)
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8,
                      mamba_d_conv=4, mamba_chunk_size=16, mamba_rms_norm=True, mamba_norm_before_gate=False, embedding_multiplier=1.5,
                      lm_head_multiplier=0.7, key_multiplier=0.9, attention_in_multiplier=1.1,
                      attention_out_multiplier=0.8, ssm_in_multiplier=1.2, ssm_out_multiplier=0.6,
                      mlp_multipliers=[1.3, 0.7], ssm_multipliers=[1.1, 0.9, 1.2, 0.8, 1.05]),
    # ERNIE-4.5-VL: layer 0 dense, layer 1 text and vision expert pools of 4 each (widths 32 and 24),
    # one shared expert; ViT of 2 layers and the resampler (spatial merge 2)
    "ernie4_5_vl_moe": dict(text_config=dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=[32, 24],
                                             moe_num_shared_experts=1, mlp_layer_types=["dense", "sparse"],
                                             rope_parameters=dict(rope_type="default", rope_theta=500000.0,
                                                                  mrope_section=[3, 3, 2])),
                            vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2),
                            image_token_id=122, image_start_token_id=123, image_end_token_id=124,
                            video_token_id=125, video_start_token_id=126, video_end_token_id=127,
                            tie_word_embeddings=True),
    # EXAONE 4.5: an EXAONE-4 text model (one sliding layer, window 4 < the 11 test tokens, one
    # global), a Qwen2.5-VL-like tower of 2 blocks with grouped KV heads (4 heads, 2 KV), patch 14 and
    # window 112 (Megatron-Bridge's Exaone45VisionModel hard-codes both), block 1 full attention
    "exaone4_5": dict(text_config=dict(model_type="exaone4", sliding_window=4,
                                       layer_types=["sliding_attention", "full_attention"]),
                      vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4,
                                         num_key_value_heads=2, out_hidden_size=64, patch_size=14,
                                         window_size=112, fullatt_block_indexes=[1]),
                      image_token_id=122, video_token_id=123, tie_word_embeddings=False),
    # GLM-4.5V: layer 0 dense, layer 1 MoE with a shared expert (GLM-4.5-Air's decoder); the published
    # head_dim 128, rotary fraction 0.5 and mrope_section [8, 12, 12] (Megatron-Bridge's provider keeps
    # those three sections, it reads none from the config), and its config.json's use_qk_norm false, a
    # field transformers' class lacks and Megatron-Bridge's bridge reads. GLM-4V tower of 2 blocks on
    # 28x28 images (4 patches, merged 2x2 to one image token)
    "glm4v_moe": dict(
        text_config=dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                         first_k_dense_replace=1, head_dim=128, use_qk_norm=False,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                              mrope_section=[8, 12, 12])),
        vision_config=dict(VISION, image_size=28), image_token_id=122, video_token_id=123,
        image_start_token_id=124, image_end_token_id=125, video_start_token_id=126, video_end_token_id=127),
    # Ling 2.0 (Megatron-Bridge's shipped copy of the remote code): layer 0 dense, layer 1 MoE with one
    # shared expert, sigmoid routing with expert bias over 2 groups of 2 experts (top 1 group: the
    # group limit shows), scaled weights; no pad / eos id (the published 156892 is outside 128 tokens).
    # norm_topk_prob / score_function / use_rmsnorm: fields of the published config.json that the config
    # class keeps and vLLM reads (without them its BailingMoE routes by softmax, its q / k norms are LayerNorms)
    "bailing_moe_v2": dict(MOE, num_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                           routed_scaling_factor=2.5, pad_token_id=None, eos_token_id=None, norm_topk_prob=True,
                           score_function="sigmoid", use_rmsnorm=True),
    # Whisper-like audio tower of 2 layers; the Qwen2 decoder has q/k/v biases
    "qwen2_audio": dict(text_config=dict(model_type="qwen2"), audio_config=AUDIO, audio_token_index=100),
    # thinker only (enable_audio_output=False): Megatron-Bridge builds no talker / token2wav
    "qwen2_5_omni": dict(enable_audio_output=False, thinker_config=dict(
        text_config=dict(rope_parameters=dict(rope_type="default", rope_theta=OMNI_ROPE_THETA, mrope_section=MROPE)),
        audio_config=dict(AUDIO, output_dim=64, n_window=4),
        vision_config=dict(VISION, fullatt_block_indexes=[1], window_size=28),
        **THINKER_TOKENS)),
    # thinker only (enable_audio_output=False): Megatron-Bridge builds no talker / code2wav
    "qwen3_omni_moe": dict(enable_audio_output=False, thinker_config=dict(
        text_config=dict(MOE, rope_parameters=dict(rope_type="default", rope_theta=OMNI_ROPE_THETA, mrope_section=MROPE,
                                                   mrope_interleaved=True)),
        audio_config=dict(AUDIO, output_dim=64, n_window=4, downsample_hidden_size=8),
        # image_size (56 / patch 14 = 4, 4 x 4 = 16 positions) and apply_vit_abs_pos_embed: fields of
        # the published configs that vLLM reads (transformers' class lacks them)
        vision_config=dict(VISION, deepstack_visual_indexes=[0], num_position_embeddings=16, image_size=56,
                           apply_vit_abs_pos_embed=True),
        **THINKER_TOKENS)),
    # MiniMax-M3: layer 0 dense with full attention, layer 1 MoE (a shared expert) with the
    # lightning indexer's sparse attention, its blocks of 4 keys, top 3 of them: every block of
    # the 11 test tokens is kept (Megatron-Bridge runs full attention); half the head dims
    # rotated, said twice as the published config does (Megatron-Bridge reads rotary_dim,
    # transformers rope_parameters' partial_rotary_factor); a 2-layer vision tower
    "minimax_m3_vl": dict(text_config=dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                           dense_intermediate_size=96, shared_intermediate_size=48, rotary_dim=8,
                                           rope_parameters=dict(rope_type="default", rope_theta=5e6,
                                                                partial_rotary_factor=0.5),
                                           mlp_layer_types=["dense", "sparse"],
                                           layer_types=["full_attention", "minimax_m3_sparse"],
                                           index_n_heads=2, index_head_dim=16, index_block_size=4,
                                           index_topk_blocks=3),
                          vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=2),
                          projector_hidden_size=64, image_token_index=122, video_token_index=123),
    # transformers' spelling (Qwen/Qwen3-ASR-*-hf); Megatron-Bridge builds from its remote-code twin
    # (bridge_ext_testing.qwen3_asr). Embeddings tied, as the published models; the published audio
    # chunks of 2 * 50 mel frames (both libraries count 13 positions a chunk), attention windows of one chunk;
    # conv_chunksize: a field of the remote-code config that vLLM's audio encoder reads (transformers' lacks it)
    "qwen3_asr": dict(text_config=dict(tie_word_embeddings=True,
                                       rope_parameters=dict(rope_type="default", rope_theta=OMNI_ROPE_THETA)),
                      audio_config=dict(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=48,
                                        d_model=32, n_window=50, n_window_infer=100, output_dim=64,
                                        downsample_hidden_size=8, conv_chunksize=500),
                      audio_token_id=100, tie_word_embeddings=True),
}

#: transformers' classes of the entries that are not causal LMs
MODEL_CLASSES = {"qwen2_audio": "Qwen2AudioForConditionalGeneration",
                 "qwen2_5_omni": "Qwen2_5OmniForConditionalGeneration",
                 "qwen3_omni_moe": "Qwen3OmniMoeForConditionalGeneration",
                 "qwen3_asr": "Qwen3ASRForConditionalGeneration"}
#: files beside the weights that transformers' class loads (the published folders hold them):
#: Qwen2.5-Omni's speaker dictionary, empty here
SPEAKERS = {"qwen2_5_omni": "spk_dict.pt"}
#: model_type -> {parameter name ending: value it is filled with}, where transformers' initial
#: value (zeros) would not show whether the weight was carried at all.
FILLED: dict[str, dict[str, float]] = {
    # ERNIE-4.5 adds the bias to its softmax scores only to pick the top k: one value for every
    # expert picks the same experts, so the bias is carried without changing the routing
    # (Megatron-Core's softmax router ignores expert_bias; tests/test_conformance_generated.py)
    "ernie4_5_moe": {"moe_statics.e_score_correction_bias": 0.25},
    # the same, one value per expert pool (the checkpoint's [2, E] rows differ: a swap shows)
    "ernie4_5_vl_moe": {"text_moe.gate.moe_statics.e_score_correction_bias": 0.25,
                        "vision_moe.gate.moe_statics.e_score_correction_bias": 0.5},
}

NORM_NOISE = 0.1
ROUTER_STD = 0.5


def tiny_config(model_type: str, overrides: dict | None = None):
    """transformers' config of ``model_type`` with the tiny sizes of its :data:`TINY` entry (a
    vision-language entry's :data:`BASE` sizes go to its ``text_config``, an omni entry's to its
    thinker's) and ``overrides`` of them."""
    from transformers import AutoConfig

    from bridge_ext.tables import register_transformers_configs

    register_transformers_configs()  # remote-code config classes a table registers (Ling 2.0's)
    entry = {**TINY.get(model_type, {}), **(overrides or {})}
    if "thinker_config" in entry:  # omni: the thinker's text config
        thinker = entry["thinker_config"]
        thinker = {**thinker, "text_config": {**BASE, **thinker["text_config"]}}
        return AutoConfig.for_model(model_type, **{**entry, "thinker_config": thinker})
    if "text_config" in entry:
        return AutoConfig.for_model(model_type, **{**entry, "text_config": {**BASE, **entry["text_config"]}})
    return AutoConfig.for_model(model_type, **{**BASE, **entry})


def model_class(model_type: str):
    """transformers' class of the tiny model: :data:`MODEL_CLASSES`' entry, else image-text-to-text
    for a vision-language entry, else a causal LM."""
    import transformers

    if model_type in MODEL_CLASSES:
        return getattr(transformers, MODEL_CLASSES[model_type])
    vision = "vision_config" in TINY.get(model_type, {})
    return transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM


def tiny_model(model_type: str, overrides: dict | None = None):
    """transformers' model of ``model_type`` with the tiny sizes (on the current default device)."""
    return model_from_config(tiny_config(model_type, overrides))


def model_from_config(config):
    """transformers' model of ``config`` (its model type's :func:`model_class`), weights initialised."""
    cls = model_class(config.model_type)
    return cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)


def tiny_generated(directory: str | Path, model_type: str, *, seed: int = 0, overrides: dict | None = None) -> Path:
    """Save a random tiny causal LM of ``model_type`` (fp32) to ``directory``.

    Norms are perturbed around their initial value (a missing ``+1`` shows in the logits),
    router weights, attention sinks and expert score biases get a larger spread (top-k far from
    ties; a lost sink or bias shows), :data:`FILLED` weights their value.
    """
    torch.manual_seed(seed)
    model = tiny_model(model_type, overrides).float()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn(param.shape, generator=generator) * NORM_NOISE)
            elif name.endswith(("mlp.gate.weight", "mlp.router.weight", "self_attn.sinks")):
                param.copy_(torch.randn(param.shape, generator=generator) * ROUTER_STD)
        for name, buffer in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "mlp.gate.expert_bias")):  # zero at init: a lost bias would not show
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * ROUTER_STD)
        for ending, value in FILLED.get(model_type, {}).items():
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                if name.endswith(ending):
                    tensor.fill_(value)
    directory = Path(directory)
    model.save_pretrained(directory)
    if model_type in SPEAKERS:
        torch.save({}, directory / SPEAKERS[model_type])
    _publish_names(directory / "model.safetensors", model_type)
    return directory


def _publish_names(path: Path, model_type: str) -> None:
    """Rename the saved tensors as published checkpoints name them (``architecture_notes.PUBLISHED_PREFIXES``)."""
    from safetensors.torch import load_file, save_file

    from bridge_ext.tables.architecture_notes import PUBLISHED_PREFIXES

    prefixes = PUBLISHED_PREFIXES.get(model_type)
    if not prefixes:
        return
    tensors = load_file(str(path))

    def published(name: str) -> str:
        for saved, public in prefixes:
            if name.startswith(saved) and not name.startswith(public):
                return public + name[len(saved):]
        return name

    save_file({published(name): tensor for name, tensor in tensors.items()}, str(path), metadata={"format": "pt"})
