"""A collector group's own keys (issue 13): `members:` and `balance:`.

The validator's base for them: which transports take a group, the members
(addresses, or ports for span; no duplicates; one family for clone) and the
balance, each problem at its node's FILE:LINE:COL. What a group means in
the kernel is plan.groups'; the rest of a collector's keys are validate.py's.
"""

from __future__ import annotations

from typing import Optional

import yaml

from .fields import host_address, valid_ifname
from .model import BALANCES, GROUP_TRANSPORTS
from .nodes import NodeReader
from .yaml_tree import show

_Node = yaml.Node


class GroupReader(NodeReader):
    def ifname(self, node: _Node, what: str) -> Optional[str]:
        name = self.string(node, what)
        if name is None:
            return None
        why = valid_ifname(name)
        if why:
            self.err(node, f"{what} '{show(name)}' {why}")
            return None
        return name

    def group_members(self, what: str, m: dict[str, tuple[_Node, _Node]],
                      transport: str) -> Optional[tuple[tuple[str, ...], str]]:
        """A group's members (normalized text) and balance; None: reported why not."""
        if "members" not in m:
            self.err(m["balance"][0], f"{what}: balance applies to a group only: give 'members'")
            return None
        knode, vnode = m["members"]
        if transport == "auto":
            self.err(knode, f"{what}: a group needs an explicit transport: clone, span, vxlan "
                     "or tzsp (auto picks one per collector, and a group's members must share one)")
            return None
        if transport not in GROUP_TRANSPORTS:
            self.err(knode, f"{what}: members with transport {transport} is not supported yet; "
                     "a group needs transport clone, span, vxlan or tzsp")
            return None
        ok = True
        for key in ("address", "interface"):
            if key in m:
                self.err(m[key][0], f"{what}: {key} and members exclude each other: a group's "
                         f"{'ports' if transport == 'span' else 'addresses'} are its members")
                ok = False
        balance = "flow"
        if "balance" in m:
            b = self.choice(m["balance"][1], f"{what}: balance", BALANCES)
            ok = ok and b is not None
            balance = b or balance
        items = list(vnode.value) if isinstance(vnode, yaml.SequenceNode) else None
        if not items:
            self.err(vnode, f"{what}: members must be a non-empty list of "
                     f"{'ports' if transport == 'span' else 'addresses'}")
            return None
        members: list[str] = []
        first: dict[str, _Node] = {}
        family: Optional[tuple[int, str]] = None
        for n in items:
            text: Optional[str] = None
            if transport == "span":
                text = self.ifname(n, f"{what}: member")
            else:
                raw = self.string(n, f"{what}: member")
                if raw is not None:
                    address, why = host_address(raw, has_interface=False)
                    if why or address is None:
                        self.err(n, f"{what}: member {why}")
                    else:
                        text = str(address)
                        if family is None:
                            family = (address.version, text)
                        elif transport == "clone" and address.version != family[0]:
                            self.err(n, f"{what}: member {text} is IPv{address.version} but "
                                     f"{family[1]} is IPv{family[0]}: the kernel clones a packet "
                                     "only to a next hop of its own family; make one group per "
                                     "family")
                            ok = False
            if text is None:
                ok = False
                continue
            if text in first:
                line = first[text].start_mark.line + 1
                self.err(n, f"{what}: member {text} is listed twice (first on line {line})")
                ok = False
                continue
            first[text] = n
            members.append(text)
        return (tuple(members), balance) if ok else None
