#!/usr/bin/env python3
"""What mirrord costs a router in memory. Prints figures; not a test.

In the namespace lab of tests/harness/lab.py the real daemon runs (`mirrord run`) in
the router namespace; once its status says every mirror is active it is left
idle for `--settle` seconds and its /proc/PID/status and smaps_rollup are read.

Cases:
  clone1   one kernel-clone mirror (br-lan -> the on-link collector)
  tzsp4    one TZSP mirror on four interfaces (veth lan1..lan4): the daemon
           plus every process it started (its one TZSP capture process),
           each counted whole (RSS), and shared pages split between them (PSS)

Also printed:
  imports  the modules the daemon loaded by the time it was active (a second
           run of clone1 under PYTHONPROFILEIMPORTTIME), their self time total;
           its spec reader's (a forked child's) imports counted apart
  rtnl     the ways the daemon can ask rtnetlink (links, route get, neighbours)
           compared in a fresh interpreter in the router namespace: RSS after
           the import and one read of the lab's topology, and the time of one
           read (median of --reads)

Run as root from the repository root:
  python3 bench/bench_memory.py [--settle 2] [--cases clone1 tzsp4 imports rtnl]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import openwrt_split
from tests.harness.lab import COLLECTOR, ROOT, Lab, have_root_netns, spec_text

TARGET_CLONE1_MIB = 22.0
TARGET_TZSP4_MIB = 36.0
TZSP_IFACES = ("lan1", "lan2", "lan3", "lan4")

CLONE1 = spec_text("nftables", name="lan")

TZSP4 = f"""\
backend: nftables
collectors:
  ids:
    address: {COLLECTOR}
    transport: tzsp
mirrors:
  - name: ports
    interfaces: [{", ".join(TZSP_IFACES)}]
    direction: both
    collector: ids
"""

# argv: option, reads. Prints "rss_kib modules median_read_s" after the
# daemon's own modules are loaded, the option's import and one read.
RTNL = r"""
import statistics, sys, time
option, reads = sys.argv[1], int(sys.argv[2])
import mirrord.service.daemon  # what the daemon holds anyway
from mirrord.match import Address
import ipaddress
dst = ipaddress.ip_address(sys.argv[3])

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

before = rss(), len(sys.modules)
if option == "raw":
    from mirrord.netlink import topology
    def read():
        return topology.read([(dst, None)])
elif option == "pyroute2":
    from pyroute2 import IPRoute
    def read():
        with IPRoute() as ipr:
            links = {m.get_attr("IFLA_IFNAME"): m for m in ipr.get_links()}
            r = ipr.route("get", dst=str(dst))[0]
            oif = r.get_attr("RTA_OIF")
            n = [x for x in ipr.get_neighbours(family=2, ifindex=oif)
                 if x.get_attr("NDA_DST") == str(dst)]
        return links, r, n
elif option == "pyroute2-child":
    # pyroute2 kept out of the daemon: every read is a short-lived process.
    import subprocess
    CHILD = ("import sys\nfrom pyroute2 import IPRoute\nwith IPRoute() as i:\n"
             " l=[m.get_attr('IFLA_IFNAME') for m in i.get_links()]\n"
             " r=i.route('get',dst=sys.argv[1])\nprint(len(l))")
    def read():
        return subprocess.run([sys.executable, "-c", CHILD, str(dst)], check=True,
                              capture_output=True).stdout
else:
    raise SystemExit(f"unknown option {option}")
read()
after = rss(), len(sys.modules)
times = []
for _ in range(reads):
    t0 = time.perf_counter()
    read()
    times.append(time.perf_counter() - t0)
print(before[0], before[1], after[0], after[1], statistics.median(times))
"""
RTNL_OPTIONS = ("raw", "pyroute2", "pyroute2-child")
ROUTER_LIKE = "python -S, .pyc (as on a router)"



def proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/status (VmRSS, RssAnon, RssFile, RssShmem)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0])
    return out


def pss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


def children(pid: int) -> list[int]:
    """Every descendant of pid (the TZSP capture process and anything else)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces or parentheses: fields follow the last ')'.
        parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out.extend(kids)
        todo.extend(kids)
    return out


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def all_active(s: Optional[dict[str, Any]]) -> bool:
    return s is not None and bool(s["mirrors"]) and all(
        m["state"] == "active" for m in s["mirrors"])


def bare_env(pycache: str) -> dict[str, str]:
    """The environment of `python -S` as on a router: no site, byte code compiled once.

    Without site, no .pth file runs (this machine's certifi hook, the
    editable-install finder): PYTHONPATH holds mirrord and the directories of
    its dependencies only. A router's package ships .pyc files; here they go
    to `pycache` (PYTHONPYCACHEPREFIX), so that PYTHONDONTWRITEBYTECODE, if
    set, does not make every start compile mirrord from source.
    """
    dirs = [str(ROOT)]
    for name in ("yaml", "nftables"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            where = Path(spec.origin).parent
            dirs.append(str(where.parent if where.name == name else where))
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(dirs)), "PYTHONPYCACHEPREFIX": pycache,
           "PYTHONDONTWRITEBYTECODE": ""}
    # The byte code of every module a daemon imports (the standard library's too:
    # with a prefix, Python looks for .pyc files there only).
    warm = ("import mirrord.cli, mirrord.service.daemon, mirrord.commands, mirrord.observe.status, "
            "mirrord.observe.health, mirrord.service.logsetup, mirrord.backends.libnft, "
            "mirrord.tzsp.supervisor, nftables")
    subprocess.run([sys.executable, "-S", "-c", warm], env={**os.environ, **env}, check=True,
                   capture_output=True)
    return env


def start(lab: Lab, spec: str, env: Optional[dict[str, str]] = None,
          flags: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    if flags:
        # lab.start_daemon with interpreter flags: the same command line otherwise.
        log = open(f"/tmp/{lab.tag}-daemon.log", "a")  # noqa: SIM115 - closed with the lab
        daemon = lab.rtr.popen(sys.executable, *flags, "-m", "mirrord", "run", "-c",
                               lab.write_spec(spec), "--socket", lab.socket_path(), "-v",
                               stdout=log, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **(env or {})}, cwd=str(ROOT))
        lab.daemons.append(daemon)
    else:
        daemon = lab.start_daemon(lab.write_spec(spec), env=env)
    try:
        lab.wait_for_status(all_active, timeout=30)
    except TimeoutError:
        lab.stop_daemon(daemon)
        raise
    # `ip netns exec` execs the command: the PID is the interpreter's.
    assert "mirrord" in cmdline(daemon.pid) and " run " in cmdline(daemon.pid), cmdline(daemon.pid)
    return daemon


def case_clone1(settle: float, pycache: str) -> None:
    print("\n== clone1: daemon idle, one kernel-clone mirror")
    for label, env, flags in (("as run here", None, ()),
                              (ROUTER_LIKE, bare_env(pycache), ("-S",))):
        with Lab(ipv6=False) as lab:
            daemon = start(lab, CLONE1, env, flags)
            time.sleep(settle)
            st = proc_status(daemon.pid)
            pss = pss_kib(daemon.pid)
            lab.stop_daemon(daemon)
        print(f"   {label}: VmRSS {mib(st['VmRSS'])}  (RssAnon {mib(st['RssAnon'])}, "
              f"RssFile {mib(st['RssFile'])})  Pss {mib(pss)}")
        if not flags:
            ok = st["VmRSS"] / 1024 <= TARGET_CLONE1_MIB
            print(f"   target VmRSS <= {TARGET_CLONE1_MIB:.0f} MiB: {'met' if ok else 'MISSED'}")


def case_tzsp4(settle: float) -> None:
    with Lab(ipv6=False) as lab:
        for name in TZSP_IFACES:
            # veth pairs (no dummy module needed): the peer stays in the router, up.
            lab.rtr.sh(f"ip link add {name} type veth peer name {name}p && "
                       f"ip link set {name}p up && ip link set {name} up")
        daemon = start(lab, TZSP4)
        time.sleep(settle)
        rows = [(daemon.pid, "daemon", proc_status(daemon.pid), pss_kib(daemon.pid))]
        for pid in children(daemon.pid):
            try:
                rows.append((pid, cmdline(pid)[-60:], proc_status(pid), pss_kib(pid)))
            except OSError:
                continue
        lab.stop_daemon(daemon)
    print(f"\n== tzsp4: daemon + its processes, TZSP on {len(TZSP_IFACES)} interfaces")
    for pid, what, st, pss in rows:
        print(f"   {pid:>7}  VmRSS {mib(st['VmRSS']):>10}  Pss {mib(pss):>10}  {what}")
    rss = sum(st["VmRSS"] for _, _, st, _ in rows)
    pss = sum(p for _, _, _, p in rows)
    ok = rss / 1024 <= TARGET_TZSP4_MIB
    print(f"   total: {len(rows)} processes, VmRSS {mib(rss)}, Pss {mib(pss)}")
    print(f"   target VmRSS total <= {TARGET_TZSP4_MIB:.0f} MiB: {'met' if ok else 'MISSED'}")


def imported(log: str) -> list[tuple[str, int]]:
    """(module, self microseconds) from PYTHONPROFILEIMPORTTIME lines."""
    out = []
    for line in log.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            out.append((m.group(2), int(m.group(1))))
    return out


# argv: spec path. Prints the modules a spec read adds to a daemon's: what the
# daemon's spec reader (a forked child) imports, not the daemon.
READER = r"""
import sys
import mirrord.service.daemon, mirrord.service.logsetup
before = set(sys.modules)
import mirrord.spec
mirrord.spec.load(sys.argv[1])
print(" ".join(sorted(set(sys.modules) - before)))
"""


def without_reader(rows: list[tuple[str, int]], reader: set[str]) -> list[tuple[str, int]]:
    """The daemon's own imports, once each: the spec reader child's dropped. A
    module both import appears twice in the log, and is the daemon's once."""
    times = Counter(name for name, _ in rows)
    out, seen = [], set()
    for name, us in rows:
        if name not in seen and (name not in reader or times[name] > 1):
            seen.add(name)
            out.append((name, us))
    return out


def case_imports(pycache: str) -> None:
    print("\n== imports: the daemon (clone1) until active, PYTHONPROFILEIMPORTTIME")
    for label, env, flags in (("as run here", {}, ()),
                              (ROUTER_LIKE, bare_env(pycache), ("-S",))):
        with Lab(ipv6=False) as lab:
            daemon = start(lab, CLONE1, {**env, "PYTHONPROFILEIMPORTTIME": "1"}, flags)
            lab.stop_daemon(daemon)
            rows = imported(lab.daemon_log())
            reader = set(subprocess.run(
                [sys.executable, *flags, "-c", READER, lab.write_spec(CLONE1)],
                env={**os.environ, **env}, cwd=str(ROOT), capture_output=True, text=True,
                check=True).stdout.split())
        own = without_reader(rows, reader)
        print(f"   {label}: {len(own)} modules, {sum(t for _, t in own) / 1000:.0f} ms self time; "
              f"the spec reader (a child) adds {len(rows) - len(own)}")
        if flags:
            # The packages: the reader's modules included (it reads the YAML).
            need = openwrt_split.packages(n for n, _ in rows)
            print("   OpenWrt packages beyond python3-light: " + (", ".join(
                f"{pkg} ({' '.join(sorted(mods))})" for pkg, mods in sorted(need.items()))
                or "none"))
            extra = sorted({n.split(".")[0] for n, _ in rows} & (
                openwrt_split.STDLIB_OPTIONAL | openwrt_split.NO_PACKAGE))
            print(f"   also loaded here, optional: {' '.join(extra) or 'none'}")
            big = sorted(own, key=lambda r: -r[1])[:8]
            print("   slowest: " + ", ".join(f"{n} {t / 1000:.1f} ms" for n, t in big))


def case_rtnl(reads: int) -> None:
    print(f"\n== rtnl: one topology read (links, route get, neighbour), {reads} reads")
    print("   option           RSS before  RSS after   +RSS       modules  read (median)")
    with Lab(ipv6=False) as lab:
        for option in RTNL_OPTIONS:
            n = max(3, reads // 20) if option == "pyroute2-child" else reads
            p = lab.rtr.run(sys.executable, "-c", RTNL, option, str(n), COLLECTOR,
                            check=False, timeout=300)
            if p.returncode != 0:
                print(f"   {option:<16} failed: {p.stderr.strip().splitlines()[-1:]}")
                continue
            rss0, mods0, rss1, mods1, t = p.stdout.split()
            print(f"   {option:<16} {mib(int(rss0)):>10}  {mib(int(rss1)):>10}  "
                  f"{mib(int(rss1) - int(rss0)):>9}  {int(mods1) - int(mods0):>+7}  "
                  f"{float(t) * 1000:>8.2f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds idle after every mirror is active, before reading memory")
    ap.add_argument("--reads", type=int, default=200, help="topology reads timed per option")
    ap.add_argument("--cases", nargs="+", choices=("clone1", "tzsp4", "imports", "rtnl"),
                    default=["clone1", "tzsp4", "imports", "rtnl"])
    args = ap.parse_args()
    why = have_root_netns()
    if why:
        print(f"bench_memory: {why}", file=sys.stderr)
        return 2
    print(f"python {sys.version.split()[0]} ({sys.executable}), "
          f"kernel {os.uname().release}, {os.uname().machine}")
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print("(PYTHONDONTWRITEBYTECODE is set: 'as run here' compiles mirrord at every start)")
    pycache = tempfile.mkdtemp(prefix="mirrord-bench-pyc-")
    try:
        for case in args.cases:
            if case == "clone1":
                case_clone1(args.settle, pycache)
            elif case == "tzsp4":
                case_tzsp4(args.settle)
            elif case == "imports":
                case_imports(pycache)
            else:
                case_rtnl(args.reads)
    finally:
        shutil.rmtree(pycache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
