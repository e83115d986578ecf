"""What a spec must contain: the walk over its node tree, from the document down to
each match, every problem named by FILE:LINE:COL and reported in file order.

Reading a typed value from one node is nodes.py's; the rules for a single
name or address are fields.py's; this module holds how they fit together
(which keys each mapping takes, which collector a mirror names, whether a
match can ever select a packet, whether the kernel can clone a mirror's
packets to its collector). A match is matches.py's.
"""

from __future__ import annotations

from typing import Optional

import yaml

from ..match import (
    Address,
    Match,
)
from .fields import NAME_RE, host_address
from .groups import GroupReader
from .matches import MatchReader
from .model import (
    BACKENDS,
    DEFAULT_SESSION,
    DEFAULT_VNI,
    DIRECTIONS,
    TRANSPORTS,
    TZSP_PORT,
    VXLAN_PORT,
    Collector,
    Mirror,
    Spec,
)
from .nodes import BAD, close_matches
from .yaml_tree import short_tag, show

_Node = yaml.Node

# Which transports each collector key applies to (auto may become tzsp).
_APPLIES: dict[str, frozenset[str]] = {
    "address": frozenset(TRANSPORTS) - {"span"},
    "interface": frozenset({"auto", "clone", "tzsp", "span"}),
    "transport": frozenset(TRANSPORTS),
    "port": frozenset({"auto", "tzsp", "vxlan"}),
    # Accepted and unused with clone, as before the frame transports came.
    "snaplen": frozenset({"auto", "tzsp", "clone"}),
    "ring_mib": frozenset({"auto", "tzsp"}),
    "vni": frozenset({"vxlan"}),
    "session": frozenset({"erspan"}),
    # Every transport: those that cannot balance yet are told so by name.
    "members": frozenset(TRANSPORTS),
    "balance": frozenset(TRANSPORTS),
}
_RANGES = (("port", 1, 65535), ("snaplen", 64, 65535), ("ring_mib", 1, 1024),
           ("vni", 0, 0xFFFFFF), ("session", 0, 1023))


_TUNNEL_KEY = {"vxlan": "VNI, UDP port and IP version", "gretap": "remote address",
               "erspan": "remote address and session"}


def _tunnel_keys(c: Collector) -> set[tuple[object, ...]]:
    """What the kernel tells c's tunnel devices apart by: two devices with one key
    are refused (EEXIST). A vxlan group's member k has VNI vni + k (plan.frames)."""
    if c.transport == "vxlan":
        addrs = c.member_addresses() if c.is_group else (
            (c.address,) if c.address is not None else ())
        return {(c.vni + k, c.port, a.version) for k, a in enumerate(addrs)}
    if c.address is None:
        return set()
    if c.transport == "gretap":
        return {(c.address,)}
    if c.transport == "erspan":
        return {(c.address, c.session)}
    return set()


def _same_tunnel(a: Collector, b: Collector) -> bool:
    """Two collectors whose tunnel devices the kernel would take for one (EEXIST)."""
    return a.transport == b.transport and bool(_tunnel_keys(a) & _tunnel_keys(b))


def _applies_text(key: str) -> str:
    if key == "address":
        return ("does not apply to transport span: its collector is the port named by "
                "'interface', not a host")
    if key == "interface":
        return ("does not apply to tunnel transports: the route to the address decides the "
                "way out")
    names = sorted(_APPLIES[key] - {"auto"})
    return f"applies to transport {' and '.join(names)} only"


def validate(root: Optional[_Node], odd_tags: list[_Node], path: str) -> Spec | list[str]:
    """The Spec the tree of `path` describes, or its problems in file order."""
    v = _Validator(path)
    for node in odd_tags:
        v.err(node, f"the tag {show(short_tag(node.tag))} is not supported; write a plain "
              f"{'list' if isinstance(node, yaml.SequenceNode) else 'mapping'}")
    try:
        spec = v.spec(root)
    except RecursionError:
        return [f"{path}:1:1: the spec is nested too deeply"]
    if v.problems or spec is None:
        return v.sorted_problems()
    return spec


class _Validator(GroupReader, MatchReader):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        # Collectors that were defined but are invalid: a mirror naming one
        # must not also be told it is "not defined".
        self.invalid_collectors: set[str] = set()

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
            if value is BAD:
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
                clash = next((o for o in out.values() if _same_tunnel(o, c)), None)
                if clash is not None:
                    self.err(k, f"collector '{name}': the kernel takes one {c.transport} device "
                             f"per {_TUNNEL_KEY[c.transport]}, and collector '{clash.name}' "
                             "has the same; give one of them another "
                             f"{'vni' if c.transport == 'vxlan' else 'session'}")
                    self.invalid_collectors.add(name)
                    continue
                out[name] = c
            else:
                self.invalid_collectors.add(name)
        return out

    def collector(self, name: str, node: _Node) -> Optional[Collector]:
        what = f"collector '{name}'"
        m = self.mapping(node, what, tuple(_APPLIES))
        if m is None:
            return None
        ok = True
        transport = "auto"
        if "transport" in m:
            transport = self.choice(m["transport"][1], f"{what}: transport", TRANSPORTS) or ""
            if not transport:
                return None
        for key, (k_node, _) in m.items():
            if transport not in _APPLIES[key]:
                self.err(k_node, f"{what}: {key} {_applies_text(key)}")
                ok = False
        group: Optional[tuple[tuple[str, ...], str]] = None
        if "members" in m or "balance" in m:
            group = self.group_members(what, m, transport)
            if group is None:
                return None
        elif transport == "span":
            if "interface" not in m:
                self.err(node, f"{what}: transport span needs 'interface': the port of this "
                         "router that the copies leave through (the IDS is plugged into it)")
                return None
        elif "address" not in m:
            self.err(node, f"{what}: missing required key 'address'")
            return None
        address: Optional[Address] = None
        if "address" in m and group is None:
            raw = self.string(m["address"][1], f"{what}: address")
            if raw is None:
                ok = False
            else:
                address, why = host_address(raw, has_interface="interface" in m)
                if why:
                    self.err(m["address"][1], f"{what}: {why}")
                    ok = False
        interface = None
        if "interface" in m and group is None:
            interface = self.ifname(m["interface"][1], f"{what}: interface")
            ok = ok and interface is not None
        port = VXLAN_PORT if transport == "vxlan" else TZSP_PORT
        values = {"port": port, "snaplen": 65535, "ring_mib": Collector.ring_mib,
                  "vni": DEFAULT_VNI, "session": DEFAULT_SESSION}
        for key, low, high in _RANGES:
            if key in m:
                v = self.integer(m[key][1], f"{what}: {key}", low, high)
                ok = ok and v is not None
                if v is not None:
                    values[key] = v
        members, balance = group or ((), "")
        if ok and "vni" in m and values["vni"] + len(members) - 1 > 0xFFFFFF:
            self.err(m["vni"][1], f"{what}: member k gets VNI vni + k; {values['vni']} + "
                     f"{len(members) - 1} is over 16777215")
            ok = False
        if not ok:
            return None
        return Collector(name, address, interface, transport,  # type: ignore[arg-type]
                         values["port"], values["snaplen"], values["ring_mib"],
                         values["vni"], values["session"], members, balance)

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
            near = (close_matches(cname[:64], known)
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
        if ok and collector is not None and collector.transport == "span":
            ok = self.not_the_port(ifnode, what, interfaces, collector)
        if ok and collector is not None:
            ok = self.family_fits(m.get("match", (node, node))[1], what, match, collector)
        if not ok or name is None or cname is None:
            return None
        return Mirror(name, tuple(interfaces), direction, cname, match)  # type: ignore[arg-type]

    def not_the_port(self, node: Optional[_Node], what: str, interfaces: list[str],
                     c: Collector) -> bool:
        ports = c.members or (c.interface,)
        port = next((p for p in ports if p in interfaces), None)
        if port is None:
            return True
        items = self.items(node) if node is not None else []
        node = next((n for n in items if self.scalar(n) == port), node)
        self.err(node, f"{what}: interface {port} is the span port of collector "
                 f"'{c.name}': its own copies would be copied again")
        return False

    def family_fits(self, node: _Node, what: str, match: Match, c: Collector) -> bool:
        address = next(iter(c.member_addresses()), None) if c.is_group else c.address
        if c.transport != "clone" or address is None:
            return True
        cv = address.version
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
