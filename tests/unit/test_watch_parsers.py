"""The netlink event parsers of mirrord.netlink.watch, on datagrams built here byte by byte.

RouteChanges and NftChanges are what RouteEvents and NftEvents make of each
datagram their sockets read: whether it can change a plan, and the reason
for the log. The datagrams follow the uapi layouts (nlmsghdr, ifinfomsg,
ndmsg, nfgenmsg, nlattr), built with struct, not with the parser's helpers.
"""

from __future__ import annotations

import socket
import struct

import pytest

from mirrord.netlink.watch import Change, NftChanges, RouteChanges
from tests.unit.test_rtnl import ip, nla, nlmsg

RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR = 16, 17, 20, 21
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWNEIGH, RTM_DELNEIGH = 24, 25, 28, 29
IFLA_IFNAME, IFLA_MTU, NDA_DST = 3, 4, 1
NUD_REACHABLE, NUD_STALE, NUD_FAILED = 0x02, 0x04, 0x20

NFTABLES = 10 << 8  # NFNL_SUBSYS_NFTABLES, the high byte of the message type
NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN = 0, 2, 3
NFT_MSG_NEWRULE, NFT_MSG_DELRULE, NFT_MSG_NEWGEN = 6, 8, 15
NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6 = 1, 2, 10


def link(kind: int, name: str, index: int = 3) -> bytes:
    ifi = struct.pack("=BxHiII", socket.AF_UNSPEC, 1, index, 0x1, 0)
    return nlmsg(kind, ifi + nla(IFLA_MTU, struct.pack("=I", 1500)) + nla(IFLA_IFNAME, name.encode() + b"\0"))


def neigh(kind: int, address: str, state: int) -> bytes:
    a = ip(address)
    family = socket.AF_INET if a.version == 4 else socket.AF_INET6
    nd = struct.pack("=BxxxiHBB", family, 3, state, 0, 1)
    return nlmsg(kind, nd + nla(NDA_DST, a.packed))


def nft(msg: int, family: int, table: str, *, before: bytes = b"", subsys: int = NFTABLES) -> bytes:
    nfgen = struct.pack("=BBH", family, 0, 0)
    return nlmsg(subsys | msg, nfgen + before + nla(1, table.encode() + b"\0"))


def whats(changes: list[Change]) -> list[str]:
    return [c.what for c in changes]


# -- links, addresses, routes --------------------------------------------------------------


def test_link_events_name_the_link() -> None:
    r = RouteChanges()
    assert whats(r.changes(link(RTM_NEWLINK, "wan"))) == ["link added/changed: wan"]
    assert whats(r.changes(link(RTM_DELLINK, "br-lan"))) == ["link deleted: br-lan"]


def test_a_link_without_a_name_is_still_a_change() -> None:
    ifi = struct.pack("=BxHiII", socket.AF_UNSPEC, 1, 7, 0, 0)
    assert whats(RouteChanges().changes(nlmsg(RTM_NEWLINK, ifi))) == ["link added/changed"]


@pytest.mark.parametrize(("kind", "what"), [
    (RTM_NEWADDR, "address added"), (RTM_DELADDR, "address deleted"),
    (RTM_NEWROUTE, "route added"), (RTM_DELROUTE, "route deleted"),
])
def test_address_and_route_events(kind: int, what: str) -> None:
    body = struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, 3)  # any body: only the kind counts
    assert whats(RouteChanges().changes(nlmsg(kind, body))) == [what]


@pytest.mark.parametrize("kind", [2, 3, 26, 32, 0x7FFF])  # ERROR, DONE, GETROUTE, NEWRULE, ...
def test_other_message_types_are_ignored(kind: int) -> None:
    assert RouteChanges().changes(nlmsg(kind, b"\0" * 16)) == []


# -- neighbours ------------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["203.0.113.10", "2001:db8:3::10"])
def test_a_failed_neighbour_is_the_evidence(address: str) -> None:
    (change,) = RouteChanges().changes(neigh(RTM_NEWNEIGH, address, NUD_FAILED))
    assert change == Change(f"neighbour changed: {address} FAILED", neighbour_failed=address)


def test_neighbour_churn_is_ignored() -> None:
    r = RouteChanges()
    churn = b"".join(neigh(RTM_NEWNEIGH, "192.0.2.10", s) for s in (NUD_REACHABLE, NUD_STALE))
    assert r.changes(churn + neigh(RTM_DELNEIGH, "192.0.2.10", NUD_STALE)) == []


def test_news_of_a_failed_neighbour_matters() -> None:
    r = RouteChanges()
    r.failed_neighbours = {ip("203.0.113.10").packed}
    assert whats(r.changes(neigh(RTM_NEWNEIGH, "203.0.113.10", NUD_REACHABLE))) == [
        "neighbour changed: 203.0.113.10 REACHABLE"]
    assert whats(r.changes(neigh(RTM_NEWNEIGH, "203.0.113.10", 0x4000))) == [
        "neighbour changed: 203.0.113.10 0x4000"]  # a state without a name, in hex
    assert whats(r.changes(neigh(RTM_DELNEIGH, "203.0.113.10", NUD_STALE))) == [
        "neighbour deleted: 203.0.113.10 gone"]
    # Another address's news is still churn.
    assert r.changes(neigh(RTM_NEWNEIGH, "203.0.113.11", NUD_REACHABLE)) == []


def test_a_short_neighbour_message_is_ignored() -> None:
    assert RouteChanges().changes(nlmsg(RTM_NEWNEIGH, struct.pack("=Bxxxi", 2, 3))) == []


def test_a_neighbour_without_an_address() -> None:
    nd = struct.pack("=BxxxiHBB", socket.AF_INET, 3, NUD_FAILED, 0, 1)
    (change,) = RouteChanges().changes(nlmsg(RTM_NEWNEIGH, nd))
    assert change == Change("neighbour changed: ? FAILED", neighbour_failed="?")


# -- datagrams of several messages ------------------------------------------------------------


def unaligned_link(kind: int, name: str) -> bytes:
    """A link message whose length counts its last attribute without padding (as nlmsg_len
    may); the next message starts at the 4-byte boundary after it."""
    ifi = struct.pack("=BxHiII", socket.AF_UNSPEC, 1, 3, 0, 0)
    ifname = name.encode() + b"\0"
    msg = nlmsg(kind, ifi + struct.pack("=HH", 4 + len(ifname), IFLA_IFNAME) + ifname)
    return msg + b"\0" * (-len(msg) % 4)


def test_every_message_of_a_datagram_in_order() -> None:
    dgram = link(RTM_NEWLINK, "a") + unaligned_link(RTM_DELLINK, "bb")
    dgram += neigh(RTM_NEWNEIGH, "192.0.2.1", NUD_FAILED) + unaligned_link(RTM_NEWLINK, "lan10")
    dgram += link(RTM_DELLINK, "wan")
    assert whats(RouteChanges().changes(dgram)) == [
        "link added/changed: a", "link deleted: bb", "neighbour changed: 192.0.2.1 FAILED",
        "link added/changed: lan10", "link deleted: wan"]


def test_a_broken_header_ends_the_datagram() -> None:
    good = link(RTM_NEWLINK, "wan")
    zero = struct.pack("=IHHII", 0, RTM_DELLINK, 0, 0, 0)  # a zero length would loop forever
    assert whats(RouteChanges().changes(good + zero + good)) == ["link added/changed: wan"]
    assert whats(RouteChanges().changes(good + good[:12])) == ["link added/changed: wan"]
    assert RouteChanges().changes(b"") == []


# -- nftables --------------------------------------------------------------------------------

MIRRORD = frozenset({("ip", "mirrord"), ("ip6", "mirrord"), ("inet", "fw4")})


@pytest.mark.parametrize(("msg", "family", "what"), [
    (NFT_MSG_DELTABLE, NFPROTO_IPV4, "table deleted: ip mirrord"),
    (NFT_MSG_NEWTABLE, NFPROTO_IPV6, "table added: ip6 mirrord"),
    (NFT_MSG_NEWCHAIN, NFPROTO_INET, "chain added: inet fw4"),
    (NFT_MSG_DELRULE, NFPROTO_IPV4, "rule deleted: ip mirrord"),
])
def test_changes_to_a_watched_table(msg: int, family: int, what: str) -> None:
    table = "fw4" if family == NFPROTO_INET else "mirrord"
    assert whats(NftChanges(MIRRORD).changes(nft(msg, family, table))) == [what]


def test_other_tables_and_families_are_ignored() -> None:
    n = NftChanges(MIRRORD)
    assert n.changes(nft(NFT_MSG_DELTABLE, NFPROTO_IPV4, "fw4")) == []  # ip fw4, not inet fw4
    assert n.changes(nft(NFT_MSG_DELTABLE, NFPROTO_INET, "mirrord")) == []
    assert n.changes(nft(NFT_MSG_DELTABLE, 99, "mirrord")) == []  # a family without a name


def test_an_unnamed_family_is_named_by_its_number() -> None:
    n = NftChanges(frozenset({("99", "t")}))
    assert whats(n.changes(nft(NFT_MSG_NEWRULE, 99, "t"))) == ["rule added: 99 t"]


def test_generation_other_subsystems_and_short_messages_are_ignored() -> None:
    n = NftChanges(MIRRORD)
    assert n.changes(nft(NFT_MSG_NEWGEN, NFPROTO_IPV4, "mirrord")) == []
    ctnetlink = 1 << 8
    assert n.changes(nft(NFT_MSG_DELTABLE, NFPROTO_IPV4, "mirrord", subsys=ctnetlink)) == []
    assert n.changes(nlmsg(NFTABLES | NFT_MSG_DELTABLE, b"\x02\x00")) == []


def test_the_table_attribute_is_found_among_others() -> None:
    # A rule message: NFTA_RULE_CHAIN (2) before NFTA_RULE_TABLE (1) still names the table.
    dgram = nft(NFT_MSG_NEWRULE, NFPROTO_IPV4, "mirrord", before=nla(2, b"pre\0"))
    assert whats(NftChanges(MIRRORD).changes(dgram)) == ["rule added: ip mirrord"]


def test_a_flush_is_one_change_per_kind_not_per_message() -> None:
    n = NftChanges(MIRRORD)
    flush = b"".join(nft(NFT_MSG_DELRULE, NFPROTO_IPV4, "mirrord") for _ in range(500))
    changes = n.changes(flush + nft(NFT_MSG_DELTABLE, NFPROTO_IPV4, "mirrord"))
    assert len(changes) == 501
    assert len({id(c) for c in changes}) == 2  # the same Change object for each kind
    assert sorted(set(whats(changes))) == ["rule deleted: ip mirrord", "table deleted: ip mirrord"]
    # ... and later datagrams reuse it.
    assert n.changes(nft(NFT_MSG_DELRULE, NFPROTO_IPV4, "mirrord"))[0] is changes[0]
