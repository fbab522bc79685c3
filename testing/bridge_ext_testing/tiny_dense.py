"""Tiny dense Hugging Face models (Qwen3, Llama), saved for the demo and the tests."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_DENSE = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def tiny_dense(directory: str | Path, kind: str = "qwen3", *, tied: bool = False, seed: int = 0) -> Path:
    """Save a random tiny ``qwen3``, ``qwen2`` (biased q/k/v) or ``llama`` causal LM (fp32) to ``directory``.

    Norm weights are perturbed around 1 so that a mapping that mixes norms up shows.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    config_class = {"qwen3": Qwen3Config, "qwen2": Qwen2Config, "llama": LlamaConfig}[kind]
    config = config_class(**TINY_DENSE, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    directory = Path(directory)
    model.save_pretrained(directory)
    return directory
