"""Deliberate duplication, kept honest: every definition an algorithm file copies must match its source.

Each algorithm file is self-contained, so definitions that several files need (networks, flow layers,
the loop, data and evaluation plumbing) are copied, not imported. As in transformers, a copy carries one
comment line directly above a whole top-level function, class or assignment, or a whole method:

    # Copied from cnf.py: TwinCritic
    # Copied from cnf.py: CNF.state_dict
    # Copied from cnf.py: FrozenFlow with ConditionalFlow->NormalConditionalFlow

and the test compares that whole definition (decorators included) with the source's, after renaming
identifiers (whole words, in order). Two more forms, for what is not a definition:
- a group of dataclass fields: `# Copied from cnf.py: TrainConfig[experiment]` directly above a field
  group's header comment (`# --- experiment: ...`); the group runs to the next header or the class end;
- the plumbing: a file whose `# ==== Plumbing ... (copied from cnf.py ...) ====` banner names a source
  holds, from the banner to the end of the file, exactly the source's lines.
Markers never sit inside a function body (../shared/reading_path.py counts them). The tests also fail
when two files share 6 or more consecutive lines outside copies and their sources (a copy nobody
marked). `python tests/test_copies.py --fix` rewrites every copy from its source, like transformers'
`make fix-copies`. Files: algorithms/*.py, and data/*.py (which copy D4RL's names and reference scores
from cnf.py).
"""
from __future__ import annotations

import ast
import difflib
import functools
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ROOT / "algorithms"
IDENTIFIER = re.compile(r"^[A-Za-z_]\w*$")
MIN_SHARED_LINES = 6
MARKER = re.compile(r"^\s*# Copied from (?P<source>[\w.]+\.py): (?P<name>[\w.]+(?:\[[\w ]+\])?)"
                    r"(?: with (?P<renames>.+))?$")
PLUMBING = re.compile(r"^# =+ Plumbing.*copied from (?P<source>[\w.]+\.py)")
GROUP = re.compile(r"^\s*# --- (?P<name>[\w ]+?)(:| ---)")


def source_file(name: str) -> Path:
    path = ALGORITHMS / name
    if not path.exists():
        raise AssertionError(f"copy source {name} does not exist")
    return path


def definitions(path: Path) -> dict:
    """name -> (first line, last line), 1-based, of every top-level function, class and assignment, every
    method (`Class.method`) and every dataclass field group (`Class[group]`)."""
    return parsed_definitions(path.read_text())


@functools.lru_cache(maxsize=None)
def parsed_definitions(text: str) -> dict:
    lines, found = text.splitlines(), {}

    def span(node) -> tuple:
        return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]), node.end_lineno

    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[node.name] = span(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    found[target.id] = span(node)
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found[f"{node.name}.{member.name}"] = span(member)
            headers = [i + 1 for i in range(node.lineno, node.end_lineno) if GROUP.match(lines[i])]
            for k, start in enumerate(headers):
                end = headers[k + 1] - 1 if k + 1 < len(headers) else node.end_lineno
                while not lines[end - 1].strip() or MARKER.match(lines[end - 1]):  # the next group's marker
                    end -= 1
                found[f"{node.name}[{GROUP.match(lines[start - 1])['name']}]"] = (start, end)
    return found


def plumbing(path: Path) -> tuple:
    """(banner line, source file or None) of a file's plumbing section, or None."""
    for i, line in enumerate(path.read_text().splitlines()):
        if re.match(r"^# =+ Plumbing", line):
            match = PLUMBING.match(line)
            source = match["source"] if match and match["source"] != path.name else None
            return i + 1, source
    return None


def markers(path: Path) -> list:
    """[(marker line, source, name, renames, (first, last) line of the marked definition)]."""
    return parsed_markers(path.name, path.read_text())


@functools.lru_cache(maxsize=None)
def parsed_markers(name: str, text: str) -> list:
    lines, spans = text.splitlines(), None
    found = []
    for i, line in enumerate(lines):
        match = MARKER.match(line)
        if not match:
            continue
        spans = spans or parsed_definitions(text)
        marked = [s for s in spans.values() if s[0] == i + 2]
        if not marked:
            raise AssertionError(f"{name}:{i + 1}: a copy marker must stand directly above a whole "
                                 f"definition (function, class, method, assignment or field group)")
        renames = [tuple(p.strip().split("->")) for p in match["renames"].split(",")] if match["renames"] else []
        found.append((i + 1, match["source"], match["name"], renames, max(marked, key=lambda s: s[1])))
    return found


def renamed(text: str, renames: list, what: str) -> str:
    for old, new in renames:
        if not (IDENTIFIER.match(old) and IDENTIFIER.match(new)):
            raise AssertionError(f"rename {old!r}->{new!r} of {what}: renames take identifiers only")
        text = re.sub(rf"\b{old}\b", new, text)
    return text


def expected_copy(source: str, name: str, renames: list) -> list:
    path = source_file(source)
    spans = definitions(path)
    if name not in spans:
        raise AssertionError(f"{source} has no definition {name!r}")
    if any(m[2] == name or name.startswith(m[2] + ".") for m in markers(path)):
        raise AssertionError(f"{source}'s {name!r} is itself a copy: copy from its source instead")
    start, end = spans[name]
    return renamed("\n".join(path.read_text().splitlines()[start - 1:end]), renames, name).split("\n")


def expected_plumbing(source: str) -> list:
    path = source_file(source)
    section = plumbing(path)
    if section is None or section[1] is not None:
        raise AssertionError(f"{source} has no plumbing section of its own")
    return path.read_text().splitlines()[section[0]:]


def checked_files():
    return sorted(ALGORITHMS.glob("*.py")) + sorted((ROOT / "data").glob("*.py"))


def copies():
    """(path, what, want, have, (first, last)) for every copy: definitions and plumbing sections."""
    for path in checked_files():
        lines = path.read_text().splitlines()
        for _, source, name, renames, (start, end) in markers(path):
            want = expected_copy(source, name, renames)
            yield path, f"{name} from {source}", want, lines[start - 1:end], (start, end)
        section = plumbing(path)
        if section is not None and section[1] is not None:
            banner, source = section
            yield path, f"plumbing from {source}", expected_plumbing(source), lines[banner:], (banner + 1, len(lines))


@pytest.mark.parametrize("path, what, want, have, span", list(copies()),
                         ids=lambda v: v.name if isinstance(v, Path) else str(v) if isinstance(v, str) else "")
def test_copy_matches_its_source(path, what, want, have, span):
    diff = "\n".join(difflib.unified_diff(want, have, what, path.name, lineterm=""))
    assert want == have, f"{path.name}: {what} drifted; run python tests/test_copies.py --fix\n{diff}"


def test_markers_stand_outside_function_bodies():
    for path in checked_files():
        tree, lines = ast.parse(path.read_text()), path.read_text().splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside = [n for n in range(node.body[0].lineno, node.end_lineno + 1) if MARKER.match(lines[n - 1])]
                assert not inside, f"{path.name}:{inside[0]}: a copy marker inside {node.name}'s body"


def fix() -> int:
    """Rewrite every drifted copy from its source, last lines first; return how many were rewritten."""
    fixed = 0
    for path in checked_files():
        todo = [(span, want) for p, what, want, have, span in copies() if p == path and want != have]
        lines = path.read_text().splitlines()
        for (start, end), want in sorted(todo, reverse=True):
            lines[start - 1:end] = want
            print(f"fixed {path.name} lines {start}-{end}")
            fixed += 1
        if todo:
            path.write_text("\n".join(lines) + "\n")
    return fixed


def test_the_checker_sees_drift(tmp_path, monkeypatch):
    """The mechanism itself: a renamed copy passes, a changed line fails, --fix repairs it."""
    monkeypatch.setattr(sys.modules[__name__], "ALGORITHMS", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "a.py").write_text("class Net:\n    def f(self):\n        return alpha\n\n\n"
                                   "# ==== Plumbing (copied from a.py) ====\ny = 2\n")
    (tmp_path / "b.py").write_text("class Other:\n    # Copied from a.py: Net.f with alpha->beta\n    def f(self):\n"
                                   "        return beta\n\n\nextra = 1\n"
                                   "# ==== Plumbing (copied from a.py) ====\ny = 2\n")
    [(_, _, want, have, _), (_, _, want_p, have_p, _)] = list(copies())
    assert want == have and want_p == have_p == ["y = 2"]
    text = (tmp_path / "b.py").read_text()
    (tmp_path / "b.py").write_text(text.replace("return beta", "return gamma").replace("y = 2", "y = 3"))
    assert all(want != have for _, _, want, have, _ in copies())
    assert fix() == 2
    assert all(want == have for _, _, want, have, _ in copies())
    assert (tmp_path / "b.py").read_text() == text


def test_field_groups_and_misplaced_markers(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ALGORITHMS", tmp_path)
    (tmp_path / "a.py").write_text("class C:\n    # --- mine: a ---\n    x: int = 1\n\n    # --- shared: b ---\n"
                                   "    y: int = 2\n    z: int = 3\n")
    assert expected_copy("a.py", "C[shared]", []) == ["    # --- shared: b ---", "    y: int = 2", "    z: int = 3"]
    assert expected_copy("a.py", "C[mine]", []) == ["    # --- mine: a ---", "    x: int = 1"]
    (tmp_path / "b.py").write_text("def f():\n    # Copied from a.py: C\n    return 1\n")
    with pytest.raises(AssertionError, match="directly above a whole definition"):
        markers(tmp_path / "b.py")


def code_lines(path: Path, exclude_copies: bool = True) -> list:
    """(line number, whitespace-normalised text) of a file's lines outside its copies and outside the
    definitions other files copy (with `exclude_copies` False, of every line); blank lines, comments and
    imports are left out (they repeat by nature)."""
    lines = path.read_text().splitlines()
    excluded = set()
    if exclude_copies:
        for _, _, _, _, (start, end) in markers(path):
            excluded.update(range(start - 1, end))
        section = plumbing(path)
        if section is not None and section[1] is not None:
            excluded.update(range(section[0], len(lines)))
        copied_here = {m[2] for f in checked_files() for m in markers(f) if m[1] == path.name}
        for name, (start, end) in definitions(path).items():
            if name in copied_here:
                excluded.update(range(start - 1, end))
        section = plumbing(path)
        if section is not None and any(plumbing(f) and plumbing(f)[1] == path.name for f in checked_files()):
            excluded.update(range(section[0], len(lines)))
    kept = []
    for i, line in enumerate(lines):
        text = " ".join(line.split())
        if i in excluded or not text or text.startswith(("#", "import ", "from ")):
            continue
        kept.append((i + 1, text))
    return kept


def shared_runs(a: Path, b: Path, n: int = MIN_SHARED_LINES) -> list:
    """Places where n consecutive unmarked lines of `a` stand anywhere in `b`, copied or not (a source's
    text copied without a marker is caught too): [(line in a, line in b)]."""
    lines_a, lines_b = code_lines(a), code_lines(b, exclude_copies=False)
    windows = {}
    for k in range(len(lines_b) - n + 1):
        windows.setdefault(tuple(t for _, t in lines_b[k:k + n]), lines_b[k][0])
    return [(lines_a[k][0], windows[key]) for k in range(len(lines_a) - n + 1)
            if (key := tuple(t for _, t in lines_a[k:k + n])) in windows]


def test_no_unmarked_copies_between_files():
    files = checked_files()
    found = [f"{a.name}:{la} ~ {b.name}:{lb}" for a in files for b in files if a != b
             for la, lb in shared_runs(a, b)[:1]]
    assert not found, (f"{MIN_SHARED_LINES}+ identical lines outside copies (mark the copy with "
                       f"`# Copied from SOURCE.py: NAME` above the whole definition): {found}")


def test_the_unmarked_copy_check_sees_a_silent_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ALGORITHMS", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    code = "".join(f"    value_{i} = compute({i}) + offset\n" for i in range(MIN_SHARED_LINES))
    (tmp_path / "a.py").write_text("import os\n\n\ndef f():\n" + code)
    (tmp_path / "b.py").write_text("x = 1\n\n\ndef g():\n" + code)
    assert shared_runs(tmp_path / "a.py", tmp_path / "b.py") == [(5, 5)]
    (tmp_path / "b.py").write_text("x = 1\n\n\n# Copied from a.py: f\ndef f():\n" + code)
    assert shared_runs(tmp_path / "a.py", tmp_path / "b.py") == shared_runs(tmp_path / "b.py", tmp_path / "a.py") == []


def test_renames_take_identifiers_only(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ALGORITHMS", tmp_path)
    (tmp_path / "a.py").write_text("batch_size = 512  # paper\n")
    with pytest.raises(AssertionError, match="identifiers only"):
        expected_copy("a.py", "batch_size", [("512  # paper", "256  # CORL")])
    assert expected_copy("a.py", "batch_size", [("batch_size", "vae_batch_size")]) == ["vae_batch_size = 512  # paper"]


if __name__ == "__main__":
    if "--fix" in sys.argv:
        fix()
    else:
        sys.exit(pytest.main([__file__, "-q"]))
