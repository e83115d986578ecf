"""Any bytes in the spec file give a Spec or a SpecError of FILE:LINE:COL lines.

Two parts: fixed regression cases, each an input that once escaped as another
exception, took seconds and gigabytes, or printed an unbounded line; and a
seeded mutation fuzzer over valid specs (byte flips, YAML tags, deep nesting,
aliases, Unicode digits, huge numbers, stray keys and values anywhere).

MIRRORD_FUZZ_CASES and MIRRORD_FUZZ_SEED widen or vary the fuzz run; a failure
prints the seed, the case number and the input, so it can be replayed.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

from mirrord import spec
from mirrord.spec.validate import _Validator
from tests.unit.spec_helpers import FULL

ROOT = Path(__file__).resolve().parents[2]
PATH = "fuzz.yaml"
PROBLEM_RE = re.compile(r"fuzz\.yaml:[0-9]+:[0-9]+: \S")
# Literals, not spec's constants, so that these tests run (and fail) against
# a reader that has none of the bounds.
MAX_LINE = 300
MAX_PROBLEMS = 100

VALID = """\
collectors:
  ids:
    address: 192.0.2.50
mirrors:
  - name: lan
    interfaces: [br-lan]
    collector: ids
"""


def check(result: Callable[[], spec.Spec], label: str = "") -> Optional[list[str]]:
    """Run `result`; None if it gave a Spec, else its problems, each checked."""
    try:
        result()
    except spec.SpecError as e:
        assert e.problems, label
        assert len(e.problems) <= MAX_PROBLEMS + 1, label
        for p in e.problems:
            assert PROBLEM_RE.match(p), f"{label}: no FILE:LINE:COL: {p[:400]!r}"
            assert len(p) <= MAX_LINE, f"{label}: {len(p)} chars: {p[:400]!r}"
            assert "\n" not in p and "\r" not in p, f"{label}: {p!r}"
            assert "internal error" not in p, f"{label}: {p}"
        return e.problems
    return None


def load_bytes(tmp_path: Path, data: bytes) -> Optional[list[str]]:
    (tmp_path / PATH).write_bytes(data)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        return check(lambda: spec.load(PATH), repr(data[:300]))
    finally:
        os.chdir(cwd)


def one_problem(tmp_path: Path, data: bytes) -> str:
    problems = load_bytes(tmp_path, data)
    assert problems is not None, "accepted"
    return problems[0]


def _nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def _bomb(levels: int, width: int = 9) -> str:
    """A "billion laughs": each level is `width` aliases of the level before."""
    lines = [f"x0: &x0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * width)}]")
    return "\n".join(lines)


def _in_protocol(value: str) -> str:
    """A spec whose match protocol is `value` (a place where any node is reported)."""
    return VALID + f"    match:\n      protocol: {value}\n"


# -- fixed regression cases: each broke the reader before ----------------------

REGRESSIONS: list[tuple[str, bytes, str]] = [
    # (id, file content, expected start of the first problem)
    ("latin1-comment", b"# caf\xe9\n" + VALID.encode(),
     "fuzz.yaml:1:6: byte 0xE9 is not UTF-8 text"),
    ("latin1-value", VALID.replace("lan\n", "l\xe4n\n").encode("latin-1"),
     "fuzz.yaml:5:12: byte 0xE4 is not UTF-8 text"),
    ("utf16", VALID.encode("utf-16"), "fuzz.yaml:1:1: byte 0xFF is not UTF-8 text (the file "
     "looks like UTF-16)"),
    ("int-empty", VALID.replace("192.0.2.50", "192.0.2.50\n    port: !!int ''").encode(),
     "fuzz.yaml:4:11: cannot read '' as !!int"),
    ("bool-maybe", VALID.replace("192.0.2.50", "192.0.2.50\n    snaplen: !!bool maybe").encode(),
     "fuzz.yaml:4:14: cannot read 'maybe' as !!bool"),
    ("timestamp", VALID.replace("[br-lan]", "[!!timestamp x]").encode(),
     "fuzz.yaml:6:18: the tag !!timestamp is not supported; write the plain value"),
    ("python-tag", VALID.replace("ids\n", "!!python/name:os.system ids\n").encode(),
     "fuzz.yaml:7:16: the tag !!python/name:os.system is not supported"),
    ("python-object", VALID.replace("collectors:", "collectors: !!python/object:os.system")
     .encode(), "fuzz.yaml:1:13: the tag !!python/object:os.system is not supported; write a "
     "plain mapping"),
    ("superscript-port", _in_protocol("tcp\n      port: '²'").encode(),
     "fuzz.yaml:10:13: mirror 'lan': port: '²' is not a port or a range"),
    ("arabic-digit-port", _in_protocol("tcp\n      port: ٣").encode(),
     "fuzz.yaml:10:13: mirror 'lan': port: '٣' is not a port or a range"),
    ("tagged-arabic-digit", VALID.replace("192.0.2.50", "192.0.2.50\n    port: !!int ٣").encode(),
     "fuzz.yaml:4:11: cannot read '٣' as !!int"),
    ("huge-match-port", _in_protocol("tcp\n      port: " + "7" * 5000).encode(),
     "fuzz.yaml:10:13: mirror 'lan': port: '" + "7" * 60 + "...' is not within 1-65535"),
    ("huge-collector-port", VALID.replace("192.0.2.50", "192.0.2.50\n    port: " + "7" * 5000)
     .encode(), "fuzz.yaml:4:11: cannot read '7777777"),
    ("deep-flow", VALID.replace("[br-lan]", _nested(1000)).encode(),
     "fuzz.yaml:6:"),
    ("deep-block", ("a:\n" + "".join(" " * i + "- \n" for i in range(1, 1000))).encode(),
     "fuzz.yaml:"),
    ("recursive-alias", _in_protocol("&p [*p]").encode(),
     "fuzz.yaml:9:21: alias *p refers to a node that contains it"),
    ("bomb-6-levels", (_bomb(6) + "\n" + _in_protocol("*x5")).encode(), "fuzz.yaml:"),
    ("control-char", VALID.replace("lan\n", "l\x07an\n").encode(),
     "fuzz.yaml:5:12: character U+0007 is not allowed"),
    ("name-newline", VALID.replace("name: lan", 'name: "lan\\n"').encode(),
     "fuzz.yaml:5:11: mirror name 'lan\\n' must be"),
    ("surrogate-ifname", VALID.replace("[br-lan]", '["\\ud800"]').encode(),
     "fuzz.yaml:6:18: mirror 'lan': interface '\\ud800' contains"),
    ("node-in-message", _in_protocol("[[tcp, udp]]").encode(),
     "fuzz.yaml:9:18: mirror 'lan': unknown protocol 'a list'"),
    ("long-key", VALID.replace("ids:\n", "ids:\n    " + "k" * 1000 + ": 1\n", 1).encode(),
     "fuzz.yaml:3:5: collector 'ids': unknown key '" + "k" * 60 + "...'; valid keys"),
]


@pytest.mark.parametrize("data,expected", [pytest.param(d, e, id=i) for i, d, e in REGRESSIONS])
def test_regression(tmp_path: Path, data: bytes, expected: str) -> None:
    problem = one_problem(tmp_path, data)
    assert problem.startswith(expected), problem


def test_every_problem_of_a_bad_file_is_bounded(tmp_path: Path) -> None:
    # 300 broken mirrors: the list is cut, and says how many were left out.
    text = VALID + "".join(f"  - name: m{i}\n    interfaces: [x]\n    collector: nope\n"
                           for i in range(300))
    problems = load_bytes(tmp_path, text.encode())
    assert problems is not None
    assert len(problems) == MAX_PROBLEMS + 1
    assert problems[-1].endswith(": ... and 200 more problems")


def test_file_size_is_bounded(tmp_path: Path) -> None:
    data = VALID.encode() + b"#" * spec.MAX_BYTES
    assert one_problem(tmp_path, data).startswith("fuzz.yaml:1:1: the spec is larger than")


def test_number_of_values_is_bounded() -> None:
    # Composing stops at the bound: the rest of the file is never parsed.
    text = VALID + "".join(f"  - {{name: m{i}, interfaces: [x], collector: ids}}\n"
                           for i in range(spec.MAX_NODES // 7 + 10))
    problems = check(lambda: spec.parse(text, PATH))
    assert problems is not None and len(problems) == 1
    assert re.fullmatch(rf"fuzz\.yaml:[0-9]+:[0-9]+: the spec has more than {spec.MAX_NODES} values; "
                        r"this is not a mirror spec", problems[0]), problems
    # Below the bound: the 5,000 mirrors of the scale bench are read.
    text = VALID + "".join(f"  - {{name: m{i}, interfaces: [x{i}], collector: ids}}\n"
                           for i in range(5000))
    assert len(spec.parse(text, PATH).mirrors) == 5001


def test_an_endless_file_is_not_read_to_the_end() -> None:
    t0 = time.monotonic()
    with pytest.raises(spec.SpecError) as info:
        spec.load("/dev/zero")
    assert time.monotonic() - t0 < 5
    assert info.value.problems == [f"/dev/zero:1:1: the spec is larger than {spec.MAX_BYTES} "
                                   "bytes; this is not a mirror spec"]


def test_aliases_that_stay_small_still_work() -> None:
    text = ("collectors:\n  ids: &c {address: 192.0.2.50}\n"
            "mirrors:\n  - {name: a, interfaces: &i [wan, lan], collector: ids,"
            " match: &m {protocol: tcp, port: [22, 80]}}\n"
            "  - {name: b, interfaces: *i, collector: ids, match: *m}\n")
    s = spec.parse(text, PATH)
    assert s.mirrors[0].match == s.mirrors[1].match
    assert s.mirrors[1].interfaces == ("wan", "lan")


def test_nesting_up_to_the_bound_is_read() -> None:
    # The bound is on structure, not on meaning: 64 levels compose, 65 do not.
    top = 3  # the root mapping, the `mirrors` list, the mirror
    ok = VALID.replace("[br-lan]", _nested(spec.MAX_DEPTH - top - 1))  # and the scalar
    problems = check(lambda: spec.parse(ok, PATH))
    assert problems is not None and "must be a string" in problems[0]
    deep = VALID.replace("[br-lan]", _nested(spec.MAX_DEPTH - top))
    problems = check(lambda: spec.parse(deep, PATH))
    # The innermost scalar, after the `[`s that open at column 17.
    assert problems == [f"fuzz.yaml:6:{17 + spec.MAX_DEPTH - top}: nested more than "
                        f"{spec.MAX_DEPTH} levels deep"]


BOMB_SCRIPT = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from mirrord import spec
text = sys.stdin.read()
t0 = time.monotonic()
try:
    spec.parse(text, "fuzz.yaml")
except spec.SpecError as e:
    print(time.monotonic() - t0)
    print(e.problems[0])
except MemoryError:
    print("MemoryError after", time.monotonic() - t0)
"""


def test_alias_bomb_is_rejected_in_milliseconds() -> None:
    # The classic 9x9 "billion laughs", reached from a place that reports the
    # node it finds. In a child with 1 GiB of address space, so a regression
    # fails fast instead of taking the machine's memory.
    text = _bomb(9) + "\n" + _in_protocol("*x8")
    assert len(text) < 800
    p = subprocess.run([sys.executable, "-c", BOMB_SCRIPT], input=text, capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    lines = p.stdout.splitlines()
    assert p.returncode == 0 and len(lines) == 2, (p.stdout[-2000:], p.stderr[-2000:])
    assert float(lines[0]) < 1.0
    assert lines[1].startswith("fuzz.yaml:")
    assert f"aliases expand to more than {spec.MAX_ALIAS_NODES} nodes" in lines[1]


# -- the fuzzer ------------------------------------------------------------

CORPUS = [VALID, FULL, (ROOT / "etc" / "mirrord.yaml").read_text(encoding="utf-8")]

TAGS = ["!!int", "!!bool", "!!timestamp", "!!float", "!!str", "!!null", "!!binary", "!!set",
        "!!omap", "!!pairs", "!!seq", "!!map", "!!merge", "!!value", "!!yaml", "!foo", "!",
        "!!python/object:os.system", "!!python/name:os.system", "!<tag:yaml.org,2002:int>",
        "!<!>", "!!int\t"]

VALUES = [
    "''", '""', "~", "null", "true", "no", "maybe", "0", "-1", "65536", "65535", "0x1F",
    "0o17", "017", "0b101", "1_000", "1:30:00", "1e999", "-1e999", ".nan", ".inf", "3.5",
    "²", "'²'", "٣", "'١٢'", "\uff11\uff12", "'1²'", "7" * 50, "7" * 5000, "'" + "9" * 4301 + "'",
    "-" + "1" * 400, "a" * 5000, "'\\x00'", '"\\ud800"', '"a\\nb"', '"\\u2028"', "[]", "{}",
    "[[[]]]", "{a: {b: c}}", "*nope", "&a x", "192.0.2.255/24", "255.255.255.255", "0.0.0.0",
    "::", "'::1'", "fe80::1", "'fe80::1%eth0'", "224.0.0.1", "192.0.2.0/33", "2001:db8::/129",
    "1-2-3", "5:", "-5", "65535-1", "0-0", "1 - 2", "tcp", "icmpv6", "256", "!!int ''",
    "!!bool maybe", "!!timestamp x", "!!timestamp 2024-02-30", "2024-01-01", "=", "<<",
    "? a", "- a", "|\n  x", ">-\n  y", "'", '"', "[", "{", "a: b: c", "@x", "`x", "%x",
    "\t", "#", "ipv4", "clone", "tzsp", "both", "br-lan", "x" * 16, "'a b'", "'a/b'",
    "span", "vxlan", "gretap", "erspan", "16777215", "16777216", "1023", "1024", "lan4",
]

# ASCII, superscript, Arabic-Indic and fullwidth digits: all isdigit() to Python.
DIGITS = ("0123456789\u00b2\u00b3\u00b9" + "".join(map(chr, range(0x660, 0x66A)))
          + "\uff10\uff11\uff12-:")

KEYS = ["address", "interface", "transport", "port", "snaplen", "ring_mib", "vni", "session",
        "name",
        "interfaces", "direction", "collector", "match", "family", "protocol", "sport",
        "dport", "source", "destination", "backend", "poll_interval", "collectors", "mirrors",
        "<<", "? x", "[a]", "{a: b}", "1", "~", "k" * 300, "é", "'a\\tb'"]

SCALAR_RE = re.compile(r"(?<=: )[^\s#\[\]{},][^\n#,\]}]*|(?<=[\[,] )[^\s\[\]{},]+|(?<=- )[^\s\n]+")


def _scalar_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in SCALAR_RE.finditer(text)]


def _replace_value(rng: random.Random, text: str, value: str) -> str:
    spans = _scalar_spans(text)
    if not spans:
        return text + value
    a, b = rng.choice(spans)
    return text[:a] + value + text[b:]


def _random_value(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.6:
        return rng.choice(VALUES)
    if roll < 0.75:
        return f"{rng.choice(TAGS)} {rng.choice(VALUES)}"
    if roll < 0.85:
        return _nested(rng.choice([1, 2, 5, 60, 61, 62, 63, 64, 65, 200, 1000]))
    if roll < 0.9:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(1, 12)))
    return "'" + "".join(rng.choice(DIGITS) for _ in range(6)) + "'"


def _mutate(rng: random.Random, text: str) -> bytes:
    kind = rng.choice([0, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9])
    lines = text.split("\n")
    if kind == 0:  # replace a value
        text = _replace_value(rng, text, _random_value(rng))
    elif kind == 1:  # tag a value
        spans = _scalar_spans(text)
        if spans:
            a, _ = rng.choice(spans)
            text = text[:a] + rng.choice(TAGS) + " " + text[a:]
    elif kind == 2:  # a key (and value) at a random line and indentation
        i = rng.randrange(len(lines) + 1)
        indent = " " * rng.choice([0, 2, 4, 6, 8, 3])
        lines.insert(i, f"{indent}{rng.choice(KEYS)}: {_random_value(rng)}")
        text = "\n".join(lines)
    elif kind == 3:  # a list item at a random line
        i = rng.randrange(len(lines) + 1)
        lines.insert(i, " " * rng.choice([0, 2, 4, 6]) + "- " + _random_value(rng))
        text = "\n".join(lines)
    elif kind == 4:  # anchors and aliases: to siblings, to themselves, bombs
        spans = _scalar_spans(text)
        if len(spans) >= 2:
            (a, b), (c, d) = sorted(rng.sample(spans, 2))
            anchor = text[:a] + "&a " + text[a:b]
            text = anchor + text[b:c] + rng.choice(["*a", "*a", "*b", "[*a, *a]"]) + text[d:]
        else:
            text = text + "\n"
        if rng.random() < 0.3:
            levels = rng.randrange(2, 10)
            text = _bomb(levels, rng.randrange(2, 10)) + "\n" + _replace_value(
                rng, text, f"*x{levels - 1}")
    elif kind == 5:  # delete, duplicate or swap lines
        if len(lines) > 1:
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            op = rng.randrange(3)
            if op == 0:
                del lines[i]
            elif op == 1:
                lines.insert(j, lines[i])
            else:
                lines[i], lines[j] = lines[j], lines[i]
        text = "\n".join(lines)
    elif kind == 6:  # truncate
        text = text[: rng.randrange(len(text) + 1)]
    elif kind == 7 and rng.random() < 0.5:  # deep block nesting under a key
        depth = rng.choice([10, 63, 64, 65, 300])
        i = rng.randrange(len(lines) + 1)
        lines[i:i] = ["x:"] + [" " * (2 * d + 2) + "y:" for d in range(depth)]
        text = "\n".join(lines)
    elif kind == 8:  # a flow mapping or list in place of a block
        text = _replace_value(rng, text, "{" + ", ".join(
            f"{rng.choice(KEYS)}: {rng.choice(VALUES)}" for _ in range(rng.randrange(1, 4))) + "}")
    # surrogateescape: the bytes of an earlier round's byte flips come back as they were.
    data = text.encode("utf-8", "surrogateescape")
    if kind >= 9 or rng.random() < 0.1:  # byte flips, insertions, deletions
        buf = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            if not buf:
                break
            i = rng.randrange(len(buf))
            op = rng.randrange(3)
            if op == 0:
                buf[i] = rng.randrange(256)
            elif op == 1:
                buf.insert(i, rng.choice([0, 7, 9, 10, 13, 0x85, 0xC3, 0xE9, 0xFF, 0xEF,
                                          rng.randrange(256)]))
            else:
                del buf[i]
        data = bytes(buf)
    return data


def test_fuzz(tmp_path: Path) -> None:
    seed = int(os.environ.get("MIRRORD_FUZZ_SEED", "20261203"))
    cases = int(os.environ.get("MIRRORD_FUZZ_CASES", "4000"))
    rng = random.Random(seed)
    file = tmp_path / PATH
    cwd = os.getcwd()
    os.chdir(tmp_path)
    accepted = rejected = 0
    try:
        for n in range(cases):
            text = rng.choice(CORPUS)
            # A few mutations compound: a tag inside a bomb inside a flipped byte.
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                text = _mutate(rng, text).decode("utf-8", "surrogateescape")
            data = text.encode("utf-8", "surrogateescape")
            file.write_bytes(data)
            label = f"seed {seed} case {n}: {data[:2000]!r}"
            # CPU time: the test shares its machine, and the bound is on the work.
            t0 = time.process_time()
            problems = check(lambda: spec.load(PATH), label)
            assert time.process_time() - t0 < 2, f"slow: {label}"
            if problems is None:
                accepted += 1
            else:
                rejected += 1
    finally:
        os.chdir(cwd)
    # The mutations must not be so wild that nothing parses, nor so tame
    # that nothing fails.
    assert accepted > cases // 20 and rejected > cases // 2, (accepted, rejected)


def test_bounds_are_those_the_tests_assume() -> None:
    assert (spec.MAX_LINE, spec.MAX_PROBLEMS) == (MAX_LINE, MAX_PROBLEMS)


def test_a_reader_bug_is_still_a_spec_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # The last line of defence for the daemon's reload; the fuzz test makes
    # sure nothing reaches it.
    def broken(self: object, root: object) -> None:
        raise KeyError("x" * 1000)

    monkeypatch.setattr(_Validator, "spec", broken)
    with pytest.raises(spec.SpecError) as info:
        spec.parse(VALID, PATH)
    (problem,) = info.value.problems
    assert problem.startswith(f"fuzz.yaml:1:1: {spec.INTERNAL_ERROR} (KeyError: ")
    assert len(problem) <= MAX_LINE
