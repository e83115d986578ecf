"""TZSP copies of partial-checksum frames arrive with valid checksums (issue 14, item 5).

Hosts behind veth hand the router CHECKSUM_PARTIAL packets: the capture ring
marks them TP_STATUS_CSUMNOTREADY and their TCP/UDP checksum field holds only
the pseudo-header sum. An IDS checking checksums (Suricata's default) drops
such copies, so the forwarder completes them. What reaches the collector is
decoded by tshark (TZSP, then the inner frame) with checksum checks on: none
may be bad. GRO/GSO super-frames (a TCP burst across veth) are counted as
`oversize`.
"""

from __future__ import annotations

import ipaddress
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any, Optional

import pytest

from mirrord.match import Match, PortRange
from mirrord.tzsp.job import TzspJob
from tests.harness.capture import Background, read_pcap, receiver
from tests.harness.fixtures import lab_then_clean
from tests.harness.lab import (
    ROOT,
    WAN_HOST,
    WAN_HOST6,
    Lab,
    have_root_netns,
    python_env,
    spec_text,
)
from tests.harness.tzsp import WorkerRun
from tests.harness.wait import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(have_root_netns() is not None, reason=str(have_root_netns())),
]

TCP_PORT, UDP_PORT = 5001, 5555
TCP_BYTES = 200_000  # per connection: some super-frames, bounded
UDP_COUNT = 40       # per family
SMALL_BYTES = sum(len(b"small %d " % i) + i for i in range(5))  # the client's first writes
MATCH = Match(protocols=(6, 17), ports=(PortRange(TCP_PORT, TCP_PORT),
                                        PortRange(UDP_PORT, UDP_PORT)))

SERVER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen(4)
s.settimeout(20)
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    c, _ = s.accept()
    c.settimeout(20)
    n = 0
    while True:
        d = c.recv(1 << 16)
        if not d:
            break
        n += len(d)
    c.sendall(b"ok")
    c.close()
    print(n, flush=True)
"""

CLIENT = r"""
import socket, sys
dst, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((dst, port), timeout=20)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for i in range(5):  # small segments, odd lengths among them
    s.sendall(b"small %d " % i + b"x" * i)
chunk = b"y" * 65536
sent = 0
while sent < total:
    sent += s.send(chunk[:total - sent])
s.shutdown(socket.SHUT_WR)
assert s.recv(2) == b"ok"
"""

# Frames sent with a virtio-net header: VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start
# and csum_offset make the skb CHECKSUM_PARTIAL, as a VM's virtio NIC does.
SEND_NEEDS_CSUM = r"""
import socket, struct, sys, time
dev, start, offset = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
s.setsockopt(263, 15, 1)  # SOL_PACKET, PACKET_VNET_HDR
s.bind((dev, 0))
vnet = struct.pack("=BBHHHH", 1, 0, 0, 0, start, offset)
for h in sys.argv[4:]:
    s.send(vnet + bytes.fromhex(h))
    time.sleep(0.002)
"""

# The same through a tun device opened with IFF_VNET_HDR: packets with no link
# header (a raw-IP link: WireGuard, PPP, tun) that enter CHECKSUM_PARTIAL.
TUN_WRITE_NEEDS_CSUM = r"""
import fcntl, os, struct, sys, time
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", sys.argv[1].encode(), 0x0001 | 0x1000 | 0x4000))
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    with open(f"/sys/class/net/{sys.argv[1]}/operstate") as f:
        if f.read().strip() != "down":
            break
    time.sleep(0.01)
for item in sys.argv[2:]:
    start, offset, h = item.split(":")
    os.write(fd, struct.pack("=BBHHHH", 1, 0, 0, 0, int(start), int(offset)) + bytes.fromhex(h))
    time.sleep(0.002)
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from lab_then_clean(offlink=False, ipv6=True)


def ifindex(ns: Any, name: str) -> int:
    return int(ns.sh(f"cat /sys/class/net/{name}/ifindex"))


def make_job(lab: Lab, iface: str, directions: tuple[str, ...], port: int) -> TzspJob:
    return TzspJob(mirror=f"c-{iface}-{port}", interface=iface, ifindex=ifindex(lab.rtr, iface),
                   directions=directions, match=MATCH,
                   collector=ipaddress.ip_address(lab.collector), port=port, snaplen=65535)


def tcp_transfers(lab: Lab, destinations: list[str]) -> None:
    server = subprocess.Popen(
        ["ip", "netns", "exec", lab.wan.name, sys.executable, "-c", SERVER, str(TCP_PORT),
         str(len(destinations))], stdout=subprocess.PIPE, text=True, env=python_env(),
        cwd=str(ROOT))
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        for dst in destinations:
            lab.lan.run(sys.executable, "-c", CLIENT, dst, str(TCP_PORT), str(TCP_BYTES),
                        timeout=30)
        out, _ = server.communicate(timeout=30)
        assert [int(n) for n in out.split()] == [TCP_BYTES + SMALL_BYTES] * len(destinations)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def inner_checksums(pcap: str, port: int) -> Counter[tuple[str, str]]:
    """(inner protocol, tshark's checksum status) for each TZSP datagram's frame.

    tshark checks every TCP and UDP checksum it decodes: the outer UDP one
    (the TZSP datagram, itself partial here: it crosses veth too) comes
    first, the inner frame's last. Status 0 is bad, 1 good, 2 unverified.
    """
    p = subprocess.run(
        ["tshark", "-r", pcap, "-n", "-d", f"udp.port=={port},tzsp",
         "-o", "tcp.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE",
         "-Y", "tzsp", "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=,",
         "-e", "tcp.checksum.status", "-e", "udp.checksum.status"],
        capture_output=True, text=True, timeout=120, check=True)
    out: Counter[tuple[str, str]] = Counter()
    for line in p.stdout.splitlines():
        tcp, udp = line.split("\t")
        udps = udp.split(",")
        if tcp:
            out[("tcp", tcp)] += 1
        elif len(udps) == 2:
            out[("udp", udps[1])] += 1
        else:
            out[("other", line)] += 1
    return out


def datagrams_ended(pcap: str, port: int) -> int:
    """TZSP datagrams whose last (or only) fragment is in the capture so far."""
    n = 0
    for f, _ in read_pcap(pcap)[1]:
        if len(f) < 38 or f[12:14] != b"\x08\x00" or f[23] != 17:
            continue
        frag = struct.unpack_from("!H", f, 20)[0]
        l4 = 14 + (f[14] & 0x0F) * 4
        if not frag & 0x2000 and (frag & 0x1FFF or struct.unpack_from("!H", f, l4 + 2)[0] == port):
            n += 1
    return n


def run_mirrored(lab: Lab, iface: str, directions: tuple[str, ...], port: int,
                 traffic: Any, expect: Optional[int] = None) -> tuple[dict[str, Any], str]:
    """Mirror `iface` to the collector while `traffic()` runs; the worker's
    result and the collector's capture of the TZSP datagrams. With `expect`,
    the worker is stopped only once the collector has that many copies: frames
    in a ring block the kernel has not handed over yet are not forwarded by a
    stopping worker (the block's retire timer is 50 ms)."""
    pcap = f"/tmp/{lab.tag}-csum-{port}.pcap"
    # Non-first fragments of a large datagram (a super-frame's copy) have no
    # UDP header; a 32 MiB buffer (-B) holds a burst of them (2 MiB does not).
    dump = Background(lab.col.name, [
        "tcpdump", "-i", "eth0", "-n", "-U", "--immediate-mode", "-B", "32768", "-s", "0",
        "-w", pcap, f"udp port {port} or (ip[6:2] & 0x1fff != 0)"], "listening on")
    # A listener, so the collector answers no datagram with "port unreachable".
    rx = receiver(lab.col.name, "--listen", f"0.0.0.0:{port}", "--write", f"{pcap}.rx",
                  "--timeout", "60", *(("--count", str(expect)) if expect else ()))
    worker = WorkerRun(lab.rtr.name, make_job(lab, iface, directions, port).to_json())
    try:
        traffic()
        if expect:
            assert rx.wait(30) == 0, rx.stderr
    finally:
        result = worker.stop()
        try:
            # Everything the worker sent, in tcpdump's file, before tcpdump stops.
            wait_until(lambda: datagrams_ended(pcap, port), 10,
                       what=f"{result['sent']} datagrams in {pcap}",
                       ok=lambda n: n >= result["sent"])
        finally:
            dump.stop()
            rx.kill()
    return result, pcap


def test_partial_checksums_completed_tcp_udp_v4_v6(lab: Lab) -> None:
    def traffic() -> None:
        for dst in (WAN_HOST, WAN_HOST6):
            lab.udp_send(lab.lan, dst, UDP_PORT, UDP_COUNT, payload="odd-length")
        tcp_transfers(lab, [WAN_HOST, WAN_HOST6])

    result, pcap = run_mirrored(lab, "br-lan", ("in", "out"), 37030, traffic)
    got = inner_checksums(pcap, 37030)
    sent = result["sent"]
    assert result["send_errors"] == 0 and result["ring_drops"] == 0
    # Every datagram decoded, each inner checksum verified good.
    assert sum(got.values()) == sent, got
    assert got[("udp", "1")] == 2 * UDP_COUNT, got
    assert got[("tcp", "1")] == sent - 2 * UDP_COUNT, got
    assert got[("tcp", "1")] >= 20, got
    # A TCP burst across veth leaves TSO/GSO super-frames in the capture.
    assert result["oversize"] > 0, result
    assert result["truncated"] == 0


def test_partial_checksum_under_a_stripped_vlan_tag(lab: Lab) -> None:
    """A tagged frame with a partial checksum: the router's kernel takes the
    tag off into metadata (TP_STATUS_VLAN_VALID) on receive, and the ring
    marks the frame CSUMNOTREADY; the copy gets both its tag and its checksum.

    No 8021q module here, so the lan host sends the tagged frames through a
    packet socket with a virtio-net header that asks for checksum offload
    (exactly what a VM's virtio NIC hands its host)."""
    from scapy.all import UDP, Dot1Q, Ether, IPv6, Raw, raw

    lan_mac = lab.lan.sh("cat /sys/class/net/eth0/address").strip()
    frames = []
    for i in range(UDP_COUNT):
        pkt = (Ether(src=lan_mac, dst="02:00:00:00:42:01") / Dot1Q(vlan=42, prio=3) /
               IPv6(src="2001:db8:42::10", dst="2001:db8:42::1") /
               UDP(sport=40000, dport=UDP_PORT) / Raw(b"tagged %d" % i))
        frame = bytearray(raw(pkt))
        struct.pack_into("!H", frame, 14 + 4 + 40 + 6, 0x5A5A)  # not the checksum
        frames.append(bytes(frame).hex())

    def traffic() -> None:
        lab.lan.run(sys.executable, "-c", SEND_NEEDS_CSUM, "eth0", str(14 + 4 + 40), "6",
                    *frames, timeout=30)

    result, pcap = run_mirrored(lab, "lan0", ("in",), 37031, traffic, expect=UDP_COUNT)
    got = inner_checksums(pcap, 37031)
    assert got == Counter({("udp", "1"): UDP_COUNT}), got
    assert result["sent"] == UDP_COUNT
    vlans = subprocess.run(["tshark", "-r", pcap, "-n", "-d", "udp.port==37031,tzsp", "-Y",
                            "tzsp && vlan", "-T", "fields", "-e", "vlan.id"],
                           capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert vlans == ["42"] * UDP_COUNT


def test_superframes_are_a_health_finding_naming_the_fix(lab: Lab) -> None:
    """Through the daemon: a TCP burst from behind veth leaves super-frames in the
    capture; status counts them (`oversize`) and names the interface and the fix."""
    text = spec_text("nftables", collector=lab.collector, direction="in", name="sf",
                     match=f"{{protocol: tcp, dport: {TCP_PORT}}}")
    path = lab.write_spec(text.replace("transport: clone", "transport: tzsp"))
    rx = receiver(lab.col.name, "--write", f"/tmp/{lab.tag}-sf.pcap", "--timeout", "60")
    d = lab.start_daemon(path)
    try:
        lab.wait_for_status(lambda s: s and s["mirrors"][0].get("tzsp")
                            and s["mirrors"][0]["tzsp"][0]["state"] == "running")
        tcp_transfers(lab, [WAN_HOST])
        st = lab.wait_for_status(
            lambda s: s and any(f["code"] == "tzsp-superframes" for f in s["findings"]))
    finally:
        lab.stop_daemon(d)
        rx.kill()
    (f,) = [f for f in st["findings"] if f["code"] == "tzsp-superframes"]
    row = st["mirrors"][0]["tzsp"][0]
    assert row["oversize"] > 0 and row["send_errors"] == 0, row
    assert f"{row['oversize']} frame(s) captured on br-lan" in f["what"]
    assert "ethtool -K br-lan gro off" in f["fix"] and f["severity"] == "warning"


def test_partial_checksums_on_a_raw_ip_link(lab: Lab) -> None:
    """A device without a link header: the copy gets a made-up Ethernet header
    and its L4 checksum completed where the IP packet lies in the ring."""
    from scapy.all import IP, TCP, UDP, IPv6, Raw, raw

    packets = []
    for i in range(UDP_COUNT // 2):
        for pkt, l4_off in ((IP(src="192.0.2.77", dst="192.0.2.1") /
                             UDP(sport=40000, dport=UDP_PORT) / Raw(b"raw %d" % i), 20),
                            (IPv6(src="2001:db8:1::77", dst="2001:db8:1::1") /
                             TCP(sport=40000, dport=TCP_PORT, flags="A", seq=i) /
                             Raw(b"raw-tcp %d" % i), 40)):
            data = bytearray(raw(pkt))
            check_off = 6 if UDP in pkt else 16
            struct.pack_into("!H", data, l4_off + check_off, 0xA5A5)  # not the checksum
            packets.append(f"{l4_off}:{check_off}:{bytes(data).hex()}")
    lab.rtr.sh("ip tuntap add mode tun name tzc0; ip link set tzc0 up")
    try:
        def traffic() -> None:
            lab.rtr.run(sys.executable, "-c", TUN_WRITE_NEEDS_CSUM, "tzc0", *packets, timeout=30)

        result, pcap = run_mirrored(lab, "tzc0", ("in",), 37032, traffic, expect=2 * (UDP_COUNT // 2))
    finally:
        lab.rtr.run("ip", "link", "del", "tzc0", check=False)
    got = inner_checksums(pcap, 37032)
    half = UDP_COUNT // 2
    assert got == Counter({("udp", "1"): half, ("tcp", "1"): half}), got
    assert result["sent"] == 2 * half
