"""The sizes that mapping operations need, read once from a Hugging Face config.

Operations name sizes (``"head_dim"``, ``"gdn_qk_rows"``...) instead of computing them, so a
table stays data. This module knows where the sizes every decoder has live in a config; a table
whose operations name sizes of a block only some architectures have states where its config keeps
them (``MappingTable.sizes``, e.g. :class:`bridge_ext.tables.sizes.MambaSizes`), and
:meth:`ModelDims.from_hf_config` reads them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol


def text_config(config) -> object:
    """The language-model part of a config (``text_config`` of multimodal configs; the thinker's
    of omni configs, as transformers' ``get_text_config`` finds it)."""
    found = getattr(config, "text_config", None)
    if found is None and hasattr(config, "get_text_config"):
        found = config.get_text_config()
    return found or config


def vision_config(config) -> object | None:
    return getattr(config, "vision_config", None)


class Sizes(Protocol):
    """Named sizes of one kind of block that a table's operations use, read from a config."""

    def read(self, config) -> dict[str, int]:
        """The sizes, from the model's whole Hugging Face ``config``."""


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
    def from_hf_config(cls, config, extra: Iterable[Sizes] = ()) -> ModelDims:
        """The sizes every decoder has, read from ``config``, and those of ``extra`` (a table's ``sizes``)."""
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
        for each in extra:
            sizes.update(each.read(config))
        return cls(sizes)
