"""Command-line faults that must end in one "error:" line naming the file,
exit status 1, nothing lost and nothing half-written (issue 12): a --config
file that is missing, not Python or without get_config(); a read-only or
full workdir; a damaged train_config.json. (A full disk during evaluation
is in tests/test_experiment.py, on its trained models; convert_weights
failures in tests/test_weights.py.)"""

import errno
import json
import re

import pytest

from faults import ROOT, run_command, run_failing

SMOKE = str(ROOT / "launch/configs/smoke.py")


def _one_error_line(r):
    assert r.returncode == 1, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("content,want", [
    (None, r"--config {}: no such file"),
    ("def get_config(:\n", r"--config {}: not valid Python at line 1"),
    ("x = 1\n", r"--config {}: defines no get_config\(\)"),
])
def test_config_file_faults(tmp_path, content, want):
    cfg = tmp_path / "cfg.py"
    if content is not None:
        cfg.write_text(content)
    r = run_command("launch.train", [f"--config={cfg}", f"--workdir={tmp_path / 'w'}"])
    line = _one_error_line(r)
    assert re.match("error: " + want.format(re.escape(str(cfg))), line), line
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("code,hint", [(errno.EROFS, "read-only"),
                                       (errno.ENOSPC, "free space there")])
def test_unwritable_workdir_is_one_line(tmp_path, code, hint):
    work = tmp_path / "w"
    r = run_failing("launch.train", [f"--config={SMOKE}", f"--workdir={work}"],
                    prefix=work, errno_=code)
    line = _one_error_line(r)
    assert str(work) in line and hint in line, line


def test_damaged_train_config_is_one_line(tmp_path):
    work = tmp_path / "w"
    (work / "fold0" / "Z" / "checkpoints").mkdir(parents=True)
    record = json.dumps({"hash": "x", "fields": {}})
    (work / "train_config.json").write_text(record[:7])  # truncated mid-write by another tool
    r = run_command("launch.train", [f"--config={SMOKE}", f"--workdir={work}"])
    line = _one_error_line(r)
    assert "train_config.json is damaged (not valid JSON" in line and "--overwrite" in line, line


def test_evaluate_without_config_needs_a_training_workdir(tmp_path):
    """evaluate and segment default to <workdir>/config.json; a folder
    without one is a one-line error before anything is written."""
    for module, extra in (("launch.evaluate", []), ("launch.segment", [f"--out={tmp_path / 'm'}"])):
        r = run_command(module, [f"--workdir={tmp_path / 'w'}", *extra])
        line = _one_error_line(r)
        assert f"{tmp_path / 'w' / 'config.json'} does not exist" in line and \
            "give --config=FILE" in line, line
    assert not list(tmp_path.iterdir())


def test_evaluate_label_with_unsafe_characters_is_refused(tmp_path):
    r = run_command("launch.evaluate", [f"--config={SMOKE}", f"--workdir={tmp_path / 'w'}",
                                        "--label=../a b"])
    line = _one_error_line(r)
    assert "infer.label: '../a b' is not a safe name" in line, line
    assert not list(tmp_path.iterdir())
