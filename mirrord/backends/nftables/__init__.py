"""The nftables backend (`dup to` rules in `table ip mirrord` / `table ip6 mirrord`).

render: the pure rendering of a plan (libnftables JSON, nft text, the
transaction from the kernel's tables to the wanted ones); backend: the
Backend (apply, listing, verification, counters, flush); nfnetlink: the two
netlink queries that replace slow libnftables listings.
"""

from .backend import NftablesBackend
from .nfnetlink import dump_counters, ruleset_generation
from .render import batch, match_exprs, render_tables, to_text

__all__ = ["NftablesBackend", "batch", "dump_counters", "match_exprs", "render_tables",
           "ruleset_generation", "to_text"]
