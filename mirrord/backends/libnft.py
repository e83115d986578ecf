"""libnftables for all of mirrord: one session type over the distribution's Python
bindings, or a minimal ctypes twin of them.

`NftSession` is what the backend, `mirrord trace` and the health checks use;
nothing else touches a libnftables context (its output flags are state that
one user would otherwise leave set for the next).

Debian/Ubuntu ship the bindings as python3-nftables (and PyPI as
pip-nftables). OpenWrt ships libnftables.so.1 (package nftables-json) but no
Python module, so fw4 routers would lose the nftables backend; the fallback
below wraps the same few C calls the bindings use, with the same method
names for what mirrord needs.

OpenWrt also builds the library without JSON support (package
nftables-nojson, the default on images without fw4's JSON needs); mirrord
speaks only JSON to it, so that library is refused with its name.
"""

from __future__ import annotations

import ctypes
import json
from typing import Any, Optional

SONAME = "libnftables.so.1"
NFT_CTX_DEFAULT = 0
# Output flags of libnftables (nftables/libnftables.h).
NFT_CTX_OUTPUT_STATELESS = 1 << 2
NFT_CTX_OUTPUT_HANDLE = 1 << 3
NFT_CTX_OUTPUT_JSON = 1 << 4


class _CtypesNftables:
    """The subset of nftables.Nftables that mirrord uses."""

    def __init__(self, soname: str = SONAME) -> None:
        lib = ctypes.CDLL(soname)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_int]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
        lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        self._lib = lib
        self._ctx = lib.nft_ctx_new(NFT_CTX_DEFAULT)
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    def __del__(self) -> None:
        ctx = getattr(self, "_ctx", None)
        if ctx:
            self._lib.nft_ctx_free(ctx)
            self._ctx = None

    def _flag(self, flag: int, on: bool) -> None:
        flags = self._lib.nft_ctx_output_get_flags(self._ctx)
        self._lib.nft_ctx_output_set_flags(self._ctx, (flags | flag) if on else (flags & ~flag))

    def set_json_output(self, on: bool) -> None:
        self._flag(NFT_CTX_OUTPUT_JSON, on)

    def set_handle_output(self, on: bool) -> None:
        self._flag(NFT_CTX_OUTPUT_HANDLE, on)

    def set_stateless_output(self, on: bool) -> None:
        self._flag(NFT_CTX_OUTPUT_STATELESS, on)

    def set_dry_run(self, on: bool) -> None:
        self._lib.nft_ctx_set_dry_run(self._ctx, on)

    def cmd(self, text: str) -> tuple[int, str, str]:
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
        out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
        err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        return rc, out.decode(), err.decode()

    def json_cmd(self, root: dict[str, Any]) -> tuple[int, Any, str]:
        self.set_json_output(True)
        rc, out, err = self.cmd(json.dumps(root))
        return rc, (json.loads(out) if out else None), err


# nft answers "Interrupted system call" (EINTR) when the ruleset changed while
# it read its cache (the kernel marked the dump interrupted), and the kernel
# refuses a batch built against an older generation (ERESTART): in both cases
# nothing was committed, and the same command is simply asked again.
INTERRUPTED_RETRIES = 3


def _interrupted(err: Any) -> bool:
    return "Interrupted system call" in str(err or "")


# What to install, by platform, when libnftables is missing or cannot speak JSON.
INSTALL_HINT = ("install libnftables with JSON support: nftables-json on OpenWrt, "
                "libnftables1 on Debian/Ubuntu")


class LibnftablesUnavailable(ImportError):
    """libnftables cannot be used by mirrord; the message says why and what to install."""


def open_nftables() -> Any:
    """An nftables context: the Python bindings if importable, else the ctypes twin.

    Raises LibnftablesUnavailable (an ImportError) when libnftables.so.1 is
    missing or was built without JSON support.
    """
    # Load the library before the bindings try: their constructor fails half-way
    # when it is missing, and their __del__ then prints a traceback on every run.
    try:
        ctypes.CDLL(SONAME)
    except OSError as e:
        raise LibnftablesUnavailable(f"{SONAME} cannot be loaded ({e}); {INSTALL_HINT}") from None
    try:
        import nftables
    except ImportError:
        nft: Any = _CtypesNftables()
    else:
        nft = nftables.Nftables()
    why = json_unsupported(nft)
    if why:
        raise LibnftablesUnavailable(why)
    return nft


def json_unsupported(nft: Any) -> Optional[str]:
    """Why this libnftables cannot take mirrord's JSON, or None when it can.

    An empty JSON batch is parsed in userspace only (no netlink, no privilege
    needed). A library built without JSON hands it to the nft-syntax parser,
    which fails on the first '{'.
    """
    nft.set_json_output(True)
    try:
        rc, _, err = nft.cmd('{"nftables": []}')
    finally:
        nft.set_json_output(False)
    if rc == 0:
        return None
    first = (str(err).strip().splitlines() or ["no error text"])[0]
    return (f"{SONAME} was built without JSON support (it answered an empty JSON batch with "
            f"'{first}'; OpenWrt's nftables-nojson is such a build); {INSTALL_HINT}")


class NftSession:
    """One libnftables context (one netlink socket), JSON by default.

    Every call leaves the context as it found it: JSON output on, handles
    and stateless output off.
    """

    def __init__(self, nft: Any) -> None:
        self.nft = nft
        nft.set_json_output(True)
        nft.set_handle_output(False)

    @classmethod
    def open(cls) -> NftSession:
        """Raises LibnftablesUnavailable (an ImportError) naming what to install."""
        return cls(open_nftables())

    def json(self, cmds: list[dict[str, Any]]) -> tuple[int, Any, str]:
        """One JSON batch (one transaction): rc, the parsed answer or None, the error text."""
        for _ in range(INTERRUPTED_RETRIES):
            rc, out, err = self.nft.json_cmd({"nftables": cmds})
            if rc == 0 or not _interrupted(err):
                break
        if isinstance(out, str):
            out = json.loads(out) if out else None
        return int(rc), out, str(err or "")

    def text(self, command: str, handles: bool = False, stateless: bool = False
             ) -> tuple[int, str, str]:
        """A command in nft syntax, answered in nft syntax."""
        nft = self.nft
        nft.set_json_output(False)
        nft.set_handle_output(handles)
        nft.set_stateless_output(stateless)
        try:
            for _ in range(INTERRUPTED_RETRIES):
                rc, out, err = nft.cmd(command)
                if rc == 0 or not _interrupted(err):
                    break
        finally:
            nft.set_stateless_output(False)
            nft.set_handle_output(False)
            nft.set_json_output(True)
        return int(rc), str(out or ""), str(err or "")

    def list_table(self, family: str, name: str) -> Optional[list[dict[str, Any]]]:
        """The table's objects (no metainfo), or None when it does not exist."""
        rc, out, _ = self.json([{"list": {"table": {"family": family, "name": name}}}])
        if rc != 0 or not out:
            return None
        return [o for o in out.get("nftables", []) if "metainfo" not in o]

    def check(self, cmds: list[dict[str, Any]]) -> tuple[int, str]:
        """Validate a batch in the kernel without committing it (dry run)."""
        # PyPI's copy of the bindings has no set_dry_run; a context of the
        # ctypes twin (the library is loaded already) runs the check instead,
        # and is freed right after: a context holds about 1 MiB of the
        # library's caches, and the check runs once, at start.
        checker = self.nft if hasattr(self.nft, "set_dry_run") else _CtypesNftables()
        checker.set_dry_run(True)
        try:
            rc, _, err = checker.json_cmd({"nftables": cmds})
        finally:
            checker.set_dry_run(False)
        return int(rc), str(err or "")
