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
`InputError` and its kinds, `CheckpointError`, `TrainingDivergedError`,
`HostLostError`)
into "error: <message>" and exit status 1, logged to the command's log file
too; an operating-system error (a read-only or full disk, a path that is a
file) into "error: <file>: <reason>; <what to do>", its traceback into the
log file only (on stderr too with --verbosity=1); Ctrl-C into a one-line
message and exit status 130; anything else is a bug and keeps its
traceback. A --config file that is missing, not Python or has no
`get_config()` is one line at flag parsing. jax is imported only
after flag parsing (so --help is fast and multi-host start-up stays first).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import sys
import traceback
from pathlib import Path
from typing import Callable, Iterator, Sequence

from absl import app as absl_app
from absl import flags

from . import compile_cache, hugepages, logs
from .logs import setup_logging

UsageError = absl_app.UsageError


_VERBOSE = {"tracebacks": False}  # --verbosity >= 1 as the user gave it
_COMMAND = {"module": "__main__"}  # the launcher module `run` started (its doc and flags)


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of --name=V or --name V on the command line, or None."""
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _config_file(argv: Sequence[str]) -> str | None:
    """The file of --config FILE[:ARGS] on the command line, or None."""
    value = _flag_value(argv, "config")
    return None if value is None else value.split(":", 1)[0]


_CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
_NOT_CONFIGS = {"__init__", "common", "stored"}


def builtin_configs() -> list[str]:
    """Names of the built-in configs (launch/configs/<name>.py)."""
    return sorted(p.stem for p in _CONFIGS_DIR.glob("*.py") if p.stem not in _NOT_CONFIGS)


def _with_builtin_config(argv: Sequence[str]) -> list[str]:
    """argv with --config=NAME[:ARGS] of a built-in config replaced by its
    file; a bare name that is neither a file nor a built-in config exits
    with one line listing the known names."""
    argv = list(argv)
    value = _flag_value(argv, "config")
    if value is None:
        return argv
    name, sep, rest = value.partition(":")
    if "/" in name or name.endswith(".py") or Path(name).exists():
        return argv
    if name not in builtin_configs():
        sys.exit(f"error: --config {name}: not a file and not a built-in config "
                 f"(built-in: {', '.join(builtin_configs())}; or give a path)")
    path = f"{_CONFIGS_DIR / (name + '.py')}{sep}{rest}"
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            argv[i] = f"--config={path}"
        elif a == "--config" and i + 1 < len(argv):
            argv[i + 1] = path
    return argv


def _check_config_file(argv: Sequence[str]) -> None:
    """A --config file that is missing, unreadable or not Python: one line naming it."""
    path = _config_file(argv)
    if path is None:
        return
    if not Path(path).is_file():
        sys.exit(f"error: --config {path}: no such file")
    try:
        compile(Path(path).read_bytes(), path, "exec")
    except OSError as e:
        sys.exit(f"error: --config {path}: cannot read it ({e.strerror or e})")
    except (SyntaxError, ValueError) as e:
        where = f" at line {e.lineno}" if getattr(e, "lineno", None) else ""
        sys.exit(f"error: --config {path}: not valid Python{where} ({getattr(e, 'msg', e)})")


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl flag parsing; a bad flag or --config.FIELD override exits with one
    clear line (ml_collections names the field and suggests the closest one),
    and so does a --config file that is missing, not Python or has no
    `get_config()`."""
    argv = _with_builtin_config(argv)
    if any(a in ("--help", "-h", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
        print_help(argv)
        sys.exit(0)
    if "--version" in argv[1:]:
        print(version_line())
        sys.exit(0)
    argv = _with_stored_config(argv)
    _check_config_file(argv)
    try:
        rest = flags.FLAGS(argv)
        given = flags.FLAGS["verbosity"].present
        _VERBOSE["tracebacks"] = given and flags.FLAGS.verbosity >= 1
        logs.set_verbosity(flags.FLAGS.verbosity if given else None)  # before jax starts
        return rest
    except flags.Error as e:
        sys.exit(f"error: {e}")
    except AttributeError as e:
        if "get_config" in str(e):
            sys.exit(f"error: --config {_config_file(argv)}: defines no get_config()")
        sys.exit(f"error: invalid --config override: {_one_line(e)}")
    except (KeyError, TypeError, ValueError) as e:
        sys.exit(f"error: invalid --config override: {_one_line(e)}")


def version_line() -> str:
    """`--version`: stnjax's version and those of the packages results depend
    on, from the installed metadata (no backend is started)."""
    import importlib.metadata

    import stnjax

    def ver(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    from stnjax import buildinfo

    deps = ", ".join(f"{p} {ver(p)}" for p in ("jax", "jaxlib", "flax", "optax",
                                                "orbax-checkpoint", "numpy"))
    commit = buildinfo.commit() or "unknown"
    return (f"stnjax {stnjax.__version__} (commit {commit}; python {sys.version.split()[0]}; "
            f"{deps})")


def print_help(argv: Sequence[str]) -> None:
    """--help: the command's docstring, its flags, and, when it takes a
    --config, every config field with its value in the given (or default)
    config file, as `--config.FIELD=VALUE` lines."""
    module = sys.modules[_COMMAND["module"]]
    doc = (module.__doc__ or "").strip()
    print(doc + "\n" if doc else "", end="")
    # absl files a flag under the defining module's name, or under argv[0]
    # when that module is __main__ (python -m launch.X).
    key = sys.argv[0] if module.__name__ == "__main__" else module.__name__
    print("\nflags:\n" + flags.FLAGS.module_help(key))
    if "config" not in flags.FLAGS:
        return
    default = flags.FLAGS["config"].default_as_str
    path = _config_file(argv) or (str(default).strip("'\"") if default else "")
    if not path or path == "None":
        print("\n--config.FIELD overrides: give --config=FILE --help to list them")
        return
    _check_config_file([argv[0], f"--config={path}"])
    import importlib.util
    spec = importlib.util.spec_from_file_location("help_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(f"\nconfig fields of {path} (override any with --config.FIELD=VALUE):")
    for key, value in _flatten(module.get_config().to_dict()):
        print(f"  --config.{key}={value!r}")


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(a) for a in e.args) if e.args else repr(e)
    msg = re.sub(r"\s+", " ", msg.replace("\\n", " ").replace("\\'", "").replace("'", ""))
    return msg.strip()


_STORED = {"default": False}  # --config defaults to the workdir's stored config


def define_config(default: str | None = None, *, stored_default: bool = False):
    """The --config flag of a command: a Python config file (`get_config()`),
    locked so a misspelt --config.FIELD override is an error naming it.
    `stored_default`: without --config, the config stored in --workdir
    (`launch/configs/stored.py`), overrides included. Returns the flag
    holder; its `.value` is read once, at the top of `main`, and turned into
    the library's typed specs there."""
    from ml_collections import config_flags
    _STORED["default"] = stored_default
    help_ = "Python config file." + (" Default: the config stored in --workdir."
                                     if stored_default else "")
    return config_flags.DEFINE_config_file("config", default, help_, lock_config=True)


def _with_stored_config(argv: Sequence[str]) -> list[str]:
    """argv with --config=<stored.py>:<workdir> when the command defaults to
    the workdir's stored config and no --config was given."""
    argv = list(argv)
    if not _STORED["default"] or _config_file(argv) is not None:
        return argv
    workdir = _flag_value(argv, "workdir")
    if workdir is None:
        return argv  # the required-flag check names --config
    if not (Path(workdir) / "config.json").is_file():
        sys.exit(f"error: --config not given and {Path(workdir) / 'config.json'} does not exist "
                 "(not a training workdir?); give --config=FILE")
    stored = Path(__file__).resolve().parent / "configs" / "stored.py"
    return argv[:1] + [f"--config={stored}:{workdir}"] + argv[1:]


def run(main: Callable[[list[str]], None]) -> None:
    """Starts a command: huge pages (one re-execution), flags, then `main(argv)`.
    An operating-system error (read-only or full disk, a missing folder)
    outside `exit_on_error`, in the set-up of logging for example, is one line too."""
    hugepages.reexec_with_huge_pages()
    _COMMAND["module"] = main.__module__

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except OSError as e:
            _print_traceback_if_verbose()
            raise SystemExit(f"error: {os_error_message(e)}") from None
    absl_app.run(guarded, flags_parser=parse_flags)


def os_error_message(e: OSError) -> str:
    """One line for an OSError that names the file: "<file>: <reason>", plus
    what to do for a full or read-only disk."""
    reason = e.strerror or str(e)
    text = f"{e.filename}: {reason}" if e.filename else reason
    if e.errno in (errno.EEXIST, errno.ENOTDIR) and e.filename:
        # A folder was needed where a file is: name the file.
        blocker = next((p for p in (Path(e.filename), *Path(e.filename).parents)
                        if p.is_file()), None)
        if blocker is not None:
            text = f"{blocker}: is a file, not a folder"
            if blocker != Path(e.filename):
                text += f" (needed for {e.filename})"
    if e.filename2:
        text += f" (-> {e.filename2})"
    full = "free space there and rerun the same command: it resumes where it stopped"
    hint = {errno.ENOSPC: full, errno.EDQUOT: full,
            errno.EROFS: "the file system is read-only; choose a writable folder",
            errno.EACCES: "no permission; choose a folder you can write",
            errno.EPERM: "no permission; choose a folder you can write"}.get(e.errno)
    return f"{text}; {hint}" if hint else text


def _print_traceback_if_verbose() -> None:
    if _VERBOSE["tracebacks"]:
        traceback.print_exc()


def _log_traceback(log: logging.Logger | None) -> None:
    """The current exception's traceback into the log's files only (stderr
    gets it with --verbosity=1)."""
    if log is None:
        return
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "traceback of the error above",
                            (), sys.exc_info())
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def no_arguments(argv: Sequence[str]) -> None:
    """A usage error when the command got positional arguments it does not take."""
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {list(argv[1:])}")


class HostFlags:
    """The multi-host flags of a command (`define_host_flags`)."""

    def __init__(self):
        self.multihost = flags.DEFINE_bool("multihost", False,
                                           "Call jax.distributed.initialize().")
        self.coordinator = flags.DEFINE_string(
            "coordinator", "", "Multi-host without cluster auto-detection: host:port of "
            "process 0 (with --num_processes, --process_id).")
        self.num_processes = flags.DEFINE_integer("num_processes", None,
                                                  "Multi-host: number of processes.")
        self.process_id = flags.DEFINE_integer("process_id", None,
                                               "Multi-host: this process's index.")
        self.host_timeout = flags.DEFINE_integer(
            "host_timeout", None, "Multi-host: seconds without a sign of life after which a "
            "process counts as lost. evaluate and segment (default 60) then stop on every "
            "other host with an error naming it; train (default: jax.distributed's heartbeat "
            "timeout, 100) ends on every host.", lower_bound=1)

    def start(self, config_multihost: bool = False, *, recoverable: bool = False) -> None:
        """jax.distributed.initialize() when --multihost, --coordinator or
        `config_multihost` asks for it (TPU pods, SLURM, Open MPI detected);
        before anything touches the devices. `recoverable` (evaluate,
        segment): a lost process does not end the others through jax; they
        notice it themselves (`stnjax.eval.hostlink`) and stop cleanly."""
        from stnjax.eval import hostlink
        from stnjax.train.loop import initialize_distributed
        multihost = config_multihost or self.multihost.value or bool(self.coordinator.value)
        timeout = self.host_timeout.value
        if recoverable:
            timeout = timeout or hostlink.DEFAULT_TIMEOUT_S
        initialize_distributed(multihost, coordinator=self.coordinator.value,
                               num_processes=self.num_processes.value,
                               process_id=self.process_id.value,
                               heartbeat_timeout_s=(hostlink.jax_heartbeat_timeout(timeout)
                                                    if recoverable else timeout),
                               recoverable=recoverable)
        if multihost and recoverable:
            hostlink.start(timeout)


def define_host_flags() -> HostFlags:
    """--multihost, --coordinator, --num_processes, --process_id and
    --host_timeout, the same on train, evaluate and segment; `.start()` sets
    up jax.distributed."""
    return HostFlags()


def is_primary() -> bool:
    """Whether this is process 0 (the one that logs to files and prints)."""
    import jax
    return jax.process_index() == 0


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
    from stnjax.checks import CheckpointError, HostLostError, InputError, TrainingDivergedError

    try:
        yield
    except (InputError, CheckpointError, TrainingDivergedError, HostLostError) as e:
        if log is not None:
            log.error("%s", e)  # into the log file as well
        raise SystemExit(f"error: {e}") from None
    except OSError as e:  # the disk or the file system, not the user's input
        msg = os_error_message(e)
        if log is not None:
            with contextlib.suppress(OSError):  # the log itself may be on the full disk
                log.error("%s", msg)
                _log_traceback(log)
        _print_traceback_if_verbose()
        raise SystemExit(f"error: {msg}") from None
    except KeyboardInterrupt:
        # The training loop's `finally` has let a checkpoint in flight finish
        # (or orbax abandoned it as a temporary folder, removed on resume).
        msg = "interrupted (Ctrl-C); rerunning the same command resumes where it stopped"
        if log is not None:
            log.error("%s", msg)
        print(f"error: {msg}", file=sys.stderr)
        raise SystemExit(130) from None
