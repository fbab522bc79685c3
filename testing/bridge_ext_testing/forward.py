"""Run a Megatron-Core model's own forward on CPU and return its logits (demo and tests support).

:func:`megatron_logits` calls the model chunk's ``forward`` (``GPTModel`` or Megatron-Bridge's
``Qwen3VLModel``) in eval mode without gradients, with what a CPU needs:

* an explicit causal attention mask (``[1, 1, T, T]`` bool, True = masked): megatron-core's
  local attention otherwise builds its default causal mask on ``"cuda"``;
* :func:`bridge_ext_testing.qwen35.cpu_current_device`: megatron-core calls
  ``torch.cuda.current_device()`` during forward (rotary ``inv_freq``, the MoE router weight,
  Qwen3-VL's vision rotary) - on CPU machines it answers the CPU device inside the call;
* the fla stand-ins for Gated DeltaNet layers inside the call
  (:func:`bridge_ext_testing.fla_torch.gdn_torch_kernels`, only when the real fla is not importable);
* ``runtime_gather_output=True`` so tensor-parallel logits come back whole.

Single-stage models only (one chunk holding embedding and output layer).
"""

from __future__ import annotations

import inspect

import torch

from bridge_ext_testing import fla_torch
from bridge_ext_testing.qwen35 import cpu_current_device


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def causal_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[1, 1, T, T]`` bool mask, True above the diagonal (positions a token may not attend to)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)[None, None]


@torch.no_grad()
def megatron_logits(
    chunks: list[torch.nn.Module] | torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    vocab_size: int | None = None,
    **vision_inputs,
) -> torch.Tensor:
    """Logits ``[B, T, V]`` of a Megatron model for ``input_ids`` ``[B, T]``, V = HF vocab size.

    Args:
        chunks: the model (``BuiltModel.chunks`` or one module); exactly one chunk.
        input_ids: token ids ``[B, T]``.
        vocab_size: columns to keep (default: the model config's ``vocab_size``, i.e. the HF
            vocabulary; padding rows of the embedding are dropped).
        **vision_inputs: for Qwen3.5 VL models, ``pixel_values`` ``[patches, C*t*p*p]`` and
            ``image_grid_thw`` ``[images, 3]`` (also ``pixel_values_videos`` /
            ``video_grid_thw``), passed to ``Qwen3VLModel.forward`` as is; it computes the
            MRoPE positions itself from ``input_ids`` and the grids.

    Returns:
        fp32 logits ``[B, T, V]`` on the CPU.
    """
    if isinstance(chunks, torch.nn.Module):
        chunks = [chunks]
    if len(chunks) != 1:
        raise NotImplementedError(f"megatron_logits runs single-chunk models, got {len(chunks)} chunks")
    model = chunks[0]
    inner = _unwrap(model)
    if not (getattr(inner, "pre_process", True) and getattr(inner, "post_process", True)):
        raise NotImplementedError("megatron_logits needs a model with both embedding and output layer")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    batch, seq_len = input_ids.shape
    is_vl = hasattr(inner, "vision_model") and hasattr(inner, "language_model")
    was_training = model.training
    model.eval()
    try:
        with cpu_current_device(), fla_torch.gdn_torch_kernels():
            if is_vl:
                kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vision_inputs.items()}
                output = model(
                    input_ids=input_ids,
                    attention_mask=causal_mask(seq_len, device),
                    runtime_gather_output=True,
                    **kwargs,
                )
            else:
                if vision_inputs:
                    raise TypeError(f"not a vision-language model; unexpected inputs {sorted(vision_inputs)}")
                position_ids = torch.arange(seq_len, device=device).unsqueeze(0).expand(batch, -1)
                # a multimodal model that asks each token's modality (GLM-4.5V: its MRoPE positions): all text
                types = ({"mm_token_type_ids": torch.zeros_like(input_ids)}
                         if "mm_token_type_ids" in inspect.signature(inner.forward).parameters else {})
                output = model(
                    input_ids=input_ids,
                    position_ids=position_ids,
                    attention_mask=causal_mask(seq_len, device),
                    runtime_gather_output=True,
                    **types,
                )
    finally:
        model.train(was_training)
    logits = output[0] if isinstance(output, tuple) else output
    if tuple(logits.shape[:2]) != (batch, seq_len):
        raise RuntimeError(f"expected logits [{batch}, {seq_len}, V], got {tuple(logits.shape)}")
    config = getattr(inner, "config", None)
    vocab = vocab_size or getattr(config, "vocab_size", None) or logits.shape[-1]
    return logits[..., :vocab].float().contiguous()
