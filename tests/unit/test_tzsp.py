"""TZSP codec, the receiver's pure parts, and the worker's job/counter plumbing."""

from __future__ import annotations

import dataclasses
import io
import ipaddress
import json
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrord.match import Address, Match, PortRange
from mirrord.tzsp import codec as tzsp
from mirrord.tzsp.job import (
    SharedCounters,
    TzspCounters,
    TzspJob,
    match_from_dict,
    match_to_dict,
)
from mirrord.tzsp.protocol import SHM_SIZE
from mirrord.tzsp.receive import PcapWriter, ReceiveError, Receiver, parse_listen

FRAME = bytes.fromhex("0200000000bb0200000000aa0800") + b"\x45" + bytes(40)


def test_encode_whole_frame_has_the_minimal_header() -> None:
    assert tzsp.encode(FRAME) == b"\x01\x00\x00\x01\x01" + FRAME
    # An original length equal to the carried length is not a truncation.
    assert tzsp.encode(FRAME, len(FRAME)) == b"\x01\x00\x00\x01\x01" + FRAME


def test_encode_truncated_frame_carries_tag_41() -> None:
    cut = FRAME[:20]
    assert tzsp.encode(cut, 1514) == b"\x01\x00\x00\x01\x29\x02\x05\xea\x01" + cut
    assert len(tzsp.header(1514)) == tzsp.TRUNCATED_HEADER_LEN


def test_encode_clamps_original_length_to_16_bits() -> None:
    data = tzsp.encode(b"x" * 100, 200_000)
    assert data[4:8] == b"\x29\x02\xff\xff"
    assert tzsp.decode(data)[2] == 0xFFFF


def test_encode_rejects_original_shorter_than_frame() -> None:
    with pytest.raises(ValueError):
        tzsp.encode(FRAME, len(FRAME) - 1)


def test_decode_roundtrip_and_fields() -> None:
    assert tzsp.decode(tzsp.encode(FRAME)) == (1, FRAME, None)
    assert tzsp.decode(tzsp.encode(FRAME[:30], 9014)) == (1, FRAME[:30], 9014)


def test_decode_skips_padding_and_unknown_tags() -> None:
    # PAD, tag 10 (RSSI, 1 byte), tag 41, PAD, END
    data = b"\x01\x00\x00\x01" + b"\x00" + b"\x0a\x01\x7f" + b"\x29\x02\x01\x00" + b"\x00\x01"
    assert tzsp.decode(data + FRAME[:20]) == (1, FRAME[:20], 256)


def test_decode_accepts_transmit_type_and_other_encapsulations() -> None:
    assert tzsp.decode(b"\x01\x01\x00\x12\x01abc") == (18, b"abc", None)


@pytest.mark.parametrize("data, why", [
    (b"", "shorter"),
    (b"\x01\x00\x00", "shorter"),
    (b"\x02\x00\x00\x01\x01", "version"),
    (b"\x01\x04\x00\x01\x01", "type 4"),  # keepalive
    (b"\x01\x00\x00\x01", "not terminated"),
    (b"\x01\x00\x00\x01\x00\x00", "not terminated"),
    (b"\x01\x00\x00\x01\x29", "truncated"),
    (b"\x01\x00\x00\x01\x29\x05\x00\x00", "runs past"),
    (b"\x01\x00\x00\x01\x29\x01\x00\x01", "length 1"),
    (b"\x01\x00\x00\x01\x29\x02\x00\x02\x01abc", "shorter than the frame"),
])
def test_decode_rejects_malformed(data: bytes, why: str) -> None:
    with pytest.raises(tzsp.TzspError, match=why):
        tzsp.decode(data)


def test_tzsp_error_is_a_value_error() -> None:
    assert issubclass(tzsp.TzspError, ValueError)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=64))
def test_decode_fuzz_raises_only_tzsp_error(data: bytes) -> None:
    try:
        encap, frame, orig = tzsp.decode(data)
    except tzsp.TzspError:
        return
    assert 0 <= encap <= 0xFFFF
    assert isinstance(frame, bytes) and data.endswith(frame)
    assert orig is None or orig >= len(frame)


@settings(max_examples=1000, deadline=None)
@given(st.binary(min_size=4, max_size=40).map(lambda b: b"\x01" + bytes([b[0] % 2]) + b[1:]))
def test_decode_fuzz_valid_prefix(data: bytes) -> None:
    # Datagrams that pass the version/type checks exercise the tag parser.
    try:
        tzsp.decode(data)
    except tzsp.TzspError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=14, max_size=3000), st.one_of(st.none(), st.integers(0, 70000)))
def test_roundtrip_property(frame: bytes, extra: Optional[int]) -> None:
    orig = None if extra is None else len(frame) + extra
    encap, out, got = tzsp.decode(tzsp.encode(frame, orig))
    assert encap == tzsp.ENCAP_ETHERNET and out == frame
    if orig is None or orig == len(frame):
        assert got is None
    else:
        assert got == min(orig, 0xFFFF)


def test_scapy_dissects_our_encoding() -> None:
    """An independent TZSP implementation reads what we write."""
    from scapy.all import Ether, raw
    from scapy.contrib.tzsp import TZSP

    pkt = TZSP(tzsp.encode(FRAME[:30], 1514))
    assert pkt.version == 1 and pkt.type == 0 and pkt.encapsulated_protocol == 1
    assert pkt.rx_frame_length == 1514
    assert raw(pkt[Ether]) == FRAME[:30]
    whole = TZSP(tzsp.encode(FRAME))
    assert raw(whole[Ether]) == FRAME


# -- receiver -------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("0.0.0.0:37008", ("0.0.0.0", 37008, 2)),
    ("192.0.2.1:9", ("192.0.2.1", 9, 2)),
    ("[::]:37008", ("::", 37008, 10)),
    ("[2001:db8::1]:4000", ("2001:db8::1", 4000, 10)),
    ("37009", ("0.0.0.0", 37009, 2)),
    (":37010", ("0.0.0.0", 37010, 2)),
])
def test_parse_listen(text: str, want: tuple[str, int, int]) -> None:
    family, host, port = parse_listen(text)
    assert (host, port, int(family)) == want


@pytest.mark.parametrize("text", ["::1:37008", "[::1]37008", "host:37008", "0.0.0.0:0",
                                  "0.0.0.0:70000", "0.0.0.0:x"])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ReceiveError):
        parse_listen(text)


def test_pcap_writer_output_is_read_by_scapy() -> None:
    from scapy.utils import RawPcapReader

    buf = io.BytesIO()
    w = PcapWriter(buf)
    w.write(FRAME, None, 1_700_000_000.25)
    w.write(FRAME[:20], 9014, 1_700_000_001.5)
    buf.seek(0)
    records = list(RawPcapReader(buf))
    assert records[0][0] == FRAME and records[1][0] == FRAME[:20]
    meta = records[1][1]
    assert (meta.wirelen, meta.caplen, meta.sec, meta.usec) == (9014, 20, 1_700_000_001, 500000)
    assert struct.unpack_from("=I", buf.getvalue(), 20)[0] == 1  # LINKTYPE_ETHERNET


class _ListSink:
    def __init__(self) -> None:
        self.frames: list[tuple[bytes, Optional[int]]] = []

    def write(self, frame: bytes, orig_len: Optional[int], now: float) -> None:
        self.frames.append((frame, orig_len))

    def flush(self) -> None:
        pass


def test_receiver_counts_malformed_and_skips_them() -> None:
    sink = _ListSink()
    rx = Receiver(None, sink, None)  # type: ignore[arg-type]
    for data in (tzsp.encode(FRAME), b"garbage!", b"\x01\x00\x00\x12\x01" + FRAME,
                 b"\x01\x00\x00\x01\x01" + b"short", tzsp.encode(FRAME[:20], 100)):
        rx.buf[:len(data)] = data
        rx.handle(len(data), 0.0)
    assert (rx.received, rx.written, rx.malformed) == (5, 2, 3)
    assert sink.frames == [(FRAME, None), (FRAME[:20], 100)]


# -- worker plumbing ----------------------------------------------------------------

def test_job_json_roundtrip() -> None:
    m = Match(family="any", protocols=(6, 17), ports=(PortRange(53, 53),),
              sports=(PortRange(1000, 2000),), dports=(), sources=(
                  ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/48")),
              destinations=(ipaddress.ip_network("198.51.100.7/32"),))
    assert match_from_dict(match_to_dict(m)) == m
    job = TzspJob("m", "br-lan", 7, ("in", "out"), m, ipaddress.ip_address("203.0.113.130"),
                  37008, 1500, ipaddress.ip_address("203.0.113.1"))
    assert TzspJob.from_json(job.to_json()) == job
    job6 = TzspJob("m", "wan", 3, ("out",), Match(), ipaddress.ip_address("2001:db8:3::10"),
                   37008, 65535, ring_bytes=32 << 20)
    assert TzspJob.from_json(job6.to_json()) == job6


def test_shared_counters_roundtrip() -> None:
    buf = mmap.mmap(-1, SHM_SIZE)
    writer, reader = SharedCounters(buf), SharedCounters(buf)
    assert reader.read() == TzspCounters()
    writer.write((1, 2, 3, 4, 5, 6, 8))
    assert reader.read() == TzspCounters(1, 2, 3, 4, 5, 6, 8)
    writer.write((10, 20, 30, 40, 50, 60, 70))
    assert reader.read() == TzspCounters(10, 20, 30, 40, 50, 60, 70)
    writer.set_reason("interface wan went away (ENXIO)")
    assert reader.reason() == "interface wan went away (ENXIO)"
    assert TzspCounters(1, 1, 1, 1, 1, 1, 1) + TzspCounters(1, 2, 3, 4, 5, 6, 8) == TzspCounters(
        2, 3, 4, 5, 6, 7, 9)
    # One slot per tap: a neighbour's writes, reason (however long) and reset stay in it.
    other = SharedCounters(buf, 1)
    other.write((7, 7, 7, 7, 7, 7, 7))
    other.set_reason("x" * 5000)
    other.set_meta(99, 2, 3)
    assert reader.read() == TzspCounters(10, 20, 30, 40, 50, 60, 70)
    assert reader.reason() == "interface wan went away (ENXIO)"
    assert other.meta() == (99, 2, 3) and 100 < len(other.reason()) < 256
    other.reset()
    assert other.read() == TzspCounters() and other.reason() == "" and other.meta() == (0, 0, 0)
    with pytest.raises(ValueError):
        SharedCounters(buf, SHM_SIZE // 256)


def test_worker_module_does_not_import_scapy() -> None:
    import subprocess
    import sys

    code = ("import sys, mirrord.tzsp.supervisor, mirrord.tzsp.worker, mirrord.tzsp.job, "
            "mirrord.tzsp.capture, mirrord.tzsp.bpf, mirrord.tzsp.codec, mirrord.tzsp.receive; "
            "print('scapy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True)
class _JobWithExclusions(TzspJob):
    """A field added later (as another change adds collector exclusions)."""

    exclude: tuple[Address, ...] = ()
    exclude_nets: tuple[IPNetwork, ...] = ()
    note: Optional[str] = None


def test_job_wire_form_follows_the_dataclass_fields() -> None:
    job = _JobWithExclusions(
        "m", "br-lan", 7, ("in",), Match(protocols=(17,)), ipaddress.ip_address("203.0.113.130"),
        37008, 1500, exclude=(ipaddress.ip_address("203.0.113.5"),
                              ipaddress.ip_address("2001:db8::5")),
        exclude_nets=(ipaddress.ip_network("198.51.100.0/24"),), note="x")
    assert _JobWithExclusions.from_json(job.to_json()) == job
    assert json.loads(job.to_json())["exclude"] == ["203.0.113.5", "2001:db8::5"]
    # Fields left out take their defaults (a worker newer than its daemon).
    old = json.loads(job.to_json())
    del old["exclude"], old["note"], old["ring_bytes"]
    back = _JobWithExclusions.from_json(json.dumps(old))
    assert (back.exclude, back.note, back.ring_bytes) == ((), None, 0)


@pytest.mark.parametrize("change, message", [
    ({"collector": "not-an-ip"}, "does not appear to be"),
    ({"ifindex": "7"}, "job.ifindex: unexpected value '7'"),
    ({"ifindex": True}, "job.ifindex: unexpected value True"),
    ({"directions": "in"}, "job.directions: unexpected value 'in'"),
    ({"surprise": 1}, "job: unknown field(s) surprise"),
    ({"mirror": None}, "job.mirror: unexpected value None"),
])
def test_job_wire_form_rejects_bad_values(change: dict[str, object], message: str) -> None:
    good = json.loads(TzspJob("m", "wan", 3, ("out",), Match(),
                              ipaddress.ip_address("203.0.113.10"), 37008, 65535).to_json())
    with pytest.raises(ValueError, match=re.escape(message)):
        TzspJob.from_json(json.dumps({**good, **change}))
    missing = dict(good)
    del missing["interface"]
    with pytest.raises(ValueError, match="interface"):
        TzspJob.from_json(json.dumps(missing))


def test_tap_line_roundtrip_and_rejects() -> None:
    from mirrord.tzsp.protocol import TapLine

    line = TapLine(7, 12, ("in", "out"), "2001:db8::5", 37008, None, 0, "lan 1\nx", "my mirror",
                   {"ethernet": bytes(range(16)), "raw": bytes(8)})
    text = line.encode()
    assert text.endswith("\n") and text.count("\n") == 1  # a name never breaks the line
    back = TapLine.decode(text.strip())
    assert (back.slot, back.ifindex, back.directions, back.collector, back.port, back.source,
            back.interface, back.mirror, back.programs) == (
        7, 12, ("in", "out"), "2001:db8::5", 37008, None, "lan 1\nx", "my mirror", line.programs)
    for bad in ("T 1 2", text.replace(" in+out ", " sideways "), text.replace("T ", "Q ", 1),
                text.strip()[:-2] + "0"):  # a program not a whole number of instructions
        with pytest.raises(ValueError):
            TapLine.decode(bad)


def test_tap_line_carries_the_daemons_compiled_filters() -> None:
    from mirrord.tzsp.bpf import compile_filter, pack
    from mirrord.tzsp.job import tap_line

    job = TzspJob("m", "wan", 3, ("out",), Match(protocols=(17,)),
                  ipaddress.ip_address("203.0.113.10"), 37008, 200,
                  exclude=(ipaddress.ip_address("203.0.113.5"),))
    line = tap_line(job, 4)
    for link in ("ethernet", "raw"):
        assert line.programs[link] == pack(compile_filter(
            job.match, job.never_captured(), directions=("out",), link=link,  # type: ignore[arg-type]
            snaplen=200))
    assert (line.slot, line.collector, line.ring_bytes) == (4, "203.0.113.10", 0)


def test_capture_process_imports_little() -> None:
    """The capture process's memory is mostly its imports: keep them few."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, sys.argv[1]); import mirrord.tzsp.capture; "
            "print(' '.join(sorted(sys.modules)))")
    root = str(Path(__file__).resolve().parents[2])
    mods = set(subprocess.run([sys.executable, "-I", "-S", "-c", code, root],
                              capture_output=True, text=True, check=True).stdout.split())
    heavy = {"logging", "typing", "dataclasses", "socket", "signal", "enum", "json", "argparse",
             "re", "ipaddress", "subprocess", "mirrord.tzsp.bpf", "mirrord.match", "mirrord.tzsp.supervisor",
             "mirrord.tzsp.job", "mirrord.tzsp.worker"}
    assert not mods & heavy, sorted(mods & heavy)
    assert {"mirrord.tzsp.ring", "mirrord.tzsp.protocol", "ctypes"} <= mods


# -- receive --allow ---------------------------------------------------------------

def test_parse_allow() -> None:
    from mirrord.tzsp.receive import parse_allow

    nets = parse_allow(["192.0.2.1,198.51.100.0/24", "2001:db8::/32", " 203.0.113.7 "])
    assert [str(n) for n in nets] == ["192.0.2.1/32", "198.51.100.0/24", "2001:db8::/32",
                                      "203.0.113.7/32"]
    assert [str(n) for n in parse_allow(["any"])] == ["0.0.0.0/0", "::/0"]


@pytest.mark.parametrize("value, message", [
    ("192.0.2.1/24", "host bits set; did you mean 192.0.2.0/24?"),
    ("router.lan", "not an IPv4/IPv6 address or prefix"),
    ("192.0.2.1,,192.0.2.2", "empty prefix"),
    ("192.0.2.0/33", "not an IPv4/IPv6 address or prefix"),
])
def test_parse_allow_rejects(value: str, message: str) -> None:
    from mirrord.tzsp.receive import parse_allow

    with pytest.raises(ReceiveError, match=re.escape(message)):
        parse_allow([value])


def test_sender_filter() -> None:
    from mirrord.tzsp.receive import SenderFilter, parse_allow

    f = SenderFilter(parse_allow(["192.0.2.1", "2001:db8:3::/48"]))
    assert f.permits("192.0.2.1")
    assert f.permits("::ffff:192.0.2.1")  # an IPv4 sender on a dual-stack [::] socket
    assert f.permits("2001:db8:3::10") and f.permits("2001:db8:3::10%eth0")
    for host in ("192.0.2.2", "::ffff:192.0.2.2", "2001:db8:4::1", "::1", "127.0.0.1",
                 "garbage"):
        assert not f.permits(host), host
    assert f.permits("192.0.2.1")  # cached answers stay right
    assert SenderFilter(None).permits("203.0.113.99")


def test_receiver_refuses_counts_and_logs_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    from mirrord.tzsp import receive
    from mirrord.tzsp.receive import SenderFilter, parse_allow

    sink = _ListSink()
    rx = Receiver(None, sink, None, SenderFilter(parse_allow(["192.0.2.1"])))  # type: ignore[arg-type]
    data = tzsp.encode(FRAME)
    rx.buf[:len(data)] = data
    caplog.set_level("WARNING", logger="mirrord.tzsp.receive")
    for i in range(1000):
        host = "198.51.100.7" if i % 2 else f"203.0.113.{i % 200}"
        if rx.admit(host, 100.0 + i * 0.001):
            rx.handle(len(data), 0.0)
    assert rx.admit("192.0.2.1", 101.0)
    rx.handle(len(data), 0.0)
    assert (rx.received, rx.written, rx.refused, rx.malformed) == (1001, 1, 1000, 0)
    assert sink.frames == [(FRAME, None)]
    # One line per new sender, bounded; no line per datagram.
    lines = [r.getMessage() for r in caplog.records]
    assert "refused TZSP from 203.0.113.0: not in --allow" in lines
    assert len(lines) <= receive.SENDERS_LOGGED + 2
    caplog.clear()
    assert not rx.admit("198.51.100.7", 100.0 + receive.REFUSED_REPORT + 1)
    assert [r.getMessage() for r in caplog.records] == [
        f"refused 1000 datagram(s) from senders not in --allow in the last "
        f"{receive.REFUSED_REPORT:.0f} s (last from 198.51.100.7)"]


def test_receive_tap_needs_allow(capsys: pytest.CaptureFixture[str]) -> None:
    from mirrord.tzsp.receive import main

    assert main(["--tap", "tzsp9", "--listen", "0.0.0.0:37999"]) == 2
    err = capsys.readouterr().err
    assert "--tap needs --allow" in err and "--allow any" in err
    assert main(["--write", "/dev/null", "--allow", "192.0.2.1/24"]) == 2
    assert "did you mean 192.0.2.0/24" in capsys.readouterr().err


# -- a planned tap becomes a job in one place ----------------------------------------

def _planned_tap() -> Any:
    from mirrord.plan.build import TzspTap
    from mirrord.spec import Collector

    ip = ipaddress.ip_address
    return TzspTap(mirror="m", interface="wan", ifindex=3, directions=("in",),
                   collector=Collector(name="ids", address=ip("203.0.113.10"), interface=None,
                                       transport="tzsp", port=37009, snaplen=1500, ring_mib=2),
                   match=Match(protocols=(17,)), exclude=(ip("198.51.100.5"),))


def _another(path: str, v: Any) -> Any:
    """A value of v's type other than v (any type a TzspTap field may hold)."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1
    if isinstance(v, str):
        return v + "2"
    if v is None:
        return "x0"
    if isinstance(v, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return v + 1
    if isinstance(v, Match):
        return Match(protocols=(6,))
    if isinstance(v, tuple) and v:
        return v + v
    if v == ():
        return ("192.0.2.9",)
    pytest.fail(f"{path}: teach this test another value of a {type(v).__name__}")


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every field of a dataclass, those of a nested dataclass (other than a Match) dotted."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, Match):
            out.update(_leaves(v, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = v
    return out


def _replace(obj: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition(".")
    if rest:
        return dataclasses.replace(obj, **{head: _replace(getattr(obj, head), rest, value)})
    return dataclasses.replace(obj, **{head: value})


def test_job_from_tap_maps_every_field() -> None:
    from mirrord.tzsp.job import TAP_FIELDS_UNUSED

    tap = _planned_tap()
    job = TzspJob.from_tap(tap)
    assert job == TzspJob("m", "wan", 3, ("in",), Match(protocols=(17,)),
                          ipaddress.ip_address("203.0.113.10"), 37009, 1500, None,
                          ring_bytes=2 << 20, exclude=(ipaddress.ip_address("198.51.100.5"),))
    leaves = _leaves(tap)
    assert set(TAP_FIELDS_UNUSED) <= set(leaves), "TAP_FIELDS_UNUSED names a field no tap has"
    reached: set[str] = set()
    for path, value in leaves.items():
        other = TzspJob.from_tap(_replace(tap, path, _another(path, value)))
        changed = {f.name for f in dataclasses.fields(TzspJob)
                   if getattr(other, f.name) != getattr(job, f.name)}
        if path in TAP_FIELDS_UNUSED:
            assert not changed, f"{path} is listed as unused but changes {changed}"
        else:
            # A field added to TzspTap (or its Collector) lands here until
            # from_tap carries it, or TAP_FIELDS_UNUSED says why not.
            assert changed, f"TzspTap field {path} does not reach the TzspJob"
        reached |= changed
    # Every job field comes from the tap, but the standalone worker's source address.
    assert reached == {f.name for f in dataclasses.fields(TzspJob)} - {"source"}


# -- a tap handle counts one run --------------------------------------------------------

def test_stopping_a_dead_process_tap_does_not_wait_for_the_next_process() -> None:
    """The capture process dies with two taps open; one tap is restarted (a new
    process) before the other's old handle is stopped. That stop has nothing
    to wait for: its slot says RUNNING for ever. Waiting for it timed out and
    killed the new process, so the restarted tap died too, again and again."""
    import time

    from mirrord.tzsp.job import SharedCounters
    from mirrord.tzsp.protocol import STATE_RUNNING
    from mirrord.tzsp.supervisor import CaptureProcess, TapHandle

    def job(name: str) -> TzspJob:  # no such interface: the process ends the tap at once
        return TzspJob("m", name, 2**31 - 7, ("in",), Match(),
                       ipaddress.ip_address("203.0.113.10"), 37008, 65535)

    proc = CaptureProcess()
    try:
        first, second = TapHandle(proc, job("mirrord-none1")), TapHandle(proc, job("mirrord-none2"))
        first.start()
        second.start()
        deadline = time.monotonic() + 20
        while first.poll() is None or second.poll() is None:
            assert time.monotonic() < deadline, "the capture process did not end the taps"
            proc.read_events()
            time.sleep(0.01)
        # As if killed while capturing: both slots RUNNING, both taps still in the set.
        proc.taps[first.slot_index], proc.taps[second.slot_index] = first, second
        for h in (first, second):
            SharedCounters(proc._buf, h.slot_index).set_meta(12345, STATE_RUNNING)  # type: ignore[arg-type]
        old = proc.pid
        proc._kill()
        while proc.read_events()[1] is False:
            time.sleep(0.01)
        first.stop(timeout=3)
        again = TapHandle(proc, job("mirrord-none1"))
        again.start()  # a new process
        assert proc.running() and proc.pid != old
        t0 = time.monotonic()
        second.stop(timeout=3)
        assert time.monotonic() - t0 < 1.0, "waited for a slot no process will close"
        assert proc.running(), "the new process was killed"
        again.stop()
    finally:
        proc.close()


def test_tap_handle_counts_its_own_run_and_keeps_its_final_counters() -> None:
    """A handle's counters are its run's; stop() keeps them past the slot's reuse, and a
    handle runs once (the daemon's ledger, not the handle, sums runs)."""
    import time

    from mirrord.tzsp.job import SharedCounters
    from mirrord.tzsp.supervisor import CaptureProcess, TapHandle

    # No such interface: the capture process ends the tap at once, opening nothing.
    job = TzspJob("m", "mirrord-none0", 2**31 - 7, ("in",), Match(),
                  ipaddress.ip_address("203.0.113.10"), 37008, 65535)
    proc = CaptureProcess()
    try:
        first = TapHandle(proc, job)
        assert (first.state(), first.counters()) == ("not started", TzspCounters())
        first.start()
        deadline = time.monotonic() + 20
        while first.poll() is None:
            assert time.monotonic() < deadline, "the capture process did not end the tap"
            proc.read_events()
            time.sleep(0.01)
        assert "mirrord-none0 went away" in (first.poll() or "")
        # What the capture process would have published before the end.
        SharedCounters(proc._buf, first.slot_index).write((5, 4, 300, 1, 1, 0, 0))  # type: ignore[arg-type]
        assert first.counters() == TzspCounters(5, 4, 300, 1, 1, 0, 0)
        first.stop()
        assert first.state() == "exited" and first.counters() == TzspCounters(5, 4, 300, 1, 1, 0, 0)
        with pytest.raises(RuntimeError, match="a new run is a new TapHandle"):
            first.start()
        # The next run: a new handle, in the slot the first gave back, from zero.
        second = TapHandle(proc, job)
        second.start()
        assert second.slot_index == first.slot_index
        assert second.counters() == TzspCounters()
        SharedCounters(proc._buf, second.slot_index).write((2, 2, 100, 0, 0, 0, 0))  # type: ignore[arg-type]
        assert second.counters() == TzspCounters(2, 2, 100, 0, 0, 0, 0)
        assert first.counters() == TzspCounters(5, 4, 300, 1, 1, 0, 0)
        second.stop()
        assert second.counters() == TzspCounters(2, 2, 100, 0, 0, 0, 0)
    finally:
        proc.close()
    assert not proc.running()
