"""Benchmarks and scripts run from any clone: no path of one machine, nothing outside the
repository but the user's caches."""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("benchmarks", "scripts")
# Host roots a path of one machine starts with; container mount points (/data, /out) and
# the user's caches (found through TEMPLATEFLOW_HOME, NILEARN_DATA, ~) are fine.
HOST_PATH = re.compile(r"(?<![\w.$}/-])/(work|home|Users|mnt|scratch|gpfs|lustre|nfs|shared|"
                       r"srv|media)/")
# Climbing out of the repository, e.g. "$here/../shared" or "parent.parent.parent".
ESCAPE = re.compile(r"\.\./|shared/data")


def code_lines(path: Path):
    """(number, line) of a script's code, comments left out (they hold usage examples
    with placeholder paths)."""
    comment = "#"
    in_docstring = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if path.suffix == ".py" and stripped.count('"""') % 2 == 1:
            in_docstring = not in_docstring
            continue
        if in_docstring or stripped.startswith(comment):
            continue
        yield number, line


def offending_lines() -> list:
    found = []
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*")):
            if not path.is_file() or "results" in path.parts or path.suffix in (".pyc", ".json"):
                continue
            for number, line in code_lines(path):
                if HOST_PATH.search(line) or ESCAPE.search(line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    return found


def test_no_machine_paths_in_benchmarks_or_scripts():
    assert offending_lines() == []


def test_the_check_finds_a_machine_path(tmp_path, monkeypatch):
    fake = tmp_path / "benchmarks"
    fake.mkdir()
    (fake / "bench_x.py").write_text('MASK = Path("/work/shared/data/tpl/mask.nii.gz")\n')
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "demo.sh").write_text('cp "$here/../shared/data/x" .\n'
                                                  '# BIDS_DIR=/home/me/bids (an example)\n')
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = offending_lines()
    assert [f.split(":")[0] for f in found] == ["benchmarks/bench_x.py", "scripts/demo.sh"]
