"""Transparent huge pages for XLA:CPU's buffers: every compute command runs with them.

Why (measured 2026-12-01, 2 CPU cores, jax 0.10.2, bench/RESULTS.md): XLA:CPU
allocates each step's large temporaries with malloc, and glibc serves
allocations above its mmap threshold (at most 32 MB) by fresh mappings that
it unmaps again on free. Every step then touches its gigabytes of temporaries
as new 4 KB pages: the full-width J step at 256 x 256 took 1.05 million page
faults and 2.5-3.2 s of kernel time per step, a quarter of its CPU time, and
its wall time varied by 30 % from step to step. With glibc's
`glibc.malloc.hugetlb=1` tunable malloc asks for transparent huge pages
(2 MB, `madvise`), and the same step took 4,500-9,400 faults, 0.7 s of kernel
time and 4.4-4.9 s instead of 5.6-6.9 s. The results are the same bits (only
the memory's page size changes).

glibc reads its tunables when a process starts, so `reexec_with_huge_pages`
starts the command again, once, with the tunable added to GLIBC_TUNABLES
(before anything else runs: call it first under `if __name__ == "__main__"`).
It does nothing where it cannot help or is not wanted: not Linux,
transparent huge pages set to "never", the tunable already set (by the user
or by the first start), or STNJAX_HUGE_PAGES=0 in the environment. A glibc
older than 2.35 ignores the unknown tunable: the command then runs as before.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "STNJAX_HUGE_PAGES"
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def wanted(environ: dict[str, str] | None = None, thp_file: Path = _THP,
           platform: str = sys.platform) -> bool:
    """Whether a start should re-execute with the tunable (see the module doc)."""
    env = os.environ if environ is None else environ
    if platform != "linux" or env.get(OPT_OUT, "1") == "0":
        return False
    if "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mode = thp_file.read_text()
    except OSError:
        return False
    return "[never]" not in mode


def tunables_with_huge_pages(current: str) -> str:
    """GLIBC_TUNABLES with the tunable appended (colon-separated, glibc's syntax)."""
    return ":".join(t for t in (current, TUNABLE) if t)


def reexec_with_huge_pages() -> None:
    """Replaces this process by the same command with huge pages, when `wanted`.

    Uses `sys.orig_argv` (the interpreter's own command line, `-m module`
    included), so the new start runs exactly what the user typed.
    """
    if not wanted():
        return
    env = dict(os.environ, GLIBC_TUNABLES=tunables_with_huge_pages(
        os.environ.get("GLIBC_TUNABLES", "")))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)

