"""Operations, patterns and rules on small hand-made tensors (no Megatron model)."""

import pytest
import torch

from bridge_ext.dims import ModelDims
from bridge_ext.engine import ExportError, plan_tasks, run_rule
from bridge_ext.ops import AddOne, Concat, GroupRows, InterleaveRows, SplitGroupedRows, SplitRows, TrimVocab
from bridge_ext.patterns import NamePattern
from bridge_ext.reverse import reverse_rule
from bridge_ext.table import MappingTable, rule

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
