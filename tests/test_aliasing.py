"""No exported tensor shares memory with the model unless zero_copy=True, and only tensors that
would share it are copied (tiny Qwen3 and Qwen3-MoE with LoRA, on CPU at TP=PP=1, where pass-
through weights, LoRA factors and expert matrices would otherwise be the model's own memory)."""

from __future__ import annotations

import pytest
import torch

from bridge_ext import aliasing, export_hf_buckets, export_hf_weights
from bridge_ext.cpu.build import LoraSettings, build_megatron_model, randomize_lora
from bridge_ext.cpu.tiny_dense import tiny_dense
from bridge_ext.cpu.tiny_qwen_moe_vl import tiny_qwen3_moe

MAKERS = {"qwen3": lambda path: tiny_dense(path, "qwen3"), "qwen3_moe": tiny_qwen3_moe}
CASES = [
    ("qwen3", dict(peft=True)),
    ("qwen3", dict(peft=False)),
    ("qwen3", dict(adapters_only=True)),
    ("qwen3_moe", dict(peft=True, expert_layout="per_expert", expert_adapter_layout="per_expert")),
    ("qwen3_moe", dict(peft=True, expert_layout="fused", expert_adapter_layout="fused")),
    ("qwen3_moe", dict(peft=False, expert_layout="per_expert")),
]


@pytest.fixture(scope="module")
def models(megatron_cpu, tmp_path_factory) -> dict[str, list[torch.nn.Module]]:
    built = {}
    for kind, make in MAKERS.items():
        chunks = build_megatron_model(make(tmp_path_factory.mktemp(kind)), lora=LoraSettings()).chunks
        randomize_lora(chunks, seed=3)
        built[kind] = chunks
    return built


def state(chunks) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": tensor.detach().clone() for i, chunk in enumerate(chunks)
            for name, tensor in (*chunk.named_parameters(), *chunk.named_buffers())}


def scribble(tensor: torch.Tensor) -> None:
    tensor.fill_(float("nan") if tensor.is_floating_point() else -7)


@pytest.mark.parametrize(("kind", "options"), CASES,
                         ids=[kind + "".join(f"-{key}={value}" for key, value in options.items()) for kind, options in CASES])
def test_writing_to_every_exported_tensor_leaves_the_model_unchanged(models, kind, options, monkeypatch):
    chunks = models[kind]
    storages = aliasing.model_storages(chunks)
    before = state(chunks)
    # zero_copy=True: some tensors are the model's own memory (else this test could not fail)
    shared = sorted(name for name, tensor in export_hf_weights(chunks, zero_copy=True, **options)
                    if aliasing.shares_storage(tensor, storages))
    assert shared, "no exported tensor is the model's memory: the case proves nothing"
    copies = []
    real = aliasing.fresh_copies
    monkeypatch.setattr(aliasing, "fresh_copies", lambda tensors: copies.extend(tensors) or real(tensors))
    exported = list(export_hf_weights(chunks, **options))
    assert len(copies) == len(shared)  # only what would share memory is copied
    for name, tensor in exported:
        assert not aliasing.shares_storage(tensor, storages), name
        scribble(tensor)
    after = state(chunks)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, changed


def test_buckets_are_copies_too(models):
    chunks = models["qwen3_moe"]
    storages = aliasing.model_storages(chunks)
    tensors = [tensor for bucket in export_hf_buckets(chunks, 1 << 14, expert_adapter_layout="per_expert")
               for _, tensor in bucket.tensors]
    assert tensors and not any(aliasing.shares_storage(tensor, storages) for tensor in tensors)
    zero_copy = [tensor for bucket in export_hf_buckets(chunks, 1 << 14, zero_copy=True) for _, tensor in bucket.tensors]
    assert any(aliasing.shares_storage(tensor, storages) for tensor in zero_copy)


def test_copies_made_together_keep_the_order_the_values_and_their_own_memory():
    model = torch.nn.Linear(4, 3)
    own = torch.arange(6.0).reshape(2, 3)  # made by the export: passes as it is
    pairs = [("w", model.weight.detach()), ("b", model.bias.detach()), ("own", own),
             ("w.t", model.weight.detach().t()), ("w2", model.weight.detach()[1:])]
    out = list(aliasing.without_aliases(pairs, aliasing.model_storages([model])))
    assert [name for name, _ in out] == ["w", "b", "own", "w.t", "w2"]
    for (_, source), (name, copy) in zip(pairs, out):
        assert torch.equal(source, copy) and copy.shape == source.shape, name
    assert out[2][1] is own
    before = [copy.clone() for _, copy in out]
    out[0][1].fill_(float("nan"))  # "w" and "b" share one new buffer, each its own part of it
    assert all(torch.equal(copy, saved) for (_, copy), saved in zip(out[1:], before[1:]))
    assert torch.equal(model.weight.detach(), pairs[0][1]) and not torch.isnan(model.weight).any()
