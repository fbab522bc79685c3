"""DeepSeek-V4 (``deepseek_v4``): names, shapes and the reverse direction, on CPU, without Megatron.

megatron-core 0.19.2 has none of this family's modules (Megatron-Bridge 0.6.2's provider asks
for ``experimental_attention_variant = "dsv4_hybrid"`` and hyper-connections, which its
``get_transformer_block_with_experimental_attention_variant_spec`` does not know): no Megatron
model can be built, on CPU or GPU, so the live export, PEFT, merged, Megatron-Bridge export and
TP2 / EP2 checks of the conformance contract cannot run with the installed stack; ``convert``
runs on a synthetic checkpoint (tests/checkpoint/test_convert_synthetic.py) and vLLM judges its
output (tests/consumers/test_vllm_converted.py). What runs here:

1. the tiny folder in the published names is what transformers 5.23 loads: ``from_pretrained``
   misses no weight, and re-saving it gives the same tensors under transformers' save-time names;
2. every tensor of the folder (MTP and indexer included) has one rule, and each rule's Megatron
   name is the one Megatron-Bridge's ``DeepSeekV4Bridge`` mapping registry loads it into;
3. HF -> Megatron (the table's reverse) -> HF (the engine) is bit-exact, the hash-routing table
   keeps its integer dtype in a bf16 export, and the hyper-connection scalars split in order.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from bridge_ext_testing.tiny_deepseek_v4 import tiny_deepseek_v4
from bridge_ext.dims import ModelDims
from bridge_ext.engine import Mode, TaskConverter, plan_tasks
from bridge_ext.hf_keys import hf_checkpoint_keys
from bridge_ext.reverse import hf_to_megatron
from bridge_ext.tables import table_for

PER_EXPERT = frozenset({"experts:per_expert", "mtp_experts:per_expert"})


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from transformers import AutoConfig

    folder = tiny_deepseek_v4(tmp_path_factory.mktemp("dsv4") / "hf")
    config = AutoConfig.from_pretrained(str(folder))
    return SimpleNamespace(dir=folder, config=config, table=table_for(config), dims=ModelDims.from_hf_config(config),
                           tensors=load_file(str(folder / "model.safetensors")))


def megatron_names(hf) -> list[str]:
    """Each folder tensor's Megatron name(s) by the table (all members of a stacked rule)."""
    names = []
    for name in hf.tensors:
        match, _ = hf.table.match_hf(name, PER_EXPERT)
        stack = match.rule.stack
        parts = range(hf.tensors[name].shape[0]) if stack else [None]
        for part in parts:
            values = dict(match.values, **({stack: str(part)} if stack else {}))
            names.append(match.rule.megatron_pattern.fill(values))
    return list(dict.fromkeys(names))


def test_published_names_are_what_transformers_loads(hf, tmp_path):
    from transformers import DeepseekV4ForCausalLM

    model, info = DeepseekV4ForCausalLM.from_pretrained(str(hf.dir), output_loading_info=True)
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert not info["mismatched_keys"]
    assert all(name.startswith("mtp.") for name in info["unexpected_keys"])
    model.save_pretrained(str(tmp_path))
    resaved = {hf.table.published_name(n): t for n, t in load_file(str(tmp_path / "model.safetensors")).items()}
    base = {n: t for n, t in hf.tensors.items() if not n.startswith("mtp.")}
    assert sorted(resaved) == sorted(base)
    assert [n for n in base if not torch.equal(resaved[n], base[n])] == []
    # the published names are not transformers' save-time ones (documented in the table)
    assert "model.hc_head.hc_fn" in load_file(str(tmp_path / "model.safetensors"))
    # and they are the key set the exports are checked against, MTP apart
    assert sorted(hf_checkpoint_keys(hf.config)) == sorted(base)


def test_every_tensor_has_one_rule_and_megatron_bridge_maps_it_there(hf):
    from megatron.bridge.models.deepseek.deepseek_v4_bridge import DeepSeekV4Bridge

    bridge = DeepSeekV4Bridge()
    bridge.hf_config = hf.config
    registry = bridge.mapping_registry()
    assert sum(".indexer." in n for n in hf.tensors) == 12  # layers 1 and 3 (compressed sparse)
    assert any(n.startswith("mtp.0.") for n in hf.tensors) and "layers.0.ffn.gate.tid2eid" in hf.tensors
    different = []
    for megatron in megatron_names(hf):
        match = hf.table.match(megatron, PER_EXPERT)
        theirs = registry.megatron_to_hf_lookup(megatron)
        hf_params = [] if theirs is None else (
            [theirs.hf_param] if isinstance(theirs.hf_param, str) else list(theirs.hf_param.values()))
        ours = match.rule.hf_names(match.values)
        if megatron.endswith("indexer.linear_weights_proj.weight"):
            # Megatron-Bridge names transformers' scorer module and falls back to the published
            # name when the checkpoint has it (maybe_modify_loaded_hf_weight)
            hf_params = [p.replace(".indexer.scorer.weights_proj.", ".indexer.weights_proj.") for p in hf_params]
        if sorted(ours) != sorted(hf_params):
            different.append((megatron, ours, hf_params))
    assert different == []


def test_reverse_then_export_is_bit_exact_and_keeps_integer_buffers(hf):
    names = megatron_names(hf)
    megatron = hf_to_megatron(hf.tensors, names, hf.table, hf.dims, PER_EXPERT)
    scale = hf.tensors["layers.2.hc_attn_scale"]
    assert [megatron[f"decoder.layers.2.self_attention_hyper_connection.alpha_{p}"].item()
            for p in ("pre", "post", "res")] == scale.tolist()
    assert megatron["decoder.layers.2.mlp.experts.linear_fc1.weight1"].shape == (64, 64)  # [w1; w3]

    class Source:
        def base_names(self):
            return names

        def adapters(self):
            return {}

        def shards(self, name):
            return [megatron[name]]

    for dtype in (None, torch.bfloat16):
        converter = TaskConverter(Source(), hf.dims, Mode.BASE, dtype)
        back = {n: t for task in plan_tasks(names, hf.table, PER_EXPERT) for n, t in converter(task)}
        assert sorted(back) == sorted(hf.tensors)
        expected = {n: t if dtype is None or not t.is_floating_point() else t.to(dtype) for n, t in hf.tensors.items()}
        assert [n for n in back if back[n].dtype != expected[n].dtype or not torch.equal(back[n], expected[n])] == []
    assert back["layers.0.ffn.gate.tid2eid"].dtype == hf.tensors["layers.0.ffn.gate.tid2eid"].dtype


def test_adapters_are_refused_before_the_first_tensor(hf):
    """PEFT could not place adapters in the published names: asking for them is an error, and a
    merged export (no adapter pass) is not."""
    from bridge_ext.errors import ExportError
    from bridge_ext.plan import conversion_passes

    class WithAdapters:
        def adapters(self):
            return {"decoder.layers.0.self_attention.linear_q_down_proj": object()}

    plan = SimpleNamespace(table=hf.table)
    with pytest.raises(ExportError, match=r"LoRA adapters of deepseek_v4 cannot be exported: PEFT keys"):
        conversion_passes(WithAdapters(), plan, base=None, adapters=True)
