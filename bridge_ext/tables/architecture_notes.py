"""Reviewed facts about Megatron-Bridge's bridges: what a generated table leaves out or reads
alike (``bridge-ext tables generate``), and why an architecture Megatron-Bridge registers has no
proven table (``bridge-ext architectures``).

:data:`REFUSED`'s keys are Hugging Face class names as Megatron-Bridge registers them. A class with a table
(hand-written or generated) takes its status from the table, whatever is written here; a
class without one must have its reason here (a test checks that none is left out).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Megatron-side prefixes of MTP layers, which a generated table never covers.
MTP_PREFIXES = ("mtp.", "language_model.mtp.")  # a vision-language model's MTP sits in its language model
#: Megatron-side prefixes of the parts a generated table leaves out (``bridge-ext tables generate``):
#: MTP, and vision / audio towers unless the model type is in :data:`TOWERS_GENERATED`.
LEFT_OUT_PREFIXES = (*MTP_PREFIXES, "vision_model.", "audio_model.", "vision_tower.", "visual.", "audio_tower.",
                     "multi_modal_projector.", "resampler_model.", "talker.", "thinker.")

#: Model types whose generated table covers the vision / audio tower: each has a conformance
#: entry that proves the tower's weights (a test keeps this within :data:`PROVEN_GENERATED`).
TOWERS_GENERATED: frozenset[str] = frozenset({"ernie4_5_vl_moe", "exaone4_5", "gemma3", "glm4v_moe", "minimax_m3_vl", "mistral3",
                                              "qwen2_5_omni", "qwen2_audio", "qwen3_asr", "qwen3_omni_moe"})

#: The vision_config fields of a generated tower's attention sizes (read in the bridge's source,
#: where it builds the tower's Megatron config): model_type -> (head count, key / value head count
#: or None: one per head). A generated ``ConcatenatedQKVMapping`` of the tower splits by them; the
#: generator checks them against the tiny model. EXAONE 4.5: get_vision_model_config's
#: num_attention_heads=num_heads, num_query_groups=num_key_value_heads.
VISION_SIZE_FIELDS: dict[str, tuple[str, str | None]] = {"exaone4_5": ("num_heads", "num_key_value_heads")}

#: What a generated table of these model types leaves out beyond MTP (written into its header).
_SPEECH_OUTPUT = ("the {talker} (speech output): Megatron-Bridge's bridge neither builds nor maps them, so an "
                  "export is the thinker alone, for a config with enable_audio_output false; one with it true names "
                  "{names} weights in transformers' key set, and the export refuses it before the first tensor "
                  "(missing names).")
LEFT_OUT_NOTES = {
    "ernie4_5_vl_moe": "an untied output layer, which Megatron-Bridge 0.6.2's bridge does not map (published "
                       "ERNIE-4.5-VL ties its embeddings), and Megatron's own ViT (use_mg_vit, mapped by the bridge "
                       "only when set on it; the provider's default is transformers' ViT, which the table covers): "
                       "such a model's language_model.output_layer.weight or vision_model.* weights are refused as "
                       "unmapped before the first tensor.",
    "qwen2_5_omni": _SPEECH_OUTPUT.format(talker="talker and token2wav", names="talker.* / token2wav.*"),
    "qwen3_omni_moe": _SPEECH_OUTPUT.format(talker="talker and code2wav", names="talker.* / code2wav.*"),
    "minimax_m3_vl": ("the lightning indexer's block selection from Megatron's forward: Megatron-Bridge 0.6.2 keeps "
                      "the indexer's weights as frozen state (exported like any other) and runs full causal attention, "
                      "which equals transformers' sparse attention only up to index_topk_blocks * index_block_size "
                      "tokens (tests/test_conformance_generated.py shows both sides of that bound)."),
}

#: Files beyond the tokenizer / template / generation ones that transformers' class of the model
#: type needs to load it (read in transformers 5.23): a generated table's ``companion_files``.
#: Qwen2_5OmniForConditionalGeneration.from_pretrained loads the folder's speaker dictionary
#: (torch.load, weights_only) and raises without it.
COMPANION_FILES = {"qwen2_5_omni": ("spk_dict.pt",)}

#: Bridge-private subclasses that convert exactly like their base (read in Megatron-Bridge's
#: source): ERNIE-4.5's ``_PPSafe*`` only return nothing for a weight no pipeline rank holds.
EQUIVALENT_KINDS = {
    "megatron.bridge.models.ernie.ernie_45_bridge._PPSafeAutoMapping": "AutoMapping",
    "megatron.bridge.models.ernie.ernie_45_bridge._PPSafeReplicatedMapping": "ReplicatedMapping",
    "megatron.bridge.models.ernie.ernie_45_bridge._PPSafeGatedMLPMapping": "GatedMLPMapping",
}

#: Bridge-private subclasses that convert like a base kind followed by operations of the table
#: vocabulary (read in Megatron-Bridge's source): class -> (base kind, operations as source text).
#: ERNIE-4.5's ``_SqueezeBiasMapping`` (a ``_PPSafeReplicatedMapping``) only unsqueezes the
#: router's expert bias on export (``[E]`` -> ``[1, E]``: ``moe_statics.e_score_correction_bias``,
#: one expert group) and squeezes it on import.
KINDS_WITH_OPS = {
    "megatron.bridge.models.ernie.ernie_45_bridge._SqueezeBiasMapping": ("ReplicatedMapping", "Unsqueeze(0)"),
}

#: Bridge-private expert mappings whose Hugging Face expert index is Megatron's plus an offset
#: (read in Megatron-Bridge's source): class -> (base kind, the mapping's attribute holding the
#: offset, the config field, of the config or its text_config, it equals; the generator checks
#: it on the tiny config and writes the offset as ``{expert+field}``, read from each model's
#: config). ERNIE-4.5-VL's ``_OffsetGatedMLPMapping`` / ``_OffsetRowParallelMapping``: the vision
#: pool's expert e is the checkpoint's ``experts.{e + moe_num_experts}``, after the text pool's.
EXPERT_OFFSET_KINDS = {
    "megatron.bridge.models.ernie_vl.ernie45_vl_bridge._OffsetGatedMLPMapping":
        ("GatedMLPMapping", "_expert_offset", "moe_num_experts"),
    "megatron.bridge.models.ernie_vl.ernie45_vl_bridge._OffsetRowParallelMapping":
        ("RowParallelMapping", "_expert_offset", "moe_num_experts"),
}

#: Bridge-private mappings that stack several Megatron tensors as one Hugging Face tensor (read in
#: Megatron-Bridge's source): class -> (base kind, the mapping's attribute naming its slice, the
#: slices in their order along the stacked dim 0). ERNIE-4.5-VL's ``_ConcatBiasMapping``:
#: ``moe_statics.e_score_correction_bias [2, E]``, row 0 the text router's expert bias, row 1 the
#: vision router's (its hf_to_megatron takes row 0 for "text", row 1 otherwise).
STACKED_KINDS = {
    "megatron.bridge.models.ernie_vl.ernie45_vl_bridge._ConcatBiasMapping":
        ("AutoMapping", "_slice_name", ("text", "vision")),
}


@dataclass(frozen=True)
class SizedSplitKind:
    """A Megatron-Bridge mapping kind split by a mixer's sizes: its rule is ``SplitRows(*parts),
    Concat(parts)`` (``parts`` a constant of :mod:`bridge_ext.tables.blocks`), the table takes a
    ``sizes`` entry of class ``sizes_class`` (:mod:`bridge_ext.tables.sizes`) whose fields the
    bridge's ``CONFIG_MAPPING`` names through ``size_fields`` (sizes field, megatron-core field), and
    ``stored_split_parts=stored_parts`` (torch_dist keeps the parts apart)."""

    parts: str
    sizes_class: str
    size_fields: tuple[tuple[str, str], ...]
    stored_parts: str


_MAMBA_SIZE_FIELDS = (("heads", "mamba_num_heads"), ("head_dim", "mamba_head_dim"), ("groups", "mamba_num_groups"),
                      ("state_size", "mamba_state_dim"))
#: Per tensor-parallel rank [z_r; x_r; B_r; C_r; dt_r] (conv1d: [x_r; B_r; C_r]) in Megatron, one
#: [z; x; B; C; dt] in Hugging Face (Megatron-Bridge's param_mapping)
SIZED_SPLIT_KINDS = {
    "megatron.bridge.models.conversion.param_mapping.MambaInProjMapping":
        SizedSplitKind("MAMBA_IN_PROJ_PARTS", "MambaSizes", _MAMBA_SIZE_FIELDS, "MAMBA_STORED_PARTS"),
    "megatron.bridge.models.conversion.param_mapping.MambaConv1dMapping":
        SizedSplitKind("MAMBA_CONV_PARTS", "MambaSizes", _MAMBA_SIZE_FIELDS, "MAMBA_STORED_PARTS"),
}

#: Mid-key renames transformers applies on load (its ``conversion_mapping.py``), per model type,
#: as ``(saved infix, in-memory infix)``: a generated table's ``in_memory_renames``. Megatron-Bridge
#: maps the saved names (what ``save_pretrained`` writes and vLLM loads); PEFT keys adapters by the
#: in-memory ones. transformers 5.23's ``hy_v3`` entry: qwen2_moe's expert fusion plus these three.
IN_MEMORY_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "hy_v3": ((".mlp.router.gate.", ".mlp.gate."), (".mlp.expert_bias", ".mlp.e_score_correction_bias"),
              (".mlp.shared_mlp.", ".mlp.shared_experts.")),
    # transformers 5.23's minimax_m3_vl entry: its MoE block (one regex over experts / gate /
    # shared_experts, written out here) and the sparse layers' indexer
    "minimax_m3_vl": ((".block_sparse_moe.e_score_correction_bias", ".mlp.gate.e_score_correction_bias"),
                      (".block_sparse_moe.experts.", ".mlp.experts."), (".block_sparse_moe.gate.", ".mlp.gate."),
                      (".block_sparse_moe.shared_experts.", ".mlp.shared_experts."),
                      (".self_attn.index_q_proj.", ".self_attn.indexer.q_proj."),
                      (".self_attn.index_k_proj.", ".self_attn.indexer.k_proj."),
                      (".self_attn.index_q_norm.", ".self_attn.indexer.q_norm."),
                      (".self_attn.index_k_norm.", ".self_attn.indexer.k_norm.")),
}

#: Gated MLPs whose saved gate / up weights transformers loads as one ``nn.Linear`` (its
#: ``conversion_mapping.py``), per model type: ``(gate suffix, up suffix, fused suffix)``. The
#: generated rule writes the saved names, and the adapter unsplit on the fused linear, where PEFT
#: keys it (``Rule.lora_fused``). transformers 5.23's ``minimax_m3_vl``: ``Concatenate(dim=0)`` of
#: ``gate_proj`` / ``up_proj`` into ``gate_up_proj`` (``[gate; up]``, chunked in two by
#: ``MiniMaxM3VLDenseMLP.forward``), for the dense MLPs and the shared experts.
IN_MEMORY_FUSED_GATE_UP: dict[str, tuple[str, str, str]] = {
    "minimax_m3_vl": (".gate_proj.weight", ".up_proj.weight", ".gate_up_proj.weight"),
}

#: Per-expert Hugging Face parameters whose fused in-memory parameter is named otherwise (read in
#: transformers 5.23's ``conversion_mapping.py``): model_type -> {per-expert name: fused name}.
#: MiniMax-M3 saves ``experts.{e}.w1`` / ``w3`` / ``w2``, fused as ``gate_up_proj`` / ``down_proj``.
FUSED_EXPERT_NAMES: dict[str, dict[str, str]] = {"minimax_m3_vl": {"w2": "down_proj"}}

#: Bridge-private QKV mappings (read in Megatron-Bridge's source) that split Megatron's
#: ``linear_qkv`` per query group into ``[q heads; k; v]`` with value heads of ``v_head_dim`` and
#: each layer's own number of groups (MiMo-V2-Flash: sliding layers have twice the KV heads of
#: full ones): the generator writes them as ``SplitHeadGroups``.
HEAD_GROUP_QKV_KINDS = frozenset({"megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_bridge.MiMoV2FlashQKVMapping"})

#: Bridge-private QKV mappings of models whose layers differ in head width, not in head counts (read
#: in Megatron-Bridge's source): class -> the layer type whose layers are the wider ones. The generator
#: writes ``SplitQKVHeadDims`` over ``head_dim`` and ``global_head_dim``, that layer type's width
#: (``LayerTypeSizes``: transformers 5.15+ keeps it per layer). Gemma 4's dense mapping also tolerates
#: the missing k_proj / v_proj of KV-shared layers (:data:`LAST_LAYERS_WITHOUT`).
HEAD_WIDTH_QKV_KINDS = {"megatron.bridge.models.gemma.gemma4_bridge._Gemma4DenseQKVMapping": "full_attention"}

#: model type -> (config field counting the last layers, name infixes transformers builds no tensor
#: for there): Gemma 4's KV-shared layers read earlier layers' keys and values (Megatron-Bridge 0.6.2's
#: ``_is_synthesized_kv_projection``: k_proj / v_proj; transformers 5.23's ``Gemma4TextAttention``
#: builds no k_norm there either). The generated table drops those outputs on those layers
#: (``LastLayersRules``, ``KeepParts``), decided from the config before export.
LAST_LAYERS_WITHOUT = {"gemma4_text": ("num_kv_shared_layers",
                                       (".self_attn.k_proj.", ".self_attn.v_proj.", ".self_attn.k_norm."))}

#: model type -> the reviewed check (``module:function``) that refuses configs its generated table is
#: not proven for (a ``CheckedTable``): Gemma 4's global layers as Megatron-Bridge 0.6.2 builds them.
CONFIG_CHECKS = {"gemma4_text": "bridge_ext.tables.gemma4:check_text_config"}

#: Generated tables with an entry in the generated-tables conformance module (its tiny configs
#: live in the test-support package; a test keeps the two equal).
PROVEN_GENERATED = frozenset({"bailing_moe_v2", "deepseek_v2", "ernie4_5_moe", "ernie4_5_vl_moe", "exaone4", "exaone4_5", "exaone_moe",
                              "falcon_h1", "gemma", "gemma2", "gemma3", "gemma3_text", "gemma4_text", "glm4v_moe", "hy_v3",
                              "mimo_v2_flash", "minimax_m3_vl", "mistral", "mistral3", "nemotron", "olmoe",
                              "qwen2_5_omni", "qwen2_audio", "qwen3_asr", "qwen3_omni_moe"})

#: What a generated+proven table is proven for, where that is narrower than every config of its
#: model type (its table's config check refuses the rest): shown after the status.
PROVEN_SCOPE = {
    "gemma4_text": "dense E2B / E4B-shaped configs (global layers 512 wide with num_key_value_heads KV heads, "
                   "Megatron-Bridge 0.6.2's defaults; KV-shared layers, double-wide MLP, per-layer embeddings) with "
                   "allow_global_per_layer_attribute_access=True in the config bridge_ext reads (transformers 5.15+ "
                   "keeps the head dims per layer; Megatron-Bridge needs the flag to read them). Refused up front: "
                   "MoE (26B-A4B: its provider needs Transformer Engine), attention_k_eq_v (31B), any other global "
                   "head dim or KV-head count. Megatron-Bridge's LoRA exports raise on its global layers (its split "
                   "asks for global_head_dim, the dense provider has global_kv_channels): adapters are proven by "
                   "PEFT's strict load and logits and vLLM 0.34's loader",
}

REMOTE = "remote-code model (transformers 5.23 has no such class): no key set to prove names against"

#: Remote-code model types whose Hugging Face classes Megatron-Bridge ships itself (its copy of the
#: published remote code, read in 0.6.2's source): model_type -> the module whose import registers
#: them with transformers' AutoConfig / AutoModelForCausalLM. The key set, PEFT's strict load and
#: the HF + PEFT logits come from that copy (a generated table's ``register_hf_config`` imports it).
#: Ling 2.0: ``megatron/bridge/models/bailing/{configuration,modeling}_bailing_moe_v2.py``
#: (BailingMoeV2Config / BailingMoeV2ForCausalLM), registered by its bridge module. Proven on a
#: tiny model with full rotary embedding, one shared expert and no MTP layers. Read in the sources:
#: the shipped class's rope fallback under transformers 5.23 (``_default_rope_init_fn``, as 5.23 has
#: no "default" rope function) ignores ``partial_rotary_factor`` and rotates the whole head, where
#: Megatron (rotary_percent) and vLLM 0.34 rotate that fraction: transformers' logits of a config with
#: partial_rotary_factor < 1 are no reference (the names and values the table writes do not depend on
#: it). Megatron-Bridge's provider gives the shared experts moe_intermediate_size whatever
#: num_shared_experts says, the shipped class moe_intermediate_size * num_shared_experts. MTP layers
#: (num_nextn_predict_layers > 0) have no rules: such an export is refused before the first tensor.
SHIPPED_REMOTE_CODE = {"bailing_moe_v2": "megatron.bridge.models.bailing.bailing_moe2_bridge"}

#: Remote-code classes that transformers 5.23's ``from_pretrained`` leaves incomplete: model_type ->
#: the repair of :mod:`bridge_ext.tables.remote_code` (a table's ``repair_hf_model``, run where
#: bridge_ext loads the model). Ling 2.0's rotary ``inv_freq`` (a non-persistent buffer) is left as
#: uninitialised memory: transformers 5 materialises buffers through ``_init_weights``, which the
#: shipped class overrides without it. The repair recomputes it with the class's own rope function.
HF_LOAD_REPAIRS = {"bailing_moe_v2": "recompute_rotary_buffers"}

#: MoE classes whose vLLM (0.34) model wraps experts one by one (no ``is_3d_moe_weight``): a
#: weight sync's expert adapters go per expert, as vLLM's LoRA manager refuses fused ones there.
VLLM_PER_EXPERT_ADAPTERS = frozenset({"OlmoeForCausalLM", "DeepseekV2ForCausalLM", "ExaoneMoeForCausalLM",
                                      "Ernie4_5_MoeForCausalLM", "HYV3ForCausalLM",
                                      # its language model: Glm4MoeForCausalLM
                                      "Glm4vMoeForConditionalGeneration",
                                      "Ernie4_5_VLMoeForConditionalGeneration"})

#: Classes whose vLLM (0.34) model applies none of the adapters PEFT's names give (judged in
#: tests/consumers), or takes no LoRA at all: an ``adapter_for="vllm"`` export of adapters is
#: refused with the reason.
_OMNI_THINKER = ("vLLM 0.34's thinker maps adapter keys by the checkpoint's prefixes (thinker.model.), "
                 "PEFT's are transformers' in-memory ones (thinker.model.language_model.): it would apply none")
VLLM_ADAPTERS_REFUSED = {"Qwen2_5OmniForConditionalGeneration": _OMNI_THINKER,
                         "Qwen3OmniMoeForConditionalGeneration": _OMNI_THINKER,
                         "MiniMaxM3SparseForConditionalGeneration": (
                             "vLLM 0.34's MiniMaxM3SparseForConditionalGeneration does not support LoRA (no "
                             "SupportsLoRA: its engine refuses enable_lora)")}

#: Remote-code classes Megatron-Bridge registers without a model_type, and the model_type of
#: their published config (the key a hand-written table serves).
REMOTE_MODEL_TYPES = {"KimiK25ForConditionalGeneration": "kimi_k25"}

#: Classes Megatron-Bridge registers that get no generated table: why.
REFUSED: dict[str, str] = {
    # vision / audio models
    "NemotronH_Nano_Omni_Reasoning_V3": "remote-code class (the model type Megatron-Bridge 0.6.2 registers is the class "
                                        "name): transformers 5.23 has no such class; its own port of the model is "
                                        "another class and model type (NemotronH_Omni_Reasoning_V3, nemotron_h_omni), "
                                        "for which Megatron-Bridge registers no bridge: no key set to prove names against",
    "NemotronH_Nano_VL_V2": REMOTE,
    # remote code
    "DeciLMForCausalLM": REMOTE,
    "SarvamMLAForCausalLM": REMOTE,
    "SarvamMoEForCausalLM": REMOTE,
    "Step3p5ForCausalLM": REMOTE,
    # their bridges read in Megatron-Bridge 0.6.2's source, or tried on a tiny model
    # vision-language bridges tried on a tiny model (Megatron-Bridge 0.6.2, transformers 5.23)
    "Gemma4ForConditionalGeneration": "its language model is gemma4_text's (generated+proven for E2B / E4B-shaped "
                                      "dense configs); Megatron-Bridge 0.6.2 reads text_config.head_dim (per-layer "
                                      "in transformers 5.15+): allow_global_per_layer_attribute_access passed to "
                                      "from_hf_pretrained reaches only the outer config, set in config.json's "
                                      "text_config it gives a dense VL provider. Its towers (vision_tower, "
                                      "embed_vision, audio_tower, embed_audio: Hugging Face modules, prefix.**) are "
                                      "neither generated nor proven. vLLM 0.34 has both classes",
    "Step3p7ForConditionalGeneration": "transformers 5.23 gates every attention output by a per-head g_proj, "
                                       "which the Megatron model of Megatron-Bridge 0.6.2's Step37Bridge cannot "
                                       "hold on megatron-core 0.19.2: the bridge sets head_wise_attn_gate (no "
                                       "megatron-core 0.19.2 field), not the attention_output_gate fallback its "
                                       "Step35Bridge sets, so linear_qkv has no gate rows and the bridge's own "
                                       "load of a tiny checkpoint fails (QKVGMapping: 132 rows for 128). With the "
                                       "fallback set by hand each head's gate is head_dim rows, of which its "
                                       "export keeps the first: a trained gate (base or LoRA) has no per-head "
                                       "equivalent. Its stacked-expert mappings (moe.gate_proj.weight [E, I, H]) "
                                       "map grouped-GEMM experts only and read the expert off their names "
                                       "(weight{e}; Transformer Engine's TEGroupedMLP in megatron-core 0.19.2): a "
                                       "CPU build's SequentialMLP experts need a local version of them (none "
                                       "yet). Beside: its own "
                                       "Step37Config, registered for step3p7 over transformers' (AutoConfig."
                                       "register, exist_ok=True), reads the published config.json to the same "
                                       "sizes, but with megatron.bridge imported transformers' auto model "
                                       "classes refuse it (Step3p7ForConditionalGeneration itself loads); vLLM "
                                       "0.34 has Step3p7ForConditionalGeneration",
}

#: PEFT types beyond LoRA that a test exports for a model type and PEFT (or the merged forward)
#: checks: DoRA (the conformance contract's dora entries, tests/conformance/registry.py, and
#: tests/checkpoint/test_convert.py; Qwen2's bias-adding linear_qkv: merged only, PEFT's DoRA refused,
#: tests/conformance/test_oddities.py), CanonicalLoRA (the contract's canonical_lora entries, tests/consumers).
PEFT_TYPES_PROVEN: dict[str, tuple[str, ...]] = {
    "qwen3": ("DoRA", "CanonicalLoRA"),
    "qwen3_moe": ("CanonicalLoRA",),
    "qwen2": ("DoRA (merged)",),
    "qwen3_5_text": ("DoRA",),
    "qwen3_5_moe_text": ("DoRA (non-expert)",),
}

#: Checkpoint prefixes published checkpoints spell otherwise than transformers 5.23 saves them:
#: model_type -> ``(saved prefix, published prefix)`` pairs. Gemma 3's published checkpoints keep
#: SigLIP's ``vision_model`` wrapper (``vision_tower.vision_model.*``), which transformers 5.23 drops
#: on save and reads either way, Megatron-Bridge follows the source and vLLM 0.34 loads only. The
#: tiny model is written with the published names and the generated table writes them
#: (``saved_name_fixes``).
PUBLISHED_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "gemma3": (("vision_tower.", "vision_tower.vision_model."),),
}

#: Hugging Face names Megatron-Bridge's bridge spells otherwise than transformers 5.23 saves them:
#: model_type -> ``(bridge's prefix, saved prefix)`` pairs, the first that fits renames (a generated
#: table's rules write the saved names). Megatron-Bridge 0.6.2's Qwen3ASRBridge maps the remote-code
#: Qwen3-ASR's names (published Qwen/Qwen3-ASR-*: ``thinker.*``, the projector inside the audio
#: tower as ``proj1`` / ``proj2``); transformers 5.23's Qwen3ASRForConditionalGeneration (published
#: Qwen/Qwen3-ASR-*-hf) holds the language model under ``model.language_model``, the tower under
#: ``model.audio_tower`` and the projector as ``model.multi_modal_projector.linear_1`` / ``linear_2``
#: (Linear d_model -> d_model, the tower's activation, Linear d_model -> output_dim, as proj1 / act /
#: proj2), and loads no ``thinker.*`` name (no conversion_mapping entry). vLLM 0.34's
#: Qwen3ASRForConditionalGeneration.hf_to_vllm_mapper maps both spellings to the same modules.
HF_NAME_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "qwen3_asr": (("thinker.audio_tower.proj1.", "model.multi_modal_projector.linear_1."),
                  ("thinker.audio_tower.proj2.", "model.multi_modal_projector.linear_2."),
                  ("thinker.audio_tower.", "model.audio_tower."),
                  ("thinker.model.", "model.language_model."),
                  ("thinker.lm_head.", "lm_head.")),
}

#: Config fields a generated table refuses (``MappingTable.refused_config_fields``): model_type ->
#: {field: why}. transformers 5.23 reads the remote-code Qwen3-ASR config.json (``thinker_config``)
#: as a Qwen3ASRConfig of its default sizes, keeping thinker_config as a dict.
_ASR_REMOTE_CONFIG = ("the remote-code Qwen3-ASR config (published Qwen/Qwen3-ASR-*), which transformers 5.23 "
                      "reads as its own Qwen3ASRConfig with default sizes: pass hf_config= the transformers-format "
                      "config (audio_config / text_config, e.g. Qwen/Qwen3-ASR-*-hf's) of the same model")
REFUSED_CONFIG_FIELDS: dict[str, dict[str, str]] = {"qwen3_asr": {"thinker_config": _ASR_REMOTE_CONFIG}}

#: Notes ``bridge-ext architectures`` prints below its table, per model type: what a user of a
#: generated+proven type must know (a workaround its proof relies on).
NOTES = {
    "glm4v_moe": "Megatron-Bridge 0.6.2's GLM45VBridge reads text_config.partial_rotary_factor and "
                 "text_config.use_qk_norm; the published config.json has both (0.5, false), which transformers 5.9 "
                 "keeps as attributes, but transformers 5.22.2, 5.23 and 5.25 move partial_rotary_factor into "
                 "rope_parameters "
                 "(AttributeError, no provider): set it back before to_megatron_provider(), "
                 "bridge.hf_pretrained.config.text_config.partial_rotary_factor = 0.5 (its rope_parameters value); "
                 "a config.json without use_qk_norm also needs use_qk_norm = False (transformers' GLM-4.5V has no "
                 "q/k norms). Proven with the published head_dim 128, rotary fraction 0.5 and mrope_section "
                 "[8, 12, 12], the tower included; other sections (the provider keeps these) and use_qk_norm true "
                 "(q/k layernorms without a Hugging Face weight) are refused before the first tensor. "
                 "Megatron-Bridge's "
                 "GLM45VModel takes token id 0 for padding in its MRoPE positions: a prompt holding it computes "
                 "otherwise than transformers (the weights are not concerned)",
    "qwen3_asr": "Megatron-Bridge 0.6.2's Qwen3ASRBridge reads the remote-code Qwen3-ASR folder (thinker_config, "
                 "thinker.* weights, as Qwen/Qwen3-ASR-* publish it), whose config transformers 5.23 does not build "
                 "(its Qwen3ASRConfig has audio_config / text_config; Megatron-Bridge registers its vendored copy "
                 "only where transformers lacks qwen3_asr). Workaround: bridge.hf_pretrained.config = "
                 "megatron.bridge.models.qwen3_asr.hf_qwen3_asr.Qwen3ASRConfig.from_pretrained(folder) before "
                 "to_megatron_provider(). Exports write the names transformers 5.23 saves (Qwen/Qwen3-ASR-*-hf's; "
                 "architecture_notes.HF_NAME_RENAMES) and need that format's config (hf_config=, or the provider's "
                 "hf_model_id); the remote-code config is refused. Proven with tied embeddings (transformers 5.23's "
                 "default for Qwen3-ASR): an untied output layer is refused as unmapped",
}

#: Config fields a generated table compares beyond ``config_fields.STANDARD``, each reviewed in
#: Megatron-Bridge's source: model_type -> ``(family, Hugging Face field, Megatron field)``.
#: Megatron-Bridge 0.6.2's GLM45VModelProvider keeps mrope_section [8, 12, 12] (its bridge reads no
#: section from the config): a config with other sections is refused, not exported as if it were one.
EXTRA_CONFIG_FIELDS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "glm4v_moe": (("rotary embedding", "mrope_section", "mrope_section"),),
}

#: Generated tables whose tiny model cannot be built or run in Megatron on the CPU: why.
NOT_PROVABLE: dict[str, str] = {}

GEMMA3_LAYER_TYPES = ("Megatron-Bridge's Gemma 3 attention picks sliding or global per layer from "
                      "interleaved_attn_pattern (five sliding, one global, as HF's default layer_types), "
                      "not from window_attn_skip_freq")

#: Config fields a generated table compares with the value transformers' model takes where the
#: config does not set them (``ConfigField.hf_default``; read in transformers 5.23):
#: model_type -> {Hugging Face field: value}. MiniMax-M3 rotates head_dim *
#: rope_parameters.partial_rotary_factor dims (all where unset) and never reads rotary_dim, which
#: Megatron-Bridge 0.6.2's provider rotates (rotary_percent = rotary_dim / head_dim): a config
#: with rotary_dim alone would have the two compute otherwise, so it is refused.
HF_DEFAULTS: dict[str, dict[str, object]] = {"minimax_m3_vl": {"partial_rotary_factor": 1.0}}

#: Config fields a generated table leaves uncompared (``bridge_ext.tables.config_fields.standard``),
#: each reviewed in Megatron-Bridge's source: model_type -> {Hugging Face field: why}.
UNCOMPARED: dict[str, dict[str, str]] = {
    "mimo_v2_flash": {
        "sliding_window": "Megatron-Bridge 0.6.2 gives MiMo-V2-Flash's sliding layers a window of sliding_window_size "
                          "tokens (Transformer Engine's (sliding_window_size - 1, 0)), transformers 5.23 one more "
                          "(sliding_window = sliding_window_size + 1, the SGLang reference's): the Megatron model "
                          "sees one token less on sliding layers (tests/test_conformance_generated.py)",
        "layer_types": "Megatron-Bridge's MiMo-V2-Flash attention picks sliding or full per layer from "
                       "hybrid_attention_pattern (the published hybrid_layer_pattern), not from window_attn_skip_freq",
        "rope_theta": "Megatron-Bridge holds MiMo-V2-Flash's two rotary bases as rotary_base = (swa_rope_theta, "
                      "rope_theta), transformers in rope_parameters per layer type",
    },
    "gemma2": {"layer_types": "Megatron-Bridge's Gemma2DotProductAttention slides on odd layer numbers itself "
                              "(HF's sliding/full alternation), whatever window_attn_skip_freq says"},
    "gemma3_text": {"layer_types": GEMMA3_LAYER_TYPES},
    "gemma3": {"layer_types": GEMMA3_LAYER_TYPES},
    "minimax_m3_vl": {
        "intermediate_size": "MiniMax-M3's intermediate_size is its routed experts' width (Megatron's "
                             "moe_ffn_hidden_size); its dense MLPs take dense_intermediate_size (Megatron's "
                             "ffn_hidden_size)",
        "hidden_act": "transformers 5.23's MiniMax-M3 text model reads no hidden_act (its config sets it to silu): "
                      "its MLPs and experts compute the clamped SwiGLU-OAI from swiglu_alpha / swiglu_limit, which "
                      "Megatron-Bridge maps to quick_gelu with activation_func_clamp_value and glu_linear_offset",
    },
    "ernie4_5_moe": {"scoring_func": "ERNIE-4.5's config has no such field: transformers routes by softmax, "
                                     "Megatron-Bridge 0.6.2's provider by sigmoid; a model trained with that "
                                     "provider computes otherwise than its export"},
    "ernie4_5_vl_moe": {"scoring_func": "ERNIE-4.5-VL's config has no such field: transformers routes both expert "
                                        "pools by softmax, Megatron-Bridge 0.6.2's provider by sigmoid (as "
                                        "ERNIE-4.5-MoE's); a model trained with that provider computes otherwise "
                                        "than its export",
                        "moe_intermediate_size": "ERNIE-4.5-VL's is one width per expert pool ([text, vision]); "
                                                 "Megatron-Bridge 0.6.2's provider sets moe_ffn_hidden_size to the "
                                                 "text pool's and builds each pool from its own entry: the exported "
                                                 "shapes, checked against the config's, compare both"},
}
