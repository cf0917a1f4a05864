"""launch/hugepages.py: when a command re-executes itself with huge pages, and that it does so once."""

import subprocess
import sys
import textwrap

import pytest

from launch import hugepages


def test_wanted_rules(tmp_path):
    thp = tmp_path / "enabled"
    thp.write_text("always [madvise] never\n")
    assert hugepages.wanted({}, thp, "linux")
    assert not hugepages.wanted({}, thp, "darwin")
    assert not hugepages.wanted({"STNJAX_HUGE_PAGES": "0"}, thp, "linux")
    assert not hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, thp, "linux")
    assert hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp, "linux")
    thp.write_text("always madvise [never]\n")
    assert not hugepages.wanted({}, thp, "linux")
    assert not hugepages.wanted({}, tmp_path / "missing", "linux")


def test_tunables_keep_the_users_own():
    assert hugepages.tunables_with_huge_pages("") == "glibc.malloc.hugetlb=1"
    assert (hugepages.tunables_with_huge_pages("glibc.malloc.arena_max=2")
            == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")


@pytest.mark.skipif(not hugepages.wanted(dict(GLIBC_TUNABLES="")),
                    reason="this machine would not re-execute (not Linux or THP off)")
def test_a_command_restarts_once_with_the_tunable(tmp_path):
    script = tmp_path / "cmd.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        print("start", os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:], flush=True)
        from launch import hugepages
        hugepages.reexec_with_huge_pages()
        print("run", flush=True)
    """))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(_repo_root()),
           "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}
    out = subprocess.run([sys.executable, str(script), "--x=1"], env=env, check=True,
                         capture_output=True, text=True).stdout.split("\n")
    assert out[:3] == ["start glibc.malloc.arena_max=4 ['--x=1']",
                       "start glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1 ['--x=1']",
                       "run"]


def _repo_root():
    from pathlib import Path
    return Path(__file__).resolve().parents[1]
