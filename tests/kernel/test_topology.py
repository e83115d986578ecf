"""topology.read against the real kernel, checked against what `ip -j` reports.

The router namespace of the lab gets the cases a router has: a bridge and its
port, a VXLAN, a link that is down, a tap that is up without carrier, a changed MTU, routes via IPv4 and IPv6
gateways, a blackhole, a collector that is the router itself, one without a
route, and resolved and unresolved neighbours. iproute2 is the oracle; it
asks the kernel through its own netlink code.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from typing import Any, Optional

import pytest

from mirrord.netlink import topology
from tests.harness.lab import COLLECTOR, COLLECTOR6, RTR_LAN, RTR_WAN, Lab, Netns, have_root_netns

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(have_root_netns() is not None, reason=str(have_root_netns())),
]

GW_NET, GW_DST = "198.51.100.128/25", "198.51.100.200"  # routed via the collector
GW6_NET, GW6_DST = "2001:db8:4::/64", "2001:db8:4::1"
UNRESOLVED = "203.0.113.99"  # on-link, nobody there: no neighbour entry until asked
NO_ROUTE6 = "2001:db8:99::1"
BLACKHOLE_NET, BLACKHOLE = "198.51.100.64/26", "198.51.100.70"

COLLECTORS: list[tuple[str, Optional[str]]] = [
    (COLLECTOR, None), (COLLECTOR, "col"), (COLLECTOR, "wan"), (COLLECTOR6, None),
    (GW_DST, None), (GW6_DST, None), (UNRESOLVED, None), (RTR_LAN, None),
    (NO_ROUTE6, None), (BLACKHOLE, None), (COLLECTOR, "nonexistent0"),
]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        lab.rtr.sh(
            f"ip link add vx7 type vxlan id 7 dstport 4789 local {RTR_WAN}\n"
            "ip link set vx7 up\n"
            "ip link add spare0 type veth peer name spare1\n"  # left down
            # Administratively up, but no carrier: not usable.
            "ip tuntap add tap0 mode tap\n"
            "ip link set tap0 up\n"
            "ip link set col mtu 1400\n"
            f"ip route add {GW_NET} via {COLLECTOR}\n"
            f"ip -6 route add {GW6_NET} via {COLLECTOR6}\n"
            f"ip route add blackhole {BLACKHOLE_NET}\n"
        )
        lab.rtr.run("ping", "-c1", "-W2", COLLECTOR6)
        yield lab


def ip_json(ns: Netns, *argv: str) -> Any:
    return json.loads(ns.run("ip", "-j", *argv).stdout or "[]")


def read_in(ns: Netns) -> topology.Topology:
    """topology.read run inside the namespace; the result comes back as JSON."""
    code = (
        "import ipaddress, json, sys, dataclasses\n"
        "from mirrord.netlink import topology\n"
        "keys = [(ipaddress.ip_address(a), i) for a, i in json.loads(sys.argv[1])]\n"
        "t = topology.read(keys)\n"
        "print(json.dumps({'links': [dataclasses.asdict(l) for l in t.links.values()],\n"
        "  'reach': [[str(k[0]), k[1], {**dataclasses.asdict(r), 'address': str(r.address),\n"
        "                                'prefixes': [str(p) for p in r.prefixes]}]\n"
        "            for k, r in t.reach.items()]}))\n"
    )
    out = json.loads(ns.python(code, json.dumps(COLLECTORS)))
    links = {d["name"]: topology.Link(**d) for d in out["links"]}
    reach = {}
    for a, i, r in out["reach"]:
        r["address"] = ipaddress.ip_address(r["address"])
        r["prefixes"] = tuple(ipaddress.ip_network(p) for p in r["prefixes"])
        reach[(ipaddress.ip_address(a), i)] = topology.Reach(**r)
    return topology.Topology(links=links, reach=reach)


def test_links_match_ip_link(lab: Lab) -> None:
    topo = read_in(lab.rtr)
    shown = ip_json(lab.rtr, "-d", "link", "show")
    index = {d["ifname"]: d["ifindex"] for d in shown}
    assert set(topo.links) == set(index)
    for d in shown:
        link = topo.links[d["ifname"]]
        arphrd = int(lab.rtr.sh(f"cat /sys/class/net/{d['ifname']}/type"))
        expected = topology.Link(
            name=d["ifname"], index=d["ifindex"],
            up="UP" in d["flags"] and d["operstate"] in ("UP", "UNKNOWN"),
            kind=d.get("linkinfo", {}).get("info_kind"), arphrd=arphrd, mtu=d["mtu"],
            master=index[d["master"]] if "master" in d else None,
        )
        assert link == expected, d
    # The lab's own shape, so that the comparison above covered each case.
    assert topo.links["lan0"].master == topo.links["br-lan"].index
    assert topo.links["br-lan"].kind == "bridge" and topo.links["vx7"].kind == "vxlan"
    assert topo.links["lo"].up and topo.links["lo"].arphrd == 772
    assert not topo.links["spare0"].up and topo.links["col"].mtu == 1400
    assert not topo.links["tap0"].up and "UP" in next(
        d["flags"] for d in shown if d["ifname"] == "tap0")


def expected_reach(ns: Netns, links: dict[str, topology.Link], address: str,
                   oif: Optional[str]) -> tuple[Optional[str], Optional[str], bool, Optional[str]]:
    """(oif, gateway, local, neighbour state) from `ip route get` and `ip neigh`; None if unroutable."""
    argv = ["ip", "-j", "route", "get", address] + (["oif", oif] if oif else [])
    p = ns.run(*argv, check=False)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)[0]
    if r.get("type") == "local":
        return None, None, True, None
    neighbour = None
    if "gateway" not in r:
        for n in ip_json(ns, "neigh", "show", "dev", r["dev"]):
            if ipaddress.ip_address(n["dst"]) == ipaddress.ip_address(address):
                neighbour = n["state"][0]
    return r["dev"], r.get("gateway"), False, neighbour


def test_reach_matches_ip_route_get(lab: Lab) -> None:
    topo = read_in(lab.rtr)
    for address, oif in COLLECTORS:
        reach = topo.reach[(ipaddress.ip_address(address), oif)]
        if oif == "nonexistent0":
            assert reach.error == "collector interface nonexistent0 does not exist"
            continue
        p = lab.rtr.run("ip", "route", "get", address, check=False)
        if address == NO_ROUTE6:
            assert p.returncode != 0 and "unreachable" in p.stderr
            assert reach.error == f"no route to collector {address}"
            continue
        if address == BLACKHOLE:
            # The kernel answers EINVAL for a blackhole route, as to iproute2.
            assert p.returncode != 0 and "Invalid argument" in p.stderr
            assert reach.error is not None and "Invalid argument" in reach.error
            continue
        dev, gateway, local, neighbour = expected_reach(lab.rtr, topo.links, address, oif)
        assert (reach.oif, reach.gateway, reach.local, reach.neighbour, reach.error) == (
            dev, gateway, local, neighbour, None), (address, oif)
    # The cases above are the ones meant: a neighbour seen, gateways of both families.
    assert topo.reach[(ipaddress.ip_address(COLLECTOR), None)].neighbour == "REACHABLE"
    assert topo.reach[(ipaddress.ip_address(COLLECTOR6), None)].neighbour == "REACHABLE"
    assert topo.reach[(ipaddress.ip_address(GW_DST), None)].gateway == COLLECTOR
    assert topo.reach[(ipaddress.ip_address(GW6_DST), None)].gateway == COLLECTOR6
    assert topo.reach[(ipaddress.ip_address(RTR_LAN), None)].local
    assert topo.reach[(ipaddress.ip_address(COLLECTOR), "wan")].oif == "wan"
    # On-link collectors carry the router's own prefixes that hold them (for
    # the broadcast and network-address checks); routed ones carry none.
    for address in (COLLECTOR, COLLECTOR6):
        reach = topo.reach[(ipaddress.ip_address(address), None)]
        want = {ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
                for i in ip_json(lab.rtr, "addr", "show", "dev", str(reach.oif))
                for a in i["addr_info"]}
        want = {n for n in want if ipaddress.ip_address(address) in n}
        assert want and set(reach.prefixes) == want, (address, reach.prefixes, want)
    assert topo.reach[(ipaddress.ip_address(GW_DST), None)].prefixes == ()


def test_many_links_dump_spans_datagrams(lab: Lab) -> None:
    """A dump larger than one datagram (a router with many VLANs) is read whole."""
    ns = Netns(f"{lab.tag}-many")
    lab.spaces.append(ns)  # deleted with the lab
    lab._ip("netns", "add", ns.name)
    ns.run("ip", "-batch", "-", input="".join(
        f"link add v{i} type veth peer name p{i}\n" for i in range(60)))
    topo = read_in(ns)
    names = {d["ifname"] for d in ip_json(ns, "link", "show")}
    assert len(names) == 121 and set(topo.links) == names
