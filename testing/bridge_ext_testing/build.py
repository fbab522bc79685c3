"""Build a Megatron-Core model from a Hugging Face folder through Megatron-Bridge, on CPU.

Support for the demo and the tests, not the exporter. Call inside
:func:`bridge_ext_testing.distributed.megatron_parallel`. Qwen3.5 and Qwen3-Next are built with the
local specs of :mod:`bridge_ext_testing.qwen35` (inside its scoped build context), other models (Qwen3,
Llama...) with megatron-core's local GPT spec. docs/cpu_models.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass(frozen=True)
class LoraSettings:
    """Megatron-Bridge PEFT settings: ``kind`` ``"lora"`` (``megatron.bridge.peft.lora.LoRA``),
    ``"dora"`` (``megatron.bridge.peft.dora.DoRA``) or ``"canonical_lora"``
    (``megatron.bridge.peft.canonical_lora.CanonicalLoRA``, on its own default targets when
    ``target_modules`` is empty or LoRA's default)."""

    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    dim: int = 4
    alpha: int = 8
    kind: str = "lora"
    #: further ``LoRA`` fields, e.g. ``(("normalize_moe_lora", True),)``
    options: tuple[tuple[str, object], ...] = ()

    def peft(self):
        """The Megatron-Bridge PEFT object these settings describe."""
        if self.kind == "dora":
            from megatron.bridge.peft.dora import DoRA

            return DoRA(target_modules=list(self.target_modules), dim=self.dim, alpha=self.alpha, **dict(self.options))
        if self.kind == "canonical_lora":
            from megatron.bridge.peft.canonical_lora import CanonicalLoRA

            targets = {} if self.target_modules in (DEFAULT_LORA_TARGETS, ()) else {
                "target_modules": list(self.target_modules)}
            return CanonicalLoRA(**targets, dim=self.dim, alpha=self.alpha, **dict(self.options))
        from megatron.bridge.peft.lora import LoRA

        return LoRA(target_modules=list(self.target_modules), dim=self.dim, alpha=self.alpha, **dict(self.options))


@dataclass
class BuiltModel:
    """A Megatron model (list of virtual-pipeline chunks) and the bridge that made it."""

    chunks: list[torch.nn.Module]
    bridge: object
    provider: object
    lora: object | None = None
    hf_dir: Path = field(default_factory=Path)


def build_megatron_model(
    hf_dir: str | Path,
    *,
    lora: LoraSettings | None = None,
    load_weights: bool = True,
    dtype: torch.dtype = torch.float32,
    on_gpu: bool = False,
) -> BuiltModel:
    """Build the Megatron model of ``hf_dir`` with local (non-TE) layers, load its weights.

    With ``lora`` the model is wrapped by Megatron-Bridge LoRA (A, B initialised by it).
    ``on_gpu``: initialise the parameters on the current CUDA device (the GPU benchmark's
    models are too large to initialise on the CPU and copy).
    """
    from contextlib import nullcontext

    from megatron.bridge import AutoBridge
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from bridge_ext_testing import gpt_families, local_specs, omni, qwen3_asr, qwen3_vl, qwen35, tiny_generated

    is_qwen35 = qwen35.is_qwen35(hf_dir)
    model_type = qwen35.hf_model_type(hf_dir)
    if model_type == "qwen2_moe":
        import bridge_ext_testing.qwen2_moe_bridge  # noqa: F401  (registers the bridge Megatron-Bridge lacks)
    is_qwen3_vl = model_type in qwen3_vl.MODEL_TYPES
    is_omni = model_type in omni.PROVIDER_MODULES
    is_gpt_family = gpt_families.is_gpt_family(hf_dir) and not is_omni
    bridge_cls = qwen35.qwen35_auto_bridge_class() if is_qwen35 or is_qwen3_vl or is_gpt_family else AutoBridge
    if model_type == qwen3_asr.MODEL_TYPE:  # Megatron-Bridge reads the remote-code spelling only
        bridge = qwen3_asr.bridge_of(hf_dir)
    else:
        bridge = bridge_cls.from_hf_pretrained(str(hf_dir))
    gpt_families.restore_rotary_fraction(bridge, model_type)
    provider = bridge.to_megatron_provider(load_weights=False)
    if model_type == qwen3_asr.MODEL_TYPE:  # exports read transformers' config (as a user passes hf_config=)
        provider.hf_model_id = str(hf_dir)
    if model_type == "qwen2_5_vl":
        provider.mrope_section = qwen3_vl.qwen2_5_vl_mrope_section(hf_dir)
    if is_qwen3_vl:
        qwen3_vl.configure_provider(provider)
    elif is_omni:
        omni.configure_provider(provider)
    elif is_qwen35:
        qwen35.configure_provider(provider)
        rotary_percent = qwen35.qwen3_next_rotary_percent(hf_dir)
        if rotary_percent is not None:  # see qwen35.qwen3_next_rotary_percent
            provider.rotary_percent = rotary_percent
    elif is_gpt_family:
        original_spec = getattr(provider, "transformer_layer_spec", None)  # hybrid (Mamba) providers have none
        gpt_families.configure_provider(provider, hf_dir)
        if model_type in tiny_generated.TINY:
            local_specs.configure_provider(provider, original_spec)
    else:
        if getattr(provider, "num_moe_experts", None):
            qwen35._prepare_config(provider)  # sequential experts, allgather dispatcher, no fusions
        provider.transformer_layer_spec = get_gpt_layer_local_spec(
            num_experts=getattr(provider, "num_moe_experts", None),
            qk_layernorm=bool(getattr(provider, "qk_layernorm", False)),
        )
    # Fused kernels of Transformer Engine / Apex that some providers (Llama) ask for.
    provider.apply_rope_fusion = False
    provider.persist_layer_norm = False
    provider.params_dtype = dtype
    provider.bf16 = dtype == torch.bfloat16
    provider.fp16 = dtype == torch.float16
    lora_module = None
    if lora is not None:
        lora_module = lora.peft()
        provider.register_pre_wrap_hook(lambda chunks: lora_module(chunks, training=True))
    provider.finalize()
    if is_qwen3_vl:  # its finalize turns sequence parallelism on at TP > 1; torch norms refuse it
        provider.sequence_parallel = False
    if is_qwen3_vl:
        build_context = qwen3_vl.cpu_build_context(provider)
    elif is_omni:
        build_context = omni.cpu_build_context(model_type)
    elif is_qwen35:
        build_context = qwen35.cpu_build_context(provider)
    elif is_gpt_family:
        build_context = gpt_families.cpu_build_context(provider)
    elif model_type == "qwen2_5_vl":  # its language model asks torch.cuda for the rotary device
        build_context = qwen35.cpu_current_device()
    else:
        build_context = nullcontext()
    with build_context:
        chunks = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=not on_gpu)
        if load_weights:
            if is_qwen35 or is_gpt_family:
                missing = qwen35.unmapped_parameters(bridge, chunks)
                if missing:
                    raise RuntimeError(
                        f"Megatron-Bridge has no weight mapping for {len(missing)} parameter(s) of this "
                        f"{qwen35.hf_model_type(hf_dir)} model, so it cannot load {hf_dir}: "
                        f"{', '.join(missing)}. (Use load_weights=False to build it without weights.)"
                    )
            bridge.load_hf_weights(chunks)
    return BuiltModel(chunks=list(chunks), bridge=bridge, provider=provider, lora=lora_module, hf_dir=Path(hf_dir))


def randomize_lora(chunks: list[torch.nn.Module], seed: int = 0, std: float = 0.05) -> None:
    """Give every LoRA A and B random non-zero values (B starts at zero after init), and every
    DoRA magnitude random positive values (DoRA initialises it to the row norms of the weights
    it wraps; those are random before the Hugging Face weights are loaded)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                if name.endswith(".adapter.weight_magnitude"):
                    param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
                elif ".adapter." in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
