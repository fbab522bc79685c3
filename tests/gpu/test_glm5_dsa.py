"""GLM-5 (``glm_moe_dsa``) end to end on a real Megatron-Core model, on a GPU with Transformer Engine.

megatron-core 0.19.2 builds the DSA layer only with Transformer Engine's spec provider (its DSA
spec asks the backend for ``linear()``, which the local provider lacks), so the CPU conformance
module proves GLM-5's names only (tests/conformance/test_oddities.py). Here the tiny GLM-5
(indexer on layers 0 and 2, layer 1 sharing their top-k, one MTP layer) is built by
Megatron-Bridge's own ``GLM5Bridge`` provider with its DSA spec, ``mtp_num_layers = 1`` (the
bridge leaves MTP out by default), the all-to-all dispatcher (its default "flex" one needs
DeepEP), LoRA with random non-zero A and B on every MLA and MLP target, and judged as the CPU
entries are: base bit-exact against the source files (MTP included), names equal to transformers'
key set plus the MTP layer, strict PEFT load and logits against the Megatron forward, merged
logits, Megatron-Bridge's merged and adapter exports tensor by tensor.

Run on a GPU machine with Transformer Engine: ``python -m pytest tests/gpu/test_glm5_dsa.py``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None,
    reason="needs a CUDA GPU and Transformer Engine: megatron-core builds the DSA layer only with TE's spec provider")

TARGETS = ("linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj",
           "linear_fc1", "linear_fc2")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from megatron.bridge import AutoBridge

    from bridge_ext_testing.build import LoraSettings, randomize_lora
    from bridge_ext_testing.distributed import megatron_parallel
    from bridge_ext_testing.tiny_gpt_families import tiny_glm_moe_dsa

    hf_dir = tiny_glm_moe_dsa(tmp_path_factory.mktemp("glm5") / "hf")
    with megatron_parallel():
        bridge = AutoBridge.from_hf_pretrained(str(hf_dir))
        provider = bridge.to_megatron_provider(load_weights=False)
        provider.mtp_num_layers = 1
        provider.moe_token_dispatcher_type = "alltoall"
        provider.moe_shared_expert_overlap = False
        provider.params_dtype = torch.float32
        provider.bf16 = False
        lora = LoraSettings(target_modules=TARGETS).peft()
        provider.register_pre_wrap_hook(lambda chunks: lora(chunks, training=True))
        provider.finalize()
        chunks = provider.provide_distributed_model(wrap_with_ddp=False)
        bridge.load_hf_weights(chunks)
        randomize_lora(chunks, seed=3, std=0.1)
        yield hf_dir, bridge, list(chunks)


def _input_ids() -> torch.Tensor:
    return torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(1))


def test_base_is_bit_exact_and_names_are_transformers_keys_plus_mtp(built):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from bridge_ext import export_hf_weights
    from bridge_ext.hf_keys import hf_checkpoint_keys
    from bridge_ext.peft_keys import PEFT_PREFIX
    from bridge_ext.tables import table_for

    hf_dir, _, chunks = built
    original = load_file(str(hf_dir / "model.safetensors"))
    base = {n: t.cpu() for n, t in export_hf_weights(chunks) if not n.startswith(PEFT_PREFIX)}
    assert sorted(base) == sorted(original)
    assert [n for n in original if not torch.equal(base[n], original[n])] == []
    config = AutoConfig.from_pretrained(str(hf_dir))
    mtp = {n for n in base if table_for(config).extra_weights.holds(n)}
    assert mtp and sorted(set(base) - mtp) == sorted(hf_checkpoint_keys(config))


def test_adapter_and_merged_folders_give_the_megatron_logits(built, tmp_path):
    from bridge_ext import save_hf_pretrained
    from bridge_ext_testing.forward import megatron_logits
    from bridge_ext.verify import Report, compare_logits, hf_logits, load_adapter_strict, load_hf_model

    _, _, chunks = built
    reference = megatron_logits(chunks, _input_ids())
    save_hf_pretrained(chunks, tmp_path / "model", tmp_path / "adapter")
    save_hf_pretrained(chunks, tmp_path / "merged", merge=True)
    report = Report()
    peft_model = load_adapter_strict(load_hf_model(tmp_path / "model"), tmp_path / "adapter", report)
    compare_logits(hf_logits(peft_model, _input_ids()), reference, report, what="GLM-5 + PEFT", relative_tolerance=1e-4)
    compare_logits(hf_logits(load_hf_model(tmp_path / "merged"), _input_ids()), reference, report,
                   what="GLM-5 merged", relative_tolerance=1e-4)


def test_comparison_with_megatron_bridge(built):
    """Megatron-Bridge's GLM5Bridge has no MTP ``embed_tokens`` / ``shared_head.head`` copies
    (ours write them, as the published checkpoint holds them); everything else is equal."""
    import re

    from bridge_ext import export_hf_weights
    from bridge_ext.peft_keys import PEFT_PREFIX

    _, bridge, chunks = built
    ours = {n: t.cpu() for n, t in export_hf_weights(chunks, peft=False)}
    theirs = {n: t.cpu() for n, t in bridge.export_hf_weights(chunks, cpu=True, show_progress=False)}
    copies = sorted(n for n in ours if re.search(r"^model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.", n))
    assert sorted(set(ours) - set(theirs)) == copies and sorted(set(theirs) - set(ours)) == []
    assert [n for n in theirs if not torch.allclose(ours[n], theirs[n], rtol=0, atol=1e-6)] == []
    adapters = {n.removeprefix(PEFT_PREFIX): t.cpu() for n, t in
                export_hf_weights(chunks, adapters_only=True, expert_adapter_layout="per_expert")}
    their_adapters = {n: t.cpu() for n, t in bridge.export_adapter_weights(chunks, cpu=True, show_progress=False)}
    assert sorted(adapters) == sorted(their_adapters)
    assert [n for n in adapters if not torch.equal(adapters[n], their_adapters[n])] == []
