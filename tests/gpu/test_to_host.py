"""Copies to pinned host memory (``export_hf_weights(device="cpu")``'s last stage), on a GPU,
and whole exports to the CPU against the same exports on the GPU.

Needs CUDA: on a GPU machine run ``python -m pytest tests/gpu/test_to_host.py``.
"""

import pytest
import torch

from bridge_ext.sync import PACK_BELOW_BYTES, PACK_BYTES, to_host

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (device-to-pinned-host copies); run it on a GPU machine")


def _stream() -> list[tuple[str, torch.Tensor]]:
    """Small, large and CPU tensors mixed, more small ones than one packed copy holds."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    pairs = []
    for index in range(3 * PACK_BYTES // (1 << 20)):  # 1 MiB each: packed, several copies
        pairs.append((f"small.{index}", torch.randn(512, 1024, device="cuda", generator=generator).bfloat16()))
        if index % 50 == 7:
            pairs.append((f"odd.{index}", torch.randn(3, 5, device="cuda", generator=generator).half()))
        if index % 60 == 11:
            large = torch.randn(PACK_BELOW_BYTES // 4 + 1, device="cuda", generator=generator)
            pairs.append((f"large.{index}", large))
        if index == 100:
            pairs.append(("on.cpu", torch.arange(6.0)))
    pairs.append(("transposed", torch.randn(64, 32, device="cuda", generator=generator).t()))
    return pairs


@pytest.mark.parametrize("window", [0, 1 << 20, 256 << 20])
def test_every_tensor_arrives_on_the_host_in_order_and_bit_exact(window):
    pairs = _stream()
    expected = [(name, tensor.cpu()) for name, tensor in pairs]
    received = []
    for name, tensor in to_host(iter(pairs), window_bytes=window):
        assert tensor.device.type == "cpu"
        received.append((name, tensor.clone()))
    assert [name for name, _ in received] == [name for name, _ in expected]
    for (name, got), (_, want) in zip(received, expected):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name


def test_host_tensors_are_pinned_and_small_ones_share_a_buffer():
    pairs = _stream()
    received = list(to_host(iter(pairs)))
    by_name = dict(received)
    assert all(tensor.is_pinned() for name, tensor in received if name != "on.cpu")
    storages = {by_name[f"small.{index}"].untyped_storage().data_ptr() for index in range(20)}
    assert len(storages) < 20  # packed copies
    assert by_name["on.cpu"].data_ptr() == dict(pairs)["on.cpu"].data_ptr()  # CPU tensors pass through


def test_a_pinned_tensor_still_being_written_by_the_gpu_is_yielded_once_written():
    source = torch.randn(16 << 20, device="cuda")  # 64 MiB
    host = torch.empty(source.shape, pin_memory=True)
    torch.cuda._sleep(200_000_000)  # the copy below starts well after to_host is called
    host.copy_(source, non_blocking=True)
    received = [(name, tensor.clone()) for name, tensor in to_host(iter([("written", host)]))]
    assert [name for name, _ in received] == ["written"]
    assert torch.equal(received[0][1], source.cpu())


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """Tiny Qwen3.5-MoE, Qwen3-MoE and gpt-oss (fused transposed experts) models with LoRA on
    every target, on the GPU."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    from bench_models import build, hf_dir_for, init_parallel, write_hf_folder

    from bridge_ext_testing.build import LoraSettings, build_megatron_model, randomize_lora
    from bridge_ext_testing.tiny_gpt_families import tiny_gpt_oss

    sizes = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                 virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1)
    models = {}
    with init_parallel("cuda"):
        for preset in ("qwen35-moe-tiny", "qwen3-moe-tiny"):
            folder = hf_dir_for(preset, True, None)
            if not (folder / "config.json").is_file():
                write_hf_folder(folder, preset)
            models[preset], _ = build(folder, preset, "cuda", sizes, lora_rank=4)
        gpt_oss = build_megatron_model(tiny_gpt_oss(tmp_path_factory.mktemp("gpt_oss")), on_gpu=True,
                                       lora=LoraSettings(("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"),
                                                         dim=4, alpha=8))
        randomize_lora(gpt_oss.chunks, seed=3, std=0.1)
        models["gpt-oss-tiny"] = gpt_oss.chunks
        yield models


@pytest.mark.parametrize("peft", [True, False])
@pytest.mark.parametrize("preset", ["qwen35-moe-tiny", "qwen3-moe-tiny", "gpt-oss-tiny"])
def test_an_export_to_the_cpu_equals_the_export_on_the_gpu(moe_models, preset, peft):
    from bridge_ext import export_hf_weights

    chunks = moe_models[preset]
    on_gpu = [(name, tensor.cpu()) for name, tensor in export_hf_weights(chunks, peft=peft)]
    to_cpu = [(name, tensor.clone(), tensor.is_pinned())
              for name, tensor in export_hf_weights(chunks, peft=peft, device="cpu")]
    assert [name for name, *_ in to_cpu] == [name for name, _ in on_gpu]
    for (name, got, pinned), (_, want) in zip(to_cpu, on_gpu):
        assert pinned, name
        assert got.dtype == want.dtype and torch.equal(got, want), name
    if preset != "qwen3-moe-tiny":  # fused experts: assembled in pinned host memory
        assert any(name.endswith("experts.gate_up_proj") for name, *_ in to_cpu)
