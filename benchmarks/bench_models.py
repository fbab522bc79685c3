"""The models the GPU benchmarks export: presets, their Hugging Face folders, the Megatron build.

Three families:

* ``qwen3``: dense Qwen3 shapes, a Hugging Face folder with random bf16 weights, loaded by
  Megatron-Bridge into a model built with megatron-core's local layer spec;
* ``qwen35_moe``: Qwen3.5-MoE shapes (Gated DeltaNet + gated attention, routed and shared
  experts, one MTP layer), built through the project's own local spec
  (:mod:`bridge_ext_testing.build`) with parameters initialised where the model lives (on the GPU:
  an 8-layer 35B-A3B-wide model has 8.6B parameters, too many to write, read and load for a
  benchmark). Its folder holds ``config.json`` and a ``model.safetensors.index.json`` naming
  the published checkpoint's keys (fused experts in the decoder, per-expert MTP experts), so
  that both exporters pick the published layout; no weight file is written or read;
* ``qwen3_moe``: Qwen3-MoE shapes (q/k-norm attention, routed experts in every layer, no
  shared expert), built the same way (megatron-core's local GPT spec with sequential experts);
  its folder holds ``config.json`` and an index of the published per-expert keys
  (``mlp.experts.{e}.gate_proj.weight``...).

Every model gets Megatron-Bridge LoRA (rank ``r``, alpha ``2r``) on every target
Megatron-Bridge offers for it, with random non-zero ``B`` so that merges change values.
"""

from __future__ import annotations

import json
import os
import zlib
from contextlib import ExitStack, nullcontext
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

_QWEN35_MOE_LAYERS = ["linear_attention"] * 3 + ["full_attention"]
PRESETS = {
    # Qwen3 shapes: hidden, intermediate, layers, heads, kv heads, head dim, vocab
    "small": dict(family="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=64, vocab_size=32768),
    "qwen3-1.7b": dict(family="qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936),
    # Qwen3.5-35B-A3B widths (transformers' Qwen3_5MoeTextConfig defaults), 8 decoder layers.
    "qwen35-moe": dict(family="qwen35_moe", hidden_size=2048, num_hidden_layers=8,
                       layer_types=_QWEN35_MOE_LAYERS * 2, num_attention_heads=16, num_key_value_heads=2,
                       head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
                       linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                       num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                       shared_expert_intermediate_size=512, vocab_size=248320, mtp_num_hidden_layers=1),
    # The same structure, tiny: the CPU smoke test of the benchmarks.
    "qwen35-moe-tiny": dict(family="qwen35_moe", hidden_size=64, num_hidden_layers=4, layer_types=_QWEN35_MOE_LAYERS,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                            linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                            linear_conv_kernel_dim=4, num_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=32, shared_expert_intermediate_size=48, vocab_size=256,
                            mtp_num_hidden_layers=1),
    # Qwen3-30B-A3B widths (its published config.json), 8 decoder layers, every layer MoE.
    "qwen3-moe": dict(family="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_hidden_layers=8,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                      num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True, vocab_size=151936),
    # The same structure, tiny: the CPU smoke test of the benchmarks.
    "qwen3-moe-tiny": dict(family="qwen3_moe", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                           num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, vocab_size=256),
}
QWEN3_LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
QWEN35_LORA_TARGETS = QWEN3_LORA_TARGETS + ("in_proj", "out_proj")


def family(preset: str) -> str:
    return PRESETS[preset]["family"]


def _fields(preset: str) -> dict:
    return {key: value for key, value in PRESETS[preset].items() if key != "family"}


# -- Hugging Face folders --------------------------------------------------------------------
def write_hf_folder(directory: Path, preset: str, tied: bool = True) -> Path:
    """The preset's Hugging Face folder (made once; see the module docstring)."""
    if family(preset) == "qwen3":
        return _write_random_qwen3(directory, preset, tied)
    if family(preset) == "qwen3_moe":
        return _write_qwen3_moe_layout(directory, preset)
    return _write_qwen35_moe_layout(directory, preset)


def _write_random_qwen3(directory: Path, preset: str, tied: bool) -> Path:
    """A Qwen3 folder with random bf16 weights (names and shapes from transformers)."""
    from transformers import Qwen3Config

    from bridge_ext.hf_folder import ShardedSafetensorsWriter
    from bridge_ext.hf_keys import hf_checkpoint_keys

    config = Qwen3Config(**_fields(preset), tie_word_embeddings=tied, dtype="bfloat16",
                         architectures=["Qwen3ForCausalLM"])
    generator = torch.Generator().manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    writer = ShardedSafetensorsWriter(directory, 2 << 30)
    for name, shape in hf_checkpoint_keys(config).items():
        writer.add(name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))
    writer.close()
    config.save_pretrained(directory)
    return directory


def qwen35_moe_config(preset: str):
    from transformers import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig(**_fields(preset), tie_word_embeddings=False, dtype="bfloat16",
                                architectures=["Qwen3_5MoeForCausalLM"])


def _mtp_keys(config) -> list[str]:
    """The published Qwen3.5-MoE checkpoints' MTP keys (per-expert MTP experts)."""
    keys = ["mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight"]
    for layer in range(config.mtp_num_hidden_layers):
        p = f"mtp.layers.{layer}."
        keys += [p + leaf for leaf in (
            "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
            "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
            "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate.weight",
            "mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight",
            "mlp.shared_expert.down_proj.weight", "mlp.shared_expert_gate.weight")]
        keys += [f"{p}mlp.experts.{e}.{proj}.weight" for e in range(config.num_experts)
                 for proj in ("gate_proj", "up_proj", "down_proj")]
    return keys


def _write_qwen35_moe_layout(directory: Path, preset: str) -> Path:
    from bridge_ext.hf_keys import hf_checkpoint_keys

    config = qwen35_moe_config(preset)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    _write_key_index(directory, list(hf_checkpoint_keys(config, expert_layout="fused")) + _mtp_keys(config))
    return directory


def qwen3_moe_config(preset: str):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**_fields(preset), tie_word_embeddings=False, dtype="bfloat16",
                          architectures=["Qwen3MoeForCausalLM"])


def _write_qwen3_moe_layout(directory: Path, preset: str) -> Path:
    from bridge_ext.hf_keys import hf_checkpoint_keys

    config = qwen3_moe_config(preset)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    _write_key_index(directory, list(hf_checkpoint_keys(config, expert_layout="per_expert")))
    return directory


def _write_key_index(directory: Path, names: list[str]) -> None:
    """A ``model.safetensors.index.json`` naming ``names``; the file it points to is never written."""
    index = {"metadata": {"note": "layout only: no weight file is written"},
             "weight_map": {name: "model-not-written.safetensors" for name in names}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def hf_dir_for(preset: str, tied: bool, given: Path | None) -> Path:
    import tempfile

    return given or Path(tempfile.gettempdir()) / f"bridge_ext_bench_{preset}{'' if tied else '_untied'}"


# -- parallel state ----------------------------------------------------------------------------
def init_parallel(device: str, tp: int = 1, pp: int = 1, vpp: int | None = None, ep: int = 1):
    """torch.distributed (gloo on CPU, NCCL on GPU) and Megatron's parallel state."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as megatron_random

    from bridge_ext_testing.distributed import megatron_parallel

    if device == "cpu":
        return megatron_parallel(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline=vpp,
                                 expert_parallel=ep, expert_tensor_parallel=None)
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl", rank=int(os.environ.get("RANK", "0")),
                            world_size=int(os.environ.get("WORLD_SIZE", "1")))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, expert_model_parallel_size=ep)
    megatron_random.model_parallel_cuda_manual_seed(0)
    return nullcontext()


# -- the Megatron model ----------------------------------------------------------------------
def build(hf_dir: Path, preset: str, device: str, sizes: dict, lora_rank: int,
          dtype: torch.dtype = torch.bfloat16) -> tuple[list, object]:
    """``(chunks, bridge)``: the preset's Megatron model in ``dtype`` on ``device`` with LoRA."""
    if family(preset) == "qwen3":
        chunks, bridge = _build_qwen3(hf_dir, device, sizes, lora_rank, dtype)
    else:
        targets = QWEN3_LORA_TARGETS if family(preset) == "qwen3_moe" else QWEN35_LORA_TARGETS
        chunks, bridge = _build_moe(hf_dir, device, sizes, lora_rank, dtype, targets)
    with torch.no_grad():  # LoRA B starts at zero: make merges real, with values that differ
        for chunk in chunks:  # between pipeline stages and expert ranks (local names repeat there)
            for name, param in chunk.named_parameters():
                if name.endswith("linear_out.weight"):
                    generator = torch.Generator(device=param.device).manual_seed(zlib.crc32(
                        f"{_rank_in('pipeline')}/{_rank_in('expert')}/{name}".encode()))
                    param.normal_(std=0.01, generator=generator)
    return list(chunks), bridge


def _rank_in(kind: str) -> int:
    """This rank's pipeline or expert-parallel rank (0 outside a parallel job)."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        return 0
    if kind == "pipeline":
        return parallel_state.get_pipeline_model_parallel_rank()
    return parallel_state.get_expert_model_parallel_rank()


def _cpu_tensor_cuda(device: str):
    """On CPU: Megatron-Bridge's TP loading and the MTP / last stage's embedding copy call
    ``.cuda()``; the tensor stays where it is."""
    return mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self) if device == "cpu" else nullcontext()


def _build_qwen3(hf_dir: Path, device: str, sizes: dict, lora_rank: int, dtype: torch.dtype):
    from megatron.bridge import AutoBridge
    from megatron.bridge.peft.lora import LoRA
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from bridge_ext_testing.qwen35 import cpu_current_device

    bridge = AutoBridge.from_hf_pretrained(str(hf_dir))
    provider = bridge.to_megatron_provider(load_weights=False)
    provider.transformer_layer_spec = get_gpt_layer_local_spec(qk_layernorm=True)
    provider.apply_rope_fusion = provider.persist_layer_norm = provider.gradient_accumulation_fusion = False
    provider.masked_softmax_fusion = False
    provider.params_dtype, provider.bf16 = dtype, dtype == torch.bfloat16
    for key, value in sizes.items():
        setattr(provider, key, value)
    lora = LoRA(target_modules=list(QWEN3_LORA_TARGETS), dim=lora_rank, alpha=2 * lora_rank)
    provider.register_pre_wrap_hook(lambda chunks: lora(chunks, training=True))
    provider.finalize()
    with cpu_current_device(), _cpu_tensor_cuda(device):
        chunks = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=device == "cpu")
        bridge.load_hf_weights(chunks)
    return chunks, bridge


def _build_moe(hf_dir: Path, device: str, sizes: dict, lora_rank: int, dtype: torch.dtype,
               lora_targets: tuple[str, ...]):
    """Through :func:`bridge_ext_testing.build.build_megatron_model` with the layout's sizes (the
    MoE families: LoRA on ``linear_fc1`` / ``linear_fc2`` includes the routed experts)."""
    from megatron.bridge import AutoBridge

    from bridge_ext_testing.build import LoraSettings, build_megatron_model

    to_provider = AutoBridge.to_megatron_provider

    def sized_provider(self, *args, **kwargs):
        provider = to_provider(self, *args, **kwargs)
        for key, value in sizes.items():
            setattr(provider, key, value)
        # fused kernels of Transformer Engine / apex (the bf16 softmax one is asked for in forward)
        provider.gradient_accumulation_fusion = provider.masked_softmax_fusion = False
        return provider

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(AutoBridge, "to_megatron_provider", sized_provider))
        stack.enter_context(_cpu_tensor_cuda(device))
        built = build_megatron_model(
            hf_dir, lora=LoraSettings(target_modules=lora_targets, dim=lora_rank, alpha=2 * lora_rank),
            load_weights=False, dtype=dtype, on_gpu=device == "cuda")
    with torch.no_grad():  # random norms (and GDN gates) where Megatron's init leaves constants;
        for chunk in built.chunks:  # seeded by name, so that tensor-parallel replicas agree
            for name, param in chunk.named_parameters():
                if ".adapter." not in name and param.dim() == 1:
                    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return built.chunks, built.bridge
