"""A namespace lab: LAN host, router, WAN host and collector on veth links.

    lan (eth0 192.0.2.10) -- (lan0 in br-lan 192.0.2.1) rtr (wan 198.51.100.1) -- (eth0 198.51.100.10) wan
                                                        rtr (col 203.0.113.1)  -- (eth0 203.0.113.10) col

With `offlink=True` a second router `r2` sits between the router's `col`
port and the collector, so the collector is routed, not on-link:

    rtr (col 203.0.113.1/25) -- (eth0 203.0.113.2/25) r2
        r2 (eth1 203.0.113.129/25) -- (eth0 203.0.113.130/25) col

Every namespace gets a unique name and is deleted by `close()`. Only the
documentation address ranges are used. The router's interfaces use the names
an OpenWrt router has (br-lan, wan) so specs read like real ones.

Smaller pieces for tests that need a kernel but not the whole lab:
`scratch_netns()` (one empty namespace) and `veth_namespace()` (a veth pair).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tests.harness.wait import wait_until

ROOT = Path(__file__).resolve().parents[2]

LAN_HOST = "192.0.2.10"
RTR_LAN = "192.0.2.1"
RTR_WAN = "198.51.100.1"
WAN_HOST = "198.51.100.10"
RTR_COL = "203.0.113.1"
COLLECTOR = "203.0.113.10"
OFFLINK_COLLECTOR = "203.0.113.130"
LAN_HOST6 = "2001:db8:1::10"
RTR_LAN6 = "2001:db8:1::1"
WAN_HOST6 = "2001:db8:2::10"
RTR_WAN6 = "2001:db8:2::1"
COLLECTOR6 = "2001:db8:3::10"
RTR_COL6 = "2001:db8:3::1"

_counter = itertools.count()


def spec_text(backend: str, *, collector: str = COLLECTOR, direction: str = "both",
              match: str = "", interfaces: str = "[br-lan]", name: str = "m",
              more_mirrors: str = "") -> str:
    """A spec of one clone mirror of `interfaces` to the lab's collector (and `more_mirrors`)."""
    text = f"""\
backend: {backend}
collectors:
  ids:
    address: "{collector}"
    transport: clone
mirrors:
  - name: {name}
    interfaces: {interfaces}
    direction: {direction}
    collector: ids
"""
    if match:
        text += f"    match: {match}\n"
    return text + more_mirrors


def have_root_netns() -> Optional[str]:
    """Why the lab cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs the '{tool}' command"
    return None


def python_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """This environment, with this checkout first on PYTHONPATH (for `python -m mirrord`)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


@dataclass
class Netns:
    name: str

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, *argv: str, check: bool = True, timeout: float = 30, input: Optional[str] = None
    ) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(
            self.argv(*argv), capture_output=True, text=True, timeout=timeout, input=input
        )
        if check and p.returncode != 0:
            raise RuntimeError(
                f"[{self.name}] {' '.join(argv)} -> {p.returncode}\n{p.stdout}{p.stderr}"
            )
        return p

    def sh(self, script: str, check: bool = True, timeout: float = 30) -> str:
        return self.run("sh", "-ec", script, check=check, timeout=timeout).stdout

    def popen(self, *argv: str, **kw: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.argv(*argv), **kw)

    def python(self, code: str, *args: str, timeout: float = 60) -> str:
        """Run Python code inside the namespace (for raw sockets and senders)."""
        p = self.run(sys.executable, "-c", code, *args, timeout=timeout)
        return p.stdout


@contextmanager
def scratch_netns(prefix: str = "mrdk") -> Iterator[Netns]:
    """One empty namespace (loopback up), deleted afterwards."""
    ns = Netns(f"{prefix}{os.getpid() % 100000}x{next(_counter)}")
    subprocess.run(["ip", "netns", "add", ns.name], check=True, capture_output=True, timeout=30)
    try:
        ns.run("ip", "link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, timeout=30)


@contextmanager
def veth_namespace(mtu: int = 1500, tun: bool = False) -> Iterator[str]:
    """A namespace with a veth pair va <-> vb (both up) and optionally a tun t0."""
    with scratch_netns("mrdt") as ns:
        script = (f"ip link add va mtu {mtu} type veth peer name vb mtu {mtu};"
                  " ip link set va up; ip link set vb up;"
                  " sysctl -qw net.ipv6.conf.all.disable_ipv6=1")
        if tun:
            script += "; ip tuntap add mode tun name t0; ip link set t0 up"
        ns.sh(script)
        yield ns.name


class Lab:
    def __init__(self, offlink: bool = False, ipv6: bool = True) -> None:
        tag = f"mrd{os.getpid() % 100000}x{next(_counter)}"
        self.tag = tag
        self.offlink = offlink
        self.lan = Netns(f"{tag}-lan")
        self.rtr = Netns(f"{tag}-rtr")
        self.wan = Netns(f"{tag}-wan")
        self.col = Netns(f"{tag}-col")
        self.r2: Optional[Netns] = Netns(f"{tag}-r2") if offlink else None
        self.spaces = [n for n in (self.lan, self.rtr, self.wan, self.col, self.r2) if n]
        self.collector = OFFLINK_COLLECTOR if offlink else COLLECTOR
        self.daemons: list[subprocess.Popen[Any]] = []
        try:
            self._build(ipv6)
        except BaseException:
            self.close()
            raise

    # -- topology ----------------------------------------------------------
    def _ip(self, *argv: str) -> None:
        subprocess.run(["ip", *argv], check=True, capture_output=True, text=True)

    def _link(self, a: Netns, aname: str, b: Netns, bname: str) -> None:
        tmp_a, tmp_b = f"{self.tag}a{aname}"[:15], f"{self.tag}b{bname}"[:15]
        self._ip("link", "add", tmp_a, "netns", a.name, "type", "veth", "peer", "name", tmp_b,
                 "netns", b.name)
        a.run("ip", "link", "set", tmp_a, "name", aname)
        b.run("ip", "link", "set", tmp_b, "name", bname)

    def _build(self, ipv6: bool) -> None:
        for ns in self.spaces:
            self._ip("netns", "add", ns.name)
            ns.run("ip", "link", "set", "lo", "up")
            # No router solicitations: a host sends them seconds after link-up
            # (about 4s and 11s), into tests that count frames on its link.
            ns.run("sysctl", "-qw", "net.ipv6.conf.default.router_solicitations=0")
            if ipv6:
                ns.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
                ns.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        self.rtr.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.rtr.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        self._link(self.lan, "eth0", self.rtr, "lan0")
        self._link(self.wan, "eth0", self.rtr, "wan")
        self.rtr.sh("ip link add br-lan type bridge; ip link set lan0 master br-lan; "
                    "ip link set br-lan up; ip link set lan0 up; ip link set wan up")
        self.rtr.sh(f"ip addr add {RTR_LAN}/24 dev br-lan; ip addr add {RTR_WAN}/24 dev wan")
        self.lan.sh(f"ip link set eth0 up; ip addr add {LAN_HOST}/24 dev eth0; "
                    f"ip route add default via {RTR_LAN}")
        self.wan.sh(f"ip link set eth0 up; ip addr add {WAN_HOST}/24 dev eth0; "
                    f"ip route add default via {RTR_WAN}")
        if ipv6:
            self.rtr.sh(f"ip -6 addr add {RTR_LAN6}/64 dev br-lan nodad; "
                        f"ip -6 addr add {RTR_WAN6}/64 dev wan nodad")
            self.lan.sh(f"ip -6 addr add {LAN_HOST6}/64 dev eth0 nodad; "
                        f"ip -6 route add default via {RTR_LAN6}")
            self.wan.sh(f"ip -6 addr add {WAN_HOST6}/64 dev eth0 nodad; "
                        f"ip -6 route add default via {RTR_WAN6}")
        if self.r2 is None:
            self._link(self.col, "eth0", self.rtr, "col")
            self.rtr.sh(f"ip link set col up; ip addr add {RTR_COL}/24 dev col")
            self.col.sh(f"ip link set eth0 up; ip addr add {COLLECTOR}/24 dev eth0; "
                        f"ip route add default via {RTR_COL}")
            if ipv6:
                self.rtr.sh(f"ip -6 addr add {RTR_COL6}/64 dev col nodad")
                self.col.sh(f"ip -6 addr add {COLLECTOR6}/64 dev eth0 nodad; "
                            f"ip -6 route add default via {RTR_COL6}")
        else:
            self._link(self.r2, "eth0", self.rtr, "col")
            self._link(self.col, "eth0", self.r2, "eth1")
            self.r2.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
            self.rtr.sh("ip link set col up; ip addr add 203.0.113.1/25 dev col; "
                        "ip route add 203.0.113.128/25 via 203.0.113.2")
            self.r2.sh("ip link set eth0 up; ip link set eth1 up; "
                       "ip addr add 203.0.113.2/25 dev eth0; ip addr add 203.0.113.129/25 dev eth1; "
                       "ip route add default via 203.0.113.1")
            self.col.sh(f"ip link set eth0 up; ip addr add {OFFLINK_COLLECTOR}/25 dev eth0; "
                        "ip route add default via 203.0.113.129")
        # Neighbours resolved up front so the first packets are not lost to ARP.
        self.lan.run("ping", "-c1", "-W2", RTR_LAN)
        self.wan.run("ping", "-c1", "-W2", RTR_WAN)
        self.rtr.run("ping", "-c1", "-W2", self.collector)

    # -- counting copies at the collector ------------------------------------
    def count_at_collector(self, counters: dict[str, str], ns: Optional[Netns] = None) -> None:
        """Count frames arriving on the collector's eth0, in the kernel.

        `counters` maps a name to an nft match (e.g. "icmp type echo-request").
        A netdev ingress hook sees every frame, including clones addressed to
        other IPs that the collector's IP layer would drop.
        """
        ns = ns or self.col
        lines = ["table netdev lab {"]
        for name in counters:
            lines.append(f"  counter {name} {{ }}")
        lines.append("  chain in {")
        lines.append('    type filter hook ingress device "eth0" priority 0; policy accept;')
        for name, expr in counters.items():
            lines.append(f'    {expr} counter name "{name}"')
        lines.append("  }")
        lines.append("}")
        ns.run("nft", "-f", "-", input="\n".join(lines) + "\n")

    def collector_counts(self, ns: Optional[Netns] = None) -> dict[str, int]:
        import json

        ns = ns or self.col
        out = ns.run("nft", "-j", "list", "counters", "table", "netdev", "lab").stdout
        counts: dict[str, int] = {}
        for obj in json.loads(out)["nftables"]:
            if "counter" in obj:
                counts[obj["counter"]["name"]] = obj["counter"]["packets"]
        return counts

    def reset_collector_counts(self, ns: Optional[Netns] = None) -> None:
        (ns or self.col).run("nft", "reset", "counters", "table", "netdev", "lab")

    # -- traffic -------------------------------------------------------------
    def ping(self, src: Netns, dst: str, count: int, interval: float = 0.01) -> None:
        src.run("ping", "-q", "-c", str(count), "-i", str(interval), "-W", "2", dst,
                timeout=30 + count * interval * 2)

    def udp_send(self, src: Netns, dst: str, dport: int, count: int, sport: int = 40000,
                 rate: float = 2000.0, payload: str = "seq") -> None:
        """Send `count` UDP datagrams whose payload is '<payload> <seq>', bounded in time."""
        code = (
            "import socket,sys,time\n"
            "dst,dport,count,sport,rate,p=sys.argv[1],int(sys.argv[2]),int(sys.argv[3]),"
            "int(sys.argv[4]),float(sys.argv[5]),sys.argv[6]\n"
            "fam=socket.AF_INET6 if ':' in dst else socket.AF_INET\n"
            "s=socket.socket(fam,socket.SOCK_DGRAM)\n"
            "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            "s.bind(('',sport))\n"
            "t0=time.monotonic()\n"
            "for i in range(count):\n"
            "    s.sendto(f'{p} {i}'.encode(),(dst,dport))\n"
            "    d=t0+(i+1)/rate-time.monotonic()\n"
            "    if d>0: time.sleep(d)\n"
        )
        src.run(sys.executable, "-c", code, dst, str(dport), str(count), str(sport), str(rate),
                payload, timeout=30 + count / rate * 2)

    # -- the daemon ----------------------------------------------------------
    def write_spec(self, text: str) -> str:
        path = f"/tmp/{self.tag}-mirrord.yaml"
        Path(path).write_text(text)
        return path

    def socket_path(self) -> str:
        return f"/tmp/{self.tag}-mirrord.sock"

    def mirrord(self, *args: str, ns: Optional[Netns] = None, check: bool = False,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a one-shot mirrord command in the router namespace."""
        ns = ns or self.rtr
        return ns.run(sys.executable, "-m", "mirrord", *args, check=check, timeout=timeout)

    def start_daemon(self, spec_path: str, *extra: str, wait_active: bool = True,
                     env: Optional[dict[str, str]] = None,
                     ns: Optional[Netns] = None) -> subprocess.Popen[str]:
        ns = ns or self.rtr
        log = open(f"/tmp/{self.tag}-daemon.log", "a")  # noqa: SIM115 - closed with the lab
        p = ns.popen(sys.executable, "-m", "mirrord", "run", "-c", spec_path,
                     "--socket", self.socket_path(), "-v", *extra,
                     stdout=log, stderr=subprocess.STDOUT, text=True, env=python_env(env),
                     cwd=str(ROOT))
        self.daemons.append(p)
        if wait_active:
            self.wait_for_status(lambda s: s is not None, timeout=20)
        return p

    def status(self) -> Optional[dict[str, Any]]:
        import json

        p = self.mirrord("status", "--json", "--socket", self.socket_path())
        if not p.stdout.strip():
            return None
        try:
            result: dict[str, Any] = json.loads(p.stdout)
        except ValueError:
            return None
        return result

    def check_daemons(self) -> None:
        """Raise if a daemon this lab started has exited (a wait for it would be in vain)."""
        for d in self.daemons:
            if d.poll() is not None:
                raise RuntimeError(f"daemon exited with {d.returncode}:\n{self.daemon_log()}")

    def wait_for_status(self, pred: Any, timeout: float = 10) -> dict[str, Any]:
        def status() -> Optional[dict[str, Any]]:
            self.check_daemons()
            return self.status()

        last = wait_until(status, timeout, 0.1, what=lambda: f"a status to match\n{self.daemon_log()}",
                          ok=pred)
        assert last is not None
        return last

    def daemon_log(self) -> str:
        try:
            return Path(f"/tmp/{self.tag}-daemon.log").read_text()
        except OSError:
            return ""

    def stop_daemon(self, p: subprocess.Popen[Any], timeout: float = 15) -> int:
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        if p in self.daemons:
            self.daemons.remove(p)
        return rc

    def close(self) -> None:
        for p in self.daemons:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.daemons.clear()
        for ns in self.spaces:
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
        for suffix in ("-mirrord.yaml", "-mirrord.sock", "-daemon.log"):
            try:
                os.unlink(f"/tmp/{self.tag}{suffix}")
            except OSError:
                pass

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
