"""Qwen3-Next (``qwen3_next``): the cousin table of Qwen3.5, proven three ways.

1. Round trip through our table on a tiny transformers Qwen3-Next checkpoint: HF -> Megatron
   (``hf_to_megatron``) -> HF (the engine's ``TaskConverter``) is bit-exact, for both spellings
   of Megatron names (local / Transformer Engine specs). This proves name coverage and that
   the op chains invert; it cannot tell a wrong but self-consistent layout.
2. The layout itself against Megatron-Bridge's own pure functions (``merge_gdn_linear_weights``
   / ``split_gdn_linear_weights`` / ``merge_qkv_weights``) on the same tensors, at tensor
   parallel 1 and 2, for the base weight and for ``lora_B``.
3. A real Megatron-Core model built by Megatron-Bridge's ``Qwen3NextBridge`` (CPU local specs):
   its loaded parameters equal our table's reverse, and our export equals the HF files and
   Megatron-Bridge's export bit for bit; the exported weights give the Megatron logits.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from bridge_ext_testing import tiny_models
from bridge_ext.engine import PEFT_PREFIX, Mode, TaskConverter, plan_tasks, run_rule
from bridge_ext.reverse import hf_to_megatron
from bridge_ext.source import Adapter
from bridge_ext.tables import table_for
from bridge_ext.tables.qwen3_next import TABLE

PER_EXPERT = frozenset({"experts:per_expert", "mtp_experts:per_expert"})
FUSED = frozenset({"experts:fused", "mtp_experts:fused"})
GDN_LAYERS = (0, 1, 2)
ATTENTION_LAYER = 3
RANK = 4


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from transformers import AutoConfig

    folder = tiny_models.tiny_qwen3_next(tmp_path_factory.mktemp("qwen3_next"))
    config = AutoConfig.from_pretrained(str(folder))
    return SimpleNamespace(dir=folder, config=config, dims=table_for(config).dims(config),
                           tensors=load_file(str(folder / "model.safetensors")))


def megatron_names(config, spelling: str) -> list[str]:
    """Megatron parameter names of the tiny model, local-spec or Transformer Engine spelling."""
    te = spelling == "te"

    def moe(prefix: str) -> list[str]:
        names = [f"{prefix}pre_mlp_layernorm.weight", f"{prefix}mlp.router.weight"]
        for e in range(config.num_experts):
            if te:  # grouped GEMM
                names += [f"{prefix}mlp.experts.linear_fc1.weight{e}", f"{prefix}mlp.experts.linear_fc2.weight{e}"]
            else:
                names += [f"{prefix}mlp.experts.local_experts.{e}.linear_fc{n}.weight" for n in (1, 2)]
        return names + [f"{prefix}mlp.shared_experts.{n}" for n in ("gate_weight", "linear_fc1.weight", "linear_fc2.weight")]

    def attention(prefix: str) -> list[str]:
        norm = "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"
        return [prefix + n for n in (norm, "self_attention.linear_qkv.weight", "self_attention.q_layernorm.weight",
                                     "self_attention.k_layernorm.weight", "self_attention.linear_proj.weight")]

    names = ["embedding.word_embeddings.weight"]
    for layer, kind in enumerate(config.layer_types):
        prefix = f"decoder.layers.{layer}."
        if kind == "linear_attention":
            norm = "self_attention.in_proj.layer_norm_weight" if te else "input_layernorm.weight"
            names += [prefix + n for n in (norm, "self_attention.in_proj.weight", "self_attention.conv1d.weight",
                                           "self_attention.A_log", "self_attention.dt_bias",
                                           "self_attention.out_norm.weight", "self_attention.out_proj.weight")]
        else:
            names += attention(prefix)
        names += moe(prefix)
    mtp = "mtp.layers.0."
    names += ["decoder.final_layernorm.weight", "output_layer.weight"]
    names += [mtp + n for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "final_layernorm.weight")]
    return names + attention(mtp + "mtp_model_layer.") + moe(mtp + "mtp_model_layer.")


class DictSource:
    """A ``TensorSource`` over whole Megatron tensors, each cut into ``tp`` row shards if asked."""

    def __init__(self, tensors: dict[str, torch.Tensor], adapters: dict[str, Adapter] | None = None,
                 sharded: dict[str, int] | None = None):
        self.tensors, self._adapters, self.sharded = tensors, adapters or {}, sharded or {}

    def base_names(self):
        return [n for n in self.tensors if ".adapter." not in n]

    def adapters(self):
        return self._adapters

    def shards(self, name):
        return list(self.tensors[name].chunk(self.sharded.get(name, 1)))


def export(tensors, names, dims, variants, **source_kwargs) -> dict[str, torch.Tensor]:
    source = DictSource(tensors, **source_kwargs)
    mode = Mode.ADAPTERS if source.adapters() else Mode.BASE
    converter = TaskConverter(source, dims, mode)
    return {name: tensor for task in plan_tasks(names, TABLE, variants) for name, tensor in converter(task)}


def mb_gdn_config(config) -> SimpleNamespace:
    return SimpleNamespace(hidden_size=config.hidden_size, linear_key_head_dim=config.linear_key_head_dim,
                           linear_value_head_dim=config.linear_value_head_dim,
                           linear_num_key_heads=config.linear_num_key_heads,
                           linear_num_value_heads=config.linear_num_value_heads)


def in_proj_rule():
    return TABLE.match("decoder.layers.0.self_attention.in_proj.weight").rule


# ---------------------------------------------------------------------------------------------
# 1. Round trip through the table
# ---------------------------------------------------------------------------------------------
def test_table_is_registered_and_reuses_qwen35_rules():
    from bridge_ext.tables import qwen3_5

    assert table_for("qwen3_next") is TABLE
    assert in_proj_rule().hf == ("model.layers.{layer}.linear_attn.in_proj_qkvz.weight",
                                 "model.layers.{layer}.linear_attn.in_proj_ba.weight")
    borrowed = {r.megatron for r in TABLE.rules} & {r.megatron for r in qwen3_5.TEXT.rules}
    assert "decoder.layers.{layer}.self_attention.conv1d.weight" in borrowed
    assert "mtp.layers.{layer}.mtp_model_layer.self_attention.linear_qkv.weight" in borrowed


@pytest.mark.parametrize("spelling", ["local", "te"])
def test_hf_to_megatron_to_hf_is_bit_exact(hf, spelling):
    names = megatron_names(hf.config, spelling)
    megatron = hf_to_megatron(hf.tensors, names, TABLE, hf.dims, PER_EXPERT)
    assert sorted(megatron) == sorted(names)
    # The Megatron in_proj is really rearranged (not [qkvz; ba] glued together).
    qkvz, ba = (hf.tensors[f"model.layers.0.linear_attn.in_proj_{p}.weight"] for p in ("qkvz", "ba"))
    assert not torch.equal(megatron["decoder.layers.0.self_attention.in_proj.weight"], torch.cat([qkvz, ba]))
    back = export(megatron, names, hf.dims, PER_EXPERT)
    assert sorted(back) == sorted(hf.tensors)  # every HF tensor, MTP included, nothing else
    assert [n for n in back if not torch.equal(back[n], hf.tensors[n])] == []


def test_fused_expert_variant_stacks_the_same_experts(hf):
    names = megatron_names(hf.config, "local")
    megatron = hf_to_megatron(hf.tensors, names, TABLE, hf.dims, PER_EXPERT)
    fused = export(megatron, names, hf.dims, FUSED)
    for prefix in ("model.layers.2.", "mtp.layers.0."):
        gate_up, down = fused[prefix + "mlp.experts.gate_up_proj"], fused[prefix + "mlp.experts.down_proj"]
        for e in range(hf.config.num_experts):
            expert = f"{prefix}mlp.experts.{e}."
            assert torch.equal(gate_up[e], torch.cat([hf.tensors[expert + "gate_proj.weight"],
                                                      hf.tensors[expert + "up_proj.weight"]]))
            assert torch.equal(down[e], hf.tensors[expert + "down_proj.weight"])


# ---------------------------------------------------------------------------------------------
# 2. Against Megatron-Bridge's own conversion functions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tp", [1, 2])
def test_gdn_in_proj_matches_megatron_bridge_merge_and_split(hf, tp):
    from megatron.bridge.models.conversion.param_mapping import merge_gdn_linear_weights, split_gdn_linear_weights

    config = mb_gdn_config(hf.config)
    for layer in GDN_LAYERS:
        qkvz = hf.tensors[f"model.layers.{layer}.linear_attn.in_proj_qkvz.weight"]
        ba = hf.tensors[f"model.layers.{layer}.linear_attn.in_proj_ba.weight"]
        theirs = merge_gdn_linear_weights(config, qkvz, ba, tp_size=tp)  # global tensor, per-rank blocks
        if tp == 1:  # our reverse is the single-rank Megatron tensor
            name = f"decoder.layers.{layer}.self_attention.in_proj.weight"
            ours = hf_to_megatron(hf.tensors, [name], TABLE, hf.dims)[name]
            assert torch.equal(ours, theirs)
        out_qkvz, out_ba = run_rule(in_proj_rule(), list(theirs.chunk(tp)), hf.dims)
        split_qkvz, split_ba = split_gdn_linear_weights(config, theirs, tp_size=tp)
        assert torch.equal(out_qkvz, split_qkvz) and torch.equal(out_qkvz, qkvz)
        assert torch.equal(out_ba, split_ba) and torch.equal(out_ba, ba)


@pytest.mark.parametrize("tp", [1, 2])
def test_gdn_in_proj_lora_b_matches_megatron_bridge_split(hf, tp):
    """``lora_B`` takes the base's row path; ``lora_A`` is shared by both HF modules."""
    from megatron.bridge.models.conversion.param_mapping import split_gdn_linear_weights

    generator = torch.Generator().manual_seed(7)
    module = "decoder.layers.1.self_attention.in_proj"
    rows = hf.tensors["model.layers.1.linear_attn.in_proj_qkvz.weight"].shape[0] + hf.dims["gdn_heads"] * 2
    tensors = {
        f"{module}.weight": torch.zeros(rows, hf.config.hidden_size),
        f"{module}.adapter.linear_in.weight": torch.randn(RANK, hf.config.hidden_size, generator=generator),
        f"{module}.adapter.linear_out.weight": torch.randn(rows, RANK, generator=generator),  # per-rank blocks
    }
    adapter = Adapter(module, f"{module}.adapter.linear_in.weight", f"{module}.adapter.linear_out.weight", 8, RANK)
    sharded = {f"{module}.weight": tp, f"{module}.adapter.linear_out.weight": tp}
    # Megatron-Bridge's LoRA linear_in of a column-parallel base is replicated over TP ranks.
    out = export(tensors, [f"{module}.weight"], hf.dims, PER_EXPERT, adapters={module: adapter}, sharded=sharded)
    qkvz_b, ba_b = split_gdn_linear_weights(mb_gdn_config(hf.config), tensors[f"{module}.adapter.linear_out.weight"],
                                            tp_size=tp, feature_dim=RANK)
    key = f"{PEFT_PREFIX}model.layers.1.linear_attn.in_proj_"
    assert torch.equal(out[key + "qkvz.lora_B.weight"], qkvz_b)
    assert torch.equal(out[key + "ba.lora_B.weight"], ba_b)
    for part in ("qkvz", "ba"):
        assert torch.equal(out[f"{key}{part}.lora_A.weight"], tensors[f"{module}.adapter.linear_in.weight"])


def test_gated_attention_and_norm_conventions_match_megatron_bridge(hf):
    """``linear_qkv`` per query group ``[q; gate; k; v]`` (MB ``merge_qkv_weights`` with
    ``attention_output_gate``); zero-centred norms copied; ``linear_attn.norm`` - 1 (MB's
    ``RMSNorm2ZeroCenteredRMSNormMapping``)."""
    from megatron.bridge.models.conversion.param_mapping import merge_qkv_weights

    c = hf.config
    provider = SimpleNamespace(num_attention_heads=c.num_attention_heads, num_query_groups=c.num_key_value_heads,
                               kv_channels=c.head_dim, hidden_size=c.hidden_size, attention_output_gate=True)
    names = megatron_names(c, "local")
    megatron = hf_to_megatron(hf.tensors, names, TABLE, hf.dims, PER_EXPERT)
    for meg, hf_prefix in ((f"decoder.layers.{ATTENTION_LAYER}.", f"model.layers.{ATTENTION_LAYER}."),
                           ("mtp.layers.0.mtp_model_layer.", "mtp.layers.0.")):
        q, k, v = (hf.tensors[f"{hf_prefix}self_attn.{p}_proj.weight"] for p in "qkv")
        assert torch.equal(megatron[meg + "self_attention.linear_qkv.weight"], merge_qkv_weights(provider, q, k, v))
    for layer in GDN_LAYERS:
        hf_norm = hf.tensors[f"model.layers.{layer}.linear_attn.norm.weight"]
        assert torch.equal(megatron[f"decoder.layers.{layer}.self_attention.out_norm.weight"], hf_norm - 1)
        assert torch.equal(megatron[f"decoder.layers.{layer}.input_layernorm.weight"],
                           hf.tensors[f"model.layers.{layer}.input_layernorm.weight"])


# ---------------------------------------------------------------------------------------------
# 3. A real Megatron-Core Qwen3-Next built by Megatron-Bridge (CPU local specs)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(hf, megatron_cpu):
    from bridge_ext_testing.build import build_megatron_model

    return build_megatron_model(hf.dir)


def test_megatron_bridge_loaded_what_our_reverse_makes(hf, built):
    from bridge_ext.live import LiveModelSource

    source = LiveModelSource(built.chunks)
    names = source.base_names()
    ours = hf_to_megatron(hf.tensors, names, TABLE, hf.dims, PER_EXPERT)
    assert "decoder.layers.0.self_attention.in_proj.weight" in names
    assert [n for n in names if not torch.equal(source.shards(n)[0], ours[n])] == []


def test_export_is_bit_exact_with_files_and_megatron_bridge(hf, built):
    from bridge_ext import export_hf_weights

    ours = dict(export_hf_weights(built.chunks))
    assert sorted(ours) == sorted(hf.tensors)
    assert [n for n in ours if not torch.equal(ours[n], hf.tensors[n])] == []
    theirs = dict(built.bridge.export_hf_weights(built.chunks, cpu=True, show_progress=False))
    assert sorted(theirs) == sorted(ours)
    assert [n for n in ours if not torch.equal(ours[n], theirs[n])] == []


def test_exported_weights_give_the_megatron_logits(hf, built):
    """Semantics, not just layout: HF Qwen3-Next on our export computes Megatron's function."""
    from bridge_ext_testing.forward import megatron_logits
    from bridge_ext.verify import Report, compare_logits, hf_logits, load_hf_model

    from bridge_ext import export_hf_weights

    assert built.provider.rotary_percent == 0.25  # see bridge_ext_testing.qwen35.qwen3_next_rotary_percent
    model = load_hf_model(hf.dir)
    exported = {n: t for n, t in export_hf_weights(built.chunks, expert_layout="fused") if not n.startswith("mtp.")}
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    model.load_state_dict(exported, strict=True)  # transformers' in-memory layout: fused experts
    input_ids = torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(1))
    compare_logits(hf_logits(model, input_ids), megatron_logits(built.chunks, input_ids), Report(),
                   what="qwen3_next", relative_tolerance=1e-4)
