"""Access to libnftables: the distribution's Python bindings, or a minimal ctypes twin.

Debian/Ubuntu ship the bindings as python3-nftables (and PyPI as
pip-nftables). OpenWrt ships libnftables.so.1 (package nftables-json) but no
Python module, so fw4 routers would lose the nftables backend; the fallback
below wraps the same four C calls the bindings use, with the same method
names for what mirrord needs.
"""

from __future__ import annotations

import ctypes
import json
from typing import Any

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


def open_nftables() -> Any:
    """An nftables context; raises ImportError/OSError when neither form is usable."""
    try:
        import nftables
    except ImportError:
        try:
            return _CtypesNftables()
        except OSError as e:
            raise ImportError(
                f"neither the nftables Python bindings nor {SONAME} are available ({e})"
            ) from e
    return nftables.Nftables()
