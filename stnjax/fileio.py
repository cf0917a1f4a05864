"""Atomic file writes: every result file is either complete or absent.

A writer puts its bytes into a temporary file in the target's own folder (the
same file system, so the rename is atomic), flushes them to disk and renames
the file over the target with `os.replace`. On any error the temporary is
removed, folders this call created are removed again, and an existing target
stays as it was.

Temporaries are created with mode 0o666 under the process umask, so a written
file has the permissions of any other new file (0o644 under the usual umask
022). `tempfile.mkstemp` / `mkdtemp` would make them private (0o600 / 0o700),
which datasets, predictions and results shared with others must not be.
Temporary names are hidden: `.<target name>.<random hex><suffix>`.

API:
  atomic_write_bytes(path, data)    one file from bytes
  atomic_write_text(path, text)     one file from text (UTF-8)
  atomic_write_figure(fig, path)    a Matplotlib figure as PNG
  atomic_write(files, who)          several files, renamed only when all are written
  atomic_path(path, suffix=...)     a temporary path for writers that want a file name
  make_temp_dir(path)               a hidden new folder next to `path` (build, then rename)
  remove_stale_temps(folder)        the temporary files a killed writer left under `folder`
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
from pathlib import Path
from typing import Iterator, Mapping

_TRIES = 100  # random names tried before giving up (a clash is ~1 in 4e9)


_TOKEN_BYTES = 4  # random bytes of a temporary name (hex: twice as many digits)


def _temp_name(target: Path, suffix: str) -> Path:
    return target.parent / f".{target.name}.{secrets.token_hex(_TOKEN_BYTES)}{suffix}"


def _create(target: Path, suffix: str, make) -> Path:
    """Calls make(candidate) on fresh hidden names next to `target` until one
    does not exist yet; returns it."""
    for _ in range(_TRIES):
        tmp = _temp_name(target, suffix)
        try:
            make(tmp)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, f"no free temporary name next to {target}")


def _create_file(tmp: Path) -> None:
    # O_EXCL: never open an existing file (or follow a planted link); the mode
    # 0o666 is reduced by the umask, as for any file the process creates.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    os.close(os.open(tmp, flags, 0o666))


def make_temp_dir(path: str | os.PathLike) -> Path:
    """Creates a new empty folder with a hidden unique name next to `path`
    (in the same folder, mode 0o777 under the umask) and returns it. Build a
    folder's contents there, then `os.replace` it into place."""
    path = Path(path)
    return _create(path, "", lambda p: os.mkdir(p, 0o777))


def _make_parents(target: Path) -> list[Path]:
    """Creates the missing folders above `target`; returns them, deepest first."""
    missing = [p for p in target.parents if not p.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except BaseException:
        _remove_empty(missing)
        raise
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for d in folders:  # deepest first; only while still empty
        try:
            d.rmdir()
        except OSError:
            pass


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_path(path: str | os.PathLike, suffix: str, sync: bool) -> Iterator[Path]:
    target = Path(path)
    created = _make_parents(target)
    try:
        tmp = _create(target, suffix, _create_file)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield tmp
        if sync:
            _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _remove_empty(created)
        raise


def atomic_path(path: str | os.PathLike, *,
                suffix: str = ".tmp") -> contextlib.AbstractContextManager[Path]:
    """A temporary file for writers that want a file name (nibabel, np.save).

    Usage: `with atomic_path(out, suffix=".nii.gz") as tmp: nib.save(img, tmp)`.
    Yields the Path of a new, empty file next to `path` whose name ends in
    `suffix` (nibabel picks the format from it). When the block ends without
    an error the file is flushed to disk and renamed to `path`; on an error
    it is removed and `path` is untouched. Missing parent folders are
    created (and removed again on an error). Raises OSError from creating
    the temporary before the block runs.
    """
    return _atomic_path(path, suffix, True)


def atomic_write(files: Mapping[str | os.PathLike, str | bytes], who: str = "write") -> None:
    """Writes several files so that each is either complete or absent.

    All contents (str as UTF-8, or bytes) go to temporary files next to their
    targets first; only when every one is written and flushed are they
    renamed into place, so a failure while writing leaves no new file (a
    failing rename, rarer, can leave the earlier ones renamed). On any error
    the temporaries and the folders this call created are removed.

    Args:
      files: {target path: contents}.
      who: names the caller in errors.

    Raises:
      OSError "<who>: cannot write <target>: <reason>" when a file cannot be
      created or written.
    """
    with contextlib.ExitStack() as stack:
        # The contexts exit in reverse order: all writes happen before the
        # first rename, and an error unwinds every temporary.
        for target, data in files.items():
            target = Path(target)
            try:
                tmp = stack.enter_context(_atomic_path(target, ".tmp", False))
                with open(tmp, "wb") as f:
                    f.write(data.encode("utf-8") if isinstance(data, str) else data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise OSError(f"{who}: cannot write {target}: {e.strerror or e}") from e


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically (see `atomic_write`)."""
    atomic_write({path: bytes(data)}, "atomic_write_bytes")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically (see `atomic_write`)."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text: expected str for {path}, got {type(text).__name__}")
    atomic_write({path: text}, "atomic_write_text")


def atomic_write_figure(fig, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """A Matplotlib `Figure` rendered with the Agg canvas into memory (no
    pyplot, no display), then written atomically as PNG; returns the path."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    path = Path(path)
    atomic_write({path: buf.getvalue()}, f"plot {path.name}")
    return path


_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{%d}(\.[A-Za-z0-9.]+)?$" % (2 * _TOKEN_BYTES))


def remove_stale_temps(folder: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Removes the temporary files `atomic_path` and `atomic_write` leave
    next to their targets when a process is killed mid-write (hidden names
    `.<target>.<8 hex digits><suffix>`), in `folder` (and, `recursive`, its
    subfolders); returns the removed paths. Call it only where no writer of this folder
    can be running (a run's process 0 before its start barrier): a live
    writer's temporary file would go too."""
    removed = []
    root = Path(folder)
    found = (root.rglob(".*") if recursive else root.glob(".*")) if root.is_dir() else ()
    for f in sorted(found):
        if f.is_file() and _TEMP_NAME.match(f.name):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
                removed.append(f)
    return removed


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike) -> Iterator[Path]:
    """A hidden temporary folder next to `folder`'s files: write a set of
    result files there; when the block ends without error they are moved
    into `folder` (renames on one file system: they need no space and
    replace existing files of the same names); on an error none is moved,
    `folder` is as it was, and the temporary folder is removed.

    For result sets that must appear together or not at all (a summary, its
    sweep table and plots): a full disk fails while writing into the stage,
    never halfway through `folder`. Yields the staging folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stage = make_temp_dir(folder / ".staged")
    try:
        yield stage
        for f in sorted(stage.iterdir()):
            os.replace(f, folder / f.name)
    finally:
        for f in stage.iterdir() if stage.exists() else ():
            with contextlib.suppress(OSError):
                f.unlink()
        with contextlib.suppress(OSError):
            stage.rmdir()


def read_json(path: str | os.PathLike, what: str):
    """The JSON document in `path`, a state or result file this library
    wrote. Raises FileNotFoundError when it is missing and ValueError
    "<what> <path> is damaged (not valid JSON: ...)" when it was truncated
    or edited into something else (callers say what to do)."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{what} {path} is damaged (not valid JSON: {e})") from None
