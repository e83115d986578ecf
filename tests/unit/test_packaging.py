"""Service packaging: the systemd unit, the OpenWrt init script and hooks, `make install`.

The unit is checked by systemd's own tools (verify, security --offline), the
shell files by shellcheck, and the init script is run through a rc.common /
procd shim (tests/procd_shim) that records what it would ask procd to do.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from tests import openwrt_split

ROOT = Path(__file__).resolve().parent.parent.parent
UNIT = ROOT / "packaging/systemd/mirrord.service"
DROPIN = ROOT / "packaging/systemd/firewall-reassert.conf"
TMPFILES = ROOT / "packaging/systemd/mirrord.tmpfiles"
OPENWRT = ROOT / "packaging/openwrt"
INIT = OPENWRT / "files/mirrord.init"
FW_INCLUDE = OPENWRT / "files/mirrord.firewall"
UCI_DEFAULTS = OPENWRT / "files/mirrord.uci-defaults"
SHIM = ROOT / "tests/procd_shim"

# The exposure `systemd-analyze security` gives the unit (systemd 252): 2.1.
# The rest is what a router daemon cannot drop: the host network
# (PrivateNetwork, AF_INET/AF_PACKET/AF_NETLINK, CAP_NET_ADMIN/RAW) and root
# for iptables-legacy's lock file.
EXPOSURE_BOUND = 2.1

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")


# -- the unit file ---------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (keys may repeat, as SystemCallFilter does)."""
    out: dict[str, dict[str, list[str]]] = {}
    section: Optional[dict[str, list[str]]] = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), {})
            continue
        assert section is not None, f"assignment outside a section: {raw}"
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def test_unit_service_contract() -> None:
    svc = unit()["Service"]
    assert one(svc, "Type") == "notify"
    assert one(svc, "NotifyAccess") == "main"
    assert one(svc, "ExecStartPre") == "/usr/bin/mirrord check -c /etc/mirrord.yaml"
    assert one(svc, "ExecStart") == (
        "/usr/bin/mirrord run -c /etc/mirrord.yaml --socket /run/mirrord/mirrord.sock")
    assert one(svc, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(svc, "Restart") == "on-failure"
    assert one(svc, "WatchdogSec") == "30s"
    # The control socket lives in the RuntimeDirectory, the only writable place.
    assert one(svc, "RuntimeDirectory") == "mirrord"
    assert "sleep" not in UNIT.read_text()


def test_unit_ordering_and_firewall_reassertion() -> None:
    u = unit()["Unit"]
    after = " ".join(u["After"]).split()
    for dep in ("network-online.target", "nftables.service", "firewalld.service",
                "netfilter-persistent.service"):
        assert dep in after
    assert "network-online.target" in " ".join(u["Wants"]).split()
    assert set(" ".join(u["ReloadPropagatedFrom"]).split()) == {
        "nftables.service", "firewalld.service", "netfilter-persistent.service"}
    # A stopped firewall must not stop the mirror.
    assert "PartOf" not in u and "BindsTo" not in u
    drop = parse_unit(DROPIN.read_text())["Service"]
    assert one(drop, "ExecStartPost") == (
        "-/bin/systemctl --no-block try-reload-or-restart mirrord.service")


def test_unit_hardening() -> None:
    svc = unit()["Service"]
    assert one(svc, "CapabilityBoundingSet").split() == ["CAP_NET_ADMIN", "CAP_NET_RAW"]
    assert "AmbientCapabilities" not in svc or one(svc, "AmbientCapabilities").split() == [
        "CAP_NET_ADMIN", "CAP_NET_RAW"]
    assert sorted(one(svc, "RestrictAddressFamilies").split()) == sorted(
        ["AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6", "AF_PACKET"])
    expect = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
              "PrivateTmp": "yes", "ProtectKernelModules": "yes", "RestrictNamespaces": "yes"}
    for key, value in expect.items():
        assert one(svc, key) == value, key
    # Nothing may take the host network or user namespace away from it.
    assert "PrivateNetwork" not in svc and "PrivateUsers" not in svc


def _verifiable_copy(tmp_path: Path) -> Path:
    """The unit with /usr/bin/mirrord pointing at a binary this machine has.

    verify insists that Exec paths exist; everything else stays byte for byte.
    """
    true = shutil.which("true")
    assert true is not None
    copy = tmp_path / "mirrord.service"
    text = UNIT.read_text()
    assert text.count("=/usr/bin/mirrord ") == 2
    copy.write_text(text.replace("/usr/bin/mirrord", true))
    return copy


def _analyze(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # Offline: no running manager is needed (or wanted) for either command.
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="", SYSTEMD_COLORS="0")
    return subprocess.run(["systemd-analyze", *argv], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=env)


@needs_systemd_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    copy = _verifiable_copy(tmp_path)
    p = _analyze("verify", "--man=no", str(copy), cwd=tmp_path)
    # verify exits 0 on unknown keys and bad values and only warns: the
    # unit is clean only if nothing at all is printed.
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip() == "" and p.stdout.strip() == "", p.stdout + p.stderr


@needs_systemd_analyze
def test_systemd_analyze_verify_catches_a_bad_key(tmp_path: Path) -> None:
    """The check above would see a mistake: a misspelt directive is reported."""
    copy = _verifiable_copy(tmp_path)
    copy.write_text(copy.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    p = _analyze("verify", "--man=no", str(copy), cwd=tmp_path)
    assert "ProtectSytem" in p.stderr


@needs_systemd_analyze
def test_firewall_dropin_verifies(tmp_path: Path) -> None:
    """The drop-in's ExecStartPost parses, merged into a firewall-like oneshot unit."""
    nft = tmp_path / "nftables.service"
    true = shutil.which("true")
    nft.write_text(
        "[Unit]\nDescription=firewall stand-in\n[Service]\nType=oneshot\nRemainAfterExit=yes\n"
        f"ExecStart={true}\n" + DROPIN.read_text().split("[Service]", 1)[1])
    p = _analyze("verify", "--man=no", str(nft), cwd=tmp_path)
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr


def exposure(unit_path: Path, cwd: Path) -> Optional[float]:
    p = _analyze("security", "--offline=yes", "--no-pager", str(unit_path), cwd=cwd)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout + p.stderr)
    if m is None and ("--offline" in p.stderr or "unrecognized option" in p.stderr):
        return None
    assert m is not None, p.stdout + p.stderr
    return float(m.group(1))


@needs_systemd_analyze
def test_security_exposure(tmp_path: Path) -> None:
    score = exposure(_verifiable_copy(tmp_path), tmp_path)
    if score is None:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    assert score <= EXPOSURE_BOUND, f"exposure {score} > {EXPOSURE_BOUND}"
    # And the bound means something: the same unit without its sandbox scores worse.
    bare = tmp_path / "bare" / "mirrord.service"
    bare.parent.mkdir()
    keep = ("[", "Description", "Type", "Exec", "Wants", "After", "WantedBy")
    bare.write_text("\n".join(line for line in _verifiable_copy(tmp_path).read_text().splitlines()
                              if line.startswith(keep)) + "\n")
    bare_score = exposure(bare, tmp_path)
    assert bare_score is not None and bare_score > score + 5


# -- shellcheck --------------------------------------------------------------------


def shell_files() -> list[Path]:
    """Every shell script under packaging/, .ci/ and the procd shim."""
    found = []
    for top in ("packaging", ".ci", "tests/procd_shim"):
        base = ROOT / top
        if not base.exists():
            continue
        for path in sorted(base.rglob("*")):
            if not path.is_file() or path.name == "Makefile":
                continue
            head = path.read_text(errors="replace").splitlines()[:3]
            if (path.suffix == ".sh" or (head and re.match(r"#!\s*/bin/(ba|da|a)?sh\b", head[0]))
                    or any(line.startswith("# shellcheck shell=") for line in head)):
                found.append(path)
    return found


def test_shell_files_found() -> None:
    names = {p.name for p in shell_files()}
    assert {"mirrord.init", "mirrord.firewall", "mirrord.uci-defaults", "rc.common",
            "procd.sh", "logger", "uci"} <= names


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck")
@pytest.mark.parametrize("path", shell_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck(path: Path) -> None:
    # POSIX sh for everything: OpenWrt's /bin/sh is busybox ash, so the init
    # script must not lean on bash. No excludes: the only suppressions are
    # inline, for START/STOP/USE_PROCD, which rc.common reads after sourcing.
    p = subprocess.run(["shellcheck", "-s", "sh", "-x", "--severity=style", str(path)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr


# -- the OpenWrt init script under the procd shim -------------------------------------


class Shim:
    """An installed-looking /etc/init.d/mirrord run through tests/procd_shim/rc.common."""

    def __init__(self, tmp: Path, conf: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "root"
        (self.root / "etc/init.d").mkdir(parents=True)
        self.initscript = self.root / "etc/init.d/mirrord"
        shutil.copyfile(INIT, self.initscript)
        self.initscript.chmod(0o755)
        # Stand-in for /usr/bin/mirrord: the real command line from this tree.
        self.prog = tmp / "mirrord"
        self.prog.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" '
                             '-m mirrord "$@"\n')
        self.prog.chmod(0o755)
        self.conf = conf
        self.rundir = tmp / "run-mirrord"
        self.log = tmp / "procd.log"
        # An executable stand-in for /etc/init.d/mirrord: a real one would
        # start with `#!/bin/sh /etc/rc.common`, which this machine lacks.
        self.wrapper = tmp / "init-wrapper"
        self.wrapper.write_text(f'#!/bin/sh\nexec sh "{SHIM}/rc.common" "{self.initscript}" "$@"\n')
        self.wrapper.chmod(0o755)

    def env(self, running: bool = False, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PROCD_SHIM_LOG=str(self.log),
            PROCD_SHIM_RUNNING="1" if running else "0",
            PROCD_SHIM_OVERRIDES=f"PROG={self.prog} CONF={self.conf} RUNDIR={self.rundir}",
            UCI_SHIM_STATE=str(self.tmp / "uci.state"),
            PATH=f"{SHIM / 'bin'}:{env.get('PATH', '')}",
        )
        env.update(extra)
        return env

    def run(self, action: str, running: bool = False, **extra: str
            ) -> subprocess.CompletedProcess[str]:
        self.log.write_text("")
        return subprocess.run(["sh", str(SHIM / "rc.common"), str(self.initscript), action],
                              capture_output=True, text=True, timeout=60,
                              env=self.env(running, **extra))

    def calls(self) -> list[list[str]]:
        return [line.split("\t") for line in self.log.read_text().splitlines()]

    def params(self) -> dict[str, list[str]]:
        return {c[1]: c[2:] for c in self.calls() if c[0] == "procd_set_param"}


GOOD_SPEC = """\
collectors:
  ids: {address: 192.0.2.50}
mirrors:
  - name: lan
    interfaces: [br-lan]
    direction: both
    collector: ids
"""


@pytest.fixture
def shim(tmp_path: Path) -> Shim:
    conf = tmp_path / "mirrord.yaml"
    conf.write_text(GOOD_SPEC)
    return Shim(tmp_path, conf)


def test_init_header() -> None:
    text = INIT.read_text()
    assert text.startswith("#!/bin/sh /etc/rc.common\n")
    assert re.search(r"^START=99$", text, re.M)
    assert re.search(r"^STOP=10$", text, re.M)
    assert re.search(r"^USE_PROCD=1$", text, re.M)
    assert re.search(r"^PROG=/usr/bin/mirrord$", text, re.M)
    assert re.search(r"^CONF=/etc/mirrord.yaml$", text, re.M)
    # The seed script's `sleep 30` is exactly what this replaces.
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"\bsleep\b", code)


def test_init_start_declares_the_instance(shim: Shim) -> None:
    p = shim.run("start")
    assert p.returncode == 0, p.stderr
    calls = shim.calls()
    names = [c[0] for c in calls]
    assert "sleep" not in names
    assert ["procd_open_instance", "mirrord"] in calls
    params = shim.params()
    assert params["command"] == [str(shim.prog), "run", "-c", str(shim.conf),
                                 "--socket", "/var/run/mirrord/mirrord.sock"]
    assert params["respawn"] == ["3600", "5", "5"]
    assert params["stdout"] == ["1"] and params["stderr"] == ["1"]
    # A changed spec is noticed by procd and answered with SIGHUP, not a restart.
    assert params["file"] == [str(shim.conf)]
    assert params["reload_signal"] == ["HUP"]
    assert ["procd_add_reload_trigger", "mirrord", "firewall"] in calls
    assert names.index("procd_close_instance") < names.index("procd_close_service")
    assert shim.rundir.is_dir()


def test_init_refuses_a_bad_spec_without_respawn_loop(shim: Shim) -> None:
    shim.conf.write_text("collectors:\n  ids: {adress: 192.0.2.50}\n")
    p = shim.run("start")
    calls = shim.calls()
    assert not any(c[0] == "procd_open_instance" for c in calls), calls
    logged = [c[-1] for c in calls if c[0] == "logger"]
    assert any("unknown key 'adress'" in m for m in logged), logged
    assert any("not started" in m for m in logged), logged
    assert all(c[3:5] == ["-p", "daemon.err"] for c in calls if c[0] == "logger")
    assert "not started" in p.stderr


def test_init_missing_spec(shim: Shim) -> None:
    shim.conf.unlink()
    shim.run("start")
    calls = shim.calls()
    assert not any(c[0] == "procd_open_instance" for c in calls)
    assert any("does not exist" in c[-1] for c in calls if c[0] == "logger")


def test_init_bad_spec_keeps_a_running_daemon(shim: Shim) -> None:
    shim.conf.write_text("mirrors: [\n")
    shim.run("start", running=True)
    calls = shim.calls()
    assert ["procd_open_instance", "mirrord"] in calls
    assert any("keeping the running daemon" in c[-1] for c in calls if c[0] == "logger")


def test_init_reload_sends_hup(shim: Shim) -> None:
    shim.run("reload", running=True)
    calls = shim.calls()
    assert ["procd_send_signal", "mirrord", "mirrord", "HUP"] in calls
    assert not any(c[0] in ("procd_open_instance", "procd_kill") for c in calls)


def test_init_reload_starts_a_stopped_service(shim: Shim) -> None:
    shim.run("reload", running=False)
    calls = shim.calls()
    assert not any(c[0] == "procd_send_signal" for c in calls)
    assert ["procd_open_instance", "mirrord"] in calls


def test_init_stop(shim: Shim) -> None:
    shim.run("stop", running=True)
    assert ["procd_kill", "mirrord", ""] in shim.calls()


def test_init_enable_creates_s99(shim: Shim, tmp_path: Path) -> None:
    p = shim.run("enable", IPKG_INSTROOT=str(shim.root))
    assert p.returncode == 0, p.stderr
    rcd = shim.root / "etc/rc.d"
    assert sorted(os.listdir(rcd)) == ["K10mirrord", "S99mirrord"]
    assert os.readlink(rcd / "S99mirrord") == "../init.d/mirrord"
    assert shim.run("enabled", IPKG_INSTROOT=str(shim.root)).returncode == 0
    shim.run("disable", IPKG_INSTROOT=str(shim.root))
    assert os.listdir(rcd) == []


# -- the firewall hook ----------------------------------------------------------------


def _include(shim: Shim, running: bool, sourced: bool = False) -> subprocess.CompletedProcess[str]:
    shim.log.write_text("")
    env = shim.env(running, MIRRORD_INITSCRIPT=str(shim.wrapper))
    argv = (["sh", "-c", f'. "{FW_INCLUDE}"; echo next-include-ran'] if sourced
            else ["sh", str(FW_INCLUDE)])
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)


def test_firewall_include_reloads_a_running_daemon(shim: Shim) -> None:
    p = _include(shim, running=True)
    assert p.returncode == 0, p.stderr
    assert ["procd_send_signal", "mirrord", "mirrord", "HUP"] in shim.calls()


def test_firewall_include_leaves_a_stopped_daemon_alone(shim: Shim) -> None:
    p = _include(shim, running=False)
    assert p.returncode == 0, p.stderr
    calls = shim.calls()
    assert not any(c[0] in ("procd_send_signal", "procd_open_instance") for c in calls), calls


def test_firewall_include_can_be_sourced_like_fw3_does(shim: Shim) -> None:
    # fw3 sources every include into one shell: an `exit` would skip the rest.
    p = _include(shim, running=True, sourced=True)
    assert p.stdout.strip().endswith("next-include-ran"), p.stdout + p.stderr
    assert ["procd_send_signal", "mirrord", "mirrord", "HUP"] in shim.calls()


def _uci_defaults(shim: Shim, fw4: bool, state: str = "") -> list[str]:
    """Run the uci-defaults script twice on a firewall3 or firewall4 router; the config after."""
    env = shim.env()
    fake_fw4 = shim.rundir.parent / "fw4"
    if fw4:
        fake_fw4.write_text("#!/bin/sh\n")
        fake_fw4.chmod(0o755)
    env["MIRRORD_FW4"] = str(fake_fw4)
    path = Path(env["UCI_SHIM_STATE"])
    path.write_text(state)
    for _ in range(2):
        p = subprocess.run(["sh", str(UCI_DEFAULTS)], capture_output=True, text=True,
                           timeout=30, env=env)
        assert p.returncode == 0, p.stderr  # uci-defaults deletes scripts that exit 0
    return path.read_text().splitlines()


def test_uci_defaults_adds_the_include_once_on_fw3(shim: Shim) -> None:
    assert sorted(_uci_defaults(shim, fw4=False)) == sorted([
        "firewall.mirrord=include",
        "firewall.mirrord.type=script",
        "firewall.mirrord.path=/usr/share/mirrord/firewall.include",
    ])
    assert shim.log.read_text().count("commit\tfirewall") == 1


def test_uci_defaults_adds_no_include_on_fw4_and_removes_an_old_one(shim: Shim) -> None:
    """fw4 restart and reload touch only `inet fw4`: an include there cost a warning
    and a reapply on every firewall run (issue 14)."""
    old = ("firewall.mirrord=include\nfirewall.mirrord.type=script\n"
           "firewall.mirrord.reload=1\nfirewall.other=zone\n")
    assert _uci_defaults(shim, fw4=True, state=old) == ["firewall.other=zone"]
    assert shim.log.read_text().count("commit\tfirewall") == 1
    assert _uci_defaults(shim, fw4=True) == []


# -- the OpenWrt package recipe -----------------------------------------------------------


def test_openwrt_makefile() -> None:
    text = (OPENWRT / "Makefile").read_text()
    assert re.search(r"^PKG_NAME:=mirrord$", text, re.M)
    depends = re.search(r"DEPENDS:=(.*?)\nendef", text, re.S)
    assert depends is not None
    deps = depends.group(1).replace("\\", " ").split()
    for dep in ("+python3-light", "+python3-logging", "+python3-ctypes", "+python3-yaml",
                "+PACKAGE_firewall4:kmod-nft-dup-inet", "+PACKAGE_firewall:kmod-ipt-tee",
                "+PACKAGE_firewall:iptables-mod-tee"):
        assert dep in deps
    # Not the full python3 (python3-pyroute2 depends on it), only what is imported.
    assert "+python3" not in deps and "+python3-pyroute2" not in deps
    # The whole-frame transports' modules: a package of their own, built too.
    frames = re.search(r"define Package/mirrord-frames\n.*?DEPENDS:=(.*?)\nendef", text, re.S)
    assert frames is not None
    assert frames.group(1).split() == ["+mirrord", "+kmod-nft-netdev", "+kmod-vxlan"]
    assert "$(eval $(call BuildPackage,mirrord-frames))" in text
    conffiles = re.search(r"define Package/mirrord/conffiles\n(.*?)endef", text, re.S)
    assert conffiles is not None and conffiles.group(1).split() == ["/etc/mirrord.yaml"]
    # Every ./files/ source exists, and installs where the hooks expect it.
    for src in re.findall(r"\./files/(\S+)", text):
        assert (OPENWRT / "files" / src).is_file(), src
    assert "./files/mirrord.init $(1)/etc/init.d/mirrord" in text
    assert "./files/mirrord.firewall $(1)/usr/share/mirrord/firewall.include" in text
    assert "./files/mirrord.uci-defaults $(1)/etc/uci-defaults/mirrord" in text
    assert (ROOT / "etc/mirrord.yaml").is_file()
    # Recipe lines start with a tab, or make fails at parse time.
    for block in re.findall(
            r"define (?:Build/\w+|Py3Package/mirrord/install|Package/mirrord-frames/install)"
            r"\n(.*?)endef",
                            text, re.S):
        for line in block.splitlines():
            assert not line or line.startswith("\t"), line


def openwrt_python_depends() -> set[str]:
    text = (OPENWRT / "Makefile").read_text()
    depends = re.search(r"DEPENDS:=(.*?)\nendef", text, re.S)
    assert depends is not None
    return {d.lstrip("+") for d in depends.group(1).replace("\\", " ").split()
            if d.startswith("+python3-") and d != "+python3-light"}


def _optional(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """An import inside `try: ... except ImportError` (or a broader catch): used if present."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try):
            for h in node.handlers:
                names = [h.type] if not isinstance(h.type, ast.Tuple) else h.type.elts
                if h.type is None or any(isinstance(n, ast.Name) and n.id in (
                        "ImportError", "ModuleNotFoundError", "Exception") for n in names):
                    return True
    return False


def source_imports() -> dict[str, list[str]]:
    """Top-level module -> where mirrord imports it unconditionally (function bodies too)."""
    out: dict[str, list[str]] = {}
    for path in sorted((ROOT / "mirrord").rglob("*.py")):
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            if _optional(node, parents):
                continue
            for name in names:
                out.setdefault(name.split(".")[0], []).append(
                    f"{path.relative_to(ROOT)}:{node.lineno}")
    return out


def runtime_imports() -> set[str]:
    """Every module loaded by importing all of mirrord, in `python -S` (no site's own imports)."""
    modules = sorted(
        "mirrord." + ".".join(p.relative_to(ROOT / "mirrord").with_suffix("").parts)
        for p in (ROOT / "mirrord").rglob("*.py") if p.stem not in ("__init__", "__main__"))
    paths = [str(ROOT)]
    found = importlib.util.find_spec("yaml")
    if found is not None and found.origin:
        paths.append(str(Path(found.origin).parent.parent))
    code = ("import sys\n"
            f"for m in {modules!r}:\n    __import__(m)\n"
            "print(' '.join(sorted(sys.modules)))")
    p = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)})
    assert p.returncode == 0, p.stderr
    return set(p.stdout.split())


def test_openwrt_depends_follow_the_imports() -> None:
    """The recipe depends on exactly the python3-* packages that mirrord's imports need.

    Both what the source imports (in any function, unless guarded as optional)
    and what the standard library pulls in behind it, mapped through OpenWrt's
    split of python3 (tests/openwrt_split.py).
    """
    # runtime_imports() also shows that every module imports without the ones
    # OpenWrt has no package for (openwrt_split.NO_PACKAGE): `-S` leaves them out.
    needed = openwrt_split.packages(set(source_imports()) | runtime_imports())
    assert set(needed) == openwrt_python_depends(), needed


# -- make install ---------------------------------------------------------------------


def build_python() -> Optional[str]:
    """An interpreter that can build the wheel offline (pip, setuptools, wheel)."""
    for cand in (sys.executable, "/usr/bin/python3"):
        if cand and os.access(cand, os.X_OK) and subprocess.run(
                [cand, "-c", "import setuptools, wheel, pip"], capture_output=True,
                timeout=60).returncode == 0:
            return cand
    return None


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_install_and_uninstall(tmp_path: Path) -> None:
    builder = build_python()
    if builder is None:
        pytest.skip("no python with pip, setuptools and wheel to build with")
    prefix = tmp_path / "usr"
    etc = tmp_path / "etc"
    # DESTDIR=/ keeps make from calling systemctl, whatever machine this runs on.
    # The launcher runs this interpreter, which has the dependencies.
    args = ["make", "-s", "DESTDIR=/", f"PREFIX={prefix}", f"SYSCONFDIR={etc}",
            f"PYTHON={builder}", f"PYTHON_SHEBANG={sys.executable}"]
    p = subprocess.run([*args, "install"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    launcher = prefix / "bin/mirrord"
    unit_file = prefix / "lib/systemd/system/mirrord.service"
    assert os.access(launcher, os.X_OK)
    assert (prefix / "lib/mirrord/mirrord/cli.py").is_file()
    assert (prefix / "lib/systemd/system/nftables.service.d/50-mirrord.conf").is_file()
    assert (prefix / "lib/tmpfiles.d/mirrord.conf").is_file()
    assert (etc / "mirrord.yaml").read_text() == (ROOT / "etc/mirrord.yaml").read_text()
    text = unit_file.read_text()
    assert f"ExecStart={launcher} run -c /etc/mirrord.yaml" in text
    assert "=/usr/bin/mirrord " not in text
    assert str(tmp_path) not in launcher.read_text().replace(str(prefix), "")
    # The installed command runs from the installed copy, not from this tree.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    q = subprocess.run([str(launcher), "check", "-c", str(etc / "mirrord.yaml")],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert q.returncode == 0 and "OK" in q.stdout, q.stdout + q.stderr
    where = subprocess.run([sys.executable, "-c", "import sys; sys.argv=['x'];"
                            f"exec(open('{launcher}').read().split('from mirrord')[0]);"
                            "import mirrord; print(mirrord.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert where.stdout.startswith(str(prefix / "lib/mirrord/mirrord")), where.stdout + where.stderr

    # A second install keeps the admin's spec.
    (etc / "mirrord.yaml").write_text("# mine\n")
    p = subprocess.run([*args, "install"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (etc / "mirrord.yaml").read_text() == "# mine\n"

    p = subprocess.run([*args, "uninstall"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    left = sorted(str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*") if not f.is_dir())
    assert left == ["etc/mirrord.yaml"]


# -- the README's node_exporter recipe --------------------------------------------------
def test_cron_recipe_publishes_a_failing_state_and_leaves_no_temp_file(tmp_path: Path) -> None:
    """The line as the README gives it, run by sh with the daemon absent (exit 2)."""
    text = (ROOT / "README.md").read_text()
    (line,) = [ln.strip() for ln in text.splitlines() if "mirrord status --prometheus >" in ln]
    command = line.split(" root ", 1)[1]
    command = command.replace("/var/lib/node_exporter", str(tmp_path))
    command = command.replace("mirrord status", f"{sys.executable} -m mirrord status "
                              f"--socket {tmp_path}/absent.sock", 1)
    for _ in range(2):
        p = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60,
                           cwd=str(ROOT))
        assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in tmp_path.iterdir()) == ["mirrord.prom"]
    assert "mirrord_up 0" in (tmp_path / "mirrord.prom").read_text().splitlines()


def test_init_restart_with_a_bad_spec_keeps_the_running_daemon(shim: Shim) -> None:
    """rc.common's restart stopped first, then refused the spec: no daemon, no rules."""
    shim.conf.write_text("mirrors: [\n")
    p = shim.run("restart", running=True)
    calls = shim.calls()
    assert p.returncode != 0
    assert not any(c[0] in ("procd_kill", "procd_open_instance") for c in calls), calls
    assert any("not restarted: keeping the running daemon" in c[-1] for c in calls
               if c[0] == "logger")


def test_init_restart_with_a_good_spec_stops_then_starts(shim: Shim) -> None:
    """USR2 first: the daemon leaves its rules for the new one (no gap in copies)."""
    p = shim.run("restart", running=True)
    calls = shim.calls()
    names = [c[0] for c in calls]
    assert p.returncode == 0, p.stderr
    usr2 = calls.index(["procd_send_signal", "mirrord", "mirrord", "USR2"])
    assert usr2 < names.index("procd_kill") < names.index("procd_open_instance")
