"""Reading a spec: bytes -> UTF-8 text -> a YAML node tree, bounded in what it may cost.

The YAML is walked as a node tree (not loaded into plain dicts) so that every
error can name the file, line and column of the value at fault. Nothing here
constructs a Python object from a node: the validator reads scalars itself.
A file that is not text, not YAML, or past a bound is one FILE:LINE:COL
problem, raised as SpecError.
"""

from __future__ import annotations

from typing import Any, Optional

import yaml

from .fields import show_text
from .model import SpecError

# Bounds on what a spec may cost to read. A router's spec is a few KiB; these
# are far above any real one (10,000 mirrors fit) and far below what hurts a
# small router.
MAX_BYTES = 2 << 20
MAX_DEPTH = 64
# Nodes reached through aliases, counted with everything below them: a
# "billion laughs" spec of a few hundred bytes expands to billions of nodes.
MAX_ALIAS_NODES = 10_000
# Values in the file: a mirror has about eight. Parsing stops at the bound, so
# a file of nothing but values costs seconds, not minutes, and tens of MiB.
MAX_NODES = 100_000


def read_text(path: str) -> str:
    """The spec file's text; SpecError if it cannot be read, is too large or is not UTF-8."""
    try:
        with open(path, "rb") as f:
            # Bounded: the path may name /dev/zero or a pipe that never ends.
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise SpecError([f"{path}: cannot read: {e.strerror or e}"]) from e
    if len(data) > MAX_BYTES:
        raise SpecError([f"{path}:1:1: the spec is larger than {MAX_BYTES} bytes; "
                         "this is not a mirror spec"])
    return _decode(data, path)


def _decode(data: bytes, path: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        column = len(data[line_start:e.start].decode("utf-8", "replace")) + 1
        hint = (" (the file looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff")
                else "")
        raise SpecError([f"{path}:{line}:{column}: byte 0x{data[e.start]:02X} is not UTF-8 "
                         f"text{hint}; save the spec as UTF-8"]) from None
    return text[1:] if text.startswith("\ufeff") else text


def show(value: object) -> str:
    """A user's value as quoted in a message: one line, bounded in length."""
    if isinstance(value, yaml.Node):
        # Never the node itself: its repr walks every node below it.
        if isinstance(value, yaml.MappingNode):
            value = "a mapping"
        elif isinstance(value, yaml.SequenceNode):
            value = "a list"
        else:
            value = str(value.value)
    return show_text(value)


STD_TAG = "tag:yaml.org,2002:"


def short_tag(tag: str) -> str:
    """A tag as written in YAML: !!int for tag:yaml.org,2002:int."""
    return "!!" + tag[len(STD_TAG):] if tag.startswith(STD_TAG) else tag


class _LimitError(yaml.MarkedYAMLError):
    """The spec is valid YAML but exceeds a bound; raised before construction."""


class _Loader(yaml.SafeLoader):
    """SafeLoader's composer, bounded in depth and alias expansion.

    Only `compose` is used: no node is constructed into Python objects here, so
    a tag never runs a constructor. The validator reads scalars itself.
    """

    # A plain 2024-01-01 stays text: nothing in a spec is a date, and reading
    # one as a date would only fail later, less clearly.
    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != STD_TAG + "timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0
        self.nodes = 0
        self.alias_nodes = 0
        # Size of every finished collection, aliases expanded. A collection
        # that is anchored but not in here is still open: an alias to it
        # would make the graph a cycle.
        self.sizes: dict[int, int] = {}
        # Lists and mappings tagged as something else (!!set, !!omap, !!python/...):
        # they are read as plain lists and mappings, so the tag would be ignored.
        self.odd_tags: list[yaml.Node] = []

    def size(self, node: yaml.Node) -> int:
        return self.sizes.get(id(node), 1)

    def compose_node(self, parent: Optional[yaml.Node], index: int) -> Optional[yaml.Node]:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        mark: Any = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            target: Any = self.anchors.get(event.anchor)
            if isinstance(target, yaml.CollectionNode) and id(target) not in self.sizes:
                raise _LimitError(None, None, f"alias *{show(event.anchor)} refers to a node "
                                  "that contains it (a cycle)", mark)
            if target is not None:
                self.alias_nodes += self.size(target)
                if self.alias_nodes > MAX_ALIAS_NODES:
                    raise _LimitError(None, None, "aliases expand to more than "
                                      f"{MAX_ALIAS_NODES} nodes; a spec needs far fewer", mark)
            return super().compose_node(parent, index)
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _LimitError(None, None, f"the spec has more than {MAX_NODES} values; "
                              "this is not a mirror spec", mark)
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _LimitError(None, None, f"nested more than {MAX_DEPTH} levels deep", mark)
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        if isinstance(node, yaml.CollectionNode) and node.tag not in (STD_TAG + "seq", STD_TAG + "map"):
            self.odd_tags.append(node)
        if isinstance(node, yaml.SequenceNode):
            self.sizes[id(node)] = 1 + sum(self.size(n) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            self.sizes[id(node)] = 1 + sum(self.size(k) + self.size(v) for k, v in node.value)
        return node


def compose(text: str, path: str) -> tuple[Optional[yaml.Node], list[yaml.Node]]:
    """The node tree of `text` and its oddly tagged collections; SpecError of
    one FILE:LINE:COL problem if the text is not YAML or exceeds a bound."""
    if len(text) > MAX_BYTES:
        raise SpecError([f"{path}:1:1: the spec is larger than {MAX_BYTES} characters; "
                         "this is not a mirror spec"])
    try:
        return _compose(text)
    except _LimitError as e:
        problem = f"{_where(path, e.problem_mark)}: {e.problem}"
    except yaml.MarkedYAMLError as e:
        context = ""
        if e.context and e.context_mark is not None:
            # The mark of the problem is where parsing gave up (often the end
            # of the file); the context says where the unclosed thing began.
            cm = e.context_mark
            context = f" ({e.context} at line {cm.line + 1}, column {cm.column + 1})"
        problem = f"{_where(path, e.problem_mark)}: YAML syntax: {e.problem}{context}"
    except yaml.reader.ReaderError as e:
        line, column = _position(text, e.position)
        problem = (f"{path}:{line}:{column}: character U+{e.character:04X} is not allowed in "
                   "a YAML file"
                   if isinstance(e.character, int) else f"{path}:{line}:{column}: {e.reason}")
    except yaml.YAMLError as e:
        problem = f"{path}:1:1: YAML: {show(e)}"
    except RecursionError:
        problem = f"{path}:1:1: the spec is nested too deeply"
    raise SpecError([problem])


def _where(path: str, mark: Optional[yaml.Mark]) -> str:
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else f"{path}:1:1"


def _position(text: str, index: int) -> tuple[int, int]:
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def _compose(text: str) -> tuple[Optional[yaml.Node], list[yaml.Node]]:
    """The node tree and its oddly tagged collections, within the bounds.

    libyaml composes about ten times faster than pure PyYAML (5,000 mirrors
    take seconds in pure Python); its tree is then held to the same bounds as
    _Loader's. Anything libyaml does not accept, or a plain date (which the
    pure loader reads as text), is composed again by _Loader, whose messages
    are the ones reported.
    """
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is not None:
        try:
            root: Optional[yaml.Node] = yaml.compose(text, Loader=fast)
        except Exception:  # the pure loader below gives the verdict
            pass
        else:
            try:
                odd = _bounded(root)
            except _LimitError:
                # Past a bound: the pure loader stops at the very spot (an
                # alias's own position, which a composed tree no longer has).
                odd = None
            if odd is not None:
                _plain_style_as_pure(root)
                return root, odd
    loader = _Loader(text)
    try:
        return loader.get_single_node(), loader.odd_tags
    finally:
        loader.dispose()


def _bounded(root: Optional[yaml.Node]) -> Optional[list[yaml.Node]]:
    """_Loader's bounds on a tree composed elsewhere (raises _LimitError past
    one) and the collections tagged as something else; None where only
    _Loader can tell."""
    if root is None:
        return []
    odd: list[yaml.Node] = []
    sizes: dict[int, int] = {}  # finished nodes, aliases expanded
    open_: set[int] = set()  # collections whose children are being walked
    nodes = alias_nodes = 0
    # Iterative depth-first walk; the first visit of a node is where it is
    # written, every later one is an alias to it.
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        if done:
            children = _children(node)
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            open_.discard(id(node))
            continue
        key = id(node)
        if key in sizes or key in open_:
            if key in open_:
                raise _LimitError(None, None, "an alias refers to a node that contains it "
                                  "(a cycle)", node.start_mark)
            alias_nodes += sizes[key]
            if alias_nodes > MAX_ALIAS_NODES:
                raise _LimitError(None, None, "aliases expand to more than "
                                  f"{MAX_ALIAS_NODES} nodes; a spec needs far fewer",
                                  node.start_mark)
            continue
        nodes += 1
        if nodes > MAX_NODES:
            raise _LimitError(None, None, f"the spec has more than {MAX_NODES} values; "
                              "this is not a mirror spec", node.start_mark)
        if depth > MAX_DEPTH:
            raise _LimitError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                              node.start_mark)
        if isinstance(node, yaml.ScalarNode):
            if node.tag == STD_TAG + "timestamp":
                return None
            sizes[key] = 1
            continue
        if node.tag not in (STD_TAG + "seq", STD_TAG + "map"):
            odd.append(node)
        open_.add(key)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in reversed(_children(node)))
    return odd


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for kv in node.value for n in kv]
    return []


def _plain_style_as_pure(root: Optional[yaml.Node]) -> None:
    """libyaml marks a plain scalar with style '', pure PyYAML with None: the
    validator reads raw text for plain scalars (ports), so make them alike."""
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue  # aliases share nodes, and may even loop
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            if node.style == "":
                node.style = None
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack += (k, v)
