"""launch/app.py: the error exit and the argument check every command shares."""

import logging

import pytest

from launch import app
from stnjax.checks import (CheckpointError, GeometryError, HostLostError, InputError,
                           TrainingDivergedError)


def _exit_code(raised, caplog):
    """The SystemExit code `exit_on_error` turns `raised` into (logged via caplog)."""
    log = logging.getLogger("stnjax.test_app")
    with caplog.at_level(logging.ERROR, logger="stnjax.test_app"):
        with pytest.raises(SystemExit) as exit_:
            with app.exit_on_error(log):
                raise raised
    return exit_.value.code


@pytest.mark.parametrize("error", [InputError("config.data.dir: no such folder /x"),
                                   GeometryError("a.nii.gz and b.nii.gz disagree"),
                                   CheckpointError("save failed in /w"),
                                   TrainingDivergedError("loss is nan at step 7"),
                                   HostLostError("process 1 on host h was lost")])
def test_library_errors_exit_with_one_line_and_are_logged(error, caplog):
    assert _exit_code(error, caplog) == f"error: {error}"  # printed to stderr, exit status 1
    assert [r.getMessage() for r in caplog.records] == [str(error)]


def test_bugs_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        with app.exit_on_error():
            1 / 0


def test_no_arguments():
    app.no_arguments(["launch.train"])
    with pytest.raises(app.UsageError, match=r"unexpected arguments: \['x.nii'\]"):
        app.no_arguments(["launch.train", "x.nii"])


def test_a_misspelt_override_is_one_line_naming_the_field(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "launch.train", "--config=launch/configs/phantom.py",
           f"--workdir={tmp_path / 'w'}", "--config.train.stagez=S:1"]
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "STNJAX_HUGE_PAGES": "0",
                              "PYTHONPATH": str(root)})
    assert res.returncode == 1
    assert res.stderr.startswith("error: invalid --config override") and "stagez" in res.stderr
    assert res.stderr.count("\n") == 1  # one line, no traceback
    assert not (tmp_path / "w").exists()  # nothing written


def test_ctrl_c_is_a_one_line_message_and_exit_130(caplog, capsys):
    assert _exit_code(KeyboardInterrupt, caplog) == 130
    assert "interrupted (Ctrl-C); rerunning the same command resumes" in capsys.readouterr().err
    assert "interrupted" in caplog.text


@pytest.mark.parametrize("err,want", [
    (OSError(28, "No space left on device", "/w/fold0/Z/metrics.jsonl"),
     "error: /w/fold0/Z/metrics.jsonl: No space left on device; free space there and rerun"),
    (OSError(30, "Read-only file system", "/ro/w"),
     "error: /ro/w: Read-only file system; the file system is read-only; choose a writable"),
])
def test_os_errors_are_one_line_and_the_traceback_goes_to_the_log_file(tmp_path, err, want,
                                                                       capsys):
    from launch.logs import setup_logging
    log = setup_logging(tmp_path / "cmd.log")
    try:
        with pytest.raises(SystemExit) as exit_:
            with app.exit_on_error(log):
                raise err
    finally:
        for h in list(log.handlers):
            log.removeHandler(h)
            h.close()
    assert str(exit_.value.code).startswith(want), exit_.value.code
    logged = (tmp_path / "cmd.log").read_text()
    assert "Traceback" in logged and err.strerror in logged
    assert "Traceback" not in capsys.readouterr().err  # stderr: the one line only


def test_a_path_that_is_a_file_is_named_as_such(tmp_path):
    (tmp_path / "f").write_text("x")
    try:
        (tmp_path / "f" / "sub").mkdir(parents=True)
    except OSError as e:
        assert app.os_error_message(e) == (f"{tmp_path / 'f'}: is a file, not a folder "
                                           f"(needed for {tmp_path / 'f' / 'sub'})")
    else:
        raise AssertionError("mkdir under a file succeeded")


def test_help_exits_0_and_lists_flags_and_config_fields(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {"PATH": "/usr/bin:/bin", "STNJAX_HUGE_PAGES": "0", "PYTHONPATH": str(root)}

    def help_of(*args):
        return subprocess.run([sys.executable, "-m", *args, "--help"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
    r = help_of("launch.main")  # its default config: the phantom one
    assert r.returncode == 0, r.stderr
    assert "The main job" in r.stdout and "--workdir" in r.stdout
    assert "--config.train.stages='S:600,I:600,J:600'" in r.stdout
    assert "--config.model.width=0.0625" in r.stdout
    r = help_of("launch.train", f"--config={root / 'launch/configs/smoke.py'}")
    assert r.returncode == 0 and "--config.train.stages='S:4,I:4,J:4'" in r.stdout, r.stderr
    r = help_of("launch.train")  # no default config: says how to list them
    assert r.returncode == 0 and "give --config=FILE --help" in r.stdout
    assert not list(tmp_path.iterdir())  # --help writes nothing


def test_version_exits_0_naming_stnjax_and_its_packages(tmp_path):
    import importlib.metadata
    import subprocess
    import sys
    from pathlib import Path

    import stnjax

    root = Path(__file__).resolve().parents[1]
    env = {"PATH": "/usr/bin:/bin", "STNJAX_HUGE_PAGES": "0", "PYTHONPATH": str(root)}
    for cmd in ("launch.evaluate", "launch.segment"):
        r = subprocess.run([sys.executable, "-m", cmd, "--version"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"stnjax {stnjax.__version__} (commit ")
        assert f"jax {importlib.metadata.version('jax')}," in r.stdout
    assert not list(tmp_path.iterdir())  # --version writes nothing


def test_builtin_config_by_name_and_unknown_name(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from launch import app as app_lib

    root = Path(__file__).resolve().parents[1]
    env = {"PATH": "/usr/bin:/bin", "STNJAX_HUGE_PAGES": "0", "PYTHONPATH": str(root)}
    assert {"phantom", "smoke", "nih_pancreas", "stagewise", "realct"} <= set(
        app_lib.builtin_configs())

    def run(*args):
        return subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
    r = run("--config=smoke", "--help")  # from another directory, by name
    assert r.returncode == 0 and "--config.train.stages='S:4,I:4,J:4'" in r.stdout, r.stderr
    r = run("--config=phantm", f"--workdir={tmp_path / 'w'}")
    assert r.returncode != 0
    assert "--config phantm: not a file and not a built-in config" in r.stderr
    assert "nih_pancreas, official_rstn, phantom, realct, smoke, stagewise" in r.stderr
    assert not (tmp_path / "w").exists()


def test_stored_config_takes_sequence_overrides(tmp_path):
    """A stored config (config.json: JSON lists) reads back with tuples, so a
    --config.FIELD='(a, b)' override of a sequence field parses as it does
    for a config file (it was refused: 'list is not supported')."""
    import json

    from launch.configs import smoke, stored

    (tmp_path / "config.json").write_text(json.dumps(smoke.get_config().to_dict()))
    c = stored.get_config(str(tmp_path))
    assert c.infer.volume_buckets == smoke.get_config().infer.volume_buckets
    assert isinstance(c.infer.volume_buckets, tuple) and isinstance(c.data.buckets, tuple)
    # Through the command: the override parses; the run then stops at the
    # missing checkpoints (not at the override).
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {"PATH": "/usr/bin:/bin", "STNJAX_HUGE_PAGES": "0", "PYTHONPATH": str(root),
           "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "launch.evaluate", f"--workdir={tmp_path}",
                        "--config.infer.volume_buckets=(64, 96)", f"--out={tmp_path / 'e'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "not supported for overriding" not in r.stderr, r.stderr[-2000:]
    assert "checkpoint" in r.stderr, r.stderr[-2000:]


def test_verbosity_sets_the_commands_and_the_libraries_levels():
    """Not given: the command's own INFO lines, the libraries' (absl, jax,
    orbax) from WARNING up; given, --verbosity sets both (absl's scale).
    A command's stderr at the default: tests/test_install.py."""
    import logging as std_logging

    from absl import logging as absl_logging

    from launch import logs
    logger = std_logging.getLogger("stnjax")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    try:
        for given, command in ((None, std_logging.INFO), (-1, std_logging.WARNING),
                               (0, std_logging.INFO), (1, std_logging.DEBUG)):
            logs.set_verbosity(given)
            assert logs.command_level() == command
            # absl's level is what its handler (on the root logger in a
            # command: absl's app.run puts it there) lets through.
            assert absl_logging.get_verbosity() == (-1 if given is None else given)
            # ... and the command's own logger prints at its level, to stderr.
            assert logger.level == command and not logger.propagate and logger.handlers
    finally:
        logs.set_verbosity(None)
        logger.handlers[:], logger.propagate = saved[:2]  # as other tests expect
        logger.setLevel(saved[2])
