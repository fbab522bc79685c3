"""NVIDIA Nemotron-H (``nemotron_h``, ``NemotronHForCausalLM``): a hybrid of Mamba-2 mixers,
GQA attention without rotary embeddings, squared-ReLU MLPs and MoE layers (sigmoid router with
correction bias, non-gated routed and shared experts), as ``hybrid_override_pattern`` orders
them (``M`` Mamba, ``*`` attention, ``-`` MLP, ``E`` MoE).

Names: the published checkpoints' and transformers 5.23's save-time ones (which its loader
renames to ``model.`` in memory): ``backbone.embeddings``, ``backbone.layers.{i}.norm`` (one
pre-norm per layer, whatever its kind), ``backbone.layers.{i}.mixer.*`` (the layer's one
module), ``backbone.norm_f``, ``lm_head``; experts per expert (``mixer.experts.{e}.up_proj`` /
``down_proj``), fused in memory (``mixer.experts.up_proj [E, I, H]``). Megatron-Bridge 0.6.2's
``NemotronHBridge`` reads the same names.

Mamba mixer: Megatron's ``in_proj`` holds per tensor-parallel rank ``[z_r; x_r; B_r; C_r; dt_r]``
(heads and groups split over ranks), Hugging Face's one ``in_proj`` ``[z; x; B; C; dt]``; its
``conv1d`` per rank ``[x_r; B_r; C_r]``; ``A_log``, ``D``, ``dt_bias`` and the gated norm's
weight split by heads; ``out_proj`` row-parallel.

Not mapped (refused before the first tensor): MTP layers (Nemotron-3 Super's ``mtp.layers.*``,
which Megatron-Bridge flattens from its two-level MTP modules) and the latent MoE projections
(``fc1_latent_proj`` / ``fc2_latent_proj``): neither was proven here.
"""

from __future__ import annotations

from bridge_ext.config_compare import ConfigField
from bridge_ext.errors import TableError
from bridge_ext.ops import Concat, SplitRows, TrimVocab
from bridge_ext.table import ExpertFamily, MappingTable, Rule, TableBuilder, prefixed, rule
from bridge_ext.tables.blocks import (MAMBA_CONV_PARTS, MAMBA_IN_PROJ_PARTS, MAMBA_STORED_PARTS, MEGATRON_EXPERT_NAMES,
                                      QKV_GROUPS)
from bridge_ext.tables.config_fields import ACTIVATIONS, standard
from bridge_ext.tables.sizes import MambaSizes

MODEL_CLASS = "NemotronHForCausalLM"
DESCRIPTION = "Nemotron-H: hybrid Mamba-2 / attention / MLP / MoE layers"
# NemotronHExperts registers up_proj, then down_proj (non-gated experts).
EXPERTS = ExpertFamily("experts", ("up_proj", "down_proj"))
# NemotronHConfig's fields of the mixer's sizes (the splits below name them)
MAMBA_SIZES = MambaSizes(heads="mamba_num_heads", head_dim="mamba_head_dim", groups="n_groups",
                         state_size="ssm_state_size")
IN_PROJ_PARTS, CONV_PARTS = MAMBA_IN_PROJ_PARTS, MAMBA_CONV_PARTS  # z, x, B, C, dt; x, B, C
# Megatron's pre-norm of each layer kind, local and Transformer Engine spellings
NORMS = ("norm.weight", "input_layernorm.weight", "pre_mlp_layernorm.weight", "mixer.in_proj.layer_norm_weight",
         "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight")


def mamba_mixer() -> list[Rule]:
    return [
        rule("mixer.in_proj.weight", "mixer.in_proj.weight", SplitRows(*IN_PROJ_PARTS), Concat(IN_PROJ_PARTS)),
        *(rule(f"mixer.{conv}", f"mixer.conv1d.{leaf}", SplitRows(*CONV_PARTS), Concat(CONV_PARTS))
          for conv, leaf in (("conv1d_weight", "weight"), ("conv1d_bias", "bias"),
                             ("conv1d.weight", "weight"), ("conv1d.bias", "bias"))),
        *(rule(f"mixer.{name}", f"mixer.{name}") for name in ("A_log", "D", "dt_bias", "norm.weight")),
        rule("mixer.out_proj.weight", "mixer.out_proj.weight", tp="row"),
    ]


def attention() -> list[Rule]:
    names = [f"mixer.{p}_proj.weight" for p in "qkv"]
    return [
        rule("self_attention.linear_qkv.weight", names, QKV_GROUPS, lora_parts=("q", "k", "v")),
        rule("self_attention.linear_proj.weight", "mixer.o_proj.weight", tp="row"),
    ]


def mlp(megatron: str = "mlp.", hf: str = "mixer.") -> list[Rule]:
    """Squared-ReLU MLP: ``linear_fc1`` is ``up_proj`` alone (no gate)."""
    return [
        rule(f"{megatron}linear_fc1.weight", f"{hf}up_proj.weight"),
        rule(f"{megatron}linear_fc2.weight", f"{hf}down_proj.weight", tp="row"),
    ]


def moe() -> list[Rule]:
    rules = [
        rule("mlp.router.weight", "mixer.gate.weight", tp="replicated"),
        rule("mlp.router.expert_bias", "mixer.gate.e_score_correction_bias", tp="replicated"),
        *mlp("mlp.shared_experts.", "mixer.shared_experts."),
    ]
    per_expert, fused = EXPERTS.variant("per_expert"), EXPERTS.variant("fused")
    for fc1, fc2 in MEGATRON_EXPERT_NAMES:
        rules += [
            rule(fc1, "mixer.experts.{expert}.up_proj.weight", variant=per_expert),
            rule(fc2, "mixer.experts.{expert}.down_proj.weight", tp="row", variant=per_expert),
            rule(fc1, "mixer.experts.up_proj", stack="expert", variant=fused),
            rule(fc2, "mixer.experts.down_proj", tp="row", stack="expert", variant=fused),
        ]
    return rules


def _layer() -> list[Rule]:
    return [*(rule(norm, "norm.weight", tp="replicated") for norm in NORMS), *mamba_mixer(), *attention(),
            *mlp(), *moe()]


NO_ROTARY = "Nemotron-H's attention applies no rotary embedding (transformers and Megatron-Bridge alike)"
CONFIG_FIELDS = (
    *standard({"rope_parameters.rope_type": NO_ROTARY, "rope_theta": NO_ROTARY, "partial_rotary_factor": NO_ROTARY}),
    ConfigField("activation", "mlp_hidden_act", "activation_func", read="activation", hf_values=ACTIVATIONS),
    *(ConfigField("mamba mixer", hf, megatron) for hf, megatron in (
        ("mamba_num_heads", "mamba_num_heads"), ("mamba_head_dim", "mamba_head_dim"), ("n_groups", "mamba_num_groups"),
        ("ssm_state_size", "mamba_state_dim"), ("hybrid_override_pattern", "hybrid_layer_pattern"))),
)


def build(config) -> MappingTable:
    if getattr(config, "num_nextn_predict_layers", 0):
        raise TableError(f"nemotron_h with num_nextn_predict_layers={config.num_nextn_predict_layers}: "
                         "its MTP layers (mtp.layers.*) are not mapped yet")
    if getattr(config, "moe_latent_size", None):
        raise TableError(f"nemotron_h with moe_latent_size={config.moe_latent_size}: the latent MoE projections "
                         "(fc1_latent_proj / fc2_latent_proj) are not mapped yet")
    return MappingTable(
        model_types=("nemotron_h",),
        rules=(
            rule("embedding.word_embeddings.weight", "backbone.embeddings.weight", TrimVocab()),
            rule("output_layer.weight", "lm_head.weight", TrimVocab()),
            rule("decoder.final_norm.weight", "backbone.norm_f.weight", tp="replicated"),
            rule("decoder.final_layernorm.weight", "backbone.norm_f.weight", tp="replicated"),
            *prefixed(_layer(), "decoder.layers.{layer}.", "backbone.layers.{layer}."),
        ),
        description=DESCRIPTION,
        model_classes={"nemotron_h": MODEL_CLASS},
        expert_families=(EXPERTS,),
        # vLLM 0.34's NemotronHForCausalLM: no is_3d_moe_weight (per-expert up_proj / down_proj)
        vllm_expert_adapter_layouts={MODEL_CLASS: "per_expert"},
        # transformers renames backbone. to model. on load: PEFT keys and targets use model.
        in_memory_prefixes=(("backbone.", "model."),),
        config_fields=CONFIG_FIELDS,
        sizes=(MAMBA_SIZES,),
        stored_split_parts=MAMBA_STORED_PARTS,
        # no block-FP8 rules written: quantize="fp8" is refused
    )


TABLE = TableBuilder(model_types=("nemotron_h",), build=build, description=DESCRIPTION)

# What bridge_ext.tables finds in this module (docs/adding_an_architecture.md).
TABLES = (TABLE,)
