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

    from bridge_ext.tables.architecture_notes import PROVEN_GENERATED

    proven = sorted(row.model_type for row in rows if row.status == "generated+proven")
    assert proven == sorted(set(TINY) & generated_model_types())
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
    from bridge_ext.tables.architecture_notes import PROVEN_GENERATED, TOWERS_GENERATED
    from bridge_ext.tables.generated import GENERATED

    files = sorted((ROOT / "bridge_ext" / "tables" / "generated").glob("[!_]*.py"))
    assert files
    for path in files:
        assert f'MEGATRON_BRIDGE_VERSION = "{version("megatron-bridge")}"' in path.read_text(), path.name
    towers = tuple(prefix for prefix in LEFT_OUT_PREFIXES if prefix not in MTP_PREFIXES)
    for table in GENERATED:
        assert [each.megatron for each in table.rules if each.megatron.startswith(MTP_PREFIXES)] == []
    covered = {table.model_types[0] for table in GENERATED
               if any(each.megatron.startswith(towers) for each in table.rules)}
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
    translation = translate(mappings, None, ("gate_up_proj", "down_proj"), config=config,
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
            translate(mappings[2:], None, ("gate_up_proj", "down_proj"), config=tiny)


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


@pytest.mark.parametrize("model_type", ["mistral", "hy_v3", "falcon_h1"])  # hy_v3: in_memory_renames; falcon_h1: Mamba
def test_regenerating_a_table_gives_the_checked_in_file(megatron_cpu, model_type):
    from bridge_ext_testing.generate_tables import generate

    assert generate(model_type) == (ROOT / "bridge_ext" / "tables" / "generated" / f"{model_type}.py").read_text()


def test_generate_refuses_a_model_type_without_a_bridge():
    from click.testing import CliRunner

    from bridge_ext.cli import main

    result = CliRunner().invoke(main, ["tables", "generate", "olmo2"])
    assert result.exit_code == 1
    assert "registers no bridge for model_type 'olmo2'" in result.output


@pytest.mark.parametrize("global_head_dim", [512, 256])
def test_gemma4_text_gets_a_provider_only_where_its_head_dims_agree(global_head_dim):
    """REFUSED's reason for Gemma4ForCausalLM: Megatron-Bridge's bridge reads config.head_dim, which
    transformers makes per-layer where global_head_dim differs (the published E2B / E4B: 256 / 512)."""
    from types import SimpleNamespace

    from megatron.bridge.models.gemma.gemma4_bridge import Gemma4Bridge
    from transformers import AutoConfig
    from transformers.integrations.heterogeneity import AmbiguousGlobalPerLayerAttributeError

    config = AutoConfig.for_model("gemma4_text", num_hidden_layers=2, head_dim=256, global_head_dim=global_head_dim,
                                  layer_types=["sliding_attention", "full_attention"])
    if global_head_dim != 256:
        with pytest.raises(AmbiguousGlobalPerLayerAttributeError, match="'head_dim' is a per-layer attribute"):
            Gemma4Bridge().provider_bridge(SimpleNamespace(config=config))
    else:
        assert Gemma4Bridge().provider_bridge(SimpleNamespace(config=config)).kv_channels == 256
