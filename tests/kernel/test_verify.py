"""backend.verify against the kernel's own listings (issue 9, item 2).

The daemon adopts the listing taken after an apply as its drift reference
only when verify() finds the rendered rules in it. A false "missing" would
make the daemon re-apply forever; a false "present" would let someone else's
flush be adopted. So every golden case is applied by the real backend in a
throwaway namespace and must verify, and must stop verifying once a piece is
taken away the way a firewall script would.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest

from mirrord.backends import create
from tests.harness.lab import ROOT, Netns
from tests.kernel.test_render import _dup_devices, _make_devices
from tests.unit.test_render import CASES, build

ROUND_TRIP = r"""
import json, pickle, subprocess, sys
sys.path.insert(0, sys.argv[1])
from mirrord.backends import create
name, rendered = pickle.load(open(sys.argv[2], "rb"))
b = create(name)
out = {}
b.apply(rendered, {})
out["applied"] = b.verify(rendered, b.snapshot())
b.apply(rendered, {})  # a second apply: the other iptables generation
out["reapplied"] = b.verify(rendered, b.snapshot())
out["empty"] = b.verify(rendered, "")
if name == "nftables":
    fam = "ip" if "ip" in rendered.payload else "ip6"
    chains = [o["chain"]["name"] for o in rendered.payload[fam] if "chain" in o]
    subprocess.run(["nft", "flush", "chain", fam, "mirrord", chains[-1]], check=True)
else:
    tool = "iptables" if 4 in rendered.payload else "ip6tables"
    suffix = "-legacy" if name == "iptables-legacy" else ""
    subprocess.run([tool + suffix, "-w", "-t", "mangle", "-D", "POSTROUTING", "-j",
                    "MIRRORD_POST"], check=True)
out["disturbed"] = b.verify(rendered, b.snapshot())
print(json.dumps(out))
"""


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["nftables", "iptables", "iptables-legacy"])
@pytest.mark.parametrize("case", CASES)
def test_verify_accepts_what_the_kernel_lists_and_sees_a_piece_taken_away(
        case: str, backend: str, netns: Netns, tmp_path: Path) -> None:
    rendered = create(backend).render(build(case, backend))
    if backend == "nftables":
        cmds = [{"add": o} for objs in rendered.payload.values() for o in objs]
        _make_devices(netns, _dup_devices(cmds))
    path = tmp_path / "rendered.pickle"
    path.write_bytes(pickle.dumps((backend, rendered)))
    p = netns.run(sys.executable, "-c", ROUND_TRIP, str(ROOT), str(path))
    out = json.loads(p.stdout)
    assert out["applied"] is None and out["reapplied"] is None, out
    assert out["empty"] is not None and out["disturbed"] is not None, out
