"""The project's style rules that a tool can check: `ruff check .` with ruff.toml (pyflakes, pycodestyle,
lines of at most 120 columns) over every Python file of the project."""
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(ROOT / ".venv" / "bin" / "ruff")
    if not shutil.which(ruff):
        pytest.fail("ruff is not installed: pip install -r requirements.txt")
    result = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_no_line_is_longer_than_120_columns_anywhere():
    """ruff covers Python; this covers the YAML, Markdown, shell and Dockerfile text too."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout
        pytest.skip("not a git checkout")
    texts = [name for name in tracked
             if (ROOT / name).suffix in (".py", ".yaml", ".md", ".sh", ".toml", "") and (ROOT / name).is_file()]
    long = [f"{name}:{i}" for name in texts
            for i, line in enumerate((ROOT / name).read_text(errors="ignore").splitlines(), 1) if len(line) > 120]
    assert not long, f"lines over 120 columns: {long[:20]}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
