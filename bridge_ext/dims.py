"""The sizes that mapping operations need, read once from a Hugging Face config.

Operations name sizes (``"head_dim"``, ``"gdn_qk_rows"``...) instead of computing them, so a
table stays data; this module is the one place that knows where each size lives in a config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


def text_config(config) -> object:
    """The language-model part of a config (``text_config`` of multimodal configs)."""
    return getattr(config, "text_config", None) or config


def vision_config(config) -> object | None:
    return getattr(config, "vision_config", None)


@dataclass(frozen=True)
class ModelDims:
    """Named integer sizes of one model; missing names raise a KeyError naming them."""

    sizes: Mapping[str, int]

    def __getitem__(self, name: str) -> int:
        try:
            return self.sizes[name]
        except KeyError:
            raise KeyError(f"the model's config does not define the size {name!r}") from None

    @classmethod
    def from_hf_config(cls, config) -> ModelDims:
        text = text_config(config)
        sizes: dict[str, int] = {"hidden_size": text.hidden_size, "vocab_size": text.vocab_size}
        heads = text.num_attention_heads
        groups = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        sizes.update(
            num_attention_heads=heads,
            num_query_groups=groups,
            head_dim=head_dim,
            q_rows_per_group=heads // groups * head_dim,
        )
        if getattr(text, "v_head_dim", None):  # value heads of their own width (MLA, MiMo-V2-Flash)
            sizes["v_head_dim"] = text.v_head_dim
        if getattr(text, "linear_num_value_heads", None):
            value_heads_per_key_head = text.linear_num_value_heads // text.linear_num_key_heads
            sizes.update(
                gdn_qk_rows=text.linear_num_key_heads * text.linear_key_head_dim,
                gdn_v_rows=text.linear_num_value_heads * text.linear_value_head_dim,
                gdn_heads=text.linear_num_value_heads,
                gdn_key_head_dim=text.linear_key_head_dim,
                gdn_v_heads_per_key_head=value_heads_per_key_head,
                gdn_v_rows_per_key_head=value_heads_per_key_head * text.linear_value_head_dim,
            )
        if getattr(text, "mamba_num_heads", None):  # Mamba-2 mixers (Nemotron-H)
            sizes.update(mamba_inner=text.mamba_num_heads * text.mamba_head_dim,
                         mamba_bc=text.n_groups * text.ssm_state_size, mamba_heads=text.mamba_num_heads)
        vision = vision_config(config)
        # Qwen's vision configs say num_heads, others (Kimi-K2.5's) num_attention_heads
        vision_heads = vision is not None and (getattr(vision, "num_heads", None)
                                               or getattr(vision, "num_attention_heads", None))
        if vision_heads:
            sizes.update(vision_heads=vision_heads, vision_head_dim=vision.hidden_size // vision_heads)
        return cls(sizes)
