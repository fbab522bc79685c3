"""Name patterns of the mapping tables: ``{name}`` stands for one integer.

``decoder.layers.{layer}.mlp.linear_fc1.weight`` matches ``decoder.layers.7.mlp.linear_fc1.weight``
with ``{"layer": "7"}``; :meth:`NamePattern.fill` puts such values into another pattern.
``{name+N}`` stands for the value plus ``N``: ``model.layers.{depth+61}`` names MTP depth 0
``model.layers.61`` (tables built from a config put the config's number there).
``{name+field}`` is a named offset: the value plus the config's ``field``, put there by
:meth:`NamePattern.resolved` (``MappingTable.config_offsets``: a second pool of experts numbered
after the first's, ``experts.{expert+moe_num_experts}``); matching or filling an unresolved one
raises ``TableError``.
``{name=pre|post|res}`` stands for one of the listed words; its value is the word's position
(``alpha_post`` gives ``{"name": "1"}``), so a rule can stack differently named parameters in
the listed order (DeepSeek-V4's three hyper-connection scalars are one Hugging Face tensor).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from bridge_ext.errors import TableError

_WILDCARD = re.compile(r"\{(\w+)(?:\+(\d+|[A-Za-z_]\w*)|=(\w+(?:\|\w+)+))?\}")


@dataclass(frozen=True)
class NamePattern:
    """A dotted parameter name with ``{name}`` / ``{name+N}`` wildcards, each one integer, and
    ``{name=a|b}`` ones, each one of the listed words (its value is the word's position)."""

    text: str
    _regex: re.Pattern = field(init=False, repr=False, compare=False)
    _offsets: dict[str, int | str] = field(init=False, repr=False, compare=False)
    _words: dict[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)
    _unresolved: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pieces = _WILDCARD.split(self.text)
        # split() gives literal, name, offset, words, literal, name, offset, words, ..., literal
        regex, offsets, words = [], {}, {}
        for i in range(0, len(pieces), 4):
            regex.append(re.escape(pieces[i]))
            if i + 1 < len(pieces):
                name = pieces[i + 1]
                if pieces[i + 3]:
                    words[name] = tuple(pieces[i + 3].split("|"))
                    regex.append(f"(?P<{name}>{'|'.join(map(re.escape, words[name]))})")
                else:
                    regex.append(rf"(?P<{name}>\d+)")
                offset = pieces[i + 2] or "0"
                offsets[name] = int(offset) if offset.isdigit() else offset
        object.__setattr__(self, "_regex", re.compile("".join(regex) + r"\Z"))
        object.__setattr__(self, "_offsets", offsets)
        object.__setattr__(self, "_unresolved", any(isinstance(offset, str) for offset in offsets.values()))
        object.__setattr__(self, "_words", words)

    @property
    def wildcards(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in _WILDCARD.findall(self.text))

    @property
    def named_offsets(self) -> tuple[str, ...]:
        """The config fields of its unresolved ``{name+field}`` offsets."""
        return tuple(offset for offset in self._offsets.values() if isinstance(offset, str))

    def resolved(self, values: Mapping[str, int]) -> NamePattern:
        """The pattern with each named offset ``{name+field}`` as ``{name+values[field]}``."""
        def number(wildcard: re.Match) -> str:
            offset = wildcard.group(2)
            if offset is None or offset.isdigit():
                return wildcard.group(0)
            return "{" + wildcard.group(1) + "+" + str(values[offset]) + "}"

        return NamePattern(_WILDCARD.sub(number, self.text))

    def _check_resolved(self) -> None:
        if self._unresolved:
            raise TableError(f"{self.text}: the offset {self.named_offsets[0]} is read from the config "
                             "(resolve the table with the model's config)")

    def match(self, name: str) -> dict[str, str] | None:
        """The integers ``name`` holds at the pattern's wildcards (offsets taken off), or None."""
        self._check_resolved()
        found = self._regex.match(name)
        if found is None:
            return None
        values = {key: self._words[key].index(value) if key in self._words else int(value) - self._offsets[key]
                  for key, value in found.groupdict().items()}
        if any(value < 0 for value in values.values()):
            return None
        return {key: str(value) for key, value in values.items()}

    def fill(self, values: dict[str, str | int]) -> str:
        """The pattern with each ``{name}`` replaced by ``values[name]`` (plus its offset)."""
        self._check_resolved()
        def value(wildcard: re.Match) -> str:
            number = int(values[wildcard.group(1)])
            if wildcard.group(3):
                return wildcard.group(3).split("|")[number]
            return str(number + int(wildcard.group(2) or 0))

        return _WILDCARD.sub(value, self.text)
