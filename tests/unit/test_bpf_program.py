"""The classic BPF compiler's programs, checked without a kernel (their shape, their words).

tests/kernel/test_bpf.py attaches the same programs to packet sockets.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import Any

import pytest

from mirrord.match import Match, PortRange
from mirrord.tzsp.bpf import BpfError, compile_filter, disassemble
from mirrord.tzsp.bpf_asm import JA, JMP, RET
from tests.kernel.test_bpf import COLLECTOR, OTHER, OTHER6


def net(text: str) -> Any:
    return ipaddress.ip_network(text)


def _check_structure(prog: Sequence[tuple[int, int, int, int]]) -> None:
    assert prog and prog[-1][0] & 0x07 == RET
    for i, (code, jt, jf, k) in enumerate(prog):
        if code & 0x07 == JMP:
            if code == JMP | JA:
                assert i + 1 + k < len(prog)
            else:
                assert 0 <= jt <= 255 and 0 <= jf <= 255
                assert i + 1 + max(jt, jf) < len(prog)


@pytest.mark.parametrize("match", [
    Match(),
    Match(family="ipv6", protocols=(58,)),
    Match(protocols=(17,), ports=(PortRange(53, 53),)),
    Match(sources=tuple(net(f"198.51.100.{i}/32") for i in range(0, 250, 2))
          + tuple(net(f"2001:db8:{i:x}::/48") for i in range(60))),
])
@pytest.mark.parametrize("directions", [("in",), ("out",), ("in", "out")])
def test_program_structure(match: Match, directions: tuple[str, ...]) -> None:
    for link in ("ethernet", "raw"):
        prog = compile_filter(match, (ipaddress.ip_address(COLLECTOR),), directions=directions,
                              link=link)  # type: ignore[arg-type]
        _check_structure(prog)
        assert disassemble(prog).count("\n") == len(prog) - 1


def test_snaplen_is_the_accept_value() -> None:
    prog = compile_filter(Match(), snaplen=200)
    assert (RET, 0, 0, 200) in prog
    # Never more than a TZSP datagram can carry.
    assert max(k for code, _, _, k in compile_filter(Match()) if code == RET) <= 65494


def test_bad_directions_rejected() -> None:
    with pytest.raises(BpfError):
        compile_filter(Match(), directions=("sideways",))
    with pytest.raises(BpfError):
        compile_filter(Match(), directions=())


def test_worker_filter_excludes_the_jobs_exclusions() -> None:
    from mirrord.tzsp.job import TzspJob

    own, other, other6 = (ipaddress.ip_address(a) for a in (COLLECTOR, OTHER, OTHER6))
    job = TzspJob(mirror="m", interface="wan", ifindex=3, directions=("in", "out"),
                  match=Match(protocols=(17,)), collector=own, port=37008, snaplen=65535,
                  exclude=(own, other, other6))
    back = TzspJob.from_json(job.to_json())
    assert back == job
    assert back.never_captured() == (own, other, other6)  # each once, own collector first
    # An older job (no exclude key) still reads, and still excludes its collector.
    legacy = json.loads(job.to_json())
    del legacy["exclude"]
    old = TzspJob.from_json(json.dumps(legacy))
    assert old.exclude == () and old.never_captured() == (own,)
    words = {k for code, _, _, k in compile_filter(job.match, back.never_captured())
             if code & 0x07 == JMP}
    assert {int(own), int(other)} <= words
    assert int(other6) >> 96 in words and int(other6) & 0xFFFFFFFF in words
    # Giving an address twice costs nothing.
    assert compile_filter(job.match, (own, own, other)) == compile_filter(job.match, (own, other))
