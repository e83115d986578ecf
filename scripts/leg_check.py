"""Check that this interpreter is the environment a test-matrix leg promises; print its versions.

Run by scripts/run-tests as `PYTHON scripts/leg_check.py LEG`. Exit 1 with the
reason when the leg would test something other than what it claims (a venv's
pyroute2 in the Debian leg, a Python nftables module in the OpenWrt leg...).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

DEBIAN_DIST = "/usr/lib/python3/dist-packages/"
OPENWRT_PYTHON = (3, 9)


def origin(name: str) -> Optional[str]:
    """Where the module comes from, or None when it is not importable."""
    try:
        mod = importlib.import_module(name)
    except ImportError:
        return None
    return str(getattr(mod, "__file__", None) or "built-in")


def version(name: str) -> str:
    try:
        from importlib.metadata import version as dist_version

        names = {"yaml": ["PyYAML"], "systemd": ["systemd-python"],
                 "nftables": ["pip-nftables", "nftables"]}.get(name, [name])
    except ImportError:
        names = []
    for dist in names:
        try:
            return dist_version(dist)
        except Exception:
            continue
    mod = sys.modules.get(name)
    return str(getattr(mod, "__version__", "?"))


def main() -> int:
    leg = sys.argv[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    problems: list[str] = []
    parts = [f"python {sys.version.split()[0]}"]
    mods = ["yaml", "pyroute2", "nftables", "systemd", "scapy", "pytest", "hypothesis"]
    where = {m: origin(m) for m in mods}
    for m in mods:
        parts.append(f"{m} {version(m) if where[m] else '-'}")
    from mirrord.backends.libnft import open_nftables

    try:
        nft = open_nftables()
        ctypes_binding = type(nft).__module__ == "mirrord.backends.libnft"
        parts.append(f"libnftables via {'ctypes' if ctypes_binding else 'module'}")
    except ImportError as e:
        parts.append("libnftables -")
        problems.append(f"libnftables is not usable: {e}")
    mirrord_file = origin("mirrord") or ""
    if not mirrord_file.startswith(root + os.sep):
        problems.append(f"mirrord is imported from {mirrord_file}, not from {root}")

    in_venv = sys.prefix != sys.base_prefix
    if leg == "venv":
        if not in_venv:
            problems.append(f"{sys.executable} is not a venv's interpreter")
        problems += [f"{m} is missing" for m in mods if where[m] is None]
    elif leg == "debian":
        if os.path.realpath(sys.executable) != os.path.realpath("/usr/bin/python3") or in_venv:
            problems.append(f"the interpreter is {sys.executable} (prefix {sys.prefix}), "
                            "not Debian's /usr/bin/python3 outside any venv")
        for m in mods:
            if where[m] is None:
                if m != "pyroute2":  # no longer a dependency: either way is fine
                    problems.append(f"{m} is missing (apt package python3-{m})")
            elif not str(where[m]).startswith(DEBIAN_DIST):
                problems.append(f"{m} comes from {where[m]}, not from Debian's {DEBIAN_DIST}")
    elif leg == "openwrt":
        if sys.version_info[:2] != OPENWRT_PYTHON:
            problems.append(f"Python {sys.version_info[0]}.{sys.version_info[1]}, not "
                            f"{OPENWRT_PYTHON[0]}.{OPENWRT_PYTHON[1]}")
        if not in_venv or any(p.startswith(DEBIAN_DIST.rstrip("/")) for p in sys.path):
            problems.append("not a venv isolated from the system's site packages")
        for m in ("nftables", "scapy", "systemd"):
            if where[m] is not None:
                problems.append(f"{m} is importable ({where[m]}); OpenWrt has no such module")
        if where["pyroute2"] is not None:
            # The OpenWrt package does not depend on python3-pyroute2 (it
            # pulls in the full python3): the leg proves mirrord runs without it.
            problems.append(f"pyroute2 is importable ({where['pyroute2']}); the package does not "
                            "depend on it")
    else:
        problems.append(f"unknown leg {leg}")
    print(", ".join(parts))
    for p in problems:
        print(f"leg {leg}: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
