"""The sd_notify protocol end to end: the real daemon in a lab router namespace,
talking to a NOTIFY_SOCKET this test owns (as systemd would with Type=notify).

READY=1 must mean "the rules are in the kernel": the test looks at the
router's nftables at the moment READY=1 arrives.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Optional

import pytest

from tests.harness.lab import COLLECTOR, ROOT, WAN_HOST, Lab, have_root_netns, spec_text
from tests.harness.wait import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(have_root_netns() is not None, reason=str(have_root_netns())),
]

SPEC = spec_text("nftables", name="lan")

Message = tuple[list[str], int]  # assignments, sender pid


class Manager:
    """The service manager's side of NOTIFY_SOCKET: a datagram socket with sender pids.

    A path, not an abstract name: abstract AF_UNIX names belong to a network
    namespace, and the daemon runs in the lab router's.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.seen: list[Message] = []

    def recv(self, timeout: float) -> Message:
        self.sock.settimeout(max(timeout, 0.001))
        data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        msg = (data.decode().split("\n"), pid)
        self.seen.append(msg)
        return msg

    def expect(self, pred: Callable[[list[str]], bool], timeout: float, what: str,
               on_arrival: Callable[[], None] = lambda: None) -> tuple[Message, list[Message]]:
        """The first message matching `pred`, and the ones skipped before it."""
        deadline = time.monotonic() + timeout
        skipped: list[Message] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout}s; got {skipped}")
            try:
                msg = self.recv(left)
            except socket.timeout:
                continue
            if pred(msg[0]):
                on_arrival()
                return msg, skipped
            skipped.append(msg)

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


@pytest.fixture
def manager(lab: Lab) -> Iterator[Manager]:
    m = Manager(f"/tmp/{lab.tag}-notify.sock")
    yield m
    m.close()


def has(key: str) -> Callable[[list[str]], bool]:
    return lambda lines: key in lines


def value(lines: list[str], key: str) -> str:
    for line in lines:
        if line.startswith(key + "="):
            return line.split("=", 1)[1]
    raise AssertionError(f"{key}= not in {lines}")


def nft_table(lab: Lab) -> subprocess.CompletedProcess[str]:
    return lab.rtr.run("nft", "list", "table", "ip", "mirrord", check=False)


def test_notify_protocol(lab: Lab, manager: Manager) -> None:
    spec_path = lab.write_spec(SPEC)
    # 1 s watchdog: the daemon must ping every 0.5 s from its main loop.
    proc = lab.start_daemon(spec_path, wait_active=False,
                            env={"NOTIFY_SOCKET": manager.path, "WATCHDOG_USEC": "1000000"})
    pid = proc.pid  # `ip netns exec` execs: the daemon keeps this pid

    # READY=1 only once the rules are in the kernel: look the moment it arrives.
    at_ready: list[subprocess.CompletedProcess[str]] = []
    (ready, sender), before = manager.expect(
        has("READY=1"), 30, "READY=1", on_arrival=lambda: at_ready.append(nft_table(lab)))
    assert at_ready[0].returncode == 0, f"READY=1 but no table: {at_ready[0].stderr}"
    assert f"dup to {COLLECTOR}" in at_ready[0].stdout
    assert not any("READY=1" in m for m, _ in before)
    assert sender == pid  # NotifyAccess=main would accept it
    assert value(ready, "STATUS").startswith("1 mirror(s)"), ready
    assert "active" in value(ready, "STATUS")

    # WATCHDOG=1 keeps coming from the main loop.
    t0 = time.monotonic()
    for _ in range(3):
        (_, sender), _ = manager.expect(has("WATCHDOG=1"), 3, "WATCHDOG=1")
        assert sender == pid
    assert time.monotonic() - t0 < 3.0

    # SIGHUP: RELOADING=1 (with the CLOCK_MONOTONIC stamp systemd >= 253 wants),
    # then READY=1 again.
    hup_at = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    proc.send_signal(signal.SIGHUP)
    (reloading, sender), _ = manager.expect(has("RELOADING=1"), 10, "RELOADING=1")
    assert sender == pid
    stamp = int(value(reloading, "MONOTONIC_USEC"))
    assert hup_at <= stamp <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    (again, _), between = manager.expect(has("READY=1"), 15, "READY=1 after reload")
    assert not any("RELOADING=1" in m for m, _ in between)
    assert value(again, "STATUS").startswith("1 mirror(s)")
    assert nft_table(lab).returncode == 0

    # A broken spec on SIGHUP: still RELOADING=1 / READY=1 (systemctl reload
    # must not hang), the status says so, and the rules stay.
    with open(spec_path, "w") as f:
        f.write("mirrors: [\n")
    proc.send_signal(signal.SIGHUP)
    manager.expect(has("RELOADING=1"), 10, "RELOADING=1 (bad spec)")
    (rejected, _), _ = manager.expect(has("READY=1"), 15, "READY=1 (bad spec)")
    assert "rejected" in value(rejected, "STATUS"), rejected
    table = nft_table(lab)
    assert table.returncode == 0 and f"dup to {COLLECTOR}" in table.stdout

    # SIGTERM: STOPPING=1, a clean exit, and the rules are gone.
    proc.send_signal(signal.SIGTERM)
    (_, sender), _ = manager.expect(has("STOPPING=1"), 10, "STOPPING=1")
    assert sender == pid
    assert lab.stop_daemon(proc) == 0, lab.daemon_log()
    assert nft_table(lab).returncode != 0
    # Every message came from the main process.
    assert {s for _, s in manager.seen} == {pid}


def test_no_watchdog_pings_without_watchdog(lab: Lab, manager: Manager) -> None:
    proc = lab.start_daemon(lab.write_spec(SPEC), wait_active=False,
                            env={"NOTIFY_SOCKET": manager.path})
    manager.expect(has("READY=1"), 30, "READY=1")
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        try:
            lines, _ = manager.recv(deadline - time.monotonic())
        except socket.timeout:
            break
        assert "WATCHDOG=1" not in lines, lines
    assert lab.stop_daemon(proc) == 0


def test_ready_while_waiting_for_an_interface(lab: Lab, manager: Manager) -> None:
    """No `sleep 30`: at boot the interface may not exist yet. The daemon must still
    report READY=1 (or systemd would fail the start) and apply once it appears."""
    proc = lab.start_daemon(lab.write_spec(SPEC.replace("[br-lan]", "[eth7]")), wait_active=False,
                            env={"NOTIFY_SOCKET": manager.path})
    (ready, _), _ = manager.expect(has("READY=1"), 30, "READY=1")
    assert value(ready, "STATUS") == "1 mirror(s): 1 waiting", ready
    lab.rtr.sh("ip link add eth7 type veth peer name eth7p; ip link set eth7p up; "
               "ip link set eth7 up")
    lab.wait_for_status(lambda st: st is not None and st["mirrors"][0]["state"] == "active",
                        timeout=10)
    assert '"eth7"' in nft_table(lab).stdout
    assert lab.stop_daemon(proc) == 0


# -- the unit under a real systemd ----------------------------------------------------------

SYSTEMD = "/lib/systemd/systemd"
TARGETS = ("sysinit", "basic", "shutdown", "network-online", "network", "network-pre",
           "multi-user", "sockets", "paths", "timers", "slices")
FIREWALL_STANDIN = """\
[Unit]
Description=nftables.service stand-in (Debian's loads a ruleset that starts with flush ruleset)
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/nft flush ruleset
ExecReload=/usr/sbin/nft flush ruleset
ExecStop=/usr/sbin/nft flush ruleset
"""
# systemd as PID 1 of new pid, mount and cgroup namespaces, in the lab router's
# network namespace: the service's rules land in the router only.
BOOT = """\
set -e
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs -o mode=755 tmpfs /run
mount --bind "$ROOTFS/usr/local" /usr/local
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$ETC_UPPER,workdir=$ETC_WORK" /etc
exec env -i container=mirrord-test SYSTEMD_UNIT_PATH="$UNITS" PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --system --unit=mirrord-test.target --log-target=console
"""
RUNTIME_PYTHON = "/usr/bin/python3"


def _systemd_test_blocker() -> Optional[str]:
    if have_root_netns() is not None:
        return have_root_netns()
    if os.path.isdir("/run/systemd/system") and os.environ.get("MIRRORD_TEST_SYSTEMD") != "1":
        # A second manager would have to carve a cgroup out of the host
        # manager's tree; set MIRRORD_TEST_SYSTEMD=1 to do it anyway.
        return "the host runs systemd (MIRRORD_TEST_SYSTEMD=1 to boot a nested one)"
    for tool in (SYSTEMD, RUNTIME_PYTHON):
        if not os.access(tool, os.X_OK):
            return f"needs {tool}"
    for tool in ("unshare", "nsenter", "make"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if _cgroup2_mount() is None:
        return "needs a cgroup2 mount"
    return None


def _cgroup2_mount() -> Optional[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return left.split()[4]
    return None


class Booted:
    """A systemd booted in the lab router with mirrord.service installed by `make install`."""

    def __init__(self, lab: Lab, tmp: Path, spec: str) -> None:
        self.lab, self.tmp = lab, tmp
        self.rootfs = tmp / "root"
        self.units = tmp / "units"
        self.etc_upper = tmp / "etc-upper"
        self.pid1: Optional[int] = None
        self.boot: Optional[subprocess.Popen[bytes]] = None
        self.started = time.time()
        mount = _cgroup2_mount()
        assert mount is not None
        self.cgroup = Path(mount) / f"mirrord-test-{lab.tag}"
        self._install(spec)

    def _install(self, spec: str) -> None:
        # The service cannot see /root or /home (ProtectHome=yes): it runs the
        # system interpreter, with any dependency it lacks copied next to mirrord.
        p = subprocess.run(["make", "-s", "install", f"DESTDIR={self.rootfs}", "PREFIX=/usr/local",
                            f"PYTHON={RUNTIME_PYTHON}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        if p.returncode != 0:
            pytest.skip(f"make install with {RUNTIME_PYTHON} failed: {p.stderr.strip()[-300:]}")
        libdir = self.rootfs / "usr/local/lib/mirrord"
        for module in ("yaml", "nftables"):
            if subprocess.run([RUNTIME_PYTHON, "-c", f"import {module}"],
                              capture_output=True).returncode == 0:
                continue
            found = importlib.util.find_spec(module)
            if found is None or found.origin is None:
                pytest.skip(f"no {module} for {RUNTIME_PYTHON}")
            src = Path(found.origin)
            if src.name == "__init__.py":
                shutil.copytree(src.parent, libdir / module)
            else:
                shutil.copy(src, libdir / src.name)
        self.units.mkdir()
        installed = self.rootfs / "usr/local/lib/systemd/system"
        shutil.copy(installed / "mirrord.service", self.units)
        shutil.copytree(installed / "nftables.service.d", self.units / "nftables.service.d")
        # Test-only drop-in: short watchdog and restart delay, to see them in seconds.
        (self.units / "mirrord.service.d").mkdir()
        (self.units / "mirrord.service.d/test.conf").write_text(
            "[Service]\nWatchdogSec=2s\nRestartSec=1s\n")
        (self.units / "nftables.service").write_text(FIREWALL_STANDIN)
        (self.units / "mirrord-test.target").write_text(
            "[Unit]\nDescription=mirrord test boot\n"
            "Wants=nftables.service mirrord.service systemd-journald.service\n")
        for name in ("systemd-journald.service", "systemd-journald.socket",
                     "systemd-journald-dev-log.socket"):
            shutil.copy(f"/lib/systemd/system/{name}", self.units)
        for t in TARGETS:
            (self.units / f"{t}.target").write_text(f"[Unit]\nDescription={t} (stand-in)\n")
        self.etc_upper.mkdir()
        (self.tmp / "etc-work").mkdir()
        self.set_spec(spec)

    def set_spec(self, text: str) -> None:
        (self.etc_upper / "mirrord.yaml").write_text(text)

    def start(self) -> None:
        self.cgroup.mkdir()
        procs = str(self.cgroup / "cgroup.procs")

        def enter_cgroup() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        env = dict(os.environ, ROOTFS=str(self.rootfs), UNITS=str(self.units),
                   ETC_UPPER=str(self.etc_upper), ETC_WORK=str(self.tmp / "etc-work"))
        self.boot = subprocess.Popen(
            ["ip", "netns", "exec", self.lab.rtr.name, "unshare", "--cgroup", "--pid", "--fork",
             "--mount", "--propagation", "private", "--mount-proc", "sh", "-c", BOOT],
            stdout=open(self.tmp / "console.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
            env=env, preexec_fn=enter_cgroup)
        init_procs = self.cgroup / "init.scope/cgroup.procs"
        deadline = time.monotonic() + 30
        while self.pid1 is None:
            assert time.monotonic() < deadline, (self.tmp / "console.log").read_text()[-2000:]
            if init_procs.exists() and init_procs.read_text().split():
                self.pid1 = int(init_procs.read_text().split()[0])
            time.sleep(0.1)
        while self.run("systemctl", "is-system-running").stdout.strip() not in ("running",
                                                                                   "degraded"):
            assert time.monotonic() < deadline, self.journal()
            time.sleep(0.2)

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", "-t", str(self.pid1), "-m", "-p", "-n", *argv],
                              capture_output=True, text=True, timeout=timeout)

    def show(self, unit: str = "mirrord.service") -> dict[str, str]:
        out = self.run("systemctl", "show", unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self) -> str:
        return self.run("journalctl", "--no-pager", "-u", "mirrord", "-o", "cat").stdout

    def hups(self) -> int:
        return self.journal().count("SIGHUP: reloading")

    def wait(self, pred: Callable[[], bool], what: str, timeout: float = 10) -> None:
        wait_until(pred, timeout, 0.2, what=lambda: f"{what}\n{self.journal()[-3000:]}")

    def close(self) -> None:
        if self.pid1 is not None:
            self.run("systemctl", "stop", "mirrord.service", timeout=30)
            try:
                os.kill(self.pid1, signal.SIGKILL)  # PID 1 of the namespace: takes all with it
            except ProcessLookupError:
                pass
        if self.boot is not None:
            try:
                self.boot.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.boot.kill()
                self.boot.wait()
        deadline = time.monotonic() + 10
        while self.cgroup.exists() and time.monotonic() < deadline:
            inner = sorted((p for p in self.cgroup.rglob("*") if p.is_dir()),
                           key=lambda p: -len(p.parts))
            for d in [*inner, self.cgroup]:
                try:
                    d.rmdir()
                except OSError:
                    pass
            time.sleep(0.1)
        for leftover in Path("/tmp").glob("systemd-private-*-mirrord.service-*"):
            if leftover.stat().st_mtime >= self.started:
                shutil.rmtree(leftover, ignore_errors=True)


@pytest.fixture
def booted(lab: Lab, tmp_path: Path) -> Iterator[Booted]:
    why = _systemd_test_blocker()
    if why is not None:
        pytest.skip(why)
    b = Booted(lab, tmp_path, SPEC)
    try:
        b.start()
        yield b
    finally:
        b.close()


def test_unit_under_real_systemd(booted: Booted, lab: Lab) -> None:
    """The hardened unit, installed by `make install`, run by systemd itself."""
    b = booted
    b.wait(lambda: b.show()["ActiveState"] == "active", "mirrord.service never became active")
    st = b.show()
    assert st["SubState"] == "running" and st["Type"] == "notify", st
    assert st["StatusText"] == "1 mirror(s): 1 active", st
    assert f"dup to {COLLECTOR}" in nft_table(lab).stdout
    # ACTION=ready: a journal field with systemd-python (journalctl filters on
    # it), else the `<N>` stderr fallback, where it is a suffix of the text.
    if subprocess.run([RUNTIME_PYTHON, "-c", "import systemd.journal"],
                      capture_output=True).returncode == 0:
        ready = b.run("journalctl", "--no-pager", "-u", "mirrord", "ACTION=ready", "-o", "cat")
        assert ready.stdout == "running: 1 mirror(s): 1 active\n", ready
    else:
        assert "[action=ready]" in b.journal()

    # The watchdog is fed (WatchdogSec=2s in the test drop-in: a ping a second).
    first = int(b.show()["WatchdogTimestampMonotonic"])
    b.wait(lambda: int(b.show()["WatchdogTimestampMonotonic"]) > first, "no watchdog ping", 4)

    # systemctl reload = SIGHUP; systemd tracks it through RELOADING=1/READY=1.
    n = b.hups()
    assert b.run("systemctl", "reload", "mirrord").returncode == 0
    b.wait(lambda: b.hups() == n + 1, "reload did not reach the daemon")
    b.wait(lambda: b.show()["SubState"] == "running", "stuck reloading")

    # A firewall reload (flush ruleset) propagates as a reload: ReloadPropagatedFrom=.
    n = b.hups()
    assert b.run("systemctl", "reload", "nftables").returncode == 0
    b.wait(lambda: b.hups() == n + 1, "firewall reload did not propagate")
    b.wait(lambda: f"dup to {COLLECTOR}" in nft_table(lab).stdout, "rules not back")

    # A firewall restart is not a reload: the drop-in's ExecStartPost covers it.
    n = b.hups()
    assert b.run("systemctl", "restart", "nftables").returncode == 0
    b.wait(lambda: b.hups() == n + 1, "firewall restart did not reach the daemon")
    b.wait(lambda: f"dup to {COLLECTOR}" in nft_table(lab).stdout, "rules not back")

    # Stopping the firewall does not stop the mirror.
    assert b.run("systemctl", "stop", "nftables").returncode == 0
    time.sleep(0.5)
    assert b.show()["ActiveState"] == "active"

    # The same exposure online as offline.
    sec = b.run("systemd-analyze", "security", "--no-pager", "mirrord.service")
    assert "Overall exposure level for mirrord.service: 2.1" in sec.stdout, sec.stdout[-500:]

    # TZSP inside the sandbox: AF_PACKET, ctypes, a worker process, UDP out.
    b.set_spec(SPEC.replace("transport: clone", "transport: tzsp"))
    assert b.run("systemctl", "reload", "mirrord").returncode == 0
    # The worker says so once its capture ring is set up.
    b.wait(lambda: "capturing in/out on br-lan" in b.journal(), "no TZSP worker")
    lab.count_at_collector({"tzsp": "udp dport 37008"})
    lab.ping(lab.lan, WAN_HOST, 20)
    b.wait(lambda: lab.collector_counts()["tzsp"] >= 38,
           f"TZSP copies missing: {lab.collector_counts()}")

    # VXLAN inside the sandbox: a tunnel device made over rtnetlink, its IPv6
    # turned off through /proc/sys (read-only under ProtectKernelTunables but
    # for ReadWritePaths=/proc/sys/net/ipv6/conf), or it would send MLD into it.
    b.set_spec(SPEC.replace("transport: clone", "transport: vxlan"))
    assert b.run("systemctl", "reload", "mirrord").returncode == 0
    b.wait(lambda: lab.rtr.run("ip", "link", "show", "mvx-ids", check=False).returncode == 0,
           "no tunnel device")
    assert lab.rtr.run("cat", "/proc/sys/net/ipv6/conf/mvx-ids/disable_ipv6").stdout == "1\n"
    assert "could not disable IPv6" not in b.journal()

    # A broken spec: restart fails in ExecStartPre, a few retries, then it stays failed.
    b.set_spec("mirrors: [\n")
    assert b.run("systemctl", "restart", "mirrord").returncode != 0
    b.wait(lambda: b.show()["ActiveState"] == "failed", "restart loop on a bad spec", 20)
    restarts = b.show()["NRestarts"]
    time.sleep(2.5)
    assert b.show()["NRestarts"] == restarts and b.show()["ActiveState"] == "failed"

    # Fixed again; stop removes the rules.
    b.set_spec(SPEC)
    b.run("systemctl", "reset-failed", "mirrord")
    assert b.run("systemctl", "start", "mirrord").returncode == 0
    assert nft_table(lab).returncode == 0
    # restart: RestartKillSignal=SIGUSR2, the rules stay for the next start.
    assert b.run("systemctl", "restart", "mirrord").returncode == 0
    b.wait(lambda: b.show()["SubState"] == "running", "not running after a restart")
    assert "keeping the rules for the next start" in b.journal()
    assert nft_table(lab).returncode == 0
    assert b.run("systemctl", "stop", "mirrord").returncode == 0
    assert nft_table(lab).returncode != 0


def test_xtables_lock_needs_the_tmpfiles_entry(booted: Booted) -> None:
    """Why ReadWritePaths=-/run/xtables.lock plus mirrord.tmpfiles: under
    ProtectSystem=strict, `iptables-legacy -w` cannot create its lock in /run."""
    if shutil.which("iptables-legacy") is None:
        pytest.skip("needs iptables-legacy")
    b = booted
    iptables = shutil.which("iptables-legacy")
    (b.units / "xtables-probe.service").write_text(
        "[Service]\nType=oneshot\nProtectSystem=strict\nReadWritePaths=-/run/xtables.lock\n"
        f"ExecStart={iptables} -w -t mangle -S\n")
    assert b.run("systemctl", "daemon-reload").returncode == 0
    before = b.run("systemctl", "start", "xtables-probe.service")
    log = b.run("journalctl", "--no-pager", "-u", "xtables-probe", "-o", "cat").stdout
    assert before.returncode != 0 and "xtables.lock" in log, log
    tmpfiles = b.run("systemd-tmpfiles", "--create", "/usr/local/lib/tmpfiles.d/mirrord.conf")
    assert tmpfiles.returncode == 0, tmpfiles.stderr
    after = b.run("systemctl", "start", "xtables-probe.service")
    assert after.returncode == 0, after.stderr
