"""The kernel's netlink, read and watched: links, routes, neighbours (rtnl,
topology), the change events that trigger a reconcile (watch), and nftables
trace events (nftrace). Nothing here changes the kernel."""
