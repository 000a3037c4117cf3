"""Deliberate duplication, kept honest: every block an algorithm file copies must match its source.

Each algorithm file is self-contained, so blocks that several files need (config fields, data,
evaluation, utilities, networks, flow layers) are copied, not imported. A source block is delimited
by marker comments

    # ---- [block: data] ----------------------
    ...
    # ---- [end block: data] ------------------

and a copy names its source file, optionally with renames of identifiers (whole words), in order:

    # ---- [block: data | copied from cnf.py] ----
    # ---- [block: networks | copied from iql.py | renames: ValueFunction->StateValue] ----

Source blocks may nest (cnf.py's `frozen decoder` sits inside its `conditional flow`); markers inside a
copy belong to the copy. The tests fail when a copy differs from its (renamed) source, when a rename is
not an identifier, and when two files share 6 or more consecutive lines outside marked blocks (a copy
nobody marked). `python tests/test_copies.py --fix` rewrites every copy from its source, like
transformers' `make fix-copies`. Files: algorithms/*.py, and data/*.py (which copy D4RL's names and
reference scores from cnf.py).
"""
from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ROOT / "algorithms"
IDENTIFIER = re.compile(r"^[A-Za-z_]\w*$")
MIN_SHARED_LINES = 6
START = re.compile(r"^# ---- \[block: (?P<name>[\w ]+?)(?: \| copied from (?P<source>[\w.]+\.py))?"
                   r"(?: \| renames: (?P<renames>[^\]]+))?\] -*$")
END = "# ---- [end block: {name}]"


def blocks(path: Path) -> dict:
    """name -> (source file or None, renames, first body line, end line) for every block of a file."""
    lines = path.read_text().splitlines()
    found, inside_copy_until = {}, -1
    for i, line in enumerate(lines):
        match = START.match(line.strip())
        if not match or i <= inside_copy_until:
            continue
        name = match["name"]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(END.format(name=name))), None)
        if end is None:
            raise AssertionError(f"{path.name}: block {name!r} has no end marker")
        if name in found:
            raise AssertionError(f"{path.name}: block {name!r} appears twice")
        renames = [tuple(part.strip().split("->")) for part in match["renames"].split(",")] if match["renames"] else []
        found[name] = (match["source"], renames, i + 1, end)
        if match["source"] is not None:
            inside_copy_until = end
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
        if not (IDENTIFIER.match(old) and IDENTIFIER.match(new)):
            raise AssertionError(f"rename {old!r}->{new!r} of block {name!r}: renames take identifiers only")
        text = re.sub(rf"\b{old}\b", new, text)
    return text.split("\n")


def checked_files():
    return sorted(ALGORITHMS.glob("*.py")) + sorted((ROOT / "data").glob("*.py"))


def copies():
    for path in checked_files():
        for name, (source, renames, _, _) in blocks(path).items():
            if source is not None:
                yield path, name, source, renames


@pytest.mark.parametrize("path, name, source, renames", list(copies()),
                         ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_copy_matches_its_source(path, name, source, renames):
    want, have = expected_copy(source, name, renames), body(path, name)
    diff = "\n".join(difflib.unified_diff(want, have, f"{source} [{name}]", f"{path.name} [{name}]", lineterm=""))
    assert want == have, (f"{path.name} block {name!r} drifted from {source}; "
                          f"run python tests/test_copies.py --fix\n{diff}")


def test_the_checker_sees_drift(tmp_path, monkeypatch):
    """The mechanism itself: a renamed copy passes, a changed line fails, --fix repairs it."""
    monkeypatch.setattr(sys.modules[__name__], "ALGORITHMS", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "a.py").write_text("# ---- [block: net] ----\ndef f():\n    return alpha\n"
                                   "# ---- [end block: net] ----\n")
    (tmp_path / "b.py").write_text("# ---- [block: net | copied from a.py | renames: alpha->beta] ----\ndef f():\n"
                                   "    return beta\n# ---- [end block: net] ----\nextra = 1\n")
    [(path, name, source, renames)] = list(copies())
    assert expected_copy(source, name, renames) == body(path, name)
    (tmp_path / "b.py").write_text((tmp_path / "b.py").read_text().replace("return beta", "return gamma"))
    assert expected_copy(source, name, renames) != body(path, name)
    fix()
    assert expected_copy(source, name, renames) == body(path, name)
    assert (tmp_path / "b.py").read_text().endswith("extra = 1\n")


def code_lines(path: Path, marked_too: bool = False) -> list:
    """(line number, whitespace-normalised text) of the lines outside every marked block (or, with
    `marked_too`, of every line but the markers); blank lines, comments and imports are left out (they
    repeat by nature)."""
    lines = path.read_text().splitlines()
    marked = set()
    for _, _, start, end in blocks(path).values():
        marked.update(range(start - 1, end + 1))
    kept = []
    for i, line in enumerate(lines):
        text = " ".join(line.split())
        if (i in marked and not marked_too) or not text or text.startswith(("#", "import ", "from ")):
            continue
        kept.append((i + 1, text))
    return kept


def shared_runs(a: Path, b: Path, n: int = MIN_SHARED_LINES) -> list:
    """Places where n consecutive unmarked lines of `a` stand anywhere in `b`, marked or not (a source
    block's text copied without a marker is caught too): [(line in a, line in b)]."""
    lines_a, lines_b = code_lines(a), code_lines(b, marked_too=True)
    windows = {}
    for k in range(len(lines_b) - n + 1):
        windows.setdefault(tuple(t for _, t in lines_b[k:k + n]), lines_b[k][0])
    return [(lines_a[k][0], windows[key]) for k in range(len(lines_a) - n + 1)
            if (key := tuple(t for _, t in lines_a[k:k + n])) in windows]


def test_no_unmarked_copies_between_files():
    files = checked_files()
    found = [f"{a.name}:{la} ~ {b.name}:{lb}" for a in files for b in files if a != b
             for la, lb in shared_runs(a, b)[:1]]
    assert not found, (f"{MIN_SHARED_LINES}+ identical lines outside marked blocks (mark one side as the "
                       f"source block and the other as `copied from` it): {found}")


def test_the_unmarked_copy_check_sees_a_silent_copy(tmp_path):
    code = "".join(f"value_{i} = compute({i}) + offset\n" for i in range(MIN_SHARED_LINES))
    (tmp_path / "a.py").write_text("import os\n" + code)
    (tmp_path / "b.py").write_text("x = 1\n" + code)
    assert shared_runs(tmp_path / "a.py", tmp_path / "b.py") == [(2, 2)]
    copy = "# ---- [block: v | copied from a.py] ----\n" + code + "# ---- [end block: v] ----\n"
    (tmp_path / "b.py").write_text("x = 1\n" + copy)
    assert shared_runs(tmp_path / "a.py", tmp_path / "b.py") == [(2, 3)]  # the source must be marked too
    (tmp_path / "a.py").write_text("import os\n# ---- [block: v] ----\n" + code + "# ---- [end block: v] ----\n")
    assert shared_runs(tmp_path / "a.py", tmp_path / "b.py") == shared_runs(tmp_path / "b.py", tmp_path / "a.py") == []


def test_renames_take_identifiers_only(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ALGORITHMS", tmp_path)
    (tmp_path / "a.py").write_text("# ---- [block: net] ----\nbatch_size = 512  # paper\n"
                                   "# ---- [end block: net] ----\n")
    with pytest.raises(AssertionError, match="identifiers only"):
        expected_copy("a.py", "net", [("512  # paper", "256  # CORL")])
    assert expected_copy("a.py", "net", [("batch_size", "vae_batch_size")]) == ["vae_batch_size = 512  # paper"]


def fix() -> int:
    """Rewrite every drifted copy from its source; return how many were rewritten."""
    fixed = 0
    for path, name, source, renames in list(copies()):
        try:
            want = expected_copy(source, name, renames)
        except AssertionError as e:  # a missing source block: say so, fix the others
            print(f"cannot fix {path.name} [{name}]: {e}")
            continue
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
