"""rtnl.py against this machine's own kernel, read only."""

from __future__ import annotations

import errno

import pytest

from mirrord.netlink import rtnl, topology
from tests.unit.test_rtnl import ip


def test_rtnl_reads_this_namespace() -> None:
    with rtnl.Rtnl() as nl:
        links = {lk.name: lk for lk in nl.links()}
        assert links["lo"].arphrd == 772
        local = nl.route_get(ip("127.0.0.1"))
        assert local is not None and local.type == topology.RTN_LOCAL
        assert local.oif == links["lo"].index
        with pytest.raises(rtnl.NetlinkError) as e:
            nl.route_get(ip("192.0.2.1"), oif=2**31 - 1)  # no such device
        assert e.value.errno == errno.ENODEV
