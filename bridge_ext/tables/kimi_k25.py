"""Kimi-K2.5 (``kimi_k25``, published class ``KimiK25ForConditionalGeneration``): Kimi-K2's text model
(DeepSeek-V3's: MLA, first layer dense, MoE with a shared expert and a biased sigmoid router)
beside the MoonViT3d vision tower and its patch-merger projector.

Names are the published checkpoint's, which vLLM 0.34's ``KimiK25ForConditionalGeneration`` and
Megatron-Bridge 0.6.2's ``KimiK25VLBridge`` read: ``language_model.model.layers.{i}.*``,
``language_model.model.embed_tokens`` / ``norm``, ``language_model.lm_head``,
``vision_tower.{patch_embed, encoder.blocks.{i}, encoder.final_layernorm}.*`` and
``mm_projector.{pre_norm, proj.0, proj.2}.*``. Megatron-Bridge prefixes the text model's names
with ``language_model.`` and keeps the vision tower and projector as Hugging Face modules with
the checkpoint's own names (``vision_tower.**`` -> ``vision_tower.**``, replicated), so those
map one to one and are exported whole. transformers 5.23 (``Kimi_K25ForConditionalGeneration``)
renames on load (``model.language_model.*``, ``lm_head``: where PEFT keys adapters) and writes
three names wrongly on save (``saved_name_fixes``; :mod:`bridge_ext.hf_keys`).

No FP8 rules (``quantize="fp8"`` is refused): the published checkpoint quantizes its routed
experts to INT4 (compressed-tensors), and no FP8 layout of this class was checked with an engine.
Kimi-K2.5 publishes no MTP layer (``num_nextn_predict_layers: 0``); a config declaring some is
refused, its naming being unknown.
"""

from __future__ import annotations

from bridge_ext.errors import TableError
from bridge_ext.table import MappingTable, Rule, TableBuilder, prefixed, rule
from bridge_ext.tables.blocks import IMAGE_TEXT_AUTO_CLASS
from bridge_ext.tables.deepseek import EXPERTS, MTP_EXPERTS, decoder_layer, deepseek_style_rules, mtp_count

MODEL_CLASS = "KimiK25ForConditionalGeneration"
DESCRIPTION = "Kimi-K2.5: Kimi-K2's MLA + MoE text model, MoonViT3d vision tower and projector"
VISION_BLOCK = ("norm0", "norm1", "wqkv", "wo", "mlp.fc0", "mlp.fc1")
SAVED_NAME_FIXES = (
    (r"^language_model\.model\.blocks\.", "language_model.model.layers."),
    (r"^vision_tower\.encoder\.patch_embed\.", "vision_tower.patch_embed."),
    (r"^model\.mm_projector\.", "mm_projector."),
)


def _same(names: list[str]) -> list[Rule]:
    """Hugging Face modules Megatron-Bridge holds under their checkpoint names (replicated)."""
    return [rule(name, name, tp="replicated") for name in names]


def vision_rules() -> list[Rule]:
    both = (".weight", ".bias")
    block = [f"vision_tower.encoder.blocks.{{layer}}.{module}{leaf}" for module in VISION_BLOCK for leaf in both]
    tower = ["vision_tower.patch_embed.pos_emb.weight",
             *(f"vision_tower.{module}{leaf}" for module in ("patch_embed.proj", "encoder.final_layernorm")
               for leaf in both)]
    projector = [f"mm_projector.{module}{leaf}" for module in ("pre_norm", "proj.0", "proj.2") for leaf in both]
    return _same([*block, *tower, *projector])


def build(config) -> MappingTable:
    text = config.text_config
    if mtp_count(text):
        raise TableError(f"kimi_k25 with num_nextn_predict_layers={mtp_count(text)}: Kimi-K2.5 publishes no "
                         "MTP layer, so its naming is unknown")
    return MappingTable(
        model_types=("kimi_k25",),
        rules=(*prefixed(deepseek_style_rules(text, decoder_layer), "language_model.", "language_model."),
               *vision_rules()),
        description=DESCRIPTION,
        model_classes={"kimi_k25": "Kimi_K25ForConditionalGeneration"},
        hf_auto_class=IMAGE_TEXT_AUTO_CLASS,
        expert_families=(EXPERTS, MTP_EXPERTS),
        # vLLM 0.34 builds DeepSeek-V3's text model inside: no is_3d_moe_weight; its loader takes
        # per-expert experts only (as DeepseekV3ForCausalLM's)
        vllm_expert_adapter_layouts={MODEL_CLASS: "per_expert"},
        vllm_expert_layouts={MODEL_CLASS: "per_expert"},
        in_memory_prefixes=(("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")),
        saved_name_fixes=SAVED_NAME_FIXES,
        # no block-FP8 export: the published checkpoint's experts are INT4 (compressed-tensors)
        # and no FP8 layout of this class was checked against an engine
    )


TABLE = TableBuilder(model_types=("kimi_k25",), build=build, description=DESCRIPTION)

# What bridge_ext.tables finds in this module (docs/adding_an_architecture.md).
TABLES = (TABLE,)
