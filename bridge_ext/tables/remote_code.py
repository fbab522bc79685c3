"""Repairs of remote-code Hugging Face models that transformers 5.23 loads incompletely.

A table names one as its ``repair_hf_model`` (:func:`bridge_ext.verify.load_hf_model` runs it
after ``from_pretrained``); each restores what the class's own ``__init__`` computes, never other
arithmetic. Which model types need which: :data:`bridge_ext.tables.architecture_notes.HF_LOAD_REPAIRS`.
"""

from __future__ import annotations

import torch


def recompute_rotary_buffers(model: torch.nn.Module) -> None:
    """Recompute every rotary embedding's ``inv_freq`` with the module's own ``rope_init_fn``.

    transformers 5.23 builds a model on the meta device and materialises non-persistent buffers
    only through ``_init_weights``; a v4-era remote-code ``_init_weights`` (Ling 2.0's) does not
    know the rotary buffer, which is left as uninitialised memory.
    """
    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor) and callable(getattr(module, "rope_init_fn", None)):
            inv_freq, attention_scaling = module.rope_init_fn(module.config, module.inv_freq.device)
            module.register_buffer("inv_freq", inv_freq, persistent=False)
            module.original_inv_freq = inv_freq
            module.attention_scaling = attention_scaling
