"""A live Megatron model (a module or a list of virtual-pipeline chunks) as a TensorSource.

Names are normalised: wrapper prefixes (``module.``) and Megatron-Bridge LoRA's ``to_wrap``
are removed; adapters (``<module>.adapter.linear_in/linear_out``) are listed by module.
"""

from __future__ import annotations

import torch

from bridge_ext.engine import ExportError
from bridge_ext.source import Adapter

LORA_IN, LORA_OUT = ".adapter.linear_in.weight", ".adapter.linear_out.weight"


def unwrap_chunks(model) -> list[torch.nn.Module]:
    """The model's chunks without DDP / Float16Module wrappers."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    unwrapped = []
    for chunk in chunks:
        while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
            chunk = chunk.module
        unwrapped.append(chunk)
    return unwrapped


def normalise(name: str) -> str:
    """``decoder.layers.0.mlp.linear_fc1.to_wrap.weight`` -> ``...linear_fc1.weight``."""
    while name.startswith("module."):
        name = name[len("module.") :]
    return name.replace(".to_wrap.", ".")


class LiveModelSource:
    """The parameters of a model held whole by this process (no tensor or pipeline split)."""

    def __init__(self, model):
        self.chunks = unwrap_chunks(model)
        self._params: dict[str, torch.Tensor] = {}
        self._adapters: dict[str, Adapter] = {}
        for chunk in self.chunks:
            modules = dict(chunk.named_modules())
            for raw_name, param in chunk.named_parameters():
                name = normalise(raw_name)
                if name in self._params:
                    raise ExportError(f"two parameters normalise to {name}")
                self._params[name] = param
                if name.endswith(LORA_IN):
                    module = name[: -len(LORA_IN)]
                    self._adapters[module] = _adapter(module, modules, raw_name[: -len(".linear_in.weight")])
                elif ".adapter." in name and not name.endswith(LORA_OUT):
                    raise ExportError(
                        f"{raw_name}: only LoRA adapters with one linear_in/linear_out pair per "
                        "module are supported (not CanonicalLoRA or DoRA)"
                    )

    def base_names(self) -> list[str]:
        return [name for name in self._params if ".adapter." not in name]

    def adapters(self) -> dict[str, Adapter]:
        return dict(self._adapters)

    def shards(self, name: str) -> list[torch.Tensor]:
        return [self._params[name].detach()]


def _adapter(module: str, modules: dict[str, torch.nn.Module], raw_adapter_path: str) -> Adapter:
    adapter = modules[raw_adapter_path]
    dropout = getattr(adapter, "dropout", None)
    return Adapter(
        module=module,
        lora_a=module + LORA_IN,
        lora_b=module + LORA_OUT,
        alpha=float(adapter.alpha),
        rank=int(adapter.dim),
        dropout=float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0,
    )
