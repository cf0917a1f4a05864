"""What every command in launch/ shares: its start, its flags, its logging and its error exit.

A launcher is then its flags and a `main` of a few lines:

  def main(argv):
      app.no_arguments(argv)
      log = app.setup(workdir / "train.log", cache_base=workdir)
      with app.exit_on_error(log):
          ...                      # library calls
  if __name__ == "__main__":
      app.run(main)

`run` starts the command the way every command starts: once with huge pages
(`launch/hugepages.py`), then absl's flag parsing, where a bad flag or
--config.FIELD override exits with one clear line. `exit_on_error` turns
the library's errors about the user's input and runs (`stnjax.checks`:
`InputError` and its kinds, `CheckpointError`, `TrainingDivergedError`)
into "error: <message>" and exit status 1, logged to the command's log file
too; Ctrl-C into a one-line message and exit status 130; anything else is
a bug and keeps its traceback. jax is imported only
after flag parsing (so --help is fast and multi-host start-up stays first).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

from absl import app as absl_app
from absl import flags

from launch import compile_cache, hugepages
from launch.logs import setup_logging

UsageError = absl_app.UsageError


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl flag parsing; a bad flag or --config.FIELD override exits with one
    clear line (ml_collections names the field and suggests the closest one)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {e}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        msg = " ".join(str(a) for a in e.args) if e.args else repr(e)
        msg = re.sub(r"\s+", " ", msg.replace("\\n", " ").replace("\\'", "").replace("'", ""))
        sys.exit(f"error: invalid --config override: {msg.strip()}")


def define_config(default: str | None = None):
    """The --config flag of a command: a Python config file (`get_config()`),
    locked so a misspelt --config.FIELD override is an error naming it.
    Returns the flag holder; its `.value` is read once, at the top of `main`,
    and turned into the library's typed specs there."""
    from ml_collections import config_flags
    return config_flags.DEFINE_config_file("config", default, "Python config file.",
                                           lock_config=True)


def run(main: Callable[[list[str]], None]) -> None:
    """Starts a command: huge pages (one re-execution), flags, then `main(argv)`."""
    hugepages.reexec_with_huge_pages()
    absl_app.run(main, flags_parser=parse_flags)


def no_arguments(argv: Sequence[str]) -> None:
    """A usage error when the command got positional arguments it does not take."""
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {list(argv[1:])}")


def setup(log_file: Path | None, *, cache_base: str | Path | None = None,
          primary: bool = True) -> logging.Logger:
    """Logging to stderr and `log_file` (None: stderr only), and the persistent
    compilation cache under `cache_base` (None: no cache). Returns the logger."""
    log = setup_logging(log_file, primary=primary)
    if cache_base is not None:
        compile_cache.enable(cache_base)
    return log


@contextlib.contextmanager
def exit_on_error(log: logging.Logger | None = None) -> Iterator[None]:
    """The library's input and run errors as "error: <message>", exit status 1."""
    from stnjax.checks import CheckpointError, InputError, TrainingDivergedError

    try:
        yield
    except (InputError, CheckpointError, TrainingDivergedError) as e:
        if log is not None:
            log.error("%s", e)  # into the log file as well
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        # The training loop's `finally` has let a checkpoint in flight finish
        # (or orbax abandoned it as a temporary folder, removed on resume).
        msg = "interrupted (Ctrl-C); rerunning the same command resumes where it stopped"
        if log is not None:
            log.error("%s", msg)
        print(f"error: {msg}", file=sys.stderr)
        raise SystemExit(130) from None
