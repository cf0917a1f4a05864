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
           "GLIBC_TUNABLES": "glibc.malloc.arena_max=4", "STNJAX_MALLOC": "glibc"}
    out = subprocess.run([sys.executable, str(script), "--x=1"], env=env, check=True,
                         capture_output=True, text=True).stdout.split("\n")
    assert out[:3] == ["start glibc.malloc.arena_max=4 ['--x=1']",
                       "start glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1 ['--x=1']",
                       "run"]


def test_tcmalloc_found_in_a_library_folder_unless_glibc_is_asked_for(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    assert hugepages.find_tcmalloc({}, (str(lib),)) is None
    (lib / "libtcmalloc_minimal.so.4").write_bytes(b"")
    found = str(lib / "libtcmalloc_minimal.so.4")
    assert hugepages.find_tcmalloc({}, (str(tmp_path / "none"), str(lib))) == found
    assert hugepages.find_tcmalloc({"STNJAX_MALLOC": "glibc"}, (str(lib),)) is None
    # Already preloaded (by the user or the first start): not twice.
    assert hugepages.find_tcmalloc({"LD_PRELOAD": found}, (str(lib),)) is None
    with pytest.raises(SystemExit, match="STNJAX_MALLOC='jemalloc'"):
        hugepages.find_tcmalloc({"STNJAX_MALLOC": "jemalloc"}, (str(lib),))


def test_settings_keep_the_users_own_preloads():
    env = hugepages.environment_with_settings({"LD_PRELOAD": "/x/libmine.so", "A": "1"},
                                              "/lib/libtcmalloc_minimal.so.4")
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4:/x/libmine.so"
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and env["A"] == "1"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    plain = hugepages.environment_with_settings({}, None)
    assert "LD_PRELOAD" not in plain and "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD" not in plain


def _repo_root():
    from pathlib import Path
    return Path(__file__).resolve().parents[1]


@pytest.mark.skipif(hugepages.find_tcmalloc({}) is None or not hugepages.wanted({}),
                    reason="no tcmalloc installed here (or no re-execution on this machine)")
def test_a_command_runs_jax_with_tcmalloc_preloaded(tmp_path):
    script = tmp_path / "tcmalloc_cmd.py"
    script.write_text(textwrap.dedent("""
        import os
        from launch import hugepages
        hugepages.reexec_with_huge_pages()
        import jax.numpy as jnp
        print(hugepages.allocator(), float(jnp.arange(4.0).sum()), flush=True)
    """))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(_repo_root()), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [hugepages.find_tcmalloc({}), "6.0"]
    assert "large alloc" not in out.stderr
