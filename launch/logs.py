"""Logging set-up shared by the launchers: stderr plus a log file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from absl import logging as absl_logging


def setup_logging(log_file: Path | None, *, primary: bool = True) -> logging.Logger:
    """Routes the 'stnjax' loggers to stderr and, on the primary process,
    to `log_file` (its folder is created). Returns the 'stnjax' logger."""
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    # A log write that fails (a full disk) must not print logging's own
    # traceback over the command's one-line error.
    logging.raiseExceptions = False
    fmt = logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S")
    logger = logging.getLogger("stnjax")
    logger.setLevel(logging.INFO if primary else logging.WARNING)
    logger.propagate = False
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if primary and log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger
