"""Shared fixtures: tiny Hugging Face models and the Megatron models built from them."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

import bridge_ext  # noqa: F401  (makes megatron importable without Transformer Engine)

# The test-support package (testing/bridge_ext_testing) is installed by scripts/install.sh; in a
# checkout where it is not, the tests and the processes they start find it in testing/.
if importlib.util.find_spec("bridge_ext_testing") is None:
    TESTING = str(Path(__file__).resolve().parents[1] / "testing")
    sys.path.insert(0, TESTING)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTING, os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="module")
def megatron_cpu():
    """Megatron parallel state on gloo for one test module (tensor/pipeline size 1)."""
    from bridge_ext_testing.distributed import megatron_parallel

    with megatron_parallel():
        yield
