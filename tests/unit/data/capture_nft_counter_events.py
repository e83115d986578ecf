"""Capture the nftables notifications of a mirrord-shaped table's life: made, own replacement
of its rules, deleted by another process (run as root in a fresh netns, lo up):

    ip netns exec NS python3 tests/unit/data/capture_nft_counter_events.py \
        > tests/unit/data/nft_counter_events.txt

One datagram per line in hex, after a comment with the named counter read
right before the deletion. Captured on Linux 6.18 for test_counter_events.py.
"""

import json
import socket
import subprocess
from typing import Optional

s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
s.bind((0, 1 << (7 - 1)))  # NFNLGRP_NFTABLES


def nft(*a: str, input: Optional[str] = None) -> None:
    subprocess.run(["nft", *a], input=input, check=True, text=True)


def ping(n: int) -> None:
    subprocess.run(["ping", "-q", "-c", str(n), "-i", "0.01", "127.0.0.1"], check=True,
                   stdout=subprocess.DEVNULL)


nft("-f", "-", input='''table ip mirrord {
  counter m.out { packets 5 bytes 500 }
  chain o {
    type filter hook output priority 0; policy accept;
    ip daddr 127.0.0.1 counter name "m.out" counter packets 5 bytes 500
    ip daddr 127.0.0.1 counter name "m.out" counter
  }
}
''')
ping(10)
nft("flush", "chain", "ip", "mirrord", "o")       # what our own replacement does
nft("add", "rule", "ip", "mirrord", "o", "ip", "daddr", "127.0.0.1", "counter", "name", '"m.out"', "counter")
ping(5)
out = subprocess.run(["nft", "-j", "list", "counter", "ip", "mirrord", "m.out"], check=True,
                     capture_output=True, text=True).stdout
named = next(o["counter"] for o in json.loads(out)["nftables"] if "counter" in o)
nft("delete", "table", "ip", "mirrord")           # another process
s.settimeout(0.3)
print(f"# named counter m.out before the delete: packets {named['packets']} bytes {named['bytes']}")
try:
    while True:
        buf = s.recv(1 << 16)
        print(buf.hex())
except socket.timeout:
    pass
