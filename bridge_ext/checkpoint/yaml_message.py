"""A YAML parser error in one line (PyYAML's own text spans three or four, with source excerpts)."""

from __future__ import annotations

import yaml

from bridge_ext.errors import first_line


def yaml_problem(error: yaml.YAMLError) -> str:
    """``"expected ',' or ']', but got ':' at line 3, column 4 (while parsing a flow sequence from line 2, column 6)"``."""
    if not isinstance(error, yaml.MarkedYAMLError) or not error.problem:
        return first_line(error)
    text = f"{error.problem}{_at(error.problem_mark)}"
    if error.context:
        start = _at(error.context_mark, "from")
        start = "" if start.split()[1:] == _at(error.problem_mark).split()[1:] else start  # the same place
        text += f" ({error.context}{start})"
    return " ".join(text.split())


def _at(mark: yaml.Mark | None, word: str = "at") -> str:
    return f" {word} line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
