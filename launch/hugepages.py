"""Memory settings for XLA:CPU's buffers: every compute command runs with them.

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

Huge pages make the faults few, but every step still gets fresh mappings,
which the kernel zeroes before handing them out (2026-12-07: `perf` put 38 %
of a benchmark's cycles in `clear_page_erms`; the J step maps about 3.5 GB a
step, its 2.4 GB temporary buffer included, and spent 0.8-1.3 s of kernel time
on it). An allocator that keeps freed memory for the next request avoids
that: with gperftools' tcmalloc (`libtcmalloc_minimal.so.4`, Debian/Ubuntu
package `libtcmalloc-minimal4`) preloaded, the same step spent 0.04 s in the
kernel. glibc cannot be told to keep such blocks (its mmap threshold stops at
32 MB), so where tcmalloc is installed the command runs with it (found in the
usual library folders; STNJAX_MALLOC=glibc keeps glibc); elsewhere with
glibc and huge pages as before. Neither changes a result.

glibc reads its tunables, and the dynamic loader LD_PRELOAD, when a process
starts, so `reexec_with_huge_pages` starts the command again, once, with the
settings added (before anything else runs: call it first under
`if __name__ == "__main__"`). It does nothing where it cannot help or is not
wanted: not Linux, transparent huge pages set to "never", the tunable already
set (by the user or by the first start), or STNJAX_HUGE_PAGES=0 in the
environment. A glibc older than 2.35 ignores the unknown tunable: the command
then runs as before.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "STNJAX_HUGE_PAGES"
MALLOC = "STNJAX_MALLOC"  # "auto" (tcmalloc where installed, the default) or "glibc"
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
             "/usr/lib", "/usr/local/lib")
# tcmalloc prints a line for every allocation above 1 GB by default; XLA's
# temporary buffer of a full-width step is 2.4 GB, every step.
_QUIET_LARGE_ALLOCS = ("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))


def wanted(environ: dict[str, str] | None = None, thp_file: Path = _THP,
           platform: str = sys.platform) -> bool:
    """Whether a start should re-execute with the settings (see the module doc)."""
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


def find_tcmalloc(environ: dict[str, str] | None = None,
                  lib_dirs: tuple[str, ...] = _LIB_DIRS) -> str | None:
    """The path of an installed tcmalloc to preload, or None (none found,
    STNJAX_MALLOC=glibc, or tcmalloc already in LD_PRELOAD)."""
    env = os.environ if environ is None else environ
    choice = env.get(MALLOC, "auto")
    if choice not in ("auto", "glibc"):
        raise SystemExit(f"error: {MALLOC}={choice!r}: expected 'auto' or 'glibc'")
    if choice == "glibc" or "tcmalloc" in env.get("LD_PRELOAD", ""):
        return None
    for d in lib_dirs:
        for name in _TCMALLOC_NAMES:
            path = os.path.join(d, name)
            if os.path.isfile(path):
                return path
    return None


def environment_with_settings(environ: dict[str, str], tcmalloc: str | None) -> dict[str, str]:
    """`environ` plus the huge-pages tunable and, given a tcmalloc path, its preload."""
    env = dict(environ, GLIBC_TUNABLES=tunables_with_huge_pages(environ.get("GLIBC_TUNABLES", "")))
    if tcmalloc:
        env["LD_PRELOAD"] = ":".join(p for p in (tcmalloc, environ.get("LD_PRELOAD", "")) if p)
        env.setdefault(*_QUIET_LARGE_ALLOCS)
    return env


def allocator() -> str:
    """The allocator this process runs with, for versions.json: the preloaded
    tcmalloc's path or "glibc"."""
    pre = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if "tcmalloc" in p]
    return pre[0] if pre else "glibc"


def reexec_with_huge_pages() -> None:
    """Replaces this process by the same command with the memory settings, when `wanted`.

    Uses `sys.orig_argv` (the interpreter's own command line, `-m module`
    included), so the new start runs exactly what the user typed.
    """
    if not wanted():
        return
    env = environment_with_settings(dict(os.environ), find_tcmalloc())
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
