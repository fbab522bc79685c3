"""Shared fixtures: tiny Hugging Face models and the Megatron models built from them."""

from __future__ import annotations

import pytest

import bridge_ext  # noqa: F401  (makes megatron importable without Transformer Engine)


@pytest.fixture(scope="module")
def megatron_cpu():
    """Megatron parallel state on gloo for one test module (tensor/pipeline size 1)."""
    from bridge_ext.cpu.distributed import megatron_parallel

    with megatron_parallel():
        yield
