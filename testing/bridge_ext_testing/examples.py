"""The demo's example models: tiny random Hugging Face models and the LoRA targets to wrap.

Support for ``bridge-ext demo`` and the tests, not the exporter.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def _tiny_dense(directory: Path) -> tuple[Path, tuple[str, ...]]:
    from bridge_ext_testing.build import DEFAULT_LORA_TARGETS
    from bridge_ext_testing.tiny_dense import tiny_dense

    return tiny_dense(directory, "qwen3"), DEFAULT_LORA_TARGETS


QWEN35_LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "in_proj", "out_proj")


def _tiny_qwen35_moe(directory: Path) -> tuple[Path, tuple[str, ...]]:
    from bridge_ext_testing.tiny_models import tiny_qwen35_moe

    return tiny_qwen35_moe(directory, mtp_layers=1), QWEN35_LORA_TARGETS


EXAMPLES: dict[str, Callable[[Path], tuple[Path, tuple[str, ...]]]] = {
    "qwen3.5-moe": _tiny_qwen35_moe,
    "qwen3": _tiny_dense,
}
DEFAULT_EXAMPLE = "qwen3.5-moe"
