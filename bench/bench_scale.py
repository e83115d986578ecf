"""How mirrord scales: 5,000 mirrors, or one mirror on 5,000 interfaces.

Builds a router namespace with N ifb interfaces (as cheap as dummies, which
this kernel lacks; created in one `ip -batch`) and a collector namespace on a
veth link, writes a spec, runs the real daemon
and measures:

- start: from launching the daemon until `status` answers;
- status: how long one status query takes;
- RSS: VmRSS (and the peak, VmHWM) of the daemon after start and at the end;
- heal: `nft flush ruleset` in the router, until mirrord's table is back;
- flood: a batch of link change events (MTU flips) on the ifb interfaces (`--flood` events),
  immediately followed by `nft flush ruleset`: time until the table is back,
  and until the daemon has gone quiet (no CPU used for 0.3 s), with the CPU
  seconds it spent;
- render: `mirrord render --offline` of the same spec (a separate process).

Every wait has a deadline; the namespaces are deleted at the end, whatever
happens. Run from the repository root as root:

    python3 bench/bench_scale.py                      # both cases, N = 5000
    python3 bench/bench_scale.py --cases mirrors -n 1000
    python3 bench/bench_scale.py --profile /tmp/prof  # daemon under cProfile
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mirrord.service.control import request  # noqa: E402 - after the path set-up above
from tests.harness.lab import Netns  # noqa: E402
from tests.harness.wait import WaitTimeout, wait_until  # noqa: E402

RTR_COL = "203.0.113.1"
COLLECTOR = "203.0.113.10"
TARGET_START = 5.0
TARGET_HEAL = 1.0


def sh(*argv: str, input: Optional[str] = None, timeout: float = 120) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> {p.returncode}: {p.stderr.strip()}")
    return p.stdout


class ScaleLab:
    def __init__(self, n_links: int) -> None:
        tag = f"mrdscale{os.getpid() % 100000}"
        self.rtr = Netns(f"{tag}-rtr")
        self.col = Netns(f"{tag}-col")
        self.n = n_links
        self.made: list[Netns] = []
        try:
            self._build(tag)
        except BaseException:
            self.close()
            raise

    def _build(self, tag: str) -> None:
        for ns in (self.rtr, self.col):
            sh("ip", "netns", "add", ns.name)
            self.made.append(ns)
            ns.run("ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", f"{tag}a", "netns", self.rtr.name, "type", "veth", "peer",
           "name", f"{tag}b", "netns", self.col.name)
        self.rtr.run("ip", "link", "set", f"{tag}a", "name", "col")
        self.col.run("ip", "link", "set", f"{tag}b", "name", "eth0")
        self.rtr.sh(f"ip link set col up; ip addr add {RTR_COL}/24 dev col")
        self.col.sh(f"ip link set eth0 up; ip addr add {COLLECTOR}/24 dev eth0")
        batch = "".join(f"link add d{i} type ifb\nlink set d{i} up\n" for i in range(self.n))
        self.rtr.run("ip", "-batch", "-", input=batch, timeout=300)

    def close(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
        self.made = []


def write_spec(path: Path, case: str, n: int) -> None:
    lines = ["backend: nftables", "collectors:", "  ids:", f"    address: {COLLECTOR}",
             "    transport: clone", "mirrors:"]
    if case == "mirrors":
        for i in range(n):
            lines += [f"  - name: m{i}", f"    interfaces: [d{i}]", "    direction: both",
                      "    collector: ids"]
    else:
        lines += ["  - name: all", "    interfaces:"]
        lines += [f"      - d{i}" for i in range(n)]
        lines += ["    direction: both", "    collector: ids"]
    path.write_text("\n".join(lines) + "\n")


def proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) // 1024
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def seconds_until(pred: Callable[[], bool], timeout: float, poll: float = 0.01) -> Optional[float]:
    """Seconds until pred() held, or None at the deadline."""
    t0 = time.monotonic()
    try:
        wait_until(pred, timeout, poll)
    except WaitTimeout:
        return None
    return time.monotonic() - t0


def table_present(rtr: Netns) -> bool:
    # `list tables` lists names only: cheap whatever the table holds.
    return "table ip mirrord" in rtr.run("nft", "list", "tables", check=False).stdout


def wait_quiet(pid: int, timeout: float, still: float = 0.3) -> Optional[float]:
    """Seconds until the daemon used no CPU for `still` seconds (then minus `still`)."""
    t0 = time.monotonic()
    last, since = cpu_seconds(pid), time.monotonic()
    while time.monotonic() - t0 < timeout:
        time.sleep(0.05)
        now = cpu_seconds(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= still:
            return since - t0
    return None


def run_case(case: str, n: int, flood: int, timeout: float, profile: Optional[str],
             workdir: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"case": case, "n": n}
    t_build = time.monotonic()
    lab = ScaleLab(n)
    res["lab_build"] = time.monotonic() - t_build
    spec_path = workdir / f"{case}.yaml"
    write_spec(spec_path, case, n)
    sock = str(workdir / f"{case}.sock")
    log_path = workdir / f"{case}.log"
    daemon: Optional[subprocess.Popen[str]] = None
    try:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        py = [sys.executable]
        if profile:
            py += ["-m", "cProfile", "-o", f"{profile}/{case}.prof"]
        with open(log_path, "w") as log:
            t0 = time.monotonic()
            daemon = lab.rtr.popen(*py, "-m", "mirrord", "run", "-c", str(spec_path),
                                   "--socket", sock, stdout=log, stderr=subprocess.STDOUT,
                                   text=True, env=env, cwd=str(ROOT))

            def answers() -> bool:
                if daemon is not None and daemon.poll() is not None:
                    raise RuntimeError(f"daemon exited:\n{log_path.read_text()[-3000:]}")
                try:
                    request(sock, "status", timeout=timeout)
                    return True
                except (OSError, ValueError):
                    return False

            res["start"] = None
            if seconds_until(answers, timeout, poll=0.05) is not None:
                res["start"] = time.monotonic() - t0
            else:
                print(f"status never answered; daemon log:\n{log_path.read_text()[-3000:]}")
                return res
            pid = daemon.pid
            res["start_cpu"] = cpu_seconds(pid)
            t = time.monotonic()
            st = request(sock, "status", timeout=timeout)
            res["status"] = time.monotonic() - t
            res["mirrors_active"] = sum(m["state"] == "active" for m in st["mirrors"])
            res["rss_start"] = proc_status(pid)
            res["table_at_start"] = table_present(lab.rtr)
            wait_quiet(pid, timeout)

            # heal after a flush: three trials, the worst one counts
            heals, heal_cpu = [], []
            for _ in range(3):
                c0 = cpu_seconds(pid)
                lab.rtr.run("nft", "flush", "ruleset")
                heals.append(seconds_until(lambda: table_present(lab.rtr), timeout))
                heal_cpu.append(cpu_seconds(pid) - c0)
                wait_quiet(pid, timeout)
            res["heal"] = heals
            res["heal_cpu"] = heal_cpu

            # a flood of link events, then a flush: the heal must not queue behind the flood
            # MTU flips: each is one RTM_NEWLINK like a down/up, without the
            # kernel's RCU waits of a down (8,000 of those take minutes here).
            k = min(n, max(1, flood // 2))
            flood_batch = "".join(f"link set d{i} mtu 1400\nlink set d{i} mtu 1500\n"
                                  for i in range(k))
            cpu0 = cpu_seconds(pid)
            t = time.monotonic()
            lab.rtr.run("ip", "-batch", "-", input=flood_batch, timeout=timeout)
            res["flood_cmd"] = time.monotonic() - t
            t_flush = time.monotonic()
            lab.rtr.run("nft", "flush", "ruleset")
            back = seconds_until(lambda: table_present(lab.rtr), timeout)
            res["flood_heal"] = back
            quiet = wait_quiet(pid, timeout)
            res["flood_quiet"] = None if quiet is None else (t_flush - t) + quiet
            res["flood_cpu"] = cpu_seconds(pid) - cpu0
            res["flood_events"] = 2 * k
            st = request(sock, "status", timeout=timeout)
            res["mirrors_active_after"] = sum(m["state"] == "active" for m in st["mirrors"])
            res["applies"] = st["applies"]
            res["rss_end"] = proc_status(pid)
        # render --offline, a process of its own
        t = time.monotonic()
        before = os.times()
        subprocess.run([sys.executable, "-m", "mirrord", "render", "--offline", "-c",
                        str(spec_path)], capture_output=True, text=True, env=env, cwd=str(ROOT),
                       timeout=timeout * 4, check=True)
        res["render_offline"] = time.monotonic() - t
        after = os.times()
        res["render_cpu"] = (after.children_user - before.children_user
                             + after.children_system - before.children_system)
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        lab.close()
    return res


def fmt(v: Any) -> str:
    if v is None:
        return "TIMEOUT"
    if isinstance(v, float):
        return f"{v:.2f} s"
    if isinstance(v, list):
        return ", ".join(fmt(x) for x in v)
    if isinstance(v, dict):
        return " ".join(f"{k} {x} MiB" for k, x in v.items())
    return str(v)


def report(res: dict[str, Any]) -> None:
    print(f"\n== {res['case']} (N = {res['n']}); lab built in {res['lab_build']:.1f} s")
    for key, label in (
        ("start", "start until status answers"),
        ("start_cpu", "daemon CPU until status answered (s)"),
        ("status", "one status query"),
        ("mirrors_active", "mirrors active after start"),
        ("rss_start", "RSS after start"),
        ("heal", "heal after nft flush ruleset (3 trials)"),
        ("heal_cpu", "daemon CPU until the table was back (s)"),
        ("flood_events", "link events in the flood"),
        ("flood_cmd", "ip -batch of the flood took"),
        ("flood_heal", "flood + flush: table back after the flush"),
        ("flood_quiet", "flood + flush: daemon quiet after the flood began"),
        ("flood_cpu", "daemon CPU during flood + flush (s)"),
        ("mirrors_active_after", "mirrors active after the flood"),
        ("applies", "applies in all"),
        ("rss_end", "RSS at the end"),
        ("render_offline", "render --offline"),
        ("render_cpu", "render --offline CPU (s)"),
    ):
        if key in res:
            v = res[key]
            print(f"  {label:<50} {fmt(v)}")
    heals = [h for h in res.get("heal", []) if h is not None]
    ok_heal = len(heals) == 3 and max(heals) < TARGET_HEAL and (
        res.get("flood_heal") or 99) < TARGET_HEAL
    ok_start = (res.get("start") or 99) < TARGET_START
    print(f"  targets: start < {TARGET_START:.0f} s {'met' if ok_start else 'NOT met'}; "
          f"heal < {TARGET_HEAL:.0f} s {'met' if ok_heal else 'NOT met'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5000, help="mirrors / interfaces (default 5000)")
    ap.add_argument("--cases", default="mirrors,interfaces",
                    help="comma-separated: mirrors (N mirrors, one interface each), "
                         "interfaces (one mirror on N interfaces)")
    ap.add_argument("--flood", type=int, default=8000, help="link events in the flood")
    ap.add_argument("--timeout", type=float, default=120.0, help="deadline of every wait")
    ap.add_argument("--profile", metavar="DIR", help="run the daemon under cProfile, "
                    "writing DIR/CASE.prof when it stops")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mrdscale") as tmp:
        for case in args.cases.split(","):
            report(run_case(case.strip(), args.n, args.flood, args.timeout, args.profile,
                            Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
