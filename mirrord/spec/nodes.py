"""Reading typed values out of YAML nodes, each problem reported at its node's FILE:LINE:COL.

`NodeReader` is the base of the spec's validator: it knows how to read a
mapping, a scalar, a string, a choice or a bounded integer from a node and
how to report what is wrong with it; what a spec must contain is validate.py's.
Problems are collected, not raised, so that one run reports every mistake.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import yaml

from .yaml_tree import STD_TAG, short_tag, show

_Node = yaml.Node
_STR, _NULL, _BOOL, _INT, _FLOAT = (STD_TAG + t for t in ("str", "null", "bool", "int", "float"))
_SCALAR_TAGS = frozenset({_STR, _NULL, _BOOL, _INT, _FLOAT})
_BOOLS: dict[str, bool] = dict(yaml.constructor.SafeConstructor.bool_values)
_CONSTRUCTOR = yaml.constructor.SafeConstructor()


class Bad:
    """A value that could not be read; the reason is already reported."""


BAD = Bad()


def close_matches(word: str, choices: Sequence[str]) -> list[str]:
    # difflib is imported for a mistake only: it stays out of a daemon's memory.
    import difflib

    return difflib.get_close_matches(word, choices, n=1, cutoff=0.6)


class NodeReader:
    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []
        self.positions: list[tuple[int, int]] = []

    # -- reporting ---------------------------------------------------------
    def err(self, node: Optional[_Node], message: str) -> None:
        if node is None:
            self.positions.append((1, 1))
            self.problems.append(f"{self.path}:1:1: {message}")
            return
        m = node.start_mark
        self.positions.append((m.line + 1, m.column + 1))
        self.problems.append(f"{self.path}:{m.line + 1}:{m.column + 1}: {message}")

    def sorted_problems(self) -> list[str]:
        """In file order, as an editor walks them; found order breaks ties."""
        order = sorted(range(len(self.problems)), key=lambda i: (self.positions[i], i))
        return [self.problems[i] for i in order]

    # -- node helpers ------------------------------------------------------
    def mapping(
        self, node: _Node, what: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()
    ) -> Optional[dict[str, tuple[_Node, _Node]]]:
        if not isinstance(node, yaml.MappingNode):
            self.err(node, f"{what} must be a mapping of keys to values")
            return None
        out: dict[str, tuple[_Node, _Node]] = {}
        for k, val in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else None
            if not isinstance(key, str):
                self.err(k, f"{what}: keys must be plain names")
                continue
            if key not in allowed:
                near = close_matches(key[:64], allowed)
                hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(allowed)}"
                self.err(k, f"{what}: unknown key '{show(key)}'{hint}")
                continue
            if key in out:
                self.err(k, f"{what}: key '{key}' given twice")
                continue
            out[key] = (k, val)
        for key in required:
            if key not in out:
                self.err(node, f"{what}: missing required key '{key}'")
        return out

    def scalar(self, node: _Node) -> Any:
        """A scalar's value (str, int, float, bool or None); other nodes as they are.

        `BAD` when the value cannot be read (already reported): a tag mirrord
        does not read, `!!int ""`, `!!bool maybe`, a number thousands of digits long.
        """
        if not isinstance(node, yaml.ScalarNode):
            return node
        tag, value = node.tag, node.value
        if tag == _STR:
            return value
        if tag == _NULL:
            return None
        if tag not in _SCALAR_TAGS:
            self.err(node, f"the tag {show(short_tag(tag))} is not supported; write the plain value")
            return BAD
        try:
            if tag == _BOOL:
                return _BOOLS[value.lower()]
            # int() reads any Unicode digit and the sexagesimal reading of
            # "1:2:3" multiplies: only short ASCII numerals are numbers.
            if not value.isascii() or len(value) > 32:
                raise ValueError("not a number of at most 32 ASCII characters")
            if tag == _INT:
                return _CONSTRUCTOR.construct_yaml_int(node)
            return _CONSTRUCTOR.construct_yaml_float(node)
        except (ValueError, KeyError, IndexError, TypeError, OverflowError) as e:
            why = f": {e}" if isinstance(e, ValueError) and "invalid literal" not in str(e) else ""
            self.err(node, f"cannot read '{show(value)}' as {short_tag(tag)}{why}")
            return BAD

    def string(self, node: _Node, what: str) -> Optional[str]:
        value = self.scalar(node)
        if value is BAD:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.err(node, f"{what} must be a string")
            return None
        return str(value)

    def choice(self, node: _Node, what: str, choices: tuple[str, ...]) -> Optional[str]:
        value = self.string(node, what)
        if value is None:
            return None
        if value not in choices:
            self.err(node, f"{what} must be one of {', '.join(choices)}, not '{show(value)}'")
            return None
        return value

    def items(self, node: _Node) -> list[_Node]:
        """A scalar or a list of scalars, as a list of nodes."""
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        return [node]

    def integer(self, node: _Node, what: str, low: int, high: int) -> Optional[int]:
        value = self.scalar(node)
        if value is BAD:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.err(node, f"{what} must be a whole number")
            return None
        if not low <= value <= high:
            self.err(node, f"{what} must be between {low} and {high}, not {show(value)}")
            return None
        return value
