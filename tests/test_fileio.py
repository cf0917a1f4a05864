"""Atomic writes (stnjax.fileio): complete-or-absent files, no temporaries
left behind, and the permissions of any new file under the umask."""

import contextlib
import os
import stat

import pytest

from stnjax import fileio

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def listing(root):
    """Every path below root, relative, sorted (hidden temporaries included)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@posix_only
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_new_files_follow_the_umask(tmp_path, mask):
    with umask(mask):
        fileio.atomic_write_text(tmp_path / "a.txt", "héllo\n")
        fileio.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
        with fileio.atomic_path(tmp_path / "c.npy", suffix=".npy") as tmp:
            tmp.write_bytes(b"c")
        folder = fileio.make_temp_dir(tmp_path / "d")
        plain = tmp_path / "plain.txt"   # what open() gives any new file
        plain.write_text("x")
    for name in ("a.txt", "b.bin", "c.npy"):
        assert mode_of(tmp_path / name) == mode_of(plain) == 0o666 & ~mask, name
    assert mode_of(folder) == 0o777 & ~mask
    assert folder.parent == tmp_path and folder.name.startswith(".d.")
    assert (tmp_path / "a.txt").read_bytes() == "héllo\n".encode("utf-8")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.npy").read_bytes() == b"c"


def test_replace_and_parent_folders(tmp_path):
    target = tmp_path / "x" / "y" / "f.json"
    fileio.atomic_write_text(target, "one")          # folders are created
    fileio.atomic_write_text(target, "two")          # an existing file is replaced
    assert target.read_text() == "two"
    assert listing(tmp_path) == ["x", "x/y", "x/y/f.json"]


def test_failing_writer_leaves_target_and_no_temporaries(tmp_path):
    target = tmp_path / "m.nii.gz"
    target.write_text("old")
    seen = []
    with pytest.raises(RuntimeError, match="disk"):
        with fileio.atomic_path(target, suffix=".nii.gz") as tmp:
            seen.append(tmp)
            assert tmp.parent == tmp_path and tmp.name.startswith(".m.nii.gz.")
            assert tmp.name.endswith(".nii.gz") and tmp.exists()
            tmp.write_text("partial")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert not seen[0].exists() and listing(tmp_path) == ["m.nii.gz"]
    # A failure in a new folder removes the folders this call created.
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(tmp_path / "new" / "deeper" / "f.txt"):
            raise RuntimeError("boom")
    assert listing(tmp_path) == ["m.nii.gz"]


def test_failing_temp_creation(tmp_path, monkeypatch):
    def refuse(path):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(fileio, "_create_file", refuse)
    with pytest.raises(PermissionError):
        with fileio.atomic_path(tmp_path / "sub" / "f.txt"):
            pytest.fail("the block must not run without a temporary")
    with pytest.raises(OSError, match=r"atomic_write_text: cannot write .*f\.txt"):
        fileio.atomic_write_text(tmp_path / "sub" / "f.txt", "x")
    assert listing(tmp_path) == []


def test_temp_names_never_reuse_an_existing_file(tmp_path, monkeypatch):
    names = iter(["aaaa", "aaaa", "bbbb"])
    monkeypatch.setattr(fileio.secrets, "token_hex", lambda n: next(names))
    squatter = tmp_path / ".f.txt.aaaa.tmp"
    squatter.write_text("someone else's")
    with fileio.atomic_path(tmp_path / "f.txt") as tmp:
        assert tmp.name == ".f.txt.bbbb.tmp"
        tmp.write_text("mine")
    assert squatter.read_text() == "someone else's" and (tmp_path / "f.txt").read_text() == "mine"


def test_multi_file_write_is_all_or_nothing(tmp_path):
    (tmp_path / "blocker").write_text("a file, not a folder")
    files = {tmp_path / "out" / "a.json": "{}", tmp_path / "blocker" / "b.csv": b"x"}
    with pytest.raises(OSError, match=r"report: cannot write .*blocker/b\.csv"):
        fileio.atomic_write(files, "report")
    # The first file was written to a temporary but never renamed into place.
    assert listing(tmp_path) == ["blocker"]
    good = {tmp_path / "out" / "a.json": "{}", tmp_path / "out" / "b.csv": b"x"}
    fileio.atomic_write(good, "report")
    assert listing(tmp_path) == ["blocker", "out", "out/a.json", "out/b.csv"]
    assert (tmp_path / "out" / "b.csv").read_bytes() == b"x"


def test_a_killed_writers_temporaries_are_removed_and_nothing_else(tmp_path):
    """A writer killed inside `atomic_path` leaves its hidden temporary; the
    start of an evaluation (process 0, before its barrier) removes it, and
    only files of that name form."""
    import subprocess
    import sys

    from stnjax.eval import runs
    from stnjax.eval.hosts import Hosts

    out = tmp_path / "eval" / "fold0"
    (out / "predictions").mkdir(parents=True)
    kill = ("import os, sys; from stnjax import fileio\n"
            "with fileio.atomic_path(sys.argv[1], suffix='.nii.gz') as tmp:\n"
            "    open(tmp, 'wb').write(b'half'); os._exit(9)\n")
    target = out / "predictions" / "case_1.nii.gz"
    r = subprocess.run([sys.executable, "-c", kill, str(target)], check=False)
    assert r.returncode == 9
    left = [p for p in (out / "predictions").iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".case_1.nii.gz.")  # the kill's leftover
    keep = [out / ".hidden_notes", out / "cases.json", out / ".cases.json.zz12ab34.tmp",
            out / "predictions" / "case_0.nii.gz"]
    for k in keep:
        k.write_text("mine")
    stale_top = out / ".cases.json.0123abcd.tmp"
    stale_top.write_text("half")
    assert fileio.remove_stale_temps(out, recursive=False) == [stale_top]
    assert left[0].exists()  # not recursive: the subfolder is untouched
    runs._start_records(Hosts(), out, {"name": "t"}, [], {})
    assert not left[0].exists() and not target.exists()
    assert all(k.exists() for k in keep if k.name != "cases.json")  # cases.json: no records
