"""The nftables backend: `dup to` rules in `table ip mirrord` / `table ip6 mirrord`
(kernel clones) and `table netdev mirrord` (whole frames).

render: the ip/ip6 tables and the transaction from the kernel's tables to the
wanted ones; netdev: the netdev table; maps: verdict maps for many filtered
mirrors; tables: all of them for a plan; text: nft's own syntax; backend: the
Backend (apply, listing, verification, counters, flush); nfnetlink: the two
netlink queries that replace slow libnftables listings.
"""

from .backend import NftablesBackend
from .nfnetlink import dump_counters, ruleset_generation
from .render import batch, match_exprs
from .tables import render_tables
from .text import to_text

__all__ = ["NftablesBackend", "batch", "dump_counters", "match_exprs", "render_tables",
           "ruleset_generation", "to_text"]
