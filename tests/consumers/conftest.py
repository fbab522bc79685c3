"""The consumer tier: bridge_ext's exports judged by vLLM's own loaders (docs/consumers.md).

vLLM pins torch and transformers versions that differ from ours, so it lives in its own
environment, ``.venv-consumers`` (``bash scripts/install.sh --consumers``). Without it these
tests skip, naming that command; with ``BRIDGE_EXT_REQUIRE_CONSUMERS=1`` (what ``.ci/run``
sets) they fail instead, so the tier cannot rot unseen.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import bridge_ext  # noqa: F401  (before megatron: works around TE / Triton imports)

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

INSTALL = "bash scripts/install.sh --consumers"


@pytest.fixture(scope="session")
def consumer_python() -> Path:
    """The consumer environment's Python (``BRIDGE_EXT_CONSUMERS_PYTHON`` overrides it)."""
    python = Path(os.environ.get("BRIDGE_EXT_CONSUMERS_PYTHON", ROOT / ".venv-consumers" / "bin" / "python"))
    if not python.is_file():
        message = f"no vLLM consumer environment at {python}: run `{INSTALL}`"
        if os.environ.get("BRIDGE_EXT_REQUIRE_CONSUMERS") == "1":
            pytest.fail(message + " (BRIDGE_EXT_REQUIRE_CONSUMERS=1)")
        pytest.skip(message)
    return python
