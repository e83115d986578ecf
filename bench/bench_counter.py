"""What does the anonymous counter beside each named counter cost a packet? Prints figures.

bench_rules measures mirrord's rules against a hand rule under a trafgen flood;
one more counter expression per copied packet is far below its noise (+-10 %
on a shared machine). Here the expression is repeated to make it visible: in a
scratch namespace, an output chain of `--rules` rules that every packet
matches, each `udp dport 9 counter name "c"` (old) or `udp dport 9 counter
name "c" counter` (mirrord's since issue 14), and a sender on loopback whose
whole path (output, the rules, loopback, input) runs in its own context:
its system CPU time per packet, old and new alternating `--rounds` times,
medians. The difference divided by the rules is the cost of one anonymous
counter expression, which is what a copied packet pays once.

Run as root from the repository root:
  python3 bench/bench_counter.py [--rules 100] [--packets 100000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

SEND = r"""
import resource, socket, sys
n = int(sys.argv[1])
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
r.bind(("127.0.0.1", 9))
r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # most are dropped: no reader
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("127.0.0.1", 9))
b = b"x" * 18
u0 = resource.getrusage(resource.RUSAGE_SELF)
for _ in range(n):
    s.send(b)
u1 = resource.getrusage(resource.RUSAGE_SELF)
print(u1.ru_stime - u0.ru_stime)
"""


def table(rules: int, anonymous: bool) -> str:
    rule = 'udp dport 9 counter name "c"' + (" counter" if anonymous else "")
    body = "\n".join(f"    {rule}" for _ in range(rules))
    return ("table ip bench {\n  counter c { }\n  chain o {\n"
            "    type filter hook output priority 0; policy accept;\n"
            f"{body}\n  }}\n}}\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rules", type=int, default=100)
    ap.add_argument("--packets", type=int, default=100000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_counter: needs root (a scratch network namespace)", file=sys.stderr)
        return 2
    ns = f"mrdbc{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        def run(*argv: str, input: str | None = None) -> str:
            return subprocess.run(["ip", "netns", "exec", ns, *argv], input=input, text=True,
                                  check=True, capture_output=True).stdout

        run("ip", "link", "set", "lo", "up")
        per_packet: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.rounds):
            for anonymous in ((False, True) if r % 2 == 0 else (True, False)):
                run("nft", "-f", "-", input="flush ruleset\n" + table(args.rules, anonymous))
                seconds = float(run(sys.executable, "-c", SEND, str(args.packets)))
                per_packet[anonymous].append(seconds / args.packets * 1e9)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    old, new = statistics.median(per_packet[False]), statistics.median(per_packet[True])
    print(f"{args.rounds} rounds x {args.packets} packets through {args.rules} matching rules "
          "(system CPU of the sender, medians)")
    print(f"  named counter only      {old:8.0f} ns/packet  {sorted(round(x) for x in per_packet[False])}")
    print(f"  named + anonymous       {new:8.0f} ns/packet  {sorted(round(x) for x in per_packet[True])}")
    print(f"  one anonymous counter:  {(new - old) / args.rules:.1f} ns per packet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
