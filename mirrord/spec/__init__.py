"""The mirror spec: YAML -> a typed, validated `Spec`, and what `mirrord check` finds
from the spec alone.

  read.py       load(path) / parse(text): the entry points; SpecError, and only
                SpecError, for anything that is not a valid spec
  yaml_tree.py  bytes -> UTF-8 text -> a YAML node tree, bounded in size, depth
                and alias expansion (libyaml where present, pure PyYAML else)
  validate.py   node tree -> Spec: which keys, which values, how they fit
  matches.py    a mirror's match; match_from_text, the same rules for
                `mirrord trace`'s options
  groups.py     a collector group's members and balance
  nodes.py      reading one typed value from a node; problems at FILE:LINE:COL
  fields.py     rules for one value without YAML: names, interface names,
                a collector's address
  model.py      the result: Spec, Collector, Mirror, SpecError and the constants
  loops.py      copies that would become input to a mirror (`mirrord check`)
"""

from typing import TYPE_CHECKING, Any

from .fields import IFNAMSIZ, MAX_SHOWN, NAME_RE, host_address, valid_ifname
from .model import (
    BACKENDS,
    DEFAULT_PATH,
    DIRECTIONS,
    FAMILIES,
    FRAME_TRANSPORTS,
    GROUP_TRANSPORTS,
    TRANSPORTS,
    TUNNEL_TRANSPORTS,
    TZSP_PORT,
    VXLAN_PORT,
    Backend,
    Collector,
    Direction,
    Mirror,
    Spec,
    SpecError,
    Transport,
    default_path,
)

if TYPE_CHECKING:
    from .matches import match_from_text
    from .read import INTERNAL_ERROR, MAX_LINE, MAX_PROBLEMS, load, parse
    from .yaml_tree import MAX_ALIAS_NODES, MAX_BYTES, MAX_DEPTH, MAX_NODES, show

# What needs PyYAML is imported when first used (PEP 562): the daemon holds the
# model only and reads its spec in a child process (service/spec_reader.py),
# so the parser never takes a router's memory in it (about 1 MiB).
_NEEDS_YAML = {
    "match_from_text": "matches",
    **dict.fromkeys(("INTERNAL_ERROR", "MAX_LINE", "MAX_PROBLEMS", "load", "parse"), "read"),
    **dict.fromkeys(("MAX_ALIAS_NODES", "MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "show"),
                    "yaml_tree"),
}


def __getattr__(name: str) -> Any:
    module = _NEEDS_YAML.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)


__all__ = [
    "BACKENDS",
    "DEFAULT_PATH",
    "DIRECTIONS",
    "FAMILIES",
    "FRAME_TRANSPORTS",
    "GROUP_TRANSPORTS",
    "IFNAMSIZ",
    "INTERNAL_ERROR",
    "MAX_ALIAS_NODES",
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_LINE",
    "MAX_NODES",
    "MAX_PROBLEMS",
    "MAX_SHOWN",
    "NAME_RE",
    "TRANSPORTS",
    "TUNNEL_TRANSPORTS",
    "TZSP_PORT",
    "VXLAN_PORT",
    "Backend",
    "Collector",
    "Direction",
    "Mirror",
    "Spec",
    "SpecError",
    "Transport",
    "default_path",
    "host_address",
    "load",
    "match_from_text",
    "parse",
    "show",
    "valid_ifname",
]
