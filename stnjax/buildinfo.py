"""Which source a running stnjax came from: the git commit, when known.

An installed wheel carries the commit it was built from in `COMMIT_FILE`
(written by setup.py at build time, from the checkout being built); a
checkout (an editable install, `python -m launch.X` from the repository)
asks git. Neither known (an sdist, no git): None. Standard library only, so
setup.py can load this file on its own.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

COMMIT_FILE = "_commit.txt"
_HERE = Path(__file__).resolve().parent


def git_commit(folder: str | Path) -> str | None:
    """`git describe --always --dirty` of the checkout holding `folder`
    (a 12-digit hash, "-dirty" when files differ from it), or None."""
    try:
        res = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"],
                             cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    return res.stdout.strip() or None


def commit() -> str | None:
    """The commit this stnjax was built from (the wheel's record), or that of
    the checkout it runs from, or None."""
    recorded = _HERE / COMMIT_FILE
    if recorded.is_file():
        return recorded.read_text().strip() or None
    if (_HERE.parent / ".git").exists():  # a checkout, not site-packages
        return git_commit(_HERE.parent)
    return None
