"""The daemon's raw counter dump against libnftables' listing, in a namespace."""

from __future__ import annotations

import pytest

from tests.harness.lab import Netns

COUNTERS_IN_NS = """
import json, sys
from mirrord.backends import nftables as N
from mirrord.backends.libnft import open_nftables
nft = open_nftables()
for cmd in ("add table ip mirrord", "add table ip6 mirrord", "add table ip other",
            "add counter ip other m1.in { packets 3 bytes 4 }",
            "add counter ip mirrord big.in { packets 12345678901 bytes 98765432109876 }",
            "add counter ip6 mirrord m9.out { packets 5 bytes 77 }"):
    rc, _, err = nft.cmd(cmd)
    assert rc == 0, err
for i in range(300):  # more than one netlink message of answers
    nft.cmd(f"add counter ip mirrord m{i}.out {{ packets {i} bytes {7 * i} }}")
b = N.NftablesBackend()
out = {}
for fam in ("ip", "ip6"):
    raw = sorted(N.dump_counters(fam))
    lib = sorted((o["counter"]["name"], o["counter"]["packets"], o["counter"]["bytes"])
                 for o in b._list_counters(fam))
    out[fam] = [raw == lib, len(raw)]
nft.cmd("delete table ip6 mirrord")
out["gone"] = N.dump_counters("ip6")
print(json.dumps(out))
"""


@pytest.mark.integration
def test_counter_dump_agrees_with_libnftables(netns: Netns) -> None:
    import json
    import sys

    p = netns.run(sys.executable, "-c", COUNTERS_IN_NS, check=False, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"ip": [True, 301], "ip6": [True, 1], "gone": []}
