"""Fault injection for command-line tests: run a `launch.*` command in a
subprocess whose file writes under a folder fail with a chosen OS error.

`run_failing(module, args, prefix=..., errno_=..., name_part=...)`: every
open for writing, `os.open` with a write flag and `mkdir` of a path under
`prefix` whose file name contains `name_part` raises OSError(errno_) in the
command's process, as a read-only file system (EROFS) or a full disk
(ENOSPC) would. Reads are untouched. Huge pages are off (their re-exec
would start a process without the patches).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DRIVER = r"""
import builtins, io, os, runpy, sys
prefix, name_part, code, module = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sys.argv = [module] + sys.argv[5:]

def _bad(path, writing):
    if not writing or not isinstance(path, (str, bytes, os.PathLike)):
        return False
    p = os.path.abspath(os.fsdecode(path))
    return p.startswith(prefix) and name_part in os.path.basename(p)

def _fail(path):
    raise OSError(code, os.strerror(code), os.fsdecode(path))

_open = builtins.open
def open_(file, mode="r", *a, **k):
    if _bad(file, any(c in mode for c in "wax+")):
        _fail(file)
    return _open(file, mode, *a, **k)
builtins.open = io.open = open_

_os_open = os.open
def os_open(path, flags, *a, **k):
    if _bad(path, flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
        _fail(path)
    return _os_open(path, flags, *a, **k)
os.open = os_open

_mkdir = os.mkdir
def mkdir(path, *a, **k):
    if _bad(path, True):
        _fail(path)
    return _mkdir(path, *a, **k)
os.mkdir = mkdir

runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def command_env(**extra: str) -> dict[str, str]:
    """The environment of a command under test: CPU, no huge-pages re-exec."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", STNJAX_HUGE_PAGES="0")
    env.update(extra)
    return env


def run_failing(module: str, args: list[str], *, prefix: str | os.PathLike, errno_: int,
                name_part: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `python -m module args` with writes under `prefix` failing (see above)."""
    cmd = [sys.executable, "-c", DRIVER, str(Path(prefix).resolve()), name_part, str(errno_),
           module, *args]
    return subprocess.run(cmd, cwd=ROOT, env=command_env(), capture_output=True, text=True,
                          timeout=timeout)


def run_command(module: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `python -m module args` as a user would (CPU, no huge pages)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=command_env(),
                          capture_output=True, text=True, timeout=timeout)
