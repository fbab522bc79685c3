"""Name patterns of the mapping tables: ``{name}`` stands for one integer.

``decoder.layers.{layer}.mlp.linear_fc1.weight`` matches ``decoder.layers.7.mlp.linear_fc1.weight``
with ``{"layer": "7"}``; :meth:`NamePattern.fill` puts such values into another pattern.
``{name+N}`` stands for the value plus ``N``: ``model.layers.{depth+61}`` names MTP depth 0
``model.layers.61`` (tables built from a config put the config's number there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_WILDCARD = re.compile(r"\{(\w+)(?:\+(\d+))?\}")


@dataclass(frozen=True)
class NamePattern:
    """A dotted parameter name with ``{name}`` / ``{name+N}`` wildcards, each one integer."""

    text: str
    _regex: re.Pattern = field(init=False, repr=False, compare=False)
    _offsets: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pieces = _WILDCARD.split(self.text)
        # split() gives literal, name, offset, literal, name, offset, ..., literal
        regex, offsets = [], {}
        for i in range(0, len(pieces), 3):
            regex.append(re.escape(pieces[i]))
            if i + 1 < len(pieces):
                regex.append(rf"(?P<{pieces[i + 1]}>\d+)")
                offsets[pieces[i + 1]] = int(pieces[i + 2] or 0)
        object.__setattr__(self, "_regex", re.compile("".join(regex) + r"\Z"))
        object.__setattr__(self, "_offsets", offsets)

    @property
    def wildcards(self) -> tuple[str, ...]:
        return tuple(name for name, _ in _WILDCARD.findall(self.text))

    def match(self, name: str) -> dict[str, str] | None:
        """The integers ``name`` holds at the pattern's wildcards (offsets taken off), or None."""
        found = self._regex.match(name)
        if found is None:
            return None
        values = {key: int(value) - self._offsets[key] for key, value in found.groupdict().items()}
        if any(value < 0 for value in values.values()):
            return None
        return {key: str(value) for key, value in values.items()}

    def fill(self, values: dict[str, str | int]) -> str:
        """The pattern with each ``{name}`` replaced by ``values[name]`` (plus its offset)."""
        return _WILDCARD.sub(lambda wildcard: str(int(values[wildcard.group(1)]) + int(wildcard.group(2) or 0)),
                             self.text)
