"""Copies that would become input to a mirror, found from the spec alone (`mirrord check`).

What mirrord sends can never be copied again by address: every mirror, of
either transport, excludes the traffic of every collector of the spec (see
plan.exclusions), so TZSP datagrams, their fragments and the collectors'
answers are never input to a mirror, and the kernel never clones a clone.
What no address can exclude is a kernel clone seen by a TZSP capture: the
clone carries the original packet's addresses. A TZSP mirror capturing what
leaves the interface clones leave through would copy mirrord's own clones.

When that interface is named in the spec (a clone collector's `interface:`)
and the capturing mirror's collector is TZSP by configuration, this is known
before anything runs: reported here with the file, line and column. When it
depends on routes or bridges (transport auto, a bridge port), the plan finds
it and `mirrord status` shows that tap as an error.
"""

from __future__ import annotations

from typing import Optional

import yaml

from .model import Spec


def static_problems(spec: Spec, text: Optional[str] = None) -> list[str]:
    """FILE:LINE:COL problems of a valid spec; `text` is the spec's YAML (read if None)."""
    clone_ifaces: dict[str, str] = {}  # interface -> the clone collector reached through it
    used = {m.collector for m in spec.mirrors}
    for c in spec.collectors.values():
        if c.transport == "clone" and c.interface and c.name in used:
            clone_ifaces.setdefault(c.interface, c.name)
    if not clone_ifaces:
        return []
    found: list[tuple[int, str]] = []  # (mirror index, interface)
    for i, m in enumerate(spec.mirrors):
        if spec.collector_of(m).transport != "tzsp" or "out" not in m.directions:
            continue
        found += [(i, name) for name in m.interfaces if name in clone_ifaces]
    if not found:
        return []
    nodes = _mirror_nodes(spec.path, text)
    out: list[tuple[tuple[int, int], str]] = []
    for i, name in found:
        m = spec.mirrors[i]
        cname = clone_ifaces[name]
        half = "what leaves" if m.direction == "out" else "the outgoing half of"
        message = (f"mirror '{m.name}': TZSP capture of {half} {name} would copy mirrord's own "
                   f"kernel clones to collector '{cname}' (transport clone, interface {name}), "
                   "which carry the original packets' addresses and cannot be excluded; use "
                   f"direction: in, transport clone for this mirror, or another interface for "
                   f"'{cname}'")
        where = _interface_mark(nodes[i] if i < len(nodes) else None, name)
        if where is None:
            out.append(((0, 0), f"{spec.path}: {message}"))
        else:
            out.append((where, f"{spec.path}:{where[0]}:{where[1]}: {message}"))
    return [msg for _, msg in sorted(out, key=lambda p: p[0])]


def _mirror_nodes(path: str, text: Optional[str]) -> list[yaml.Node]:
    """The YAML nodes of the mirrors, in spec order (a valid spec keeps every one)."""
    try:
        if text is None:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(root, yaml.MappingNode):
        return []
    for k, v in root.value:
        if isinstance(k, yaml.ScalarNode) and k.value == "mirrors" and isinstance(
                v, yaml.SequenceNode):
            return list(v.value)
    return []


def _interface_mark(mirror: Optional[yaml.Node], name: str) -> Optional[tuple[int, int]]:
    if not isinstance(mirror, yaml.MappingNode):
        return None
    for k, v in mirror.value:
        if isinstance(k, yaml.ScalarNode) and k.value == "interfaces":
            items = v.value if isinstance(v, yaml.SequenceNode) else [v]
            for n in items:
                if isinstance(n, yaml.ScalarNode) and str(n.value) == name:
                    return n.start_mark.line + 1, n.start_mark.column + 1
            return v.start_mark.line + 1, v.start_mark.column + 1
    return mirror.start_mark.line + 1, mirror.start_mark.column + 1
