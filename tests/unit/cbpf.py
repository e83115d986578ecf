"""A classic BPF interpreter for the unit tests: runs a compiled socket filter
over a frame as the kernel's would (tests/kernel attaches the same programs
to real sockets). Only what mirrord's compiler emits: loads (absolute,
indirect, immediate, scratch, the packet-type and protocol ancillaries),
stores, ALU, jumps, returns."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from mirrord.tzsp.bpf_asm import (
    ABS,
    ALU,
    IMM,
    IND,
    JMP,
    LD,
    LDX,
    MEM,
    MISC,
    RET,
    SKF_AD_OFF,
    SKF_AD_PKTTYPE,
    SKF_AD_PROTOCOL,
    ST,
    STX,
    B,
    H,
    Insn,
    W,
)

_ALU = {
    0x00: lambda a, b: a + b, 0x10: lambda a, b: a - b, 0x20: lambda a, b: a * b,
    0x30: lambda a, b: a // b, 0x40: lambda a, b: a | b, 0x50: lambda a, b: a & b,
    0x60: lambda a, b: a << b, 0x70: lambda a, b: a >> b, 0x90: lambda a, b: a % b,
    0xA0: lambda a, b: a ^ b,
}


def run(prog: Sequence[Insn], frame: bytes, *, pkttype: int = 0, protocol: int = 0) -> int:
    """The filter's verdict on `frame`: the bytes to keep (0: dropped)."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    sizes = {W: ("!I", 4), H: ("!H", 2), B: ("!B", 1)}
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        cls = code & 0x07
        if cls in (LD, LDX):
            mode, size = code & 0xE0, code & 0x18
            if mode == IMM:
                v = k
            elif mode == MEM:
                v = mem[k]
            elif cls == LD and mode == ABS and k >= 0x80000000:
                off = k - 0x100000000 - SKF_AD_OFF
                v = {SKF_AD_PKTTYPE: pkttype, SKF_AD_PROTOCOL: protocol}[off]
            else:
                at = k + (x if mode == IND else 0)
                fmt, n = sizes[size]
                if at + n > len(frame):
                    return 0  # the kernel drops a frame read past its end
                v = struct.unpack_from(fmt, frame, at)[0]
            if cls == LD:
                a = v
            else:
                x = v
        elif cls == ST:
            mem[k] = a
        elif cls == STX:
            mem[k] = x
        elif cls == ALU:
            a = _ALU[code & 0xF0](a, x if code & 0x08 else k) & 0xFFFFFFFF
        elif cls == JMP:
            op = code & 0xF0
            if op == 0x00:
                pc += k
                continue
            v = x if code & 0x08 else k
            hit = {0x10: a == v, 0x20: a > v, 0x30: a >= v, 0x40: bool(a & v)}[op]
            pc += jt if hit else jf
        elif cls == RET:
            return k
        elif cls == MISC:
            if code & 0xF8 == 0x00:
                x = a
            else:
                a = x
