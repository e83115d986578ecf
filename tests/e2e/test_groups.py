"""Collector groups on the real kernel (issue 13): flows split over members by
symhash, both directions to one member, failover that moves only a dead
member's flows, a reload that moves only the buckets a new member wins.

The members are macvlan devices in the lab's collector namespace, each with
its own MAC and documentation address (arp_ignore=1: only the device holding
an address answers for it). A clone keeps the original packet's IP header,
so which member a copy went to is its destination MAC: tcpdump on the
collector's eth0 records every copy, and each is attributed to a flow by its
addresses and ports.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from collections import defaultdict
from typing import Any, Optional

import pytest

from tests.harness.capture import Background, read_pcap
from tests.harness.lab import LAN_HOST, WAN_HOST, Lab, have_root_netns

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(have_root_netns() is not None, reason=str(have_root_netns())),
]

MEMBERS = ("203.0.113.50", "203.0.113.51", "203.0.113.52")
MACS = {a: f"02:00:00:00:00:{a.rsplit('.', 1)[1]}" for a in MEMBERS}
UDP_PORT, TCP_PORT = 6000, 5000
# 256 UDP flows (the issue asks for 64 at least): symhash has a per-boot seed,
# so a member's share is a draw; with 80 flows in all a member fell outside
# +-50 % of an even split about once in 200 boots, with 272 about once in 10^5.
UDP_FLOWS, TCP_FLOWS, ROUNDS = 256, 16, 4

SERVER = r"""
import selectors, socket, sys, time
udp_port, tcp_port, limit = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
sel = selectors.DefaultSelector()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("", udp_port))
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("", tcp_port)); t.listen(64)
sel.register(u, selectors.EVENT_READ, "udp"); sel.register(t, selectors.EVENT_READ, "listen")
print("serving", file=sys.stderr, flush=True)
end = time.monotonic() + limit
while time.monotonic() < end:
    for key, _ in sel.select(0.2):
        if key.data == "udp":
            data, peer = u.recvfrom(2048); u.sendto(data, peer)
        elif key.data == "listen":
            c, _ = t.accept(); sel.register(c, selectors.EVENT_READ, "tcp")
        else:
            data = key.fileobj.recv(2048)
            if data:
                key.fileobj.sendall(data)
            else:
                sel.unregister(key.fileobj); key.fileobj.close()
"""

CLIENT = r"""
import socket, sys, time
dst, udp_port, tcp_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
udp_flows, tcp_flows, rounds = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
deadline = time.monotonic() + 60
us = []
for i in range(udp_flows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", 41000 + i)); s.settimeout(2); us.append(s)
ts = []
for i in range(tcp_flows):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", 42000 + i)); s.settimeout(5); s.connect((dst, tcp_port)); ts.append(s)
lost = 0
for r in range(rounds):
    for i, s in enumerate(us):
        s.sendto(b"u%d.%d" % (i, r), (dst, udp_port))
        try:
            s.recvfrom(2048)
        except socket.timeout:
            lost += 1
    for i, s in enumerate(ts):
        s.sendall(b"t%d.%d" % (i, r)); s.recv(2048)
    assert time.monotonic() < deadline
for s in ts:
    s.close()
print("lost", lost, flush=True)
"""

# In the router namespace: the kernel's FAILED for a member, then mirrord's
# next change of its table (the failover's apply); prints both, CLOCK_MONOTONIC.
WATCH = r"""
import json, select, sys, time
from mirrord.netlink.watch import NftEvents, RouteEvents
member = sys.argv[1]
route, nft = RouteEvents(), NftEvents(frozenset({("ip", "mirrord")}))
print("watching", file=sys.stderr, flush=True)
failed = applied = None
end = time.monotonic() + 20
while applied is None and time.monotonic() < end:
    ready, _, _ = select.select([route, nft], [], [], 0.5)
    now = time.monotonic()
    if route in ready:
        for c in route.read():
            if failed is None and str(c.neighbour_failed) == member:
                failed = now
    if nft in ready:
        if nft.read() and failed is not None:
            applied = now
print(json.dumps({"failed": failed, "applied": applied}), flush=True)
"""

# In the router namespace: the wall clock of the kernel's FAILED for a member.
FAILED_AT = r"""
import json, select, sys, time
from mirrord.netlink.watch import RouteEvents
member, route = sys.argv[1], RouteEvents()
print("watching", file=sys.stderr, flush=True)
end = time.monotonic() + 20
while time.monotonic() < end:
    if select.select([route], [], [], 0.5)[0]:
        now = time.time()
        if any(str(c.neighbour_failed) == member for c in route.read()):
            print(json.dumps({"failed": now}), flush=True)
            break
"""

# In the collector namespace: the first TZSP copy of the client's UDP port
# `port` at a member other than `dead` (raw IPv4 headers): when it arrived, and
# when its packet was sent (the stream's payload; a copy waits in the capture
# ring up to its block's retire timer, which is not the failover's).
FIRST_COPY = r"""
import json, socket, struct, sys, time
port, dead = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind(("eth0", 0)); s.settimeout(0.2)
print("listening", file=sys.stderr, flush=True)
end = time.monotonic() + 20
while time.monotonic() < end:
    try:
        f = s.recv(256)
    except socket.timeout:
        continue
    now = time.time()
    if len(f) < 90 or f[23] != 17 or struct.unpack_from("!H", f, 36)[0] != 37008:
        continue
    to, inner = socket.inet_ntoa(f[30:34]), f[47:]
    if to != dead and inner[23] == 17 and struct.unpack_from("!H", inner, 34)[0] == port:
        sent = float(inner[42:].split(b" ")[1])
        print(json.dumps({"first": now, "sent": sent, "member": to}), flush=True)
        break
"""

# From the LAN host: one UDP datagram from `port` every millisecond, 5000 at most.
STREAM = r"""
import socket, sys, time
dst, dport, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("", port))
print("sending", file=sys.stderr, flush=True)
for i in range(5000):
    s.sendto(b"s%d %.6f " % (i, time.time()), (dst, dport)); time.sleep(0.001)
"""

Flow = tuple[int, int]  # (protocol, the client's port): names a flow, both directions


def spec(members: tuple[str, ...]) -> str:
    return f"""\
backend: nftables
collectors:
  sensors:
    transport: clone
    members: [{", ".join(members)}]
    balance: flow
mirrors:
  - name: m
    interfaces: [br-lan]
    collector: sensors
"""


# Copies inside UDP datagrams: (port, where the copied frame starts in a captured one).
VXLAN = (4789, 14 + 20 + 8 + 8)
TZSP = (37008, 14 + 20 + 8 + 5)


def add_members(lab: Lab, encap: Optional[tuple[int, int]] = None) -> None:
    """The members in the collector namespace, each counted there in the kernel:
    clones by their destination MAC, VXLAN and TZSP datagrams by their destination."""
    lab.col.run("sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1")
    lab.count_at_collector({f"m{k}": (f"ip daddr {a} udp dport {encap[0]}" if encap else
                                      f"ether daddr {MACS[a]} meta protocol ip")
                            for k, a in enumerate(MEMBERS)})
    if encap == TZSP:
        # No listener: without this, each member's port unreachable would fail
        # the capture process's next send to it (ECONNREFUSED), a lost copy.
        lab.col.run("nft", "-f", "-", input="table inet sink {\n chain in {\n  type filter "
                    "hook input priority 0; policy accept;\n  udp dport 37008 drop\n }\n}\n")
    for k, a in enumerate(MEMBERS):
        dev = f"m{k}"
        lab.col.sh(f"ip link add {dev} link eth0 address {MACS[a]} type macvlan mode bridge && "
                   f"ip addr add {a}/24 dev {dev} && ip link set {dev} up")
    # Dead members are noticed fast, as silence_collector in test_heal does.
    lab.rtr.sh("sysctl -qw net.ipv4.neigh.col.retrans_time_ms=100 "
               "net.ipv4.neigh.col.ucast_solicit=1 net.ipv4.neigh.col.mcast_solicit=3")
    for a in MEMBERS:
        lab.rtr.run("ping", "-c1", "-W2", a)


def silence(lab: Lab, member: str) -> None:
    """`member` stops answering ARP: its address gone from the collector, the
    router's entry for it deleted and resolved again, which fails."""
    lab.col.run("ip", "addr", "del", f"{member}/24", "dev", f"m{MEMBERS.index(member)}")
    lab.rtr.run("ip", "neigh", "del", member, "dev", "col")  # only its entry
    lab.rtr.run("ping", "-c1", "-W1", member, check=False)  # resolution fails


def members_of(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {mb["name"]: mb for mb in st["mirrors"][0].get("members", [])}


def mirror_packets(lab: Lab) -> tuple[int, dict[str, int]]:
    """The mirror's copies, and each member's (their counters)."""
    st = lab.wait_for_status(bool)
    return int(st["mirrors"][0]["packets"]), {a: mb["packets"] for a, mb in members_of(st).items()}


Run = tuple[dict[Flow, dict[str, dict[str, int]]], dict[str, int], int, dict[str, int]]


def run_flows(lab: Lab, encap: Optional[tuple[int, int]] = None,
              ports: tuple[str, ...] = ()) -> Run:
    """Every flow's copies: flow -> member -> {"up": n, "down": n} (captured);
    the copies that reached each member (counted in the collector's kernel);
    the mirror's own count of what it copied, and each member counter's."""
    pcap = f"/tmp/{lab.tag}-groups.pcap"
    macs = " or ".join(f"ether dst {m}" for m in MACS.values())
    bpf = f"udp dst port {encap[0]}" if encap else f"ip and ({macs})"
    # A stray frame (ARP, a neighbour probe) crossing the mirrored port while
    # the counts are taken would be on one side only: take them again until
    # the mirror copied nothing in between.
    while True:
        before, members_before = mirror_packets(lab)
        lab.reset_collector_counts()
        if mirror_packets(lab)[0] == before:
            break
    server = Background(lab.wan.name, [sys.executable, "-c", SERVER, str(UDP_PORT),
                                       str(TCP_PORT), "90"], "serving")
    # The capture attributes copies to flows; the counts that prove none was
    # lost or doubled are the collector's kernel counters. (Without
    # --immediate-mode tcpdump left copies in its ring at SIGINT.)
    where = {p: f"{pcap}.{p}" for p in ports} or {"eth0": pcap}
    caps = [Background(lab.col.name, ["tcpdump", "-i", dev, "-n", "-U", "--immediate-mode",
                                      "-B", "16384", "-s", "192", "-w", path,
                                      "ip" if ports else bpf], "listening on")
            for dev, path in where.items()]
    try:
        out = lab.lan.run(sys.executable, "-c", CLIENT, WAN_HOST, str(UDP_PORT), str(TCP_PORT),
                          str(UDP_FLOWS), str(TCP_FLOWS), str(ROUNDS), timeout=90).stdout
        assert out.startswith("lost 0"), out
        server.kill()  # its connections' last packets (FIN or RST) are copied too
        (after, members), last = mirror_packets(lab), -1
        deadline = time.monotonic() + 10
        while after != last and time.monotonic() < deadline:  # copying has stopped
            time.sleep(0.5)
            last = after
            after, members = mirror_packets(lab)
    finally:
        for cap in caps:
            cap.stop()
        server.kill()
    by_mac = {m: a for a, m in MACS.items()}
    flows: dict[Flow, dict[str, dict[str, int]]] = defaultdict(
        lambda: defaultdict(lambda: {"up": 0, "down": 0}))
    total = 0
    frames = [(dev, f) for dev, path in where.items() for f, _ in read_pcap(path)[1]]
    for path in where.values():
        os.unlink(path)
    for dev, frame in frames:
        total += 1
        if ports:  # the member is the port the frame came out of
            member = dev
        elif encap:  # the member is the outer destination; the flow is the inner frame's
            member = ".".join(map(str, frame[30:34]))
            frame = frame[encap[1]:]
        else:
            member = by_mac[":".join(f"{b:02x}" for b in frame[:6])]
        if frame[12:14] != b"\x08\x00" or frame[23] not in (6, 17):
            continue
        ihl = (frame[14] & 0x0F) * 4
        src_ip = ".".join(map(str, frame[26:30]))
        sport, dport = struct.unpack_from("!HH", frame, 14 + ihl)
        up = src_ip == LAN_HOST
        client = sport if up else dport
        if not (41000 <= client < 41000 + UDP_FLOWS or 42000 <= client < 42000 + TCP_FLOWS):
            continue
        flows[(frame[23], client)][member]["up" if up else "down"] += 1
    while True:
        counts = lab.collector_counts()
        again = mirror_packets(lab)
        if again == (after, members):
            break
        after, members = again
    arrived = {a: counts[f"m{k}"] for k, a in enumerate(ports or MEMBERS)}
    print("arrived", arrived, "captured", total, "copied", after - before, file=sys.stderr)
    return flows, arrived, after - before, {
        a: members.get(a, 0) - members_before.get(a, 0) for a in members}


def flows_move_off(lab: Lab, encap: tuple[int, int], before: dict[Flow, str],
                   dead: str) -> dict[Flow, str]:
    """With `dead` dead: every copy made reached a live member, and exactly the
    flows `dead` held (in `before`) moved."""
    for a in MEMBERS:
        lab.rtr.run("ping", "-c1", "-W2", a, check=False)
    flows, arrived, copied, _ = run_flows(lab, encap)
    after = owner(flows)
    assert sum(arrived.values()) == copied and arrived[dead] == 0, (arrived, copied)
    moved = {f for f in before if before[f] != after[f]}
    assert moved and moved == {f for f in before if before[f] == dead}, "other flows moved"
    return after


def owner(flows: dict[Flow, dict[str, dict[str, int]]]) -> dict[Flow, str]:
    """Each flow's one member (asserted: both directions there, nowhere else)."""
    out: dict[Flow, str] = {}
    for f, at in flows.items():
        assert len(at) == 1, f"flow {f} copied to {sorted(at)}"
        member, counts = next(iter(at.items()))
        assert counts["up"] > 0 and counts["down"] > 0, (f, counts)
        out[f] = member
    return out


def test_flows_split_by_member_both_directions_and_failover_moves_only_the_dead() -> None:
    with Lab(ipv6=False) as lab:
        add_members(lab)
        lab.start_daemon(lab.write_spec(spec(MEMBERS)))
        st = lab.wait_for_status(lambda s: s and s["mirrors"][0]["state"] == "active"
                                 and len(members_of(s)) == 3)
        assert sum(mb["buckets"] for mb in members_of(st).values()) == 64

        # (a) every flow at exactly one member, both directions; shares; totals.
        flows, arrived, copied, counted = run_flows(lab)
        assert len(flows) == UDP_FLOWS + TCP_FLOWS
        first = owner(flows)
        share = {a: sum(1 for m in first.values() if m == a) for a in MEMBERS}
        even = len(first) / 3
        assert all(0.5 * even <= n <= 1.5 * even for n in share.values()), share
        # Every copy the mirror made (its counter, as with one collector) reached
        # a member: none twice, none lost; the members' counters add up to it.
        assert sum(arrived.values()) == copied, (arrived, copied)
        assert counted == arrived  # each member's counter: what reached it
        st = lab.wait_for_status(bool)
        # Delivery: a point per member, fed by its counter, every copy left.
        rows = st["mirrors"][0]["delivery"]
        assert sorted(r["via"] for r in rows) == [f"clones routed to {a}" for a in MEMBERS]
        assert all(r["verdict"] == "leaving" and r["copied"] == r["left"] for r in rows), rows
        buckets_before = {a: mb["buckets"] for a, mb in members_of(st).items()}

        # (b) member .51 stops answering ARP: its neighbour goes FAILED.
        dead = MEMBERS[1]
        watch = Background(lab.rtr.name, [sys.executable, "-c", WATCH, dead], "watching")
        silence(lab, dead)
        st = lab.wait_for_status(lambda s: s and members_of(s)[dead]["state"] == "dead",
                                 timeout=15)
        assert st["mirrors"][0]["state"] == "degraded" and dead in st["mirrors"][0]["reason"]
        assert watch.wait(30) == 0, watch.stderr
        seen = json.loads(watch.stdout)
        heal_ms = (seen["applied"] - seen["failed"]) * 1000
        print(f"failover applied {heal_ms:.1f} ms after the kernel's FAILED", file=sys.stderr)
        assert heal_ms < 1000, heal_ms  # the same path as any heal (10 ms debounce)
        for a in MEMBERS:
            lab.rtr.run("ping", "-c1", "-W2", a, check=False)
        flows, arrived, copied, counted = run_flows(lab)
        second = owner(flows)
        assert sum(arrived.values()) == copied and arrived[dead] == 0, (arrived, copied)
        assert dead not in second.values()
        moved = {f for f in first if first[f] != second[f]}
        assert moved == {f for f in first if first[f] == dead}, "other members' flows moved"
        assert moved, "the dead member held no flow: the test proves nothing"
        after = members_of(lab.wait_for_status(bool))
        assert after[dead]["buckets"] == 0
        assert sum(after[a]["buckets"] - buckets_before[a] for a in MEMBERS if a != dead) == (
            buckets_before[dead])
        assert "member 203.0.113.51 FAILED" in lab.daemon_log()

        # It answers again: its buckets, and so its flows, return.
        lab.col.run("ip", "addr", "add", f"{dead}/24", "dev", "m1")
        st = lab.wait_for_status(lambda s: s and members_of(s)[dead]["state"] == "alive",
                                 timeout=15)
        assert {a: mb["buckets"] for a, mb in members_of(st).items()} == buckets_before
        assert st["mirrors"][0]["state"] == "active"
        flows, arrived, copied, counted = run_flows(lab)
        assert owner(flows) == first
        assert sum(arrived.values()) == copied and arrived[dead] > 0, (arrived, copied)


def test_reload_from_two_to_three_members_moves_only_the_new_members_buckets() -> None:
    with Lab(ipv6=False) as lab:
        add_members(lab)
        path = lab.write_spec(spec(MEMBERS[:2]))
        p = lab.start_daemon(path)
        lab.wait_for_status(lambda s: s and s["mirrors"][0]["state"] == "active")
        two = lab.mirrord("render", "-c", path, "--offline", check=True).stdout
        flows, _, _, _ = run_flows(lab)
        first = owner(flows)
        assert set(first.values()) == set(MEMBERS[:2])
        lab.write_spec(spec(MEMBERS))
        p.send_signal(1)  # SIGHUP: reload
        st = lab.wait_for_status(lambda s: s and len(members_of(s)) == 3
                                 and s["mirrors"][0]["state"] == "active")
        new = MEMBERS[2]
        assert members_of(st)[new]["buckets"] > 0
        flows, _, _, _ = run_flows(lab)
        second = owner(flows)
        moved = {f for f in first if first[f] != second[f]}
        assert moved and all(second[f] == new for f in moved), "a flow moved between old members"
        # The rendered maps say the same, bucket by bucket.
        three = lab.mirrord("render", "-c", path, "--offline", check=True).stdout
        old_map, new_map = _bucket_owner(two), _bucket_owner(three)
        assert all(new_map[b] in (old_map[b], "g_sensors_2") for b in range(64))
        assert sum(1 for b in range(64) if new_map[b] != old_map[b]) == (
            members_of(st)[new]["buckets"])


def _bucket_owner(text: str) -> dict[int, str]:
    """bucket -> member chain, from `mirrord render`'s first symhash map."""
    body = text.split("symhash mod 64 vmap {", 1)[1].split("}", 1)[0]
    out: dict[int, str] = {}
    for item in body.split(","):
        key, _, target = item.strip().partition(" : jump ")
        low, _, high = key.partition("-")
        for b in range(int(low), int(high or low) + 1):
            out[b] = target.strip()
    return out


def test_vxlan_group_one_tunnel_per_member_each_flow_at_one_member() -> None:
    """A vxlan group of 3: a tunnel device per member (VNI 100 + k), every flow's
    frames, both directions, inside the datagrams to exactly one member. A
    member stops answering: only its flows move, its tunnel device stays."""
    with Lab(ipv6=False) as lab:
        add_members(lab, VXLAN)
        text = spec(MEMBERS).replace("transport: clone", "transport: vxlan\n    vni: 100")
        lab.start_daemon(lab.write_spec(text))
        st = lab.wait_for_status(lambda s: s and s["mirrors"][0]["state"] == "active"
                                 and len(members_of(s)) == 3)
        links = lab.rtr.run("ip", "-d", "link", "show", "type", "vxlan").stdout
        for k, a in enumerate(MEMBERS):
            assert f"mvx-sensors~{k}:" in links and f"vxlan id {100 + k} remote {a} " in links
        flows, arrived, copied, counted = run_flows(lab, VXLAN)
        assert len(flows) == UDP_FLOWS + TCP_FLOWS
        placed = owner(flows)
        assert set(placed.values()) == set(MEMBERS)
        assert sum(arrived.values()) == copied and counted == arrived, (arrived, copied, counted)
        assert sum(mb["buckets"] for mb in members_of(st).values()) == 64

        dead = MEMBERS[1]
        silence(lab, dead)
        st = lab.wait_for_status(lambda s: s and members_of(s)[dead]["state"] == "dead",
                                 timeout=15)
        assert st["mirrors"][0]["state"] == "degraded" and dead in st["mirrors"][0]["reason"]
        flows_move_off(lab, VXLAN, placed, dead)
        assert "mvx-sensors~1:" in lab.rtr.run("ip", "link", "show", "type", "vxlan").stdout


def test_span_group_a_port_down_moves_only_its_flows() -> None:
    """A span group of 3 ports (veth pairs into the collector namespace): each
    flow's frames out of exactly one port; one port down: only its flows move."""
    ports = ("sp0", "sp1", "sp2")
    with Lab(ipv6=False) as lab:
        for k, port in enumerate(ports):
            tmp = f"{lab.tag}s{k}"[:15]
            lab.rtr.run("ip", "link", "add", port, "type", "veth", "peer", "name", tmp)
            lab.rtr.run("ip", "link", "set", tmp, "netns", lab.col.name)
            lab.col.run("ip", "link", "set", tmp, "name", port)
            # Nothing but the copies leaves the router's ports (no IPv6 of their own).
            lab.rtr.sh(f"sysctl -qw net.ipv6.conf.{port}.disable_ipv6=1 && "
                       f"ip link set {port} up")
            lab.col.sh(f"sysctl -qw net.ipv6.conf.{port}.disable_ipv6=1 && "
                       f"ip link set {port} up")
        chains = "".join(
            f'  chain c{k} {{ type filter hook ingress device "{p}" priority 0; '
            f'counter name "m{k}"; }}\n' for k, p in enumerate(ports))
        counters = "".join(f"  counter m{k} {{ }}\n" for k in range(len(ports)))
        lab.col.run("nft", "-f", "-", input=f"table netdev lab {{\n{counters}{chains}}}\n")
        text = f"""\
backend: nftables
collectors:
  sensors:
    transport: span
    members: [{", ".join(ports)}]
mirrors:
  - name: m
    interfaces: [br-lan]
    collector: sensors
"""
        lab.start_daemon(lab.write_spec(text))
        lab.wait_for_status(lambda s: s and s["mirrors"][0]["state"] == "active"
                            and len(members_of(s)) == 3)
        flows, arrived, copied, counted = run_flows(lab, ports=ports)
        first = owner(flows)
        assert set(first.values()) == set(ports)
        assert sum(arrived.values()) == copied and counted == arrived, (arrived, copied, counted)

        lab.rtr.run("ip", "link", "set", "sp1", "down")
        st = lab.wait_for_status(lambda s: s and members_of(s)["sp1"]["state"] == "dead")
        assert st["mirrors"][0]["state"] == "degraded"
        assert "port sp1 is down" in members_of(st)["sp1"]["reason"]
        flows, arrived, copied, counted = run_flows(lab, ports=ports)
        second = owner(flows)
        moved = {f for f in first if first[f] != second[f]}
        assert moved == {f for f in first if first[f] == "sp1"} and moved
        assert arrived["sp1"] == 0 and sum(arrived.values()) == copied, (arrived, copied)


def test_tzsp_group_flows_split_in_the_socket_filters_and_failover_keeps_the_taps() -> None:
    """A tzsp group of 3: one tap per member, each sending only its buckets'
    flows (its socket filter), the members spread over one capture process
    per CPU. Member .51 dies: its taps close, the others keep their taps (same
    id, same ring: their filters are swapped) and take exactly its flows."""
    with Lab(ipv6=False) as lab:
        add_members(lab, TZSP)
        lab.start_daemon(lab.write_spec(spec(MEMBERS).replace("transport: clone",
                                                              "transport: tzsp")))
        st = lab.wait_for_status(lambda s: s and s["mirrors"][0]["state"] == "active"
                                 and len(members_of(s)) == 3)
        taps = {w["member"]: w for w in st["mirrors"][0]["tzsp"]}
        assert sorted(taps) == sorted(MEMBERS)
        cpus = len(os.sched_getaffinity(0))
        assert len({w["pid"] for w in taps.values()}) == min(3, cpus)
        flows, arrived, copied, counted = run_flows(lab, TZSP)
        assert len(flows) == UDP_FLOWS + TCP_FLOWS
        first = owner(flows)
        share = {a: sum(1 for m in first.values() if m == a) for a in MEMBERS}
        even = len(first) / 3
        assert all(0.5 * even <= n <= 1.5 * even for n in share.values()), share
        assert sum(arrived.values()) == copied and counted == arrived, (arrived, copied, counted)

        dead = MEMBERS[1]
        # A flow of the member about to die, streaming: when does its first copy
        # reach another member, after the kernel said FAILED?
        port = min(c for (proto, c), m in first.items() if proto == 17 and m == dead)
        copy = Background(lab.col.name, [sys.executable, "-c", FIRST_COPY, str(port), dead],
                          "listening")
        stream = Background(lab.lan.name, [sys.executable, "-c", STREAM, WAN_HOST,
                                           str(UDP_PORT), str(port)], "sending")
        watch = Background(lab.rtr.name, [sys.executable, "-c", FAILED_AT, dead], "watching")
        try:
            silence(lab, dead)
            assert watch.wait(30) == 0 and copy.wait(30) == 0, (watch.stderr, copy.stderr)
        finally:
            stream.kill()
        failed, moved_to = json.loads(watch.stdout)["failed"], json.loads(copy.stdout)
        heal_ms = (moved_to["sent"] - failed) * 1000
        print(f"tzsp failover: the first packet copied to {moved_to['member']} was sent "
              f"{heal_ms:.1f} ms after the kernel's FAILED (its copy arrived "
              f"{(moved_to['first'] - failed) * 1000:.1f} ms after)", file=sys.stderr)
        assert heal_ms < 1000, heal_ms
        st = lab.wait_for_status(lambda s: s and members_of(s)[dead]["state"] == "dead",
                                 timeout=15)
        assert st["mirrors"][0]["state"] == "degraded"
        kept = {w["member"]: w["id"] for w in st["mirrors"][0]["tzsp"]}
        assert kept == {a: taps[a]["id"] for a in MEMBERS if a != dead}, "a live member's tap was replaced"
        flows_move_off(lab, TZSP, first, dead)
        assert "filter changed" in lab.daemon_log()

        lab.col.run("ip", "addr", "add", f"{dead}/24", "dev", "m1")
        st = lab.wait_for_status(lambda s: s and members_of(s)[dead]["state"] == "alive"
                                 and s["mirrors"][0]["state"] == "active", timeout=15)
        flows, arrived, copied, counted = run_flows(lab, TZSP)
        assert owner(flows) == first
        assert sum(arrived.values()) == copied and counted == arrived, (arrived, copied, counted)
