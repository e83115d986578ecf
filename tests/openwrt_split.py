"""Which OpenWrt package a Python module comes from, beyond python3-light.

OpenWrt's python3 is split: python3-light is the interpreter and most of the
standard library; the parts below are packaged apart
(openwrt/packages lang/python/python3/files/python3-package-*.mk), and
third-party modules come from their own feed packages. Shared by
tests/unit/test_packaging.py (the package recipe's DEPENDS) and
bench/bench_memory.py (what the daemon loads).
"""

from __future__ import annotations

from collections.abc import Iterable

SPLIT: dict[str, str] = {
    "logging": "python3-logging",
    "ctypes": "python3-ctypes", "_ctypes": "python3-ctypes",
    "asyncio": "python3-asyncio", "_asyncio": "python3-asyncio",
    "unicodedata": "python3-codecs", "_codecs_cn": "python3-codecs",
    "_codecs_hk": "python3-codecs", "_codecs_iso2022": "python3-codecs",
    "_codecs_jp": "python3-codecs", "_codecs_kr": "python3-codecs", "_codecs_tw": "python3-codecs",
    "dbm": "python3-dbm", "_dbm": "python3-dbm", "_gdbm": "python3-dbm",
    "decimal": "python3-decimal", "_decimal": "python3-decimal",
    "email": "python3-email", "urllib": "python3-urllib",
    "lzma": "python3-lzma", "_lzma": "python3-lzma",
    "multiprocessing": "python3-multiprocessing", "_multiprocessing": "python3-multiprocessing",
    "curses": "python3-ncurses", "_curses": "python3-ncurses",
    "ssl": "python3-openssl", "_ssl": "python3-openssl", "_hashlib": "python3-openssl",
    "pydoc": "python3-pydoc", "doctest": "python3-pydoc", "readline": "python3-readline",
    "sqlite3": "python3-sqlite3", "_sqlite3": "python3-sqlite3",
    "unittest": "python3-unittest", "uuid": "python3-uuid", "_uuid": "python3-uuid",
    "xml": "python3-xml", "pyexpat": "python3-xml", "cgi": "python3-cgi",
    "lib2to3": "python3-lib2to3", "distutils": "python3-distutils", "venv": "python3-venv",
    "webbrowser": "python3-webbrowser",
    # Third-party modules and their feed packages.
    "yaml": "python3-yaml",
    "pyroute2": "python3-pyroute2",
}

# Modules that the standard library tries inside try/except ImportError and
# does without: shutil (archive formats) tries lzma and bz2.
STDLIB_OPTIONAL = frozenset({"lzma", "_lzma", "bz2", "_bz2"})

# Modules without an OpenWrt package, which mirrord imports only when present:
# the Python nftables binding (libnft.py's ctypes binding stands in),
# systemd-python (notify.py and logsetup.py have fallbacks), scapy (tools).
NO_PACKAGE = frozenset({"nftables", "systemd", "scapy"})


def packages(modules: Iterable[str]) -> dict[str, set[str]]:
    """OpenWrt package -> the top-level modules that need it (optional ones left out)."""
    out: dict[str, set[str]] = {}
    for name in modules:
        top = name.split(".")[0]
        if top in SPLIT and top not in STDLIB_OPTIONAL:
            out.setdefault(SPLIT[top], set()).add(top)
    return out
