"""`bridge-ext architectures` (docs/architectures.md) and `bridge-ext tables generate`."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge_ext.errors import TableError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows():
    from bridge_ext.architectures import architectures

    return architectures()


def test_docs_architectures_md_is_the_command_s_output():
    from bridge_ext.architectures import render

    assert (ROOT / "docs" / "architectures.md").read_text() == render(), \
        "run: bridge-ext architectures > docs/architectures.md"


def test_python_dash_m_bridge_ext_is_the_command():
    import os
    import subprocess
    import sys

    from bridge_ext.architectures import render

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "testing")])}
    done = subprocess.run([sys.executable, "-m", "bridge_ext", "architectures"], capture_output=True, text=True,
                          env=env, check=True)
    assert done.stdout == render()


def test_every_megatron_bridge_class_has_a_status_with_its_reason(rows):
    from bridge_ext.architectures import NO_REASON
    from bridge_ext.table_generate import registered_bridges

    listed = {row.hf_class for row in rows}
    assert {entry.source for entry in registered_bridges()} <= listed
    assert [row.hf_class for row in rows if NO_REASON in row.status] == []


def test_generated_tables_are_proven_or_say_why(rows):
    from bridge_ext_testing.tiny_generated import TINY
    from bridge_ext.tables import generated_model_types

    from bridge_ext.tables.architecture_notes import PROVEN_GENERATED, PROVEN_SCOPE

    proven = sorted(row.model_type for row in rows if row.status.startswith("generated+proven"))
    assert proven == sorted(set(TINY) & generated_model_types())
    # a table proven for some configs only (its check refuses the others) says which
    assert sorted(row.model_type for row in rows if row.status.startswith("generated+proven: ")) == sorted(PROVEN_SCOPE)
    assert sorted(PROVEN_GENERATED) == sorted(TINY)  # the library's list is the conformance module's
    assert len(proven) >= 9


def test_the_peft_column_names_only_known_types_and_refused_adapters(rows):
    from bridge_ext.tables import known_model_types
    from bridge_ext.tables.architecture_notes import PEFT_TYPES_PROVEN

    assert set(PEFT_TYPES_PROVEN) <= set(known_model_types())
    peft = {row.model_type: row.peft for row in rows}
    assert peft["qwen3"] == "LoRA, DoRA, CanonicalLoRA"
    assert peft["deepseek_v4"].startswith("none")  # MappingTable.adapters_refused
    assert peft["llama"] == "LoRA"


def test_hand_written_tables_win_over_generated_ones(monkeypatch):
    import bridge_ext.tables
    from bridge_ext.table import MappingTable
    from bridge_ext.tables import llama

    fake = MappingTable(model_types=("llama",), rules=(), description="generated stand-in")
    monkeypatch.setattr(bridge_ext.tables, "GENERATED", (*bridge_ext.tables.GENERATED, fake))
    assert bridge_ext.tables.registered_table("llama") is llama.TABLE
    assert "llama" not in bridge_ext.tables.generated_model_types()


def test_generated_tables_name_the_megatron_bridge_version_and_leave_out_mtp_and_unproven_towers():
    from importlib.metadata import version

    from bridge_ext.table_generate import LEFT_OUT_PREFIXES, MTP_PREFIXES
    from bridge_ext.table import MappingTable
    from bridge_ext.tables.architecture_notes import PROVEN_GENERATED, TOWERS_GENERATED
    from bridge_ext.tables.generated import GENERATED

    files = sorted((ROOT / "bridge_ext" / "tables" / "generated").glob("[!_]*.py"))
    assert files
    for path in files:
        assert f'MEGATRON_BRIDGE_VERSION = "{version("megatron-bridge")}"' in path.read_text(), path.name
    towers = tuple(prefix for prefix in LEFT_OUT_PREFIXES if prefix not in MTP_PREFIXES)

    def rules(table):  # a CheckedTable builder's table and its last layers' rules
        if isinstance(table, MappingTable):
            return table.rules
        return (*table.build.table.rules, *(table.build.last_layers.rules if table.build.last_layers else ()))

    for table in GENERATED:
        assert [each.megatron for each in rules(table) if each.megatron.startswith(MTP_PREFIXES)] == []
    covered = {table.model_types[0] for table in GENERATED
               if any(each.megatron.startswith(towers) for each in rules(table))}
    assert covered == TOWERS_GENERATED and TOWERS_GENERATED <= PROVEN_GENERATED


class _UnknownMapping:
    """A mapping kind the generator does not know."""

    megatron_param = "decoder.layers.*.mlp.mystery.weight"
    hf_param = "model.layers.*.mlp.mystery.weight"


def test_an_unknown_mapping_kind_is_refused_naming_class_and_parameter():
    from bridge_ext.table_generate import translate

    with pytest.raises(TableError, match=r"unknown Megatron-Bridge mapping kind _UnknownMapping for parameter "
                                         r"decoder\.layers\.\*\.mlp\.mystery\.weight"):
        translate([_UnknownMapping()], resolver=None, expert_parameters=None)


def test_ernie_s_squeezing_bias_mapping_becomes_a_replicated_rule_with_unsqueeze():
    """_SqueezeBiasMapping is read by its class (architecture_notes.KINDS_WITH_OPS): its base's
    replicated rule, then Unsqueeze(0) ([E] -> [1, E]); the subclass's name alone is not enough."""
    from megatron.bridge.models.ernie.ernie_45_bridge import _SqueezeBiasMapping

    from bridge_ext.table_generate import translate

    mapping = _SqueezeBiasMapping("decoder.layers.*.mlp.router.expert_bias",
                                  "model.layers.*.mlp.moe_statics.e_score_correction_bias")
    (generated,) = translate([mapping], resolver=None, expert_parameters=None).rules
    assert generated.text == ('rule(\n            "decoder.layers.{layer}.mlp.router.expert_bias",\n'
                              '            "model.layers.{layer}.mlp.moe_statics.e_score_correction_bias",\n'
                              '            Unsqueeze(0),\n            tp="replicated",\n        )')
    lookalike = type("_SqueezeBiasMapping", (type(mapping).__mro__[1],), {})  # same name, other module
    with pytest.raises(TableError, match=r"unknown Megatron-Bridge mapping kind _SqueezeBiasMapping"):
        translate([lookalike("decoder.layers.*.mlp.router.expert_bias", "model.layers.*.x")], resolver=None,
                  expert_parameters=None)


_VL = "language_model.decoder.layers.*.mlp.vision_moe_layer.experts.local_experts.*"
_TEXT = "language_model.decoder.layers.*.mlp.text_moe_layer"


class _Replicated:
    """A tiny model's answer for every weight: replicated."""

    def kind(self, mapping) -> str:
        return "replicated"


def test_ernie_vl_offset_experts_become_named_offsets_checked_on_the_config_and_placed_first():
    """_OffsetGatedMLPMapping / _OffsetRowParallelMapping (architecture_notes.EXPERT_OFFSET_KINDS):
    the Hugging Face expert index is Megatron's plus the config's moe_num_experts, read from each
    model's config ({expert+moe_num_experts}), checked against the tiny config; their rules go
    first (the reverse direction then reads experts.5 as the vision pool's)."""
    from types import SimpleNamespace

    from megatron.bridge.models.conversion.param_mapping import GatedMLPMapping
    from megatron.bridge.models.ernie_vl.ernie45_vl_bridge import _OffsetGatedMLPMapping, _OffsetRowParallelMapping

    from bridge_ext.table_generate import translate

    hf = "model.layers.*.mlp.experts.*."
    mappings = [GatedMLPMapping(f"{_TEXT}.experts.local_experts.*.linear_fc1.weight", gate=hf + "gate_proj.weight",
                                up=hf + "up_proj.weight"),
                _OffsetGatedMLPMapping(f"{_VL}.linear_fc1.weight", gate=hf + "gate_proj.weight", up=hf + "up_proj.weight",
                                       expert_offset=4),
                _OffsetRowParallelMapping(f"{_VL}.linear_fc2.weight", hf + "down_proj.weight", expert_offset=4)]
    config = SimpleNamespace(text_config=SimpleNamespace(moe_num_experts=4))
    homes = []
    translation = translate(mappings, None, ("gate_up_proj", "down_proj"), hf_config=config,
                            fused_name=lambda names, parameter: homes.append(names) or f"pool.{parameter}")
    assert translation.config_offsets == ("moe_num_experts",)
    texts = [each.text for each in translation.rules]
    assert "vision_moe_layer" in texts[0] and "text_moe_layer" in texts[-1]
    assert '"model.layers.{layer}.mlp.experts.{expert+moe_num_experts}.down_proj.weight"' in texts[2]
    assert homes[1] == ["model.layers.{layer}.mlp.experts.{expert+moe_num_experts}.gate_proj.weight",
                        "model.layers.{layer}.mlp.experts.{expert+moe_num_experts}.up_proj.weight"]
    for tiny in (SimpleNamespace(text_config=SimpleNamespace(moe_num_experts=8)), None):
        with pytest.raises(TableError, match=r"_OffsetRowParallelMapping of .*: its expert offset 4 is not the tiny "
                                             r"config's moe_num_experts"):
            translate(mappings[2:], None, ("gate_up_proj", "down_proj"), hf_config=tiny)


def test_ernie_vl_concatenated_bias_becomes_one_stacked_rule_in_the_slice_order():
    """_ConcatBiasMapping (architecture_notes.STACKED_KINDS): the text and vision routers' expert
    biases are rows 0 and 1 of one Hugging Face tensor: a word wildcard in that order, stacked;
    a slice without its partner is refused."""
    from megatron.bridge.models.ernie_vl.ernie45_vl_bridge import _ConcatBiasMapping

    from bridge_ext.table_generate import translate

    hf = "model.layers.*.mlp.moe_statics.e_score_correction_bias"
    vision = _ConcatBiasMapping(f"{_TEXT.replace('text', 'vision')}.router.expert_bias", hf, "vision", 4)
    text = _ConcatBiasMapping(f"{_TEXT}.router.expert_bias", hf, "text", 4)
    (generated,) = translate([vision, text], _Replicated(), None).rules
    assert generated.megatron == ("language_model.decoder.layers.{layer}.mlp.{part=text_moe_layer|vision_moe_layer}"
                                  ".router.expert_bias")
    assert 'stack="part"' in generated.text and 'tp="replicated"' in generated.text
    with pytest.raises(TableError, match=r"_ConcatBiasMapping of .*: 1 of the stacked slices \['text', 'vision'\]"):
        translate([text], _Replicated(), None)


def test_any_characters_wildcards_are_refused():
    from megatron.bridge.models.conversion.param_mapping import ReplicatedMapping

    from bridge_ext.table_generate import translate

    with pytest.raises(TableError, match=r"'\*\*' wildcards"):
        translate([ReplicatedMapping("decoder.**.weight", "model.**.weight")], resolver=None, expert_parameters=None)


class _Resolver:
    """A tiny model's tower: a ModuleList of blocks, each with an nn.Sequential."""

    def __init__(self):
        import torch

        from bridge_ext.table_generate import Resolver

        tower = torch.nn.Module()
        tower.blocks = torch.nn.ModuleList(torch.nn.Module() for _ in range(2))
        for block in tower.blocks:
            block.mlp = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.GELU(), torch.nn.Linear(3, 2))
        tower.norm = torch.nn.LayerNorm(2)
        chunk = torch.nn.Module()
        chunk.visual = tower
        self.resolver = Resolver(chunk)
        self.names = [name for name, _ in chunk.named_parameters()]


def test_a_subtree_becomes_module_list_wildcards_with_sequential_indices_literal():
    from megatron.bridge.models.conversion.param_mapping import ReplicatedMapping

    from bridge_ext.table_generate import expand_subtree

    tiny = _Resolver()
    hf_names = [name.replace("visual.", "model.visual.", 1) for name in tiny.names]
    rules = expand_subtree(ReplicatedMapping("visual.**", "model.visual.**"), tiny.resolver, hf_names)
    assert [each.megatron for each in rules] == [
        f"visual.blocks.{{blocks}}.mlp.{i}.{leaf}" for i in (0, 2) for leaf in ("weight", "bias")
    ] + ["visual.norm.weight", "visual.norm.bias"]
    assert rules[0].text == ('rule("visual.blocks.{blocks}.mlp.0.weight", "model.visual.blocks.{blocks}.mlp.0.weight", '
                             'tp="replicated")')


def test_a_subtree_whose_two_sides_differ_is_refused_naming_the_mapping():
    from megatron.bridge.models.conversion.param_mapping import ReplicatedMapping

    from bridge_ext.table_generate import expand_subtree

    tiny = _Resolver()
    hf_names = [name.replace("visual.", "model.visual.", 1) for name in tiny.names if "norm.bias" not in name]
    with pytest.raises(TableError, match=r"ReplicatedMapping of visual\.\*\* -> model\.visual\.\*\*: the subtrees "
                                         r"do not correspond one to one \(only in Megatron: \['norm\.bias'\]"):
        expand_subtree(ReplicatedMapping("visual.**", "model.visual.**"), tiny.resolver, hf_names)
    with pytest.raises(TableError, match=r"no parameter under audio\."):
        expand_subtree(ReplicatedMapping("audio.**", "audio.**"), tiny.resolver, hf_names)


def test_a_subtree_is_compared_in_the_bridge_s_spelling_and_written_in_the_saved_one():
    """HF_NAME_RENAMES (Qwen3-ASR): the bridge names the remote code's thinker.*, transformers saves
    model.*, and a module inside the tower (proj1) is saved elsewhere (multi_modal_projector)."""
    from megatron.bridge.models.conversion.param_mapping import ReplicatedMapping

    from bridge_ext.table_generate import bridge_spelling, expand_subtree, renamed

    tiny = _Resolver()
    renames = (("thinker.visual.norm.", "model.projector.norm."), ("thinker.visual.", "model.visual."))
    saved = [renamed(name.replace("visual.", "thinker.visual.", 1), renames) for name in tiny.names]
    assert "model.projector.norm.bias" in saved and bridge_spelling("model.projector.norm.bias", renames) == \
        "thinker.visual.norm.bias"
    rules = expand_subtree(ReplicatedMapping("visual.**", "thinker.visual.**"), tiny.resolver, saved, renames)
    assert rules[0].text == ('rule("visual.blocks.{blocks}.mlp.0.weight", "model.visual.blocks.{blocks}.mlp.0.weight", '
                             'tp="replicated")')
    assert rules[-1].text == 'rule("visual.norm.bias", "model.projector.norm.bias", tp="replicated")'
    with pytest.raises(TableError, match=r"only in Megatron: \['norm\.bias'\]"):  # compared in the bridge's spelling
        expand_subtree(ReplicatedMapping("visual.**", "thinker.visual.**"), tiny.resolver,
                       [name for name in saved if name != "model.projector.norm.bias"], renames)


def _fused_qkv_tower(groups: int):
    """A tiny model's tower attention (4 heads of 8 in ``groups`` query groups) and its config."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoConfig

    from bridge_ext.table_generate import Resolver

    class ColumnParallelLinear(torch.nn.Linear):  # Megatron-Bridge reads the kind off the class name
        config = SimpleNamespace(num_attention_heads=4, num_query_groups=groups, kv_channels=8, hidden_size=32)

    chunk = torch.nn.Module()
    chunk.vision_model = torch.nn.Module()
    chunk.vision_model.layers = torch.nn.ModuleList([torch.nn.Module()])
    chunk.vision_model.layers[0].linear_qkv = ColumnParallelLinear(32, 32 + 2 * groups * 8)
    config = AutoConfig.for_model("exaone4_5", text_config=dict(model_type="exaone4", hidden_size=64, head_dim=16),
                                  vision_config=dict(hidden_size=32, num_heads=4, num_key_value_heads=2))
    return Resolver(chunk), config


def test_a_fused_qkv_splits_by_the_tower_s_sizes_checked_on_the_tiny_model():
    """ConcatenatedQKVMapping (one Hugging Face qkv): per query group [q heads; k; v] gathered, then
    joined; under a tower prefix by the VisionSizes of architecture_notes.VISION_SIZE_FIELDS, which
    must give the tiny Megatron attention's own heads, groups and head width."""
    from megatron.bridge.models.conversion.param_mapping import ConcatenatedQKVMapping

    from bridge_ext.table_generate import translate
    from bridge_ext.tables.sizes import VisionSizes

    mapping = ConcatenatedQKVMapping("vision_model.layers.*.linear_qkv.weight", "model.visual.blocks.*.attn.qkv.weight")
    resolver, config = _fused_qkv_tower(groups=2)
    translation = translate([mapping], resolver, None, model_type="exaone4_5", hf_config=config)
    sizes = '"vision_q_rows_per_group", "vision_head_dim", "vision_head_dim"'
    assert [each.text for each in translation.rules] == [
        f'rule(\n            "vision_model.layers.{{layer}}.linear_qkv.weight",\n'
        f'            "model.visual.blocks.{{layer}}.attn.qkv.weight",\n'
        f"            SplitGroupedRows({sizes}),\n            Concat(({sizes})),\n        )"]
    assert translation.vision_sizes == VisionSizes("num_heads", "num_key_value_heads")
    assert VisionSizes("num_heads", "num_key_value_heads").read(config)["vision_q_rows_per_group"] == 16
    resolver, config = _fused_qkv_tower(groups=4)  # the config says 2 key / value heads
    with pytest.raises(TableError, match=r"the tiny Megatron attention has \(heads, query groups, head width\) "
                                         r"\[\(4, 4, 8\)\], the table would read \(4, 2, 8\)"):
        translate([mapping], resolver, None, model_type="exaone4_5", hf_config=config)
    with pytest.raises(TableError, match=r"VISION_SIZE_FIELDS names no vision_config fields of mistral3"):
        translate([mapping], resolver, None, model_type="mistral3", hf_config=config)  # a tower generated


def test_in_memory_prefixes_are_read_off_name_pairs_or_refused():
    from bridge_ext.table_generate import in_memory_prefixes_of

    pairs = [("language_model.model.layers.0.mlp.up_proj.weight", "model.language_model.layers.0.mlp.up_proj.weight"),
             ("language_model.lm_head.weight", "lm_head.weight"),
             ("vision_tower.encoder.layers.1.fc1.bias", "model.vision_tower.encoder.layers.1.fc1.bias")]
    assert in_memory_prefixes_of(pairs) == (("language_model.lm_head.", "lm_head."),  # longest first
                                            ("language_model.model.", "model.language_model."),
                                            ("vision_tower.", "model.vision_tower."))
    assert in_memory_prefixes_of([("model.layers.0.mlp.bias", "model.layers.0.mlp.gate.bias")]) == ()  # in a layer
    with pytest.raises(TableError, match=r"renames the prefix visual\. two ways"):
        in_memory_prefixes_of([("visual.a.weight", "model.visual.a.weight"),
                               ("visual.b.weight", "encoder.visual.b.weight")])
    # Qwen3-Omni: thinker.lm_head stays, so thinker.audio_tower is renamed by a narrower prefix than thinker.
    omni = [("thinker.audio_tower.conv1.weight", "thinker.model.audio_tower.conv1.weight"),
            ("thinker.model.layers.0.mlp.gate.weight", "thinker.model.language_model.layers.0.mlp.gate.weight"),
            ("thinker.lm_head.weight", "thinker.lm_head.weight")]
    assert in_memory_prefixes_of(omni) == (("thinker.audio_tower.", "thinker.model.audio_tower."),
                                           ("thinker.model.", "thinker.model.language_model."))


def test_fused_expert_names_must_be_transformers_experts_parameters():
    from megatron.bridge.models.conversion.param_mapping import GatedMLPMapping

    from bridge_ext.table_generate import translate

    mapping = GatedMLPMapping("decoder.layers.*.mlp.experts.linear_fc1.weight*",
                              gate="model.layers.*.mlp.experts.*.w1.weight",
                              up="model.layers.*.mlp.experts.*.w3.weight")
    with pytest.raises(TableError, match=r"the fused experts parameter gate_up_proj is not one of transformers' "
                                         r"experts module parameters \['w13', 'w2'\]"):
        translate([mapping], resolver=None, expert_parameters=("w13", "w2"))


def test_a_gate_up_pair_transformers_loads_as_one_linear_keeps_one_adapter_there():
    """architecture_notes.IN_MEMORY_FUSED_GATE_UP: the rule writes the saved gate / up names and
    its adapter on the fused linear (Rule.lora_fused); a pair the note does not describe is refused."""
    from megatron.bridge.models.conversion.param_mapping import GatedMLPMapping

    from bridge_ext.table_generate import translate

    mapping = GatedMLPMapping("decoder.layers.*.mlp.linear_fc1.weight", gate="model.layers.*.mlp.gate_proj.weight",
                              up="model.layers.*.mlp.up_proj.weight")
    (generated,) = translate([mapping], resolver=None, expert_parameters=None, model_type="minimax_m3_vl").rules
    assert 'lora_fused="model.layers.{layer}.mlp.gate_up_proj.weight"' in generated.text
    assert "lora_parts" not in generated.text
    (plain,) = translate([mapping], resolver=None, expert_parameters=None, model_type="mistral").rules
    assert 'lora_parts=("gate", "up")' in plain.text and "lora_fused" not in plain.text
    odd = GatedMLPMapping("decoder.layers.*.mlp.linear_fc1.weight", gate="model.layers.*.mlp.w1.weight",
                          up="model.layers.*.mlp.w3.weight")
    with pytest.raises(TableError, match=r"model\.layers\.\{layer\}\.mlp\.w1\.weight / .*: not the gate / up pair "
                                         r"\.gate_proj\.weight / \.up_proj\.weight transformers fuses"):
        translate([odd], resolver=None, expert_parameters=None, model_type="minimax_m3_vl")


def test_experts_held_one_module_each_go_per_expert_without_a_family():
    """Ling 2.0: transformers' (remote-code) model holds its experts one module each: per-expert
    rules only, no family, no fused variant."""
    from megatron.bridge.models.conversion.param_mapping import AutoMapping

    from bridge_ext.table_generate import translate

    down = AutoMapping("decoder.layers.*.mlp.experts.linear_fc2.weight*", "model.layers.*.mlp.experts.*.down_proj.weight")

    class Resolver:
        def kind(self, mapping):
            return "row"

    translation = translate([down], Resolver(), expert_parameters=None, experts_in_modules=True)
    assert [each.text for each in translation.rules] == [
        'rule(\n            "decoder.layers.{layer}.mlp.experts.linear_fc2.weight{expert}",\n'
        '            "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",\n            tp="row",\n        )']
    assert translation.expert_parameters is None
    with pytest.raises(TableError, match="transformers' model has no fused experts module"):
        translate([down], Resolver(), expert_parameters=None)


def test_a_class_transformers_lacks_must_be_registered_under_its_name():
    from transformers import OPTConfig  # a model type without a table: the config's architectures decide

    from bridge_ext.hf_keys import model_class_for

    config = OPTConfig(architectures=["NoSuchForCausalLM"])
    with pytest.raises(TableError, match="transformers has no class NoSuchForCausalLM and none of that name is "
                                         "registered for OPTConfig"):
        model_class_for(config)


# hy_v3: in_memory_renames; falcon_h1: Mamba; qwen3_asr: HF_NAME_RENAMES, refused_config_fields;
# glm4v_moe: a tower, EXTRA_CONFIG_FIELDS; minimax_m3_vl: lora_fused, renamed expert parameters, HF_DEFAULTS;
# bailing_moe_v2: shipped remote code (register / repair); gemma4_text: per-layer head widths, KV-shared layers,
# a config check
@pytest.mark.parametrize("model_type", ["mistral", "hy_v3", "falcon_h1", "qwen3_asr", "glm4v_moe", "minimax_m3_vl",
                                        "bailing_moe_v2", "gemma4_text"])
def test_regenerating_a_table_gives_the_checked_in_file(megatron_cpu, model_type):
    from bridge_ext_testing.generate_tables import generate

    assert generate(model_type) == (ROOT / "bridge_ext" / "tables" / "generated" / f"{model_type}.py").read_text()


def test_generate_refuses_a_model_type_without_a_bridge():
    from click.testing import CliRunner

    from bridge_ext.cli import main

    result = CliRunner().invoke(main, ["tables", "generate", "olmo2"])
    assert result.exit_code == 1
    assert "registers no bridge for model_type 'olmo2'" in result.output


GEMMA4_LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def _gemma4_text_config(*, flag: bool = False, **fields):
    """A Gemma 4 text config as transformers 5.23 reads a config.json holding ``fields``."""
    from transformers import AutoConfig

    fields = dict(dict(num_hidden_layers=2, head_dim=256, global_head_dim=512,
                       layer_types=["sliding_attention", "full_attention"]), **fields)
    config = AutoConfig.for_model("gemma4_text", **fields)
    config.allow_global_per_layer_attribute_access = flag
    return config


def _gemma4_provider(config):
    from types import SimpleNamespace

    from megatron.bridge.models.gemma.gemma4_bridge import Gemma4Bridge

    return Gemma4Bridge().provider_bridge(SimpleNamespace(config=config))


def test_gemma4_text_head_dims_are_per_layer_in_transformers_so_megatron_bridge_reads_none():
    """PROVEN_SCOPE of gemma4_text (why the flag): transformers 5.23 keeps global_head_dim only in
    per_layer_config, and Megatron-Bridge's bridge reads config.head_dim (the published E2B / E4B: 256 / 512)."""
    from transformers.integrations.heterogeneity import AmbiguousGlobalPerLayerAttributeError

    config = _gemma4_text_config()
    assert config.to_dict().get("global_head_dim") is None
    assert config.per_layer_config[1].head_dim == 512
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError, match="'head_dim' is a per-layer attribute"):
        _gemma4_provider(config)


@pytest.mark.parametrize(("fields", "flag", "right"), [
    (dict(), True, True),  # E2B / E4B: 256 / 512, as many KV heads on global layers
    (dict(global_head_dim=256), False, False),  # equal head dims: global layers of Megatron-Bridge's default 512
    (dict(global_head_dim=1024), True, False),
    # 31B-like: K=V global layers with fewer KV heads (4 of 16)
    (dict(num_key_value_heads=16, num_attention_heads=32, attention_k_eq_v=True, num_global_key_value_heads=4),
     True, False),
])
def test_gemma4_text_provider_takes_its_defaults_for_the_global_layers(fields, flag, right):
    """With the head dims readable (equal, or allow_global_per_layer_attribute_access set), the
    provider's global layers are Megatron-Bridge's defaults (512 wide, num_key_value_heads KV heads),
    not the config's: right only where the config has those values."""
    config = _gemma4_text_config(flag=flag, **fields)
    global_layer = config.per_layer_config[1]
    provider = _gemma4_provider(config)
    assert (provider.kv_channels, provider.global_kv_channels, provider.num_global_query_groups) == (
        256, 512, config.per_layer_config[0].num_key_value_heads)
    read_right = (provider.global_kv_channels == global_layer.head_dim
                  and provider.num_global_query_groups == global_layer.num_key_value_heads)
    assert read_right == right


def test_gemma4_vision_language_provider_needs_the_flag_in_its_text_config(tmp_path):
    """REFUSED's reason for Gemma4ForConditionalGeneration: the flag passed to from_pretrained stays on
    the outer config; in config.json's text_config it reaches the text config Megatron-Bridge reads."""
    import json
    from types import SimpleNamespace

    from megatron.bridge.models.gemma_vl.gemma4_vl_bridge import Gemma4VLBridge
    from transformers import AutoConfig
    from transformers.integrations.heterogeneity import AmbiguousGlobalPerLayerAttributeError

    AutoConfig.for_model("gemma4", text_config=dict(num_hidden_layers=2, head_dim=256, global_head_dim=512,
                                                    layer_types=["sliding_attention", "full_attention"])
                         ).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(str(tmp_path), allow_global_per_layer_attribute_access=True)
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError):
        Gemma4VLBridge().provider_bridge(SimpleNamespace(config=config))
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["text_config"]["allow_global_per_layer_attribute_access"] = True
    (tmp_path / "config.json").write_text(json.dumps(saved))
    provider = Gemma4VLBridge().provider_bridge(SimpleNamespace(config=AutoConfig.from_pretrained(str(tmp_path))))
    assert (type(provider).__name__, provider.kv_channels, provider.global_kv_channels) == (
        "Gemma4DenseVLProvider", 256, 512)


def test_gemma4_text_flag_passed_to_megatron_bridge_only_needs_it_in_the_config_bridge_ext_reads(megatron_cpu, tmp_path):
    """With allow_global_per_layer_attribute_access passed to from_hf_pretrained (not in config.json),
    Megatron-Bridge's dense provider builds the E2B-like tiny model (head dims 16 / 512, KV shared by
    the last two layers) and its base export gives back the files; bridge_ext reads config.json, so it
    refuses before the first tensor, naming the flag, and exports the files exactly once given a config
    with it. Megatron-Bridge's LoRA split raises on global layers (tests/test_conformance_generated.py)."""
    import torch
    from megatron.bridge import AutoBridge
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from bridge_ext import export_hf_weights
    from bridge_ext.errors import TableError
    from bridge_ext_testing.qwen35 import cpu_current_device
    from bridge_ext_testing.tiny_generated import tiny_generated

    hf_dir = tiny_generated(tmp_path, "gemma4_text", overrides={"allow_global_per_layer_attribute_access": False})
    bridge = AutoBridge.from_hf_pretrained(str(hf_dir), allow_global_per_layer_attribute_access=True)
    provider = bridge.to_megatron_provider(load_weights=False)
    assert (provider.kv_channels, provider.global_kv_channels) == (16, 512)
    provider.params_dtype, provider.bf16, provider.use_cpu_initialization = torch.float32, False, True
    provider.finalize()
    with cpu_current_device():
        chunks = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    bridge.load_hf_weights(chunks)
    original = load_file(str(hf_dir / "model.safetensors"))
    assert not any(".layers.3.self_attn.k_" in name for name in original)  # a KV-shared layer: no k_proj / k_norm
    theirs = dict(bridge.export_hf_weights(chunks, cpu=True, show_progress=False))
    assert sorted(theirs) == sorted(original)
    assert [name for name in original if not torch.equal(theirs[name], original[name])] == []
    with pytest.raises(TableError, match="needs allow_global_per_layer_attribute_access=True"):
        next(iter(export_hf_weights(chunks, base_only=True)))
    config = AutoConfig.from_pretrained(str(hf_dir), allow_global_per_layer_attribute_access=True)
    ours = dict(export_hf_weights(chunks, base_only=True, hf_config=config))
    assert sorted(ours) == sorted(original)
    assert [name for name in original if not torch.equal(ours[name], original[name])] == []
    # its LoRA exports (adapters, merged) split a global layer's linear_qkv lora_B with the sliding
    # layout: the bridge's global branch asks for global_head_dim, which the dense provider names global_kv_channels
    assert not hasattr(chunks[0].config, "global_head_dim") and chunks[0].config.global_kv_channels == 512
    global_lora_b = torch.zeros((4 + 2 * 2) * 512, 4)
    with pytest.raises(RuntimeError, match="is invalid for input of size 16384"):
        bridge._model_bridge._split_qkv_linear_out_weight(chunks, global_lora_b)


@pytest.mark.parametrize(("fields", "refused"), [
    (dict(enable_moe_block=True), "enable_moe_block: Megatron-Bridge 0.6.2's MoE provider needs Transformer Engine"),
    (dict(attention_k_eq_v=True, num_global_key_value_heads=1), "attention_k_eq_v"),
    (dict(global_head_dim=1024), r"layer 1 \(full_attention\): head dim 1024 and 2 KV heads, where Megatron-Bridge "
                                 r"0.6.2 builds 512 and 2"),
    (dict(global_head_dim=16), r"layer 1 \(full_attention\): head dim 16 and 2 KV heads"),  # equal head dims
    (dict(allow_global_per_layer_attribute_access=False), "needs allow_global_per_layer_attribute_access=True"),
])
def test_gemma4_text_table_refuses_configs_it_is_not_proven_for(fields, refused):
    """The generated table's check (bridge_ext.tables.gemma4): only dense configs whose global layers
    are Megatron-Bridge 0.6.2's defaults (512 wide, num_key_value_heads KV heads), with the flag."""
    from bridge_ext.errors import TableError
    from bridge_ext.tables import table_for
    from bridge_ext_testing.tiny_generated import tiny_config

    assert table_for(tiny_config("gemma4_text")).model_types == ("gemma4_text",)  # the proven tiny config
    with pytest.raises(TableError, match=refused):
        table_for(tiny_config("gemma4_text", fields))


def test_gemma4_text_kv_shared_layers_drop_k_v_and_k_norm_from_the_config():
    """num_kv_shared_layers decides, before export, which layers' linear_qkv give q_proj only and
    whose k_layernorm becomes nothing; the other layers keep the table's own rules."""
    from bridge_ext.tables import table_for
    from bridge_ext_testing.tiny_generated import tiny_config

    for shared in (0, 1, 3):
        table = table_for(tiny_config("gemma4_text", {"num_kv_shared_layers": shared}))
        qkv = {layer: table.match(f"decoder.layers.{layer}.self_attention.linear_qkv.weight").rule.hf for layer in range(4)}
        k_norm = {layer: table.match(f"decoder.layers.{layer}.self_attention.k_layernorm.weight").rule.hf
                  for layer in range(4)}
        assert [layer for layer in range(4) if len(qkv[layer]) == 1] == list(range(4 - shared, 4))
        assert [layer for layer in range(4) if not k_norm[layer]] == list(range(4 - shared, 4))


#: Step-3.7's published config.json spelling (stepfun-ai's remote-code fields, which Megatron-Bridge's
#: Step37Config reads and transformers' Step3p7Config maps), scaled down: layer 0 dense full attention
#: (4 heads, half rotary), layer 1 MoE sliding attention (6 heads), 2 KV groups.
STEP3P7_CONFIG = {
    "architectures": ["Step3p7ForConditionalGeneration"], "model_type": "step3p7", "projector_bias": False,
    "image_token_id": 120,
    "text_config": {
        "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_attention_groups": 2, "head_dim": 16,
        "num_hidden_layers": 2, "vocab_size": 128, "rms_norm_eps": 1e-5, "moe_intermediate_size": 32,
        "moe_num_experts": 4, "moe_top_k": 2, "share_expert_dim": 48, "moe_layers_enum": "1",
        "layer_types": ["full_attention", "sliding_attention"], "sliding_window": 16,
        "attention_other_setting": {"attention_type": "sliding_attention", "num_attention_heads": 6,
                                    "num_attention_groups": 2, "head_dim": 16},
        "rope_theta": [10000.0, 5000.0], "partial_rotary_factors": [0.5, 1.0], "use_head_wise_attn_gate": True,
        "use_moe_router_bias": True, "moe_router_activation": "sigmoid", "moe_router_scaling_factor": 2.0,
        "tie_word_embeddings": False, "num_nextn_predict_layers": 0, "max_position_embeddings": 128},
    "vision_config": {"width": 32, "layers": 2, "heads": 2, "image_size": 28, "patch_size": 14, "mlp_ratio": 1.5},
}


@pytest.fixture(scope="module")
def step3p7_dir(tmp_path_factory):
    """A tiny Step-3.7 folder: transformers' own classes' weights under the published config.json."""
    import json

    import torch
    from transformers import Step3p7Config, Step3p7ForConditionalGeneration

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("step3p7")
    Step3p7ForConditionalGeneration(Step3p7Config(**json.loads(json.dumps(STEP3P7_CONFIG)))).save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps(STEP3P7_CONFIG))
    return directory


def test_step3p7_configs_agree_but_megatron_bridge_s_hides_transformers_auto_classes(step3p7_dir):
    """REFUSED's reason for Step3p7ForConditionalGeneration, its config part: both config classes read
    the published config.json to the same sizes; importing Megatron-Bridge registers its Step37Config
    for step3p7, which transformers' auto model classes refuse (transformers' own class still loads)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, Step3p7Config, Step3p7ForConditionalGeneration

    import megatron.bridge.models  # noqa: F401  (registers its bridges and their configs)
    from megatron.bridge.models.stepfun.configuration_step37 import Step37Config

    theirs = AutoConfig.from_pretrained(str(step3p7_dir))
    assert type(theirs) is Step37Config
    with pytest.raises(ValueError, match="Unrecognized configuration class .*Step37Config"):
        AutoModelForImageTextToText.from_config(theirs)
    assert type(Step3p7ForConditionalGeneration.from_pretrained(str(step3p7_dir)).config) is Step3p7Config
    ours, theirs = Step3p7Config.from_pretrained(str(step3p7_dir)).text_config, theirs.text_config
    assert (ours.num_key_value_heads, ours.n_routed_experts, ours.num_experts_per_tok, ours.share_expert_dim) == (
        theirs.num_attention_groups, theirs.moe_num_experts, theirs.moe_top_k, theirs.share_expert_dim)
    assert ours.mlp_layer_types == ["dense", "sparse"] and theirs.moe_layers_enum == "1"
    assert [ours.per_layer_config[i].num_attention_heads for i in (0, 1)] == [
        theirs.num_attention_heads, theirs.attention_other_setting["num_attention_heads"]]
    assert [ours.rope_parameters[kind]["rope_theta"] for kind in ours.layer_types] == theirs.rope_theta


def _step35_local_spec(config, vp_stage=None, pp_rank=None):
    """Megatron-Bridge's Step-3.5 layer spec (build_step35_layer_spec: Step35DecoderLayer on the
    decoder block spec) on megatron-core's local modules."""
    from bridge_ext_testing.gpt_families import local_block_spec
    from bridge_ext_testing.local_specs import localize
    from megatron.bridge.models.stepfun.step35_provider import Step35DecoderLayer

    block = local_block_spec(config, vp_stage=vp_stage, pp_rank=pp_rank)
    for layer in block.layer_specs:
        layer.module = Step35DecoderLayer
    return localize(block, config)


@pytest.mark.parametrize("attention_output_gate", [False, True])
def test_step3p7_megatron_model_cannot_hold_transformers_attention_gate(megatron_cpu, step3p7_dir,
                                                                        attention_output_gate):
    """REFUSED's reason for Step3p7ForConditionalGeneration, its model part. Step37Bridge sets
    head_wise_attn_gate (no megatron-core 0.19.2 field), not Step35Bridge's attention_output_gate
    fallback: linear_qkv has no g_proj rows and its own load fails. With the fallback set by hand the
    gate loads (each head's scalar row repeated head_dim times) and its export keeps the first of each
    head's gate rows, dropping the others; the stacked experts read the expert off grouped-GEMM names
    (weight{e}), so the CPU build's local_experts alias of them (same class) fails."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.bridge.models.conversion.param_mapping import merge_qkvg_weights, split_qkvg_weights

    from bridge_ext_testing import gpt_families
    from bridge_ext_testing.qwen35 import qwen35_auto_bridge_class

    assert "head_wise_attn_gate" not in TransformerConfig.__dataclass_fields__
    bridge = qwen35_auto_bridge_class().from_hf_pretrained(str(step3p7_dir))
    provider = bridge.to_megatron_provider(load_weights=False)
    assert (provider.head_wise_attn_gate, provider.attention_output_gate) == (True, False)
    gpt_families.configure_provider(provider, step3p7_dir)
    provider.transformer_layer_spec = _step35_local_spec
    provider.attention_output_gate = attention_output_gate
    provider.apply_rope_fusion = provider.persist_layer_norm = False
    provider.finalize()
    with gpt_families.cpu_build_context(provider):
        chunks = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    qkv = chunks[0].language_model.decoder.layers[0].self_attention.linear_qkv.weight
    assert qkv.shape[0] == (4 + 2 + 2) * 16 + (4 * 16 if attention_output_gate else 0)  # q, k, v (+ gate)
    if not attention_output_gate:
        with pytest.raises(ValueError, match=r"linear_qkv\.weight:\n.*\[128, 64\]\)\n.*\[132, 64\]"):
            bridge.load_hf_weights(chunks)
        return
    with pytest.raises(ValueError, match="invalid literal for int"):  # StackedExpert*Mapping._expert_idx
        bridge.load_hf_weights(chunks)
    q, k, v, g = (torch.randn(rows, 64) for rows in (64, 32, 32, 4))
    trained = merge_qkvg_weights(provider, q, k, v, g)
    trained[4 * 16 - 1] += 1.0  # a trained gate row beside its head's first (group 0: q, gate, k, v; head 1, last row)
    assert torch.equal(split_qkvg_weights(provider, trained)[3], g)  # the export does not see it


def test_glm4v_moe_gets_a_provider_by_the_means_its_note_states():
    """NOTES' glm4v_moe: Megatron-Bridge's bridge reads text_config.partial_rotary_factor and
    use_qk_norm; with the published config.json's keys transformers 5.9 keeps both attributes,
    5.22 onwards move the first into rope_parameters, and setting it back gives the provider."""
    from types import SimpleNamespace

    import transformers
    from megatron.bridge.models.glm_vl.glm_45v_bridge import GLM45VBridge
    from packaging.version import Version
    from transformers import AutoConfig

    from bridge_ext.tables.architecture_notes import NOTES, PROVEN_GENERATED

    assert set(NOTES) <= PROVEN_GENERATED
    published = dict(head_dim=128, partial_rotary_factor=0.5, use_qk_norm=False)  # fields beyond the class's
    config = AutoConfig.for_model("glm4v_moe", text_config=published)
    text = config.text_config
    moved = not hasattr(text, "partial_rotary_factor")
    version = Version(transformers.__version__)
    assert moved if version >= Version("5.22") else (not moved if version < Version("5.10") else True)
    if moved:
        with pytest.raises(AttributeError, match="partial_rotary_factor"):
            GLM45VBridge().provider_bridge(SimpleNamespace(config=config))
        text.partial_rotary_factor = text.rope_parameters["partial_rotary_factor"]  # the note's means
    provider = GLM45VBridge().provider_bridge(SimpleNamespace(config=config))
    assert (provider.rotary_percent, provider.qk_layernorm, provider.mrope_section) == (0.5, False, [8, 12, 12])
    del text.use_qk_norm  # a config.json without it (transformers' class has no such field)
    with pytest.raises(AttributeError, match="use_qk_norm"):
        GLM45VBridge().provider_bridge(SimpleNamespace(config=config))
