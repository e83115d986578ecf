"""What do mirrord's rules cost the router's forwarding? Prints figures; not a test.

In a namespace lab (tests/harness/lab.py) trafgen (one CPU) floods UDP from the LAN
host through the router to the WAN host, which drops it at ingress after its
veth counted it; the collector does the same with the copies. On veth the
whole forwarding path runs in the sender's context, so the packets per second
reaching the WAN host measure what each packet costs the router.

Cases:
  none       no mirror
  hand       one hand-written rule: prerouting `iifname "br-lan" dup to COLLECTOR`
  mirrord1   mirrord's rules for 1 mirror (br-lan, in, no match)
  mirrord50  mirrord's rules for 50 mirrors on 50 interfaces, each with its own
             filter (udp dport); the traffic crosses one of them (br-lan)
  shared50   (extra) 50 mirrors all on br-lan with 50 different filters, the
             traffic matching the last: the cost of rules that grow per interface
  old1, old50  mirrord1 and mirrord50 as rendered before issue 14: without the
             anonymous counter next to each named counter (what it costs)
  nodelivery1, nodelivery50  mirrord1 and mirrord50 without chain `delivered`
             (what counting copies where they leave costs)
  group1, group2, group4  mirrord1's mirror to a collector group of 1, 2 and 4
             members (addresses of the collector host, so every copy is counted
             wherever its bucket sends it): symhash, the bucket map, the member's
             chain and counter (issue 13). Their cost per copy is printed against
             mirrord1's when `none` and `mirrord1` run too.

One flood runs for the whole measurement while the router's ruleset is
switched under it: each cycle measures every case between two `hand` slots
(hand, A, hand, B, ..., hand; order rotated each cycle); each slot waits
`--settle` s, then counts for `--slot` s. The machine may be shared with other
work, so a case's ratio is taken to the mean of its two neighbouring `hand`
slots (under a second away), which cancels load that changes over seconds; the
medians of those ratios and their interquartile range are printed.

mirrord's rules are produced by mirrord's own plan -> render path in the
router namespace and loaded as the nftables JSON batch the backend applies
(with `nft -j -f`, in one transaction with `flush ruleset`). At start the
bench checks, per mirrord case, that this gives exactly the table the real
daemon (`mirrord run`) installs. The router keeps 49 extra veth pairs for the
whole run, so every case sees the same interfaces.

Run as root from the repository root:
  python3 bench/bench_rules.py [--cycles 8] [--slot 1.0] [--cases ...]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlab import Rulesets, flood, mac, mirror_spec, sample, spread, stop_flood
from tests.harness.lab import COLLECTOR, LAN_HOST, WAN_HOST, Lab, have_root_netns

PORT = 5555
EXTRA = 49  # interfaces x1..x49, besides br-lan

DROP = """\
table netdev bench {{
  chain in {{
    type filter hook ingress device "eth0" priority 0; policy accept;
    {match} drop
  }}
}}
"""

HAND = f"""\
table ip hand {{
  chain prerouting {{
    type filter hook prerouting priority -150; policy accept;
    iifname "br-lan" dup to {COLLECTOR}
  }}
}}
"""


SPECS: dict[str, Optional[str]] = {
    "none": None,
    "hand": None,
    "mirrord1": mirror_spec([("m0", "br-lan", None)]),
    "mirrord50": mirror_spec([("m0", "br-lan", PORT)]
                             + [(f"m{i}", f"x{i}", 10000 + i) for i in range(1, EXTRA + 1)]),
    "shared50": mirror_spec([(f"m{i}", "br-lan", 10000 + i) for i in range(1, EXTRA + 1)]
                            + [("m0", "br-lan", PORT)]),
}
# Collector groups (issue 13): the same mirror, copies balanced over N members.
GROUPS = {"group1": 1, "group2": 2, "group4": 4}
GROUP_MEMBERS = [str(ipaddress.ip_address(COLLECTOR) + k) for k in range(max(GROUPS.values()))]
SPECS.update({case: mirror_spec([("m0", "br-lan", None)], collector=(
    f"transport: clone\nmembers: [{', '.join(GROUP_MEMBERS[:n])}]\nbalance: flow"))
    for case, n in GROUPS.items()})
# The same rules without the anonymous counter beside each named one (before issue 14).
OLD = {"old1": "mirrord1", "old50": "mirrord50"}
SPECS.update({old: SPECS[new] for old, new in OLD.items()})
# The same rules without the chain that counts copies where they leave (issue 14).
UNCOUNTED = {"nodelivery1": "mirrord1", "nodelivery50": "mirrord50"}
SPECS.update({case: SPECS[new] for case, new in UNCOUNTED.items()})


def strip_delivered(path: str) -> None:
    """The rendering without chain `delivered`, its rules and its counters."""
    doc = json.loads(Path(path).read_text())

    def kept(cmd: dict[str, object]) -> bool:
        obj = cmd.get("add")
        if not isinstance(obj, dict):
            return True
        for kind in ("chain", "rule"):
            o = obj.get(kind)
            if isinstance(o, dict) and "delivered" in (o.get("name"), o.get("chain")):
                return False
        c = obj.get("counter")
        return not (isinstance(c, dict) and str(c.get("name", "")).endswith(".delivered"))

    doc["nftables"] = [cmd for cmd in doc["nftables"] if kept(cmd)]
    Path(path).write_text(json.dumps(doc))


def strip_anonymous_counters(path: str) -> None:
    """The rendering as it was: `counter name X` alone, not followed by `counter`."""
    doc = json.loads(Path(path).read_text())
    for cmd in doc["nftables"]:
        rule = cmd.get("add", {}).get("rule")
        if rule:
            rule["expr"] = [e for i, e in enumerate(rule["expr"])
                            if not ("counter" in e and not isinstance(e["counter"], str) and i
                                    and isinstance(rule["expr"][i - 1].get("counter"), str))]
    Path(path).write_text(json.dumps(doc))

def setup(lab: Lab, cfg_path: str) -> None:
    lab.wan.run("nft", "-f", "-", input=DROP.format(match=f"udp dport {PORT}"))
    lab.col.run("nft", "-f", "-", input=DROP.format(match=f"ip daddr {WAN_HOST} udp dport {PORT}"))
    batch = "".join(f"link add x{i} type veth peer name x{i}p\nlink set x{i} up\n"
                    f"link set x{i}p up\n" for i in range(1, EXTRA + 1))
    lab.rtr.run("ip", "-batch", "-", input=batch)
    for a in GROUP_MEMBERS[1:]:
        lab.col.run("ip", "addr", "add", f"{a}/24", "dev", "eth0")
    for a in GROUP_MEMBERS:
        lab.rtr.run("ping", "-c1", "-W2", a)
    Path(cfg_path).write_text(
        f"{{ eth(da={mac(lab.rtr, 'br-lan')}, sa={mac(lab.lan, 'eth0')}), "
        f"ipv4(sa={LAN_HOST}, da={WAN_HOST}, ttl=64), udp(sp=40000, dp={PORT}), "
        "fill(0x41, 18) }\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=8)
    ap.add_argument("--slot", type=float, default=1.0, help="seconds counted per case and cycle")
    ap.add_argument("--settle", type=float, default=0.15,
                    help="seconds between loading a ruleset and counting")
    ap.add_argument("--cases", nargs="+", choices=list(SPECS), default=list(SPECS))
    ap.add_argument("-v", "--verbose", action="store_true", help="print every slot")
    args = ap.parse_args()
    why = have_root_netns()
    if why or shutil.which("trafgen") is None:
        print(f"bench_rules: {why or 'needs trafgen (netsniff-ng)'}", file=sys.stderr)
        return 2
    cases: list[str] = args.cases
    results: dict[str, list[tuple[float, float]]] = {c: [] for c in cases}
    # case -> (forwarding ratios, copy ratios) against the neighbouring `hand` slots
    ratios: dict[str, tuple[list[float], list[float]]] = {c: ([], []) for c in cases}
    tmp = tempfile.mkdtemp(prefix="mirrord-bench-")
    try:
        with Lab(ipv6=False) as lab:
            cfg = f"{tmp}/flood.cfg"
            setup(lab, cfg)
            rs = Rulesets(lab, {c: HAND if c == "hand" else "" for c in cases if not SPECS[c]},
                          {c: t for c in cases if (t := SPECS[c])}, tmp)
            for case in cases:
                if case in OLD:
                    strip_anonymous_counters(rs.files[case][0])
                if case in UNCOUNTED:
                    strip_delivered(rs.files[case][0])
            checked = [c for c in cases if SPECS.get(c) and c not in OLD and c not in UNCOUNTED]
            for case in checked:
                rs.check_against_daemon(case)
            if checked:
                print("the loaded tables equal what `mirrord run` installs for: "
                      + ", ".join(checked), flush=True)
            others = [c for c in cases if c != "hand"]
            # Each case is measured between two `hand` slots: its ratio is to
            # their mean, so load that changes over seconds cancels out.
            slots = args.cycles * (2 * len(others) + 1 if "hand" in cases else len(others))
            total = slots * (args.slot + args.settle + 0.2) + 5
            flooder = flood(lab, cfg, total)
            try:
                for r in range(args.cycles):
                    order = others[r % len(others):] + others[:r % len(others)] if others else []
                    plan: list[str] = []
                    for case in order:
                        plan += (["hand"] if "hand" in cases else []) + [case]
                    plan += ["hand"] if "hand" in cases else []
                    cycle: list[tuple[str, float, float]] = []
                    for case in plan:
                        rs.load(case)
                        fwd, copies = sample(lab, flooder, args.settle, args.slot)
                        cycle.append((case, fwd, copies))
                        results[case].append((fwd, copies))
                        if args.verbose:
                            print(f"cycle {r + 1:>2} {case:<10} forwarded {fwd:>9.0f} pkt/s  "
                                  f"copies {copies:>9.0f} /s", flush=True)
                    for i, (case, fwd, copies) in enumerate(cycle):
                        if case == "hand" or "hand" not in cases:
                            continue
                        (_, f0, c0), (_, f1, c1) = cycle[i - 1], cycle[i + 1]
                        hf, hc = (f0 + f1) / 2, (c0 + c1) / 2
                        ratios[case][0].append(fwd / hf if hf else 0.0)
                        if case != "none" and hc:
                            ratios[case][1].append(copies / hc)
            finally:
                stop_flood(flooder, 30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{args.cycles} cycles x {args.slot:g} s per case under one trafgen flood "
          "(64-byte frames, one CPU), each case measured between two `hand` slots; pkt/s are "
          "medians; ratios are medians of the ratios to the mean of the neighbouring `hand` "
          "slots [interquartile range]")
    print(f"{'case':<10} {'fwd pkt/s':>10} {'copies/s':>10} {'copied':>7} "
          f"{'fwd ratio':>20} {'copy ratio':>20}")
    verdict: dict[str, tuple[float, float]] = {}
    for case, rows in results.items():
        fwd = statistics.median(f for f, _ in rows)
        copies = statistics.median(k for _, k in rows)
        frac = f"{copies / fwd:.3f}" if fwd else "-"
        fr, cr = ratios[case]
        if case == "hand":
            fr, cr = [1.0], [1.0]
        if fr and (cr or case == "none"):
            verdict[case] = (statistics.median(fr), statistics.median(cr) if cr else 0.0)
        print(f"{case:<10} {fwd:>10.0f} {copies:>10.0f} {frac:>7} {spread(fr):>20} "
              f"{spread(cr):>20}")
    for case in ("mirrord1", "mirrord50"):
        if case in verdict and case in results:
            ok = min(verdict[case]) >= 0.95
            print(f"target {case}: forwarding and copies >= 0.95 x hand: "
                  + ("met" if ok else "MISSED"))
    groups = [c for c in GROUPS if c in verdict]
    if groups and {"none", "mirrord1"} <= set(verdict):
        # Per copy: what a forwarded packet costs more than with no mirror (every
        # packet is copied), in units of the `hand` slot's packet time.
        base = 1 / verdict["none"][0]
        one = 1 / verdict["mirrord1"][0] - base
        for case in groups:
            cost = 1 / verdict[case][0] - base
            print(f"{case}: cost per copy {cost / one:.3f} x mirrord1's "
                  f"(target <= 1.10: {'met' if cost <= 1.10 * one else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
