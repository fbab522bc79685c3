"""Sizes of blocks only some architectures have, as tables state them (``MappingTable.sizes``).

Each names the config fields a block's sizes live in and gives the sizes its operations use
(:class:`bridge_ext.dims.Sizes`); a table lists the ones its rules need.
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge_ext.dims import text_config, vision_config
from bridge_ext.errors import TableError


@dataclass(frozen=True)
class MambaSizes:
    """Where a Mamba-2 mixer's sizes live in the (text) config, by field name; gives the sizes the
    mixer's splits name: ``mamba_inner`` (heads x head dim: ``x`` and ``z``), ``mamba_bc``
    (groups x state size: ``B`` and ``C``) and ``mamba_heads`` (``dt``, ``A``, ``D``)."""

    heads: str
    head_dim: str
    groups: str
    state_size: str

    def read(self, config) -> dict[str, int]:
        text = text_config(config)
        heads = getattr(text, self.heads, None)
        if not heads:  # a config without the mixer
            return {}
        return {"mamba_inner": heads * getattr(text, self.head_dim),
                "mamba_bc": getattr(text, self.groups) * getattr(text, self.state_size), "mamba_heads": heads}


@dataclass(frozen=True)
class GatedDeltaNetSizes:
    """Where a Gated DeltaNet's sizes live in the (text) config, by field name; gives ``gdn_qk_rows``,
    ``gdn_v_rows``, ``gdn_heads`` (value heads), ``gdn_key_head_dim``, ``gdn_v_heads_per_key_head``
    and ``gdn_v_rows_per_key_head``."""

    key_heads: str
    value_heads: str
    key_head_dim: str
    value_head_dim: str

    def read(self, config) -> dict[str, int]:
        text = text_config(config)
        key_heads, value_heads = getattr(text, self.key_heads, None), getattr(text, self.value_heads, None)
        if not value_heads:  # a config without the block
            return {}
        key_dim, value_dim = getattr(text, self.key_head_dim), getattr(text, self.value_head_dim)
        per_key_head = value_heads // key_heads
        return {"gdn_qk_rows": key_heads * key_dim, "gdn_v_rows": value_heads * value_dim, "gdn_heads": value_heads,
                "gdn_key_head_dim": key_dim, "gdn_v_heads_per_key_head": per_key_head,
                "gdn_v_rows_per_key_head": per_key_head * value_dim}


@dataclass(frozen=True)
class VisionSizes:
    """Where a vision tower's attention sizes live in ``vision_config``: ``heads`` names its head
    count field; gives ``vision_heads`` and ``vision_head_dim`` (hidden size / heads). A tower with
    grouped key / value heads names their count's field too (``key_value_heads``): it gives
    ``vision_query_groups`` and ``vision_q_rows_per_group`` (query rows per group of Megatron's
    ``linear_qkv``); without it every head is its own group. Nothing where the config has no
    vision tower (a text-only model of an image-text family)."""

    heads: str
    key_value_heads: str | None = None

    def read(self, config) -> dict[str, int]:
        vision = vision_config(config)
        heads = getattr(vision, self.heads, None) if vision is not None else None
        if not heads:
            return {}
        head_dim = vision.hidden_size // heads
        groups = getattr(vision, self.key_value_heads) if self.key_value_heads else heads
        return {"vision_heads": heads, "vision_head_dim": head_dim, "vision_query_groups": groups,
                "vision_q_rows_per_group": heads // groups * head_dim}


# Where Qwen3-Next / Qwen3.5 configs keep the Gated DeltaNet sizes
GATED_DELTANET_SIZES = GatedDeltaNetSizes(key_heads="linear_num_key_heads", value_heads="linear_num_value_heads",
                                          key_head_dim="linear_key_head_dim", value_head_dim="linear_value_head_dim")


@dataclass(frozen=True)
class LayerTypeSizes:
    """Sizes of the layers of one ``layer_types`` kind where transformers keeps them per layer
    (``per_layer_config``, transformers 5.15 and later: Gemma 4's global layers' head dim):
    ``sizes`` pairs a size name with the per-layer field. Every layer of the kind must agree
    (else refused); nothing where the config has no such layer."""

    layer_type: str
    sizes: tuple[tuple[str, str], ...]

    def read(self, config) -> dict[str, int]:
        text = text_config(config)
        layers = getattr(text, "per_layer_config", None) or ()
        chosen = [layer for layer, kind in zip(layers, getattr(text, "layer_types", None) or ()) if kind == self.layer_type]
        found: dict[str, int] = {}
        for name, field in self.sizes if chosen else ():
            values = sorted({getattr(layer, field) for layer in chosen})
            if len(values) != 1:
                raise TableError(f"the {self.layer_type} layers differ in {field} ({values}): one {name} expected")
            found[name] = values[0]
        return found
