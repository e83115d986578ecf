"""Build a namespace lab, mirror the LAN port to a collector, show the copies, tear down.

Run through scripts/demo-lab (which installs what it needs first), as root.
Everything happens in network namespaces this script creates and deletes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness.lab import COLLECTOR, WAN_HOST, Lab, have_root_netns

SPEC = f"""\
collectors:
  ids:
    address: {COLLECTOR}
mirrors:
  - name: lan
    interfaces: [br-lan]
    direction: both
    collector: ids
"""


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    why = have_root_netns()
    if why:
        print(f"demo-lab: {why}", file=sys.stderr)
        return 1
    with Lab() as lab:
        say("lab: lan host 192.0.2.10 -- [br-lan] router [wan] -- wan host 198.51.100.10;"
            f" router [col] -- collector {COLLECTOR}")
        spec = lab.write_spec(SPEC)
        print(Path(spec).read_text())
        say("mirrord check")
        print(lab.mirrord("check", "-c", spec).stdout)
        daemon = lab.start_daemon(spec)
        say("rules mirrord applied in the router (nft list table ip mirrord)")
        print(lab.rtr.run("nft", "list", "table", "ip", "mirrord").stdout)
        lab.count_at_collector({"requests": "icmp type echo-request",
                                "replies": "icmp type echo-reply"})
        dump = lab.col.popen("tcpdump", "-l", "-n", "-e", "-c", "4", "-i", "eth0", "icmp",
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(1)
        say(f"10 pings from the LAN host to {WAN_HOST}")
        lab.ping(lab.lan, WAN_HOST, 10, interval=0.05)
        say("the first copies, as tcpdump on the collector sees them (MAC: the collector's)")
        try:
            out, _ = dump.communicate(timeout=5)
            print(out)
        except subprocess.TimeoutExpired:
            dump.kill()
        say("copies counted by the collector's kernel (expect 10 requests, 10 replies)")
        print(lab.collector_counts())
        say("mirrord status")
        print(lab.mirrord("status", "--socket", lab.socket_path()).stdout)
        say("firewall reload simulation: nft flush ruleset in the router")
        lab.rtr.run("nft", "flush", "ruleset")
        lab.reset_collector_counts()
        time.sleep(0.2)
        lab.ping(lab.lan, WAN_HOST, 10, interval=0.05)
        print("copies after the flush:", lab.collector_counts())
        print(lab.mirrord("status", "--socket", lab.socket_path()).stdout)
        say("stopping mirrord (SIGTERM): the router's ruleset is left as it was")
        print("exit status", lab.stop_daemon(daemon))
        print("nft list ruleset:", repr(lab.rtr.run("nft", "list", "ruleset").stdout))
    say("lab removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
