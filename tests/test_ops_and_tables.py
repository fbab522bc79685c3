"""Operations, patterns and rules on small hand-made tensors (no Megatron model)."""

import ast
import re
import sys
from pathlib import Path

import pytest
import torch

from bridge_ext.dims import ModelDims
from bridge_ext.engine import ExportError, plan_tasks, run_rule
from bridge_ext.errors import TableError
from bridge_ext.ops import (
    AddOne,
    Concat,
    GroupRows,
    KeepParts,
    SplitGroupedRows,
    SplitHeadGroups,
    SplitQKVHeadDims,
    SplitRows,
    Transpose,
    TrimVocab,
)
from bridge_ext.patterns import NamePattern
from bridge_ext.reverse import reverse_rule
from bridge_ext.table import ExpertFamily, MappingTable, rule

DIMS = ModelDims({"head_dim": 2, "q_rows_per_group": 4, "a": 3, "b": 1, "vocab_size": 5})


def rows(n: int, width: int = 3) -> torch.Tensor:
    return torch.arange(n * width, dtype=torch.float32).reshape(n, width)


def test_pattern_matches_integers_only_and_fills_back():
    pattern = NamePattern("decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight")
    values = pattern.match("decoder.layers.12.mlp.experts.local_experts.3.linear_fc1.weight")
    assert values == {"layer": "12", "expert": "3"}
    assert pattern.match("decoder.layers.x.mlp.experts.local_experts.3.linear_fc1.weight") is None
    assert pattern.match("decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight.extra") is None
    assert NamePattern("model.layers.{layer}.mlp.experts.{expert}.up_proj.weight").fill(values) == (
        "model.layers.12.mlp.experts.3.up_proj.weight"
    )


def test_grouped_split_takes_each_part_of_every_group():
    # two query groups of [q q q q | k k | v v] rows
    tensor = rows(16)
    q, k, v = SplitGroupedRows("q_rows_per_group", "head_dim", "head_dim").forward([tensor], DIMS)
    assert torch.equal(q, torch.cat([tensor[0:4], tensor[8:12]]))
    assert torch.equal(k, torch.cat([tensor[4:6], tensor[12:14]]))
    assert torch.equal(v, torch.cat([tensor[6:8], tensor[14:16]]))


def test_head_group_split_reads_each_layer_s_group_count_off_its_rows():
    dims = ModelDims({"heads": 4, "qk": 2, "v": 1})
    split = SplitHeadGroups("heads", "qk", "v")
    for groups in (2, 4):  # full layers: 2 groups of [q (4 rows); k (2); v (1)], sliding: 4 of [q (2); k; v]
        q_rows = 4 // groups * 2
        tensor = rows(8 + groups * 3)
        q, k, v = split.forward([tensor], dims)
        group = q_rows + 3
        assert torch.equal(q, torch.cat([tensor[g * group:g * group + q_rows] for g in range(groups)]))
        assert torch.equal(v, torch.cat([tensor[g * group + q_rows + 2:(g + 1) * group] for g in range(groups)]))
        assert k.shape[0] == 2 * groups
        assert torch.equal(split.reverse([q, k, v], dims)[0], tensor)
    with pytest.raises(ValueError, match="13 rows are not 4 query heads of 2"):
        split.forward([rows(13)], dims)


def test_head_width_split_reads_each_layer_s_head_width_off_its_rows():
    dims = ModelDims({"heads": 4, "groups": 2, "narrow": 2, "wide": 3})
    split = SplitQKVHeadDims("heads", "groups", "narrow", "wide")
    for width in (2, 3):  # per group [q (2 heads); k; v], each head `width` rows
        tensor = rows(8 * width)
        q, k, v = split.forward([tensor], dims)
        group = 4 * width
        assert torch.equal(q, torch.cat([tensor[g * group:g * group + 2 * width] for g in range(2)]))
        assert torch.equal(k, torch.cat([tensor[g * group + 2 * width:g * group + 3 * width] for g in range(2)]))
        assert torch.equal(v, torch.cat([tensor[g * group + 3 * width:(g + 1) * group] for g in range(2)]))
        assert torch.equal(split.reverse([q, k, v], dims)[0], tensor)
    with pytest.raises(ValueError, match=r"32 rows are not 4 query heads and 2 key and value heads of one of the "
                                         r"widths \[2, 3\]"):
        split.forward([rows(32)], dims)


def test_keep_parts_drops_the_others_and_refuses_to_restore_them():
    parts = [rows(1), rows(2), rows(3)]
    assert KeepParts(0).forward(parts, DIMS) == [parts[0]]
    assert KeepParts().forward(parts, DIMS) == []
    with pytest.raises(ValueError, match="got 3 parts"):
        KeepParts(3).forward(parts, DIMS)
    with pytest.raises(ValueError, match="cannot be restored"):
        KeepParts(0).reverse([parts[0]], DIMS)


def test_layer_type_sizes_read_per_layer_config_and_refuse_disagreeing_layers():
    from types import SimpleNamespace

    from bridge_ext.errors import TableError
    from bridge_ext.tables.sizes import LayerTypeSizes

    def config(widths):
        return SimpleNamespace(layer_types=["sliding_attention", "full_attention", "full_attention"],
                               per_layer_config=[SimpleNamespace(head_dim=width) for width in widths])

    sizes = LayerTypeSizes("full_attention", (("global_head_dim", "head_dim"),))
    assert sizes.read(config([16, 512, 512])) == {"global_head_dim": 512}
    assert LayerTypeSizes("other", (("x", "head_dim"),)).read(config([16, 512, 512])) == {}
    with pytest.raises(TableError, match=r"the full_attention layers differ in head_dim \(\[256, 512\]\)"):
        sizes.read(config([16, 512, 256]))


def test_last_layers_rules_come_first_on_the_config_s_last_layers_only():
    from types import SimpleNamespace

    from bridge_ext.errors import TableError
    from bridge_ext.tables.layer_rules import CheckedTable, LastLayersRules

    base = MappingTable(model_types=("x",), rules=(rule("decoder.layers.{layer}.w", "model.layers.{layer}.w"),))
    last = LastLayersRules("shared", (rule("decoder.layers.{layer}.w", [], KeepParts()),))
    refused = []
    build = CheckedTable(base, refused.append, last)
    table = build(SimpleNamespace(num_hidden_layers=4, shared=1))
    assert len(refused) == 1  # the check saw the config
    assert [len(table.match(f"decoder.layers.{layer}.w").rule.hf) for layer in range(4)] == [1, 1, 1, 0]
    assert build(SimpleNamespace(num_hidden_layers=4, shared=0)).rules == base.rules
    with pytest.raises(TableError, match="shared=5 with 4 layers"):
        build(SimpleNamespace(num_hidden_layers=4, shared=5))


def test_group_rows_inverts_grouped_split():
    tensor = rows(16)
    parts = SplitGroupedRows("q_rows_per_group", "head_dim", "head_dim").forward([tensor], DIMS)
    marker = rows(1)
    (regrouped, passed) = GroupRows("q_rows_per_group", "head_dim", "head_dim").forward([*parts, marker], DIMS)
    assert torch.equal(regrouped, tensor) and passed is marker
    assert [t.shape[0] for t in GroupRows("head_dim", "head_dim", first=1).reverse([marker, rows(8)], DIMS)] == [1, 4, 4]


def test_interleave_alternates_blocks():
    first, second = rows(4), rows(4) + 100
    (merged,) = GroupRows("head_dim", "head_dim").forward([first, second], DIMS)
    assert torch.equal(merged, torch.cat([first[:2], second[:2], first[2:], second[2:]]))


def test_split_rows_scales_named_sizes_to_a_shard():
    shard = rows(4)  # half of a tensor whose global parts are a=3, b=1 -> 6 + 2 rows
    with pytest.raises(ValueError):
        SplitRows("a", "b").forward([rows(5)], DIMS)
    a, b = SplitRows("a", "b").forward([rows(8)], DIMS)
    assert a.shape[0] == 6 and b.shape[0] == 2
    first, second = SplitRows(1, 1).forward([shard], DIMS)
    assert torch.equal(first, shard[:2]) and torch.equal(second, shard[2:])


@pytest.mark.parametrize(
    ("ops", "rows_in", "outputs"),
    [
        ((SplitGroupedRows("q_rows_per_group", "q_rows_per_group", "head_dim", "head_dim"),
          GroupRows("head_dim", "head_dim")), 24, 3),
        ((SplitRows("a", "a", "b"), Concat(("a", "a"), ("b",))), 7, 2),
        ((SplitRows(1, 1),), 8, 2),
    ],
)
def test_row_op_chains_reverse_bit_exactly(ops, rows_in, outputs):
    r = rule("x.weight", [f"y{i}.weight" for i in range(outputs)], *ops)
    tensor = torch.randn(rows_in, 3)
    converted = run_rule(r, [tensor], DIMS)
    assert len(converted) == outputs
    assert torch.equal(reverse_rule(r, converted, DIMS), tensor)


def test_add_one_round_trips_norm_weights_near_one():
    weight = 1 + 0.1 * torch.randn(64)  # Hugging Face norm weights live near 1
    r = rule("out_norm.weight", "norm.weight", AddOne(), tp="replicated")
    megatron = reverse_rule(r, [weight], DIMS)
    assert torch.equal(run_rule(r, [megatron], DIMS)[0], weight)


def test_per_rank_split_then_concatenation_across_ranks():
    # Two tensor-parallel shards, each [gate_r; up_r]; HF gate = [gate_0; gate_1].
    gate, up = rows(4), rows(4) + 100
    shards = [torch.cat([gate[:2], up[:2]]), torch.cat([gate[2:], up[2:]])]
    fc1 = rule("fc1.weight", ["gate.weight", "up.weight"], SplitRows(1, 1))
    hf_gate, hf_up = run_rule(fc1, shards, DIMS)
    assert torch.equal(hf_gate, gate) and torch.equal(hf_up, up)
    proj = rule("proj.weight", "o.weight", tp="row")
    (o,) = run_rule(proj, [rows(2, 2), rows(2, 2) + 50], DIMS)
    assert torch.equal(o, torch.cat([rows(2, 2), rows(2, 2) + 50], dim=1))


def test_value_ops_are_skipped_for_lora_factors():
    embed = rule("embedding.weight", "embed.weight", TrimVocab())
    (trimmed,) = run_rule(embed, [rows(8)], DIMS)
    assert trimmed.shape[0] == 5
    (untouched,) = run_rule(embed, [rows(8)], DIMS, rows_only=True)
    assert untouched.shape[0] == 8


def test_rules_refuse_inconsistent_wildcards_and_order():
    with pytest.raises(TableError, match="wildcards"):
        rule("a.{layer}.w", "b.w")
    with pytest.raises(TableError, match="per-rank"):
        rule("a.w", ["b.w", "c.w"], Concat((1,), (1,)), SplitRows(1, 1))
    with pytest.raises(TableError, match="row-parallel"):
        rule("a.w", ["b.w", "c.w"], SplitRows(1, 1), tp="row")
    assert rule("a.{layer}.{expert}.w", "b.{layer}.w", stack="expert").stack == "expert"


def test_a_fused_adapter_linear_needs_several_outputs_and_the_rule_s_wildcards():
    fused = rule("a.{layer}.w", ["b.{layer}.g.w", "b.{layer}.u.w"], SplitRows(1, 1), lora_fused="b.{layer}.gu.w")
    assert fused.lora_fused_name({"layer": "3"}) == "b.3.gu.w"
    assert fused.prefixed("m.", "h.").lora_fused_name({"layer": "3"}) == "h.b.3.gu.w"
    pair = ["b.{layer}.g.w", "b.{layer}.u.w"]
    for hf, options in (("b.{layer}.g.w", {}), (pair, dict(lora_fused="b.gu.w")),
                        (pair, dict(lora_parts=("gate", "up"))), (pair, dict(lora_fused="b.{layer}.{expert}.gu.w"))):
        with pytest.raises(TableError, match="lora_fused"):
            rule("a.{layer}.w", hf, **{"lora_fused": "b.{layer}.gu.w", **options})


def test_planning_names_every_unmapped_parameter_and_stacks_in_order():
    table = MappingTable(("toy",), (
        rule("layers.{layer}.experts.{expert}.w", "model.layers.{layer}.experts.w", stack="expert"),
        rule("layers.{layer}.norm", "model.layers.{layer}.norm", tp="replicated"),
    ))
    names = ["layers.0.experts.1.w", "layers.0.experts.0.w", "layers.0.norm"]
    tasks = plan_tasks(names, table)
    assert [t.sources for t in tasks] == [("layers.0.experts.0.w", "layers.0.experts.1.w"), ("layers.0.norm",)]
    with pytest.raises(ExportError, match="layers.0.mystery") as error:
        plan_tasks([*names, "layers.0.mystery", "layers.1.other"], table)
    assert "layers.1.other" in str(error.value)
    with pytest.raises(ExportError, match="not 0..1"):
        plan_tasks(["layers.0.experts.0.w", "layers.0.experts.2.w"], table)


# The CLI's help shows an example model type: it is not the engine, which must hold no
# architecture fact. config_check.py bounds the integer fields of every architecture's config.json
# (hostile input) before a table is chosen.
NOT_ENGINE = {"cli.py", "config_check.py"}
ARCHITECTURE_FACT = re.compile(r"qwen|deepseek|glm|gpt_oss|mamba|nemotron|deepstack|(^|\W)mtp[._]|mlp\.experts|"
                               r"language_model", re.IGNORECASE)


def _code_strings(tree: ast.AST) -> list[ast.Constant]:
    """Every string literal of a module except docstrings (f-string pieces included)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_the_generic_layer_holds_no_architecture_fact():
    found = []
    package = Path(__file__).parents[1] / "bridge_ext"
    for path in sorted([*package.glob("*.py"), *package.glob("engine/*.py"), *package.glob("checkpoint/*.py")]):
        if path.name in NOT_ENGINE:
            continue
        for node in _code_strings(ast.parse(path.read_text())):
            if ARCHITECTURE_FACT.search(node.value):
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert not found, "architecture facts belong in bridge_ext/tables/:\n" + "\n".join(found)


def test_the_fact_finder_sees_code_strings_and_skips_docstrings():
    source = 'def f():\n    """qwen docstring"""\n    return f"mtp.{x}" + "ok"\n'
    hits = [node.value for node in _code_strings(ast.parse(source)) if ARCHITECTURE_FACT.search(node.value)]
    assert hits == ["mtp."]


def test_offset_wildcards_name_layers_after_the_decoder():
    pattern = NamePattern("model.layers.{depth+61}.enorm.weight")
    assert pattern.wildcards == ("depth",)
    assert pattern.fill({"depth": "0"}) == "model.layers.61.enorm.weight"
    assert pattern.match("model.layers.62.enorm.weight") == {"depth": "1"}
    assert pattern.match("model.layers.60.enorm.weight") is None
    mtp = rule("mtp.layers.{depth}.enorm.weight", "model.layers.{depth+61}.enorm.weight", tp="replicated")
    assert plan_tasks(["mtp.layers.0.enorm.weight"], MappingTable(("toy",), (mtp,)))[0].hf_names == (
        "model.layers.61.enorm.weight",)


def test_named_offsets_are_read_from_the_config_before_any_name():
    """``{expert+field}``: a second expert pool numbered after the first (the table's
    config_offsets); nothing matches or fills before the config resolves it, and a field that is
    no count is refused naming it."""
    from types import SimpleNamespace

    second = rule("mlp.second.experts.{expert}.fc2.weight", "model.mlp.experts.{expert+moe_num_experts}.down.weight",
                  tp="row")
    first = rule("mlp.first.experts.{expert}.fc2.weight", "model.mlp.experts.{expert}.down.weight", tp="row")
    table = MappingTable(("toy",), (second, first), config_offsets=("moe_num_experts",))
    unresolved = table.match("mlp.second.experts.0.fc2.weight")
    for names in (lambda: unresolved.rule.hf_names(unresolved.values),
                  lambda: table.match_hf("model.mlp.experts.5.down.weight")):
        with pytest.raises(TableError, match=r"the offset moe_num_experts is read from the config"):
            names()
    config = SimpleNamespace(model_type="toy", text_config=SimpleNamespace(moe_num_experts=4))
    resolved = table.for_config(config)
    assert resolved.config_offsets == () and resolved.rules[1] is first
    assert plan_tasks(["mlp.second.experts.1.fc2.weight", "mlp.first.experts.1.fc2.weight"], resolved)[0].hf_names == (
        "model.mlp.experts.5.down.weight",)
    assert resolved.match_hf("model.mlp.experts.5.down.weight")[0].values == {"expert": "1"}  # the second pool's
    assert resolved.match_hf("model.mlp.experts.3.down.weight")[0].rule is first  # below the offset: the first's
    for value in ([64, 64], None, -1):
        with pytest.raises(ExportError, match=rf"toy config: moe_num_experts must be a count .* got "
                                              rf"{re.escape(repr(value))}"):
            table.for_config(SimpleNamespace(model_type="toy", moe_num_experts=value))
    with pytest.raises(TableError, match=r"named offsets \['moe_num_experts'\] of the rules must be the table's "
                                         r"config_offsets \[\]"):
        MappingTable(("toy",), (second,))


def test_a_table_with_named_offsets_is_served_only_for_a_config():
    from bridge_ext.tables import table_for
    from bridge_ext_testing.tiny_generated import tiny_config

    with pytest.raises(ExportError, match=r"built from the model's config: pass the config"):
        table_for("ernie4_5_vl_moe")
    config = tiny_config("ernie4_5_vl_moe")  # text_config.moe_num_experts 4
    names = [name for each in table_for(config).rules for name in each.hf]
    assert "model.layers.{layer}.mlp.experts.{expert+4}.down_proj.weight" in names
    # what Megatron-Bridge does not map (architecture_notes.LEFT_OUT_NOTES) is refused, not guessed
    for unmapped in ("language_model.output_layer.weight",
                     "vision_model.decoder.layers.0.self_attention.linear_qkv.weight"):
        with pytest.raises(ExportError, match=re.escape(unmapped)):
            plan_tasks(["language_model.embedding.word_embeddings.weight", unmapped], table_for(config))


def _toy_table(model_type: str = "toy") -> MappingTable:
    return MappingTable((model_type,), (rule("embedding.weight", "model.embed.weight"),),
                        model_classes={model_type: "ToyForCausalLM"})


def test_register_table_and_unknown_model_types(monkeypatch):
    import bridge_ext.tables
    from bridge_ext import register_table
    from bridge_ext.table import TableBuilder

    monkeypatch.setattr(bridge_ext.tables, "_REGISTERED", {})
    with pytest.raises(ExportError, match="register_table") as error:
        bridge_ext.tables.table_for("toy")
    assert "qwen3" in str(error.value) and "llama" in str(error.value)
    table = _toy_table()
    register_table(table)
    assert bridge_ext.tables.table_for("toy") is table and "toy" in bridge_ext.tables.known_model_types()
    with pytest.raises(TableError, match="already have a table"):
        register_table(_toy_table())
    register_table(_toy_table(), overwrite=True)

    class Config:
        model_type = "sized"
        num_hidden_layers = 3

    register_table(TableBuilder(("sized",), lambda config: MappingTable(("sized",), (
        rule("mtp.layers.{depth}.enorm.weight", f"model.layers.{{depth+{config.num_hidden_layers}}}.enorm.weight"),))))
    built = bridge_ext.tables.table_for(Config())
    assert built.rules[0].hf_names({"depth": "0"}) == ["model.layers.3.enorm.weight"]
    with pytest.raises(ExportError, match="built from the model's config"):
        bridge_ext.tables.table_for("sized")


def test_every_table_in_the_table_modules_is_a_built_in():
    """Tables are found only through their module's TABLES: one left out of it would be unknown."""
    import importlib
    import pkgutil

    import bridge_ext.tables
    from bridge_ext.table import TableBuilder

    built_in = bridge_ext.tables.built_in_tables()
    modules = [info.name for info in pkgutil.iter_modules(bridge_ext.tables.__path__, "bridge_ext.tables.")]
    assert {"bridge_ext.tables.llama", "bridge_ext.tables.deepseek", "bridge_ext.tables.blocks"} <= set(modules)
    left_out = [f"{module}.{name}" for module in modules
                for name, value in vars(importlib.import_module(module)).items()
                if isinstance(value, (MappingTable, TableBuilder)) and not any(value is t for t in built_in)]
    assert not left_out, f"tables in no module's TABLES: {left_out}"
    assert {"llama", "qwen3", "deepseek_v3", "qwen3_vl_moe", "gpt_oss"} <= set(bridge_ext.tables.known_model_types())


@pytest.mark.parametrize(("files", "message"), [
    ({"a.py": "TABLES = (TABLE,)", "b.py": "TABLES = (TABLE,)"}, "built-in tables in both fam.a and fam.b"),
    ({"a.py": "TABLES = ('toy',)"}, "fam.a.TABLES holds a str"),
])
def test_discovery_refuses_two_tables_for_a_model_type_and_what_is_not_a_table(tmp_path, monkeypatch, files, message):
    import bridge_ext.tables

    package = tmp_path / "fam"
    package.mkdir()
    (package / "__init__.py").write_text("")
    header = "from bridge_ext.table import MappingTable, rule\n"
    header += "TABLE = MappingTable(('toy',), (rule('embedding.weight', 'model.embed.weight'),))\n"
    for name, text in {**files, "_private.py": "raise AssertionError('imported')", "shared.py": "X = 1"}.items():
        (package / name).write_text(header + text + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))  # each case's own `fam`
    with pytest.raises(TableError, match=re.escape(message)):
        bridge_ext.tables.discover([str(package)], "fam")


def test_expert_families_name_their_variants_and_are_read_off_names():
    family = ExpertFamily("experts", ("gate_up_proj", "down_proj"))
    table = MappingTable(("toy",), (
        rule("layers.{layer}.experts.{expert}.fc2.weight", "model.layers.{layer}.experts.{expert}.down.weight",
             tp="row", variant=family.variant("per_expert")),
        rule("layers.{layer}.experts.{expert}.fc2.weight", "model.layers.{layer}.experts.down_proj",
             tp="row", stack="expert", variant=family.variant("fused")),
    ), expert_families=(family,))
    assert table.expert_layouts_of(["model.norm.weight", "model.layers.0.experts.down_proj"]) == {"experts": "fused"}
    assert table.expert_layouts_of(["model.layers.1.experts.3.down.weight"]) == {"experts": "per_expert"}
    assert table.expert_layouts_of(["model.norm.weight"]) == {}
    assert table.family(table.rules[1]) is family
    with pytest.raises(ValueError, match="names no expert family"):
        MappingTable(("toy",), (rule("a.weight", "b.weight", variant="other:fused"),))


class DictSource:
    """Whole tensors by Megatron name, adapters by module: a one-process TensorSource."""

    def __init__(self, tensors: dict[str, torch.Tensor], adapters: dict | None = None):
        self.tensors, self._adapters = tensors, adapters or {}

    def base_names(self):
        return [name for name in self.tensors if ".adapter." not in name]

    def adapters(self):
        return dict(self._adapters)

    def shards(self, name):
        return [self.tensors[name]]

    def shard_shapes(self, name):
        return [tuple(self.tensors[name].shape)]

    def convert_tasks(self, converter, tasks):
        for task in tasks:
            yield from converter(task)


def _with_lora(tensors: dict, module: str, rank: int, rows: int, cols: int, alpha: float, seed: int):
    from bridge_ext.source import Adapter

    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randn(rank, cols, generator=generator), torch.randn(rows, rank, generator=generator)
    tensors[f"{module}.adapter.linear_in.weight"], tensors[f"{module}.adapter.linear_out.weight"] = a, b
    return Adapter(module, f"{module}.adapter.linear_in.weight", f"{module}.adapter.linear_out.weight", alpha, rank), a, b


def _interleave_halves(tensor: torch.Tensor) -> torch.Tensor:
    """``[gate; up]`` rows -> ``[g0; u0; g1; u1; ...]``, computed without the ops."""
    gate, up = tensor.chunk(2)
    return torch.stack([gate, up], dim=1).reshape(tensor.shape)


INTERLEAVED_TRANSPOSED = (SplitRows(1, 1), GroupRows(1, 1), Transpose())


def _convert(table, source, mode, **kwargs):
    from bridge_ext.engine import Mode, TaskConverter

    converter = TaskConverter(source, DIMS, Mode[mode], **kwargs)
    return {name: t for task in plan_tasks(source.base_names(), table) for name, t in converter(task)}


def test_transpose_round_trips_and_must_come_last():
    r = rule("fc1.weight", "gate_up.weight", *INTERLEAVED_TRANSPOSED)
    weight = torch.randn(6, 4)
    (out,) = run_rule(r, [weight], DIMS)
    assert torch.equal(out, _interleave_halves(weight).T)
    assert torch.equal(reverse_rule(r, [out], DIMS), weight)
    with pytest.raises(ValueError, match="last operation"):
        rule("fc1.weight", "x.weight", Transpose(), TrimVocab())


def test_transposed_module_weight_swaps_lora_factor_roles():
    tensors = {"fc1.weight": torch.randn(6, 4)}
    adapter, a, b = _with_lora(tensors, "fc1", rank=2, rows=6, cols=4, alpha=3.0, seed=1)
    table = MappingTable(("toy",), (rule("fc1.weight", "gate_up.weight", *INTERLEAVED_TRANSPOSED),))
    source = DictSource(tensors, {"fc1": adapter})
    adapters = _convert(table, source, "ADAPTERS")
    lora_a, lora_b = adapters["base_model.model.gate_up.lora_A.weight"], adapters["base_model.model.gate_up.lora_B.weight"]
    assert lora_a.shape == (2, 6) and lora_b.shape == (4, 2)  # A' = B^T [r, out'], B' = A^T [in', r]
    expected_delta = _interleave_halves(b @ a).T
    torch.testing.assert_close(lora_b @ lora_a, expected_delta, rtol=0, atol=1e-5)
    (merged,) = _convert(table, source, "MERGED").values()
    torch.testing.assert_close(merged, _interleave_halves(tensors["fc1.weight"] + 1.5 * b @ a).T, rtol=0, atol=1e-5)


def test_transposed_fused_experts_keep_peft_param_wrapper_factors():
    """gpt-oss style ``[E, H, 2I]`` experts: PEFT's own ParamWrapper on an ``is_transposed``
    parameter gives the same delta as our merge, and both equal W + scale * (B A) (transposed)."""
    from peft import LoraConfig, get_peft_model

    from bridge_ext.peft_config import FusedExpertKeys, adapted_outputs

    experts, rank, alpha, hidden, inter2 = 3, 2, 4.0, 4, 6
    family = ExpertFamily("experts", ("gate_up_proj",))
    table = MappingTable(("toy",), (rule("experts.{expert}.fc1.weight", "model.experts.gate_up_proj",
                                         *INTERLEAVED_TRANSPOSED, stack="expert", variant=family.variant("fused")),),
                         expert_families=(family,))
    tensors, adapters, factors = {}, {}, []
    for e in range(experts):
        tensors[f"experts.{e}.fc1.weight"] = torch.randn(inter2, hidden)
        adapters[f"experts.{e}.fc1"], a, b = _with_lora(tensors, f"experts.{e}.fc1", rank, inter2, hidden, alpha, 10 + e)
        factors.append((a, b))
    source = DictSource(tensors, adapters)
    variants = frozenset({family.variant("fused")})
    tasks = plan_tasks(source.base_names(), table, variants)
    from bridge_ext.engine import Mode, TaskConverter

    (base,) = [t for _, t in TaskConverter(source, DIMS, Mode.BASE)(tasks[0])]
    (merged,) = [t for _, t in TaskConverter(source, DIMS, Mode.MERGED)(tasks[0])]
    keys = FusedExpertKeys(adapted_outputs(tasks, adapters, table))
    saved = dict(TaskConverter(source, DIMS, Mode.ADAPTERS, expert_adapters=keys)(tasks[0]))
    reads = [f"experts.{e}.fc1.adapter.linear_{kind}.weight" for e in range(experts) for kind in ("in", "out")]
    assert TaskConverter(source, DIMS, Mode.ADAPTERS).reads(tasks[0]) == reads  # no layout needed to list reads
    assert base.shape == (experts, hidden, inter2)
    for e, (a, b) in enumerate(factors):
        want = _interleave_halves(tensors[f"experts.{e}.fc1.weight"] + alpha / rank * b @ a).T
        torch.testing.assert_close(merged[e], want, rtol=0, atol=1e-5)

    class Experts(torch.nn.Module):
        is_transposed = True  # transformers' gpt-oss experts: parameters stored [E, in, out]

        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(base.clone())

    model = torch.nn.Module()
    model.experts = Experts()
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_parameters=["experts.gate_up_proj"]))
    wrapper = peft_model.base_model.model.experts
    wrapper.lora_A["default"].weight.data.copy_(saved["base_model.model.model.experts.lora_A.weight"])
    wrapper.lora_B["default"].weight.data.copy_(saved["base_model.model.model.experts.lora_B.weight"])
    torch.testing.assert_close(base + wrapper.get_delta_weight("default"), merged, rtol=0, atol=1e-5)


def test_fan_out_writes_copies_and_the_reverse_checks_them():
    from bridge_ext.ops import Copies

    r = rule("output_layer.weight", ["lm_head.weight", "model.layers.3.shared_head.head.weight"], TrimVocab(), Copies(2))
    weight = torch.randn(8, 3)
    head, copy = run_rule(r, [weight], DIMS)
    assert torch.equal(head, weight[:5]) and torch.equal(copy, weight[:5])
    assert torch.equal(reverse_rule(r, [head, copy.clone()], DIMS), weight[:5])
    with pytest.raises(ExportError, match=r"shared_head\.head.*copies \[1\] differ"):
        reverse_rule(r, [head, copy + 1], DIMS, "['lm_head.weight', 'model.layers.3.shared_head.head.weight']")
    tensors = {"fc.weight": torch.randn(4, 3)}
    adapter, a, b = _with_lora(tensors, "fc", rank=2, rows=4, cols=3, alpha=2.0, seed=5)
    table = MappingTable(("toy",), (rule("fc.weight", ["x.weight", "y.weight"], Copies(2)),))
    pairs = _convert(table, DictSource(tensors, {"fc": adapter}), "ADAPTERS")
    for module in ("x", "y"):
        assert torch.equal(pairs[f"base_model.model.{module}.lora_A.weight"], a)
        assert torch.equal(pairs[f"base_model.model.{module}.lora_B.weight"], b)


def test_op_errors_name_the_rule_the_tensor_and_the_hf_names():
    table = MappingTable(("toy",), (rule("layers.{layer}.fc.weight", ["m.{layer}.a.weight", "m.{layer}.b.weight"],
                                         SplitRows(3, 1)),))
    with pytest.raises(ExportError) as error:
        _convert(table, DictSource({"layers.2.fc.weight": torch.zeros(7, 2)}), "BASE")
    message = str(error.value)
    for part in ("layers.2.fc.weight", "m.2.a.weight", "m.2.b.weight", "layers.{layer}.fc.weight", "SplitRows", "(7, 2)"):
        assert part in message, (part, message)


def test_word_wildcards_and_scalar_stack_in_listed_order():
    from bridge_ext.ops import Scalar
    from bridge_ext.patterns import NamePattern

    pattern = NamePattern("decoder.layers.{layer}.hc.alpha_{part=pre|post|res}")
    assert pattern.wildcards == ("layer", "part")
    assert pattern.match("decoder.layers.3.hc.alpha_post") == {"layer": "3", "part": "1"}
    assert pattern.match("decoder.layers.3.hc.alpha_other") is None
    assert pattern.fill({"layer": 2, "part": 2}) == "decoder.layers.2.hc.alpha_res"
    assert [t.shape for t in Scalar().forward([torch.ones(1)], None)] == [()]
    assert [t.shape for t in Scalar().reverse([torch.tensor(2.0)], None)] == [(1,)]
    with pytest.raises(ValueError):
        Scalar().forward([torch.ones(2)], None)


def test_unsqueeze_adds_a_size_one_dim_and_its_reverse_refuses_any_other():
    from bridge_ext.ops import Unsqueeze

    bias = torch.arange(4.0)
    (hf,) = Unsqueeze().forward([bias], None)
    assert hf.shape == (1, 4) and torch.equal(hf[0], bias)
    (back,) = Unsqueeze().reverse([hf], None)
    assert back.shape == (4,) and torch.equal(back, bias)
    with pytest.raises(ValueError, match="size-one dim 0"):
        Unsqueeze().reverse([torch.zeros(2, 4)], None)


def test_in_memory_renames_follow_the_prefixes_and_can_be_left_out():
    table = MappingTable(("toy",), (), in_memory_prefixes=(("model.", "model.language_model."),),
                         in_memory_renames=((".mlp.shared_mlp.", ".mlp.shared_experts."),))
    name = "model.layers.1.mlp.shared_mlp.up_proj.lora_A.weight"
    assert table.renames_in_memory
    assert table.in_memory_name(name) == "model.language_model.layers.1.mlp.shared_experts.up_proj.lora_A.weight"
    assert (table.in_memory_name(name, renames=False)
            == "model.language_model.layers.1.mlp.shared_mlp.up_proj.lora_A.weight")
    assert not MappingTable(("toy",), ()).renames_in_memory
