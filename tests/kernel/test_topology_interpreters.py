"""topology.read against the kernel under every interpreter this machine has.

The packaged daemon runs the system interpreter (Debian 12's /usr/bin/python3,
where python3-pyroute2 0.7.2 once hid every link from it), not the test's:
both must read the same links and routes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness.lab import COLLECTOR, ROOT, RTR_LAN, WAN_HOST, Lab

pytestmark = pytest.mark.integration

SYSTEM_PYTHON = "/usr/bin/python3"

READ = """\
import ipaddress, json, sys
from mirrord.netlink import topology
t = topology.read([(ipaddress.ip_address(a), None) for a in sys.argv[1:]])
print(json.dumps({
    "version": sys.version.split()[0],
    "links": {n: [l.up, l.kind, l.mtu, l.master] for n, l in t.links.items()},
    "index": {n: l.index for n, l in t.links.items()},
    "reach": {str(k[0]): r.describe() for k, r in t.reach.items()},
}))
"""


def interpreters() -> list[str]:
    found = [sys.executable]
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import yaml"], capture_output=True)
    if probe.returncode == 0 and sys.executable != SYSTEM_PYTHON:
        found.append(SYSTEM_PYTHON)
    return found


@pytest.mark.parametrize("python", interpreters())
def test_read_with_each_interpreter(lab: Lab, python: str) -> None:
    lab.rtr.run("ip", "route", "add", "203.0.113.128/25", "via", COLLECTOR)
    out = lab.rtr.run("env", f"PYTHONPATH={ROOT}", python, "-c", READ, COLLECTOR, WAN_HOST,
                      RTR_LAN, "203.0.113.130", "192.0.2.200", timeout=60)
    got = json.loads(out.stdout)
    # The neighbour state (REACHABLE, STALE...) depends on timing: not compared.
    reach = {a: d.split(", neighbour")[0] for a, d in got["reach"].items()}
    links, index = got["links"], got["index"]
    assert {"br-lan", "lan0", "col", "wan"} <= set(links), got
    assert links["br-lan"] == [True, "bridge", 1500, None], got
    assert links["lan0"] == [True, "veth", 1500, index["br-lan"]], got
    assert reach == {
        COLLECTOR: "on-link dev col",
        WAN_HOST: "on-link dev wan",
        RTR_LAN: f"{RTR_LAN} is an address of this router",
        "203.0.113.130": f"routed via {COLLECTOR} dev col",
        "192.0.2.200": "on-link dev br-lan",
    }, got
