"""links.py against the kernel, in scratch namespaces: the devices it makes, finds and removes.

Each step runs inside the namespace in its own Python process (links.py talks to
the namespace its process lives in); what the kernel then holds is read with
`ip -d -j link`, not with links.py itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import ExitStack
from typing import Any

import pytest

from tests.harness.lab import ROOT, Netns, scratch_netns

PRELUDE = f"""\
import sys, json, ipaddress
sys.path.insert(0, {str(ROOT)!r})
from mirrord.netlink import links
from mirrord.netlink.links import Tunnel, LinkError
ip = ipaddress.ip_address
"""


def py(ns: Netns, code: str) -> Any:
    """Run code (after PRELUDE) in ns; the JSON it prints last."""
    out = ns.python(PRELUDE + code, timeout=30).strip().splitlines()
    return json.loads(out[-1]) if out else None


def link(ns: Netns, name: str) -> dict[str, Any]:
    out: list[dict[str, Any]] = json.loads(ns.run("ip", "-d", "-j", "link", "show", "dev", name).stdout)
    return out[0]


def exists(ns: Netns, name: str) -> bool:
    return ns.run("ip", "link", "show", "dev", name, check=False).returncode == 0


@pytest.mark.parametrize(("remote", "key"), [("192.0.2.10", "remote"), ("2001:db8::10", "remote6")])
def test_vxlan_is_made_as_asked(netns: Netns, remote: str, key: str) -> None:
    t = f'Tunnel("mvx-ids", "vxlan", ip("{remote}"), vni=4242, port=4790, owner="ids")'
    got = py(netns, f"i = links.create({t}); print(json.dumps([i, links.owned() == {{'mvx-ids': {t}}}]))")
    index, same = got
    dev = link(netns, "mvx-ids")
    assert dev["ifindex"] == index
    data = dev["linkinfo"]["info_data"]
    assert dev["linkinfo"]["info_kind"] == "vxlan"
    assert (data["id"], data[key], data["port"]) == (4242, remote, 4790)
    assert data["learning"] is False
    assert data["ttl"] == 64
    assert data.get("df", "unset") == "unset"
    assert dev["mtu"] == 65535
    assert "UP" in dev["flags"]
    assert dev["inet6_addr_gen_mode"] == "none"
    assert dev["ifalias"] == "mirrord ids"
    addrs = json.loads(netns.run("ip", "-j", "addr", "show", "dev", "mvx-ids").stdout)
    assert addrs[0]["addr_info"] == []  # no link-local: nothing of the router's own goes out
    assert same, "owned() did not read back what was asked"


def test_ensure_recreates_changed_and_deletes_unwanted(netns: Netns) -> None:
    mk = 'Tunnel("mvx-ids", "vxlan", ip("192.0.2.10"), vni={}, owner="ids")'
    first = py(netns, f"print(json.dumps(links.ensure([{mk.format(1)}])))")
    assert first == {}
    index1 = link(netns, "mvx-ids")["ifindex"]
    netns.run("ip", "link", "set", "mvx-ids", "down")
    again = py(netns, f"print(json.dumps(links.ensure([{mk.format(1)}])))")
    assert again == {}
    dev = link(netns, "mvx-ids")
    assert dev["ifindex"] == index1 and "UP" in dev["flags"]  # kept, brought back up
    changed = py(netns, f"print(json.dumps(links.ensure([{mk.format(2)}])))")
    assert changed == {}
    dev = link(netns, "mvx-ids")
    assert dev["ifindex"] != index1 and dev["linkinfo"]["info_data"]["id"] == 2
    assert py(netns, "print(json.dumps(links.ensure([])))") == {}
    assert not exists(netns, "mvx-ids")
    py(netns, 'links.delete("mvx-ids"); print("null")')  # absent is fine


def test_foreign_device_is_left_alone(netns: Netns) -> None:
    netns.run("ip", "link", "add", "mvx-ids", "type", "veth", "peer", "name", "mvx-peer")
    t = 'Tunnel("mvx-ids", "vxlan", ip("192.0.2.10"), vni=1, owner="ids")'
    got = py(netns, f"""
errors = links.ensure([{t}, Tunnel("mvx-b", "vxlan", ip("192.0.2.11"), vni=2)])
try:
    links.delete("mvx-ids")
    refused = ""
except LinkError as e:
    refused = str(e)
print(json.dumps([errors, refused, sorted(links.owned())]))
""")
    errors, refused, owned = got
    expected = ("device mvx-ids exists and is not mirrord's (no 'mirrord' alias);"
                " rename it or choose another collector name")
    assert errors == {"mvx-ids": expected}
    assert refused == expected
    assert owned == ["mvx-b"]  # the other tunnel was still made
    assert link(netns, "mvx-ids")["linkinfo"]["info_kind"] == "veth"


def kernel_has(ns: Netns, kind: str) -> bool:
    ok = ns.run("ip", "link", "add", "probe0", "type", kind, "remote", "192.0.2.10",
                check=False).returncode == 0
    if ok:
        ns.run("ip", "link", "del", "probe0")
    return ok


@pytest.mark.parametrize(("kind", "remote", "module"), [
    ("gretap", "192.0.2.10", "kmod-gre"), ("erspan", "192.0.2.10", "kmod-gre"),
    ("gretap", "2001:db8::10", "kmod-gre6"), ("erspan", "2001:db8::10", "kmod-gre6")])
def test_missing_gre_names_the_package(netns: Netns, kind: str, remote: str, module: str) -> None:
    if kernel_has(netns, "gretap" if module == "kmod-gre" else "ip6gretap"):
        pytest.skip(f"this kernel has {module}'s drivers: the missing-driver error cannot happen")
    got = py(netns, f"""
try:
    links.create(Tunnel("mgt-ids", "{kind}", ip("{remote}"), session=5))
    print(json.dumps(""))
except LinkError as e:
    print(json.dumps(str(e)))
""")
    assert got.startswith(f"cannot create {kind} device mgt-ids: the kernel has no ")
    assert "(Operation not supported)" in got and f"install {module} (OpenWrt)" in got
    assert not exists(netns, "mgt-ids")


RECEIVE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("192.0.2.10", 4789))
s.settimeout(10)
print("ready", flush=True)
data, _ = s.recvfrom(65535)
print(data.hex(), flush=True)
"""

FRAME = bytes.fromhex("02000000000a" "02000000000b" "88b5") + b"mirrord-vxlan-proof" * 4


def test_frames_arrive_vxlan_encapsulated(netns: Netns) -> None:
    """A frame written into the device reaches the remote as VXLAN with the VNI, on UDP 4789."""
    with ExitStack() as stack:
        rx: Netns = stack.enter_context(scratch_netns("mrdk"))
        subprocess.run(["ip", "link", "add", "va", "netns", netns.name, "type", "veth", "peer", "vb",
                        "netns", rx.name], check=True, capture_output=True, timeout=30)
        netns.sh("ip addr add 192.0.2.1/24 dev va && ip link set va up")
        rx.sh("ip addr add 192.0.2.10/24 dev vb && ip link set vb up")
        listener = rx.popen(sys.executable, "-c", RECEIVE, stdout=subprocess.PIPE, text=True)
        stack.callback(listener.kill)
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "ready"
        py(netns, f"""
import socket
links.create(Tunnel("mvx-ids", "vxlan", ip("192.0.2.10"), vni=4242, owner="ids"))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("mvx-ids", 0))
s.send(bytes.fromhex("{FRAME.hex()}"))
print("null")
""")
        out, _ = listener.communicate(timeout=15)  # the listener itself gives up after 10 s
        assert out.strip(), "nothing arrived on UDP 4789"
        data = bytes.fromhex(out.strip())
        assert data[0] == 0x08  # VXLAN I flag: the VNI is valid
        assert int.from_bytes(data[4:7], "big") == 4242
        assert data[8:] == FRAME
