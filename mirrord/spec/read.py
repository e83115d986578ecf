"""The entry points: `load` a spec file, `parse` a spec's text -> Spec, or SpecError.

The reading runs in three steps, each in its own module: yaml_tree (bytes ->
text -> a bounded node tree), validate (node tree -> Spec, on nodes and
fields) and, here, the bounds on what is reported: at most MAX_PROBLEMS
problems of at most MAX_LINE characters each, and never an exception other
than SpecError, whatever the text.
"""

from __future__ import annotations

from .model import Spec, SpecError
from .validate import validate
from .yaml_tree import compose, read_text, show

MAX_PROBLEMS = 100
MAX_LINE = 300  # characters in one problem line
INTERNAL_ERROR = "internal error in mirrord while reading this spec; please report it"


def load(path: str) -> Spec:
    """The spec in the file at `path`; raises SpecError, and only SpecError."""
    return parse(read_text(path), path)


def parse(text: str, path: str = "<spec>") -> Spec:
    """The spec in `text`; raises SpecError, and only SpecError, for any text."""
    try:
        problems = _parse(text, path)
    except Exception as e:
        # A bug here must not take the daemon down on a reload; the fuzz
        # test asserts this line is never produced.
        problems = [f"{path}:1:1: {INTERNAL_ERROR} ({type(e).__name__}: {show(e)})"]
    if isinstance(problems, Spec):
        return problems
    if len(problems) > MAX_PROBLEMS:
        rest = len(problems) - MAX_PROBLEMS
        where = problems[MAX_PROBLEMS].split(": ", 1)[0]
        problems = [*problems[:MAX_PROBLEMS], f"{where}: ... and {rest} more problems"]
    raise SpecError([_clamp(p) for p in problems])


def _parse(text: str, path: str) -> Spec | list[str]:
    try:
        root, odd_tags = compose(text, path)
    except SpecError as e:
        return e.problems
    return validate(root, odd_tags, path)


def _clamp(line: str) -> str:
    if len(line) <= MAX_LINE:
        return line
    return line[:MAX_LINE - 3] + "..."
