"""The weight-sync receiver: a PEFT model fed by buckets gives the Megatron model's logits."""

from __future__ import annotations

import pytest
import torch

from bridge_ext import Bucket, export_hf_buckets, export_hf_weights, peft_adapter_config
from bridge_ext_testing.build import LoraSettings, build_megatron_model, randomize_lora
from bridge_ext_testing.forward import megatron_logits
from bridge_ext_testing.tiny_dense import tiny_dense
from bridge_ext.sync import BucketReceiver, load_into_module, load_into_peft


@pytest.fixture(scope="module")
def built(megatron_cpu, tmp_path_factory):
    model = build_megatron_model(tiny_dense(tmp_path_factory.mktemp("qwen3")), lora=LoraSettings())
    randomize_lora(model.chunks, seed=3)
    return model


def test_a_peft_model_fed_by_buckets_matches_megatron(built):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(str(built.hf_dir), dtype=torch.float32)
    peft_model = get_peft_model(hf_model, peft_adapter_config(built.chunks)).eval()
    with torch.no_grad():  # nothing of the original weights may survive the sync
        for param in peft_model.parameters():
            param.zero_()

    adapter_loads = []
    load_adapter = load_into_peft(peft_model)
    receiver = BucketReceiver(load_into_module(peft_model.get_base_model()),
                              lambda tensors: (adapter_loads.append(len(tensors)), load_adapter(tensors)))
    done = [receiver(bucket) for bucket in export_hf_buckets(built.chunks, bucket_bytes=64 << 10)]
    assert done[-1] and not any(done[:-1]) and len(done) > 3
    assert adapter_loads == [sum(1 for name, _ in export_hf_weights(built.chunks, adapters_only=True))]

    input_ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = peft_model(input_ids=input_ids).logits
    reference = megatron_logits(built.chunks, input_ids)
    assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_the_adapter_is_applied_once_and_whole(built):
    applied = []
    receiver = BucketReceiver(lambda pairs: None, applied.append)
    buckets = list(export_hf_buckets(built.chunks, bucket_bytes=4 << 10))
    for bucket in buckets[:-1]:
        receiver(bucket)
        assert not applied, "an adapter was applied before the last bucket"
    receiver(buckets[-1])
    assert len(applied) == 1 and sorted(applied[0]) == sorted(
        name for name, _ in export_hf_weights(built.chunks, adapters_only=True))
    repeated = Bucket(buckets[-1].tensors, is_last=False)
    receiver(repeated)
    with pytest.raises(ValueError, match="arrived twice"):
        receiver(repeated)


def test_host_copies_pass_cpu_tensors_through(built):
    plain = dict(export_hf_weights(built.chunks))
    on_host = dict(export_hf_weights(built.chunks, device="cpu"))
    assert sorted(on_host) == sorted(plain)
    assert all(torch.equal(on_host[name], plain[name]) for name in plain)
