"""The mirror spec: YAML -> typed, validated `Spec`.

The YAML is walked as a node tree (not loaded into plain dicts) so that every
error can name the file, line and column of the value at fault.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from .match import (
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
    ring_mib: int = 8  # TZSP capture ring per interface; bursts of large frames want more


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


def load(path: str) -> Spec:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SpecError([f"{path}: cannot read: {e.strerror or e}"]) from e
    return parse(text, path)


def _compose(text: str) -> Optional[_Node]:
    """The node tree, by libyaml when present (about ten times faster: 5,000
    mirrors take seconds in pure Python). Anything libyaml does not accept
    is composed again in pure Python, whose messages are the ones reported."""
    loader = getattr(yaml, "CSafeLoader", None)
    if loader is not None:
        try:
            node: Optional[_Node] = yaml.compose(text, Loader=loader)
        except Exception:  # the pure parser below gives the verdict
            pass
        else:
            _plain_style_as_pure(node)
            return node
    return yaml.compose(text, Loader=yaml.SafeLoader)


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
    try:
        root = _compose(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        context = ""
        if e.context and e.context_mark is not None:
            # The mark of the problem is where parsing gave up (often the end
            # of the file); the context says where the unclosed thing began.
            cm = e.context_mark
            context = f" ({e.context} at line {cm.line + 1}, column {cm.column + 1})"
        raise SpecError([f"{where}: YAML syntax: {e.problem}{context}"]) from e
    except yaml.YAMLError as e:
        raise SpecError([f"{path}: YAML: {e}"]) from e
    v = _Validator(path)
    spec = v.spec(root)
    if v.problems or spec is None:
        raise SpecError(v.sorted_problems())
    return spec


def valid_ifname(name: str) -> Optional[str]:
    """Why `name` cannot be a Linux interface name, or None if it can."""
    if not name:
        return "is empty"
    if len(name.encode()) >= IFNAMSIZ:
        return f"is {len(name.encode())} bytes long; Linux allows at most {IFNAMSIZ - 1}"
    if name in (".", ".."):
        return "is not a valid name"
    bad = [c for c in name if c in "/:'\"`\\" or c.isspace() or ord(c) < 32]
    if bad:
        return f"contains {bad[0]!r}, which Linux interface names cannot hold"
    # Linux accepts these, but nft and iptables read them as wildcards,
    # negation or comments: the rule would match something else.
    odd = [c for c in name if c in "*+!#"]
    if odd or name.startswith("-"):
        return (f"contains {(odd or ['-'])[0]!r}, which nftables/iptables would read as an "
                "operator or wildcard rather than a name")
    return None


_Node = yaml.Node


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
            self.positions.append((0, 0))
            self.problems.append(f"{self.path}: {message}")
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
                near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(allowed)}"
                self.err(k, f"{what}: unknown key '{key}'{hint}")
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
        if not isinstance(node, yaml.ScalarNode):
            return node
        try:
            # The constructor alone: a whole SafeLoader re-reads an empty
            # stream each time, which made parsing 5,000 mirrors take seconds.
            return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
        except (ValueError, yaml.YAMLError) as e:
            # A date that does not exist (2024-02-30), an unknown tag (!foo):
            # report it here and go on with the raw text, so every other
            # problem is still found.
            problem = getattr(e, "problem", None) or str(e)
            self.err(node, f"cannot read the value '{node.value}': {problem}")
            return node.value

    def string(self, node: _Node, what: str) -> Optional[str]:
        value = self.scalar(node)
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.err(node, f"{what} must be a string")
            return None
        return str(value)

    def choice(self, node: _Node, what: str, choices: tuple[str, ...]) -> Optional[str]:
        value = self.string(node, what)
        if value is None:
            return None
        if value not in choices:
            self.err(node, f"{what} must be one of {', '.join(choices)}, not '{value}'")
            return None
        return value

    def items(self, node: _Node) -> list[_Node]:
        """A scalar or a list of scalars, as a list of nodes."""
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        return [node]

    def integer(self, node: _Node, what: str, low: int, high: int) -> Optional[int]:
        value = self.scalar(node)
        if isinstance(value, bool) or not isinstance(value, int):
            self.err(node, f"{what} must be a whole number")
            return None
        if not low <= value <= high:
            self.err(node, f"{what} must be between {low} and {high}, not {value}")
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
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
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
            if not NAME_RE.match(name):
                self.err(k, f"collector name '{name}' must be 1-32 letters, digits, '_', '.' or '-'")
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
            try:
                address = ipaddress.ip_address(raw)
            except ValueError:
                self.err(m["address"][1], f"{what}: address '{raw}' is not an IPv4 or IPv6 address")
            else:
                if address.is_multicast or address.is_unspecified:
                    self.err(m["address"][1], f"{what}: address {raw} must be a unicast host")
                    address = None
                elif address.version == 6 and address.is_link_local and "interface" not in m:
                    self.err(m["address"][1], f"{what}: link-local address {raw} needs "
                             "'interface': it is valid only on one link")
                    address = None
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
        ring_mib = 8
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
            self.err(node, f"{what} '{name}' {why}")
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
        if name is not None and not NAME_RE.match(name):
            self.err(m["name"][1], f"mirror name '{name}' must be 1-32 letters, digits, '_', '.' or '-'")
            name = None
        what = f"mirror '{name}'" if name else "mirror"
        ifnode = m["interfaces"][1] if "interfaces" in m else None
        interfaces: list[str] = []
        listed: set[str] = set()  # `in interfaces` would be quadratic in a long list
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
            elif i in listed:
                self.err(n, f"{what}: interface '{i}' is listed twice")
                ok = False
            else:
                interfaces.append(i)
                listed.add(i)
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
            near = difflib.get_close_matches(cname, known, n=1, cutoff=0.6)
            hint = f"; did you mean '{near[0]}'?" if near else (
                f"; defined: {', '.join(known)}" if known else ""
            )
            self.err(m["collector"][1], f"{what}: collector '{cname}' is not defined{hint}")
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
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value <= 255:
                return value
            self.err(node, f"{what}: protocol number must be 0-255, not {value}")
            return None
        if isinstance(value, str) and value.lower() in PROTOCOLS:
            return PROTOCOLS[value.lower()]
        names = ", ".join(sorted(PROTOCOLS))
        self.err(node, f"{what}: unknown protocol '{value}'; use one of {names}, or a number")
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
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value)
            r: Optional[PortRange] = None
            if isinstance(value, int) and not isinstance(value, bool):
                r = PortRange(value, value)
            elif isinstance(value, str):
                mm = re.fullmatch(r"\s*(\d+)\s*[-:]\s*(\d+)\s*", value)
                if mm:
                    r = PortRange(int(mm.group(1)), int(mm.group(2)))
                elif value.strip().isdigit():
                    r = PortRange(int(value), int(value))
            if r is None:
                self.err(n, f"{what}: '{value}' is not a port or a range like 1000-2000")
                ok = False
            elif not (1 <= r.low <= r.high <= 65535):
                self.err(n, f"{what}: {r} is not within 1-65535 with low <= high")
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
                    self.err(n, f"{what}: '{raw}' has host bits set; did you mean {net}?")
                else:
                    self.err(n, f"{what}: '{raw}' is not an address or prefix")
                ok = False
        return tuple(out) if ok else None

