"""`mirrord receive`: TZSP in, a pcap file, a pcap stream or a TAP device out.

The receiver runs on the collector. Writing to a TAP interface gives an IDS
(Snort, Suricata, Zeek) an interface to sniff as if it were a switch's SPAN
port; the pcap stream on stdout feeds `tcpdump -r -` or `wireshark -k -i -`.
Datagrams are untrusted input: anything malformed is counted and skipped.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import ipaddress
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from typing import Any, BinaryIO, Optional, Union

from . import codec as tzsp

log = logging.getLogger(__name__)

DEFAULT_LISTEN = f"0.0.0.0:{tzsp.PORT}"
LINKTYPE_ETHERNET = 1
PCAP_SNAPLEN = 262144
ETH_HLEN = 14

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

_RECORD = struct.Struct("=IIII")
# How many distinct senders are remembered for logging (a flood of forged
# source addresses must not grow memory), and how often refusals are summed up.
SENDERS_LOGGED = 64
REFUSED_REPORT = 10.0
_CACHE_MAX = 4096


class ReceiveError(Exception):
    pass


def parse_listen(text: str) -> tuple[socket.AddressFamily, str, int]:
    """'ADDR:PORT', '[V6ADDR]:PORT', ':PORT' or 'PORT' -> (family, address, port)."""
    host, port_text = "", text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise ReceiveError(f"--listen {text!r}: expected [ADDRESS]:PORT")
        host, port_text = text[1:end], text[end + 2:]
    elif ":" in text:
        if text.count(":") > 1:
            raise ReceiveError(f"--listen {text!r}: write IPv6 addresses as [ADDRESS]:PORT")
        host, port_text = text.rsplit(":", 1)
    try:
        port = int(port_text)
    except ValueError:
        raise ReceiveError(f"--listen {text!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ReceiveError(f"--listen {text!r}: port {port} out of range")
    host = host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.inet_pton(family, host)
    except OSError:
        raise ReceiveError(f"--listen {text!r}: {host!r} is not an IP address") from None
    return family, host, port


Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def parse_allow(values: list[str]) -> tuple[Network, ...]:
    """--allow values (repeatable, comma-separated) -> prefixes; 'any' is every address."""
    nets: list[Network] = []
    for value in values:
        for item in value.split(","):
            text = item.strip()
            if not text:
                raise ReceiveError(f"--allow {value!r}: empty prefix")
            if text == "any":
                nets += [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
                continue
            try:
                nets.append(ipaddress.ip_network(text))
            except ValueError:
                try:
                    loose = ipaddress.ip_network(text, strict=False)
                except ValueError:
                    raise ReceiveError(f"--allow {text!r}: not an IPv4/IPv6 address or prefix"
                                       ) from None
                raise ReceiveError(f"--allow {text!r}: host bits set; did you mean {loose}?"
                                   ) from None
    return tuple(dict.fromkeys(nets))


class SenderFilter:
    """Which source addresses may feed us; None allows every sender."""

    def __init__(self, allow: Optional[tuple[Network, ...]]) -> None:
        self.allow = allow
        self._cache: dict[str, bool] = {}

    def permits(self, host: str) -> bool:
        if self.allow is None:
            return True
        ok = self._cache.get(host)
        if ok is None:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            ok = self._cache[host] = self._check(host)
        return ok

    def _check(self, host: str) -> bool:
        assert self.allow is not None
        try:
            addr: Any = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        # A dual-stack [::] socket reports IPv4 senders as ::ffff:a.b.c.d.
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.allow)


class PcapWriter:
    """Classic pcap (microsecond timestamps, Ethernet); no dependencies."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        out.write(struct.pack("=IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, PCAP_SNAPLEN, LINKTYPE_ETHERNET))
        out.flush()

    def write(self, frame: bytes, orig_len: Optional[int], now: float) -> None:
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        n = len(frame)
        self.out.write(_RECORD.pack(sec, usec, n, orig_len if orig_len and orig_len > n else n))
        self.out.write(frame)

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        self.out.close()


class TapWriter:
    """Frames written to a TAP device arrive on it as if received from a wire."""

    def __init__(self, name: str) -> None:
        if not 0 < len(name.encode()) < 16:
            raise ReceiveError(f"--tap {name!r}: not a valid interface name")
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise ReceiveError(f"cannot open /dev/net/tun: {e.strerror}") from e
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            # The kernel would otherwise send router solicitations and MLD
            # reports out of the TAP, into our fd, where nobody reads them.
            try:
                with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
                    f.write("1")
            except OSError:
                pass
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                req = struct.pack("16sH22x", name.encode(), 0)
                flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
                fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", name.encode(),
                                                         flags | IFF_UP))
        except OSError as e:
            os.close(self.fd)
            raise ReceiveError(f"cannot set up TAP {name}: {e.strerror}") from e
        self.name = name

    def write(self, frame: bytes, orig_len: Optional[int], now: float) -> None:
        os.write(self.fd, frame)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        os.close(self.fd)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="ADDR:PORT",
                   help=f"UDP address to receive TZSP on (default {DEFAULT_LISTEN}; "
                        f"IPv6 as [::]:{tzsp.PORT})")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--write", metavar="FILE.pcap", help="write a pcap file")
    out.add_argument("--stdout", action="store_true",
                     help="write a pcap stream to stdout (| tcpdump -r -)")
    out.add_argument("--tap", metavar="IFNAME",
                     help="inject the frames into a TAP interface (created if absent)")
    p.add_argument("--allow", action="append", default=None, metavar="PREFIX[,PREFIX...]",
                   help="accept TZSP only from these senders (IPv4/IPv6 addresses or prefixes; "
                        "repeatable; 'any' for every sender). Required with --tap; without it "
                        "--write and --stdout accept every sender and log each new one")
    p.add_argument("--count", type=int, default=None, metavar="N",
                   help="stop after writing N frames")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="stop after S seconds")


class Receiver:
    def __init__(self, sock: socket.socket, sink: Any, count: Optional[int],
                 senders: Optional[SenderFilter] = None) -> None:
        self.sock = sock
        self.sink = sink
        self.count = count
        self.senders = senders or SenderFilter(None)
        self.received = self.written = self.malformed = self.refused = 0
        self.buf = bytearray(65536)
        self.view = memoryview(self.buf)
        self._seen: set[str] = set()  # senders already logged (bounded)
        self._unreported = 0
        self._last_refused = ""
        self._report_at = 0.0

    def admit(self, host: str, now: float) -> bool:
        """Whether a datagram from `host` may be written; refusals are counted and logged."""
        if self.senders.permits(host):
            if self.senders.allow is None and host not in self._seen:
                self._remember(host, "accepting TZSP from %s (no --allow given)")
            return True
        self.received += 1
        self.refused += 1
        self._unreported += 1
        self._last_refused = host
        if host not in self._seen:
            self._remember(host, "refused TZSP from %s: not in --allow")
        if now >= self._report_at:
            self.report_refused(now)
        return False

    def _remember(self, host: str, message: str) -> None:
        if len(self._seen) < SENDERS_LOGGED:
            self._seen.add(host)
            log.warning(message, host)
            if len(self._seen) == SENDERS_LOGGED:
                log.warning("%d senders seen; new ones are no longer logged one by one",
                            SENDERS_LOGGED)

    def report_refused(self, now: float) -> None:
        """At most one summary line per REFUSED_REPORT seconds."""
        if self._unreported and self._report_at:
            log.warning("refused %d datagram(s) from senders not in --allow in the last "
                        "%.0f s (last from %s)", self._unreported, REFUSED_REPORT,
                        self._last_refused)
        self._unreported = 0
        self._report_at = now + REFUSED_REPORT

    def handle(self, n: int, now: float) -> None:
        self.received += 1
        try:
            encap, frame, orig_len = tzsp.decode(self.view[:n])
        except tzsp.TzspError as e:
            self.malformed += 1
            log.debug("malformed datagram (%d bytes): %s", n, e)
            return
        if encap != tzsp.ENCAP_ETHERNET:
            self.malformed += 1
            log.debug("skipped a frame with encapsulation %d (only Ethernet is written)", encap)
            return
        if len(frame) < ETH_HLEN:
            self.malformed += 1
            log.debug("skipped a %d-byte frame, shorter than an Ethernet header", len(frame))
            return
        try:
            self.sink.write(frame, orig_len, now)
        except OSError as e:
            if e.errno == errno.EPIPE or isinstance(e, BrokenPipeError):
                raise
            self.malformed += 1
            log.debug("could not write a %d-byte frame: %s", len(frame), e.strerror)
            return
        self.written += 1

    def drain(self, limit: int = 256) -> None:
        """Read what is queued without blocking, then flush once."""
        for _ in range(limit):
            if self.count is not None and self.written >= self.count:
                break
            try:
                n, addr = self.sock.recvfrom_into(self.buf, 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                # ICMP-driven errors on an unconnected socket are not ours to act on.
                log.debug("recv: %s", e.strerror)
                break
            now = time.time()
            if self.admit(addr[0], now):
                self.handle(n, now)
        self.sink.flush()

    def done(self) -> bool:
        return self.count is not None and self.written >= self.count


def run(args: argparse.Namespace) -> int:
    try:
        family, host, port = parse_listen(args.listen)
        allow = parse_allow(args.allow) if args.allow else None
    except ReceiveError as e:
        print(f"mirrord receive: {e}", file=sys.stderr)
        return 2
    if allow is None and args.tap:
        # A TAP feeds an IDS that trusts what it sniffs as if seen on the wire:
        # no default lets anyone who can reach this port write into it.
        print("mirrord receive: --tap needs --allow: the address(es) of the router(s) that "
              "send the copies (e.g. --allow 192.0.2.1 or --allow 192.0.2.0/24,2001:db8::1), "
              "or --allow any to accept every sender", file=sys.stderr)
        return 2
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((host, port))
    except OSError as e:
        print(f"mirrord receive: cannot listen on {args.listen}: {e.strerror}", file=sys.stderr)
        sock.close()
        return 1
    sink: Any
    try:
        if args.write:
            sink = PcapWriter(open(args.write, "wb"))  # noqa: SIM115 - closed below
            where = args.write
        elif args.stdout:
            sink = PcapWriter(sys.stdout.buffer)
            where = "stdout"
        else:
            sink = TapWriter(args.tap)
            where = f"TAP {args.tap}"
    except (OSError, ReceiveError) as e:
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        what = args.write if args.write else (f"TAP {args.tap}" if args.tap else "stdout")
        print(f"mirrord receive: {what}: {msg}", file=sys.stderr)
        sock.close()
        return 1
    except BrokenPipeError:
        sock.close()
        return 0
    # Said without -v: a receiver that prints nothing looks like one that
    # does nothing, and the person needs to know where to point the router.
    senders = ", ".join(str(n) for n in allow) if allow is not None else "any sender"
    print(f"mirrord receive: listening for TZSP on {args.listen} (from {senders}), "
          f"writing to {where}; Ctrl-C ends it", file=sys.stderr, flush=True)

    stop = {"signal": 0}
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    old_wakeup = signal.set_wakeup_fd(wfd)

    def on_signal(signum: int, frame: Any) -> None:
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    rx = Receiver(sock, sink, args.count, SenderFilter(allow))
    deadline = time.monotonic() + args.timeout if args.timeout is not None else None
    rc = 0
    try:
        while not stop["signal"] and not rx.done():
            timeout = None
            if deadline is not None:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
            try:
                ready, _, _ = select.select([sock.fileno(), rfd], [], [], timeout)
            except InterruptedError:
                continue
            if rfd in ready:
                os.read(rfd, 64)
            if sock.fileno() in ready:
                rx.drain()
    except BrokenPipeError:
        # The reader (tcpdump, head) went away: a normal end of a stream.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except OSError:
            pass
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for s, h in old.items():
            signal.signal(s, h)
        os.close(rfd)
        os.close(wfd)
        try:
            if not args.stdout:
                sink.close()
            else:
                sink.flush()
        except OSError:
            pass
        sock.close()
    rx.report_refused(time.time())
    print(f"mirrord receive: received {rx.received}, written {rx.written}, "
          f"malformed {rx.malformed}, refused {rx.refused}", file=sys.stderr)
    return rc


def main(argv: Optional[list[str]] = None) -> int:
    """Standalone entry (python -m mirrord.tzsp.receive), the same as `mirrord receive`."""
    p = argparse.ArgumentParser(prog="mirrord receive", description=__doc__)
    p.add_argument("-v", "--verbose", action="count", default=0)
    add_arguments(p)
    args = p.parse_args(argv)
    level = logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
