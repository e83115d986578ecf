"""How fast does mirrord restore copying after a disruption? Prints figures; not a test.

In a namespace lab (tests/harness/lab.py) the real daemon mirrors a sequenced UDP
stream (default 2000 packets/s) from the LAN host to the WAN host; a capture
in the collector namespace timestamps every copy (SO_TIMESTAMPNS). A driver
in the router namespace disrupts the mirror N times, stamping each disruption
on the same CLOCK_REALTIME, and waits until the router holds mirrord's rules
again before a random pause and the next one. For each trial:

  heal      = first copy of a packet sent after the loss, minus the moment the
              disruptive command returned
  outage    = that copy minus the last copy before the loss
  uncopied  = packets of the stream that never reached the collector

Cases:
  nft-flush      `nft flush ruleset` (what `fw4 flush` / `firewall stop` does)
  col-recreate   the collector port `col`, used as `dup to ... device "col"`,
                 deleted and re-created with its addresses (nft bound the old
                 ifindex: only a reapply restores copying)
  legacy-flush   `iptables-legacy -t mangle -F` with backend iptables-legacy,
                 which sends no event: healed by the poll (poll_interval)

Run as root from the repository root:
  python3 bench/bench_heal.py [--trials 20] [--rate 2000] [--poll 0.5] [--cases ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlab import Trial, analyse, ms, summarize
from tests.harness.lab import COLLECTOR, RTR_COL, WAN_HOST, Lab, have_root_netns
from tests.harness.stream import Stream

# Runs in the router namespace. argv: case, trials, out file, collector netns,
# spread of the random pause between trials (seconds).
DRIVER = r"""
import json, random, subprocess, sys, time
case, trials, path, colns = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
spread = float(sys.argv[5])
import nftables
nft = nftables.Nftables()
nft.set_json_output(True)

def nft_rules_back(need_device):
    rc, out, _ = nft.cmd("list table ip mirrord")
    if rc != 0:
        return False
    dups = [e["dup"] for o in json.loads(out)["nftables"] if "rule" in o
            for e in o["rule"]["expr"] if "dup" in e]
    # A deleted-then-recreated device is listed by its stale ifindex number.
    return bool(dups) and all(d.get("dev") == "col" for d in dups) if need_device else bool(dups)

def legacy_rules_back():
    out = subprocess.run(["iptables-legacy-save", "-t", "mangle"], capture_output=True,
                         text=True).stdout
    return "-A PREROUTING -j MIRRORD_PRE" in out and "TEE" in out

# The collector host is ready before the router's port comes up (as when a
# NIC is re-plugged): the first clone's ARP is answered at once, so the figure
# is mirrord's, not ARP's retry timer.
NEW = ("link del col\n"
       f"link add col type veth peer name eth0 netns {colns}\n")
COL = ("link set eth0 up\n"
       "addr add __COLLECTOR__/24 dev eth0\n"
       "route add default via __RTR_COL__\n")
UP = ("link set col up\n"
      "addr add __RTR_COL__/24 dev col\n")

def disrupt():
    if case == "nft-flush":
        rc, _, err = nft.cmd("flush ruleset")
        assert rc == 0, err
    elif case == "col-recreate":
        subprocess.run(["ip", "-batch", "-"], input=NEW, text=True, check=True)
        subprocess.run(["ip", "-n", colns, "-batch", "-"], input=COL, text=True, check=True)
        subprocess.run(["ip", "-batch", "-"], input=UP, text=True, check=True)
    elif case == "legacy-flush":
        subprocess.run(["iptables-legacy", "-t", "mangle", "-F"], check=True)

back = {"nft-flush": lambda: nft_rules_back(False), "col-recreate": lambda: nft_rules_back(True),
        "legacy-flush": legacy_rules_back}[case]
out = []
assert back(), "rules not in place before the first trial"
for i in range(trials):
    time.sleep(random.uniform(0.3, 0.3 + spread))
    t0 = time.time()
    disrupt()
    t1 = time.time()
    deadline = time.monotonic() + 10
    # A quick first look, then a light poll: the driver must not starve the daemon.
    time.sleep(0.002)
    while not back() and time.monotonic() < deadline:
        time.sleep(0.01 if case != "legacy-flush" else 0.02)
    t2 = time.time() if back() else None
    out.append({"start": t0, "done": t1, "rules_back": t2})
    if t2 is None:
        break
with open(path, "w") as f:
    json.dump(out, f)
""".replace("__RTR_COL__", RTR_COL).replace("__COLLECTOR__", COLLECTOR)


def spec(backend: str, collector_if: bool, poll: float) -> str:
    iface = "    interface: col\n" if collector_if else ""
    return f"""\
backend: {backend}
poll_interval: {poll}
collectors:
  ids:
    address: {COLLECTOR}
{iface}    transport: clone
mirrors:
  - name: stream
    interfaces: [br-lan]
    direction: in
    collector: ids
    match:
      protocol: udp
      dport: 5555
"""


CASES: dict[str, dict[str, Any]] = {
    "nft-flush": {"backend": "nftables", "collector_if": False},
    "col-recreate": {"backend": "nftables", "collector_if": True},
    "legacy-flush": {"backend": "iptables-legacy", "collector_if": False},
}


def run_case(case: str, trials: int, rate: float, poll: float, workdir: str) -> list[Trial]:
    cfg = CASES[case]
    with Lab() as lab:
        daemon = lab.start_daemon(lab.write_spec(spec(cfg["backend"], cfg["collector_if"], poll)))
        lab.wait_for_status(lambda s: bool(s) and all(m["state"] == "active" for m in s["mirrors"]))
        before = lab.status() or {}
        out_path = os.path.join(workdir, f"driver-{case}.json")
        # The stream outlives the trials: bounded by a generous limit.
        limit = trials * (2 * poll + 1.5 if case == "legacy-flush" else 1.5) + 10
        with Stream(lab, limit, dst=WAN_HOST, rate=rate, open_ended=True) as stream:
            time.sleep(0.5)
            # For the poll, disruptions must fall at random phases of its period.
            spread = poll if case == "legacy-flush" else 0.2
            lab.rtr.run(sys.executable, "-c", DRIVER, case, str(trials), out_path, lab.col.name,
                        str(spread), timeout=limit + 30)
            time.sleep(0.5)
        after = lab.status() or {}
        log = lab.daemon_log()
        lab.stop_daemon(daemon)
    rows = json.loads(Path(out_path).read_text())
    result = [Trial(r["start"], r["done"], r["rules_back"]) for r in rows]
    analyse(stream.result, result)
    result[0].extra["reapplies"] = after.get("reapplies", 0) - before.get("reapplies", 0)
    result[0].extra["log_lines"] = sum(1 for ln in log.splitlines() if "applied" in ln)
    return result


def report(case: str, trials: list[Trial], rate: float, poll: float, verbose: bool,
           target: Callable[[dict[str, float]], str]) -> None:
    heals = [t.heal for t in trials if t.heal is not None]
    outages = [t.outage for t in trials if t.outage is not None]
    backs = [t.rules_back - t.done for t in trials if t.rules_back is not None]
    lost = [t.uncopied for t in trials]
    unhealed = sum(1 for t in trials if t.heal is None)
    print(f"\n== {case}: {len(trials)} trials, stream {rate:.0f} pkt/s"
          + (f", poll_interval {poll} s" if case == "legacy-flush" else ""))
    print(f"   daemon reapplies during the run: {trials[0].extra.get('reapplies')}"
          + (f"; trials never healed: {unhealed}" if unhealed else ""))
    for name, vals in (("heal (ms)", heals), ("outage (ms)", outages),
                       ("rules back (ms)", backs)):
        s = summarize(vals)
        if s:
            print(f"   {name:<16} median {ms(s['median']):>7}  p90 {ms(s['p90']):>7}  "
                  f"worst {ms(s['worst']):>7}  best {ms(s['min']):>7}")
    sl = summarize([float(x) for x in lost])
    if sl:
        print(f"   uncopied packets per disruption: median {sl['median']:.0f}, worst "
              f"{sl['worst']:.0f}, total {sum(lost)} of {sum(t.window for t in trials)} sent")
    print(f"   target: {target(summarize(heals))}")
    if verbose:
        print("   trial  heal_ms  outage_ms  rules_back_ms  uncopied  loss_runs")
        for i, t in enumerate(trials):
            rb = None if t.rules_back is None else t.rules_back - t.done
            print(f"   {i:>5}  {ms(t.heal):>7}  {ms(t.outage):>9}  {ms(rb):>13}  "
                  f"{t.uncopied:>8}  {t.extra.get('runs', 0):>9}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--rate", type=float, default=2000.0, help="stream packets/s")
    ap.add_argument("--poll", type=float, default=0.5,
                    help="poll_interval for the iptables-legacy case (seconds)")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("-v", "--verbose", action="store_true", help="print every trial")
    args = ap.parse_args()
    why = have_root_netns()
    if why:
        print(f"bench_heal: {why}", file=sys.stderr)
        return 2
    if "legacy-flush" in args.cases and shutil.which("iptables-legacy") is None:
        args.cases.remove("legacy-flush")
        print("(iptables-legacy not installed: legacy-flush skipped)")
    workdir = tempfile.mkdtemp(prefix="mirrord-bench-")
    try:
        for case in args.cases:
            trials = run_case(case, args.trials, args.rate, args.poll, workdir)
            if case == "legacy-flush":
                def target(s: dict[str, float]) -> str:
                    if not s:
                        return "MISSED (no trial healed)"
                    limit = args.poll
                    ok = s["worst"] < limit + 0.05
                    return (f"worst < poll_interval {limit * 1000:.0f} ms (+50 ms to re-apply): "
                            + ("met" if ok else "MISSED"))
            else:
                def target(s: dict[str, float]) -> str:
                    if not s:
                        return "MISSED (no trial healed)"
                    ok = s["median"] < 0.05 and s["worst"] < 0.25
                    return "median < 50 ms and worst < 250 ms: " + ("met" if ok else "MISSED")
            report(case, trials, args.rate, args.poll, args.verbose, target)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
