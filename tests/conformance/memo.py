"""Per-entry memos: what several checks of one entry read (exports, logits, saved folders), made once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Memo:
    """What several checks of one entry read, computed once (read only: no check changes it)."""

    exports: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)


def export(built, **options) -> dict[str, torch.Tensor]:
    """``export_hf_weights(built.chunks, **options)`` as a dict, computed once per entry."""
    from bridge_ext import export_hf_weights

    key = tuple(sorted(options.items()))
    if key not in built.memo.exports:
        built.memo.exports[key] = dict(export_hf_weights(built.chunks, **options))
    return built.memo.exports[key]


def once(built, key: str, compute):
    """``compute()`` once per entry."""
    if key not in built.memo.values:
        built.memo.values[key] = compute()
    return built.memo.values[key]


def reference(built) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """The entry's inputs and the Megatron model's own logits for them."""
    def compute():
        input_ids, extra = built.entry.inputs()
        return input_ids, extra, built.entry.forward(built, input_ids, extra)
    return once(built, "reference", compute)


def saved_folders(built) -> Path:
    """``save_hf_pretrained`` of the entry: ``model`` + ``adapter`` (PEFT), and ``merged``."""
    from bridge_ext import save_hf_pretrained

    def compute() -> Path:
        save_hf_pretrained(built.chunks, built.folder / "model", built.folder / "adapter")
        save_hf_pretrained(built.chunks, built.folder / "merged", merge=True)
        return built.folder
    return once(built, "saved", compute)


def load_hf(built, folder: Path):
    from bridge_ext.verify import load_hf_model

    return (built.entry.load_hf or load_hf_model)(folder)
