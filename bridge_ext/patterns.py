"""Name patterns of the mapping tables: ``{name}`` stands for one integer.

``decoder.layers.{layer}.mlp.linear_fc1.weight`` matches ``decoder.layers.7.mlp.linear_fc1.weight``
with ``{"layer": "7"}``; :meth:`NamePattern.fill` puts such values into another pattern.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_WILDCARD = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class NamePattern:
    """A dotted parameter name with ``{name}`` wildcards, each matching one integer."""

    text: str
    _regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pieces = _WILDCARD.split(self.text)
        # split() alternates literal text and wildcard names: lit, name, lit, name, lit...
        regex = "".join(
            re.escape(piece) if i % 2 == 0 else rf"(?P<{piece}>\d+)" for i, piece in enumerate(pieces)
        )
        object.__setattr__(self, "_regex", re.compile(regex + r"\Z"))

    @property
    def wildcards(self) -> tuple[str, ...]:
        return tuple(_WILDCARD.findall(self.text))

    def match(self, name: str) -> dict[str, str] | None:
        """The integers ``name`` holds at the pattern's wildcards, or None."""
        found = self._regex.match(name)
        return found.groupdict() if found else None

    def fill(self, values: dict[str, str | int]) -> str:
        """The pattern with each ``{name}`` replaced by ``values[name]``."""
        return _WILDCARD.sub(lambda wildcard: str(values[wildcard.group(1)]), self.text)
