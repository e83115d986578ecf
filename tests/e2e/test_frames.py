"""Whole-frame copies against the real kernel: transport span (out of a local port)
and vxlan (into a tunnel mirrord makes), run by the real daemon in a lab.

The lab's router port `col` is the span port (the collector host's eth0 sees
every copy as the original frame); for vxlan the collector is 203.0.113.10
and a VXLAN device of the collector's own (`rx`) unwraps what arrives, so the
collector's kernel counts the inner frames. gretap and erspan need GRE, which
this machine's kernel lacks: their tests check the error that names the
module, and the copying test skips with that reason.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from tests.e2e.test_heal import add_lan2, assert_healed, heal_after, mirror, state_is
from tests.harness.capture import read_pcap, tcpdump
from tests.harness.lab import COLLECTOR, LAN_HOST, WAN_HOST, Lab, Netns, have_root_netns
from tests.harness.stream import STREAM_PORT, Stream
from tests.harness.wait import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(have_root_netns() is not None, reason=str(have_root_netns())),
]

N = 20
VNI = 4242
TRANSPORTS = ("span", "vxlan")
TUNNEL = "mvx-ids"  # mirrord's device for the collector named ids


def frames_spec(transport: str, *, interfaces: str = "[br-lan]", direction: str = "both",
                match: str = "", vni: int = VNI, more: str = "") -> str:
    if transport == "span":
        collector = "    transport: span\n    interface: col\n"
    elif transport == "vxlan":
        collector = f"    transport: vxlan\n    address: {COLLECTOR}\n    vni: {vni}\n"
    else:
        collector = f"    transport: {transport}\n    address: {COLLECTOR}\n"
    text = f"""\
collectors:
  ids:
{collector}mirrors:
  - name: m
    interfaces: {interfaces}
    direction: {direction}
    collector: ids
"""
    if match:
        text += f"    match: {match}\n"
    return text + more


def receive_vxlan(lab: Lab, vni: int = VNI) -> None:
    """The collector's own VXLAN device, `rx`: what arrives for `vni` comes out of it."""
    lab.col.sh(f"ip link add rx type vxlan id {vni} dstport 4789 local {COLLECTOR} nolearning")
    lab.col.sh("ip link set rx addrgenmode none")
    lab.col.sh("ip link set rx up")


def count_copies(lab: Lab, transport: str, counters: dict[str, str]) -> None:
    """Count the copies' frames where the collector sees them whole: on eth0 for span,
    on `rx` (unwrapped) for vxlan."""
    if transport == "vxlan":
        receive_vxlan(lab)
    dev = "eth0" if transport == "span" else "rx"
    lines = ["table netdev copies {"] + [f"  counter {n} {{ }}" for n in counters]
    lines += ["  chain in {", f'    type filter hook ingress device "{dev}" priority 0;']
    lines += [f'    {expr} counter name "{n}"' for n, expr in counters.items()]
    lines += ["  }", "}"]
    lab.col.run("nft", "-f", "-", input="\n".join(lines) + "\n")


def copies(lab: Lab) -> dict[str, int]:
    out = lab.col.run("nft", "-j", "list", "counters", "table", "netdev", "copies").stdout
    return {o["counter"]["name"]: o["counter"]["packets"]
            for o in json.loads(out)["nftables"] if "counter" in o}


def wait_copies(lab: Lab, want: dict[str, int], timeout: float = 10) -> dict[str, int]:
    """Counts once `want` is reached, and a moment later (what is still on its way lands)."""
    wait_until(lambda: copies(lab), timeout, 0.05, what=lambda: f"copies {want}",
               ok=lambda got: all(got.get(k, 0) >= v for k, v in want.items()))
    time.sleep(0.3)
    return copies(lab)


def start(lab: Lab, text: str) -> dict[str, Any]:
    lab.start_daemon(lab.write_spec(text))
    return state_is(lab, "active")


def ping(src: Netns, dst: str, n: int = N) -> None:
    src.run("ping", "-q", "-c", str(n), "-i", "0.01", "-W", "2", dst, timeout=30)


# -- exactly one copy per crossing ------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ping_copies_once_per_crossing(lab: Lab, transport: str) -> None:
    count_copies(lab, transport, {
        "req": f"ip saddr {LAN_HOST} ip daddr {WAN_HOST} icmp type echo-request",
        "rep": f"ip saddr {WAN_HOST} ip daddr {LAN_HOST} icmp type echo-reply",
    })
    st = start(lab, frames_spec(transport))
    m = mirror(st)
    assert m["transport"] == transport
    assert m["collector"]["device"] == ("col" if transport == "span" else TUNNEL)
    ping(lab.lan, WAN_HOST)
    assert wait_copies(lab, {"req": N, "rep": N}) == {"req": N, "rep": N}
    m = mirror(lab.wait_for_status(
        lambda s: bool(s) and all(mirror(s)["directions"][w]["packets"] >= N
                                  for w in ("in", "out"))))
    assert set(m["directions"]) == {"in", "out"}
    # The daemon's own changes (its tunnel device coming up, its table) set
    # off no reapply: one apply, at start.
    st = lab.status()
    assert st is not None and (st["applies"], st["reapplies"]) == (1, 0), st
    assert "link" not in lab.daemon_log().split("[action=ready]")[-1], lab.daemon_log()
    if transport == "vxlan":
        link = json.loads(lab.rtr.run("ip", "-d", "-j", "link", "show", TUNNEL).stdout)[0]
        vx = link["linkinfo"]["info_data"]
        assert (vx["id"], vx["remote"], vx["port"]) == (VNI, COLLECTOR, 4789)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_port_match_copies_only_that_port(lab: Lab, transport: str) -> None:
    count_copies(lab, transport, {"d5000": "udp dport 5000", "d6000": "udp dport 6000"})
    lab.count_at_collector({"w5000": "udp dport 5000", "w6000": "udp dport 6000"}, ns=lab.wan)
    start(lab, frames_spec(transport, direction="in", match="{protocol: udp, dport: 5000}"))
    lab.udp_send(lab.lan, WAN_HOST, 5000, N)
    lab.udp_send(lab.lan, WAN_HOST, 6000, N)
    # Both crossed the router: only then does "no copy of 6000" mean something.
    wait_until(lambda: lab.collector_counts(lab.wan), 10, 0.05, what="both streams",
               ok=lambda c: c["w5000"] == N and c["w6000"] == N)
    assert wait_copies(lab, {"d5000": N}) == {"d5000": N, "d6000": 0}


def test_fifty_port_mirrors_share_one_lookup_and_copy_each_port(lab: Lab) -> None:
    """50 mirrors of distinct ports render as one verdict map; each copies its own port."""
    more = "".join(f"""\
  - name: p{i}
    interfaces: [br-lan]
    direction: in
    collector: ids
    match: {{protocol: udp, dport: {6000 + i}}}
""" for i in range(50))
    count_copies(lab, "span", {f"d{p}": f"udp dport {p}" for p in (6000, 6025, 6049, 6050)})
    start(lab, frames_spec("span", direction="in", match="{protocol: tcp}", more=more))
    listing = lab.rtr.run("nft", "list", "chain", "netdev", "mirrord", "in_br-lan").stdout
    assert listing.count("vmap") == 1 and "dup" not in listing.split("vmap")[1].split("\n")[0]
    for p in (6000, 6025, 6049, 6050):
        lab.udp_send(lab.lan, WAN_HOST, p, N)
    assert wait_copies(lab, {"d6049": N}) == {"d6000": N, "d6025": N, "d6049": N, "d6050": 0}


# -- the copy is the frame --------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_copies_are_the_frames_byte_for_byte(lab: Lab, transport: str, tmp_path: Path) -> None:
    start(lab, frames_spec(transport, match="{protocol: icmp}"))
    seen, got = str(tmp_path / "seen.pcap"), str(tmp_path / "got.pcap")
    dumps = [tcpdump(lab.rtr.name, "br-lan", seen, "icmp"),
             tcpdump(lab.col.name, "eth0", got, "icmp" if transport == "span" else "udp port 4789")]
    try:
        ping(lab.lan, WAN_HOST, 5)
        time.sleep(0.5)
    finally:
        for d in dumps:
            d.stop()
    _, mirrored = read_pcap(seen)
    _, arrived = read_pcap(got)
    frames = [f for f, _ in arrived]
    if transport == "vxlan":
        # Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8 of the router's own, then the frame.
        assert all(f[42] & 0x08 and int.from_bytes(f[46:49], "big") == VNI for f in frames)
        frames = [f[50:] for f in frames]
        decoded = lab.col.run("tshark", "-r", got, "-T", "fields", "-e", "vxlan.vni",
                              "-e", "icmp.type").stdout
        assert decoded.split() == [str(VNI), "8", str(VNI), "0"] * 5, (
            decoded, lab.col.run("tshark", "-r", got).stdout)
    assert len(mirrored) == 10 and sorted(frames) == sorted(f for f, _ in mirrored)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_vlan_tagged_frames_keep_their_tag(lab: Lab, transport: str) -> None:
    """Frames tagged VLAN 10 arriving on the bridge port lan0: matched by their
    inner UDP port, copied with the tag. (This kernel has no 802.1Q devices;
    the frames are written raw on the LAN host.)"""
    count_copies(lab, transport, {"v10": "vlan id 10 udp dport 7777", "other": "udp dport 7778"})
    start(lab, frames_spec(transport, interfaces="[lan0]", direction="in",
                           match="{protocol: udp, dport: 7777}"))
    send_tagged(lab.lan, "eth0", vid=10, dports=[7777] * N + [7778] * N)
    assert wait_copies(lab, {"v10": N}) == {"v10": N, "other": 0}


def send_tagged(ns: Netns, dev: str, vid: int, dports: list[int]) -> None:
    code = (
        "import socket,struct,sys\n"
        "dev,vid=sys.argv[1],int(sys.argv[2])\n"
        "s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\n"
        "s.bind((dev,0))\n"
        "for p in map(int,sys.argv[3:]):\n"
        "    payload=b'tagged'\n"
        "    udp=struct.pack('!HHHH',40000,p,8+len(payload),0)+payload\n"
        "    ip=struct.pack('!BBHHHBBH4s4s',0x45,0,20+len(udp),0,0,64,17,0,"
        "socket.inet_aton('192.0.2.10'),socket.inet_aton('198.51.100.10'))\n"
        "    s.send(b'\\xff'*6+b'\\x02\\x00\\x00\\x00\\x00\\x01'+struct.pack('!HH',0x8100,vid)"
        "+b'\\x08\\x00'+ip+udp)\n"
    )
    ns.run("python3", "-c", code, dev, str(vid), *map(str, dports))


def test_bridge_port_mirror_copies_traffic_between_two_lan_hosts(lab: Lab) -> None:
    """lan0 and lan1 are ports of br-lan: a clone sees none of this traffic, span does."""
    lan2 = add_lan_host(lab)
    count_copies(lab, "span", {
        "req": f"ip saddr {LAN_HOST} ip daddr 192.0.2.11 icmp type echo-request",
        "rep": "icmp type echo-reply",
    })
    start(lab, frames_spec("span", interfaces="[lan0]", direction="in"))
    ping(lab.lan, "192.0.2.11")
    ping(lan2, "192.0.2.11", 1)  # a positive control that crosses no mirrored port
    # in on lan0: the requests the LAN host sent, not the replies sent to it.
    assert wait_copies(lab, {"req": N}) == {"req": N, "rep": 0}


def add_lan_host(lab: Lab) -> Netns:
    """A second host on br-lan (port lan1), 192.0.2.11."""
    ns = Netns(f"{lab.tag}-lan2")
    lab.spaces.append(ns)
    lab._ip("netns", "add", ns.name)
    lab._link(ns, "eth0", lab.rtr, "lan1")
    lab.rtr.sh("ip link set lan1 master br-lan; ip link set lan1 up")
    ns.sh("ip link set lo up; ip link set eth0 up; ip addr add 192.0.2.11/24 dev eth0")
    ns.run("ping", "-c1", "-W2", LAN_HOST)
    return ns


# -- copies of copies ------------------------------------------------------------
def test_vxlan_outer_packets_on_a_mirrored_interface_are_not_copied(lab: Lab) -> None:
    """`col` carries the tunnel's outer packets and is mirrored too: copies stay 2N."""
    count_copies(lab, "vxlan", {"req": "icmp type echo-request", "rep": "icmp type echo-reply",
                                "every": ""})
    lab.count_at_collector({"outer": "udp dport 4789"})
    st = start(lab, frames_spec("vxlan", interfaces="[br-lan, col]"))
    assert mirror(st)["taps"] == [
        {"interface": i, "direction": w, "state": "active", "reason": ""}
        for i in ("br-lan", "col") for w in ("in", "out")]
    ping(lab.lan, WAN_HOST)
    got = wait_copies(lab, {"req": N, "rep": N})
    assert (got["req"], got["rep"]) == (N, N)
    # Every outer packet is one copy the collector unwrapped, and no more come.
    outer = lab.collector_counts()["outer"]
    assert outer == got["every"], (outer, got)
    time.sleep(1.0)
    assert lab.collector_counts()["outer"] == outer and copies(lab)["every"] == got["every"]


# -- tunnels the kernel cannot make here -----------------------------------------
def kernel_has_gre() -> bool:
    try:
        import gzip

        with gzip.open("/proc/config.gz", "rt") as f:
            return re.search(r"^CONFIG_NET_IPGRE=[ym]", f.read(), re.M) is not None
    except OSError:
        return True  # unknown: try it for real


@pytest.mark.parametrize("transport", ["gretap", "erspan"])
def test_gre_transports_without_gre_name_the_module(lab: Lab, transport: str) -> None:
    if kernel_has_gre():
        pytest.skip("this kernel has GRE: test_gre_transports_copy covers it")
    lab.start_daemon(lab.write_spec(frames_spec(transport)))
    st = lab.wait_for_status(lambda s: bool(s) and mirror(s)["state"] == "error")
    m = mirror(st)
    assert "kmod-gre" in m["reason"] and transport in m["reason"], m["reason"]
    assert [f["code"] for f in st["findings"] if f.get("mirror") == "m"] == ["tunnel-failed"]
    assert "mgt-ids" not in lab.rtr.run("ip", "link").stdout
    assert "mes-ids" not in lab.rtr.run("ip", "link").stdout


@pytest.mark.parametrize("transport", ["gretap", "erspan"])
def test_gre_transports_copy(lab: Lab, transport: str) -> None:
    if not kernel_has_gre():
        pytest.skip("this kernel has no GRE (CONFIG_NET_IPGRE; OpenWrt: kmod-gre): "
                    f"transport {transport} cannot be made here")
    lab.count_at_collector({"gre": "ip protocol gre"})
    start(lab, frames_spec(transport, match="{protocol: icmp}"))
    ping(lab.lan, WAN_HOST)
    got = wait_until(lambda: lab.collector_counts()["gre"], 10, 0.05, what="GRE copies",
                     ok=lambda n: n >= 2 * N)
    assert got == 2 * N


# -- heal, reload, stop, flush ---------------------------------------------------
STREAM_MATCH = f"{{protocol: udp, dport: {STREAM_PORT}}}"


def run_heal(lab: Lab, disrupt: Any, budget: float = 1.0) -> dict[str, Any]:
    before = state_is(lab, "active")
    with Stream(lab, 3.0) as stream:
        stream.at(1.0)
        disrupted = time.time()
        disrupt()
        after = heal_after(lab, before)
    assert_healed(stream.result, disrupted, budget)
    assert mirror(after)["state"] == "active"
    return after


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nft_flush_ruleset_heals(lab: Lab, transport: str) -> None:
    lab.start_daemon(lab.write_spec(frames_spec(transport, direction="in", match=STREAM_MATCH)))
    st = run_heal(lab, lambda: lab.rtr.run("nft", "flush", "ruleset"))
    assert "netdev mirrord" in mirror(st)["last_heal"]["why"]


def test_tunnel_device_deleted_is_made_again(lab: Lab) -> None:
    lab.start_daemon(lab.write_spec(frames_spec("vxlan", direction="in", match=STREAM_MATCH)))
    first = tunnel_index(lab)
    run_heal(lab, lambda: lab.rtr.run("ip", "link", "del", TUNNEL))
    assert tunnel_index(lab) not in (None, first)


def tunnel_index(lab: Lab) -> Optional[int]:
    p = lab.rtr.run("ip", "-j", "link", "show", TUNNEL, check=False)
    return int(json.loads(p.stdout)[0]["ifindex"]) if p.returncode == 0 else None


def test_span_port_recreated_heals(lab: Lab) -> None:
    """`dup to "col"` is bound to col's ifindex at load: a new col needs a reload."""
    from tests.e2e.test_heal import recreate_col

    lab.start_daemon(lab.write_spec(frames_spec("span", direction="in", match=STREAM_MATCH)))
    before = state_is(lab, "active")
    with Stream(lab, 3.0) as stream:
        stream.at(1.0)
        disrupted = time.time()
        recreate_col(lab, 0.0)
        lab.wait_for_status(lambda s: bool(s) and s["reapplies"] > before["reapplies"]
                            and mirror(s)["state"] == "active")
    assert_healed(stream.result, disrupted, budget=1.0)


def test_mirrored_interface_recreated_heals(lab: Lab) -> None:
    """A netdev chain is bound to its device (destroyed with it before Linux 6.14)."""
    from tests.e2e.test_heal import recreate_lan2_under_a_stream

    add_lan2(lab)
    lab.start_daemon(lab.write_spec(frames_spec("span", interfaces="[lan2]", direction="in",
                                                match=STREAM_MATCH)))
    recreate_lan2_under_a_stream(lab)


def test_reload_changes_the_tunnel_stop_and_flush_leave_nothing(lab: Lab) -> None:
    count_copies(lab, "vxlan", {"req": "icmp type echo-request"})
    p = lab.start_daemon(lab.write_spec(frames_spec("vxlan", direction="in")))
    state_is(lab, "active")
    ping(lab.lan, WAN_HOST, 5)
    wait_copies(lab, {"req": 5})
    # A new VNI: the tunnel is made again with it, in the reload's one step.
    before = lab.status()
    assert before is not None
    lab.write_spec(frames_spec("vxlan", direction="in", vni=VNI + 1))
    p.send_signal(1)
    lab.wait_for_status(lambda s: bool(s) and s["applies"] > before["applies"]
                        and mirror(s)["state"] == "active")
    link = json.loads(lab.rtr.run("ip", "-d", "-j", "link", "show", TUNNEL).stdout)[0]
    assert link["linkinfo"]["info_data"]["id"] == VNI + 1
    ping(lab.lan, WAN_HOST, 5)
    time.sleep(0.5)
    assert copies(lab)["req"] == 5, "the collector's rx (VNI 4242) must get no more copies"
    assert lab.stop_daemon(p) == 0
    assert "netdev" not in lab.rtr.run("nft", "list", "tables").stdout
    assert tunnel_index(lab) is None
    # A daemon killed outright leaves both behind: flush removes them.
    p = lab.start_daemon(lab.write_spec(frames_spec("vxlan", direction="in")))
    state_is(lab, "active")
    p.kill()
    p.wait()
    out = lab.mirrord("flush").stdout
    assert f"removed tunnel device {TUNNEL} (vxlan to {COLLECTOR})" in out, out
    assert "netdev mirrord" in out, out
    assert "netdev" not in lab.rtr.run("nft", "list", "tables").stdout
    assert tunnel_index(lab) is None


def test_frames_larger_than_the_path_mtu_arrive_fragmented(lab: Lab) -> None:
    """A 1500-byte packet's copy is 1550 bytes of VXLAN over a 1500 link: the
    outer IPv4 packet is fragmented on the way, never dropped."""
    count_copies(lab, "vxlan", {"big": "icmp type echo-request ip length 1500"})
    lab.count_at_collector({"fragments": "ip frag-off & 0x1fff != 0"})
    start(lab, frames_spec("vxlan", direction="in", match="{protocol: icmp}"))
    lab.lan.run("ping", "-q", "-c", str(N), "-i", "0.01", "-s", "1472", "-M", "do", WAN_HOST,
                timeout=30)
    assert wait_copies(lab, {"big": N})["big"] == N
    assert lab.collector_counts()["fragments"] == N


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_reload_under_a_stream_loses_and_doubles_nothing(lab: Lab, transport: str) -> None:
    """SIGHUP adds a mirror of another device (the netdev table is made anew,
    its bindings changed): one transaction, so the stream's copies go on."""
    add_lan2(lab)
    first = frames_spec(transport, direction="in", match=STREAM_MATCH)
    p = lab.start_daemon(lab.write_spec(first))
    before = state_is(lab, "active")
    more = """\
  - name: other
    interfaces: [lan2]
    direction: in
    collector: ids
"""
    with Stream(lab, 3.0) as stream:
        stream.at(1.0)
        lab.write_spec(first + more)
        p.send_signal(1)
        lab.wait_for_status(lambda s: bool(s) and s["applies"] > before["applies"]
                            and len(s["mirrors"]) == 2)
    c = stream.result
    assert c.sent and c.complete_from(0), c.summary()
    st = lab.status()
    assert st is not None and [m["state"] for m in st["mirrors"]] == ["active", "active"]
