"""The CPU builder's patches hold inside its blocks only (the autouse fixture checks every test after)."""

from __future__ import annotations

import torch

from bridge_ext.cpu import fla_torch
from bridge_ext.cpu.qwen35 import cpu_build_context


def test_build_context_rebinds_then_restores(bindings):
    before = bindings()
    assert len(before) == 19  # every name of REBOUND exists in the installed versions
    with cpu_build_context():  # no provider: the vision-language replacements are made too
        inside = bindings()
        if not torch.cuda.is_available():
            assert torch.cuda.current_device() == torch.device("cpu")
    expected = {name for name in before
                if not (torch.cuda.is_available() and name.startswith("torch.cuda."))
                and not (fla_torch.real_fla_available() and ".gated_delta_net" in name)}
    assert {name for name in before if inside[name] is not before[name]} == expected
    after = bindings()
    assert {name for name in before if after[name] is not before[name]} == set()
