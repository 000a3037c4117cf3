"""Deliberate duplication, kept honest: every block an algorithm file copies must match its source.

Each algorithm file is self-contained, so blocks that several files need (config fields, data,
evaluation, utilities, networks, flow layers) are copied, not imported. A source block is delimited
by marker comments

    # ---- [block: data] ----------------------
    ...
    # ---- [end block: data] ------------------

and a copy names its source file, optionally with renames applied to the source text, in order:

    # ---- [block: data | copied from cnf.py] ----
    # ---- [block: networks | copied from iql.py | renames: ValueFunction->StateValue, iql->awac] ----

The test fails when a copy differs from its (renamed) source; `python tests/test_copies.py --fix`
rewrites every copy from its source, like transformers' `make fix-copies`.
"""
from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

import pytest

ALGORITHMS = Path(__file__).resolve().parents[1] / "algorithms"
START = re.compile(r"^# ---- \[block: (?P<name>[\w ]+?)(?: \| copied from (?P<source>[\w.]+\.py))?"
                   r"(?: \| renames: (?P<renames>[^\]]+))?\] -*$")
END = "# ---- [end block: {name}]"


def blocks(path: Path) -> dict:
    """name -> (source file or None, renames, first body line, end line) for every block of a file."""
    lines = path.read_text().splitlines()
    found = {}
    for i, line in enumerate(lines):
        match = START.match(line.strip())
        if not match:
            continue
        name = match["name"]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(END.format(name=name))), None)
        if end is None:
            raise AssertionError(f"{path.name}: block {name!r} has no end marker")
        if name in found:
            raise AssertionError(f"{path.name}: block {name!r} appears twice")
        renames = [tuple(part.strip().split("->")) for part in match["renames"].split(",")] if match["renames"] else []
        found[name] = (match["source"], renames, i + 1, end)
    return found


def body(path: Path, name: str) -> list:
    _, _, start, end = blocks(path)[name]
    return path.read_text().splitlines()[start:end]


def expected_copy(source: str, name: str, renames: list) -> list:
    source_path = ALGORITHMS / source
    if not source_path.exists():
        raise AssertionError(f"copy source {source} does not exist")
    source_blocks = blocks(source_path)
    if name not in source_blocks:
        raise AssertionError(f"{source} has no block {name!r}")
    if source_blocks[name][0] is not None:
        raise AssertionError(f"{source}'s block {name!r} is itself a copy: copy from its source instead")
    text = "\n".join(body(source_path, name))
    for old, new in renames:
        text = text.replace(old, new)
    return text.split("\n")


def copies():
    for path in sorted(ALGORITHMS.glob("*.py")):
        for name, (source, renames, _, _) in blocks(path).items():
            if source is not None:
                yield path, name, source, renames


@pytest.mark.parametrize("path, name, source, renames", list(copies()),
                         ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_copy_matches_its_source(path, name, source, renames):
    want, have = expected_copy(source, name, renames), body(path, name)
    diff = "\n".join(difflib.unified_diff(want, have, f"{source} [{name}]", f"{path.name} [{name}]", lineterm=""))
    assert want == have, f"{path.name} block {name!r} drifted from {source}; run python tests/test_copies.py --fix\n{diff}"


def test_the_checker_sees_drift(tmp_path, monkeypatch):
    """The mechanism itself: a renamed copy passes, a changed line fails, --fix repairs it."""
    monkeypatch.setattr(sys.modules[__name__], "ALGORITHMS", tmp_path)
    (tmp_path / "a.py").write_text("# ---- [block: net] ----\ndef f():\n    return 'a'\n# ---- [end block: net] ----\n")
    (tmp_path / "b.py").write_text("# ---- [block: net | copied from a.py | renames: 'a'->'b'] ----\ndef f():\n"
                                   "    return 'b'\n# ---- [end block: net] ----\nextra = 1\n")
    [(path, name, source, renames)] = list(copies())
    assert expected_copy(source, name, renames) == body(path, name)
    (tmp_path / "b.py").write_text((tmp_path / "b.py").read_text().replace("return 'b'", "return 'c'"))
    assert expected_copy(source, name, renames) != body(path, name)
    fix()
    assert expected_copy(source, name, renames) == body(path, name)
    assert (tmp_path / "b.py").read_text().endswith("extra = 1\n")


def fix() -> int:
    """Rewrite every drifted copy from its source; return how many were rewritten."""
    fixed = 0
    for path, name, source, renames in list(copies()):
        want = expected_copy(source, name, renames)
        if want != body(path, name):
            lines = path.read_text().splitlines()
            _, _, start, end = blocks(path)[name]
            path.write_text("\n".join(lines[:start] + want + lines[end:]) + "\n")
            print(f"fixed {path.name} [{name}] from {source}")
            fixed += 1
    return fixed


if __name__ == "__main__":
    if "--fix" in sys.argv:
        fix()
    else:
        sys.exit(pytest.main([__file__, "-q"]))
