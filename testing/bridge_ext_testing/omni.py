"""Megatron-Bridge's Qwen2.5-Omni / Qwen3-Omni-MoE / Qwen3-ASR thinkers on CPU, with local (non-TE) specs.

Their providers' ``provide`` build the language model from megatron-core's Transformer Engine
layer spec; inside :func:`cpu_build_context` that function returns megatron-core's local GPT
spec (:func:`bridge_ext_testing.qwen3_vl.local_language_spec`). The audio and vision towers are
Hugging Face's own modules and need nothing. Supports the CPU tests; the exporter does not use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from bridge_ext_testing import qwen35, qwen3_vl

#: model_type -> the provider module whose spec function is replaced
PROVIDER_MODULES = {
    "qwen2_5_omni": "megatron.bridge.models.qwen_omni.qwen25_omni_provider",
    "qwen3_omni_moe": "megatron.bridge.models.qwen_omni.qwen3_omni_provider",
    "qwen3_asr": "megatron.bridge.models.qwen3_asr.qwen3_asr_provider",
}


def configure_provider(provider) -> None:
    """CPU settings before ``finalize()``."""
    qwen35._prepare_config(provider)


@contextmanager
def cpu_build_context(model_type: str) -> Iterator[None]:
    with ExitStack() as stack:
        stack.enter_context(qwen35.cpu_current_device())
        stack.enter_context(qwen35._replaced(PROVIDER_MODULES[model_type],
                                             get_gpt_layer_with_transformer_engine_spec=qwen3_vl.local_language_spec))
        yield
