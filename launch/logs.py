"""Logging set-up shared by the launchers: stderr plus a log file, and --verbosity.

At the default verbosity the command's own lines ('stnjax' logger: progress,
ETAs, warnings) are shown and the libraries' (absl, jax, orbax: backend
probing, every checkpoint save) only from WARNING up. `--verbosity=N`, when
given, sets both: -1 only warnings and errors, 0 the libraries' INFO lines
too, 1 and up DEBUG (and tracebacks of one-line errors, launch/app.py).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from absl import logging as absl_logging
from absl.logging import converter

_GIVEN: dict[str, int | None] = {"verbosity": None}  # --verbosity as given, None: not given


_FORMAT = logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S")


def set_verbosity(verbosity: int | None) -> None:
    """Applies --verbosity (absl's scale; None: not given) now, at flag
    parsing, before any backend starts: to the libraries' loggers, and to the
    command's own, which prints to stderr from here on (lines logged before
    `setup_logging`, e.g. the multi-host start, included)."""
    _GIVEN["verbosity"] = verbosity
    absl_logging.set_verbosity(absl_logging.WARNING if verbosity is None else verbosity)
    logger = logging.getLogger("stnjax")
    logger.setLevel(command_level())
    logger.propagate = False
    _add_stderr_handler(logger)


def _add_stderr_handler(logger: logging.Logger) -> None:
    """A stderr handler on `logger`, unless it has one of ours already."""
    if not any(getattr(h, "stnjax_stderr", False) for h in logger.handlers):
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(_FORMAT)
        stream.stnjax_stderr = True
        logger.addHandler(stream)


def command_level() -> int:
    """The level of the command's own 'stnjax' lines (INFO unless --verbosity says)."""
    given = _GIVEN["verbosity"]
    return logging.INFO if given is None else converter.absl_to_standard(given)


def setup_logging(log_file: Path | None, *, primary: bool = True) -> logging.Logger:
    """Routes the 'stnjax' loggers to stderr and, on the primary process,
    to `log_file` (its folder is created). Returns the 'stnjax' logger."""
    set_verbosity(_GIVEN["verbosity"])  # orbax logs every save at INFO: off by default
    # A log write that fails (a full disk) must not print logging's own
    # traceback over the command's one-line error.
    logging.raiseExceptions = False
    logger = logging.getLogger("stnjax")
    level = command_level()
    logger.setLevel(level if primary else max(level, logging.WARNING))
    logger.propagate = False
    _add_stderr_handler(logger)
    if primary and log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(_FORMAT)
        logger.addHandler(handler)
    return logger
