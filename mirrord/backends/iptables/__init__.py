"""The iptables backends: TEE in the mangle table (nft or legacy flavour), and
the ROUTE --tee dialect of old patched kernels.

render: the iptables-restore text of a plan and the reading of
iptables-save listings (pure); backend: the Backends, which run the commands.
"""

from .backend import IptablesBackend, IptablesLegacyBackend, RouteTeeBackend
from .render import MULTIPORT_MAX, match_args

__all__ = ["MULTIPORT_MAX", "IptablesBackend", "IptablesLegacyBackend", "RouteTeeBackend",
           "match_args"]
