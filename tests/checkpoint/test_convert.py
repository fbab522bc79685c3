"""``convert_checkpoint`` on real megatron-core checkpoints of a tiny Qwen3 (TP=1 and TP=2, full and adapter-only).

The reference is independent of the converter: a live Megatron model (TP=1) into which
megatron-core's own ``dist_checkpointing.load`` reads the very same checkpoint, exported with
the live path (:func:`bridge_ext.save_hf_pretrained`) and run with Megatron's own forward.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import ckpt_factory
from bridge_ext import save_hf_pretrained
from bridge_ext.checkpoint import CheckpointReader
from bridge_ext.checkpoint.source import CheckpointSource, unstacked_names
from bridge_ext.convert import convert_checkpoint, verify_conversion
from bridge_ext_testing.build import LoraSettings, build_megatron_model
from bridge_ext_testing.forward import megatron_logits
from bridge_ext.engine import PEFT_PREFIX
from bridge_ext.verify import Report, check_model_folder, compare_logits, hf_logits, load_adapter_strict, load_hf_model

CASES = [(tp, variant) for tp in (1, 2) for variant in ("lora", "adapter")]
INPUT_IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def folder_tensors(folder, prefix="model") -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob(f"{prefix}*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.fixture(scope="module")
def live(megatron_cpu, qwen3_hf):
    """One live TP=1 LoRA model; each case loads its checkpoint into it with megatron-core."""
    return build_megatron_model(qwen3_hf, lora=LoraSettings())


def load_with_megatron(built, root, adapter_only: bool) -> None:
    from megatron.core import dist_checkpointing

    from bridge_ext_testing.writer import SHARDED_SD_METADATA

    chunk = built.chunks[0]
    sharded = chunk.sharded_state_dict(metadata=dict(SHARDED_SD_METADATA))
    sharded = {k: v for k, v in sharded.items()
               if "_extra_state" not in k and (".adapter." in k or not adapter_only)}
    folder = root / f"iter_{ckpt_factory.ITERATION:07d}"
    with ckpt_factory.cpu_stand_ins():
        loaded = dist_checkpointing.load({"model": sharded}, str(folder))["model"]
    params = {name.replace(".to_wrap.", "."): param for name, param in chunk.named_parameters()}
    expected = {name for name in params if ".adapter." in name or not adapter_only}
    assert set(loaded) == expected
    with torch.no_grad():
        for name, tensor in loaded.items():
            params[name].copy_(tensor)


@pytest.fixture(scope="module", params=CASES, ids=[f"tp{tp}-{v}" for tp, v in CASES])
def case(request, live, qwen3_hf, qwen3_ckpts, qwen3_ckpts_tp2, tmp_path_factory):
    """(converted folders, live export folders, Megatron logits) for one checkpoint."""
    tp, variant = request.param
    root = (qwen3_ckpts if tp == 1 else qwen3_ckpts_tp2) / variant
    out = tmp_path_factory.mktemp(f"convert_tp{tp}_{variant}")
    load_with_megatron(live, root, adapter_only=variant == "adapter")
    save_hf_pretrained(live.chunks, out / "live_model", out / "live_adapter")
    reference = megatron_logits(live.chunks, INPUT_IDS)
    result = convert_checkpoint(root, model_dir=out / "model", adapter_dir=out / "adapter", hf_base=qwen3_hf)
    return result, out, reference


def test_base_is_bit_exact_against_the_hf_original(case, qwen3_hf):
    result, _, _ = case
    original = load_file(str(qwen3_hf / "model.safetensors"))
    written = folder_tensors(result.model_dir)
    assert sorted(written) == sorted(original)
    assert [name for name in original if not torch.equal(written[name], original[name])] == []


def test_adapters_equal_the_live_export_of_the_same_weights(case):
    result, out, _ = case
    ours = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    live = load_file(str(out / "live_adapter" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(live) and len(ours) == 2 * 2 * 7
    assert [name for name in ours if not torch.equal(ours[name], live[name])] == []
    assert not any(torch.equal(t, torch.zeros_like(t)) for t in ours.values())
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    live_config = json.loads((out / "live_adapter" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "target_modules", "lora_dropout", "peft_type", "task_type"):
        assert config[key] == live_config[key], key


def test_peft_loads_strictly_and_logits_equal_the_megatron_model(case):
    result, _, reference = case
    report = Report()
    check_model_folder(result.model_dir, report)
    peft_model = load_adapter_strict(load_hf_model(result.model_dir), result.adapter_dir, report)
    relative = compare_logits(hf_logits(peft_model, INPUT_IDS), reference, report,
                              what="converted HF + PEFT vs Megatron", relative_tolerance=1e-5)
    # the adapter matters: without it the logits are far off
    plain = hf_logits(load_hf_model(result.model_dir), INPUT_IDS)
    assert (plain - reference).abs().max() / reference.abs().max() > 100 * max(relative, 1e-7)


def test_merged_equals_live_merged_export(case, qwen3_hf, tmp_path):
    result, out, reference = case
    root = result.checkpoint.parent
    merged = convert_checkpoint(root, model_dir=tmp_path / "merged", merge=True, hf_base=qwen3_hf)
    live_merged = folder_tensors(out / "live_model")  # base only: merge it by hand below
    ours = folder_tensors(merged.model_dir)
    adapters = load_file(str(out / "live_adapter" / "adapter_model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    a, b = adapters[f"{PEFT_PREFIX}{name}.lora_A.weight"], adapters[f"{PEFT_PREFIX}{name}.lora_B.weight"]
    assert torch.allclose(ours[f"{name}.weight"], live_merged[f"{name}.weight"] + 2.0 * (b @ a), atol=1e-6)
    logits = hf_logits(load_hf_model(merged.model_dir), INPUT_IDS)
    compare_logits(logits, reference, Report(), what="merged", relative_tolerance=1e-5)


def test_adapter_only_needs_no_base_folder_for_adapters(qwen3_ckpts, tmp_path):
    """The config comes from run_config.yaml's hf_model_id; adapters need no base weights."""
    result = convert_checkpoint(qwen3_ckpts / "adapter", adapter_dir=tmp_path / "adapter")
    assert result.adapter_only and result.model_dir is None
    full = convert_checkpoint(qwen3_ckpts / "lora", adapter_dir=tmp_path / "from_full")
    ours = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    reference = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(reference)
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


def test_dense_checkpoint_and_verify_report(qwen3_ckpts, qwen3_hf, tmp_path):
    result = convert_checkpoint(qwen3_ckpts / "dense" / "iter_0000010", model_dir=tmp_path / "m",
                                dtype=torch.bfloat16, max_shard_size="40KB")
    written = folder_tensors(result.model_dir)
    original = load_file(str(qwen3_hf / "model.safetensors"))
    assert all(written[k].dtype == torch.bfloat16 and torch.equal(written[k], original[k].bfloat16()) for k in original)
    assert len(list(result.model_dir.glob("model-*.safetensors"))) > 1
    assert json.loads((result.model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert (result.model_dir / "generation_config.json").is_file()  # companion files of the HF source
    lines = verify_conversion(result).lines
    assert any("nothing missing or unexpected" in line for line in lines)
    assert any("all finite" in line for line in lines)


def test_names_unstack_layers_and_experts():
    assert unstacked_names("decoder.layers.mlp.experts.experts.linear_fc1.weight", (2, 3, 8, 4)) == [
        (f"decoder.layers.{l}.mlp.experts.local_experts.{e}.linear_fc1.weight", (l, e))
        for l in range(2) for e in range(3)
    ]
    assert unstacked_names("decoder.layers.0.mlp.experts.experts.linear_fc2.weight", (2, 4, 8)) == [
        (f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc2.weight", (e,)) for e in range(2)
    ]
    assert unstacked_names("embedding.word_embeddings.weight", (5, 4)) == [("embedding.word_embeddings.weight", ())]


def test_tp2_checkpoint_source_equals_tp1(qwen3_ckpts, qwen3_ckpts_tp2):
    """Same weights saved at TP=1 and TP=2 give the same model tensors, name by name."""
    one = CheckpointSource(CheckpointReader(qwen3_ckpts / "dense"))
    two = CheckpointSource(CheckpointReader(qwen3_ckpts_tp2 / "dense"))
    assert one.base_names() == two.base_names() and len(one.base_names()) == 3 + 2 * 8
    for name in one.base_names():
        (a,), (b,) = one.shards(name), two.shards(name)
        assert torch.equal(a, b), name


def test_config_built_from_run_config_for_a_model_type(qwen3_ckpts, qwen3_hf, tmp_path):
    """No Hugging Face folder at all: config.json from run_config.yaml through Megatron-Bridge's mapping."""
    result = convert_checkpoint(qwen3_ckpts / "lora", model_dir=tmp_path / "m", merge=True, model_type="qwen3")
    config = json.loads((result.model_dir / "config.json").read_text())
    original = json.loads((qwen3_hf / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["_name_or_path"] == ""
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "tie_word_embeddings"):
        assert config[key] == original[key], key
    assert any("nothing missing or unexpected" in line for line in verify_conversion(result).lines)


@pytest.mark.parametrize("tp", [1, 2])
def test_dora_adapter_checkpoint_converts_to_the_live_export(tp, megatron_cpu, qwen3_hf, qwen3_ckpts,
                                                             qwen3_ckpts_tp2, tmp_path):
    """DoRA (run_config ``peft._target_: megatron.bridge.peft.dora.DoRA``) on column-parallel
    linears, saved at TP1 and TP2: the same folder as the live export of the loaded model,
    except where megatron-core's own load at TP1 misplaces the TP2 magnitude of ``linear_fc1``.

    Megatron-Bridge saves that magnitude as a plain row-sharded tensor, so the checkpoint holds
    it in the per-rank order ``[gate_0; up_0; gate_1; up_1]`` and a TP1 load takes it as
    ``[gate; up]``. What the TP2 model computed is each rank's shard on its own ``[gate_r; up_r]``
    rows: the test rebuilds gate and up from the saving ranks' own parameters."""
    out = qwen3_ckpts if tp == 1 else qwen3_ckpts_tp2
    root = out / "dora_adapter"
    live = build_megatron_model(qwen3_hf, lora=LoraSettings(kind="dora", target_modules=ckpt_factory.DORA_TARGETS[
        "dora_adapter"]))
    load_with_megatron(live, root, adapter_only=True)
    save_hf_pretrained(live.chunks, tmp_path / "live_model", tmp_path / "live_adapter")
    result = convert_checkpoint(root, adapter_dir=tmp_path / "adapter", hf_base=qwen3_hf)
    ours = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    expected = load_file(str(tmp_path / "live_adapter" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(expected)
    assert len([n for n in ours if n.endswith(".lora_magnitude_vector")]) == 10
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["use_dora"] is True
    if tp == 2:
        ranks = [torch.load(out / f"params_dora_adapter_rank{r}.pt") for r in range(2)]
        for layer in range(2):
            shards = [params[f"decoder.layers.{layer}.mlp.linear_fc1.adapter.weight_magnitude"][0] for params in ranks]
            for part, proj in enumerate(("gate_proj", "up_proj")):
                name = f"{PEFT_PREFIX}model.layers.{layer}.mlp.{proj}.lora_magnitude_vector"
                assert torch.equal(ours[name], torch.cat([shard.chunk(2)[part] for shard in shards])), name
                assert not torch.equal(expected[name], ours[name])
                expected[name] = ours[name]
    assert [name for name in ours if not torch.equal(ours[name], expected[name])] == []
    if tp == 1:
        report = Report()
        peft_model = load_adapter_strict(load_hf_model(tmp_path / "live_model"), result.adapter_dir, report)
        compare_logits(hf_logits(peft_model, INPUT_IDS), megatron_logits(live.chunks, INPUT_IDS), report,
                       what="converted DoRA", relative_tolerance=1e-5)


def test_dora_on_a_row_parallel_linear_saved_at_tp2_is_refused(qwen3_hf, qwen3_ckpts, qwen3_ckpts_tp2, tmp_path):
    from bridge_ext.checkpoint.errors import CheckpointError

    result = convert_checkpoint(qwen3_ckpts / "dora_row_adapter", adapter_dir=tmp_path / "tp1", hf_base=qwen3_hf)
    assert any(n.endswith("o_proj.lora_magnitude_vector") for n in load_file(str(result.adapter_dir /
                                                                                 "adapter_model.safetensors")))
    with pytest.raises(CheckpointError, match=r"DoRA on the row-parallel decoder\.layers\.0\.self_attention\."
                                              r"linear_proj, trained at tensor-parallel size > 1"):
        convert_checkpoint(qwen3_ckpts_tp2 / "dora_row_adapter", adapter_dir=tmp_path / "tp2", hf_base=qwen3_hf)
    assert not (tmp_path / "tp2").exists()


@pytest.mark.parametrize("tp", [1, 2])
def test_canonical_lora_checkpoint_converts_to_the_live_export(tp, megatron_cpu, qwen3_hf, qwen3_ckpts,
                                                               qwen3_ckpts_tp2, tmp_path):
    """CanonicalLoRA (``peft._target_: megatron.bridge.peft.canonical_lora.CanonicalLoRA``), saved at
    TP1 and TP2: the same folder as the live export of the loaded model, PEFT gives its logits."""
    root = (qwen3_ckpts if tp == 1 else qwen3_ckpts_tp2) / "canonical_adapter"
    live = build_megatron_model(qwen3_hf, lora=LoraSettings(kind="canonical_lora"))
    load_with_megatron(live, root, adapter_only=True)
    save_hf_pretrained(live.chunks, tmp_path / "live_model", tmp_path / "live_adapter")
    result = convert_checkpoint(root, adapter_dir=tmp_path / "adapter", hf_base=qwen3_hf)
    ours = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    expected = load_file(str(tmp_path / "live_adapter" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(expected) and len(ours) == 2 * 7 * 2
    assert [name for name in ours if not torch.equal(ours[name], expected[name])] == []
    report = Report()
    peft_model = load_adapter_strict(load_hf_model(tmp_path / "live_model"), result.adapter_dir, report)
    compare_logits(hf_logits(peft_model, INPUT_IDS), megatron_logits(live.chunks, INPUT_IDS), report,
                   what="converted CanonicalLoRA", relative_tolerance=1e-5)


def test_a_dora_adapter_folder_for_vllm_is_refused(qwen3_hf, qwen3_ckpts, tmp_path):
    from bridge_ext.errors import ExportError

    with pytest.raises(ExportError, match=r"DoRA .* which vLLM cannot load"):
        convert_checkpoint(qwen3_ckpts / "dora_adapter", adapter_dir=tmp_path / "adapter", hf_base=qwen3_hf,
                           adapter_for="vllm")
    assert not (tmp_path / "adapter").exists()
