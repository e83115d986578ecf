"""A mirror's `match:`: families, protocols, ports and prefixes read from the
node tree, each problem at its node's FILE:LINE:COL, and a match that can
never select a packet refused. `match_from_text` reads `mirrord trace`'s
match options by the same rules."""

from __future__ import annotations

import ipaddress
import re
from typing import Optional

import yaml

from ..match import (
    PORT_PROTOCOLS,
    PROTOCOL_NAMES,
    PROTOCOLS,
    Family,
    Match,
    Network,
    PortRange,
    merge_ranges,
)
from .model import FAMILIES, SpecError
from .nodes import BAD, NodeReader
from .yaml_tree import STD_TAG, show

_Node = yaml.Node
_PORT_RE = re.compile(r"\s*([0-9]+)\s*(?:[-:]\s*([0-9]+)\s*)?", re.ASCII)


class MatchReader(NodeReader):
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
        if value is BAD:
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
            if value is BAD:
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



class _TextValidator(MatchReader):
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
        return yaml.ScalarNode(STD_TAG + ("int" if number else "str"),
                               (text.lstrip("0") or "0") if number else text, mark, mark)

    pairs = [(node(k), node(v) if isinstance(v, str)
              else yaml.SequenceNode(STD_TAG + "seq", [node(t) for t in v], mark, mark))
             for k, v in values.items()]
    check = _TextValidator(what)
    match = check.match(yaml.MappingNode(STD_TAG + "map", pairs, mark, mark), what)
    if match is None:
        raise SpecError(check.problems)
    return match
