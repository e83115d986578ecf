"""The mirror spec: YAML -> typed, validated `Spec`.

The YAML is walked as a node tree (not loaded into plain dicts) so that every
error can name the file, line and column of the value at fault.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

import yaml

from ..match import (
    PORT_PROTOCOLS,
    PROTOCOL_NAMES,
    PROTOCOLS,
    Address,
    Family,
    Match,
    Network,
    PortRange,
    merge_ranges,
)

DEFAULT_PATH = "/etc/mirrord.yaml"
TZSP_PORT = 37008

Backend = Literal["auto", "nftables", "iptables", "iptables-legacy", "route-tee"]
Transport = Literal["auto", "clone", "tzsp"]
Direction = Literal["in", "out", "both"]
BACKENDS: tuple[str, ...] = ("auto", "nftables", "iptables", "iptables-legacy", "route-tee")
TRANSPORTS: tuple[str, ...] = ("auto", "clone", "tzsp")
DIRECTIONS: tuple[str, ...] = ("in", "out", "both")
FAMILIES: tuple[str, ...] = ("ipv4", "ipv6", "any")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
IFNAMSIZ = 16


@dataclass(frozen=True)
class Collector:
    name: str
    address: Address
    interface: Optional[str] = None
    transport: Transport = "auto"
    port: int = TZSP_PORT
    snaplen: int = 65535
    # TZSP capture ring per interface, all of it resident; bursts want more (README,
    # limits). 0: not set, the capture's default (512 KiB).
    ring_mib: int = 0


@dataclass(frozen=True)
class Mirror:
    name: str
    interfaces: tuple[str, ...]
    direction: Direction
    collector: str
    match: Match = field(default_factory=Match)

    @property
    def directions(self) -> tuple[Literal["in", "out"], ...]:
        if self.direction == "both":
            return ("in", "out")
        return (self.direction,)


@dataclass(frozen=True)
class Spec:
    path: str
    backend: Backend
    collectors: dict[str, Collector]
    mirrors: tuple[Mirror, ...]
    poll_interval: float = 2.0

    def collector_of(self, mirror: Mirror) -> Collector:
        return self.collectors[mirror.collector]


class SpecError(Exception):
    """One or more problems, each already formatted as FILE:LINE:COL: message."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def default_path() -> str:
    return os.environ.get("MIRRORD_CONFIG") or DEFAULT_PATH


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
MAX_PROBLEMS = 100
MAX_SHOWN = 60  # characters of a user's value quoted in a message
MAX_LINE = 300  # characters in one problem line
INTERNAL_ERROR = "internal error in mirrord while reading this spec; please report it"


def load(path: str) -> Spec:
    try:
        with open(path, "rb") as f:
            # Bounded: the path may name /dev/zero or a pipe that never ends.
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise SpecError([f"{path}: cannot read: {e.strerror or e}"]) from e
    if len(data) > MAX_BYTES:
        raise SpecError([f"{path}:1:1: the spec is larger than {MAX_BYTES} bytes; "
                         "this is not a mirror spec"])
    return parse(_decode(data, path), path)


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
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_SHOWN:
        text = text[:MAX_SHOWN] + "..."
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _clamp(line: str) -> str:
    if len(line) <= MAX_LINE:
        return line
    return line[:MAX_LINE - 3] + "..."


_STD = "tag:yaml.org,2002:"


def _short(tag: str) -> str:
    """A tag as written in YAML: !!int for tag:yaml.org,2002:int."""
    return "!!" + tag[len(_STD):] if tag.startswith(_STD) else tag


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
        first: [(tag, rx) for tag, rx in resolvers if tag != _STD + "timestamp"]
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
        if isinstance(node, yaml.CollectionNode) and node.tag not in (_STD + "seq", _STD + "map"):
            self.odd_tags.append(node)
        if isinstance(node, yaml.SequenceNode):
            self.sizes[id(node)] = 1 + sum(self.size(n) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            self.sizes[id(node)] = 1 + sum(self.size(k) + self.size(v) for k, v in node.value)
        return node


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
            if node.tag == _STD + "timestamp":
                return None
            sizes[key] = 1
            continue
        if node.tag not in (_STD + "seq", _STD + "map"):
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


def _plain_style_as_pure(root: Optional[_Node]) -> None:
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


def parse(text: str, path: str = "<spec>") -> Spec:
    """The spec in `text`; raises SpecError, and only SpecError, for any text."""
    try:
        problems = _parse(text, path)
    except Exception as e:
        # A bug here must not take the daemon down on a reload; the fuzz
        # test asserts this line is never produced.
        problems = [f"{path}:1:1: {INTERNAL_ERROR} ({type(e).__name__}: {show(e)})"]
    if isinstance(problems, Spec):
        return problems
    if len(problems) > MAX_PROBLEMS:
        rest = len(problems) - MAX_PROBLEMS
        where = problems[MAX_PROBLEMS].split(": ", 1)[0]
        problems = [*problems[:MAX_PROBLEMS], f"{where}: ... and {rest} more problems"]
    raise SpecError([_clamp(p) for p in problems])


def _parse(text: str, path: str) -> Spec | list[str]:
    if len(text) > MAX_BYTES:
        return [f"{path}:1:1: the spec is larger than {MAX_BYTES} characters; "
                "this is not a mirror spec"]
    try:
        root, odd_tags = _compose(text)
    except _LimitError as e:
        return [f"{_where(path, e.problem_mark)}: {e.problem}"]
    except yaml.MarkedYAMLError as e:
        context = ""
        if e.context and e.context_mark is not None:
            # The mark of the problem is where parsing gave up (often the end
            # of the file); the context says where the unclosed thing began.
            cm = e.context_mark
            context = f" ({e.context} at line {cm.line + 1}, column {cm.column + 1})"
        return [f"{_where(path, e.problem_mark)}: YAML syntax: {e.problem}{context}"]
    except yaml.reader.ReaderError as e:
        line, column = _position(text, e.position)
        return [f"{path}:{line}:{column}: character U+{e.character:04X} is not allowed in "
                "a YAML file"
                if isinstance(e.character, int) else f"{path}:{line}:{column}: {e.reason}"]
    except yaml.YAMLError as e:
        return [f"{path}:1:1: YAML: {show(e)}"]
    except RecursionError:
        return [f"{path}:1:1: the spec is nested too deeply"]
    v = _Validator(path)
    for node in odd_tags:
        v.err(node, f"the tag {show(_short(node.tag))} is not supported; write a plain "
              f"{'list' if isinstance(node, yaml.SequenceNode) else 'mapping'}")
    try:
        spec = v.spec(root)
    except RecursionError:
        return [f"{path}:1:1: the spec is nested too deeply"]
    if v.problems or spec is None:
        return v.sorted_problems()
    return spec


def valid_ifname(name: str) -> Optional[str]:
    """Why `name` cannot be a Linux interface name, or None if it can."""
    if not name:
        return "is empty"
    size = len(name.encode(errors="surrogatepass"))
    if size >= IFNAMSIZ:
        return f"is {size} bytes long; Linux allows at most {IFNAMSIZ - 1}"
    if name in (".", ".."):
        return "is not a valid name"
    bad = [c for c in name if c in "/:'\"`\\" or c.isspace() or not c.isprintable()]
    if bad:
        return f"contains {bad[0]!r}, which Linux interface names cannot hold"
    # Linux accepts these, but nft and iptables read them as wildcards,
    # negation or comments: the rule would match something else.
    odd = [c for c in name if c in "*+!#"]
    if odd or name.startswith("-"):
        return (f"contains {(odd or ['-'])[0]!r}, which nftables/iptables would read as an "
                "operator or wildcard rather than a name")
    return None


def host_address(raw: str, has_interface: bool = True) -> tuple[Optional[Address], str]:
    """The collector address in `raw`, or why it cannot be one host's address.

    A clone or TZSP copy sent to a group, broadcast or unspecified address
    floods a segment or goes nowhere; one sent to loopback never leaves this
    router. Whether an address is a directed broadcast or a network address
    depends on the prefix of the link it is on, which only the plan knows (it
    checks the router's own prefixes); an address written with a prefix
    length shows it here already.
    """
    try:
        address: Address = ipaddress.ip_address(raw)
    except ValueError:
        pass
    else:
        why = _not_a_host(address, has_interface, raw)
        return (None, why) if why else (address, "")
    try:
        iface = ipaddress.ip_interface(raw)
    except ValueError:
        return None, f"address '{show(raw)}' is not an IPv4 or IPv6 address"
    address, net = iface.ip, iface.network
    if net.num_addresses > 2 and address == net.network_address:
        what = "network address" if address.version == 4 else "subnet-router anycast address"
        return None, f"address {raw} is the {what} of {net}, not a host"
    if address.version == 4 and net.num_addresses > 2 and address == net.broadcast_address:
        return None, (f"address {raw} is the broadcast address of {net}: copies would go to "
                      "every host on it; a collector must be one host")
    return None, (_not_a_host(address, has_interface, raw) or
                  f"address {raw} has a prefix length; write the host address alone: {address}")


def _not_a_host(address: Address, has_interface: bool, raw: str) -> str:
    if address == ipaddress.IPv4Address("255.255.255.255"):
        return f"address {raw} is the broadcast address: copies would go to every host on the link"
    if address.is_multicast:
        return f"address {raw} must be a unicast host, not a multicast group"
    if address.is_unspecified:
        return f"address {raw} is the unspecified address, not a host"
    if address.is_loopback:
        return (f"address {raw} is a loopback address: copies would never leave this router")
    if address.version == 4 and address in ipaddress.IPv4Network("240.0.0.0/4"):
        return f"address {raw} is in the reserved range 240.0.0.0/4, which no host can use"
    if address.version == 6 and address.ipv4_mapped is not None:
        return f"address {raw} is an IPv4-mapped IPv6 address; write {address.ipv4_mapped}"
    if address.version == 6 and address.scope_id:
        return (f"address {raw} has a zone; write it as {str(address).split('%')[0]} with "
                f"'interface: {address.scope_id}'")
    if address.version == 6 and address.is_link_local and not has_interface:
        return f"link-local address {raw} needs 'interface': it is valid only on one link"
    return ""


def _close_matches(word: str, choices: Sequence[str]) -> list[str]:
    # difflib is imported for a mistake only: it stays out of a daemon's memory.
    import difflib

    return difflib.get_close_matches(word, choices, n=1, cutoff=0.6)


_Node = yaml.Node
_STR, _NULL, _BOOL, _INT, _FLOAT = (_STD + t for t in ("str", "null", "bool", "int", "float"))
_SCALAR_TAGS = frozenset({_STR, _NULL, _BOOL, _INT, _FLOAT})
_BOOLS: dict[str, bool] = dict(yaml.constructor.SafeConstructor.bool_values)
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_PORT_RE = re.compile(r"\s*([0-9]+)\s*(?:[-:]\s*([0-9]+)\s*)?", re.ASCII)


class _Bad:
    """A value that could not be read; the reason is already reported."""


_BAD = _Bad()


class _Validator:
    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []
        self.positions: list[tuple[int, int]] = []
        # Collectors that were defined but are invalid: a mirror naming one
        # must not also be told it is "not defined".
        self.invalid_collectors: set[str] = set()

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
                near = _close_matches(key[:64], allowed)
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

        `_BAD` when the value cannot be read (already reported): a tag mirrord
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
            self.err(node, f"the tag {show(_short(tag))} is not supported; write the plain value")
            return _BAD
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
            self.err(node, f"cannot read '{show(value)}' as {_short(tag)}{why}")
            return _BAD

    def string(self, node: _Node, what: str) -> Optional[str]:
        value = self.scalar(node)
        if value is _BAD:
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
        if value is _BAD:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.err(node, f"{what} must be a whole number")
            return None
        if not low <= value <= high:
            self.err(node, f"{what} must be between {low} and {high}, not {show(value)}")
            return None
        return value

    # -- the document ------------------------------------------------------
    def spec(self, root: Optional[_Node]) -> Optional[Spec]:
        if root is None:
            self.err(None, "the spec is empty; it needs 'collectors' and 'mirrors'")
            return None
        top = self.mapping(
            root, "spec", ("backend", "poll_interval", "collectors", "mirrors"),
            ("collectors", "mirrors"),
        )
        if top is None:
            return None
        backend = "auto"
        if "backend" in top:
            backend = self.choice(top["backend"][1], "backend", BACKENDS) or "auto"
        poll = 2.0
        if "poll_interval" in top:
            node = top["poll_interval"][1]
            value = self.scalar(node)
            if value is _BAD:
                pass
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                0.1 <= value <= 3600
            ):
                self.err(node, "poll_interval must be a number of seconds from 0.1 to 3600")
            else:
                poll = float(value)
        collectors: dict[str, Collector] = {}
        if "collectors" in top:
            collectors = self.collectors(top["collectors"][1])
        mirrors: list[Mirror] = []
        if "mirrors" in top:
            mirrors = self.mirrors(top["mirrors"][1], collectors)
        return Spec(self.path, backend, collectors, tuple(mirrors), poll)  # type: ignore[arg-type]

    def collectors(self, node: _Node) -> dict[str, Collector]:
        out: dict[str, Collector] = {}
        if not isinstance(node, yaml.MappingNode) or not node.value:
            self.err(node, "collectors must be a non-empty mapping of names to collectors")
            return out
        for k, val in node.value:
            name = self.string(k, "collector name")
            if name is None:
                continue
            if not NAME_RE.fullmatch(name):
                self.err(k, f"collector name '{show(name)}' must be 1-32 letters, digits, '_', '.' or '-'")
                continue
            if name in out:
                self.err(k, f"collector '{name}' is defined twice")
                continue
            c = self.collector(name, val)
            if c is not None:
                out[name] = c
            else:
                self.invalid_collectors.add(name)
        return out

    def collector(self, name: str, node: _Node) -> Optional[Collector]:
        what = f"collector '{name}'"
        m = self.mapping(
            node, what, ("address", "interface", "transport", "port", "snaplen", "ring_mib"),
            ("address",),
        )
        if m is None or "address" not in m:
            return None
        ok = True
        address: Optional[Address] = None
        raw = self.string(m["address"][1], f"{what}: address")
        if raw is not None:
            address, why = host_address(raw, has_interface="interface" in m)
            if why:
                self.err(m["address"][1], f"{what}: {why}")
        interface = None
        if "interface" in m:
            interface = self.ifname(m["interface"][1], f"{what}: interface")
            ok = ok and interface is not None
        transport = "auto"
        if "transport" in m:
            transport = self.choice(m["transport"][1], f"{what}: transport", TRANSPORTS) or ""
            ok = ok and bool(transport)
        port = TZSP_PORT
        if "port" in m:
            p = self.integer(m["port"][1], f"{what}: port", 1, 65535)
            ok = ok and p is not None
            port = p or port
        snaplen = 65535
        if "snaplen" in m:
            s = self.integer(m["snaplen"][1], f"{what}: snaplen", 64, 65535)
            ok = ok and s is not None
            snaplen = s or snaplen
        ring_mib = Collector.ring_mib
        if "ring_mib" in m:
            r = self.integer(m["ring_mib"][1], f"{what}: ring_mib", 1, 1024)
            ok = ok and r is not None
            ring_mib = r or ring_mib
        if transport == "clone":
            for key in ("port", "ring_mib"):
                if key in m:
                    self.err(m[key][0], f"{what}: {key} applies to transport tzsp only")
                    ok = False
        if address is None or not ok:
            return None
        return Collector(name, address, interface, transport, port, snaplen,  # type: ignore[arg-type]
                         ring_mib)

    def ifname(self, node: _Node, what: str) -> Optional[str]:
        name = self.string(node, what)
        if name is None:
            return None
        why = valid_ifname(name)
        if why:
            self.err(node, f"{what} '{show(name)}' {why}")
            return None
        return name

    def mirrors(self, node: _Node, collectors: dict[str, Collector]) -> list[Mirror]:
        out: list[Mirror] = []
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            self.err(node, "mirrors must be a non-empty list")
            return out
        seen: dict[str, _Node] = {}
        for item in node.value:
            m = self.mirror(item, collectors)
            if m is None:
                continue
            if m.name in seen:
                line = seen[m.name].start_mark.line + 1
                self.err(item, f"mirror name '{m.name}' is already used on line {line}")
                continue
            seen[m.name] = item
            out.append(m)
        return out

    def mirror(self, node: _Node, collectors: dict[str, Collector]) -> Optional[Mirror]:
        m = self.mapping(
            node, "mirror", ("name", "interfaces", "direction", "collector", "match"),
            ("name", "interfaces", "collector"),
        )
        if m is None:
            return None
        ok = {"name", "interfaces", "collector"} <= m.keys()
        name = self.string(m["name"][1], "mirror name") if "name" in m else None
        if name is not None and not NAME_RE.fullmatch(name):
            self.err(m["name"][1],
                     f"mirror name '{show(name)}' must be 1-32 letters, digits, '_', '.' or '-'")
            name = None
        what = f"mirror '{name}'" if name else "mirror"
        ifnode = m["interfaces"][1] if "interfaces" in m else None
        interfaces: list[str] = []
        seen: set[str] = set()  # a list of thousands must not cost its square
        if (isinstance(ifnode, yaml.SequenceNode) and not ifnode.value) or (
            isinstance(ifnode, yaml.ScalarNode) and self.scalar(ifnode) is None
        ):
            self.err(ifnode, f"{what}: interfaces must name at least one interface")
            ok = False
            ifnode = None
        for n in self.items(ifnode) if ifnode is not None else []:
            i = self.ifname(n, f"{what}: interface")
            if i is None:
                ok = False
            elif i in seen:
                self.err(n, f"{what}: interface '{show(i)}' is listed twice")
                ok = False
            else:
                interfaces.append(i)
                seen.add(i)
        direction = "both"
        if "direction" in m:
            direction = self.choice(m["direction"][1], f"{what}: direction", DIRECTIONS) or ""
            ok = ok and bool(direction)
        cname = self.string(m["collector"][1], f"{what}: collector") if "collector" in m else None
        collector = collectors.get(cname) if cname else None
        if cname is not None and collector is None and cname in self.invalid_collectors:
            ok = False  # its own errors were reported where it is defined
        elif cname is not None and collector is None:
            known = list(collectors)
            # Bounded: difflib against thousands of names, for each of thousands
            # of mirrors, takes minutes.
            near = (_close_matches(cname[:64], known)
                    if len(known) <= 100 else [])
            hint = f"; did you mean '{near[0]}'?" if near else (
                f"; defined: {', '.join(known[:10])}{', ...' if len(known) > 10 else ''}"
                if known else ""
            )
            self.err(m["collector"][1],
                     f"{what}: collector '{show(cname)}' is not defined{hint}")
            ok = False
        match = Match()
        if "match" in m:
            parsed = self.match(m["match"][1], what)
            if parsed is None:
                ok = False
            else:
                match = parsed
        if ok and collector is not None:
            ok = self.family_fits(m.get("match", (node, node))[1], what, match, collector)
        if not ok or name is None or cname is None:
            return None
        return Mirror(name, tuple(interfaces), direction, cname, match)  # type: ignore[arg-type]

    def family_fits(self, node: _Node, what: str, match: Match, c: Collector) -> bool:
        if c.transport != "clone":
            return True
        cv = c.address.version
        if match.family != "any" and match.family != f"ipv{cv}":
            self.err(
                node,
                f"{what}: matches {match.family} traffic but collector '{c.name}' is IPv{cv} "
                "with transport clone; the kernel clones a packet only to a next hop of its own "
                "family (use transport: tzsp, or a collector address of that family)",
            )
            return False
        if cv not in match.versions():
            self.err(
                node,
                f"{what}: its match can only select IPv{10 - cv} packets, which cannot be "
                f"cloned to the IPv{cv} collector '{c.name}'",
            )
            return False
        return True

    # -- match ---------------------------------------------------------------
    def match(self, node: _Node, what: str) -> Optional[Match]:
        if isinstance(node, yaml.ScalarNode) and self.scalar(node) is None:
            return Match()
        keys = ("family", "protocol", "port", "sport", "dport", "source", "destination")
        m = self.mapping(node, f"{what}: match", keys)
        if m is None:
            return None
        ok = True
        family: Family = "any"
        if "family" in m:
            f = self.choice(m["family"][1], f"{what}: match family", FAMILIES)
            ok = ok and f is not None
            family = f or "any"  # type: ignore[assignment]
        protocols: list[int] = []
        if "protocol" in m:
            for n in self.items(m["protocol"][1]):
                p = self.protocol(n, what)
                if p is None:
                    ok = False
                elif p not in protocols:
                    protocols.append(p)
        if family == "ipv4" and 58 in protocols:
            self.err(m["protocol"][1], f"{what}: protocol icmpv6 does not exist in family ipv4")
            ok = False
        if family == "ipv6" and 1 in protocols:
            self.err(m["protocol"][1], f"{what}: protocol icmp is IPv4's; for IPv6 use icmpv6")
            ok = False
        ports: dict[str, tuple[PortRange, ...]] = {}
        for key in ("port", "sport", "dport"):
            if key not in m:
                continue
            knode, vnode = m[key]
            no_ports = [p for p in protocols if p not in PORT_PROTOCOLS]
            if no_ports:
                pname = PROTOCOL_NAMES.get(no_ports[0], str(no_ports[0]))
                self.err(knode, f"{what}: '{key}' given, but protocol {pname} has no ports")
                ok = False
                continue
            ranges = self.port_ranges(vnode, f"{what}: {key}")
            if ranges is None:
                ok = False
            else:
                ports[key] = ranges
        sources = self.networks(m["source"][1], f"{what}: source") if "source" in m else ()
        dests = (
            self.networks(m["destination"][1], f"{what}: destination") if "destination" in m else ()
        )
        if sources is None or dests is None:
            return None
        for key, nets in (("source", sources), ("destination", dests)):
            wrong = [n for n in nets if family != "any" and f"ipv{n.version}" != family]
            if wrong:
                self.err(m[key][1], f"{what}: {key} {wrong[0]} is not {family} (match family)")
                ok = False
        if not ok:
            return None
        match = Match(
            family=family,
            protocols=tuple(protocols),
            ports=ports.get("port", ()),
            sports=ports.get("sport", ()),
            dports=ports.get("dport", ()),
            sources=sources,
            destinations=dests,
        )
        if not match.versions():
            self.err(node, f"{what}: this match can never select a packet (its parts contradict)")
            return None
        return match

    def protocol(self, node: _Node, what: str) -> Optional[int]:
        value = self.scalar(node)
        if value is _BAD:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value <= 255:
                return value
            self.err(node, f"{what}: protocol number must be 0-255, not {show(value)}")
            return None
        if isinstance(value, str) and value.lower() in PROTOCOLS:
            return PROTOCOLS[value.lower()]
        names = ", ".join(sorted(PROTOCOLS))
        self.err(node, f"{what}: unknown protocol '{show(value)}'; use one of {names}, or a number")
        return None

    def port_ranges(self, node: _Node, what: str) -> Optional[tuple[PortRange, ...]]:
        out: list[PortRange] = []
        ok = True
        items = self.items(node)
        if not items:
            self.err(node, f"{what} must name at least one port")
            return None
        for n in items:
            # The raw text, not YAML's reading of it: YAML 1.1 reads an
            # unquoted 20:21 (iptables' range syntax) as the base-60 number 1221.
            value = n.value if isinstance(n, yaml.ScalarNode) and n.style is None else self.scalar(n)
            if value is _BAD:
                ok = False
                continue
            r: Optional[PortRange] = None
            too_big = False
            if isinstance(value, int) and not isinstance(value, bool):
                r = PortRange(value, value)
            elif isinstance(value, str):
                # ASCII digits only: str.isdigit() and int() also take '²' and '٣'.
                mm = _PORT_RE.fullmatch(value)
                if mm:
                    low, high = mm.group(1), mm.group(2) or mm.group(1)
                    too_big = max(len(low.lstrip("0")), len(high.lstrip("0"))) > 5
                    if not too_big:
                        r = PortRange(int(low), int(high))
            if too_big:
                self.err(n, f"{what}: '{show(value)}' is not within 1-65535")
                ok = False
            elif r is None:
                self.err(n, f"{what}: '{show(value)}' is not a port or a range like 1000-2000")
                ok = False
            elif not (1 <= r.low <= r.high <= 65535):
                self.err(n, f"{what}: {show(r)} is not within 1-65535 with low <= high")
                ok = False
            else:
                out.append(r)
        return merge_ranges(out) if ok else None

    def networks(self, node: _Node, what: str) -> Optional[tuple[Network, ...]]:
        out: list[Network] = []
        ok = True
        items = self.items(node)
        if not items:
            self.err(node, f"{what} must name at least one address or prefix")
            return None
        for n in items:
            raw = self.string(n, what)
            if raw is None:
                ok = False
                continue
            try:
                out.append(ipaddress.ip_network(raw.strip(), strict=True))
            except ValueError as e:
                if "has host bits set" in str(e):
                    net = ipaddress.ip_network(raw.strip(), strict=False)
                    self.err(n, f"{what}: '{show(raw)}' has host bits set; did you mean {net}?")
                else:
                    self.err(n, f"{what}: '{show(raw)}' is not an address or prefix")
                ok = False
        return tuple(out) if ok else None



class _TextValidator(_Validator):
    """Reports without a file position: the values came from a command line."""

    def err(self, node: Optional[_Node], message: str) -> None:
        self.positions.append((1, 1))
        self.problems.append(message)


def match_from_text(values: dict[str, str | list[str]], what: str) -> Match:
    """A match given as text (`mirrord trace`'s options), read by the rules of a spec's `match:`.

    `values` maps match keys to one text or a list; ASCII digits are a number,
    as YAML reads them in a file. Raises SpecError, each problem led by `what`.
    """
    mark = yaml.Mark(what, 0, 0, 0, "", 0)

    def node(text: str) -> yaml.ScalarNode:
        number = text.isascii() and text.isdigit()  # decimal, not YAML's octal 0NN
        return yaml.ScalarNode(_INT if number else _STR,
                               (text.lstrip("0") or "0") if number else text, mark, mark)

    pairs = [(node(k), node(v) if isinstance(v, str)
              else yaml.SequenceNode(_STD + "seq", [node(t) for t in v], mark, mark))
             for k, v in values.items()]
    check = _TextValidator(what)
    match = check.match(yaml.MappingNode(_STD + "map", pairs, mark, mark), what)
    if match is None:
        raise SpecError(check.problems)
    return match
