"""Health findings: things that make a mirror silently incomplete, each with its fix.

Computed when status is asked for (never on a timer): a few cheap reads of
the plan the daemon already holds, plus one look at the ruleset for flow
offloading, which no event announces in a way the plan would notice.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Optional

from ..backends.nftables.render import PRIO_DELIVERED
from ..netlink.topology import Reach, Topology
from ..plan import Plan, reasons
from ..plan.model import DeliveryPoint
from ..plan.reasons import Code, Reason
from .delivery import Delivery
from .document import FindingRow, MirrorRow
from .dropscan import Copy, find_drop


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str  # "error" | "warning"
    what: str
    fix: str
    mirror: Optional[str] = None

    def as_dict(self) -> FindingRow:
        row: FindingRow = {"code": self.code, "severity": self.severity, "what": self.what,
                           "fix": self.fix}
        if self.mirror is not None:
            row["mirror"] = self.mirror
        return row


def plan_findings(p: Plan, backend_error: str, topo: Optional[Topology] = None) -> list[Finding]:
    """The findings a plan's reasons and its collectors' reach call for.

    `topo`: the topology the plan was built from. The plan already holds
    what health reads of it (a clone mirror's bridge ports); without it, as
    before, no bridge-port finding is reported.
    """
    out: list[Finding] = []
    if topo is not None:
        out += [_finding(mp.mirror.name, r) for mp in p.mirrors for r in mp.bridge_ports]
    if backend_error and any(m.transport == "clone" for m in p.mirrors):
        out.append(Finding("backend-missing", "error", backend_error,
                           "install the package named above (or set backend: to one that works)"))
    mirrored: dict[str, list[str]] = {}
    for mp in p.mirrors:
        for name in mp.mirror.interfaces:
            mirrored.setdefault(name, []).append(mp.mirror.name)
    for mp in p.mirrors:
        name = mp.mirror.name
        first = mp.mirror.directions[0]  # one finding per interface, not per direction
        out += [_finding(name, t.cause) for t in mp.taps
                if t.cause is not None and t.cause.code is Code.INTERFACE_ABSENT
                and t.direction == first]
        reach = mp.reach
        if reach is not None:
            out += _reach_findings(name, reach, mirrored)
        if mp.state == "error":
            out += [_finding(name, r) for r in mp.reasons if r.code in _MIRROR_ERRORS]
        out += [_finding(name, r) for r in mp.reasons if r.code is Code.MEMBERS_DEAD]
    return out


def _reach_findings(name: str, reach: Reach, mirrored: dict[str, list[str]]) -> list[Finding]:
    out: list[Finding] = []
    # From the collector's reach, not from a reason: a TZSP mirror's
    # collector that does not answer ARP/ND is no plan reason (the
    # datagrams go out regardless) and is still worth a finding.
    if reach.neighbour == "FAILED":
        out.append(Finding(
            "collector-neighbour-failed", "error",
            f"mirror {name}: collector {reach.address} does not answer ARP/ND on {reach.oif}",
            reasons.neighbour_failed(reach.address, reach.oif).fix, name))
    if reach.oif and reach.oif in mirrored:
        users = ", ".join(mirrored[reach.oif])
        out.append(Finding(
            "collector-via-mirrored-interface", "warning",
            f"mirror {name}: collector {reach.address} is reached through {reach.oif}, which "
            f"mirror(s) {users} observe: copies share that link with the traffic they copy "
            "(the collector's own traffic is excluded)",
            "give the collector its own port or VLAN if that link is busy", name))
    return out


# The plan's reason codes that are findings, with their finding code and severity.
FINDING_OF: dict[Code, tuple[str, str]] = {
    Code.BRIDGE_PORT: ("bridge-port", "error"),
    Code.INTERFACE_ABSENT: ("interface-absent", "warning"),
    Code.COLLECTOR_OFFLINK: ("collector-offlink", "error"),
    # Both name what to install (kmod-nft-netdev, kmod-vxlan, kmod-gre).
    Code.FRAMES_UNSUPPORTED: ("frames-unsupported", "error"),
    Code.TUNNEL_FAILED: ("tunnel-failed", "error"),
    # A group collector: some members dead (their flows went to the others), or all.
    Code.MEMBERS_DEAD: ("members-dead", "warning"),
    Code.ALL_MEMBERS_DEAD: ("all-members-dead", "error"),
}


# Reasons of a mirror in error that are findings of their own.
_MIRROR_ERRORS = frozenset({Code.COLLECTOR_OFFLINK, Code.FRAMES_UNSUPPORTED, Code.TUNNEL_FAILED,
                            Code.ALL_MEMBERS_DEAD})


def _finding(mirror: str, r: Reason) -> Finding:
    code, severity = FINDING_OF[r.code]
    if r.code is Code.BRIDGE_PORT:
        # OpenWrt's LAN ports (lan1..lan4, DSA) are ports of br-lan: "mirror
        # port lan2" is the first thing people try, so the finding explains.
        what = (f"{r.interface} is a port of {r.bridge}; the IP hooks a kernel clone uses see "
                f"traffic on {r.bridge}, never on its ports, so nothing is copied from "
                f"{r.interface}")
    else:
        what = r.text
    return Finding(code, severity, f"mirror {mirror}: {what}", r.fix, mirror)


def tzsp_findings(mirrors: list[MirrorRow]) -> list[Finding]:
    """Copies a TZSP tap lost in its capture ring, from status's own rows.

    The ring is small by default (512 KiB: the router's memory), so a burst
    or a stretch off the CPU can overflow it; the kernel counts what it
    dropped, and a mirror that loses copies must not look complete.
    """
    out: list[Finding] = []
    for m in mirrors:
        for w in m.get("tzsp", []):
            drops = int(w.get("ring_drops") or 0)
            if drops:
                out.append(Finding(
                    "tzsp-ring-drops", "warning",
                    f"mirror {m['name']}: the capture ring on {w['interface']} dropped {drops} "
                    "frame(s): those copies were never sent",
                    f"raise ring_mib on collector {m['collector']['name']} (the ring absorbs "
                    "bursts; default 512 KiB), or narrow the mirror's match", m["name"]))
            big = int(w.get("oversize") or 0)
            if big:
                # GRO on the way in, or TSO/GSO of the sender (this router,
                # or a host behind veth): the stack handles one frame of many
                # segments, and so does the capture. An IDS truncates it.
                dev = w["interface"]
                out.append(Finding(
                    "tzsp-superframes", "warning",
                    f"mirror {m['name']}: {big} frame(s) captured on {dev} were longer than its "
                    "MTU (GRO/GSO super-frames): an IDS truncates or drops such copies",
                    f"ethtool -K {dev} gro off (and on the interfaces this traffic comes in "
                    "through); for traffic generated on this router or behind veth: ethtool -K "
                    "<sending device> tso off gso off", m["name"]))
    return out


def delivery_findings(p: Plan, dropped: list[Delivery]) -> list[Finding]:
    """Copies that did not leave: which firewall rule drops them, and the fix."""
    out: list[Finding] = []
    for d in dropped:
        point = d.point
        mirrors = list(dict.fromkeys(f[0] for f in point.feeds))
        mp = p.mirror(mirrors[0]) if mirrors else None
        oif = mp.reach.oif if mp is not None and mp.reach is not None else None
        copy, accept = _copy_at(point, oif)
        ruleset = _nft_ruleset()
        culprit = find_drop(ruleset, copy, PRIO_DELIVERED, ("output",)) if ruleset is not None else None
        names = ", ".join(mirrors)
        what = (f"mirror{'s' if len(mirrors) > 1 else ''} {names}: {d.lost} of {d.window_copied} "
                f"copies to {', '.join(point.collectors)} did not leave the router "
                f"({point.describe()}{', through ' + oif if oif else ''})")
        if culprit is not None:
            what += f"; dropped by {culprit.describe()}"
            if culprit.zone:
                fix = (f"let the router send to fw4 zone '{culprit.zone}': set the zone's output "
                       "to ACCEPT (uci set firewall.@zone[N].output='ACCEPT'; uci commit firewall; "
                       "fw4 reload), or add a rule accepting output to the collector")
            else:
                fix = (f"accept the copies before that rule: nft insert rule {culprit.family} "
                       f"{culprit.table} {culprit.chain} {accept}")
        else:
            what += "; no rule of the output hook could be named"
            fix = (f"look for what drops traffic leaving through {oif or 'that device'}: rules of "
                   "the output chains that match named sets or marks, tc "
                   "filters on the device, iptables-legacy rules (iptables-legacy-save)")
        out.append(Finding("copies-dropped", "error", what, fix,
                           mirrors[0] if len(mirrors) == 1 else None))
    return out


def _copy_at(point: DeliveryPoint, oif: Optional[str]) -> tuple[Copy, str]:
    """What is known of the point's copies on their way out, and an nft rule
    that would accept them."""
    fam = "ip6" if point.version == 6 else "ip"
    if point.kind == "clone":
        return (Copy(point.version, oif, ct_state="untracked"),
                f'ct state untracked oifname "{oif}" rt {fam} nexthop {point.address} accept')
    # A tunnel's outer packets are the router's own and get no reply: NEW.
    if point.kind == "vxlan":
        return (Copy(point.version, oif, "new", 17, str(point.address), point.port),
                f"{fam} daddr {point.address} udp dport {point.port} accept")
    return (Copy(point.version, oif, "new", 47, str(point.address)),
            f"{fam} daddr {point.address} meta l4proto gre accept")


# Tables a flow offload rule never lives in: mirrord's own, which hold
# thousands of rules with many mirrors and would make every status slow.
OWN_TABLES = frozenset({("ip", "mirrord"), ("ip6", "mirrord"), ("netdev", "mirrord"),
                        ("inet", "mirrord_trace")})
# Who is spared by flow offloading: a netdev ingress chain at a priority below
# the flowtable's (fw4: 0; mirrord: -300) and an AF_PACKET capture see every
# frame; the IP hooks a clone uses see an offloaded flow's first packets only.
IMMUNE = ("transports span, vxlan, gretap, erspan (netdev hooks, before the flowtable) and tzsp "
          "copy every packet; transport clone copies only their first packets")
_ruleset_at: Optional[tuple[int, Optional[dict[str, Any]]]] = None


def _nft_ruleset() -> Optional[dict[str, Any]]:
    """The ruleset but mirrord's tables, read again only when it changed."""
    global _ruleset_at
    from ..backends.nftables import ruleset_generation

    gen = ruleset_generation()
    if gen is not None and _ruleset_at is not None and _ruleset_at[0] == gen:
        return _ruleset_at[1]
    data = _read_nft_ruleset()
    _ruleset_at = (gen, data) if gen is not None and gen == ruleset_generation() else None
    return data


def _read_nft_ruleset() -> Optional[dict[str, Any]]:
    try:
        from ..backends.libnft import NftSession

        nft = NftSession.open()
        rc, out, _ = nft.json([{"list": {"tables": None}}])
        if rc != 0 or not out:
            return None
        objs: list[Any] = []
        for o in out.get("nftables", []):
            t = o.get("table")
            if not t or (t.get("family"), t.get("name")) in OWN_TABLES:
                continue
            objs += nft.list_table(t["family"], t["name"]) or []
    except (ImportError, OSError):
        return None
    return {"nftables": objs}


def _has_flow_add(o: Any) -> bool:
    if isinstance(o, dict):
        if "flow" in o and isinstance(o["flow"], dict) and o["flow"].get("op") == "add":
            return True
        return any(_has_flow_add(v) for v in o.values())
    if isinstance(o, list):
        return any(_has_flow_add(v) for v in o)
    return False


UCI_FIREWALL = "/etc/config/firewall"
_UCI_OPTION = re.compile(r"""^\s*option\s+(flow_offloading(?:_hw)?)\s+['"]?(\w+)['"]?""")


def uci_offloading(path: str) -> list[str]:
    """The flow_offloading options switched on in an OpenWrt firewall config."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    on: list[str] = []
    section = ""
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("config "):
            section = stripped.split()[1].strip("'\"")
            continue
        m = _UCI_OPTION.match(line)
        if m and section == "defaults" and m.group(2) in ("1", "on", "true", "yes", "enabled"):
            on.append(m.group(1))
    return on


def offload_findings() -> list[Finding]:
    """Flow offloading (fw4 `flow add @ft`, fw3 FLOWOFFLOAD) hides flows from mirrors."""
    out: list[Finding] = []
    uci = os.environ.get("MIRRORD_UCI_FIREWALL", UCI_FIREWALL)
    options = uci_offloading(uci)
    if options:
        out.append(Finding(
            "flow-offload", "warning",
            f"flow offloading is enabled in {uci} ({', '.join(options)}): offloaded flows skip "
            f"prerouting and postrouting: {IMMUNE}"
            + ("; hardware offloading (flow_offloading_hw) bypasses the CPU: no mirror sees "
               "those flows" if "flow_offloading_hw" in options else ""),
            "uci set firewall.@defaults[0].flow_offloading='0'; uci set "
            "firewall.@defaults[0].flow_offloading_hw='0'; uci commit firewall; "
            "/etc/init.d/firewall restart"))
        return out
    ruleset = _nft_ruleset()
    if ruleset is not None:
        for obj in ruleset.get("nftables", []):
            rule = obj.get("rule")
            if rule and _has_flow_add(rule.get("expr")):
                where = f"table {rule['family']} {rule['table']} chain {rule['chain']}"
                out.append(Finding(
                    "flow-offload", "warning",
                    f"flow offloading is active ({where}): offloaded flows skip prerouting and "
                    f"postrouting: {IMMUNE}",
                    "OpenWrt: uci set firewall.@defaults[0].flow_offloading='0'; uci commit "
                    "firewall; /etc/init.d/firewall restart"))
                break
    if shutil.which("iptables-save"):
        try:
            # No -t: naming a table makes iptables-legacy create it.
            saved = subprocess.run(["iptables-save"], capture_output=True, text=True,
                                   timeout=10).stdout
        except (subprocess.TimeoutExpired, OSError):
            saved = ""
        if "FLOWOFFLOAD" in saved:
            out.append(Finding(
                "flow-offload", "warning",
                "flow offloading is active (iptables FLOWOFFLOAD target): offloaded flows skip "
                "the mangle hooks, so mirrors copy only their first packets",
                "OpenWrt: set option flow_offloading '0' in /etc/config/firewall, then "
                "/etc/init.d/firewall restart"))
    return out
