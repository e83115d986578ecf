"""Rules for single values of a spec that need no YAML: names, interface names, a
collector's address. `mirrord trace` checks its --interface options with them too.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Optional

from ..match import Address

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
IFNAMSIZ = 16
MAX_SHOWN = 60  # characters of a user's value quoted in a message


def show_text(value: object) -> str:
    """A user's value as quoted in a message: one line, bounded in length.
    (yaml_tree.show takes YAML nodes too.)"""
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_SHOWN:
        text = text[:MAX_SHOWN] + "..."
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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
        return None, f"address '{show_text(raw)}' is not an IPv4 or IPv6 address"
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
