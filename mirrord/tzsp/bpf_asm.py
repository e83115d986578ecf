"""Classic BPF as mirrord writes it: the opcodes, a small assembler with
symbolic labels (far jumps through trampolines), and the packed and printed
forms of a program. What the programs say is bpf.py's."""

from __future__ import annotations

import itertools
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

Insn = tuple[int, int, int, int]  # (code, jt, jf, k), as in struct sock_filter

# Instruction classes and fields (linux/filter.h, linux/bpf_common.h).
LD, LDX, ST, STX, ALU, JMP, RET, MISC = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
W, H, B = 0x00, 0x08, 0x10
IMM, ABS, IND, MEM, MSH = 0x00, 0x20, 0x40, 0x60, 0xA0
ADD, SUB, MUL, AND, LSH, RSH, XOR = 0x00, 0x10, 0x20, 0x50, 0x60, 0x70, 0xA0
JA, JEQ, JGT, JGE, JSET = 0x00, 0x10, 0x20, 0x30, 0x40
K, X = 0x00, 0x08
TAX, TXA = 0x00, 0x80

SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL = 0
SKF_AD_PKTTYPE = 4
PACKET_OUTGOING = 4
BPF_MAXINSNS = 4096

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27


def anc(offset: int) -> int:
    return (SKF_AD_OFF + offset) & 0xFFFFFFFF


class BpfError(ValueError):
    """The match cannot be expressed as a classic BPF program."""


@dataclass
class _Op:
    code: int
    k: int = 0
    jt: Optional[str] = None  # label; None = next instruction
    jf: Optional[str] = None
    target: Optional[str] = None  # for JA


_Item = Union[_Op, str]  # a str is a label


class Assembler:
    """A tiny assembler: symbolic labels, far conditional jumps via trampolines."""

    def __init__(self) -> None:
        self.items: list[_Item] = []
        self._n = itertools.count()

    def label(self, hint: str) -> str:
        return f"{hint}.{next(self._n)}"

    def place(self, label: str) -> None:
        self.items.append(label)

    def op(self, code: int, k: int = 0) -> None:
        self.items.append(_Op(code, k & 0xFFFFFFFF))

    def jump(self, code: int, k: int, jt: Optional[str], jf: Optional[str]) -> None:
        self.items.append(_Op(JMP | code | K, k & 0xFFFFFFFF, jt, jf))

    def ja(self, target: str) -> None:
        self.items.append(_Op(JMP | JA, 0, target=target))

    def ret(self, k: int) -> None:
        self.items.append(_Op(RET | K, k))

    def assemble(self) -> list[Insn]:
        items = list(self.items)
        while True:
            pos: dict[str, int] = {}
            ops: list[_Op] = []
            for it in items:
                if isinstance(it, str):
                    pos[it] = len(ops)
                else:
                    ops.append(it)
            far = self._first_far(ops, pos)
            if far is None:
                break
            items = self._trampoline(items, far)
        out: list[Insn] = []
        for i, o in enumerate(ops):
            if o.code == JMP | JA and o.target is not None:
                out.append((o.code, 0, 0, pos[o.target] - i - 1))
            elif o.code & 0x07 == JMP:
                jt = pos[o.jt] - i - 1 if o.jt else 0
                jf = pos[o.jf] - i - 1 if o.jf else 0
                out.append((o.code, jt, jf, o.k))
            else:
                out.append((o.code, 0, 0, o.k))
        if len(out) > BPF_MAXINSNS:
            raise BpfError(f"filter needs {len(out)} instructions, the kernel allows {BPF_MAXINSNS}")
        return out

    @staticmethod
    def _first_far(ops: list[_Op], pos: dict[str, int]) -> Optional[_Op]:
        for i, o in enumerate(ops):
            if o.code & 0x07 != JMP or o.code == JMP | JA:
                continue
            for lab in (o.jt, o.jf):
                if lab is None:
                    continue
                d = pos[lab] - i - 1
                if d < 0:
                    raise BpfError("internal: backward jump")
                if d > 255:
                    return o
        return None

    def _trampoline(self, items: list[_Item], op: _Op) -> list[_Item]:
        # cond(jt -> T1, jf -> T2); T1: ja jt; T2: ja jf (or fall through past it)
        idx = next(i for i, it in enumerate(items) if it is op)
        after = self.label("after")
        t_true, t_false = self.label("tt"), self.label("tf")
        new: list[_Item] = [_Op(op.code, op.k, t_true, t_false)]
        new += [t_true, _Op(JMP | JA, 0, target=op.jt or after)]
        new += [t_false, _Op(JMP | JA, 0, target=op.jf or after)]
        new.append(after)
        return items[:idx] + new + items[idx + 1:]


def pack(program: Sequence[Insn]) -> bytes:
    """The program as an array of struct sock_filter."""
    return b"".join(struct.pack("=HBBI", *insn) for insn in program)


def attach(sock: socket.socket, program: Sequence[Insn]) -> None:
    """SO_ATTACH_FILTER; the kernel copies the program, so the buffer may go."""
    import ctypes  # here: the daemon only compiles and packs programs

    buf = ctypes.create_string_buffer(pack(program))
    fprog = struct.pack("HL", len(program), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def disassemble(program: Sequence[Insn]) -> str:
    """tcpdump -d style text, for logs and `render`."""
    lines = []
    sizes = {W: "", H: "h", B: "b"}
    for i, (code, jt, jf, k) in enumerate(program):
        cls = code & 0x07
        if cls == LD:
            mode, size = code & 0xE0, code & 0x18
            if mode == ABS:
                where = f"[{k}]" if k < 0x80000000 else f"#anc[{k - 0x100000000 - SKF_AD_OFF}]"
            elif mode == IND:
                where = f"[x + {k}]"
            else:
                where = f"#{k}"
            text = f"ld{sizes.get(size, '?')} {where}"
        elif cls == LDX:
            text = f"ldx #{k}" if code & 0xE0 == IMM else f"ldxb 4*([{k}]&0xf)"
        elif cls == ALU:
            name = {ADD: "add", AND: "and", LSH: "lsh"}.get(code & 0xF0, f"alu{code:#x}")
            text = f"{name} x" if code & X else f"{name} #{k:#x}"
        elif cls == JMP:
            if code & 0xF0 == JA:
                text = f"ja {i + 1 + k}"
            else:
                name = {JEQ: "jeq", JGT: "jgt", JGE: "jge", JSET: "jset"}[code & 0xF0]
                text = f"{name} #{k:#x} jt {i + 1 + jt} jf {i + 1 + jf}"
        elif cls == RET:
            text = f"ret #{k}"
        elif cls == MISC:
            text = "tax" if code & 0xF8 == TAX else "txa"
        else:
            text = f"op {code:#x} {jt} {jf} {k:#x}"
        lines.append(f"({i:03d}) {text}")
    return "\n".join(lines)
