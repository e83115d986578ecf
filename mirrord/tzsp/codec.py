"""TZSP (TaZmen Sniffer Protocol) encapsulation: encode and decode.

A datagram is: version (1), type (0 = received), encapsulation (u16 BE, 1 =
Ethernet), then tags, the last being END (1); the frame follows. Receivers
such as tzsp2pcap skip tags they do not know, so the only tag we add is 41
(original length) when the frame was cut to a snap length.
"""

from __future__ import annotations

import struct

# Not imported at run time: the capture process (which uses header()) stays
# without the typing module's half MiB.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Union

PORT = 37008
VERSION = 1
TYPE_RECEIVED = 0
TYPE_TRANSMIT = 1
ENCAP_ETHERNET = 1
ENCAP_80211 = 18
ENCAP_PRISM = 119
ENCAP_AVS = 127

TAG_PADDING = 0
TAG_END = 1
TAG_ORIGINAL_LENGTH = 41

# The common case: a whole Ethernet frame.
HEADER = bytes((VERSION, TYPE_RECEIVED, 0, ENCAP_ETHERNET, TAG_END))
HEADER_LEN = len(HEADER)
# With tag 41 (type, length 2, u16 BE value) before END.
TRUNCATED_HEADER_LEN = 4 + 4 + 1
MAX_ORIGINAL_LENGTH = 0xFFFF

_TRUNCATED = struct.Struct("!BBHBBHB")


class TzspError(ValueError):
    """A datagram that is not a well-formed TZSP frame."""


def header(orig_len: Optional[int] = None) -> bytes:
    """The bytes in front of an Ethernet frame; tag 41 carries `orig_len` when given."""
    if orig_len is None:
        return HEADER
    # A GRO/TSO super-packet can exceed what 16 bits hold; say "at least this".
    value = min(max(orig_len, 0), MAX_ORIGINAL_LENGTH)
    return _TRUNCATED.pack(VERSION, TYPE_RECEIVED, ENCAP_ETHERNET, TAG_ORIGINAL_LENGTH, 2, value,
                           TAG_END)


def encode(frame: bytes, orig_len: Optional[int] = None) -> bytes:
    """One TZSP datagram carrying an Ethernet `frame`.

    `orig_len` is the length before truncation; it is written (tag 41) only
    when it differs from the length actually carried.
    """
    if orig_len is not None and orig_len != len(frame):
        if orig_len < len(frame):
            raise ValueError(f"original length {orig_len} is shorter than the frame ({len(frame)})")
        return header(orig_len) + bytes(frame)
    return HEADER + bytes(frame)


def decode(datagram: Union[bytes, bytearray, memoryview]) -> tuple[int, bytes, Optional[int]]:
    """(encapsulation, frame, original length or None) of a TZSP datagram.

    Raises TzspError (a ValueError) for anything malformed and never any
    other exception, whatever the input: it parses untrusted network input.
    """
    data = memoryview(datagram)
    n = len(data)
    if n < 4:
        raise TzspError(f"datagram of {n} bytes is shorter than the TZSP header")
    version, kind = data[0], data[1]
    if version != VERSION:
        raise TzspError(f"TZSP version {version} (expected {VERSION})")
    if kind not in (TYPE_RECEIVED, TYPE_TRANSMIT):
        raise TzspError(f"TZSP type {kind} carries no frame")
    encapsulation = (data[2] << 8) | data[3]
    orig_len: Optional[int] = None
    pos = 4
    while True:
        if pos >= n:
            raise TzspError("tag list not terminated by END")
        tag = data[pos]
        if tag == TAG_END:
            pos += 1
            break
        if tag == TAG_PADDING:
            pos += 1
            continue
        if pos + 2 > n:
            raise TzspError(f"tag {tag} truncated")
        length = data[pos + 1]
        if pos + 2 + length > n:
            raise TzspError(f"tag {tag} of length {length} runs past the datagram")
        if tag == TAG_ORIGINAL_LENGTH:
            if length != 2:
                raise TzspError(f"tag 41 (original length) has length {length}, not 2")
            orig_len = (data[pos + 2] << 8) | data[pos + 3]
        pos += 2 + length
    frame = bytes(data[pos:])
    if orig_len is not None and orig_len < len(frame):
        raise TzspError(f"original length {orig_len} is shorter than the frame ({len(frame)})")
    return encapsulation, frame, orig_len
