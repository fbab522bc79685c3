"""Operations, patterns and rules on small hand-made tensors (no Megatron model)."""

import ast
import re
from pathlib import Path

import pytest
import torch

from bridge_ext.dims import ModelDims
from bridge_ext.engine import ExportError, plan_tasks, run_rule
from bridge_ext.ops import AddOne, Concat, GroupRows, InterleaveRows, SplitGroupedRows, SplitRows, TrimVocab
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


def test_group_rows_inverts_grouped_split():
    tensor = rows(16)
    parts = SplitGroupedRows("q_rows_per_group", "head_dim", "head_dim").forward([tensor], DIMS)
    marker = rows(1)
    (regrouped, passed) = GroupRows("q_rows_per_group", "head_dim", "head_dim").forward([*parts, marker], DIMS)
    assert torch.equal(regrouped, tensor) and passed is marker
    assert [t.shape[0] for t in GroupRows("head_dim", "head_dim", first=1).reverse([marker, rows(8)], DIMS)] == [1, 4, 4]


def test_interleave_alternates_blocks():
    first, second = rows(4), rows(4) + 100
    (merged,) = InterleaveRows("head_dim").forward([first, second], DIMS)
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
          InterleaveRows("head_dim")), 24, 3),
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
    with pytest.raises(ValueError, match="wildcards"):
        rule("a.{layer}.w", "b.w")
    with pytest.raises(ValueError, match="per-rank"):
        rule("a.w", ["b.w", "c.w"], Concat((1,), (1,)), SplitRows(1, 1))
    with pytest.raises(ValueError, match="row-parallel"):
        rule("a.w", ["b.w", "c.w"], SplitRows(1, 1), tp="row")
    assert rule("a.{layer}.{expert}.w", "b.{layer}.w", stack="expert").stack == "expert"


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


# The demo builds named tiny models and the CLI's help shows an example model type: neither is
# the engine, which must hold no architecture fact.
NOT_ENGINE = {"demo.py", "convert_demo.py", "cli.py"}
ARCHITECTURE_FACT = re.compile(r"qwen|deepseek|glm|gpt_oss|(^|\W)mtp[._]|mlp\.experts|language_model", re.IGNORECASE)


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
    for path in sorted((Path(__file__).parents[1] / "bridge_ext").glob("*.py")):
        if path.name in NOT_ENGINE:
            continue
        for node in _code_strings(ast.parse(path.read_text())):
            if ARCHITECTURE_FACT.search(node.value):
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert not found, "architecture facts belong in model_mappings/:\n" + "\n".join(found)


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


def _toy_table(model_type: str = "toy") -> MappingTable:
    return MappingTable((model_type,), (rule("embedding.weight", "model.embed.weight"),),
                        model_classes={model_type: "ToyForCausalLM"})


def test_register_table_and_unknown_model_types(monkeypatch):
    import model_mappings
    from bridge_ext import register_table
    from bridge_ext.table import TableBuilder

    monkeypatch.setattr(model_mappings, "_REGISTERED", {})
    with pytest.raises(ExportError, match="register_table") as error:
        model_mappings.table_for("toy")
    assert "qwen3" in str(error.value) and "llama" in str(error.value)
    table = _toy_table()
    register_table(table)
    assert model_mappings.table_for("toy") is table and "toy" in model_mappings.known_model_types()
    with pytest.raises(ExportError, match="already have a table"):
        register_table(_toy_table())
    register_table(_toy_table(), overwrite=True)

    class Config:
        model_type = "sized"
        num_hidden_layers = 3

    register_table(TableBuilder(("sized",), lambda config: MappingTable(("sized",), (
        rule("mtp.layers.{depth}.enorm.weight", f"model.layers.{{depth+{config.num_hidden_layers}}}.enorm.weight"),))))
    built = model_mappings.table_for(Config())
    assert built.rules[0].hf_names({"depth": "0"}) == ["model.layers.3.enorm.weight"]
    with pytest.raises(ExportError, match="built from the model's config"):
        model_mappings.table_for("sized")


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
