"""Megatron-Bridge's Qwen3-VL / Qwen3-VL-MoE (and Qwen2.5-VL) models on CPU, with local (non-TE) specs.

``Qwen3VLModelProvider`` / ``Qwen3VLMoEModelProvider.provide`` build the language model from
megatron-core's Transformer Engine layer spec and ``Qwen3VLModel`` its vision tower and patch
mergers from TE classes. Inside :func:`cpu_build_context` the language spec function the
providers call returns megatron-core's local GPT spec instead (sequential experts) and the
vision tower is built from the local ViT spec (:func:`bridge_ext_testing.qwen35.local_vit_layer_spec`,
as for Qwen3.5, which reuses ``Qwen3VLModel``); everything else of the bridges stays as it is.
Supports the CPU demo and tests; the exporter does not use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from bridge_ext_testing import qwen35

MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")


def local_language_spec(num_experts=None, moe_grouped_gemm=False, qk_layernorm=False, **unused):
    """megatron-core's local GPT layer spec in place of the TE one the providers ask for."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=qk_layernorm)


def configure_provider(provider) -> None:
    """CPU settings (see :func:`bridge_ext_testing.qwen35.configure_provider`) before ``finalize()``."""
    qwen35._prepare_config(provider)


@contextmanager
def cpu_build_context(provider=None) -> Iterator[None]:
    """Scope in which a configured Qwen3-VL provider's ``provide*`` builds the local model."""
    with ExitStack() as stack:
        stack.enter_context(qwen35.cpu_current_device())
        stack.enter_context(qwen35._replaced("megatron.bridge.models.qwen_vl.qwen3_vl_provider",
                                             get_gpt_layer_with_transformer_engine_spec=local_language_spec))
        stack.enter_context(qwen35._vision_overrides())
        yield


def qwen2_5_vl_mrope_section(hf_dir) -> list[int]:
    """The MRoPE sections of a ``qwen2_5_vl`` folder's text config.

    Megatron-Bridge 0.6.2's ``Qwen25VLBridge`` never reads them and keeps its default
    ``[16, 24, 24]`` (the released models' head_dim 128); any other head size fails in the
    rotary split.
    """
    import json
    from pathlib import Path

    config = json.loads((Path(hf_dir) / "config.json").read_text())
    text = config.get("text_config", config)
    rope = text.get("rope_parameters") or text.get("rope_scaling") or config.get("rope_scaling") or {}
    return list(rope["mrope_section"])
