"""A YAML parser error in one line (PyYAML's own text spans three or four, with source excerpts)."""

from __future__ import annotations

import yaml

from bridge_ext.errors import first_line


def yaml_problem(error: yaml.YAMLError) -> str:
    """E.g. ``did not find expected ',' or ']' at line 3, column 4 (while parsing a flow sequence from line 2,
    column 6)``: the problem, where it is, and what the parser was doing (from where, if elsewhere)."""
    if not isinstance(error, yaml.MarkedYAMLError) or not error.problem:
        return first_line(error)
    text = f"{error.problem}{_at(error.problem_mark)}"
    if error.context:
        elsewhere = _place(error.context_mark) != _place(error.problem_mark)
        text += f" ({error.context}{_at(error.context_mark, 'from') if elsewhere else ''})"
    return " ".join(text.split())


def _at(mark: yaml.Mark | None, word: str = "at") -> str:
    return f" {word} line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _place(mark: yaml.Mark | None) -> tuple[int, int] | None:
    return (mark.line, mark.column) if mark is not None else None
